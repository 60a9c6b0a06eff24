"""A simulated Modbus RTU servo drive, alone on a serial line or beside simulated meters.

:class:`ModbusDriveModel` is a drive with the CiA 402 state machine (:class:`~dcud.sim.drive_model.
DriveModel`) behind holding registers (:data:`MODBUS_REGISTERS`), decoding requests and encoding answers
with pymodbus (an implementation independent of dcud's own codec). It plugs into :class:`~dcud.sim.
serial_sim.SimLineRunner` alone (``dcud sim drive --modbus``, :func:`run_modbus_cli`) or together with
simulated IEC 62056-21 meters on one pty (:class:`SharedLineModel`), which also records whether a master
ever interleaved the two (a Modbus request while a meter readout is under way).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from dcud.sim.drive_model import DriveModel

# -- Modbus RTU -------------------------------------------------------------------------------------

MODBUS_REGISTERS: dict[str, int] = {
    "status": 0,
    "control": 1,
    "position": 2,
    "velocity": 4,
    "fault": 6,
    "io": 7,
}
"""Holding registers of the simulated Modbus drive (position and velocity: 2 registers, high word first).
The same map as ``[drive.registers]`` ``status = 0, control = 1, position = 2, velocity = 4, fault = 6,
io = 7``."""
MODBUS_REGISTER_COUNT = 16


@dataclass
class ModbusSimStats:
    """What the simulated Modbus drive saw."""

    requests: int = 0
    answers: int = 0
    exceptions: int = 0
    crc_errors: int = 0
    other_units: int = 0
    overlaps: int = 0
    """Requests that arrived while another device on the line was in the middle of a transaction."""


class ModbusDriveModel:
    """A Modbus RTU drive with the CiA 402 state machine behind holding registers (module docstring).

    Requests are cut from the byte stream by silence (as on a real line: a gap of more than
    ``gap_s`` starts a new frame) and decoded with pymodbus' server-side RTU framer; answers are
    encoded with pymodbus too. Unknown registers answer exception 02, a bad controlword write is
    accepted (the state machine ignores it, like a drive).
    """

    bits_per_char = 11

    def __init__(self, unit: int = 1, baud: int = 9600, *, gap_s: float = 0.02) -> None:
        from pymodbus.framer import FramerRTU
        from pymodbus.pdu import DecodePDU

        self.unit = unit
        self.baud = baud
        self.gap_s = gap_s
        self.model = DriveModel()
        self.stats = ModbusSimStats()
        self.silent = False
        self.busy_check: Callable[[], bool] | None = None
        """Returns True while another device on the line is mid-transaction (for overlap detection)."""
        self._framer: Any = FramerRTU(DecodePDU(is_server=True))
        self._buffer = bytearray()
        self._last_rx_s = 0.0
        self._last_step_s: float | None = None

    # registers

    def registers(self) -> list[int]:
        """The holding registers as they read now."""
        m = self.model
        regs = [0] * MODBUS_REGISTER_COUNT
        position = m.position & 0xFFFFFFFF
        velocity = m.velocity & 0xFFFFFFFF
        regs[MODBUS_REGISTERS["status"]] = m.statusword
        regs[MODBUS_REGISTERS["control"]] = m.controlword
        regs[MODBUS_REGISTERS["position"]] = position >> 16
        regs[MODBUS_REGISTERS["position"] + 1] = position & 0xFFFF
        regs[MODBUS_REGISTERS["velocity"]] = velocity >> 16
        regs[MODBUS_REGISTERS["velocity"] + 1] = velocity & 0xFFFF
        regs[MODBUS_REGISTERS["fault"]] = m.error_code
        regs[MODBUS_REGISTERS["io"]] = m.digital_inputs & 0xFFFF
        return regs

    def _write(self, address: int, value: int) -> bool:
        if address == MODBUS_REGISTERS["control"]:
            self.model.write_controlword(value)
            return True
        return False

    def step(self, now: float) -> None:
        """Advance the drive's time (motion, fault reaction)."""
        if self._last_step_s is not None:
            self.model.step(now, max(0.0, now - self._last_step_s))
        self._last_step_s = now

    # SimLine protocol (dcud.sim.serial_sim)

    def inbound_baud(self, data: bytes) -> int:
        """The line rate."""
        return self.baud

    def receive(self, data: bytes, now: float) -> list[Any]:
        """Bytes from the master that finished arriving at ``now``; returns the answers to send."""
        from dcud.sim.serial_sim import Outgoing

        started = now - len(data) * self.bits_per_char / self.baud
        if started - self._last_rx_s > self.gap_s:
            self._buffer.clear()  # silence: a new frame starts
        self._last_rx_s = now
        self._buffer += data
        self.step(now)
        try:
            used, pdu = self._framer.handleFrame(bytes(self._buffer), 0, 0)
        except Exception:  # pymodbus raises ModbusIOException on an undecodable body
            self.stats.crc_errors += 1
            self._buffer.clear()
            return []
        if pdu is None:
            if used:
                self.stats.crc_errors += 1
                self._buffer.clear()
            return []
        del self._buffer[:used]
        if pdu.dev_id != self.unit:
            self.stats.other_units += 1
            return []
        self.stats.requests += 1
        if self.busy_check is not None and self.busy_check():
            self.stats.overlaps += 1
        if self.silent:
            return []
        answer = self._answer(pdu)
        self.stats.answers += 1
        return [Outgoing(answer, self.baud, now + 0.002)]

    def _answer(self, pdu: Any) -> bytes:
        from pymodbus.pdu import ExceptionResponse
        from pymodbus.pdu.register_message import (
            ReadHoldingRegistersResponse,
            WriteMultipleRegistersResponse,
            WriteSingleRegisterResponse,
        )

        function = pdu.function_code
        regs = self.registers()
        response: Any
        if function in (3, 4):
            if pdu.address + pdu.count > len(regs):
                response = ExceptionResponse(function, 2, self.unit)
            else:
                response = ReadHoldingRegistersResponse(
                    registers=regs[pdu.address : pdu.address + pdu.count], dev_id=self.unit
                )
                response.function_code = function
        elif function == 6:
            if self._write(pdu.address, pdu.registers[0]):
                response = WriteSingleRegisterResponse(
                    address=pdu.address, registers=pdu.registers, dev_id=self.unit
                )
            else:
                response = ExceptionResponse(function, 2, self.unit)
        elif function == 16:
            ok = all(self._write(pdu.address + i, v) for i, v in enumerate(pdu.registers))
            response = (
                WriteMultipleRegistersResponse(
                    address=pdu.address, count=len(pdu.registers), dev_id=self.unit
                )
                if ok
                else ExceptionResponse(function, 2, self.unit)
            )
        else:
            response = ExceptionResponse(function, 1, self.unit)
        if response.function_code & 0x80:
            self.stats.exceptions += 1
        response.dev_id = self.unit
        return bytes(self._framer.buildFrame(response))

    def next_deadline(self) -> float | None:
        """No timers: the drive answers at once."""
        return None

    def handle_timer(self, now: float) -> list[Any]:
        """No timers."""
        return []

    def set_silent(self, addresses: set[str]) -> None:
        """Go silent when the unit number is listed (control file of the meter simulator)."""
        self.silent = str(self.unit) in addresses

    def refresh(self) -> None:
        """Time-dependent values are computed on each request."""


