"""Servo drives: CANopen (CiA 402) masters per CAN bus, state publishing, events, history and commands.

One :class:`CanDriveService` per ``[[can]]`` that has drives owns the bus (:class:`~dcud.transport.can.
CanPort`) and a :class:`CanopenDrive` per ``[[drive]]`` with ``protocol = "canopen"`` on it. Frames are
routed by COB-ID in the event loop; the protocol is :mod:`dcud.codec.canopen` and :mod:`dcud.codec.cia402`
(sans-I/O), so no thread of the canopen library runs inside dcud (see ``docs/drives.md`` for the
measurement behind that choice).

Per drive, the master:

- tracks NMT state from heartbeat and boot-up, starts the node (NMT start) once it is configured, and
  reconfigures it after a boot-up, a heartbeat loss or a bus reopen;
- consumes heartbeat with a timeout of 1.5 x the producer time (1017), at least the period + 200 ms, or
  ``heartbeat_timeout_s``;
- reads the TPDO mapping (1800+/1A00+) from the drive unless ``[[drive.tpdo]]`` configures it, and decodes
  statusword, position, velocity, error code and mode display from TPDOs; what no TPDO carries is read by
  SDO every ``poll_interval_s``;
- decodes EMCY into ``drive_fault`` events; raises ``drive_boot_up``, ``drive_heartbeat_lost``,
  ``drive_heartbeat_restored`` and ``drive_fault_cleared``;
- publishes the retained state (event bus subtopic ``drive/<name>``) at once on a change of NMT/CiA 402
  state, error code, heartbeat or warning, and at most every ``state_interval_s`` for position and
  velocity alone (never at PDO rate);
- commits a history record (kind ``drive``, subtopic ``drive/<name>/history``) every ``history_interval_s``.

Commands (``<p>/cmd/drive/<verb>``, the drive named in the payload: ``{"drive": "axis-1"}``) are served by
:func:`register_drive_commands` for every protocol: ``enable``, ``disable``, ``quick_stop``,
``fault_reset``, ``read``, ``write`` and ``state``. All but ``state`` are refused unless the drive has
``commands = true``; a command the drive's present state does not allow is refused with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
import structlog

from dcud.codec import canopen as co
from dcud.codec.cia402 import (
    DriveState,
    Goal,
    Statusword,
    TransitionError,
    decode_emcy,
    decode_statusword,
    emcy_text,
    error_register_flags,
    plan,
)
from dcud.config.model import CanConfig, DriveConfig, Name
from dcud.errors import (
    DcudError,
    NegativeResponse,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
)
from dcud.runtime.backoff import Backoff
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.link import until_stopped
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.commands import CommandContext, CommandError, CommandRouter, Request
from dcud.transport.can import CanBusState, CanPort, CanSettings

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig
    from dcud.service.line import LineRegistry

log = structlog.get_logger("dcud.drives")

DEFAULT_SDO_TIMEOUT_S = 1.0
STEP_TIMEOUT_S = 3.0
"""How long one CiA 402 transition may take before a command gives up."""
HEARTBEAT_FACTOR = 1.5
HEARTBEAT_MARGIN_S = 0.2
HEARTBEAT_WATCH_IDLE_S = 0.25
"""How long the heartbeat watch sleeps while no drive has a known timeout (none set up yet)."""
EVENT_QUEUE_SIZE = 64
FAULT_CODE_WAIT_S = 1.0
"""How long a fault event waits for the fault's code (EMCY, TPDO, 603F) before going out without it."""
DRIVE_ERRORS: tuple[type[BaseException], ...] = (
    PeerTimeout,
    NegativeResponse,
    ProtocolError,
    TransportError,
)
"""What talking to a drive may raise; anything else is a bug and fails the service."""


class DriveStateError(CommandError):
    """The command is not allowed in the drive's present state; the message says why."""


class NodeRebootedError(TransportError):
    """The node booted while we talked to it; whatever was in flight is void."""


class DriveUnavailableError(CommandError):
    """No such drive is running (unknown name, service restarting, or commands disabled)."""


HistorySink = Callable[[str, str, bytes], Awaitable[object]]
"""``Outbox.put(kind, subtopic, payload)``."""


def heartbeat_timeout_s(producer_time_ms: int) -> float:
    """Consumer timeout for a producer time: 1.5 x, but at least 200 ms more than the period.

    The margin keeps a loaded DCU (or a drive whose producer jitters) from reporting false losses at
    short producer times; at 1 s and above the factor dominates.
    """
    period_s = producer_time_ms / 1000.0
    return round(max(period_s * HEARTBEAT_FACTOR, period_s + HEARTBEAT_MARGIN_S), 3)


# -- the shared part of every drive ---------------------------------------------------------------


class DriveHandle(Protocol):
    """What the command handlers need of a running drive, whatever its protocol."""

    @property
    def name(self) -> str:
        """The drive's name."""
        ...

    @property
    def commands_enabled(self) -> bool:
        """``commands = true`` in its ``[[drive]]``."""
        ...

    @property
    def write_allow_list(self) -> WriteAllowList:
        """What ``drive/write`` may write (``[[drive]] writable``)."""
        ...

    def state_document(self) -> dict[str, Any]:
        """The current state document."""
        ...

    async def command(self, goal: Goal) -> dict[str, Any]:
        """Take the drive to ``goal``; returns the resulting state document."""
        ...

    async def read_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Read one object (CANopen) or register range (Modbus)."""
        ...

    async def write_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Write one object (CANopen) or register (Modbus)."""
        ...


class DriveRegistry:
    """Running drives by name; one per command router, so handlers survive reloads."""

    def __init__(self) -> None:
        self._drives: dict[str, DriveHandle] = {}

    def add(self, drive: DriveHandle) -> None:
        """A drive started serving."""
        self._drives[drive.name] = drive

    def discard(self, drive: DriveHandle) -> None:
        """A drive stopped (only if it is the one registered under its name)."""
        if self._drives.get(drive.name) is drive:
            del self._drives[drive.name]

    def get(self, name: str) -> DriveHandle | None:
        """The running drive called ``name``."""
        return self._drives.get(name)

    def names(self) -> list[str]:
        """Names of the running drives."""
        return sorted(self._drives)


_REGISTRIES: weakref.WeakKeyDictionary[CommandRouter, DriveRegistry] = weakref.WeakKeyDictionary()


def drive_registry(router: CommandRouter) -> DriveRegistry:
    """The registry of drives whose commands ``router`` serves."""
    registry = _REGISTRIES.get(router)
    if registry is None:
        registry = DriveRegistry()
        _REGISTRIES[router] = registry
    return registry


