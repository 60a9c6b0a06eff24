"""The supervisor: one TaskGroup owns every task of the daemon (design.md rule 6).

Each service runs in a runner task ``dcud[<service>:main]`` inside the supervisor's TaskGroup; the
helpers it spawns live in a TaskGroup nested in that runner, so a failing helper fails its service,
never the daemon. A failed service restarts with backoff until its restart budget is spent, then the
supervisor raises ``ServiceFailed`` and the daemon exits 1 for systemd to restart it.

Live reload hands the supervisor a new list of services: a service whose ``config`` slice is equal to
the running one's keeps running untouched; changed ones are stopped gracefully and started anew.
*Fixed* services (the daemon's own workers: the reloader, the outbox overflow events) run for the
supervisor's whole life: a reload never touches them and they stop after every other service.

Services sleep through ``ctx.sleep``, which waits on the supervisor's :class:`~dcud.runtime.clock.Clock`
(a test hands in a ``ManualClock``); beats are stamped on the real monotonic clock, because the systemd
watchdog counts real seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from dcud.errors import ServiceFailed
from dcud.runtime.backoff import Backoff
from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.link import cancel_until_done
from dcud.runtime.sdnotify import Notifier, watchdog_interval_s

log = structlog.get_logger("dcud.supervisor")


class Service(Protocol):
    """What the supervisor runs. ``config`` is the service's own slice, compared on reload."""

    @property
    def name(self) -> str:
        """Unique service name, used in task names and logs."""
        ...

    @property
    def config(self) -> object:
        """The configuration slice this service was built from (compared with ``==`` on reload)."""
        ...

    async def run(self, ctx: ServiceContext) -> None:
        """Serve until ``ctx.stopping`` is set; call ``ctx.set_ready()`` once serving."""
        ...


@dataclass(frozen=True)
class SupervisorOptions:
    """Timing of the supervisor. ``liveness_s`` bounds the gap between two beats of a healthy service."""

    grace_s: float = 5.0
    liveness_s: float = 30.0
    restart_budget: int = 5
    restart_window_s: float = 300.0
    restart_initial_s: float = 0.5
    restart_max_s: float = 30.0


