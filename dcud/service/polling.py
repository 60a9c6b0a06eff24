"""Scheduled meter readouts: wall-clock aligned, one line in sequence, lines in parallel.

Each meter is read every ``interval_s`` (its own, else ``datapush_periodic``; ``0``/"table" in the
WM-E file means per meter, with :data:`FALLBACK_INTERVAL_S` for meters that set none). Slots are aligned
to the wall clock, so 15-minute readings land on :00, :15, :30, :45 (UTC epoch multiples). Meters on
one line are read one after the other, each under its own lease (so a transparent session or a CLI
read can cut in between two meters); different lines run in parallel.

A reading goes to the outbox (kind ``reading``, subtopic ``meter/<name>/reading``) and is never re-sent
as new: a meter that stops answering produces no readings, is marked ``failing`` on
``<p>/meter/<name>/state`` and raises ``meter_silent`` once; ``meter_back`` follows its next good
readout. A poll that waits on a line held by a transparent session is *deferred* (not failed) and a
poll on a line that is down is *line_down*; neither counts against the meter. A meter whose slot
passed entirely (the line was busy, down, or has more meters than its interval allows) is read late
for the latest slot that has started, never skipped; the slots in between count as ``missed``.

The service also serves the MQTT commands ``cmd/read`` (``{"meter": NAME}``: read now, through a
``cli`` lease; the reading goes to the outbox too, with ``trigger: "command"``) and ``cmd/scan``
(``{"line": NAME, "mode": "primary"|"secondary"}``: starts an M-Bus scan, whose progress and result
appear on the retained state ``<p>/line/<name>/scan``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec

from dcud.codec.iec62056 import HdlcModeRequiredError
from dcud.codec.mbus_session import MbusScan, MbusScanResult
from dcud.config.model import LineConfig, MeterConfig, Name
from dcud.errors import DcudError, NegativeResponse, PeerTimeout, ProtocolError, TransportError
from dcud.runtime.bus import EventBus
from dcud.runtime.durable import write_durably
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339
from dcud.service.commands import CommandContext, CommandError, CommandRouter, Request
from dcud.service.line import LeaseTimeout, LineClosedError, LineRegistry
from dcud.service.meter_read import (
    IEC_RETRY_PAUSE_S,
    MeterReading,
    ReadDefaults,
    read_meter,
    reading_payload,
)
from dcud.service.outbox import OutboxError
from dcud.service.session_runner import run_session

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig
    from dcud.runtime.events import EventSink
    from dcud.service.dlms_meter import DlmsReadouts
    from dcud.service.outbox import Outbox

FALLBACK_INTERVAL_S = 900
"""Interval of a meter without ``interval_s`` when ``datapush_periodic`` is 0 ("table")."""
SEQ_RESERVE = 100
"""Sequence numbers reserved on disk per write, so a crash never reuses one."""
COMMIT_QUEUE_ITEMS = 256
"""Readings waiting for their outbox commit; when full, the line workers wait (counted)."""


class ReadRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``cmd/read``: read one meter now."""

    meter: Name


class ScanRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``cmd/scan``: scan an M-Bus line (primary addresses ``first..last``, or secondary)."""

    line: Name
    mode: Literal["primary", "secondary"] = "primary"
    first: Annotated[int, msgspec.Meta(ge=0, le=250)] = 0
    last: Annotated[int, msgspec.Meta(ge=0, le=250)] = 250


class OutboxLike(Protocol):
    """What polling needs of :class:`~dcud.service.outbox.Outbox`."""

    async def put(self, kind: str, subtopic: str, payload: bytes) -> Any:
        """Commit one item; returns once it is durable."""
        ...


EventFn = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class PollingConfig:
    """The polling service's slice: meters, their lines, and the WM-E defaults."""

    meters: tuple[MeterConfig, ...]
    lines: tuple[LineConfig, ...]
    default_interval_s: int = FALLBACK_INTERVAL_S
    """From ``datapush_periodic`` (seconds); 0 = "table" (per-meter interval_s)."""
    iec_max_baud: int | None = None
    state_dir: str = ""
    lease_timeout_s: float = 10.0
    silent_after_cycles: int = 1
    """Failed cycles (each with all retries) before a meter is ``failing`` and meter_silent is raised."""
    config_dir: str = ""
    """Where dcud.toml is (DLMS key files are relative to it)."""
    device_id: str = ""

    def interval_for(self, meter: MeterConfig) -> int:
        """The meter's interval in seconds."""
        if meter.interval_s is not None:
            return meter.interval_s
        return self.default_interval_s or FALLBACK_INTERVAL_S

    def line(self, name: str) -> LineConfig | None:
        """The configuration of line ``name``."""
        for line in self.lines:
            if line.name == name:
                return line
        return None


