"""What every servo drive has, whatever its protocol: state, publishing, events, history, CiA 402 commands.

:class:`DriveBase` holds a drive's state (CiA 402 state from the statusword, warning, position,
velocity, error code, I/O, online), publishes the retained state document (event bus subtopic
``drive/<name>``) at once on a significant change and at most every ``state_interval_s`` for position
and velocity alone (never at PDO rate), raises the fault events (one ``drive_fault`` per fault episode,
``drive_fault_cleared``), commits a history record (kind ``drive``, subtopic ``drive/<name>/history``)
every ``history_interval_s``, and walks the CiA 402 state machine for the transition commands. The
protocols subclass it: :class:`~dcud.service.drive_canopen.CanopenDrive` and
:class:`~dcud.service.drive_modbus.ModbusDrive`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from dcud.codec.cia402 import (
    DriveState,
    Goal,
    Statusword,
    TransitionError,
    decode_statusword,
    emcy_text,
    error_register_flags,
    plan,
)
from dcud.config.model import DriveConfig
from dcud.errors import DcudError, PeerTimeout, RemoteProtocolError
from dcud.runtime.bus import EventBus
from dcud.runtime.link import until_stopped
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.drive_commands import DriveStateError, WriteAllowList

log = structlog.get_logger("dcud.drives")

STEP_TIMEOUT_S = 3.0
"""How long one CiA 402 transition may take before a command gives up."""
EVENT_QUEUE_SIZE = 64
FAULT_CODE_WAIT_S = 1.0
"""How long a fault event waits for the fault's code (EMCY, TPDO, 603F) before going out without it."""

HistorySink = Callable[[str, str, bytes], Awaitable[object]]
"""``Outbox.put(kind, subtopic, payload)``."""

DriveEvents = asyncio.Queue[tuple[str, str, dict[str, Any]]]
"""A drive service's bounded queue of events for the outbox: ``(event_type, text, fields)``."""


class DriveBase:
    """State, publishing throttle, events and history common to CANopen and Modbus drives."""

    protocol = "?"

    def __init__(
        self,
        config: DriveConfig,
        bus: EventBus,
        events: DriveEvents,
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
