"""Servo drive simulators: a CiA 402 drive on CAN and a Modbus RTU drive on a serial line.

**CANopen** (:class:`CanDriveSimulator`): one python-can bus (``slcan``/``serial`` on one end of a pty
pair, ``virtual`` in one process, ``socketcan`` on a real or virtual CAN) carrying any number of
:class:`Cia402Drive` nodes. Each is a canopen :class:`canopen.LocalNode` with an object dictionary
(:func:`build_object_dictionary`): the library serves SDO, NMT and the heartbeat producer, the simulator
adds the CiA 402 power state machine (writes to 6040 move it, 6041 shows it), a position that moves at
the target velocity (60FF) while the operation is enabled, TPDO1 (6041 + 6064) and TPDO2 (606C + 603F +
6061) every ``tpdo_period_s`` while operational, fault injection (EMCY, 603F, 1001, fault reaction then
fault) and a way to kill the node (no heartbeat, no PDO, no SDO answers) and to bring it back (with or
without a boot-up).

**Modbus RTU** (:class:`ModbusDriveModel`): a drive with the CiA 402 state machine behind holding
registers (:data:`MODBUS_REGISTERS`), decoding requests and encoding answers with pymodbus (an
implementation independent of dcud's own codec). It plugs into :class:`~dcud.sim.serial_sim.SimLineRunner`
alone or together with simulated IEC 62056-21 meters on one pty (:class:`SharedLineModel`), which also
records whether a master ever interleaved the two (a Modbus request while a meter readout is under way).

Control (``dcud sim drive`` reads these lines on stdin; tests call :meth:`CanDriveSimulator.control`):
``fault NODE [CODE]``, ``kill NODE``, ``revive NODE``, ``reboot NODE``, ``warning NODE on|off``,
``raw HEX`` (bytes straight onto the serial line: malformed frames), ``frame COBID HEX`` (any CAN frame,
e.g. from a node id nobody configured), ``status``, ``quit``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import can
import canopen
from canopen.objectdictionary import ODArray, ODRecord, ODVariable
from canopen.objectdictionary import datatypes as dt

from dcud.codec.cia402 import (
    CW_FAULT_RESET,
    DriveState,
    apply_controlword,
    encode_emcy,
    encode_statusword,
)

DEVICE_TYPE_SERVO = 0x00020192
VENDOR_ID = 0x000000D0
PRODUCT_CODE = 0x00000402
DEFAULT_TARGET_VELOCITY = 1000
"""Increments per second once the operation is enabled (60FF default)."""
QUICK_STOP_STAY = 6
"""605A option code: stop, then stay in quick stop active (5..8); 1..4 fall to switch on disabled."""
FAULT_REACTION_S = 0.05

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


# -- the CiA 402 device model (shared by the CAN and the Modbus simulators) -----------------------


@dataclass
class DriveModel:
    """The CiA 402 device: power state machine, motion, faults. Not thread-safe: callers hold a lock."""

    state: DriveState = DriveState.SWITCH_ON_DISABLED
    position: int = 0
    velocity: int = 0
    target_velocity: int = DEFAULT_TARGET_VELOCITY
    error_code: int = 0
    error_register: int = 0
    mode: int = 3
    digital_inputs: int = 0
    quick_stop_option: int = QUICK_STOP_STAY
    warning: bool = False
    controlword: int = 0
    fault_since_s: float = 0.0
    _position_frac: float = 0.0

    @property
    def statusword(self) -> int:
        """6041 as the drive shows it."""
        flags = 0x0200  # remote: the drive follows the controlword
        if self.warning:
            flags |= 0x0080
        if self.velocity == 0 and self.state is DriveState.OPERATION_ENABLED:
            flags |= 0x0400  # target reached
        return encode_statusword(self.state, flags=flags)

    def write_controlword(self, value: int) -> DriveState:
        """Apply a controlword write; returns the new state."""
        edge = bool(value & CW_FAULT_RESET) and not (self.controlword & CW_FAULT_RESET)
        self.controlword = value
        before = self.state
        self.state = apply_controlword(self.state, value, fault_reset_edge=edge)
        if before is DriveState.FAULT and self.state is not DriveState.FAULT:
            self.error_code = 0
            self.error_register = 0
        return self.state

    def inject_fault(self, code: int, now: float) -> None:
        """A fault occurs: fault reaction now, fault after FAULT_REACTION_S."""
        self.error_code = code
        klass = {0x2: 0x02, 0x3: 0x04, 0x4: 0x08, 0x8: 0x10}.get(code >> 12, 0x80)
        self.error_register = 0x01 | klass
        self.state = DriveState.FAULT_REACTION_ACTIVE
        self.fault_since_s = now

    def reset(self) -> None:
        """Power-on state (reset node)."""
        self.state = DriveState.SWITCH_ON_DISABLED
        self.velocity = 0
        self.error_code = 0
        self.error_register = 0
        self.controlword = 0

    def step(self, now: float, dt_s: float) -> None:
        """Advance time: fault reaction ends, quick stop completes, the axis moves."""
        if self.state is DriveState.FAULT_REACTION_ACTIVE and now - self.fault_since_s >= FAULT_REACTION_S:
            self.state = DriveState.FAULT
        if self.state is DriveState.OPERATION_ENABLED:
            self.velocity = self.target_velocity
        else:
            self.velocity = 0
        if self.state is DriveState.QUICK_STOP_ACTIVE and 1 <= self.quick_stop_option <= 4:
            self.state = DriveState.SWITCH_ON_DISABLED
        self._position_frac += self.velocity * dt_s
        whole = int(self._position_frac)
        self._position_frac -= whole
        self.position = (self.position + whole + 2**31) % 2**32 - 2**31


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


def _option_value(text: str) -> str | int | float | bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_bus_options(items: Sequence[str]) -> dict[str, str | int | float | bool]:
    """``["sleep_after_open=0", "tty_baudrate=115200"]`` -> python-can keyword arguments."""
    options: dict[str, str | int | float | bool] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bus option {item!r} is not KEY=VALUE")
        options[key.strip()] = _option_value(value.strip())
    return options


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


def cmd_sim_drive(args: Any) -> int:
    """``dcud sim drive`` (arguments from ``dcud.__main__``)."""
    if args.modbus or args.link:
        return run_modbus_cli(args.modbus or "", args.link, args.unit, args.baud)
    if not args.channel:
        print("dcud sim drive: --channel is required for CAN (or use --modbus TTY)", file=sys.stderr)
        return 2
    options = SimOptions(
        heartbeat_ms=args.heartbeat_ms, tpdo_period_s=args.tpdo_ms / 1000.0, boot_up=not args.no_boot_up
    )
    return run_can_cli(
        args.interface, args.channel, parse_nodes(args.nodes), options, parse_bus_options(args.option)
    )


# -- demo ----------------------------------------------------------------------------------------------

DEMO_TOML = """
[[can]]
name = "can0"
interface = "slcan"
channel = "{channel}"
options = {{ sleep_after_open = 0 }}

