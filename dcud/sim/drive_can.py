"""Simulated CiA 402 drives on a CAN bus (``dcud sim drive``), run by the canopen library.

:class:`CanDriveSimulator` puts any number of :class:`Cia402Drive` nodes on one python-can bus
(``slcan``/``serial`` on one end of a pty pair, ``virtual`` in one process, ``udp_multicast`` in a
private network namespace, ``socketcan`` on a real or virtual CAN). Each is a canopen
:class:`canopen.LocalNode` with an object dictionary (:func:`build_object_dictionary`): the library serves
SDO, NMT and the heartbeat producer; the simulator adds the CiA 402 device (:class:`~dcud.sim.drive_model.
DriveModel`: writes to 6040 move it, 6041 shows it), TPDO1 (6041 + 6064) and TPDO2 (606C + 603F + 6061)
every ``tpdo_period_s`` while operational, fault injection (EMCY, 603F, 1001, fault reaction then fault)
and a way to kill a node (no heartbeat, no PDO, no SDO answers) and to bring it back (with or without a
boot-up). Control lines: see :mod:`dcud.sim.drive`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import can
import canopen
from canopen.objectdictionary import ODArray, ODRecord, ODVariable
from canopen.objectdictionary import datatypes as dt

from dcud.codec.cia402 import CW_FAULT_RESET, DriveState, encode_emcy
from dcud.sim.drive_model import DEFAULT_TARGET_VELOCITY, QUICK_STOP_STAY, DriveModel

DEVICE_TYPE_SERVO = 0x00020192
VENDOR_ID = 0x000000D0
PRODUCT_CODE = 0x00000402

# -- object dictionary ----------------------------------------------------------------------------


def _var(name: str, index: int, subindex: int, data_type: int, *, access: str, default: Any) -> ODVariable:
    var = ODVariable(name, index, subindex)
    var.data_type = data_type
    var.access_type = access
    var.default = default
    return var


def _record(od: Any, name: str, index: int, members: Sequence[ODVariable]) -> None:
    record = ODRecord(name, index)
    for member in members:
        record.add_member(member)
    od.add_object(record)


def build_object_dictionary(node_id: int, *, heartbeat_ms: int = 100, tpdos: Sequence[int] = (1, 2)) -> Any:
    """The object dictionary of a simulated CiA 402 servo drive (TPDO1: 6041+6064, TPDO2: 606C+603F+6061)."""
    od: Any = canopen.ObjectDictionary()  # type: ignore[no-untyped-call]
    od.node_id = node_id
    od.add_object(_var("Device type", 0x1000, 0, dt.UNSIGNED32, access="ro", default=DEVICE_TYPE_SERVO))
    od.add_object(_var("Error register", 0x1001, 0, dt.UNSIGNED8, access="ro", default=0))
    od.add_object(
        _var(
            "Manufacturer device name",
            0x1008,
            0,
            dt.VISIBLE_STRING,
            access="const",
            default="dcud CiA 402 sim",
        )
    )
    od.add_object(
        _var("Producer heartbeat time", 0x1017, 0, dt.UNSIGNED16, access="rw", default=heartbeat_ms)
    )
    _record(
        od,
        "Identity object",
        0x1018,
        [
            _var("Number of entries", 0x1018, 0, dt.UNSIGNED8, access="const", default=4),
            _var("Vendor-ID", 0x1018, 1, dt.UNSIGNED32, access="ro", default=VENDOR_ID),
            _var("Product code", 0x1018, 2, dt.UNSIGNED32, access="ro", default=PRODUCT_CODE),
            _var("Revision number", 0x1018, 3, dt.UNSIGNED32, access="ro", default=1),
            _var("Serial number", 0x1018, 4, dt.UNSIGNED32, access="ro", default=1000 + node_id),
        ],
    )
    mappings = {
        1: [0x60410010, 0x60640020],
        2: [0x606C0020, 0x603F0010, 0x60610008],
    }
    for number in (1, 2, 3, 4):
        com, mapping = 0x1800 + number - 1, 0x1A00 + number - 1
        entries = mappings.get(number, []) if number in tpdos else []
        cob_id = (0x180 + 0x100 * (number - 1) + node_id) | (0 if entries else 0x80000000)
        _record(
            od,
            f"TPDO{number} communication parameter",
            com,
            [
                _var("Highest sub-index supported", com, 0, dt.UNSIGNED8, access="const", default=5),
                _var("COB-ID", com, 1, dt.UNSIGNED32, access="rw", default=cob_id),
                _var("Transmission type", com, 2, dt.UNSIGNED8, access="rw", default=0xFE),
                _var("Inhibit time", com, 3, dt.UNSIGNED16, access="rw", default=0),
                _var("Event timer", com, 5, dt.UNSIGNED16, access="rw", default=10),
            ],
        )
        array = ODArray(f"TPDO{number} mapping parameter", mapping)
        array.add_member(
            _var("Number of mapped objects", mapping, 0, dt.UNSIGNED8, access="rw", default=len(entries))
        )
        for sub in range(1, 9):
            value = entries[sub - 1] if sub <= len(entries) else 0
            array.add_member(
                _var(f"Mapped object {sub}", mapping, sub, dt.UNSIGNED32, access="rw", default=value)
            )
        od.add_object(array)
    od.add_object(_var("Error code", 0x603F, 0, dt.UNSIGNED16, access="ro", default=0))
    od.add_object(_var("Controlword", 0x6040, 0, dt.UNSIGNED16, access="rw", default=0))
    od.add_object(_var("Statusword", 0x6041, 0, dt.UNSIGNED16, access="ro", default=0))
    od.add_object(
        _var("Quick stop option code", 0x605A, 0, dt.INTEGER16, access="rw", default=QUICK_STOP_STAY)
    )
    od.add_object(_var("Modes of operation", 0x6060, 0, dt.INTEGER8, access="rw", default=3))
    od.add_object(_var("Modes of operation display", 0x6061, 0, dt.INTEGER8, access="ro", default=3))
    od.add_object(_var("Position actual value", 0x6064, 0, dt.INTEGER32, access="ro", default=0))
    od.add_object(_var("Velocity actual value", 0x606C, 0, dt.INTEGER32, access="ro", default=0))
    od.add_object(_var("Digital inputs", 0x60FD, 0, dt.UNSIGNED32, access="ro", default=0))
    od.add_object(
        _var("Target velocity", 0x60FF, 0, dt.INTEGER32, access="rw", default=DEFAULT_TARGET_VELOCITY)
    )
    od.add_object(_var("Supported drive modes", 0x6502, 0, dt.UNSIGNED32, access="ro", default=0x0000000D))
    return od


# -- CANopen ----------------------------------------------------------------------------------------


@dataclass
class SimOptions:
    """Timing and behaviour of the simulated CAN drives."""

    heartbeat_ms: int = 100
    tpdo_period_s: float = 0.01
    boot_up: bool = True
    """Send a boot-up message and enter pre-operational at start (else start pre-operational silently)."""
    tpdos: tuple[int, ...] = (1, 2)
    """Which TPDOs exist (1: statusword + position, 2: velocity + error code + mode display)."""


class Cia402Drive:
    """One simulated CiA 402 drive on a canopen network (see the module docstring)."""

    def __init__(self, network: canopen.Network, node_id: int, options: SimOptions) -> None:
        self.network = cast(Any, network)
        self.node_id = node_id
        self.options = options
        self.model = DriveModel()
        self.lock = threading.RLock()
        self.alive = True
        self.tpdo_sent = 0
        self.statusword_changes: collections.deque[tuple[int, float]] = collections.deque(maxlen=1024)
        """(statusword, time.monotonic()) of the first TPDO that carried each new statusword."""
        self._last_sent_statusword: int | None = None
        # canopen is only partly typed: the simulator talks to it through Any.
        self.node = cast(
            Any,
            canopen.LocalNode(
                node_id,
                build_object_dictionary(node_id, heartbeat_ms=options.heartbeat_ms, tpdos=options.tpdos),
            ),
        )
        self.network.add_node(self.node)
        self.node.add_read_callback(self._on_read)
        self.node.add_write_callback(self._on_write)
        self.network.subscribe(0, self._on_nmt)
        self.node.tpdo.read(from_od=True)

    # object dictionary hooks (canopen's notifier thread)

    def _on_read(self, index: int, subindex: int, od: ODVariable) -> int | None:
        with self.lock:
            m = self.model
            values = {
                (0x6041, 0): m.statusword,
                (0x6064, 0): m.position,
                (0x606C, 0): m.velocity,
                (0x603F, 0): m.error_code,
                (0x1001, 0): m.error_register,
                (0x6061, 0): m.mode,
                (0x6060, 0): m.mode,
                (0x60FD, 0): m.digital_inputs,
                (0x60FF, 0): m.target_velocity,
                (0x6040, 0): m.controlword,
                (0x605A, 0): m.quick_stop_option,
            }
            return values.get((index, subindex))

    def _on_write(self, index: int, subindex: int, od: ODVariable, data: bytes) -> None:
        with self.lock:
            if index == 0x6040:
                (value,) = struct.unpack("<H", data)
                self.model.write_controlword(value)
                if self.model.state is DriveState.SWITCH_ON_DISABLED and value & CW_FAULT_RESET:
                    self._send_emcy_locked(0, 0)  # errors cleared
            elif index == 0x6060:
                self.model.mode = struct.unpack("<b", data)[0]
            elif index == 0x60FF:
                self.model.target_velocity = struct.unpack("<i", data)[0]
            elif index == 0x605A:
                self.model.quick_stop_option = struct.unpack("<h", data)[0]

    def _on_nmt(self, can_id: int, data: bytes, timestamp: float) -> None:
        if len(data) < 2 or not self.alive:
            return
        command, node = data[0], data[1]
        if node not in (0, self.node_id):
            return
        if command in (0x81, 0x82):
            # canopen's NMT slave only notes the state; a real node boots again: boot-up, pre-operational.
            threading.Thread(target=self.boot, args=(command == 0x81,), daemon=True).start()

    def _send_emcy_locked(self, code: int, register: int) -> None:
        if self.alive:
            self.network.send_message(0x80 + self.node_id, encode_emcy(code, register))

    # lifecycle

    def boot(self, reset_application: bool = True) -> None:
        """Boot-up message, then pre-operational (heartbeat starts), like a node after power-on."""
        with self.lock:
            if reset_application:
                self.model.reset()
        self.node.nmt.send_command(0x81)  # INITIALISING: sends the boot-up message
        self.node.nmt.send_command(0x80)  # PRE-OPERATIONAL: starts the heartbeat producer

    def kill(self) -> None:
        """Go silent: no heartbeat, no TPDO, no SDO answers (a cut cable, a dead node)."""
        with self.lock:
            if not self.alive:
                return
            self.alive = False
        self.node.nmt.stop_heartbeat()
        self.network.unsubscribe(self.node.sdo.rx_cobid, self.node.sdo.on_request)

    def revive(self, *, reboot: bool) -> None:
        """Come back: with a boot-up (power cycle) or as before (cable reconnected)."""
        with self.lock:
            was_alive = self.alive
            self.alive = True
        if not was_alive:
            self.network.subscribe(self.node.sdo.rx_cobid, self.node.sdo.on_request)
        if reboot:
            self.boot()
        else:
            self.node.nmt.start_heartbeat(self.options.heartbeat_ms)

    def inject_fault(self, code: int) -> None:
        """A fault: EMCY with ``code``, 603F, 1001, then the fault state."""
        with self.lock:
            self.model.inject_fault(code, time.monotonic())
            self._send_emcy_locked(code, self.model.error_register)

    def set_warning(self, on: bool) -> None:
        """Set or clear the statusword's warning bit (bit 7)."""
        with self.lock:
            self.model.warning = on

    @property
    def nmt_state(self) -> str:
        """canopen's NMT state name."""
        return str(self.node.nmt.state)

    def tick(self, now: float, dt_s: float) -> None:
        """Advance the model; send the TPDOs when operational."""
        with self.lock:
            self.model.step(now, dt_s)
            if not self.alive or self.node.nmt.state != "OPERATIONAL":
                return
            m = self.model
            values = {
                0x6041: m.statusword,
                0x6064: m.position,
                0x606C: m.velocity,
                0x603F: m.error_code,
                0x6061: m.mode,
            }
            statusword = m.statusword
        if statusword != self._last_sent_statusword:
            # Stamped before sending: a master may react before this thread runs again.
            self._last_sent_statusword = statusword
            self.statusword_changes.append((statusword, time.monotonic()))
        for number in (1, 2):
            pdo = self.node.tpdo[number]
            if not pdo.enabled:
                continue
            for var in pdo:
                var.raw = values.get(var.index, 0)
            pdo.transmit()
            self.tpdo_sent += 1

    def status(self) -> dict[str, Any]:
        """A JSON-friendly snapshot."""
        with self.lock:
            m = self.model
            return {
                "node_id": self.node_id,
                "alive": self.alive,
                "nmt": self.nmt_state,
                "cia402": str(m.state),
                "statusword": m.statusword,
                "position": m.position,
                "velocity": m.velocity,
                "error_code": m.error_code,
                "tpdo_sent": self.tpdo_sent,
            }


