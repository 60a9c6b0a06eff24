"""Digital inputs (dcud.toml ``[[input]]``): a door contact, a tamper switch, a cabinet thermostat.

Each input is one supervised service ``input.<name>`` that watches its source the way the power monitor
watches the power-fail input (:mod:`dcud.service.levels`: a sysfs-style file polled every
``poll_interval_s``, or a GPIO line with edge events; ``active_low``; debounce ``debounce_s``).

Each debounced change (level 1 = active, after ``active_low``)
    1. becomes the retained state ``input/<name>`` (``<p>/input/<name>/state``);
    2. raises an ``input_change`` event through the runtime (committed to the outbox first, then
       ``<p>/event`` on MQTT, the SNMP trap from the runtime's event hook when DCUD-MIB maps the type,
       and the UDP event push when ``eventpush_sms_notify`` has bit 2, "Input change"); its text is
       ``eventpush_sms_text`` followed by ``<name>=<level>``, its fields ``input``, ``level``, ``since``
       (the edge time with milliseconds) and ``source``;
    3. is recorded in ``state_dir/inputs/<name>.json`` (durable), so that a change while dcud was not
       running is raised at the next start (with ``at_start: true``); the very first start records the
       level and raises nothing.

An input whose source cannot be opened (a GPIO chip missing, permission denied) or read (the file is
gone) is reported as ``unavailable`` in its state with the error, logged once, and retried; it never
stops the daemon.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dcud.runtime.backoff import Backoff
from dcud.runtime.bus import EventBus
from dcud.runtime.durable import write_durably
from dcud.runtime.events import EventSink
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.levels import FileSource, GpioSource, LevelSource, LevelWatcher

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

EVENT_TYPE: Final = "input_change"
RECORD_DIR: Final = "inputs"
DEFAULT_TEXT: Final = "Input changed"


def event_text(text: str, name: str, level: bool) -> str:
    """The ``input_change`` text: ``eventpush_sms_text`` then ``<name>=<level>``: ``Input changed door=1``."""
    return f"{text} {name}={int(level)}"


@dataclass(frozen=True)
class InputServiceConfig:
    """One input's slice: its ``[[input]]`` table, ``eventpush_sms_text`` and the state directory."""

    name: str
    source: str
    path: str
    chip: str
    gpio_line: int
    active_low: bool
    poll_interval_s: float
    debounce_s: float
    text: str
    state_dir: Path

    @classmethod
    def all_from_config(cls, config: LoadedConfig) -> list[InputServiceConfig]:
        """One slice per ``[[input]]``."""
        text = config.params.get_opt_str("eventpush_sms_text") or DEFAULT_TEXT
        return [
            cls(
                name=item.name,
                source=item.source,
                path=item.path,
                chip=item.chip,
                gpio_line=item.gpio_line,
                active_low=item.active_low,
                poll_interval_s=item.poll_interval_s,
                debounce_s=item.debounce_s,
                text=text,
                state_dir=config.state_dir,
            )
            for item in config.toml.input
        ]

    @property
    def record_path(self) -> Path:
        """Where the last accepted level is kept across restarts."""
        return self.state_dir / RECORD_DIR / f"{self.name}.json"

    def open_source(self) -> LevelSource:
        """The configured source (``OSError`` when a GPIO line cannot be requested)."""
        if self.source == "gpio":
            return GpioSource(self.chip, self.gpio_line, self.active_low, consumer=f"dcud-{self.name}"[:31])
        return FileSource(self.path, self.active_low)


def load_record(path: Path) -> dict[str, Any] | None:
    """The recorded ``{"level": 0|1, "since": ts}``, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("level") not in (0, 1):
        return None
    return data


def save_record(path: Path, level: bool, since: str) -> None:
    """Record the accepted level durably (atomic replace + fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps({"level": int(level), "since": since}).encode())


