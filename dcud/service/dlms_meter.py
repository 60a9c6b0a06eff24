"""DLMS/COSEM meters in the polling service: one readout, its plan, its line or TCP connection, its commit.

A readout is one association whose requests the readout plan chooses phase by phase from the answers so
far (:mod:`dcud.service.dlms_plan`: object list, clock, registers, load profile and event logs by range
after their cursors, a clock SET when allowed), run on the line's lease or a TCP connection
(:mod:`dcud.service.dlms_session`), for a meter described by :class:`DlmsMeterSettings`
(:mod:`dcud.service.dlms_settings`). This module is the glue the polling service calls
(:class:`DlmsReadouts`): per-meter locks and caches, retries, the TCP slots, and the commit. The names of
those modules are re-exported here.

Commit, in this order: the profile rows (each a reading whose ``ts`` is its capture time) and the new
event-log entries (``meter_event`` events) go into the outbox in one transaction together with their
cursors (:meth:`~dcud.service.outbox.Outbox.put_many` marks); then the per-meter state file
(:mod:`dcud.service.dlms_state`); then the registers reading goes the usual way (the polling service's
committer). A crash at any point loses no row and sends none twice: the cursor in force after a
restart is the later of the state file's and the outbox's mark.

Line meters take the line's lease like every other protocol; TCP meters (``host``) need no line and run
at most :data:`TCP_CONCURRENCY` sessions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from dcud.codec.dlms.client import DlmsSessionResult
from dcud.codec.dlms.security import DecipheringError
from dcud.config.model import LineConfig, MeterConfig
from dcud.errors import DcudError, LocalProtocolError, PeerTimeout, RemoteProtocolError, TransportError
from dcud.service.dlms_plan import ObjectCache, PlanOptions, ReadoutPlan, ReadoutResult, _iso, event_text
from dcud.service.dlms_session import (
    CANCEL_CLEANUP_S,
    DlmsStateError,
    MeterUnreachable,
    TcpPort,
    dlms_session,
    open_tcp,
    run_dlms_session,
)
from dcud.service.dlms_settings import DlmsMeterSettings
from dcud.service.dlms_state import DlmsStateStore, MeterState, lock_state_dir
from dcud.service.line import LeaseInfo, LeaseKind, LeaseTimeout, LineClosedError, LineRegistry
from dcud.service.meter_read import MeterReading
from dcud.service.session_runner import SessionPort

log = structlog.get_logger("dcud.dlms")

TCP_CONCURRENCY = 8
"""TCP meters read at once (they share no line; this bounds sockets, memory and CPU)."""


# --- the polling side ---------------------------------------------------------------------------------


class MarkingOutbox(Protocol):
    """What the readouts need of :class:`~dcud.service.outbox.Outbox`."""

    async def put_many(
        self, items: Sequence[tuple[str, str, bytes]], *, marks: Mapping[str, str] | None = None
    ) -> Any:
        """Commit items and marks in one transaction."""
        ...

    def mark(self, key: str) -> str | None:
        """A committed mark."""
        ...


def profile_mark(meter: str) -> str:
    """Outbox mark key of a meter's profile cursor (value ``"<obis> <capture epoch s>"``)."""
    return f"dlms:{meter}:profile"


def event_mark(meter: str, obis: str) -> str:
    """Outbox mark key of an event log's cursor (value ``"<capture epoch s>"``)."""
    return f"dlms:{meter}:events:{obis}"


