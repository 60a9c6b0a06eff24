"""One clock for the services: monotonic and wall time, sleeping and waiting with a deadline.

Services are given a :class:`Clock` by their builder (``Runtime.clock``) instead of reading
``time.monotonic``, ``time.time`` or ``loop.time()`` themselves, and wait through it, so that a test can
hand them a :class:`ManualClock` and move time on instead of sleeping. The supervisor's
``ServiceContext.sleep`` waits on the same clock (``Supervisor(clock=...)``), beating before and after.

What stays on the real clock, deliberately:

- the supervisor's liveness bookkeeping (``last_beat_s``) and the systemd watchdog ping: systemd counts
  real seconds, so a stalled service must show in real time whatever clock it sleeps on;
- I/O bounds (``asyncio.timeout`` around a connect, a read from a peer): a real peer answers in real
  time;
- the bridge session (docs/bridge.md): its sans-I/O machine takes ``now`` from ``time.monotonic`` (the
  line model ages on it on the hot path on purpose); its tests pass ``now`` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Time as services see it (seconds, floats)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and deadlines)."""
        ...

    def time(self) -> float:
        """Wall-clock Unix time in seconds (for timestamps and calendar schedules)."""
        ...

    async def sleep(self, delay_s: float) -> None:
        """Return once ``delay_s`` seconds passed on this clock (at once for ``delay_s <= 0``)."""
        ...

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        """Wait for ``event`` at most ``timeout_s`` on this clock; True when it is set."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and the event loop's timers."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def time(self) -> float:
        """``time.time()``."""
        return time.time()

    async def sleep(self, delay_s: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(max(0.0, delay_s))

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        """``event.wait()`` bounded by ``asyncio.timeout``."""
        if event.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await event.wait()
        return event.is_set()


SYSTEM_CLOCK = SystemClock()
"""The process's real clock (stateless; one instance is enough)."""


class _Sleeper:
    """One wait parked on a :class:`ManualClock`: what to call when its deadline comes."""

    __slots__ = ("deadline_s", "done", "wake")

    def __init__(self, deadline_s: float, wake: Callable[[], None]) -> None:
        self.deadline_s = deadline_s
        self.wake = wake
        self.done = False


class ManualClock:
    """A clock that moves only when a test calls :meth:`advance`; sleepers wake in deadline order.

    Monotonic and wall time move together. :meth:`sleepers` and :meth:`wait_for_sleepers` tell a test
    when the code under test is parked on this clock, so it can advance without guessing.
    """

    def __init__(self, monotonic_s: float = 1000.0, wall_s: float = 1_800_000_000.0) -> None:
        self._monotonic_s = monotonic_s
        self._offset_s = wall_s - monotonic_s
        self._heap: list[tuple[float, int, _Sleeper]] = []
        self._order = itertools.count()
        self._parked = asyncio.Event()

    def monotonic(self) -> float:
        """The manual monotonic time."""
        return self._monotonic_s

    def time(self) -> float:
        """The manual wall time (moves with :meth:`monotonic`)."""
        return self._monotonic_s + self._offset_s

    def set_wall(self, wall_s: float) -> None:
        """Step the wall clock (as NTP may) without moving monotonic time or waking anyone."""
        self._offset_s = wall_s - self._monotonic_s

    def sleepers(self) -> int:
        """How many sleeps and waits are parked on this clock now."""
        return sum(1 for _, _, sleeper in self._heap if not sleeper.done)

    def next_deadline_s(self) -> float | None:
        """The earliest deadline parked on this clock (monotonic seconds), or None."""
        pending = [sleeper.deadline_s for _, _, sleeper in self._heap if not sleeper.done]
        return min(pending) if pending else None

    async def wait_for_sleepers(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Return once at least ``count`` waits are parked on the clock (bounded in real time)."""
        async with asyncio.timeout(timeout_s):
            while self.sleepers() < count:
                self._parked.clear()
                await self._parked.wait()

    def advance(self, delta_s: float) -> None:
        """Move time on by ``delta_s`` and wake every sleeper whose deadline has come."""
        if delta_s < 0:
            raise ValueError("a monotonic clock does not go back")
        self._monotonic_s += delta_s
        while self._heap and self._heap[0][0] <= self._monotonic_s:
            _, _, sleeper = heapq.heappop(self._heap)
            if not sleeper.done:
                sleeper.done = True
                sleeper.wake()

    def _park(self, delay_s: float, wake: Callable[[], None]) -> _Sleeper:
        sleeper = _Sleeper(self._monotonic_s + delay_s, wake)
        heapq.heappush(self._heap, (sleeper.deadline_s, next(self._order), sleeper))
        self._parked.set()
        return sleeper

    async def sleep(self, delay_s: float) -> None:
        """Park until :meth:`advance` reaches ``now + delay_s``."""
        if delay_s <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        sleeper = self._park(delay_s, wake)
        try:
            await future
        finally:
            sleeper.done = True  # a cancelled sleeper no longer counts as parked

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        """Wait for ``event`` or for ``timeout_s`` of manual time, whichever comes first."""
        if event.is_set():
            return True
        loop = asyncio.get_running_loop()
        sleeper: _Sleeper | None = None
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None) as scope:
                    # The deadline is the manual clock's: when it comes, the scope expires at once.
                    sleeper = self._park(max(0.0, timeout_s), lambda: scope.reschedule(loop.time()))
                    await event.wait()
        finally:
            if sleeper is not None:
                sleeper.done = True
        return event.is_set()