class SharedLineModel:
    """IEC 62056-21 meters and Modbus RTU drives on one simulated RS485 line.

    Every device hears every byte. A Modbus request that arrives while a meter is between sign-on and
    the end of its data message counts as an *overlap* (two masters' transactions interleaved).
    """

    bits_per_char = 11

    def __init__(self, meters: Any, drives: Sequence[ModbusDriveModel]) -> None:
        self.meters = meters
        self.drives = list(drives)
        for drive in self.drives:
            drive.busy_check = self.meter_busy

    def meter_busy(self) -> bool:
        """True while a meter is answering a readout (identification sent, data not yet complete)."""
        return any(
            getattr(m, "state", "idle") in ("send_ident", "wait_option", "send_data")
            for m in self.meters.meters
        )

    def inbound_baud(self, data: bytes) -> int:
        """Meter requests come at the meters' rate, Modbus at the drives'."""
        # Sign-on "/", option select ACK + digit, NAK, break SOH "B": the meter protocol's messages.
        if (
            data[:1] in (b"/", b"\x15")
            or data[:2] == b"\x01B"
            or (data[:1] == b"\x06" and data[1:2].isdigit())
        ):
            return int(self.meters.inbound_baud(data))
        return self.drives[0].baud if self.drives else int(self.meters.inbound_baud(data))

    def receive(self, data: bytes, now: float) -> list[Any]:
        """Every device hears the bytes."""
        out: list[Any] = list(self.meters.receive(data, now))
        for drive in self.drives:
            out += drive.receive(data, now)
        return out

    def next_deadline(self) -> float | None:
        """The meters' timers."""
        deadline: float | None = self.meters.next_deadline()
        return deadline

    def handle_timer(self, now: float) -> list[Any]:
        """The meters' timers."""
        return list(self.meters.handle_timer(now))

    def set_silent(self, addresses: set[str]) -> None:
        """Silence meters and drives by address/unit."""
        self.meters.set_silent(addresses)
        for drive in self.drives:
            drive.set_silent(addresses)

    def refresh(self) -> None:
        """Meter values."""
        self.meters.refresh()