[[drive]]
name = "axis-1"
bus = "can0"
protocol = "canopen"
node_id = 1
commands = true
history_interval_s = 60

[[drive]]
name = "axis-2"
bus = "can0"
protocol = "canopen"
node_id = 2
commands = true
history_interval_s = 60
"""


def _prepare_demo_dir(workdir: Any) -> tuple[str, str, str]:
    import os

    os.makedirs(workdir, exist_ok=True)
    dcu_end, sim_end = os.path.join(workdir, "can-dcu"), os.path.join(workdir, "can-sim")
    for path in (dcu_end, sim_end):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return dcu_end, sim_end, os.path.join(workdir, "drive-sim.log")


def _links_ready(*paths: str) -> bool:
    import os

    return all(os.path.exists(p) for p in paths)


async def start_demo_drives(workdir: Any) -> tuple[str, Callable[[], Any]]:
    """Two CiA 402 drives for ``dcud demo``: a socat pty pair carrying slcan, the simulator on one end.

    Returns the dcud.toml snippet (``[[can]]`` ``can0`` and ``[[drive]]`` axis-1/axis-2, commands on)
    and an async ``cleanup()`` that stops the simulator and socat. The simulator logs to
    ``workdir/drive-sim.log``.
    """
    import asyncio
    import os

    from dcud.sim.peers import find_program

    dcu_end, sim_end, log_path = _prepare_demo_dir(workdir)
    socat = await asyncio.create_subprocess_exec(
        find_program("socat", "socat"),
        f"pty,raw,echo=0,link={dcu_end}",
        f"pty,raw,echo=0,link={sim_end}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    for _ in range(200):
        if _links_ready(dcu_end, sim_end):
            break
        await asyncio.sleep(0.025)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dcud",
        "sim",
        "drive",
        "--interface",
        "slcan",
        "--channel",
        str(sim_end),
        "--nodes",
        "1-2",
        "--option",
        "sleep_after_open=0",
        stdin=asyncio.subprocess.PIPE,
        stdout=log_fd,
        stderr=log_fd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(log_fd)

    async def cleanup() -> None:
        for proc in (sim, socat):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 3.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()

    return DEMO_TOML.format(channel=dcu_end), cleanup


__all__ = [
    "MODBUS_REGISTERS",
    "CanDriveSimulator",
    "Cia402Drive",
    "DriveModel",
    "ModbusDriveModel",
    "SharedLineModel",
    "SimOptions",
    "build_object_dictionary",
    "cmd_sim_drive",
    "parse_nodes",
    "run_can_cli",
    "start_demo_drives",
]