class CanDriveSimulator:
    """Simulated CiA 402 drives on one python-can bus, moved by one thread (module docstring)."""

    def __init__(
        self,
        interface: str,
        channel: str,
        node_ids: Sequence[int],
        options: SimOptions | None = None,
        **bus_options: Any,
    ) -> None:
        self.interface = interface
        self.channel = channel
        self.options = options or SimOptions()
        self.network = cast(Any, canopen.Network())
        self.network.connect(interface=interface, channel=channel, **bus_options)
        self.drives = {node_id: Cia402Drive(self.network, node_id, self.options) for node_id in node_ids}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Boot every node and start moving them."""
        for drive in self.drives.values():
            if self.options.boot_up:
                drive.boot()
            else:
                drive.node.nmt.send_command(0x80)
        self._thread = threading.Thread(target=self._run, name="sim-drives", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self.options.tpdo_period_s
        last = time.monotonic()
        next_tick = last + period
        while not self._stop.is_set():
            now = time.monotonic()
            for drive in self.drives.values():
                try:
                    drive.tick(now, now - last)
                except (can.CanError, OSError, RuntimeError):
                    continue  # the master's end went away; keep simulating
            last = now
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay < -period * 10:
                next_tick = time.monotonic() + period  # fell far behind (suspended): do not burst
                delay = period
            self._stop.wait(max(0.0, delay))

    def stop(self) -> None:
        """Stop the thread and close the bus."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        for drive in self.drives.values():
            drive.node.nmt.stop_heartbeat()
        with contextlib.suppress(Exception):
            self.network.disconnect()

    def drive(self, node_id: int) -> Cia402Drive:
        """The drive with ``node_id``."""
        return self.drives[node_id]

    def inject_raw(self, data: bytes) -> None:
        """Write bytes straight onto a serial-based bus (slcan/serial): garbage and half frames."""
        bus: Any = self.network.bus
        port = getattr(bus, "serialPortOrig", None) or getattr(bus, "_ser", None)
        if port is None:
            raise ValueError(f"interface {self.interface} has no serial port to write raw bytes to")
        with self.network.send_lock:
            port.write(data)
            port.flush()

    def send_frame(self, cob_id: int, data: bytes) -> None:
        """Any CAN frame (a node id nobody configured, a short EMCY...)."""
        self.network.send_message(cob_id, data)

    def control(self, line: str) -> dict[str, Any]:
        """Execute one control line (module docstring); returns a JSON-friendly answer."""
        words = line.split()
        if not words:
            return {"ok": True}
        verb, args = words[0].lower(), words[1:]
        try:
            if verb == "status":
                return {"ok": True, "drives": [d.status() for d in self.drives.values()]}
            if verb == "raw":
                self.inject_raw(bytes.fromhex("".join(args)))
                return {"ok": True}
            if verb == "frame":
                self.send_frame(int(args[0], 0), bytes.fromhex("".join(args[1:])))
                return {"ok": True}
            drive = self.drive(int(args[0], 0))
            if verb == "fault":
                drive.inject_fault(int(args[1], 0) if len(args) > 1 else 0x3210)
            elif verb == "kill":
                drive.kill()
            elif verb == "revive":
                drive.revive(reboot=False)
            elif verb == "reboot":
                drive.revive(reboot=True)
            elif verb == "warning":
                drive.set_warning(len(args) < 2 or args[1].lower() in ("on", "1", "true"))
            else:
                return {"ok": False, "error": f"unknown command {verb!r}"}
            return {"ok": True, "drive": drive.status()}
        except (IndexError, ValueError, KeyError) as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def parse_nodes(text: str) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]`` (CANopen node ids 1..127)."""
    nodes: list[int] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if "-" in part:
            first, last = (int(p, 0) for p in part.split("-", 1))
            nodes.extend(range(first, last + 1))
        else:
            nodes.append(int(part, 0))
    if not nodes or any(not 1 <= n <= 127 for n in nodes):
        raise ValueError(f"node ids must be 1..127, got {text!r}")
    return nodes


def run_can_cli(
    interface: str,
    channel: str,
    nodes: Sequence[int],
    options: SimOptions,
    bus_options: dict[str, Any],
    *,
    stdin: Any = None,
    stdout: Any = None,
) -> int:
    """``dcud sim drive``: serve until ``quit`` or end of input; one JSON line per control line."""
    source = stdin if stdin is not None else sys.stdin
    sink = stdout if stdout is not None else sys.stdout
    import os

    if os.environ.get("DCUD_SIM_DEBUG"):  # canopen's own log (SDO server, NMT) on stderr
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    sim = CanDriveSimulator(interface, channel, nodes, options, **bus_options)
    sim.start()

    def say(doc: dict[str, Any]) -> None:
        sink.write(json.dumps(doc) + "\n")
        sink.flush()

    say({"ready": True, "interface": interface, "channel": channel, "nodes": list(nodes)})
    try:
        for line in source:
            if line.strip().lower() in ("quit", "exit"):
                break
            say(sim.control(line))
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


__all__ = [
    "CanDriveSimulator",
    "Cia402Drive",
    "SimOptions",
    "build_object_dictionary",
    "parse_nodes",
    "run_can_cli",
]
