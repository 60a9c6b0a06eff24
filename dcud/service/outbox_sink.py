"""The outbox consumer engine: one loop for every uplink that delivers from the outbox (design.md rule 8).

An uplink used to carry its own copy of "rewind, take, deliver, ack, give back, retry"; now it supplies a
:class:`Sink`, which has one method, and :class:`OutboxSink` does the rest::

    class UdpSink:
        async def deliver(self, items: Sequence[OutboxItem]) -> Collection[int]:
            ...                                   # hand the items to the peer, in order
            return [item.seq for item in items]   # the seqs now delivered

    engine = OutboxSink(outbox, SinkPolicy("udp-event", batch_items=64, retry_on=(OSError,)), Continuous())
    await engine.run(ctx, UdpSink())

The MQTT uplink (:mod:`dcud.service.mqtt`), the FTP and MQTT data push (:mod:`dcud.service.datapush`)
and the UDP event push (:mod:`dcud.service.eventpush`) all run on it. The rules, the same for each:

- **Rewind on (re)start**: whatever an earlier run had in flight is taken again first.
- **Take in seq order, bounded**: at most ``batch_items`` per attempt, of the ``kinds`` the consumer
  delivers. ``window_items`` bounds the items handed out at once: above ``batch_items``, attempts
  overlap (the MQTT uplink keeps its PUBACK window full while earlier batches are acked). An attempt
  may be bounded in time (``timeout_s``); with ``adaptive_batch`` a timed-out attempt halves the next
  batch and a success doubles it again, up to ``batch_items`` (a slow link still makes progress).
- **Ack what was delivered, give back the rest**: ``deliver`` returns the seqs it delivered; those are
  acked (concurrent acks share one commit), every other item of the batch goes back to the outbox and
  is taken again first, in order. :class:`PartialDelivery` says "these were delivered, then this
  failed"; an error in ``retry_on`` (or the attempt's timeout) means none was.
- **Retry per schedule**: a :class:`Schedule` says when the next attempt may start: :class:`Continuous`
  delivers whenever there is something and backs off (1 s doubling to 60 s, jittered) after a failure
  (the event push); the data push's :class:`~dcud.service.datapush.PushMachine` runs cycles on the
  WM-E periods with ``datapush_retry_delay``, ``datapush_max_retries`` and the ``datapush_interval``
  rest. An error outside ``retry_on`` is no delivery failure: it ends :meth:`OutboxSink.run` (the MQTT
  uplink's broker error ends its session, and the link kernel connects again).
- **Cancellation-safe, at least once**: items handed out and not acked go back, in order, however
  :meth:`OutboxSink.run` ends (stop, error, cancellation); a restart rewinds. An item is acked only
  after ``deliver`` said it was delivered.
- **Counted, logged once**: delivered items, last success, last error, a bounded attempt log and the
  batch size are kept here for the service's retained state document (``<p>/push/<target>/state``),
  which ``on_change`` publishes whenever they moved. A failure is logged on the first failed attempt,
  when its text changes and when the schedule starts a rest; a recovery once.

Time comes from a :class:`Timer` (Unix seconds, and the service context's beating sleep), so tests
drive the retry schedule with a :class:`~dcud.runtime.clock.ManualClock` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from dcud.errors import DcudError
from dcud.runtime.backoff import Backoff
from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.runtime.link import child_name, first_error, until_stopped
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.timefmt import rfc3339
from dcud.service.outbox import MAX_TAKE, Outbox, OutboxError, OutboxItem

__all__ = [
    "AttemptRecord",
    "ClockTimer",
    "Continuous",
    "OutboxSink",
    "PartialDelivery",
    "Schedule",
    "Sink",
    "SinkPolicy",
    "Timer",
    "describe_failure",
]

ATTEMPT_LOG_SIZE: Final = 256
"""Attempts kept in :attr:`OutboxSink.attempt_log`."""


class Sink(Protocol):
    """What an uplink that delivers from the outbox supplies."""

    async def deliver(self, items: Sequence[OutboxItem]) -> Collection[int]:
        """Deliver ``items`` (in seq order) and return the seqs that are now delivered.

        Seqs not returned are given back and taken again first. Raise :class:`PartialDelivery` when some
        were delivered before a failure, an error of the policy's ``retry_on`` when none was; any other
        error ends the engine's run. The uplink keeps its own connection or session (the link kernel's,
        or one opened on first use and closed by the ``close`` callback of :meth:`OutboxSink.run`).
        """
        ...


class PartialDelivery(DcudError):
    """``deliver`` delivered ``delivered`` (seqs), then failed with ``cause``: the rest goes back."""

    def __init__(self, delivered: Iterable[int], cause: BaseException) -> None:
        super().__init__(str(cause))
        self.delivered = tuple(delivered)
        self.cause = cause


class Schedule(Protocol):
    """When the next attempt may start (pure: it is told the time, and what became of each attempt)."""

    wake_at: float
    """When :meth:`poll` becomes true next (the timer's seconds)."""

    @property
    def phase(self) -> str:
        """A word for logs and state documents (``waiting``, ``retry_wait``, ``resting``...)."""
        ...

    @property
    def resting(self) -> bool:
        """The retries are spent and the schedule rests (a failure entering it is logged as an error)."""
        ...

    @property
    def waits_for_items(self) -> bool:
        """True: an attempt needs items (wait for the outbox); False: a due attempt runs on an empty
        outbox too (a push cycle with nothing to push)."""
        ...

    @property
    def overlapping(self) -> bool:
        """Whether attempts may overlap (``window_items`` above ``batch_items``)."""
        ...

    def poll(self, now_s: float) -> bool:
        """Advance to ``now_s``; True when an attempt is due."""
        ...

    def begin(self, now_s: float) -> int:
        """An attempt starts; returns its number within the current round of retries (1: first try)."""
        ...

    def succeeded(self, now_s: float, more: bool) -> None:
        """The attempt delivered its batch; ``more``: the batch was full (go on at once)."""
        ...

    def failed(self, now_s: float, error: str) -> None:
        """The attempt failed: schedule the retry (or a rest)."""
        ...


class Continuous:
    """Deliver whenever the outbox has something; after a failure wait (jittered backoff) and retry."""

    waits_for_items = True
    overlapping = True
    resting = False

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0, *, jitter: float = 0.5) -> None:
        self.backoff = Backoff(initial_s=initial_s, max_s=max_s, jitter=jitter)
        self.wake_at = -math.inf
        self.failures = 0
        """Failed attempts since the last success."""
        self._last_now: float | None = None

    @property
    def phase(self) -> str:
        """``retry_wait`` after a failure, else ``waiting`` (for items)."""
        return "retry_wait" if self.failures else "waiting"

    def poll(self, now_s: float) -> bool:
        """True unless a retry delay is running (a clock stepped back does not stretch it)."""
        if self._last_now is not None and now_s < self._last_now - 1.0:
            self.wake_at += now_s - self._last_now
        self._last_now = now_s
        return now_s >= self.wake_at

    def begin(self, now_s: float) -> int:
        """Attempt number: failures so far + 1."""
        self._last_now = now_s
        return self.failures + 1

    def succeeded(self, now_s: float, more: bool) -> None:
        """Back to delivering at once; the backoff starts from its first delay again."""
        self.failures = 0
        self.backoff.reset()
        self.wake_at = -math.inf

    def failed(self, now_s: float, error: str) -> None:
        """The next attempt after the next backoff delay."""
        self.failures += 1
        self.wake_at = now_s + self.backoff.next_delay_s()


