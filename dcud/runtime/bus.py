"""In-process event bus for retained state documents and live notifications.

Durable data (readings, events) goes through the outbox, never through here. The bus carries the
*latest* state per subtopic (``line/rs485-1``, ``meter/flat-12``...): a subscriber that falls behind
loses intermediate states, never the latest one, so no queue here can grow without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

JsonObject = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """The newest retained state document of one subtopic."""

    subtopic: str
    payload: JsonObject


class StateWatcher:
    """A subscriber's view: a set of dirty subtopics, coalesced, so it is bounded by the subtopic count."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._dirty: dict[str, None] = {}
        self._event = asyncio.Event()

    def _mark(self, subtopic: str) -> None:
        self._dirty[subtopic] = None
        self._event.set()

    def mark_all(self) -> None:
        """Mark every known subtopic dirty (after a reconnect every retained state is sent again)."""
        for subtopic in self._bus.states:
            self._dirty[subtopic] = None
        if self._dirty:
            self._event.set()

    async def next_batch(self) -> list[StateUpdate]:
        """Wait for at least one changed subtopic; return the current state of every changed one."""
        while not self._dirty:
            self._event.clear()
            await self._event.wait()
        names = list(self._dirty)
        self._dirty.clear()
        self._event.clear()
        states = self._bus.states
        return [StateUpdate(n, states[n]) for n in names if n in states]

    def close(self) -> None:
        """Stop receiving updates."""
        self._bus.unwatch(self)


class EventBus:
    """Holds the latest state per subtopic and notifies watchers and listeners."""

    def __init__(self) -> None:
        self.states: dict[str, JsonObject] = {}
        self._watchers: list[StateWatcher] = []
        self._listeners: list[Callable[[str, JsonObject], None]] = []

    def set_state(self, subtopic: str, payload: JsonObject) -> None:
        """Replace the retained state of ``subtopic``; watchers see it on their next batch."""
        if self.states.get(subtopic) == payload:
            return
        self.states[subtopic] = payload
        for watcher in self._watchers:
            watcher._mark(subtopic)
        for listener in self._listeners:
            listener(subtopic, payload)

    def clear_state(self, subtopic: str) -> None:
        """Forget a subtopic (an item removed by a reload)."""
        self.states.pop(subtopic, None)

    def watch(self) -> StateWatcher:
        """A new watcher that starts with every current state marked dirty."""
        watcher = StateWatcher(self)
        self._watchers.append(watcher)
        watcher.mark_all()
        return watcher

    def unwatch(self, watcher: StateWatcher) -> None:
        """Remove a watcher."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def listen(self, callback: Callable[[str, JsonObject], None]) -> Callable[[], None]:
        """Call ``callback`` synchronously on every change; returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)
