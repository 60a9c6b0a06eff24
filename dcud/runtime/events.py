"""Events: the one ``EventSink`` signature services are given, and the log that commits them.

An event (``<p>/event``: ``power_lost``, ``drive_fault``, ``outbox_full``...) is committed to the outbox
before anyone hears of it, then handed to the listeners (the SNMP service turns events into traps). A
service never sees the log itself: its builder gives it ``runtime.event``, an :class:`EventSink`.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import structlog

from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.timefmt import rfc3339

__all__ = ["EventListener", "EventLog", "EventSink"]

log = structlog.get_logger("dcud.events")


class EventSink(Protocol):
    """Commit one event (``Runtime.event``); returns once it is durable."""

    def __call__(self, event_type: str, text: str, **fields: Any) -> Awaitable[None]:
        """Commit ``{"type": event_type, "ts": ..., "text": text, **fields}``."""
        ...


EventListener = Callable[[Mapping[str, Any]], None]
"""Called synchronously with every event right after its commit (payload plus ``uid``)."""


class EventLog:
    """Stamps events, commits them through ``commit`` and tells the listeners.

    ``commit`` stores the JSON payload durably and returns its ``uid`` (the outbox, wired by the app).
    """

    def __init__(self, commit: Callable[[bytes], Awaitable[str]], clock: Clock = SYSTEM_CLOCK) -> None:
        self._commit = commit
        self._clock = clock
        self.listeners: list[EventListener] = []
        """A listener must not block; its errors are logged."""
        self.early: deque[Mapping[str, Any]] | None = deque(maxlen=8)
        """Events committed before the first listener registered (``outbox_corrupt`` is raised before any
        service starts): handed to that listener, so that they reach the SNMP manager too. None
        afterwards: events while a reload restarts the listener, or while traps are off, are not kept."""

    def add_listener(self, listener: EventListener) -> Callable[[], None]:
        """Register an event listener; returns the function that removes it."""
        self.listeners.append(listener)
        early, self.early = self.early, None
        for event in early or ():
            try:
                listener(event)
            except Exception as exc:  # as in event(): an alarm path failure is logged, never raised
                log.error("event listener failed", event_type=event.get("type"), error=repr(exc))

        def remove() -> None:
            if listener in self.listeners:
                self.listeners.remove(listener)

        return remove

    async def event(self, event_type: str, text: str, **fields: Any) -> None:
        """Commit an event (``<p>/event``); returns once it is durable. An :class:`EventSink`."""
        payload = {"type": event_type, "ts": rfc3339(self._clock.time()), "text": text, **fields}
        uid = await self._commit(json.dumps(payload, default=str).encode())
        if self.early is not None:
            self.early.append({**payload, "uid": uid})
        for listener in list(self.listeners):
            try:
                listener({**payload, "uid": uid})
            except Exception as exc:  # an alarm path failure must never fail the event's producer
                log.error("event listener failed", event_type=event_type, error=repr(exc))