class Timer(Protocol):
    """Where the engine gets "now" and how it waits (tests hand in virtual time)."""

    def now(self) -> float:
        """Unix seconds (the schedule's time and the state documents' stamps)."""
        ...

    async def sleep(self, ctx: ServiceContext, delay_s: float) -> bool:
        """Wait ``delay_s`` (beating); True when the service is asked to stop meanwhile."""
        ...


class ClockTimer:
    """A :class:`Timer` on a runtime :class:`~dcud.runtime.clock.Clock`; it sleeps with ``ctx.sleep``
    (the supervisor's clock: the same object in the daemon, a ManualClock in tests)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock

    def now(self) -> float:
        """The clock's wall time."""
        return self.clock.time()

    async def sleep(self, ctx: ServiceContext, delay_s: float) -> bool:
        """``ctx.sleep``: wakes at once on stop."""
        return await ctx.sleep(delay_s)


@dataclass(frozen=True)
class SinkPolicy:
    """What one consumer takes and how its attempts are bounded (module doc)."""

    consumer: str
    """The outbox consumer name (``mqtt``, ``ftp``, ``mqtt-push``, ``udp-event``)."""
    batch_items: int
    """Most items per attempt."""
    kinds: frozenset[str] | None = None
    """Outbox kinds this consumer delivers (None: all); the others are settled as it steps over them."""
    window_items: int | None = None
    """Most items handed out at once over overlapping attempts (None: ``batch_items``, one at a time)."""
    timeout_s: float | None = None
    """Bound of one attempt's ``deliver``; a timeout is a failed attempt."""
    adaptive_batch: bool = False
    """A timeout halves the next batch, a success doubles it up to ``batch_items``."""
    retry_on: tuple[type[BaseException], ...] = ()
    """Errors of ``deliver`` that are a failed attempt (retried per schedule); others end the run."""
    failed_message: str = "delivery failed"
    recovered_message: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.batch_items <= MAX_TAKE:
            raise ValueError(f"batch_items must be 1..{MAX_TAKE}, got {self.batch_items}")
        if self.window_items is not None and self.window_items < self.batch_items:
            raise ValueError(f"window_items ({self.window_items}) below batch_items ({self.batch_items})")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt as the engine saw it (for state documents and tests)."""

    started_s: float
    number: int
    """Attempt number within its round (1 = first try)."""
    outcome: str
    """``ok``, ``empty`` (nothing to deliver) or the error text."""
    items: int


def describe_failure(exc: BaseException, timeout_s: float | None = None) -> str:
    """Short text of a failed attempt: an attempt timeout says so, an OSError names its type."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"attempt timed out after {timeout_s:g} s" if timeout_s else "attempt timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, OSError) else text