class InputService:
    """Supervised service ``input.<name>``: watches one input, raises ``input_change`` (module doc)."""

    def __init__(self, config: InputServiceConfig, bus: EventBus, event: EventSink) -> None:
        self.config = config
        self.name = f"input.{config.name}"
        self._bus = bus
        self._event = event
        self.level: bool | None = None
        self.since: str | None = None
        self.changes = 0
        self.error = ""

    def _publish(self) -> None:
        cfg = self.config
        if self.error:
            state = "unavailable"
        elif self.level is None:
            state = "unknown"
        else:
            state = "active" if self.level else "inactive"
        self._bus.set_state(
            f"input/{cfg.name}",
            {
                "name": cfg.name,
                "state": state,
                "level": None if self.level is None else int(self.level),
                "since": self.since,
                "source": cfg.source,
                "active_low": cfg.active_low,
                "changes": self.changes,
                "error": self.error or None,
            },
        )

    async def _change(self, ctx: ServiceContext, level: bool, since: str, **extra: Any) -> None:
        """State, event (durable), record: one accepted change."""
        cfg = self.config
        self.level = level
        self.since = since
        self.changes += 1
        self._publish()
        ctx.log.info("input changed", input=cfg.name, state="active" if level else "inactive", **extra)
        await self._event(
            EVENT_TYPE,
            event_text(cfg.text, cfg.name, level),
            input=cfg.name,
            level=int(level),
            since=since,
            source=cfg.source,
            **extra,
        )
        await asyncio.to_thread(save_record, cfg.record_path, level, since)

    async def _reconcile(self, ctx: ServiceContext, level: bool) -> None:
        """The first readable level against the recorded one: a difference is a change."""
        cfg = self.config
        record = load_record(cfg.record_path)
        now = rfc3339_ms(time.time())
        if record is not None and bool(record["level"]) != level:
            await self._change(ctx, level, now, at_start=True)
            return
        self.level = level
        self.since = str(record.get("since", now)) if record else now
        self._publish()
        if record is None:
            await asyncio.to_thread(save_record, cfg.record_path, level, self.since)

    def _open(self, ctx: ServiceContext) -> LevelSource | None:
        try:
            return self.config.open_source()
        except OSError as exc:
            message = f"cannot open: {exc.strerror or exc}"
            if message != self.error:
                ctx.log.warning("input unavailable", input=self.config.name, error=message)
            self.error = message
            self._publish()
            return None

    async def run(self, ctx: ServiceContext) -> None:
        """Watch the input until stopped; an input that cannot be opened is reported and retried."""
        backoff = Backoff(initial_s=1.0, max_s=60.0)
        while (source := self._open(ctx)) is None:
            ctx.set_ready()  # a missing input is reported in its state, not a reason to hold READY=1
            if await ctx.sleep(backoff.next_delay_s()):
                return
        try:
            if self.error:
                ctx.log.info("input available", input=self.config.name)
                self.error = ""
            await self._watch(ctx, source)
        finally:
            source.close()

    async def _watch(self, ctx: ServiceContext, source: LevelSource) -> None:
        cfg = self.config
        watcher = LevelWatcher(source, poll_interval_s=cfg.poll_interval_s, debounce_s=cfg.debounce_s)
        level = watcher.read_initial()
        if level is None:
            self._unreadable(ctx, source)
        else:
            await self._reconcile(ctx, level)
        ctx.set_ready()
        async for change in watcher.changes(ctx.stopping, ctx.beat):
            if change.kind == "unreadable":
                self._unreadable(ctx, source)
            elif change.kind == "readable":
                ctx.log.info("input readable again", input=cfg.name)
                self.error = ""
                self._publish()
            elif change.kind == "first" and change.level is not None:
                self.error = ""
                await self._reconcile(ctx, change.level)
            elif change.level is not None:
                await self._change(ctx, change.level, rfc3339_ms(time.time()))

    def _unreadable(self, ctx: ServiceContext, source: LevelSource) -> None:
        detail = getattr(source, "last_error", "") or "read failed"
        ctx.log.warning("input unreadable", input=self.config.name, error=detail)
        self.error = f"unreadable: {detail}"
        self._publish()


def build_input_services(config: LoadedConfig, bus: EventBus, event: EventSink) -> Sequence[Service]:
    """One :class:`InputService` per ``[[input]]`` (``SERVICE_BUILDERS`` entry); states of removed
    inputs are cleared."""
    slices = InputServiceConfig.all_from_config(config)
    names = {s.name for s in slices}
    for subtopic in list(bus.states):
        if subtopic.startswith("input/") and subtopic.removeprefix("input/") not in names:
            bus.clear_state(subtopic)
    return [InputService(s, bus, event) for s in slices]
