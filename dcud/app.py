"""Builds the services from a loaded configuration and runs them under the supervisor.

``SERVICE_BUILDERS`` is the one place where a new feature plugs in: a function that takes the loaded
configuration and the shared runtime objects and returns the services it needs (each given only its
own slice of the configuration). Reload calls the same builders and lets the supervisor restart only
the services whose slice changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from dcud import __version__
from dcud.config.loader import LoadedConfig, load_config
from dcud.errors import RestartRequested
from dcud.runtime.bus import EventBus
from dcud.runtime.sdnotify import Notifier
from dcud.runtime.supervisor import Service, Supervisor, SupervisorOptions
from dcud.runtime.uplink import UplinkReconnect
from dcud.service.commands import CommandContext, CommandLimits, CommandRouter, Request
from dcud.service.line import LineRegistry, build_line_services
from dcud.service.mqtt import MqttService, MqttServiceConfig, status_document
from dcud.service.outbox import Outbox, OutboxCorrupt, OutboxLimits, OverflowPolicy, OverflowReport
from dcud.service.remote_config import Reloader, register_param_commands

log = structlog.get_logger("dcud.app")


@dataclass
class Runtime:
    """Objects shared by services for the life of the process (they survive reloads)."""

    device_id: str
    topic_prefix: str
    bus: EventBus
    outbox: Outbox
    commands: CommandRouter
    started_monotonic_s: float = field(default_factory=time.monotonic)
    lines: LineRegistry = field(default_factory=LineRegistry)
    """Every serial line by name; services take leases on them (design.md rule 4)."""
    event_listeners: list[Callable[[Mapping[str, Any]], None]] = field(default_factory=list)
    """Called synchronously with every event right after its commit (payload plus ``uid``): the SNMP
    service turns events into traps here. A listener must not block; its errors are logged."""
    early_events: deque[Mapping[str, Any]] | None = field(default_factory=lambda: deque(maxlen=8))
    """Events committed before the first listener registered (``outbox_corrupt`` is raised before any
    service starts): handed to that listener, so that they reach the SNMP manager too. None afterwards:
    events while a reload restarts the listener, or while traps are off, are not kept for later."""
    restart_reason: str | None = None
    """Set by :meth:`request_restart`; ``run_daemon`` then raises RestartRequested (exit 75)."""
    stop_daemon: Callable[[], None] | None = None
    """Graceful stop of the whole daemon (set by ``run_daemon``)."""
    reconnect: UplinkReconnect = field(default_factory=UplinkReconnect)
    """Uplink reconnect requests (connectivity watchdog -> MQTT and other uplinks)."""
    remote_config: Reloader | None = None
    """The one path for configuration changes: SIGHUP, config port, MQTT param/set (set by run_daemon)."""
    service_restarts: Callable[[], Mapping[str, int]] = dict
    """Failures per service since start (the supervisor's counts; set by run_daemon)."""

    def add_event_listener(self, listener: Callable[[Mapping[str, Any]], None]) -> Callable[[], None]:
        """Register an event listener; returns the function that removes it."""
        self.event_listeners.append(listener)
        early, self.early_events = self.early_events, None
        for event in early or ():
            try:
                listener(event)
            except Exception as exc:  # as in event(): an alarm path failure is logged, never raised
                log.error("event listener failed", event_type=event.get("type"), error=repr(exc))

        def remove() -> None:
            if listener in self.event_listeners:
                self.event_listeners.remove(listener)

        return remove

    def request_restart(self, reason: str) -> None:
        """Stop gracefully and exit with the restart code (systemd starts dcud again)."""
        self.restart_reason = reason
        if self.stop_daemon is not None:
            self.stop_daemon()

    def status(self) -> dict[str, object]:
        """The ``<p>/status`` document."""
        document = status_document(
            device_id=self.device_id,
            version=__version__,
            started_monotonic_s=self.started_monotonic_s,
            outbox=self.outbox,
            bus=self.bus,
        )
        if "firmware" in self.bus.states:  # staged firmware (dcud.service.firmware)
            document["firmware"] = dict(self.bus.states["firmware"])
        restarts = dict(self.service_restarts())
        # A service that failed and was restarted shows here: the hostile-input tests expect zeros.
        document["restarts"] = {"total": sum(restarts.values()), "services": restarts}
        document["commands"] = self.commands.stats.to_json()
        return document

    async def event(self, event_type: str, text: str, **fields: object) -> None:
        """Commit an event (``<p>/event``) to the outbox; returns once it is durable."""
        payload = {
            "type": event_type,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "text": text,
            **fields,
        }
        item = await self.outbox.put("event", "event", json.dumps(payload, default=str).encode())
        if self.early_events is not None:
            self.early_events.append({**payload, "uid": item.uid})
        for listener in list(self.event_listeners):
            try:
                listener({**payload, "uid": item.uid})
            except Exception as exc:  # an alarm path failure must never fail the event's producer
                log.error("event listener failed", event_type=event_type, error=repr(exc))


ServiceBuilder = Callable[[LoadedConfig, Runtime], Sequence[Service]]


def _mqtt_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    remote = config.toml.remote
    # The router outlives reloads; its bounds follow dcud.toml's [remote] (start and every reload).
    runtime.commands.configure(
        CommandLimits(
            max_request_bytes=remote.max_request_bytes,
            max_depth=remote.max_depth,
            dedupe_window_s=remote.dedupe_window_s,
            dedupe_max_entries=remote.dedupe_max_entries,
        )
    )
    if config.toml.mqtt is None:
        return []
    slice_ = MqttServiceConfig.build(
        config.toml.mqtt,
        config.device_id,
        config.topic_prefix,
        max_request_bytes=remote.max_request_bytes,
        max_queued_requests=remote.max_queued_requests,
    )
    return [
        MqttService(slice_, runtime.bus, runtime.outbox, runtime.commands, runtime.status, runtime.reconnect)
    ]


def _polling_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    if not config.toml.line and not config.toml.meter:  # nothing to poll (DLMS/TCP meters need no line)
        return []
    from dcud.service.polling import build_polling_services

    return build_polling_services(config, runtime)


def _alarm_and_time_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    """Power monitor, SNMP traps, NTP and the connectivity watchdog / daily restart (issue 6)."""
    from dcud.service.ntp import NtpService, NtpServiceConfig
    from dcud.service.power import PowerService, PowerServiceConfig
    from dcud.service.snmp import SnmpServiceConfig, SnmpTrapService
    from dcud.service.snmp_agent import AgentServiceConfig, SnmpAgentService
    from dcud.service.watchdog import WatchdogService, WatchdogServiceConfig

    services: list[Service] = []
    snmp = SnmpServiceConfig.from_config(config)
    if snmp is not None:  # first, so that its event hook is in place before power events at start
        services.append(SnmpTrapService(snmp, runtime.bus, runtime.add_event_listener))
    agent = AgentServiceConfig.from_config(config)
    if agent is not None:  # read-only SNMP agent: the same state documents as MQTT, read per request
        services.append(SnmpAgentService(agent, runtime.bus, runtime.status))
    power = PowerServiceConfig.from_config(config)
    if power is not None:
        services.append(PowerService(power, runtime.bus, runtime.event))
    services.append(NtpService(NtpServiceConfig.from_config(config), runtime.bus, runtime.event))
    watchdog = WatchdogServiceConfig.from_config(config)
    if watchdog is not None:
        services.append(
            WatchdogService(watchdog, runtime.bus, runtime.event, runtime.request_restart, runtime.reconnect)
        )
    return services


def _io_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    """Digital inputs (one service per [[input]]), the relay and the LEDs (issue 16)."""
    from dcud.service.inputs import build_input_services
    from dcud.service.outputs import OutputsConfig, OutputsService

    return [
        *build_input_services(config, runtime),
        OutputsService(OutputsConfig.from_config(config), runtime.bus),
    ]


def _push_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    """Data push (FTP/MQTT), UDP event push, device-manager push, WM-E source meter (issue 5)."""
    from dcud.service.datapush import build_push_services

    return build_push_services(config, runtime)


def _config_port_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    """The config/firmware port (issue 8, dcud.service.config_port)."""
    from dcud.service.config_port import build_config_port_services

    return build_config_port_services(config, runtime)


def _drive_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    """Servo drives: CANopen per [[can]], Modbus RTU through line leases (issue 7, dcud.service.drives)."""
    if not config.toml.drive:
        return []
    from dcud.service.drives import build_drive_services

    return build_drive_services(config, runtime)


def _bridge_services(config: LoadedConfig, runtime: Runtime) -> Sequence[Service]:
    """Transparent ports tm/tm2 and the EI client (issue 4, dcud.service.bridge)."""
    if not any(line.transparent for line in config.toml.line):  # both bridge to a transparent line
        return []
    from dcud.service.bridge import build_bridge_services

    return build_bridge_services(config, runtime)


SERVICE_BUILDERS: list[ServiceBuilder] = [
    _mqtt_services,
    build_line_services,
    _polling_services,
    _alarm_and_time_services,
    _io_services,
    _config_port_services,
    _push_services,
    _drive_services,
    _bridge_services,
]


def consumers_for(config: LoadedConfig) -> list[str]:
    """Outbox consumers that will deliver items; an item is kept until all of them have it."""
    from dcud.service.datapush import push_consumers

    consumers = ["mqtt"] if config.toml.mqtt is not None else []
    return consumers + push_consumers(config)  # ftp / mqtt-push / udp-event, exactly when configured


def build_services(config: LoadedConfig, runtime: Runtime) -> list[Service]:
    """Every service of this configuration, in start order."""
    services: list[Service] = []
    for builder in SERVICE_BUILDERS:
        services.extend(builder(config, runtime))
    return services


async def _register_builtin_commands(runtime: Runtime) -> None:
    """``cmd/ping`` (liveness, version, the verbs served) and ``cmd/status`` (the status document)."""

    async def ping(_request: Request, _ctx: CommandContext) -> dict[str, object]:
        return {"pong": True, "version": __version__, "verbs": runtime.commands.verbs()}

    async def status(_request: Request, _ctx: CommandContext) -> dict[str, object]:
        return runtime.status()

    runtime.commands.register("ping", Request, ping)
    runtime.commands.register("status", Request, status)


async def run_daemon(config_path: Path, notifier: Notifier | None = None) -> None:
    """The body of ``dcud run``: returns on a clean stop, raises on failure or bad config."""
    config = load_config(config_path)
    notifier = notifier or Notifier()
    limits = OutboxLimits(
        max_bytes=config.toml.outbox.max_bytes,
        max_age_s=config.toml.outbox.max_age_s,
        policy=OverflowPolicy(config.toml.outbox.policy),
        high_water_ratio=config.toml.outbox.high_water_ratio,
        # The alarm clears a little below the mark so that it does not flap around it.
        clear_ratio=config.toml.outbox.high_water_ratio * 0.875,
    )
    config.state_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    overflow_reports: asyncio.Queue[OverflowReport] = asyncio.Queue(maxsize=16)

    def on_overflow(report: OverflowReport) -> None:
        # Called in the loop, once per transition; it must not block, so the event is committed by a
        # helper task. A full queue drops the report (the counters in the outbox stats stay exact).
        _offer(overflow_reports, report)

    def make_outbox(consumers: Sequence[str]) -> Outbox:
        return Outbox(
            config.state_dir / "outbox.sqlite",
            limits,
            consumers=consumers,
            device_id=config.device_id,
            on_overflow=on_overflow,
        )

    outbox = make_outbox(consumers_for(config))
    corrupt_moved: Path | None = None
    try:
        await outbox.open()
    except OutboxCorrupt:
        # Keep the damaged file for forensics and start a fresh outbox: a DCU that refuses to start
        # loses every future reading, which is worse. The event below tells the operations centre.
        corrupt_moved = _move_aside(outbox.path)
        log.error(
            "outbox database unreadable; moved aside", path=str(outbox.path), moved_to=str(corrupt_moved)
        )
        outbox = make_outbox(consumers_for(config))
        await outbox.open()
    runtime = Runtime(config.device_id, config.topic_prefix, EventBus(), outbox, CommandRouter())
    await _register_builtin_commands(runtime)
    if corrupt_moved is not None:
        await runtime.event("outbox_corrupt", f"outbox database was unreadable; moved to {corrupt_moved}")

    async def prepare(new: LoadedConfig) -> None:
        consumers = consumers_for(new)
        if tuple(consumers) != runtime.outbox.consumers:
            # The set of uplinks changed: the outbox must hold items for exactly the new set, so
            # every service (they all share the outbox) restarts around a reopened outbox.
            log.info("uplink set changed; reopening the outbox", consumers=consumers)
            await supervisor.replace([])
            await runtime.outbox.close()
            runtime.outbox = make_outbox(consumers)
            await runtime.outbox.open()

    # SIGHUP, the config port and MQTT param/set all go through this one serialised reloader.
    reloader = Reloader(
        config_path,
        config,
        lambda new: build_services(new, runtime),
        notifier,
        prepare=prepare,
        event=runtime.event,
    )
    runtime.remote_config = reloader
    from dcud.service.ntp import clock_synced

    register_param_commands(runtime.commands, reloader, lambda: clock_synced(runtime.bus) is True)
    supervisor = Supervisor(
        build_services(config, runtime),
        notifier,
        SupervisorOptions(grace_s=config.toml.grace_s),
    )
    reloader.attach(supervisor)
    runtime.stop_daemon = supervisor.request_stop
    runtime.service_restarts = lambda: supervisor.restart_counts
    loop.add_signal_handler(signal.SIGTERM, supervisor.request_stop)
    loop.add_signal_handler(signal.SIGINT, supervisor.request_stop)
    loop.add_signal_handler(signal.SIGHUP, reloader.request_reload)

    async def overflow_events() -> None:
        while True:
            report = await overflow_reports.get()
            name = "outbox_high_water" if report.high_water else "outbox_full"
            state = "reached" if report.active else "cleared"
            await runtime.event(
                name if report.active else f"{name}_cleared",
                f"outbox {name.removeprefix('outbox_').replace('_', ' ')} {state}: "
                f"{report.size_bytes} of {report.max_bytes} bytes, policy {report.policy}",
                size_bytes=report.size_bytes,
                max_bytes=report.max_bytes,
                dropped=report.dropped_overflow,
                rejected=report.rejected,
            )

    log.info("starting", version=__version__, device_id=config.device_id, config=str(config_path))
    helpers = [
        asyncio.create_task(reloader.run(), name="dcud[app:reload]"),
        asyncio.create_task(overflow_events(), name="dcud[app:overflow]"),
    ]
    try:
        await supervisor.run()
    finally:
        for task in helpers:
            task.cancel()
        for task in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runtime.outbox.close()
        log.info("stopped")
    if runtime.restart_reason is not None:
        raise RestartRequested(runtime.restart_reason)


def _move_aside(path: Path) -> Path:
    """Rename a database and its WAL files to ``<name>.corrupt-<unix time>``; returns the new path."""
    moved = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(f"{moved}{suffix}")
    return moved


def _offer(queue: asyncio.Queue[OverflowReport], report: OverflowReport) -> None:
    with contextlib.suppress(asyncio.QueueFull):
        queue.put_nowait(report)