class OutboxSink:
    """The consumer engine of one outbox consumer (module doc); it outlives runs (counters persist)."""

    def __init__(
        self,
        outbox: Outbox,
        policy: SinkPolicy,
        schedule: Schedule,
        *,
        timer: Timer | None = None,
        describe: Callable[[BaseException], str] | None = None,
        hold: Callable[[], bool] | None = None,
        on_change: Callable[[], None] | None = None,
        log_fields: Mapping[str, object] | None = None,
    ) -> None:
        self._outbox = outbox
        self.policy = policy
        self.schedule = schedule
        """May be replaced before :meth:`run` (the data push starts its cycle machine at run time)."""
        self._timer: Timer = timer or ClockTimer()
        self._describe = describe or (lambda exc: describe_failure(exc, policy.timeout_s))
        self._hold = hold
        """True while no attempt may start (the data push: mains power is lost); checked each second."""
        self._on_change = on_change
        self._log_fields = dict(log_fields or {})
        self.delivered_items = 0
        self.last_success_s: float | None = None
        self.last_error: dict[str, Any] | None = None
        """``{"ts", "message", "attempt"}`` of the last failed attempt (kept after a recovery)."""
        self.batch_items = policy.batch_items
        """The current batch bound (below ``policy.batch_items`` after timeouts when adaptive)."""
        self.attempt_log: deque[AttemptRecord] = deque(maxlen=ATTEMPT_LOG_SIZE)
        self.attempt_started_s: float | None = None
        """Start of the latest attempt (the data push names its files after it)."""
        self.failing = False
        self._logged = ""
        self._outstanding: dict[int, None] = {}  # seqs handed out and not yet acked or given back
        self._room = asyncio.Event()
        self._helpers: set[asyncio.Task[None]] = set()  # overlapping deliveries, the stop watcher

    @property
    def consumer(self) -> str:
        """The outbox consumer this engine delivers for."""
        return self.policy.consumer

    @property
    def window_items(self) -> int:
        """Most items handed out at once."""
        return self.policy.window_items or self.policy.batch_items

    def backlog(self) -> int:
        """Items after the consumer's cursor (in flight included), from the outbox's latest snapshot."""
        return self._outbox.stats().backlog.get(self.consumer, 0)

    def in_flight(self) -> int:
        """Items handed out and not yet acked or given back, from the outbox's latest snapshot."""
        return self._outbox.stats().in_flight.get(self.consumer, 0)

    # -- the loop ---------------------------------------------------------------------------------------

    async def run(
        self, ctx: ServiceContext, sink: Sink, *, close: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Deliver until ``ctx.stopping`` (or an error outside ``retry_on``); marks the service ready.

        ``close`` ends the uplink's session: after a failed attempt, once a backlog is delivered (a
        batch that was not full) and when the run ends.
        """
        if self.window_items > self.policy.batch_items and not self.schedule.overlapping:
            raise ValueError(f"{self.consumer}: this schedule does not allow overlapping attempts")
        await self._outbox.rewind(self.consumer)
        ctx.set_ready()
        self._changed()
        overlapping = self.window_items > self.policy.batch_items
        try:
            async with asyncio.TaskGroup() as tg:
                if overlapping:  # a stop wakes a wait for room (cheaper than racing every wait)
                    self._track(tg.create_task(self._wake_on_stop(ctx), name=child_name("stop")))
                while await self._due(ctx):
                    limit = min(self.batch_items, self.window_items - len(self._outstanding))
                    if limit <= 0:  # the window is full: wait for a delivery to settle
                        self._room.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(ctx.liveness_s / 3):
                                await self._room.wait()
                        ctx.beat()
                        continue
                    attempt = await self._next_attempt(ctx, limit)
                    if attempt is None:
                        continue
                    number, started, items = attempt
                    if overlapping:
                        self._track(
                            tg.create_task(
                                self._attempt(ctx, sink, close, number, started, items, limit),
                                name=child_name("deliver"),
                            )
                        )
                    else:
                        await self._attempt(ctx, sink, close, number, started, items, limit)
                for task in list(self._helpers):
                    task.cancel()  # stopping: whatever is still in flight goes back
        except BaseExceptionGroup as group:
            raise first_error(group) from group
        finally:
            await self._give_back()
            if close is not None:
                await close()
            self._changed()

    async def _due(self, ctx: ServiceContext) -> bool:
        """Wait until the schedule (and ``hold``) allow an attempt; False when stopping."""
        while not ctx.stopping.is_set():
            now = self._timer.now()
            if not self.schedule.poll(now):
                delay = min(max(0.0, self.schedule.wake_at - now), ctx.liveness_s / 3)
                if await self._timer.sleep(ctx, delay):
                    return False
                continue
            if self._hold is not None and self._hold():
                if await self._timer.sleep(ctx, 1.0):
                    return False
                continue
            return True
        return False

    def _track(self, task: asyncio.Task[None]) -> None:
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)

    async def _wake_on_stop(self, ctx: ServiceContext) -> None:
        await ctx.stopping.wait()
        self._room.set()

    async def _wait_for_items(self, ctx: ServiceContext) -> None:
        """Until the outbox may have items for us, a stop or a third of the liveness bound (then beat);
        OutboxClosed (the daemon is stopping) is raised."""
        with contextlib.suppress(TimeoutError):
            await until_stopped(
                ctx.stopping,
                self._outbox.wait_for_items(self.consumer),
                timeout_s=ctx.liveness_s / 3,
                name="wait",
            )
        ctx.beat()

    async def _take(self, limit: int) -> list[OutboxItem]:
        items = await self._outbox.take(self.consumer, limit, self.policy.kinds)
        self._outstanding.update(dict.fromkeys(item.seq for item in items))
        return items

    async def _next_attempt(
        self, ctx: ServiceContext, limit: int
    ) -> tuple[int, float, list[OutboxItem]] | None:
        """Begin an attempt and take its batch; None when there was nothing (after waiting for items)."""
        if self.schedule.waits_for_items:
            items = await self._take(limit)
            if not items:
                await self._wait_for_items(ctx)
                return None
            started = self._timer.now()
            number = self.schedule.begin(started)
        else:
            started = self._timer.now()
            number = self.schedule.begin(started)
            self._changed()
            # The take is outside the attempt's timeout: a take cut off half-way hands nothing out.
            items = await self._take(limit)
        self.attempt_started_s = started
        return number, started, items

    async def _attempt(
        self,
        ctx: ServiceContext,
        sink: Sink,
        close: Callable[[], Awaitable[None]] | None,
        number: int,
        started: float,
        items: list[OutboxItem],
        limit: int,
    ) -> None:
        seqs = [item.seq for item in items]
        error: BaseException | None = None
        delivered: set[int] = set()
        if items:
            try:
                delivered = set(await self._deliver(sink, items))
            except PartialDelivery as exc:
                delivered, error = set(exc.delivered), exc.cause
            except Exception as exc:
                timed_out = self.policy.timeout_s is not None and isinstance(exc, TimeoutError)
                if not (timed_out or isinstance(exc, self.policy.retry_on)):
                    raise  # not a delivery failure: the run ends, the batch goes back
                error = exc
        done = [seq for seq in seqs if seq in delivered]
        rest = [seq for seq in seqs if seq not in delivered]
        if done:
            await self._outbox.ack(self.consumer, done)
            self._settled(done)
            self.delivered_items += len(done)
        if rest:
            await self._outbox.nack(self.consumer, rest)
            self._settled(rest)
            if error is None:
                error = PartialDelivery(done, RuntimeError(f"{len(rest)} of {len(seqs)} items not delivered"))
        if error is None:
            await self._succeeded(ctx, close, number, started, items, limit)
        else:
            await self._failed(ctx, close, error, number, started, items, limit)
        self._changed()
        ctx.beat()

    async def _deliver(self, sink: Sink, items: list[OutboxItem]) -> Collection[int]:
        if self.policy.timeout_s is None:
            return await sink.deliver(items)
        async with asyncio.timeout(self.policy.timeout_s):
            return await sink.deliver(items)

    def _settled(self, seqs: list[int]) -> None:
        for seq in seqs:
            self._outstanding.pop(seq, None)
        self._room.set()

    async def _succeeded(
        self,
        ctx: ServiceContext,
        close: Callable[[], Awaitable[None]] | None,
        number: int,
        started: float,
        items: list[OutboxItem],
        limit: int,
    ) -> None:
        more = len(items) == limit
        if not more and close is not None:
            await close()  # the backlog is delivered: no idle session until the next attempt
        if self.policy.adaptive_batch:
            self.batch_items = min(self.policy.batch_items, limit * 2)
        now = self._timer.now()
        self.schedule.succeeded(now, more)
        if items:
            self.last_success_s = now
        self.attempt_log.append(AttemptRecord(started, number, "ok" if items else "empty", len(items)))
        if self.failing:
            self.failing = False
            self._logged = ""
            if self.policy.recovered_message:
                ctx.log.info(self.policy.recovered_message, **self._log_fields)

    async def _failed(
        self,
        ctx: ServiceContext,
        close: Callable[[], Awaitable[None]] | None,
        error: BaseException,
        number: int,
        started: float,
        items: list[OutboxItem],
        limit: int,
    ) -> None:
        cause = error.cause if isinstance(error, PartialDelivery) else error
        text = self._describe(cause)
        if close is not None:
            await close()  # a failed session is not reused
        if self.policy.adaptive_batch and isinstance(cause, TimeoutError):
            self.batch_items = max(1, limit // 2)
        now = self._timer.now()
        schedule = self.schedule
        schedule.failed(now, text)
        self.last_error = {"ts": rfc3339(now), "message": text, "attempt": number}
        self.attempt_log.append(AttemptRecord(started, number, text, len(items)))
        if not self.failing or schedule.resting or text != self._logged:
            level = ctx.log.error if schedule.resting else ctx.log.warning
            level(
                self.policy.failed_message,
                **self._log_fields,
                error=text,
                phase=str(schedule.phase),
                next_attempt=rfc3339(schedule.wake_at) if math.isfinite(schedule.wake_at) else None,
            )
            self._logged = text
        self.failing = True

    async def _give_back(self) -> None:
        """Items handed out and not settled go back, in order (whichever way the run ended)."""
        if not self._outstanding:
            return
        seqs = sorted(self._outstanding)
        self._outstanding.clear()
        with contextlib.suppress(OutboxError):  # closed or broken: the next open rewinds anyway
            await self._outbox.nack(self.consumer, seqs)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