class ServiceContext:
    """What a running service sees of the supervisor."""

    def __init__(
        self, name: str, liveness_s: float, on_ready: Callable[[], None], clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.name = name
        self.liveness_s = liveness_s
        self.clock = clock
        """What :meth:`sleep` waits on (the service's own clock, as its builder gave it)."""
        self.stopping = asyncio.Event()
        self.log = structlog.get_logger(f"dcud.{name}").bind(service=name)
        self.ready = False
        self.last_beat_s = time.monotonic()
        self._on_ready = on_ready
        self._tg: asyncio.TaskGroup | None = None

    def set_ready(self) -> None:
        """Mark the service as serving; READY=1 goes out once every service has done so."""
        self.beat()
        if not self.ready:
            self.ready = True
            self._on_ready()

    def beat(self) -> None:
        """Tell the watchdog this service still makes progress."""
        self.last_beat_s = time.monotonic()

    def spawn(self, item: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a helper task named ``dcud[<service>:<item>]``; its failure fails the service."""
        if self._tg is None:
            coro.close()
            raise RuntimeError("spawn() is only valid while the service runs")
        return self._tg.create_task(coro, name=f"dcud[{self.name}:{item}]")

    async def sleep(self, delay_s: float) -> bool:
        """Sleep up to ``delay_s`` on the clock (beating); True when asked to stop meanwhile."""
        self.beat()
        stopping = await self.clock.wait(self.stopping, delay_s)
        self.beat()
        return stopping

    async def heartbeat_forever(self, period_s: float | None = None) -> None:
        """Beat periodically; for services whose work is purely event-driven."""
        period = period_s if period_s is not None else self.liveness_s / 3
        while not await self.sleep(period):
            pass


class Worker:
    """A coroutine of the daemon itself (not a feature) run as a fixed service: ``dcud[<name>:main]``.

    It is ready at once, beats while ``work`` runs (``work`` may wait for a long time on a queue) and
    cancels ``work`` when the service stops; ``work`` raising fails the service like any other.
    """

    def __init__(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        self._name = name
        self._work = work

    @property
    def name(self) -> str:
        """The service name."""
        return self._name

    @property
    def config(self) -> object:
        """Constant: a worker has no configuration slice."""
        return self._name

    async def run(self, ctx: ServiceContext) -> None:
        """Run ``work`` until it returns or the service stops."""

        async def work() -> None:
            await self._work()

        task = ctx.spawn("work", work())
        ctx.set_ready()
        while not task.done():
            # ctx.sleep beats; the wait ends early when asked to stop.
            if await ctx.sleep(ctx.liveness_s / 3):
                await cancel_until_done(task)
                break
            if task.done():
                break
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class _Running:
    service: Service
    ctx: ServiceContext
    task: asyncio.Task[None]
    restarts: deque[float] = field(default_factory=deque)


class Supervisor:
    """Runs services, restarts failed ones, drives READY/WATCHDOG/STATUS and graceful stop."""

    def __init__(
        self,
        services: Sequence[Service],
        notifier: Notifier | None = None,
        options: SupervisorOptions | None = None,
        *,
        fixed: Sequence[Service] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.options = options or SupervisorOptions()
        self.notifier = notifier or Notifier("")
        self.clock = clock
        """What ``ctx.sleep`` and the restart backoff wait on."""
        self._fixed = list(fixed)
        self._fixed_names = {s.name for s in fixed}
        self._initial = list(services)
        self._running: dict[str, _Running] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._failure: ServiceFailed | None = None
        self._ready_sent = False
        self.all_ready = asyncio.Event()
        self.started_s = time.monotonic()
        self.restart_counts: dict[str, int] = {}
        """Failures per service name (each followed by a restart or the stop), for the process's life."""

    # -- public control ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful stop (safe to call from a signal handler callback)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    def service_names(self) -> list[str]:
        """Names of the services currently supervised (the fixed workers are not listed)."""
        return [name for name in self._running if name not in self._fixed_names]

    async def replace(self, services: Sequence[Service]) -> list[str]:
        """Apply a new service list; returns the names that were (re)started or stopped."""
        changed: list[str] = []
        clash = self._fixed_names.intersection(s.name for s in services)
        if clash:
            raise ValueError(f"fixed services cannot be replaced: {sorted(clash)}")
        new_by_name = {s.name: s for s in services}
        for name in list(self._running):
            if name not in new_by_name and name not in self._fixed_names:
                await self._stop_one(name)
                changed.append(name)
        for service in services:
            current = self._running.get(service.name)
            if current is not None and current.service.config == service.config:
                continue
            if current is not None:
                await self._stop_one(service.name)
            self._start(service)
            changed.append(service.name)
        self._update_ready()
        return changed

    async def run(self) -> None:
        """Run until ``request_stop``; raises ServiceFailed when a service's budget is spent."""
        self.notifier.notify("STATUS=starting")
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for service in [*self._fixed, *self._initial]:
                    self._start(service)
                self._update_ready()
                watchdog = tg.create_task(self._watchdog(), name="dcud[supervisor:watchdog]")
                await self._stop.wait()
                watchdog.cancel()
                await self._stop_all()
        finally:
            self._tg = None
        if self._failure is not None:
            raise self._failure

    # -- internals -----------------------------------------------------------------------------

    def _start(self, service: Service, restarts: deque[float] | None = None) -> None:
        assert self._tg is not None, "supervisor is not running"
        ctx = ServiceContext(service.name, self.options.liveness_s, self._update_ready, self.clock)
        task = self._tg.create_task(self._runner(service, ctx), name=f"dcud[{service.name}:main]")
        self._running[service.name] = _Running(service, ctx, task, restarts or deque())

    async def _runner(self, service: Service, ctx: ServiceContext) -> None:
        backoff = Backoff(self.options.restart_initial_s, self.options.restart_max_s)
        while True:
            try:
                async with asyncio.TaskGroup() as tg:
                    ctx._tg = tg
                    await service.run(ctx)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a service failure must never take the daemon down directly
                if ctx.stopping.is_set():
                    ctx.log.warning("service failed while stopping", error=repr(exc))
                    return
                self.restart_counts[service.name] = self.restart_counts.get(service.name, 0) + 1
                entry = self._running.get(service.name)
                now = time.monotonic()
                if entry is not None:
                    entry.restarts.append(now)
                    while entry.restarts and now - entry.restarts[0] > self.options.restart_window_s:
                        entry.restarts.popleft()
                    spent = len(entry.restarts) > self.options.restart_budget
                else:
                    spent = False
                ctx.log.error("service failed", error=repr(exc), restarts=len(entry.restarts) if entry else 0)
                if spent:
                    self._failure = ServiceFailed(service.name, repr(exc))
                    self._stop.set()
                    return
                ctx.ready = False
                self._update_ready()
                if await ctx.sleep(backoff.next_delay_s()):
                    return
            finally:
                ctx._tg = None

    async def _stop_one(self, name: str) -> None:
        entry = self._running.pop(name, None)
        if entry is None:
            return
        entry.ctx.stopping.set()
        await self._await_or_cancel([entry.task])

    async def _stop_all(self) -> None:
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        # Features first, then the daemon's own workers (a reload in flight finishes or is cancelled
        # after the services it was swapping are gone).
        for fixed in (False, True):
            entries = [e for n, e in self._running.items() if (n in self._fixed_names) is fixed]
            for entry in entries:
                entry.ctx.stopping.set()
            await self._await_or_cancel([e.task for e in entries])
        self._running.clear()

    async def _await_or_cancel(self, tasks: list[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=self.options.grace_s)
        for task in pending:
            log.warning("grace period over, cancelling", task=task.get_name())
        if pending:
            # again and again until each has ended: a cancellation can be swallowed (cancel_until_done)
            await asyncio.gather(*(cancel_until_done(task) for task in pending))

    def _update_ready(self) -> None:
        waiting = [n for n, e in self._running.items() if not e.ctx.ready]
        count = len(self._running) - len(self._fixed_names.intersection(self._running))  # features only
        if not waiting:
            self.all_ready.set()
            if not self._ready_sent:
                self._ready_sent = True
                elapsed = time.monotonic() - self.started_s
                log.info("ready", services=count, startup_s=round(elapsed, 3))
                self.notifier.notify("READY=1", f"STATUS=ready: {count} services")
            else:
                self.notifier.notify(f"STATUS=ready: {count} services")
        elif waiting:
            self.all_ready.clear()
            self.notifier.notify(f"STATUS=waiting for {', '.join(sorted(waiting))}")

    def stalled_services(self) -> list[str]:
        """Services whose last beat is older than the liveness bound."""
        now = time.monotonic()
        return [n for n, e in self._running.items() if now - e.ctx.last_beat_s > self.options.liveness_s]

    async def _watchdog(self) -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        stalled_before: list[str] = []
        while True:
            await asyncio.sleep(interval)
            stalled = self.stalled_services()
            if stalled:
                if stalled != stalled_before:
                    log.error("services make no progress; withholding watchdog ping", services=stalled)
                self.notifier.notify(f"STATUS=stalled: {', '.join(stalled)}")
            else:
                self.notifier.notify("WATCHDOG=1")
            stalled_before = stalled
