"""The runtime context: objects below the services that live as long as the process.

One :class:`Runtime` is made by ``dcud.app.run_daemon``; builders hand services the parts they use
(``runtime.bus``, ``runtime.event``, ``runtime.clock``, ``runtime.reconnect``...), never the whole object,
and no service imports ``dcud.app``. The service-level singletons (the outbox, the command router, the
line registry, the reloader) are wired next to it by the app (``dcud.app.Shared``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.events import EventListener, EventLog, EventSink
from dcud.runtime.uplink import UplinkReconnect

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """Objects shared by services for the life of the process (they survive reloads)."""

    device_id: str
    topic_prefix: str
    bus: EventBus
    events: EventLog
    clock: Clock = SYSTEM_CLOCK
    """The clock every service is given (a test hands in a ``ManualClock``)."""
    started_monotonic_s: float = field(default=-1.0)
    """When the process started on ``clock`` (set from it unless given)."""
    reconnect: UplinkReconnect = field(default_factory=UplinkReconnect)
    """Uplink reconnect requests (connectivity watchdog -> MQTT and other uplinks)."""
    restart_reason: str | None = None
    """Set by :meth:`request_restart`; ``run_daemon`` then raises RestartRequested (exit 75)."""
    stop_daemon: Callable[[], None] | None = None
    """Graceful stop of the whole daemon (set by ``run_daemon``)."""
    service_restarts: Callable[[], Mapping[str, int]] = dict
    """Failures per service since start (the supervisor's counts; set by run_daemon)."""

    def __post_init__(self) -> None:
        if self.started_monotonic_s < 0:
            self.started_monotonic_s = self.clock.monotonic()

    @property
    def event(self) -> EventSink:
        """Commit an event (``<p>/event``) to the outbox; returns once it is durable."""
        return self.events.event

    def add_event_listener(self, listener: EventListener) -> Callable[[], None]:
        """Register an event listener (SNMP traps); returns the function that removes it."""
        return self.events.add_listener(listener)

    def request_restart(self, reason: str) -> None:
        """Stop gracefully and exit with the restart code (systemd starts dcud again)."""
        self.restart_reason = reason
        if self.stop_daemon is not None:
            self.stop_daemon()