@dataclass
class MeterHealth:
    """Per-meter schedule and health, published as ``<p>/meter/<name>/state``."""

    config: MeterConfig
    interval_s: int
    order: int
    next_due_s: float = 0.0
    last_success_s: float | None = None
    last_attempt_s: float | None = None
    last_error: dict[str, Any] | None = None
    status: str = "pending"
    """pending, ok, failed, deferred, busy, line_down."""
    consecutive_failures: int = 0
    silent: bool = False
    reads: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    deferred: int = 0
    missed: int = 0
    lost: int = 0
    """Readings the outbox refused (full under the reject_new policy)."""
    last_values: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """Protocol state merged into the document (DLMS: clock drift, profile cursor)."""

    def quality(self, now_s: float) -> str:
        """ok, stale or failing."""
        if self.silent:
            return "failing"
        if self.last_success_s is None:
            return "stale"
        if now_s - self.last_success_s > 2 * self.interval_s or self.status != "ok":
            return "stale"
        return "ok"

    def document(self, now_s: float) -> dict[str, Any]:
        """The retained state document."""
        cfg = self.config
        return {
            "meter": cfg.name,
            "line": cfg.line,
            "protocol": cfg.protocol,
            "address": cfg.address,
            "quality": self.quality(now_s),
            "status": self.status,
            "interval_s": self.interval_s,
            "last_success": rfc3339(self.last_success_s) if self.last_success_s else None,
            "last_attempt": rfc3339(self.last_attempt_s) if self.last_attempt_s else None,
            "last_error": self.last_error,
            "next_due": rfc3339(self.next_due_s) if self.next_due_s else None,
            "consecutive_failures": self.consecutive_failures,
            "counters": {
                "reads": self.reads,
                "ok": self.ok,
                "failed": self.failed,
                "retries": self.retries,
                "deferred": self.deferred,
                "missed": self.missed,
                "lost": self.lost,
            },
            **self.extra,
        }


def first_slot_s(now_s: float, interval_s: int) -> float:
    """The first wall-clock aligned slot strictly after ``now_s``."""
    return (math.floor(now_s / interval_s) + 1) * interval_s


