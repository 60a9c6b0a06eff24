"""Builds the services from a loaded configuration and runs them under the supervisor.

``SERVICE_BUILDERS`` is the one place where a new feature plugs in: a function that takes the loaded
configuration and the shared runtime objects and returns the services it needs (each given only its
own slice of the configuration). Reload calls the same builders and lets the supervisor restart only
the services whose slice changed.

Each builder imports its feature's modules only when the configuration asks for the feature, so a DCU
carries in memory what it uses and nothing else (docs/benchmarks.md, "Footprint per feature"; checked by
tests/system/test_lazy_imports.py): MQTT (aiomqtt, paho), the SNMP trap sender and agent (pysnmp), the config
port (h11), inputs, relay and LEDs, serial lines and their codecs, drives (python-can), the pushes
(aioftp), TLS and envelopes (cryptography) stay out of a daemon that does not configure them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from dcud import __version__
from dcud.config.loader import LoadedConfig, load_config
from dcud.errors import RestartRequested
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.context import Runtime
from dcud.runtime.events import EventLog, EventSink
from dcud.runtime.sdnotify import Notifier
from dcud.runtime.supervisor import Service, Supervisor, SupervisorOptions, Worker
from dcud.service.commands import CommandContext, CommandLimits, CommandRouter, Request
from dcud.service.device_commands import register_device_commands
from dcud.service.line import LineRegistry, build_line_services
from dcud.service.outbox import Outbox, OutboxCorrupt, OutboxLimits, OverflowPolicy, OverflowReport
from dcud.service.remote_config import Reloader, register_param_commands
from dcud.service.status import status_document

log = structlog.get_logger("dcud.app")


@dataclass
class Shared:
    """What the builders hand out: the runtime plus the service-level singletons (all survive reloads).

    A builder passes each service the parts it uses; no service sees this object or imports this module.
    """

    runtime: Runtime
    outbox: Outbox
    commands: CommandRouter
    lines: LineRegistry = field(default_factory=LineRegistry)
    """Every serial line by name; services take leases on them (design.md rule 4). The registry is light:
    a port (pyserial) is opened, and imported, only by a configured line's service."""
    remote_config: Reloader | None = None
    """The one path for configuration changes: SIGHUP, config port, MQTT param/set (set by run_daemon)."""

    @classmethod
    def create(
        cls,
        device_id: str,
        topic_prefix: str,
        bus: EventBus,
        outbox: Outbox,
        commands: CommandRouter,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Shared:
        """A runtime whose events go into ``outbox`` (also after the outbox is replaced on reload)."""

        async def commit(payload: bytes) -> str:
            return (await shared.outbox.put("event", "event", payload)).uid

        runtime = Runtime(device_id, topic_prefix, bus, EventLog(commit, clock), clock)
        shared = cls(runtime, outbox, commands)
        return shared

    @property
    def event(self) -> EventSink:
        """``runtime.event``: commit an event to the outbox."""
        return self.runtime.event

    async def put_history(self, kind: str, subtopic: str, payload: bytes) -> object:
        """``outbox.put`` on the outbox in force (it is replaced when the set of uplinks changes)."""
        return await self.outbox.put(kind, subtopic, payload)

    @property
    def bus(self) -> EventBus:
        """``runtime.bus``."""
        return self.runtime.bus

    def status(self) -> dict[str, object]:
        """The ``<p>/status`` document."""
        runtime = self.runtime
        document = status_document(
            device_id=runtime.device_id,
            version=__version__,
            started_monotonic_s=runtime.started_monotonic_s,
            outbox=self.outbox,
            bus=runtime.bus,
        )
        if "firmware" in runtime.bus.states:  # staged firmware (dcud.service.firmware)
            document["firmware"] = dict(runtime.bus.states["firmware"])
        restarts = dict(runtime.service_restarts())
        # A service that failed and was restarted shows here: the hostile-input tests expect zeros.
        document["restarts"] = {"total": sum(restarts.values()), "services": restarts}
        document["commands"] = self.commands.stats.to_json()
        return document


ServiceBuilder = Callable[[LoadedConfig, Shared], Sequence[Service]]


def _mqtt_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    remote = config.toml.remote
    # The router outlives reloads; its bounds follow dcud.toml's [remote] (start and every reload).
    shared.commands.configure(
        CommandLimits(
            max_request_bytes=remote.max_request_bytes,
            max_depth=remote.max_depth,
            dedupe_window_s=remote.dedupe_window_s,
            dedupe_max_entries=remote.dedupe_max_entries,
        )
    )
    if config.toml.mqtt is None:
        return []
    from dcud.service.mqtt import MqttService, MqttServiceConfig

    slice_ = MqttServiceConfig.build(
        config.toml.mqtt,
        config.device_id,
        config.topic_prefix,
        max_request_bytes=remote.max_request_bytes,
        max_queued_requests=remote.max_queued_requests,
    )
    return [
        MqttService(
            slice_, shared.bus, shared.outbox, shared.commands, shared.status, shared.runtime.reconnect
        )
    ]


def _line_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    return build_line_services(config, shared.lines, shared.bus, shared.event)


def _polling_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    if not config.toml.line and not config.toml.meter:  # nothing to poll (DLMS/TCP meters need no line)
        return []
    from dcud.service.polling import build_polling_services

    return build_polling_services(
        config,
        lines=shared.lines,
        bus=shared.bus,
        outbox=shared.outbox,
        commands=shared.commands,
        event=shared.event,
        clock=shared.runtime.clock,
    )


def _alarm_and_time_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    """Power monitor, SNMP traps, NTP and the connectivity watchdog / daily restart (issue 6)."""
    from dcud.service.ntp import NtpService, NtpServiceConfig

    runtime = shared.runtime
    params = config.params
    services: list[Service] = []
    # SNMP (and pysnmp, the largest library dcud uses) only where traps or the agent are configured.
    if params.get_bool("snmp_trap") and params.get_opt_str("snmp_manager_ip"):
        from dcud.service.snmp import SnmpServiceConfig, SnmpTrapService

        snmp = SnmpServiceConfig.from_config(config)  # None (and a warning) without snmp_user
        if snmp is not None:  # first, so that its event hook is in place before power events at start
            services.append(SnmpTrapService(snmp, runtime.bus, runtime.add_event_listener))
    if config.toml.snmp.agent_listen:
        from dcud.service.snmp_agent import AgentServiceConfig, SnmpAgentService

        agent = AgentServiceConfig.from_config(config)
        if agent is not None:  # read-only SNMP agent: the same state documents as MQTT, read per request
            services.append(SnmpAgentService(agent, runtime.bus, shared.status))
    if config.toml.power.source != "none":
        from dcud.service.power import PowerService, PowerServiceConfig

        power = PowerServiceConfig.from_config(config)
        if power is not None:
            services.append(PowerService(power, runtime.bus, runtime.event, clock=runtime.clock))
    services.append(NtpService(NtpServiceConfig.from_config(config), runtime.bus, runtime.event))
    if params.get_opt_str("com_ping_host") is not None or params.get("snrp_restart_time") is not None:
        from dcud.service.watchdog import WatchdogService, WatchdogServiceConfig

        watchdog = WatchdogServiceConfig.from_config(config)
        if watchdog is not None:
            services.append(
                WatchdogService(
                    watchdog,
                    runtime.bus,
                    runtime.event,
                    runtime.request_restart,
                    runtime.reconnect,
                    clock=runtime.clock,
                )
            )
    return services


def _io_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    """Digital inputs (one service per [[input]]), the relay and the LEDs (issue 16).

    Each only where dcud.toml describes the hardware: ``[[input]]``; ``[leds]`` or a ``[relay]`` source
    for the ``outputs`` service. A reload that removes them clears their retained states.
    """
    bus = shared.bus
    services: list[Service] = []
    if config.toml.input or any(subtopic.startswith("input/") for subtopic in bus.states):
        from dcud.service.inputs import build_input_services

        services.extend(build_input_services(config, bus, shared.event))  # clears removed inputs too
    if config.toml.leds is not None or config.toml.relay.source != "none":
        from dcud.service.outputs import OutputsConfig, OutputsService

        services.append(OutputsService(OutputsConfig.from_config(config), bus))
    else:
        bus.clear_state("relay")
        bus.clear_state("leds")
    return services


def _push_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    """Data push (FTP/MQTT), UDP event push, device-manager push, WM-E source meter (issue 5)."""
    from dcud.service.datapush import build_push_services

    return build_push_services(
        config,
        lines=shared.lines,
        bus=shared.bus,
        outbox=shared.outbox,
        commands=shared.commands,
        event=shared.event,
        status=shared.status,
    )


def _config_port_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    """The config/firmware port (issue 8, dcud.service.config_port): on by default (``[config_port]``)."""
    if not config.toml.config_port.enabled or shared.remote_config is None:
        return []
    from dcud.service.config_port import build_config_port_services

    return build_config_port_services(config, shared.remote_config, shared.bus, shared.event)


def _drive_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    """Servo drives: CANopen per [[can]], Modbus RTU through line leases (dcud.service.drive_services)."""
    if not config.toml.drive:
        return []
    from dcud.service.drive_services import build_drive_services

    return build_drive_services(
        config,
        lines=shared.lines,
        bus=shared.bus,
        history=shared.put_history,
        commands=shared.commands,
        event=shared.event,
        clock=shared.runtime.clock,
    )


def _bridge_services(config: LoadedConfig, shared: Shared) -> Sequence[Service]:
    """Transparent ports tm/tm2 and the EI client (issue 4, dcud.service.bridge)."""
    if not any(line.transparent for line in config.toml.line):  # both bridge to a transparent line
        return []
    from dcud.service.bridge import build_bridge_services

    return build_bridge_services(config, shared.lines, shared.bus, shared.event)


SERVICE_BUILDERS: list[ServiceBuilder] = [
    _mqtt_services,
    _line_services,
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


def build_services(config: LoadedConfig, shared: Shared) -> list[Service]:
    """Every service of this configuration, in start order."""
    services: list[Service] = []
    for builder in SERVICE_BUILDERS:
        services.extend(builder(config, shared))
    return services


async def _register_builtin_commands(shared: Shared) -> None:
    """``cmd/ping`` (liveness, version, the verbs served) and ``cmd/status`` (the status document)."""

    async def ping(_request: Request, _ctx: CommandContext) -> dict[str, object]:
        return {"pong": True, "version": __version__, "verbs": shared.commands.verbs()}

    async def status(_request: Request, _ctx: CommandContext) -> dict[str, object]:
        return shared.status()

    shared.commands.register("ping", Request, ping)
    shared.commands.register("status", Request, status)


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
        # worker. A full queue drops the report (the counters in the outbox stats stay exact).
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
    shared = Shared.create(config.device_id, config.topic_prefix, EventBus(), outbox, CommandRouter())
    runtime = shared.runtime
    await _register_builtin_commands(shared)
    if corrupt_moved is not None:
        await runtime.event("outbox_corrupt", f"outbox database was unreadable; moved to {corrupt_moved}")

    async def prepare(new: LoadedConfig) -> None:
        consumers = consumers_for(new)
        if tuple(consumers) != shared.outbox.consumers:
            # The set of uplinks changed: the outbox must hold items for exactly the new set, so
            # every service (they all share the outbox) restarts around a reopened outbox.
            log.info("uplink set changed; reopening the outbox", consumers=consumers)
            await supervisor.replace([])
            await shared.outbox.close()
            shared.outbox = make_outbox(consumers)
            await shared.outbox.open()

    # SIGHUP, the config port and MQTT param/set all go through this one serialised reloader.
    reloader = Reloader(
        config_path,
        config,
        lambda new: build_services(new, shared),
        notifier,
        prepare=prepare,
        event=runtime.event,
    )
    shared.remote_config = reloader
    from dcud.service.ntp import clock_synced

    register_param_commands(shared.commands, reloader, lambda: clock_synced(runtime.bus) is True)
    register_device_commands(
        shared.commands, lambda: reloader.current, runtime.request_restart, runtime.event
    )

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

    supervisor = Supervisor(
        build_services(config, shared),
        notifier,
        SupervisorOptions(grace_s=config.toml.grace_s),
        # The daemon's own workers: never swapped by a reload (the reloader is the one swapping).
        fixed=[Worker("app-reload", reloader.run), Worker("app-overflow", overflow_events)],
        clock=runtime.clock,
    )
    reloader.attach(supervisor)
    runtime.stop_daemon = supervisor.request_stop
    runtime.service_restarts = lambda: supervisor.restart_counts
    loop.add_signal_handler(signal.SIGTERM, supervisor.request_stop)
    loop.add_signal_handler(signal.SIGINT, supervisor.request_stop)
    loop.add_signal_handler(signal.SIGHUP, reloader.request_reload)

    log.info("starting", version=__version__, device_id=config.device_id, config=str(config_path))
    try:
        await supervisor.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await shared.outbox.close()
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