def run_modbus_cli(
    device: str, link: str, unit: int, baud: int, *, stdin: Any = None, stdout: Any = None
) -> int:
    """``dcud sim drive --modbus``: one Modbus RTU drive on a tty or a new pty, controlled from stdin."""
    import asyncio

    from dcud.sim.serial_sim import SimLineRunner, SimLineSpec

    source = stdin if stdin is not None else sys.stdin
    sink = stdout if stdout is not None else sys.stdout
    model = ModbusDriveModel(unit=unit, baud=baud)
    spec = SimLineSpec("modbus-drive", "iec62056-21", [], link=link, device=device, baud=baud)
    lock = threading.Lock()

    def say(doc: dict[str, Any]) -> None:
        sink.write(json.dumps(doc) + "\n")
        sink.flush()

    def control(line: str) -> dict[str, Any]:
        words = line.split()
        with lock:
            if not words or words[0] == "status":
                pass
            elif words[0] == "fault":
                model.model.inject_fault(int(words[1], 0) if len(words) > 1 else 0x3210, time.monotonic())
            elif words[0] == "warning":
                model.model.warning = len(words) < 2 or words[1] in ("on", "1", "true")
            elif words[0] == "silent":
                model.silent = len(words) < 2 or words[1] in ("on", "1", "true")
            else:
                return {"ok": False, "error": f"unknown command {words[0]!r}"}
            m = model.model
            return {
                "ok": True,
                "unit": unit,
                "cia402": str(m.state),
                "statusword": m.statusword,
                "position": m.position,
                "error_code": m.error_code,
                **model.stats.__dict__,
            }

    async def main() -> None:
        runner = SimLineRunner(spec, model=cast(Any, model))
        task = asyncio.create_task(runner.run())
        await runner.ready.wait()
        say({"ready": True, "path": runner.path, "link": link or None, "unit": unit, "baud": baud})
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def reader() -> None:
            for line in source:
                if line.strip() in ("quit", "exit"):
                    break
                loop.call_soon_threadsafe(say, control(line))
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=reader, daemon=True).start()
        await done.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


__all__ = ["MODBUS_REGISTERS", "ModbusDriveModel", "ModbusSimStats", "SharedLineModel", "run_modbus_cli"]