class DlmsReadouts:
    """The DLMS meters of one polling service: settings, per-meter locks and caches, TCP slots.

    :meth:`read` is what the polling service calls for a scheduled readout and for ``cmd/read``.
    """

    def __init__(
        self,
        meters: Sequence[MeterConfig],
        lines: Sequence[LineConfig],
        *,
        registry: LineRegistry | None,
        outbox: MarkingOutbox,
        state_dir: Path | None,
        base_dir: Path,
        device_id: str,
        next_seq: Callable[[str], int],
        dcu_synced: Callable[[], bool | None],
        wall: Callable[[], float] = time.time,
        tcp_concurrency: int = TCP_CONCURRENCY,
    ) -> None:
        self.settings: dict[str, DlmsMeterSettings] = {}
        self.setting_errors: dict[str, str] = {}
        for meter in meters:
            if meter.protocol != "dlms":
                continue
            try:
                self.settings[meter.name] = DlmsMeterSettings.from_config(meter, base_dir, device_id)
            except (DcudError, ValueError) as exc:  # the key file changed since the configuration loaded
                self.setting_errors[meter.name] = str(exc)
        self._line_cfgs = {line.name: line for line in lines}
        self._registry = registry
        self._outbox = outbox
        self._state_dir = state_dir
        self.store = DlmsStateStore(state_dir, wall)
        self._next_seq = next_seq
        self._dcu_synced = dcu_synced
        self._wall = wall
        self._tcp_slots = asyncio.Semaphore(tcp_concurrency)
        self._locks: dict[str, asyncio.Lock] = {}
        self._caches: dict[str, ObjectCache] = {}
        self._holders: dict[str, str] = {}
        self._locked = state_dir is None

    async def _lock_state(self) -> None:
        if not self._locked and self._state_dir is not None:
            # Held for the life of the process; waits while a `dcud read` of a DLMS meter runs.
            try:
                await asyncio.to_thread(lock_state_dir, self._state_dir, wait=True)
            except OSError as exc:
                where = self._state_dir
                raise DlmsStateError(f"cannot lock the DLMS state directory {where}: {exc}") from exc
            self._locked = True

    async def read(
        self, meter: MeterConfig, kind: str, owner: str, *, lease_timeout_s: float, trigger: str
    ) -> MeterReading:
        """One readout with the meter's retries; raises what the line or the meter raised."""
        settings = self.settings.get(meter.name)
        if settings is None:  # its key file became unreadable since the configuration was loaded
            why = self.setting_errors.get(meter.name, "not a DLMS meter")
            raise LocalProtocolError(f"meter {meter.name}: {why}")
        await self._lock_state()
        lock = self._locks.setdefault(meter.name, asyncio.Lock())
        try:
            async with asyncio.timeout(lease_timeout_s):
                await lock.acquire()
        except TimeoutError:
            holder = self._holders.get(meter.name, "poll")
            info = LeaseInfo(holder, holder.split(":")[0], 0, self._wall())
            raise LeaseTimeout(f"meter {meter.name} is being read by {holder}", info, "open") from None
        self._holders[meter.name] = owner
        try:
            attempts = 1 + settings.retries
            for attempt in range(attempts):
                try:
                    return await self._read_once(settings, kind, owner, lease_timeout_s, trigger, attempt)
                except (PeerTimeout, RemoteProtocolError) as exc:
                    # A busy line, wrong keys or a replay: asking again at once changes nothing.
                    if isinstance(exc, LeaseTimeout | DecipheringError) or attempt == attempts - 1:
                        raise
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._holders.pop(meter.name, None)
            lock.release()

    @contextlib.asynccontextmanager
    async def _port(
        self, settings: DlmsMeterSettings, kind: str, owner: str, lease_timeout_s: float
    ) -> AsyncIterator[tuple[SessionPort, LineConfig | None]]:
        if settings.host:
            async with self._tcp_slots:
                port = await open_tcp(settings.host, settings.port)
                try:
                    yield port, None
                finally:
                    await port.close()
            return
        line = self._registry.get(settings.line) if self._registry is not None else None
        line_cfg = self._line_cfgs.get(settings.line)
        if line is None or line_cfg is None:
            raise LineClosedError(f"line {settings.line} is not available")
        lease_kind: LeaseKind = "cli" if kind == "cli" else "poll"
        async with line.lease(owner, lease_kind, timeout_s=lease_timeout_s) as leased:
            yield leased, line_cfg

    def _cursors(
        self, settings: DlmsMeterSettings, state: MeterState
    ) -> tuple[float | None, dict[str, float]]:
        """The cursors in force: the later of the state file's and the outbox's marks."""
        profile_cursor: float | None = None
        if settings.profile is not None:
            obis = str(settings.profile)
            profile_cursor = state.profile_cursor(obis)
            mark = self._outbox.mark(profile_mark(settings.name))
            if mark:
                mark_obis, _, value = mark.partition(" ")
                with contextlib.suppress(ValueError):
                    if mark_obis == obis and (profile_cursor is None or float(value) > profile_cursor):
                        profile_cursor = float(value)
                        state.set_profile_cursor(obis, profile_cursor)
        events: dict[str, float] = {}
        for log_obis in settings.event_logs:
            key = str(log_obis)
            cursor = state.event_cursors_s.get(key)
            mark = self._outbox.mark(event_mark(settings.name, key))
            with contextlib.suppress(ValueError, TypeError):
                if mark and (cursor is None or float(mark) > cursor):
                    cursor = float(mark)
                    state.set_event_cursor(key, cursor)
            if cursor is not None:
                events[key] = cursor
        return profile_cursor, events

    async def _read_once(
        self,
        settings: DlmsMeterSettings,
        kind: str,
        owner: str,
        lease_timeout_s: float,
        trigger: str,
        retries: int,
    ) -> MeterReading:
        name = settings.name
        state = self.store.get(name)
        profile_cursor, event_cursors = self._cursors(settings, state)
        plan = ReadoutPlan(
            settings,
            self._caches.setdefault(name, ObjectCache()),
            profile_cursor_s=profile_cursor,
            event_cursors_s=event_cursors,
            wall=self._wall,
            dcu_synced=self._dcu_synced,
        )
        started = self._wall()
        error: DcudError | None = None
        session: DlmsSessionResult | None = None
        try:
            async with self._port(settings, kind, owner, lease_timeout_s) as (port, line_cfg):
                session = await dlms_session(settings, line_cfg, port, self.store, plan)
        except (LeaseTimeout, LineClosedError):
            raise
        except TransportError as exc:
            if settings.host:
                error = MeterUnreachable(str(exc))
            else:
                raise
        except DcudError as exc:
            error = exc
        result = plan.result
        committed = await self._commit(settings, state, result, trigger)
        state.clock = result.clock or state.clock
        try:
            await asyncio.to_thread(self.store.save, name)
        except OSError as exc:
            log.warning("DLMS state not saved", meter=name, error=str(exc))
        if error is not None:
            raise error
        finished = self._wall()
        details: dict[str, Any] = {}
        if settings.host:
            details["host"] = f"{settings.host}:{settings.port}"
        if result.clock is not None:
            details["meter_clock"] = result.clock["meter_time"]
            details["clock_drift_s"] = result.clock["drift_s"]
        if result.errors:
            details["errors"] = list(result.errors)
        if session is not None and not session.released:
            details["released"] = False
        return MeterReading(
            meter=name,
            protocol="dlms",
            values=list(result.values),
            details=details,
            started_s=started,
            finished_s=finished,
            retries=retries,
            publish=bool(result.values),
            state={"dlms": self._state_doc(settings, state, result, committed)},
        )

    def _state_doc(
        self, settings: DlmsMeterSettings, state: MeterState, result: ReadoutResult, committed: dict[str, Any]
    ) -> dict[str, Any]:
        doc = settings.describe()
        if state.clock:
            doc["clock"] = dict(state.clock)
        if settings.profile is not None:
            cursor = state.profile_cursor(str(settings.profile))
            profile: dict[str, Any] = {
                "obis": str(settings.profile),
                "last_capture": _iso(cursor) if cursor is not None else None,
            }
            if result.profile_read is not None:
                profile["last_read"] = {**result.profile_read, "committed": committed.get("rows", 0)}
            doc["profile"] = profile
        if settings.event_logs:
            doc["event_logs"] = {
                str(obis): {
                    "last_capture": _iso(state.event_cursors_s[str(obis)])
                    if str(obis) in state.event_cursors_s
                    else None,
                    **(
                        {"last_read": result.event_reads[str(obis)]}
                        if str(obis) in result.event_reads
                        else {}
                    ),
                }
                for obis in settings.event_logs
            }
        doc["errors"] = list(result.errors)
        if "error" in committed:
            doc["commit_error"] = committed["error"]
        return doc

    async def _commit(
        self, settings: DlmsMeterSettings, state: MeterState, result: ReadoutResult, trigger: str
    ) -> dict[str, Any]:
        """Profile rows and events into the outbox with their cursors in one transaction, then the state."""
        name = settings.name
        items: list[tuple[str, str, bytes]] = []
        marks: dict[str, str] = {}
        received = _iso(self._wall())
        if result.profile_rows and settings.profile is not None:
            obis = str(settings.profile)
            for row in result.profile_rows:
                payload = {
                    "meter": name,
                    "ts": _iso(row.capture_s),
                    "seq": self._next_seq(name),
                    "values": row.values,
                    "protocol": "dlms",
                    "line": settings.line,
                    "address": settings.address,
                    "trigger": trigger,
                    "profile": obis,
                }
                if settings.host:
                    payload["host"] = f"{settings.host}:{settings.port}"
                items.append(("reading", f"meter/{name}/reading", _json(payload)))
            marks[profile_mark(name)] = f"{obis} {result.profile_rows[-1].capture_s:.0f}"
        for log_obis, events in result.events.items():
            for event in events:
                payload = {
                    "type": "meter_event",
                    "ts": _iso(event.capture_s),
                    "text": f"meter {name}: {event_text(event.code)}",
                    "meter": name,
                    "log": log_obis,
                    "code": event.code,
                    "values": event.values,
                    "received": received,
                }
                items.append(("event", "event", _json(payload)))
            if events:
                marks[event_mark(name, log_obis)] = f"{events[-1].capture_s:.0f}"
        clock_set = result.clock_set
        if clock_set is not None and result.clock is not None and result.clock.get("action") == "set":
            payload = {
                "type": "meter_clock_set",
                "ts": received,
                "text": f"meter {name}: clock corrected by {-clock_set['drift_s']:+.1f} s",
                "meter": name,
                "drift_s": clock_set["drift_s"],
            }
            items.append(("event", "event", _json(payload)))
        if not items:
            return {}
        try:
            await self._outbox.put_many(items, marks=marks)
        except DcudError as exc:
            # Nothing was committed and no cursor moved: the same rows are asked for next time.
            log.warning("DLMS rows not committed", meter=name, error=str(exc))
            return {"error": str(exc)}
        if result.profile_rows and settings.profile is not None:
            state.set_profile_cursor(str(settings.profile), result.profile_rows[-1].capture_s)
        for log_obis, events in result.events.items():
            if events:
                state.set_event_cursor(log_obis, events[-1].capture_s)
        return {"rows": len(result.profile_rows), "events": sum(len(e) for e in result.events.values())}


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


__all__ = [
    "CANCEL_CLEANUP_S",
    "TCP_CONCURRENCY",
    "DlmsMeterSettings",
    "DlmsReadouts",
    "DlmsStateError",
    "MeterUnreachable",
    "ObjectCache",
    "PlanOptions",
    "ReadoutPlan",
    "ReadoutResult",
    "TcpPort",
    "dlms_session",
    "event_mark",
    "event_text",
    "open_tcp",
    "profile_mark",
    "run_dlms_session",
]
