"""Power monitor and the last-gasp sequence (dcud.toml ``[power]``).

Sources and debounce
    :mod:`dcud.service.levels` (shared with the digital inputs): ``file``, a sysfs-style file such as
    ``/sys/class/power_supply/AC/online`` read every ``poll_interval_s`` (an integer, non-zero = power
    present; sysfs ``online`` is 0, 1 or 2), or ``gpio``, one line of a GPIO chip with edge events (high
    = power present); ``active_low = true`` inverts either source. A new level counts once it has been
    stable for ``debounce_s``: an input that flaps faster produces no event at all, one that settles
    produces exactly one. Detection latency is at most ``poll_interval_s + debounce_s`` (defaults
    20 ms + 50 ms).

Last gasp (power lost), within ``budget_s`` (default 1 s) after detection, in this order:
    1. the ``power`` state becomes ``lost`` (``<p>/power/state`` and ``<p>/status``) and services stop taking
       new work (they check :func:`power_ok`);
    2. a ``power_loss`` event is committed to the outbox (fsync'd) through the runtime;
    3. the SNMP trap goes out from the runtime's event hook right after the commit (dcud.service.snmp);
    4. the MQTT service, woken by the commit, publishes ``<p>/event``;
    5. the power state, recorded in ``state_dir/power-state.json`` by a worker thread while step 2
       commits, is awaited (durable);
    6. the UDP event push (``eventpush_addr``, when ``eventpush_sms_notify`` has bit 1 "Last GsmP") is
       sent directly, through the event push gate (:mod:`dcud.service.eventpush`), so the event push
       service, which later takes the same event from the outbox, finds it already sent.
    Power return runs the same sequence with ``power_return`` and re-opens work.

Not surviving a power loss
    ``state_dir/clean-shutdown`` is written when the service stops cleanly and removed when it starts.
    At start, if the marker is missing and the recorded power state is ``lost``, dcud died on its hold-up
    energy: it raises ``power_loss_unsurvived`` (text says when the loss began), then ``power_return`` if
    power is present now. The record is durable before the event push leaves, so a loss whose push
    was received is always reported as unsurvived if dcud then dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from dcud.config.loader import LoadedConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.durable import write_durably
from dcud.runtime.events import EventSink
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.eventpush import NOTIFY_POWER, EventPushConfig, send_event_push
from dcud.service.levels import FileSource, GpioSource, LevelSource, LevelWatcher

log = structlog.get_logger("dcud.power")

MARKER_FILE: Final = "clean-shutdown"
STATE_FILE: Final = "power-state.json"

# State directories whose start-up check ran in this process: a service restarted by the supervisor
# (or by a reload) must not mistake its own restart for a daemon that died.
_BOOT_CHECKED: set[Path] = set()


def power_ok(bus: EventBus) -> bool:
    """False while power is lost: services check this before starting new work (readouts, pushes)."""
    return bus.states.get("power", {}).get("state") != "lost"


# -- durable state ---------------------------------------------------------------------------------


def load_power_record(state_dir: Path) -> dict[str, Any] | None:
    """The last recorded power state (``{"state": "ok"|"lost", "since": ts}``), None if none."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("state") in ("ok", "lost") else None


def save_power_record(state_dir: Path, state: str, since: str) -> None:
    """Record the power state durably (atomic replace + fsync)."""
    write_durably(state_dir / STATE_FILE, json.dumps({"state": state, "since": since}).encode())


# -- service ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerServiceConfig:
    """The power service's slice: ``[power]`` plus the event push parameters it uses."""

    source: str
    path: str
    chip: str
    gpio_line: int
    active_low: bool
    poll_interval_s: float
    debounce_s: float
    budget_s: float
    state_dir: Path
    device_id: str
    push_addr: str | None
    lost_text: str
    return_text: str

    @classmethod
    def from_config(cls, config: LoadedConfig) -> PowerServiceConfig | None:
        """The slice, or None when ``[power] source = "none"``."""
        power = config.toml.power
        if power.source == "none":
            return None
        params = config.params
        push = EventPushConfig.from_config(config)
        # The same address string as the event push service, so its gate sees our datagram as sent.
        push_addr = push.addr if push is not None and push.sends and push.notify_mask & NOTIFY_POWER else None
        return cls(
            source=power.source,
            path=power.path,
            chip=power.chip,
            gpio_line=power.gpio_line,
            active_low=power.active_low,
            poll_interval_s=power.poll_interval_s,
            debounce_s=power.debounce_s,
            budget_s=power.budget_s,
            state_dir=config.state_dir,
            device_id=config.device_id,
            push_addr=push_addr,
            lost_text=params.get_opt_str("eventpush_sms_lost_text") or "Power loss",
            return_text=params.get_opt_str("eventpush_sms_return_text") or "Power return",
        )

    def open_source(self) -> LevelSource:
        """The configured source."""
        if self.source == "gpio":
            return GpioSource(self.chip, self.gpio_line, self.active_low, consumer="dcud-power")
        return FileSource(self.path, self.active_low)


PushSender = Callable[[str, str], Awaitable[None]]