class DriveBase:
    """State, publishing throttle, events and history common to CANopen and Modbus drives."""

    protocol = "?"

    def __init__(
        self,
        config: DriveConfig,
        bus: EventBus,
        events: asyncio.Queue[tuple[str, str, dict[str, Any]]],
        counters: dict[str, int],
    ) -> None:
        self.config = config
        self._bus = bus
        self._events = events
        self._service_counters = counters
        self.log = log.bind(drive=config.name)
        self.online = False
        self.statusword: int | None = None
        self.cia402: DriveState | None = None
        self.warning = False
        self.position: int | None = None
        self.velocity: int | None = None
        self.error_code: int | None = None
        self.digital_io: int | None = None
        self.mode: int | None = None
        self.last_error = ""
        self.last_update_s = 0.0
        self.counters: dict[str, int] = {}
        self._fault_reported = False
        self.fault_pending_since_s: float | None = None
        self._last_publish_s = 0.0
        self._publish_timer: asyncio.TimerHandle | None = None
        self._state_changed = asyncio.Event()
        self._wake = asyncio.Event()
        """Set when something asks the manager loop for attention before its next poll."""
        self._command_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        """The drive's name."""
        return self.config.name

    @property
    def commands_enabled(self) -> bool:
        """``commands = true`` in its ``[[drive]]``."""
        return self.config.commands

    @functools.cached_property
    def write_allow_list(self) -> WriteAllowList:
        """What ``drive/write`` may write (``[[drive]] writable``)."""
        return WriteAllowList.from_config(self.config)

    def count(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to one of the drive's counters."""
        self.counters[counter] = self.counters.get(counter, 0) + n

    async def _sleep(self, stopping: asyncio.Event, delay_s: float) -> None:
        """Sleep until ``delay_s`` passed, something asked for attention (``_wake``) or stopping."""
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                await until_stopped(stopping, self._wake.wait(), timeout_s=max(0.0, delay_s), name="sleep")
        self._wake.clear()

    # -- events and state ------------------------------------------------------------------------

    def emit(self, event_type: str, text: str, **fields: Any) -> None:
        """Queue an event for the outbox; a full queue drops it (counted, logged once per burst)."""
        try:
            self._events.put_nowait((event_type, text, {"drive": self.name, **fields}))
        except asyncio.QueueFull:
            dropped = self._service_counters.get("events_dropped", 0) + 1
            self._service_counters["events_dropped"] = dropped
            if dropped == 1 or dropped % 100 == 0:
                self.log.warning("event queue full; event dropped", event_type=event_type, dropped=dropped)

    def protocol_fields(self) -> dict[str, Any]:
        """Protocol-specific members of the state document."""
        return {}

    def state_document(self) -> dict[str, Any]:
        """The retained ``<p>/drive/<name>/state`` document."""
        code = self.error_code
        return {
            "drive": self.name,
            "protocol": self.protocol,
            "bus": self.config.bus,
            "node_id": self.config.node_id,
            "online": self.online,
            **self.protocol_fields(),
            "cia402": str(self.cia402) if self.cia402 is not None else None,
            "statusword": self.statusword,
            "warning": self.warning,
            "position": self.position,
            "velocity": self.velocity,
            "mode": self.mode,
            "error_code": code,
            # 0 is "no error": no text at all (MQTT null, SNMP ""), never "error reset or no error".
            "error_text": emcy_text(code) if code else None,
            "io": self.digital_io,
            "commands": self.config.commands,
            "last_error": self.last_error or None,
            "counters": dict(self.counters),
            "ts": rfc3339_ms(time.time()),
        }

    def changed(self, significant: bool) -> None:
        """Something in the state changed: publish now, or within ``state_interval_s`` for minor changes.

        Only a significant change (state, warning, fault, online) wakes a command waiting for the drive
        to reach a state: a moving axis changes its position in every TPDO.
        """
        if significant:
            self._state_changed.set()
        now = time.monotonic()
        if significant or now - self._last_publish_s >= self.config.state_interval_s:
            self.publish()
            return
        if self._publish_timer is None:
            delay = self._last_publish_s + self.config.state_interval_s - now
            self._publish_timer = asyncio.get_running_loop().call_later(delay, self._timer_publish)

    def _timer_publish(self) -> None:
        self._publish_timer = None
        self.publish()

    def publish(self) -> None:
        """Publish the state document now."""
        if self._publish_timer is not None:
            self._publish_timer.cancel()
            self._publish_timer = None
        self._last_publish_s = time.monotonic()
        self._bus.set_state(f"drive/{self.name}", self.state_document())

    def stop_publishing(self) -> None:
        """Cancel a pending throttled publish (the drive is going away)."""
        if self._publish_timer is not None:
            self._publish_timer.cancel()
            self._publish_timer = None

    def set_statusword(self, raw: int) -> bool:
        """Apply a statusword; returns True when the state (or warning) changed. Garbage is counted."""
        if raw == self.statusword:
            return False
        try:
            decoded: Statusword | None = decode_statusword(raw)
        except RemoteProtocolError:
            decoded = None
            self.count("bad_statusword")
        old_state, old_warning = self.cia402, self.warning
        self.statusword = raw
        self.cia402 = decoded.state if decoded else None
        self.warning = decoded.warning if decoded else False
        if self.cia402 is not old_state:
            self._on_state_transition(old_state)
        return self.cia402 is not old_state or self.warning != old_warning

    def _on_state_transition(self, old: DriveState | None) -> None:
        new = self.cia402
        self.log.info("CiA 402 state", state=str(new) if new else None, previous=str(old) if old else None)
        faulty = new in (DriveState.FAULT, DriveState.FAULT_REACTION_ACTIVE)
        if faulty and not self._fault_reported:
            if self.error_code:
                self._emit_fault(self.error_code, None, "statusword")
            elif self.fault_pending_since_s is None:
                # The code comes with the EMCY, the next TPDO or an SDO read of 603F: wait for it
                # (at most FAULT_CODE_WAIT_S, see flush_pending_fault) so the event carries it.
                self.fault_pending_since_s = time.monotonic()
        elif not faulty and new is not None:
            self.fault_pending_since_s = None
            if self._fault_reported:
                self._fault_reported = False
                self.emit("drive_fault_cleared", f"drive {self.name} left fault ({new})", state=str(new))

    def _emit_fault(self, code: int | None, register: int | None, source: str) -> None:
        self._fault_reported = True
        self.fault_pending_since_s = None
        text = f"drive {self.name} in fault" + (f": 0x{code:04X} {emcy_text(code)}" if code else "")
        fields: dict[str, Any] = {"code": code, "source": source}
        if register is not None:
            fields.update(register=register, register_flags=error_register_flags(register))
        self.emit("drive_fault", text, **fields)

    def report_emcy(self, code: int, register: int | None) -> None:
        """An emergency or a fault code read from the drive: one ``drive_fault`` event per fault episode."""
        if code and not self._fault_reported:
            self._emit_fault(code, register, "emcy" if register is not None else "error_code")

    def flush_pending_fault(self, now: float) -> None:
        """The fault's code did not come within FAULT_CODE_WAIT_S: raise the event without it."""
        since = self.fault_pending_since_s
        if since is not None and not self._fault_reported and now - since >= FAULT_CODE_WAIT_S:
            self._emit_fault(self.error_code or None, None, "statusword")

    async def wait_state_change(self, timeout_s: float) -> None:
        """Wait until the state changes (or ``timeout_s``)."""
        self._state_changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._state_changed.wait()

    def history_record(self) -> dict[str, Any]:
        """One history record for the outbox."""
        values: list[dict[str, Any]] = []
        for ident, value, unit in (
            ("position", self.position, "inc"),
            ("velocity", self.velocity, "inc/s"),
            ("statusword", self.statusword, ""),
            ("error_code", self.error_code, ""),
            ("io", self.digital_io, ""),
        ):
            if value is not None:
                values.append({"id": ident, "value": value, "unit": unit})
        return {
            "drive": self.name,
            "ts": rfc3339_ms(time.time()),
            "online": self.online,
            "cia402": str(self.cia402) if self.cia402 else None,
            "values": values,
        }

    async def history_loop(self, ctx: ServiceContext, put: HistorySink) -> None:
        """Commit a history record every ``history_interval_s`` while the service runs."""
        seq = 0
        while not await ctx.sleep(self.config.history_interval_s):
            seq += 1
            record = {"seq": seq, **self.history_record()}
            try:
                await put("drive", f"drive/{self.name}/history", json.dumps(record).encode())
            except DcudError as exc:  # a full outbox with reject_new: counted by the outbox, logged here
                self.log.warning("history record not stored", error=str(exc))

    # -- commands --------------------------------------------------------------------------------

    def require_state_known(self, goal: Goal) -> DriveState:
        """The CiA 402 state, or DriveStateError when it is unknown."""
        if not self.online:
            raise DriveStateError(
                f"drive {self.name}: {goal} refused: the drive is offline ({self._offline_reason()})"
            )
        if self.cia402 is None:
            shown = f"0x{self.statusword:04X}" if self.statusword is not None else "not read yet"
            raise DriveStateError(
                f"drive {self.name}: {goal} refused: CiA 402 state unknown (statusword {shown})"
            )
        return self.cia402

    def _offline_reason(self) -> str:
        return self.last_error or "no answer"

    def refuse(self, goal: Goal, exc: TransitionError) -> DriveStateError:
        """The error reply for a transition the state machine does not allow."""
        return DriveStateError(f"drive {self.name}: {goal} refused: {exc.reason}")

    async def write_controlword(self, value: int) -> None:
        """Write the controlword (protocol specific)."""
        raise NotImplementedError

    async def refresh_state(self) -> None:
        """Read the statusword now when no fresh value is at hand (protocol specific)."""
        raise NotImplementedError

    async def command(self, goal: Goal) -> dict[str, Any]:
        """Walk the CiA 402 state machine to ``goal``; DriveStateError when not allowed from here."""
        async with self._command_lock:
            await self.refresh_state()
            state = self.require_state_known(goal)
            try:
                steps = plan(goal, state)
            except TransitionError as exc:
                raise self.refuse(goal, exc) from None
            for step in steps:
                await self.write_controlword(step.controlword)
                if step.expect:
                    await self._await_state(goal, step.expect)
            self.publish()
            return self.state_document()

    async def _await_state(self, goal: Goal, expect: frozenset[DriveState]) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        for _ in range(10_000):
            if self.cia402 in expect:
                return
            if (
                self.cia402 in (DriveState.FAULT, DriveState.FAULT_REACTION_ACTIVE)
                and goal is not Goal.FAULT_RESET
            ):
                code = f" 0x{self.error_code:04X}" if self.error_code else ""
                raise DriveStateError(f"drive {self.name}: {goal} aborted: the drive went to fault{code}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.wait_state_change(min(remaining, 0.1))
            if self.cia402 not in expect:
                await self.refresh_state()
        wanted = " or ".join(sorted(str(s) for s in expect))
        now_in = self.cia402 or "unknown"
        raise PeerTimeout(
            f"drive {self.name}: {goal}: not {wanted} within {STEP_TIMEOUT_S} s (it is {now_in})"
        )


# -- command handlers ----------------------------------------------------------------------------------

HexOrInt = (
    Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    | Annotated[str, msgspec.Meta(pattern=r"^(0[xX][0-9A-Fa-f]{1,4}|[0-9]{1,5})$")]
)
"""An index, sub-index or register address: a JSON number or a string ``"0x6060"`` / ``"40"``."""


class DriveRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``drive/enable``, ``disable``, ``quick_stop``, ``fault_reset``, ``state``: the drive's name."""

    drive: Name


class DriveReadRequest(DriveRequest, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``drive/read``: CANopen ``index``/``subindex``/``type``; Modbus ``address``/``count``/``table``."""

    index: HexOrInt | None = None
    subindex: HexOrInt | None = None
    type: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    address: HexOrInt | None = None
    count: Annotated[int, msgspec.Meta(ge=1, le=125)] | None = None
    table: Literal["holding", "input"] | None = None


class DriveWriteRequest(DriveRequest, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``drive/write``: CANopen ``index``/``subindex``/``type``/``value``; Modbus ``address`` and
    ``value`` or ``values``. Only what ``[[drive]] writable`` lists (docs/drives.md)."""

    index: HexOrInt | None = None
    subindex: HexOrInt | None = None
    type: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    value: (
        bool
        | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
        | Annotated[float, msgspec.Meta(ge=-3.4e38, le=3.4e38)]
        | Annotated[str, msgspec.Meta(max_length=256)]
        | None
    ) = None
    address: HexOrInt | None = None
    values: (
        Annotated[
            list[Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]], msgspec.Meta(min_length=1, max_length=123)
        ]
        | None
    ) = None


class DriveWriteRefusedError(CommandError):
    """``drive/write`` of an object or register that ``[[drive]] writable`` does not list."""


@dataclass(frozen=True)
class WriteAllowList:
    """What ``drive/write`` may write on one drive, from ``[[drive]] writable`` (empty: nothing)."""

    protocol: str
    objects: frozenset[tuple[int, int | None]] = frozenset()
    """CANopen: ``(index, subindex)``; subindex None allows every sub-index of the index."""
    registers: tuple[tuple[int, int], ...] = ()
    """Modbus: inclusive ranges of holding registers."""
    entries: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: DriveConfig) -> WriteAllowList:
        """Parse ``writable`` (checked at load by :class:`~dcud.config.model.DriveConfig`)."""
        objects: set[tuple[int, int | None]] = set()
        registers: list[tuple[int, int]] = []
        for entry in config.writable:
            if config.protocol == "canopen":
                index, _, sub = entry.partition(":")
                objects.add((int(index, 16), int(sub, 16) if sub else None))
            else:
                first, _, last = entry.partition("-")
                registers.append((int(first), int(last or first)))
        return cls(config.protocol, frozenset(objects), tuple(registers), tuple(config.writable))

    def allows_object(self, index: int, subindex: int) -> bool:
        """CANopen: whether ``index:subindex`` is listed."""
        return (index, subindex) in self.objects or (index, None) in self.objects

    def allows_registers(self, address: int, count: int) -> bool:
        """Modbus: whether every register of ``address .. address + count - 1`` is listed."""
        return all(
            any(lo <= reg <= hi for lo, hi in self.registers) for reg in range(address, address + count)
        )

    def describe(self) -> str:
        """The list as configured, for error messages."""
        return ", ".join(self.entries) if self.entries else "nothing (writable = [] in its [[drive]])"


def check_writable(drive: DriveHandle, request: DriveWriteRequest) -> None:
    """DriveWriteRefusedError unless ``request`` writes only what the drive's allow-list lists."""
    allow = drive.write_allow_list
    if allow.protocol == "canopen":
        index = parse_int(_fields(request), "index", lo=0, hi=0xFFFF)
        subindex = parse_int(_fields(request), "subindex", default=0, lo=0, hi=0xFF)
        if allow.allows_object(index, subindex):
            return
        target = f"object 0x{index:04X}:{subindex:02X}"
        where = "$.index"
    else:
        address = parse_int(_fields(request), "address", lo=0, hi=0xFFFF)
        count = len(request.values) if request.values is not None else 1
        if allow.allows_registers(address, count):
            return
        target = f"register {address}" if count == 1 else f"registers {address}..{address + count - 1}"
        where = "$.address"
    raise DriveWriteRefusedError(
        f"drive {drive.name}: write to {target} refused: not in its writable list ({allow.describe()})",
        field=where,
    )


def _fields(request: msgspec.Struct) -> dict[str, Any]:
    """The fields a request sets (None left out), for the protocol-specific argument parsers."""
    return {k: v for k, v in msgspec.structs.asdict(request).items() if v is not None}


def register_drive_commands(router: CommandRouter) -> DriveRegistry:
    """Serve ``drive/<verb>`` on ``router`` (idempotent); returns the registry the handlers consult.

    Transitions and ``drive/write`` are state-changing (an envelope is required whenever
    ``fw_server_key`` is set); every verb but ``state`` needs ``commands = true``; ``drive/write`` also
    needs the target in ``[[drive]] writable``.
    """
    registry = drive_registry(router)

    def lookup(name: str, *, needs_commands: bool = True) -> DriveHandle:
        drive = registry.get(name)
        if drive is None:
            known = ", ".join(registry.names()) or "none"
            raise DriveUnavailableError(
                f"no running drive {json.dumps(name)} (running: {known})", field="$.drive"
            )
        if needs_commands and not drive.commands_enabled:
            raise DriveUnavailableError(
                f"commands are disabled for drive {name}: set commands = true in its [[drive]] in dcud.toml",
                field="$.drive",
            )
        return drive

    def transition(goal: Goal) -> Callable[[DriveRequest, CommandContext], Awaitable[Mapping[str, Any]]]:
        async def handler(request: DriveRequest, ctx: CommandContext) -> Mapping[str, Any]:
            drive = lookup(request.drive)
            log.info("drive command", drive=drive.name, command=str(goal), id=ctx.request_id)
            try:
                state = await drive.command(goal)
            except DcudError as exc:
                log.warning("drive command failed", drive=drive.name, command=str(goal), error=str(exc))
                raise
            log.info("drive command done", drive=drive.name, command=str(goal), state=state.get("cia402"))
            return {"drive": drive.name, "command": str(goal), "state": state}

        return handler

    async def read(request: DriveReadRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        drive = lookup(request.drive)
        fields = _fields(request)
        log.info("drive command", drive=drive.name, command="read", request=_loggable(fields))
        return await drive.read_object(fields)

    async def write(request: DriveWriteRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        drive = lookup(request.drive)
        fields = _fields(request)
        check_writable(drive, request)
        log.info("drive command", drive=drive.name, command="write", request=_loggable(fields))
        return await drive.write_object(fields)

    async def state(request: DriveRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        return lookup(request.drive, needs_commands=False).state_document()

    for goal in Goal:
        router.register(f"drive/{goal}", DriveRequest, transition(goal), state_changing=True)
    router.register("drive/read", DriveReadRequest, read)
    router.register("drive/write", DriveWriteRequest, write, state_changing=True)
    router.register("drive/state", DriveRequest, state)
    return registry


def _loggable(request: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in request.items()
        if k in ("id", "index", "subindex", "type", "value", "address", "count")
    }


def parse_int(
    request: Mapping[str, Any], key: str, *, default: int | None = None, lo: int = 0, hi: int = 0xFFFF
) -> int:
    """An integer argument (JSON number or "0x..." string) within ``lo..hi``; CommandError otherwise."""
    raw = request.get(key, default)
    if raw is None:
        raise CommandError(f'missing "{key}"')
    try:
        value = int(raw, 0) if isinstance(raw, str) else raw
    except ValueError:
        raise CommandError(f'"{key}": expected an integer, got {raw!r}') from None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CommandError(f'"{key}": expected an integer {lo}..{hi}, got {raw!r}')
    return value


# -- CANopen ---------------------------------------------------------------------------------------


_SLOTS: dict[tuple[int, int], str] = {
    (0x6041, 0): "statusword",
    (0x6064, 0): "position",
    (0x606C, 0): "velocity",
    (0x603F, 0): "error_code",
    (0x6061, 0): "mode",
    (0x60FD, 0): "digital_io",
}


@dataclass(frozen=True)
class _Tpdo:
    number: int
    cob_id: int
    layout: co.PdoLayout
    slots: tuple[str | None, ...]


class CanopenDrive(DriveBase):
    """One CiA 402 drive on a CAN bus (see the module docstring)."""

    protocol = "canopen"

    def __init__(
        self,
        config: DriveConfig,
        *,
        port: CanPort,
        bus: EventBus,
        events: asyncio.Queue[tuple[str, str, dict[str, Any]]],
        counters: dict[str, int],
        route: Callable[[int, Callable[[bytes, float], None] | None], None],
    ) -> None:
        super().__init__(config, bus, events, counters)
        self.node_id = config.node_id
        self.port = port
        self._route = route
        self.sdo = co.SdoClient(config.node_id, config.timeout_s or DEFAULT_SDO_TIMEOUT_S)
        self._sdo_lock = asyncio.Lock()
        self._sdo_waiter: asyncio.Future[co.SdoDone | co.SdoSend] | None = None
        self.nmt: co.NmtState | None = None
        self.heartbeat = "unknown"
        self.producer_time_ms: int | None = None
        self.heartbeat_timeout_s: float | None = config.heartbeat_timeout_s
        self.last_heartbeat_s = 0.0
        self.last_emcy: dict[str, Any] | None = None
        self.tpdos: list[_Tpdo] = []
        self.needs_setup = True
        self._last_poll_s = 0.0
        self._last_problem = ""
        self._mapped: set[str] = set()

    # -- frames (event loop, synchronous) --------------------------------------------------------

    def on_heartbeat(self, data: bytes, now: float) -> None:
        """Heartbeat or boot-up from this node."""
        try:
            state = co.decode_heartbeat(data)
        except RemoteProtocolError:
            self.count("malformed")
            return
        self.last_heartbeat_s = now
        significant = False
        if self.heartbeat != "ok":
            if self.heartbeat == "lost":
                self._wake.set()
                self.log.info("heartbeat restored", nmt=str(state))
                self.emit(
                    "drive_heartbeat_restored", f"drive {self.name}: heartbeat back ({state})", nmt=str(state)
                )
            self.heartbeat = "ok"
            significant = True
        if not self.online:
            self.online = True
            self.last_error = ""
            significant = True
        if state is co.NmtState.BOOT_UP:
            self.count("boot_ups")
            self.log.info("boot-up")
            waiter = self._sdo_waiter
            if waiter is not None and not waiter.done():
                # The node's SDO server restarted: the transfer in flight will never be answered.
                waiter.set_exception(
                    NodeRebootedError(f"drive {self.name}: node rebooted during an SDO transfer")
                )
            self.emit(
                "drive_boot_up", f"drive {self.name} (node {self.node_id}) booted", node_id=self.node_id
            )
            self.needs_setup = True
            self._wake.set()
        elif state is not co.NmtState.OPERATIONAL and self.nmt is co.NmtState.OPERATIONAL:
            self.log.warning("drive left operational", nmt=str(state))
            self.needs_setup = True
            self._wake.set()
        elif self.nmt is None and state is not co.NmtState.OPERATIONAL:
            self._wake.set()
        if state is not self.nmt:
            self.nmt = state
            significant = True
        if significant:
            self.changed(True)

    def on_emcy(self, data: bytes, now: float) -> None:
        """An emergency message from this node."""
        try:
            emcy = decode_emcy(data)
        except RemoteProtocolError:
            self.count("malformed")
            return
        self.count("emcy")
        stamp = rfc3339_ms(time.time())
        self.last_emcy = {"code": emcy.code, "text": emcy.text, "register": emcy.register, "ts": stamp}
        level = self.log.info if emcy.is_reset else self.log.warning
        level("EMCY", code=f"0x{emcy.code:04X}", text=emcy.text, register=emcy.register)
        if not emcy.is_reset:
            self.error_code = emcy.code
            self.report_emcy(emcy.code, emcy.register)
        self.changed(True)

    def on_sdo(self, data: bytes, now: float) -> None:
        """An SDO response from this node."""
        waiter = self._sdo_waiter
        if waiter is None or waiter.done():
            self.count("sdo_stray")
            return
        try:
            result = self.sdo.receive(data, now)
        except (NegativeResponse, RemoteProtocolError) as exc:
            waiter.set_exception(exc)
            return
        if result is None:
            self.count("sdo_stray")
            return
        waiter.set_result(result)

    def on_tpdo(self, tpdo: _Tpdo, data: bytes, now: float) -> None:
        """A TPDO of this node: update the mapped values."""
        try:
            values = tpdo.layout.decode(data)
        except RemoteProtocolError:
            self.count("malformed")
            return
        counters = self.counters
        counters["tpdo"] = counters.get("tpdo", 0) + 1
        self.last_update_s = now
        significant = False
        minor = False
        for slot, value in zip(tpdo.slots, values, strict=True):
            if slot is None:
                continue
            if slot == "statusword":
                if self.set_statusword(value):
                    significant = True
                elif value != self.statusword:
                    minor = True
            elif slot == "error_code":
                if value != self.error_code:
                    self.error_code = value
                    if value:
                        self.report_emcy(value, None)
                    significant = True
            elif getattr(self, slot) != value:
                setattr(self, slot, value)
                minor = True
        if not self.online:
            self.online = True
            significant = True
        if significant:
            self.changed(True)
        elif minor and self._publish_timer is None:  # else the pending timer publishes the latest state
            self.changed(False)

    def protocol_fields(self) -> dict[str, Any]:
        """NMT, heartbeat and EMCY members of the state document."""
        return {
            "nmt": str(self.nmt) if self.nmt is not None else "unknown",
            "configured": not self.needs_setup,
            "heartbeat": self.heartbeat,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "last_emcy": self.last_emcy,
        }

    # -- SDO -------------------------------------------------------------------------------------

    async def _send(self, frame: co.CanFrame) -> None:
        await self.port.send(frame.cob_id, frame.data)

    async def sdo_upload(self, index: int, subindex: int) -> bytes:
        """Read one object by SDO."""
        async with self._sdo_lock:
            return await self._sdo_transfer(
                self.sdo.upload(index, subindex, time.monotonic()), index, subindex
            )

    async def sdo_download(self, index: int, subindex: int, data: bytes) -> None:
        """Write one object by SDO."""
        async with self._sdo_lock:
            await self._sdo_transfer(
                self.sdo.download(index, subindex, data, time.monotonic()), index, subindex
            )

    async def _sdo_transfer(self, first: co.CanFrame, index: int, subindex: int) -> bytes:
        loop = asyncio.get_running_loop()
        frame = first
        try:
            for _ in range(co.MAX_SDO_BYTES // 7 + 2):
                waiter: asyncio.Future[co.SdoDone | co.SdoSend] = loop.create_future()
                self._sdo_waiter = waiter
                # Read before sending: the answer may arrive (and end the transfer) while we send.
                deadline = self.sdo.deadline_s or time.monotonic()
                await self._send(frame)
                try:
                    # Deadlines are on time.monotonic(), the clock frames are stamped with.
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        result = await waiter
                except TimeoutError:
                    self.count("sdo_timeouts")
                    abort = self.sdo.expire(time.monotonic())
                    with contextlib.suppress(TransportError):
                        await self._send(abort)
                    raise PeerTimeout(
                        f"drive {self.name}: no SDO answer for 0x{index:04X}:{subindex:02X} "
                        f"within {self.sdo.timeout_s} s"
                    ) from None
                except co.SdoRemoteError as exc:
                    self.count("sdo_errors")
                    with contextlib.suppress(TransportError):
                        await self._send(exc.abort)
                    raise
                except NegativeResponse:
                    self.count("sdo_aborts")
                    raise
                if isinstance(result, co.SdoDone):
                    return result.data
                frame = result.frame
            raise RemoteProtocolError(f"drive {self.name}: SDO transfer did not end")
        finally:
            self._sdo_waiter = None
            if self.sdo.busy:
                self.sdo.cancel()

    async def read_typed(self, index: int, subindex: int, data_type: co.DataType) -> Any:
        """Read and decode one object."""
        return co.decode_value(await self.sdo_upload(index, subindex), data_type)

    # -- management ------------------------------------------------------------------------------

    def bus_state_changed(self, state: CanBusState) -> None:
        """The bus closed or reopened: everything heard before is stale."""
        if state is CanBusState.CLOSED:
            self.sdo.cancel()
            waiter = self._sdo_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(TransportError(f"CAN bus {self.config.bus} closed"))
            self.online = False
            self.last_error = f"CAN bus {self.config.bus} closed"
            self.nmt = None
            self.heartbeat = "unknown"
            self.needs_setup = True
            self.changed(True)
        elif state is CanBusState.ACTIVE:
            self._wake.set()

    async def manage(self, stopping: asyncio.Event) -> None:
        """Configure, start and poll the node until ``stopping`` (heartbeat: the service's watcher)."""
        backoff = Backoff(0.5, 10.0)
        while not stopping.is_set():
            now = time.monotonic()
            # A node whose heartbeat was lost is not probed: its next heartbeat or boot-up wakes us.
            if self.port.is_open and self.needs_setup and self.heartbeat != "lost":
                try:
                    await self._setup()
                    backoff.reset()
                    self._last_problem = ""
                except NodeRebootedError:
                    continue  # set up again at once, now that it listens
                except DRIVE_ERRORS as exc:
                    self._problem(exc)
                    await self._sleep(stopping, backoff.next_delay_s())
                    continue
            if (
                self.fault_pending_since_s is not None
                and "error_code" not in self._mapped
                and not self.needs_setup
            ):
                with contextlib.suppress(*DRIVE_ERRORS):
                    code = int(await self.read_typed(0x603F, 0, co.DataType.U16))
                    self.error_code = code
                    self.report_emcy(code, None)
                    self.changed(True)
            self.flush_pending_fault(time.monotonic())
            if (
                self.port.is_open
                and not self.needs_setup
                and now - self._last_poll_s >= self.config.poll_interval_s
            ):
                self._last_poll_s = now
                try:
                    await self._poll()
                except DRIVE_ERRORS as exc:
                    self._problem(exc)
            await self._sleep(stopping, self.config.poll_interval_s)

    def _problem(self, exc: BaseException) -> None:
        text = str(exc)
        changed = text != self.last_error
        if text != self._last_problem:  # once per state change, not once per retry
            self._last_problem = text
            self.log.warning("drive not reachable", error=text)
        self.last_error = text
        if isinstance(exc, PeerTimeout) and self.heartbeat != "ok" and self.online:
            self.online = False
            changed = True
        if changed:
            self.changed(True)

    def heartbeat_due_s(self) -> float | None:
        """When this drive's heartbeat becomes overdue (monotonic clock), or None while it is not watched."""
        timeout = self.heartbeat_timeout_s
        if timeout is None or self.heartbeat != "ok":
            return None
        return self.last_heartbeat_s + timeout

    def _check_heartbeat(self, now: float) -> None:
        timeout = self.heartbeat_timeout_s
        if timeout is None or self.heartbeat != "ok":
            return
        if now - self.last_heartbeat_s > timeout:
            self.heartbeat = "lost"
            self.online = False
            self.nmt = None
            self.needs_setup = True
            self.last_error = f"no heartbeat within {timeout:.3g} s"
            self.count("heartbeat_lost")
            self.log.warning("heartbeat lost", timeout_s=timeout)
            self.emit(
                "drive_heartbeat_lost",
                f"drive {self.name} (node {self.node_id}): no heartbeat within {timeout:.3g} s",
                timeout_s=timeout,
            )
            self.changed(True)

    async def _setup(self) -> None:
        """Probe the node, learn its heartbeat and TPDO mapping, read its state, start it."""
        device_type = await self.read_typed(0x1000, 0, co.DataType.U32)
        if device_type & 0xFFFF != 402:
            self.log.warning("device type is not CiA 402", device_type=f"0x{device_type:08X}")
        if self.config.heartbeat_timeout_s is None:
            try:
                self.producer_time_ms = int(await self.read_typed(0x1017, 0, co.DataType.U16))
            except NegativeResponse:
                self.producer_time_ms = 0
            ms = self.producer_time_ms
            self.heartbeat_timeout_s = heartbeat_timeout_s(ms) if ms else None
        if self.heartbeat_timeout_s is None:
            self.heartbeat = "off"
        await self._learn_tpdos()
        await self._read_state()
        self.online = True
        self.last_error = ""
        if self.nmt is not co.NmtState.OPERATIONAL:
            await self._send(co.nmt_command(co.NmtCommand.START, self.node_id))
            self.count("nmt_start")
            self.log.info("NMT start sent", tpdos=[f"0x{t.cob_id:03X}" for t in self.tpdos])
            if self.heartbeat_timeout_s is None:
                self.nmt = co.NmtState.OPERATIONAL  # nothing will tell us otherwise
        self.needs_setup = False
        self.changed(True)

    async def _learn_tpdos(self) -> None:
        tpdos: list[_Tpdo] = []
        if self.config.tpdo:
            for cfg in self.config.tpdo:
                try:
                    objects = [co.parse_object_ref(ref) for ref in cfg.objects]
                except ProtocolError as exc:
                    raise TransportError(f"drive {self.name}: tpdo {cfg.number}: {exc}") from exc
                cob_id = cfg.cob_id or (co.TPDO_BASES[cfg.number - 1] + self.node_id)
                tpdos.append(self._make_tpdo(cfg.number, cob_id, objects))
        else:
            for number in range(1, 5):
                try:
                    cob_entry = int(await self.read_typed(0x1800 + number - 1, 1, co.DataType.U32))
                except NegativeResponse:
                    continue  # the drive has no such TPDO
                if cob_entry & 0x80000000:
                    continue  # not valid (disabled)
                count = int(await self.read_typed(0x1A00 + number - 1, 0, co.DataType.U8))
                if not 1 <= count <= 8:
                    continue
                objects = []
                for sub in range(1, count + 1):
                    entry = int(await self.read_typed(0x1A00 + number - 1, sub, co.DataType.U32))
                    objects.append(co.MappedObject.from_entry(entry))
                tpdos.append(self._make_tpdo(number, cob_entry & 0x7FF, objects))
        for old in self.tpdos:
            self._route(old.cob_id, None)
        self.tpdos = tpdos
        self._mapped = {slot for t in tpdos for slot in t.slots if slot is not None}
        for tpdo in tpdos:
            self._route(tpdo.cob_id, _bind_tpdo(self, tpdo))

    def _make_tpdo(self, number: int, cob_id: int, objects: Sequence[co.MappedObject]) -> _Tpdo:
        layout = co.PdoLayout(objects)
        slots = tuple(_SLOTS.get((o.index, o.subindex)) for o in objects)
        return _Tpdo(number, cob_id, layout, slots)

    async def _read_state(self) -> None:
        if self.set_statusword(int(await self.read_typed(0x6041, 0, co.DataType.U16))):
            self.changed(True)
        with contextlib.suppress(NegativeResponse):
            self.error_code = int(await self.read_typed(0x603F, 0, co.DataType.U16))
        with contextlib.suppress(NegativeResponse):
            self.mode = int(await self.read_typed(0x6061, 0, co.DataType.I8))
        if "position" not in self._mapped:
            with contextlib.suppress(NegativeResponse):
                self.position = int(await self.read_typed(0x6064, 0, co.DataType.I32))
        if "velocity" not in self._mapped:
            with contextlib.suppress(NegativeResponse):
                self.velocity = int(await self.read_typed(0x606C, 0, co.DataType.I32))
        self.last_update_s = time.monotonic()

    def _tpdo_fresh(self) -> bool:
        return (
            "statusword" in self._mapped
            and self.nmt is co.NmtState.OPERATIONAL
            and time.monotonic() - self.last_update_s < max(2 * self.config.poll_interval_s, 0.5)
        )

    async def _poll(self) -> None:
        """Read by SDO what the TPDOs do not bring (or everything, when they stopped coming)."""
        if self._tpdo_fresh():
            return
        await self._read_state()
        if not self.online:
            self.online = True
            self.last_error = ""
        self.changed(False)

    # -- commands --------------------------------------------------------------------------------

    def _require_sdo(self, what: str) -> None:
        if not self.port.is_open:
            raise DriveStateError(
                f"drive {self.name}: {what} refused: CAN bus {self.config.bus} is {self.port.state}"
            )
        if not self.online:
            raise DriveStateError(
                f"drive {self.name}: {what} refused: the drive is offline ({self._offline_reason()})"
            )
        if self.nmt is co.NmtState.STOPPED:
            raise DriveStateError(f"drive {self.name}: {what} refused: NMT state is stopped (no SDO)")

    async def refresh_state(self) -> None:
        """Read the statusword by SDO unless a TPDO brought it very recently."""
        self._require_sdo("command")
        if self._tpdo_fresh() and time.monotonic() - self.last_update_s < 0.1:
            return
        if self.set_statusword(int(await self.read_typed(0x6041, 0, co.DataType.U16))):
            self.changed(True)

    async def write_controlword(self, value: int) -> None:
        """Write 6040 by SDO."""
        await self.sdo_download(0x6040, 0, co.encode_value(value, co.DataType.U16))
        self.count("controlword_writes")

    def _object_args(self, request: Mapping[str, Any]) -> tuple[int, int, co.DataType]:
        index = parse_int(request, "index", lo=0, hi=0xFFFF)
        subindex = parse_int(request, "subindex", default=0, lo=0, hi=0xFF)
        type_name = request.get("type")
        if type_name is None:
            data_type = co.KNOWN_OBJECTS.get((index, subindex), co.DataType.BYTES)
        else:
            try:
                data_type = co.DataType(str(type_name))
            except ValueError:
                choices = ", ".join(t.value for t in co.DataType)
                raise CommandError(f'"type": expected one of {choices}, got {type_name!r}') from None
        return index, subindex, data_type

    async def read_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``drive/read``: one object by SDO, decoded as ``type`` (default: known type or bytes)."""
        index, subindex, data_type = self._object_args(request)
        self._require_sdo("read")
        data = await self.sdo_upload(index, subindex)
        try:
            value = co.decode_value(data, data_type)
        except RemoteProtocolError as exc:
            raise CommandError(f"0x{index:04X}:{subindex:02X} returned {len(data)} bytes: {exc}") from None
        if isinstance(value, bytes):
            value = value.hex()
        return {
            "drive": self.name,
            "index": f"0x{index:04X}",
            "subindex": subindex,
            "type": str(data_type),
            "value": value,
            "raw": data.hex(),
        }

    async def write_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``drive/write``: one object by SDO; the controlword only through the transition commands."""
        index, subindex, data_type = self._object_args(request)
        if index == 0x6040:
            raise DriveStateError(
                f"drive {self.name}: write to the controlword 6040 refused: use drive/enable, drive/disable, "
                "drive/quick_stop or drive/fault_reset, which check the drive's state"
            )
        if "value" not in request:
            raise CommandError('missing "value"')
        try:
            data = co.encode_value(request["value"], data_type)
        except ProtocolError as exc:
            raise CommandError(f'"value": {exc}') from None
        self._require_sdo("write")
        async with self._command_lock:
            await self.sdo_download(index, subindex, data)
        self.log.info("object written", index=f"0x{index:04X}", subindex=subindex, value=request["value"])
        return {
            "drive": self.name,
            "index": f"0x{index:04X}",
            "subindex": subindex,
            "type": str(data_type),
            "written": data.hex(),
            "state": self.state_document(),
        }


def _bind_tpdo(drive: CanopenDrive, tpdo: _Tpdo) -> Callable[[bytes, float], None]:
    return functools.partial(drive.on_tpdo, tpdo)  # a C-level call per TPDO, no Python frame in between


# -- the service -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanDrivesConfig:
    """The slice of one CAN drive service: its bus and the CANopen drives on it."""

    can: CanConfig
    drives: tuple[DriveConfig, ...]


class CanDriveService:
    """Owns one CAN bus and the CANopen drives on it (module docstring)."""

    def __init__(
        self,
        config: CanDrivesConfig,
        bus: EventBus,
        event: EventSink,
        history: HistorySink,
        registry: DriveRegistry,
        *,
        settings: CanSettings | None = None,
    ) -> None:
        self.config = config
        self.name = f"drives.{config.can.name}"
        self._state_bus = bus
        self._event = event
        self._history = history
        self._registry = registry
        self._settings = settings
        self.counters: dict[str, int] = {}
        self.drives: dict[str, CanopenDrive] = {}
        self.port: CanPort | None = None
        self._routes: dict[int, Callable[[bytes, float], None]] = {}
        self._events: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue(EVENT_QUEUE_SIZE)

    def _can_settings(self) -> CanSettings:
        if self._settings is not None:
            return self._settings
        can = self.config.can
        return CanSettings(
            name=can.name,
            interface=can.interface,
            channel=can.channel,
            bitrate=can.bitrate,
            options=dict(can.options),
        )

    def route(self, cob_id: int, handler: Callable[[bytes, float], None] | None) -> None:
        """Deliver frames with ``cob_id`` to ``handler`` (None: stop delivering)."""
        if handler is None:
            self._routes.pop(cob_id, None)
        else:
            self._routes[cob_id] = handler

    def _on_frame(self, can_id: int, data: bytes, now: float) -> None:
        handler = self._routes.get(can_id)
        if handler is not None:
            handler(data, now)
            return
        kind, node = co.classify(can_id)
        if kind in (co.FrameKind.NMT, co.FrameKind.SYNC, co.FrameKind.TIME, co.FrameKind.SDO_REQUEST):
            return  # another master's traffic (or our own echo): not ours to judge
        key = "foreign_frames"
        self.counters[key] = self.counters.get(key, 0) + 1
        if self.counters[key] in (1, 100, 10_000):
            log.info(
                "frames from unconfigured nodes",
                bus=self.config.can.name,
                cob_id=f"0x{can_id:03X}",
                node=node,
            )

    def _on_bus_state(self, state: CanBusState, error: str) -> None:
        for drive in self.drives.values():
            drive.bus_state_changed(state)
        self._publish_bus()

    def _publish_bus(self) -> None:
        port = self.port
        if port is None:
            return
        self._state_bus.set_state(
            f"can/{self.config.can.name}",
            {
                "can": self.config.can.name,
                "interface": self.config.can.interface,
                "channel": self.config.can.channel,
                "state": str(port.state),
                "last_error": port.last_error or None,
                "drives": sorted(self.drives),
                **port.stats.to_json(),
                **self.counters,
                "ts": rfc3339_ms(time.time()),
            },
        )

    async def _watch_heartbeats(self) -> None:
        """Heartbeat consumer of every drive on the bus, apart from their (SDO-bound) managers.

        Sleeps until the first moment a watched drive's heartbeat is overdue (its last heartbeat plus
        its timeout), never longer than the shortest timeout (a drive that starts being watched in the
        meantime is due no earlier than that), then checks: a loss shows at its timeout, and healthy
        drives cost about one wake-up per timeout, not a poll.
        """
        while True:
            now = time.monotonic()
            timeouts = [d.heartbeat_timeout_s for d in self.drives.values() if d.heartbeat_timeout_s]
            wake = now + min(timeouts, default=HEARTBEAT_WATCH_IDLE_S)
            for drive in self.drives.values():
                drive._check_heartbeat(now)
                due = drive.heartbeat_due_s()
                if due is not None:
                    wake = min(wake, due)
            await asyncio.sleep(max(0.01, wake - now + 0.001))  # + 1 ms: "overdue" is strictly after

    async def _event_loop(self) -> None:
        while True:
            event_type, text, fields = await self._events.get()
            try:
                await self._event(event_type, text, **fields)
            except DcudError as exc:
                log.warning("event not stored", event_type=event_type, error=str(exc))

    async def run(self, ctx: ServiceContext) -> None:
        """Serve the bus and its drives until stopped; a missing bus is a degraded, not failed, start."""
        port = CanPort(self._can_settings(), self._on_frame, self._on_bus_state)
        self.port = port
        for cfg in self.config.drives:
            drive = CanopenDrive(
                cfg,
                port=port,
                bus=self._state_bus,
                events=self._events,
                counters=self.counters,
                route=self.route,
            )
            self.drives[cfg.name] = drive
            self.route(co.HEARTBEAT_BASE + cfg.node_id, drive.on_heartbeat)
            self.route(co.EMCY_BASE + cfg.node_id, drive.on_emcy)
            self.route(co.SDO_TX_BASE + cfg.node_id, drive.on_sdo)
        tasks = [
            ctx.spawn("events", self._event_loop()),
            ctx.spawn("bus", port.run(ctx.stopping, ctx.beat)),
            ctx.spawn("heartbeats", self._watch_heartbeats()),
        ]
        for drive in self.drives.values():
            tasks.append(ctx.spawn(drive.name, drive.manage(ctx.stopping)))
            tasks.append(ctx.spawn(f"{drive.name}:history", drive.history_loop(ctx, self._history)))
            self._registry.add(drive)
            drive.publish()
        self._publish_bus()
        ctx.set_ready()
        try:
            while not await ctx.sleep(min(5.0, ctx.liveness_s / 3)):
                self._publish_bus()
        finally:
            for drive in self.drives.values():
                self._registry.discard(drive)
                drive.stop_publishing()
            for task in tasks:
                task.cancel()
            # Events already queued still go to the outbox (bounded: at most the queue size).
            while not self._events.empty():
                event_type, text, fields = self._events.get_nowait()
                with contextlib.suppress(DcudError):
                    await self._event(event_type, text, **fields)


def build_drive_services(
    config: LoadedConfig,
    *,
    lines: LineRegistry,
    bus: EventBus,
    history: HistorySink,
    commands: CommandRouter,
    event: EventSink,
) -> Sequence[Service]:
    """``SERVICE_BUILDERS`` entry: one CanDriveService per CAN bus with drives, one ModbusDriveService
    per line with drives; registers the ``drive/...`` commands."""
    from dcud.service.drive_modbus import build_modbus_drive_services

    registry = register_drive_commands(commands)
    services: list[Service] = []
    drives = config.toml.drive
    for can in config.toml.can:
        on_bus = tuple(d for d in drives if d.protocol == "canopen" and d.bus == can.name)
        if on_bus:
            services.append(CanDriveService(CanDrivesConfig(can, on_bus), bus, event, history, registry))
    services.extend(build_modbus_drive_services(config, registry, lines, bus, event, history))
    configured = {d.name for d in drives}
    for name in list(bus.states):
        if name.startswith("drive/") and name.removeprefix("drive/") not in configured:
            bus.clear_state(name)
    return services