class SeqStore:
    """Per-meter reading sequence numbers that survive restarts without ever repeating.

    The file holds, per meter, a number no reading has used yet; it is bumped by :data:`SEQ_RESERVE`
    before that many numbers are handed out, so after a crash numbers skip ahead rather than repeat.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._next: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    self._reserved = {str(k): int(v) for k, v in data.items()}
                    self._next = dict(self._reserved)

    def next(self, meter: str) -> int:
        """The next sequence number of ``meter`` (1, 2, ... on a fresh installation)."""
        value = self._next.get(meter, 1)
        self._next[meter] = value + 1
        if value >= self._reserved.get(meter, 1):
            self._reserved[meter] = value + SEQ_RESERVE
            self._save()
        return value

    def _save(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            write_durably(self.path, json.dumps(self._reserved, separators=(",", ":")).encode())


_METER_ERRORS = (PeerTimeout, ProtocolError, NegativeResponse, HdlcModeRequiredError)


class PollingService:
    """Supervised service ``polling`` (see the module docstring)."""

    name = "polling"

    def __init__(
        self,
        config: PollingConfig,
        lines: LineRegistry,
        bus: EventBus,
        outbox: OutboxLike,
        *,
        commands: CommandRouter | None = None,
        event: EventFn | None = None,
    ) -> None:
        self.config = config
        self._lines = lines
        self._bus = bus
        self._outbox = outbox
        self._commands = commands
        self._event = event
        self._defaults = ReadDefaults(iec_max_baud=config.iec_max_baud)
        self._seq = SeqStore(Path(config.state_dir) / "reading-seq.json" if config.state_dir else None)
        self.meters: dict[str, MeterHealth] = {}
        self._scans: dict[str, asyncio.Task[None]] = {}
        self._ctx: ServiceContext | None = None
        # Outbox commits (an fsync each) run beside the line workers, so the next meter's readout
        # does not wait for the previous reading to reach the disk.
        self._commits: asyncio.Queue[tuple[MeterHealth, str, bytes]] = asyncio.Queue(COMMIT_QUEUE_ITEMS)
        self._workers: list[asyncio.Task[None]] = []
        self.commit_waits = 0
        self._dlms: DlmsReadouts | None = None
        if any(meter.protocol == "dlms" for meter in config.meters):
            from dcud.service.dlms_meter import DlmsReadouts

            self._dlms = DlmsReadouts(
                config.meters,
                config.lines,
                registry=lines,
                outbox=outbox,  # type: ignore[arg-type]  # the real Outbox has put_many with marks
                state_dir=Path(config.state_dir) / "dlms" if config.state_dir else None,
                base_dir=Path(config.config_dir or "."),
                device_id=config.device_id,
                next_seq=self._seq.next,
                dcu_synced=self._clock_synced,
            )

    # -- life cycle ----------------------------------------------------------------------------

    async def run(self, ctx: ServiceContext) -> None:
        """Start one worker per line, serve commands, stop when asked."""
        self._ctx = ctx
        now = time.time()
        by_line: dict[str, list[MeterHealth]] = {}
        for order, meter in enumerate(self.config.meters):
            if not meter.enabled:
                continue
            interval = self.config.interval_for(meter)
            health = MeterHealth(meter, interval, order, next_due_s=first_slot_s(now, interval))
            self.meters[meter.name] = health
            by_line.setdefault(meter.line or f"tcp:{meter.name}", []).append(health)  # TCP: no line
            self._publish(health)
        if self._commands is not None:
            self._commands.register("read", ReadRequest, self._cmd_read)
            self._commands.register("scan", ScanRequest, self._cmd_scan)
        try:
            self._workers = [
                ctx.spawn(f"line-{line_name}", self._line_worker(ctx, line_name, meters))
                for line_name, meters in by_line.items()
            ]
            ctx.spawn("commit", self._committer(ctx))
            ctx.set_ready()
            while not await ctx.sleep(ctx.liveness_s / 3):
                pass
        finally:
            if self._commands is not None:
                self._commands.unregister("read")
                self._commands.unregister("scan")
            for task in self._scans.values():
                task.cancel()
            self._ctx = None

    async def _committer(self, ctx: ServiceContext) -> None:
        """Commit queued readings in order; on stop, finish what the workers still hand over."""
        queue = self._commits
        while True:
            if queue.empty() and ctx.stopping.is_set() and all(w.done() for w in self._workers):
                return
            try:
                async with asyncio.timeout(0.5):
                    health, subtopic, payload = await queue.get()
            except TimeoutError:
                continue
            try:
                await self._outbox.put("reading", subtopic, payload)
            except OutboxError as exc:
                # Full under reject_new: the outbox counts it and raises outbox_full; the reading is lost.
                health.lost += 1
                health.last_error = _error_doc(exc)
                self._publish(health)

    def _publish(self, health: MeterHealth) -> None:
        self._bus.set_state(f"meter/{health.config.name}", health.document(time.time()))

    async def _emit(self, event_type: str, text: str, **fields: object) -> None:
        if self._event is not None:
            await self._event(event_type, text, **fields)

    def _clock_synced(self) -> bool | None:
        clock = self._bus.states.get("clock")
        if not isinstance(clock, Mapping):
            return None
        synced = clock.get("synced")
        return synced if isinstance(synced, bool) else None

    # -- the per-line worker -------------------------------------------------------------------

    async def _line_worker(self, ctx: ServiceContext, line_name: str, meters: list[MeterHealth]) -> None:
        while not ctx.stopping.is_set():
            now = time.time()
            due = sorted((m for m in meters if m.next_due_s <= now), key=lambda m: (m.next_due_s, m.order))
            if not due:
                wait_s = min(m.next_due_s for m in meters) - now
                if await ctx.sleep(min(wait_s, ctx.liveness_s / 3)):
                    return
                continue
            for health in due:
                if ctx.stopping.is_set():
                    return
                outcome = await self._poll(ctx, line_name, health)
                ctx.beat()
                if outcome in ("deferred", "busy", "line_down"):
                    # The line is not ours right now: every meter still due shares that fate.
                    for other in due:
                        if other is not health and other.next_due_s <= time.time():
                            self._hold(other, outcome)
                    break

    @staticmethod
    def _advance(health: MeterHealth, slot_s: float) -> None:
        """After the readout (or failed attempt) of ``slot_s``: the next slot is due."""
        health.next_due_s = slot_s + health.interval_s

    @staticmethod
    def _catch_up(health: MeterHealth) -> None:
        """A meter whose slot passed entirely (busy or unavailable line) is read late, for the latest
        slot that has started; the slots in between count as missed. Late meters are never skipped, so
        an overloaded line reads every meter once per pass instead of starving the ones at its end."""
        interval = health.interval_s
        now = time.time()
        if now >= health.next_due_s + interval:
            current = math.floor(now / interval) * interval
            health.missed += round((current - health.next_due_s) / interval)
            health.next_due_s = current

    def _hold(self, health: MeterHealth, status: str) -> None:
        """A due meter waits for its line (it stays due)."""
        health.status = status
        if status == "deferred":
            health.deferred += 1
        self._catch_up(health)
        self._publish(health)

    async def _poll(self, ctx: ServiceContext, line_name: str, health: MeterHealth) -> str:
        """Read one meter for its current slot; returns ok, failed, deferred, busy or line_down."""
        meter = health.config
        self._catch_up(health)
        slot = health.next_due_s
        if self._dlms is not None and meter.protocol == "dlms":
            return await self._poll_dlms(ctx, health, slot)
        line_cfg = self.config.line(line_name)
        line = self._lines.get(line_name)
        if line is None or line_cfg is None:
            self._hold(health, "line_down")
            await ctx.sleep(self.config.lease_timeout_s)
            return "line_down"
        attempts = 1 + (meter.retries if meter.protocol != "mbus" else 0)
        last_exc: DcudError | None = None
        reading: MeterReading | None = None
        health.last_attempt_s = time.time()
        try:
            async with line.lease(
                f"poll:{meter.name}", "poll", timeout_s=self.config.lease_timeout_s
            ) as port:
                for attempt in range(attempts):
                    if attempt:
                        health.retries += 1
                        await asyncio.sleep(IEC_RETRY_PAUSE_S)
                    try:
                        reading = await read_meter(port, meter, line_cfg, self._defaults)
                        break
                    except _METER_ERRORS as exc:
                        last_exc = exc
        except LeaseTimeout as exc:
            status = "line_down" if exc.holder is None else ("deferred" if exc.deferred else "busy")
            self._hold(health, status)
            return status
        except (TransportError, LineClosedError) as exc:
            health.last_error = _error_doc(exc)
            self._hold(health, "line_down")
            await ctx.sleep(1.0)  # the line service is reopening the device; do not spin
            return "line_down"
        health.reads += 1
        self._advance(health, slot)
        if reading is not None:
            await self._success(health, reading, slot, "schedule")
            return "ok"
        assert last_exc is not None
        await self._failure(health, last_exc)
        return "failed"

    async def _poll_dlms(self, ctx: ServiceContext, health: MeterHealth, slot: float) -> str:
        """A DLMS readout (dcud.service.dlms_meter): its own lease (HDLC) or TCP connection."""
        assert self._dlms is not None
        meter = health.config
        health.last_attempt_s = time.time()
        try:
            reading = await self._dlms.read(
                meter,
                "poll",
                f"poll:{meter.name}",
                lease_timeout_s=self.config.lease_timeout_s,
                trigger="schedule",
            )
        except LeaseTimeout as exc:
            status = "line_down" if exc.holder is None else ("deferred" if exc.deferred else "busy")
            self._hold(health, status)
            return status
        except (TransportError, LineClosedError) as exc:
            health.last_error = _error_doc(exc)
            self._hold(health, "line_down")
            await ctx.sleep(1.0)
            return "line_down"
        except _METER_ERRORS as exc:
            health.reads += 1
            self._advance(health, slot)
            await self._failure(health, exc)
            return "failed"
        health.reads += 1
        self._advance(health, slot)
        await self._success(health, reading, slot, "schedule")
        return "ok"

    async def _success(
        self, health: MeterHealth, reading: MeterReading, slot: float | None, trigger: str
    ) -> dict[str, Any]:
        meter = health.config
        payload = reading_payload(
            reading,
            seq=self._seq.next(meter.name) if reading.publish else 0,
            line=meter.line,
            address=meter.address,
            trigger=trigger,
            slot_s=slot,
            clock_synced=self._clock_synced(),
        )
        if reading.publish:
            if self._commits.full():
                self.commit_waits += 1
            await self._commits.put(
                (health, f"meter/{meter.name}/reading", json.dumps(payload, separators=(",", ":")).encode())
            )
        health.extra.update(reading.state)
        health.ok += 1
        health.retries += reading.retries
        health.last_success_s = reading.finished_s
        health.last_values = len(reading.values)
        health.status = "ok"
        health.consecutive_failures = 0
        if health.silent:
            health.silent = False
            await self._emit(
                "meter_back", f"meter {meter.name} answers again", meter=meter.name, line=meter.line
            )
        self._publish(health)
        return payload

    async def _failure(self, health: MeterHealth, exc: DcudError) -> None:
        meter = health.config
        health.failed += 1
        health.status = "failed"
        health.consecutive_failures += 1
        health.last_error = _error_doc(exc)
        if not health.silent and health.consecutive_failures >= self.config.silent_after_cycles:
            health.silent = True
            kind = "meter_silent" if isinstance(exc, PeerTimeout) else "meter_error"
            await self._emit(kind, f"meter {meter.name}: {exc}", meter=meter.name, line=meter.line)
            if self._ctx is not None:
                self._ctx.log.warning("meter failing", meter=meter.name, error=str(exc))
        self._publish(health)

    # -- commands ------------------------------------------------------------------------------

    async def read_now(self, name: str, owner: str = "cmd/read") -> dict[str, Any]:
        """Read ``name`` now through a ``cli`` lease; returns the reading document (also committed)."""
        health = self.meters.get(name)
        if health is None:
            raise CommandError(f'no enabled meter named "{name}"')
        meter = health.config
        if self._dlms is not None and meter.protocol == "dlms":
            try:
                reading = await self._dlms.read(
                    meter, "cli", owner, lease_timeout_s=self.config.lease_timeout_s, trigger="command"
                )
            except _METER_ERRORS as exc:
                health.last_error = _error_doc(exc)
                self._publish(health)
                raise
            health.reads += 1
            return await self._success(health, reading, None, "command")
        line_cfg = self.config.line(meter.line)
        line = self._lines.get(meter.line)
        if line is None or line_cfg is None:
            raise CommandError(f"line {meter.line} is not available")
        async with line.lease(owner, "cli", timeout_s=self.config.lease_timeout_s) as port:
            try:
                reading = await read_meter(port, meter, line_cfg, self._defaults)
            except _METER_ERRORS as exc:
                health.last_error = _error_doc(exc)
                self._publish(health)
                raise
        health.reads += 1
        return await self._success(health, reading, None, "command")

    async def _cmd_read(self, request: ReadRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        return await self.read_now(request.meter)

    async def _cmd_scan(self, request: ScanRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        name, mode, first, last = request.line, request.mode, request.first, request.last
        line_cfg = self.config.line(name)
        if line_cfg is None:
            raise CommandError(f"no line {json.dumps(name)} is configured", field="$.line")
        if line_cfg.kind != "mbus":
            raise CommandError(f"line {name} is not an M-Bus line", field="$.line")
        if first > last:
            raise CommandError(f'"first" ({first}) is after "last" ({last})', field="$.first")
        running = self._scans.get(name)
        if running is not None and not running.done():
            raise CommandError(f"a scan of line {name} is already running")
        if self._ctx is None:
            raise CommandError("polling is not running")
        self._scans[name] = self._ctx.spawn(f"scan-{name}", self._scan(line_cfg, mode, first, last))
        return {"started": True, "line": name, "mode": mode, "state": f"line/{name}/scan"}

    async def _scan(self, line_cfg: LineConfig, mode: str, first: int, last: int) -> None:
        topic = f"line/{line_cfg.name}/scan"
        state: dict[str, Any] = {
            "line": line_cfg.name,
            "mode": mode,
            "state": "running",
            "started": rfc3339(time.time()),
        }
        self._bus.set_state(topic, dict(state))
        line = self._lines.get(line_cfg.name)
        try:
            if line is None:
                raise TransportError(f"line {line_cfg.name} is not available")
            session: MbusScan = (
                MbusScan.primary(first, last, baud=line_cfg.effective_baud)
                if mode == "primary"
                else MbusScan.secondary(baud=line_cfg.effective_baud)
            )
            last_publish = [0.0]

            def progress(s: Any) -> None:
                now = time.monotonic()
                if now - last_publish[0] >= 1.0:
                    last_publish[0] = now
                    self._bus.set_state(topic, {**state, "probing": s.progress, "probes": s.probes})

            async with line.lease("cmd/scan", "cli", timeout_s=self.config.lease_timeout_s) as port:
                result: MbusScanResult = await run_session(session, port, on_progress=progress)
            state.update(scan_document(result))
            state["state"] = "done"
        except (DcudError, OSError) as exc:
            state.update({"state": "failed", "error": str(exc)})
        state["finished"] = rfc3339(time.time())
        self._bus.set_state(topic, state)


def scan_document(result: MbusScanResult) -> dict[str, Any]:
    """JSON of a scan result: what was found, collisions, probes."""
    found = []
    for hit in result.found:
        item: dict[str, Any] = {"primary": hit.address, "secondary": hit.secondary_address or None}
        if hit.telegram is not None:
            item.update(
                {
                    "id": hit.telegram.id,
                    "manufacturer": hit.telegram.manufacturer,
                    "version": hit.telegram.version,
                    "medium": hit.telegram.medium_name,
                }
            )
        found.append(item)
    return {
        "found": found,
        "collisions": list(result.collisions),
        "unreadable": list(result.unreadable),
        "probes": result.probes,
        "complete": result.complete,
    }


def _error_doc(exc: BaseException) -> dict[str, Any]:
    return {"ts": rfc3339(time.time()), "type": type(exc).__name__, "message": str(exc)}


def build_polling_services(
    config: LoadedConfig,
    *,
    lines: LineRegistry,
    bus: EventBus,
    outbox: Outbox,
    commands: CommandRouter,
    event: EventSink,
) -> Sequence[Service]:
    """The polling service when any meter is configured (``SERVICE_BUILDERS`` entry)."""
    toml = config.toml
    if not toml.meter:
        return []
    params = config.params
    periodic = FALLBACK_INTERVAL_S
    with contextlib.suppress(KeyError, TypeError):
        periodic = params.get_int("datapush_periodic")
    iec_baud: int | None = None
    with contextlib.suppress(KeyError, TypeError):
        iec_baud = params.get_opt_int("datapush_iec_readout_baudrate")
    slice_ = PollingConfig(
        meters=tuple(toml.meter),
        lines=tuple(toml.line),
        default_interval_s=periodic,
        iec_max_baud=iec_baud,
        state_dir=str(config.state_dir),
        config_dir=str(config.path.parent),
        device_id=config.device_id,
    )
    return [PollingService(slice_, lines, bus, outbox, commands=commands, event=event)]


__all__ = [
    "FALLBACK_INTERVAL_S",
    "MeterHealth",
    "PollingConfig",
    "PollingService",
    "SeqStore",
    "build_polling_services",
    "first_slot_s",
    "scan_document",
]
