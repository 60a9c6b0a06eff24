"""Servo drives on CAN: one service per ``[[can]]`` that has drives, and the builder of every drive service.

One :class:`CanDriveService` per ``[[can]]`` that has drives owns the bus (:class:`~dcud.transport.can.
CanPort`) and a :class:`~dcud.service.drive_canopen.CanopenDrive` (the CANopen master of one node) per
``[[drive]]`` with ``protocol = "canopen"`` on it. Frames are routed by COB-ID in the event loop. The
service is also the heartbeat consumer of its nodes: a :class:`~dcud.codec.heartbeat.HeartbeatWatch`
(sans-I/O) is told every heartbeat, stamped on the service's clock, and the service sleeps on that
clock until the watch's next deadline (no polling), then hands it the time; a loss goes back to its
drive. It publishes the bus state (``can/<name>``) and carries its drives' events to the outbox.

:func:`dcud.service.drive_services.build_drive_services` (``SERVICE_BUILDERS``) builds these and the
Modbus RTU drive services (:mod:`dcud.service.drive_modbus`) and serves the ``drive/<verb>`` commands
(:mod:`dcud.service.drive_commands`). What every drive has, whatever its protocol, is
:class:`~dcud.service.drive_base.DriveBase`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from dcud.codec import canopen as co
from dcud.codec.heartbeat import HeartbeatLost, HeartbeatWatch
from dcud.config.model import CanConfig, DriveConfig
from dcud.errors import DcudError
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.events import EventSink
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.drive_base import EVENT_QUEUE_SIZE, DriveEvents, HistorySink
from dcud.service.drive_canopen import CanopenDrive
from dcud.service.drive_commands import DriveRegistry
from dcud.transport.can import CanBusState, CanPort, CanSettings

if TYPE_CHECKING:
    pass

log = structlog.get_logger("dcud.drives")


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
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.name = f"drives.{config.can.name}"
        self._state_bus = bus
        self._event = event
        self._history = history
        self._registry = registry
        self._settings = settings
        self._clock = clock
        self.counters: dict[str, int] = {}
        self.drives: dict[str, CanopenDrive] = {}
        self.port: CanPort | None = None
        self._routes: dict[int, Callable[[bytes, float], None]] = {}
        self._events: DriveEvents = asyncio.Queue(EVENT_QUEUE_SIZE)
        self.heartbeats = HeartbeatWatch()
        self._by_node: dict[int, CanopenDrive] = {}
        self._rearm = asyncio.Event()
        self._armed_s: float | None = None
        """The deadline the heartbeat timer sleeps on (None: it waits for a node to be watched)."""
        """Set when the watch's next deadline may have come forward (a node started being watched)."""

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
        """Deliver frames with ``cob_id`` to ``handler`` (None: stop delivering).

        The port is told what is routed: on socketcan the kernel then drops the rest (the PDOs of nodes
        nobody configured, other masters' SDO and RPDO traffic) before it costs a wake-up; every
        heartbeat and EMCY still comes through, so an unconfigured node is still counted.
        """
        if handler is None:
            self._routes.pop(cob_id, None)
        else:
            self._routes[cob_id] = handler
        if self.port is not None:
            self.port.set_receive_ids(self._routes.keys())

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

    def _on_heartbeat(self, drive: CanopenDrive, data: bytes, _now: float) -> None:
        """A heartbeat frame: stamped on the service's clock (the watch's), then the drive's."""
        drive.on_heartbeat(data, self._clock.monotonic())
        due = self.heartbeats.next_deadline()
        # Compared with the deadline the timer sleeps on, not with the watch's state just before this
        # frame: a node's timeout learnt by SDO after its first heartbeats (set_timeout) makes it
        # watched without a heartbeat of its own, and the timer must then wake to arm for it.
        if due is not None and (self._armed_s is None or due < self._armed_s):
            self._rearm.set()

    def _check_heartbeats(self) -> float | None:
        """Hand the watch the time, apply its losses; returns its next deadline."""
        for event in self.heartbeats.handle_timer(self._clock.monotonic()):
            if isinstance(event, HeartbeatLost):
                self._by_node[event.node_id].heartbeat_lost(event.timeout_s)
        return self.heartbeats.next_deadline()

    async def _watch_heartbeats(self) -> None:
        """The heartbeat watch's timer: sleep on the clock until its next deadline, then hand it the time.

        Healthy drives cost about one wake-up per timeout (the deadline moves on with every heartbeat,
        and the watch is only asked when the earliest one was due), a loss shows at its deadline.
        """
        while True:
            deadline = self._check_heartbeats()
            self._armed_s = deadline
            self._rearm.clear()
            if deadline is None:
                await self._rearm.wait()
            else:
                await self._clock.wait(self._rearm, deadline - self._clock.monotonic())

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
                heartbeats=self.heartbeats,
            )
            self.drives[cfg.name] = drive
            self._by_node[cfg.node_id] = drive
            self.route(co.HEARTBEAT_BASE + cfg.node_id, functools.partial(self._on_heartbeat, drive))
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