class PowerService:
    """Supervised service ``power``: watches the input and runs the last-gasp sequence."""

    name = "power"

    def __init__(
        self,
        config: PowerServiceConfig,
        bus: EventBus,
        event: EventSink,
        push: PushSender = send_event_push,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self._bus = bus
        self._event = event
        self._push = push
        self._clock = clock
        self.state: str = "unknown"
        self.transitions = 0
        self.last_timings_ms: Mapping[str, float] = {}

    def _now_text(self) -> str:
        # Milliseconds keep two transitions within one second apart (the event push gate drops a
        # datagram identical to one sent within a minute).
        return rfc3339_ms(self._clock.time())

    def _set_state(self, state: str, since: str) -> None:
        self.state = state
        self._bus.set_state("power", {"state": state, "since": since, "source": self.config.source})

    async def _sequence(self, ctx: ServiceContext, lost: bool, since: str, **extra: Any) -> None:
        """Event commit, trap (hook), MQTT (outbox), UDP push, record; timed against the budget."""
        cfg = self.config
        start = time.monotonic()
        event_type = "power_loss" if lost else "power_return"
        text = cfg.lost_text if lost else cfg.return_text
        self._set_state("lost" if lost else "ok", since)
        timings: dict[str, float] = {}
        # The record (for the next start) is fsync'd by a worker thread while the outbox commits: it is
        # durable before the event push goes out, and costs the alarm path no extra latency.
        record = asyncio.ensure_future(
            asyncio.to_thread(save_power_record, cfg.state_dir, "lost" if lost else "ok", since)
        )
        try:
            async with asyncio.timeout(cfg.budget_s):
                await asyncio.shield(self._event(event_type, text, since=since, source=cfg.source, **extra))
        except TimeoutError:
            ctx.log.error("event commit exceeded the last-gasp budget; pushing anyway", event_type=event_type)
        timings["commit_trap_ms"] = (time.monotonic() - start) * 1000
        try:
            await record
        except OSError as exc:
            ctx.log.error("cannot record the power state", error=repr(exc))
        if cfg.push_addr:
            remaining = max(0.05, cfg.budget_s - (time.monotonic() - start))
            try:
                async with asyncio.timeout(remaining):
                    await self._push(cfg.push_addr, f"{cfg.device_id}: {text} {since}")
            except (OSError, ValueError, TimeoutError) as exc:
                ctx.log.warning("event push failed", event_type=event_type, error=repr(exc))
            timings["push_ms"] = (time.monotonic() - start) * 1000
        timings["total_ms"] = (time.monotonic() - start) * 1000
        self.transitions += 1
        self.last_timings_ms = timings
        level = ctx.log.warning if lost else ctx.log.info
        level(event_type, **{k: round(v, 1) for k, v in timings.items()})
        if timings["total_ms"] > cfg.budget_s * 1000:
            ctx.log.error("last-gasp sequence over budget", budget_s=cfg.budget_s, **timings)

    async def _startup(self, ctx: ServiceContext) -> None:
        """Unsurvived-loss check, once per process per state directory."""
        cfg = self.config
        state_dir = cfg.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        marker = state_dir / MARKER_FILE
        record = load_power_record(state_dir)
        recorded_lost = record is not None and record["state"] == "lost"
        if state_dir not in _BOOT_CHECKED:
            _BOOT_CHECKED.add(state_dir)
            clean = marker.exists()
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
            if not clean and recorded_lost and record is not None:
                since = str(record.get("since", ""))
                ctx.log.error("power loss not survived", since=since)
                await self._event(
                    "power_loss_unsurvived",
                    f"power was lost at {since} and dcud did not survive it (no clean shutdown)",
                    since=since,
                    source=cfg.source,
                )
        else:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()

    async def _reconcile(self, ctx: ServiceContext, level: bool | None) -> None:
        """Compare the first readable level with the recorded state; a difference is a transition."""
        cfg = self.config
        state_dir = cfg.state_dir
        record = load_power_record(state_dir)
        recorded_lost = record is not None and record["state"] == "lost"
        now = self._now_text()
        if level is None:
            self._set_state("unknown", now)
        elif level and recorded_lost:
            await self._sequence(ctx, lost=False, since=now)
        elif not level and not recorded_lost:
            await self._sequence(ctx, lost=True, since=now)
        else:
            since = str(record.get("since", now)) if record else now
            self._set_state("ok" if level else "lost", since)
            if record is None:
                await asyncio.to_thread(save_power_record, state_dir, "ok" if level else "lost", since)

    async def run(self, ctx: ServiceContext) -> None:
        """Watch the source until stopped; write the clean-shutdown marker on a clean stop."""
        cfg = self.config
        source = cfg.open_source()
        try:
            watcher = LevelWatcher(source, poll_interval_s=cfg.poll_interval_s, debounce_s=cfg.debounce_s)
            level = watcher.read_initial()
            await self._startup(ctx)
            await self._reconcile(ctx, level)
            ctx.set_ready()
            async for change in watcher.changes(ctx.stopping, ctx.beat):
                if change.kind == "unreadable":
                    ctx.log.warning("power input unreadable", source=cfg.source)
                elif change.kind == "readable":
                    ctx.log.info("power input readable again", source=cfg.source)
                elif change.kind == "first":
                    await self._reconcile(ctx, change.level)
                else:
                    await self._sequence(ctx, lost=not change.level, since=self._now_text())
        finally:
            source.close()
            if ctx.stopping.is_set():
                with contextlib.suppress(OSError):
                    write_durably(cfg.state_dir / MARKER_FILE, self._now_text().encode())
