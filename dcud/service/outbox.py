"""Crash-safe outbox: every reading and event is committed to SQLite before anyone acknowledges it.

Storage
    One SQLite database in WAL mode under ``state_dir`` with ``synchronous=FULL`` (in WAL mode anything
    less can lose the last commits on a power cut) and ``locking_mode=EXCLUSIVE`` (a second dcud on the
    same file fails with :class:`OutboxInUse` instead of corrupting the sequence; live inspection with the
    ``sqlite3`` tool is therefore not possible while dcud runs).

Threading
    One writer thread owns the connection; the event loop never does SQLite I/O. Requests reach the
    thread through a queue; the thread handles everything pending as one batch:

    1. write phase, one transaction: puts (group commit: one fsync covers every pending put), acks, the
       consumer cursors that moved, garbage collection, age expiry, overflow drops, counters;
    2. ``COMMIT``; only now do puts and acks resolve;
    3. read phase: takes read committed rows only, so no consumer is ever handed an uncommitted item.

    Results go back with one ``loop.call_soon_threadsafe`` per batch. This module is the event-loop
    side; the thread, the SQL and the schema are :mod:`dcud.service.outbox_writer`, the shared types
    :mod:`dcud.service.outbox_types` (all re-exported here: import from this module).

Backpressure
    At most ``max_pending_puts`` items may be submitted and not yet committed; beyond that ``put``
    awaits (FIFO) until the writer catches up. Takes, acks and nacks are not limited: each is awaited by
    its caller, so there are never more of them than there are awaiting tasks.

Delivery
    Every item gets ``seq`` (increasing, never reused: the table is ``AUTOINCREMENT``) and ``uid``
    (``<device_id>-<epoch>-<seq>``; ``epoch`` is random per database file, so a database that was moved
    aside and recreated never repeats an id a receiver has already seen). Each consumer has a durable
    cursor: every item with ``seq <= cursor`` is delivered for it. ``take`` hands out items after the
    cursor that are not already in flight, in ``seq`` order; ``ack`` marks them delivered and the cursor
    advances to the highest contiguous acked seq (acks above a gap are remembered in memory only, so
    after a crash those items are delivered again: at-least-once). ``nack`` and ``rewind`` give items
    back; they are taken again before newer items.

    A ``take`` with a ``kinds`` filter settles the items of other kinds it steps over for that consumer:
    a consumer that only delivers events must not hold readings back. A consumer should use the same
    filter on every take.

Consumers
    Only the consumers given to the constructor hold items back. Items are deleted (in batches) once every
    one of them passed them. A consumer seen for the first time starts at the oldest stored item.
    Consumers present in the database from an earlier configuration keep their cursor row (so re-adding
    one resumes where it stopped, minus anything deleted meanwhile) but hold nothing back. With no
    consumers at all nothing is deleted except by the limits.

Limits
    ``max_bytes`` bounds the logical size: payload, kind, subtopic and a fixed per-row overhead. The file
    can be larger by SQLite page slack and the WAL (capped by ``journal_size_limit`` after checkpoints).
    ``DROP_OLDEST`` deletes the oldest items to make room (counted as ``dropped["overflow"]``);
    ``REJECT_NEW`` raises :class:`OutboxFull` (counted as ``rejected``). An item larger than
    ``max_bytes`` is always rejected. ``max_age_s`` drops undelivered items from the head of the queue
    (counted as ``dropped["age"]``); items stamped while the wall clock was not set (before 2020, a box
    without RTC before NTP) are never dropped by age, and nothing is dropped by age while the clock is not
    set. Drop and reject counters are persisted: they count over the life of the database file.

    ``on_overflow`` is called in the event loop, once per transition: entering overflow (the first drop or
    reject), leaving it (the size fell below the high-water mark), crossing ``high_water_ratio`` upwards,
    and falling below ``clear_ratio``. It must not block; to raise an event, schedule a task.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dcud.service.outbox_types import (
    MAX_TAKE,
    ROW_OVERHEAD_BYTES,
    SCHEMA_VERSION,
    OutboxClosed,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    OutboxInUse,
    OutboxItem,
    OutboxLimits,
    OutboxSchemaTooNew,
    OutboxStats,
    OverflowPolicy,
    OverflowReport,
    plausible_wall_s,
)
from dcud.service.outbox_writer import (
    AckRequest,
    BatchDone,
    NackRequest,
    OutboxWriter,
    PutRequest,
    Request,
    StopRequest,
    SweepRequest,
    TakeRequest,
)

__all__ = [
    "MAX_TAKE",
    "ROW_OVERHEAD_BYTES",
    "SCHEMA_VERSION",
    "Outbox",
    "OutboxClosed",
    "OutboxCorrupt",
    "OutboxError",
    "OutboxFull",
    "OutboxInUse",
    "OutboxItem",
    "OutboxLimits",
    "OutboxSchemaTooNew",
    "OutboxStats",
    "OverflowPolicy",
    "OverflowReport",
]

log = logging.getLogger(__name__)


class _Credit:
    """FIFO counting limiter for pending puts; a request larger than the limit passes alone."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, n: int) -> bool:
        return self._used == 0 or self._used + n <= self._limit

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self._used += n
            return
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled() and entry[1].exception() is None:
                self.release(n)  # granted, then cancelled before we resumed
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self._used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, fut = self._waiters.popleft()
            if not fut.done():
                self._used += n
                fut.set_result(None)

    def fail_waiters(self, exc: BaseException) -> None:
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)


# ---------------------------------------------------------------------------------------------- Outbox


class Outbox:
    """Durable, bounded, multi-consumer queue of readings and events (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        limits: OutboxLimits,
        consumers: Sequence[str],
        device_id: str,
        on_overflow: Callable[[OverflowReport], None] | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        max_pending_puts: int = 10_000,
        maintenance_interval_s: float = 60.0,
    ) -> None:
        if not device_id:
            raise ValueError("device_id must not be empty")
        names = list(consumers)
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"consumer names must be unique non-empty strings, got {names!r}")
        if max_pending_puts < 1:
            raise ValueError("max_pending_puts must be at least 1")
        if maintenance_interval_s <= 0:
            raise ValueError("maintenance_interval_s must be positive")
        self.path = Path(path)
        self.limits = limits
        self.consumers: tuple[str, ...] = tuple(names)
        self.device_id = device_id
        self._on_overflow = on_overflow
        self._wall_clock = wall_clock
        self._maintenance_interval_s = maintenance_interval_s
        self._credit = _Credit(max_pending_puts)
        self._events = {n: asyncio.Event() for n in names}
        self._q: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._state = "new"  # new -> opening -> open -> closing -> closed
        self._broken: OutboxError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._writer: OutboxWriter | None = None
        self._snapshot = OutboxStats(
            depth=0,
            items=0,
            size_bytes=0,
            max_bytes=limits.max_bytes,
            oldest_age_s=0.0,
            backlog=dict.fromkeys(names, 0),
            in_flight=dict.fromkeys(names, 0),
            dropped={"overflow": 0, "age": 0},
            rejected=0,
            high_water=False,
            overflow=False,
            commits=0,
        )
        self._oldest_created_s: float | None = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open or create the database and start the writer thread.

        Raises :class:`OutboxCorrupt` (not a readable outbox database; nothing deleted),
        :class:`OutboxSchemaTooNew`, :class:`OutboxInUse` or :class:`OutboxError`. An Outbox whose open
        failed cannot be opened again; build a new one.
        """
        if self._state != "new":
            raise OutboxClosed(self.path, f"open() called in state {self._state}")
        self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._state = "opening"
        writer = OutboxWriter(
            self.path,
            self.limits,
            self.consumers,
            self.device_id,
            wall_clock=self._wall_clock,
            maintenance_interval_s=self._maintenance_interval_s,
            requests=self._q,
            loop=self._loop,
            on_batch_done=self._on_batch_done,
        )
        self._writer = writer
        self._thread = writer.start(fut)
        try:
            await fut
        except BaseException:
            self._state = "closed"
            self._q.put(StopRequest(None))  # ends the thread if the failure was our cancellation
            raise
        self._state = "open"
        for event in self._events.values():
            event.set()  # whatever is stored from an earlier run is takeable

    async def close(self) -> None:
        """Commit what is pending (puts, acks, cursors), checkpoint, and stop the writer thread.

        Puts submitted before close are committed; puts waiting for queue space and later calls raise
        :class:`OutboxClosed`. Idempotent.
        """
        if self._state != "open":
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        self._credit.fail_waiters(OutboxClosed(self.path, "closing"))
        assert self._loop is not None and self._thread is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._q.put(StopRequest(fut))
        try:
            await fut
        finally:
            self._state = "closed"
            if fut.done():  # the thread posted its last result and is returning: joining is immediate
                self._thread.join(timeout=5.0)
            for event in self._events.values():
                event.set()  # waiters wake and see OutboxClosed

    async def put(self, kind: str, subtopic: str, payload: bytes) -> OutboxItem:
        """Store one item; returns only after it is committed (fsynced).

        Awaits while ``max_pending_puts`` items are already queued (backpressure). Raises
        :class:`OutboxFull` when full under ``REJECT_NEW`` (or the item is larger than ``max_bytes``).
        If the caller is cancelled after submitting, the item may still be committed.
        """
        items = await self.put_many(((kind, subtopic, payload),))
        return items[0]

    async def put_many(
        self, items: Sequence[tuple[str, str, bytes]], *, marks: Mapping[str, str] | None = None
    ) -> list[OutboxItem]:
        """Store several items in one transaction with consecutive seqs; all or none are stored.

        ``marks`` (key -> text) are stored in the same transaction and read back with :meth:`mark`: a
        producer records how far it got (the DLMS load-profile cursor) atomically with the items, so a
        crash can neither lose those items nor make the producer send them again.
        """
        marked = tuple((str(key), str(value)) for key, value in (marks or {}).items())
        rows: list[tuple[str, str, bytes, int]] = []
        for kind, subtopic, payload in items:
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"kind must be a non-empty string, got {kind!r}")
            if not isinstance(subtopic, str):
                raise ValueError(f"subtopic must be a string, got {subtopic!r}")
            data = payload if type(payload) is bytes else bytes(payload)
            size = len(data) + len(kind.encode()) + len(subtopic.encode()) + ROW_OVERHEAD_BYTES
            rows.append((kind, subtopic, data, size))
        if not rows:
            return []
        self._check_open()
        await self._credit.acquire(len(rows))
        try:
            self._check_open()
        except OutboxError:
            self._credit.release(len(rows))
            raise
        result: list[OutboxItem] = await self._submit(PutRequest(None, rows, marked))
        return result

    def mark(self, key: str) -> str | None:
        """The last committed value of a producer mark (see :meth:`put_many`), or None."""
        return None if self._writer is None else self._writer.marks.get(key)

    async def take(self, consumer: str, limit: int, kinds: frozenset[str] | None = None) -> list[OutboxItem]:
        """Up to ``limit`` committed items for ``consumer`` in seq order; [] when there is nothing.

        Given-back items come first, then items after everything handed out so far. Items of kinds not in
        ``kinds`` are settled for this consumer as the take steps over them. A take cancelled while it
        waits for the writer hands nothing out: whatever it would have returned is given back.
        """
        self._check_consumer(consumer)
        if not 1 <= limit <= MAX_TAKE:
            raise ValueError(f"limit must be 1..{MAX_TAKE}, got {limit}")
        if kinds is not None and not kinds:
            raise ValueError("kinds must be None (all) or non-empty: an empty filter would settle everything")
        self._check_open()
        result: list[OutboxItem] = await self._submit(
            TakeRequest(None, consumer, limit, None if kinds is None else frozenset(kinds))
        )
        return result

    async def ack(self, consumer: str, seqs: Iterable[int]) -> None:
        """Mark items delivered; returns once the advanced cursor (if it moved) is committed.

        Acks may come in any order; unknown or repeated seqs are ignored.
        """
        await self._simple(AckRequest(None, self._check_consumer(consumer), [int(s) for s in seqs]))

    async def nack(self, consumer: str, seqs: Iterable[int]) -> None:
        """Give items back: they are taken again, in order, before newer items."""
        await self._simple(NackRequest(None, self._check_consumer(consumer), [int(s) for s in seqs]))

    async def rewind(self, consumer: str) -> None:
        """Give back every item the consumer has in flight (call when a consumer (re)starts its session)."""
        await self._simple(NackRequest(None, self._check_consumer(consumer), None))

    async def sweep(self) -> None:
        """Run garbage collection and age expiry now (the writer also does so periodically)."""
        await self._simple(SweepRequest(None))

    async def wait_for_items(self, consumer: str) -> None:
        """Return when something may be takeable for ``consumer`` (a put or nack since its last empty take).

        Wakeups can be spurious (a take may still return []). Raises :class:`OutboxClosed` on close.
        """
        self._check_consumer(consumer)
        self._check_open()
        await self._events[consumer].wait()
        self._check_open()

    def stats(self) -> OutboxStats:
        """The latest snapshot; ``oldest_age_s`` is computed against the wall clock now."""
        snap = self._snapshot
        created = self._oldest_created_s
        now = self._wall_clock()
        if created is None or not plausible_wall_s(created) or not plausible_wall_s(now):
            return snap
        return replace(snap, oldest_age_s=max(0.0, now - created))

    def _check_consumer(self, consumer: str) -> str:
        if consumer not in self._events:
            raise ValueError(f"unknown consumer {consumer!r}; registered: {', '.join(self.consumers)}")
        return consumer

    def _check_open(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._state != "open":
            raise OutboxClosed(self.path, "outbox is not open")

    async def _simple(self, req: Request) -> None:
        self._check_open()
        await self._submit(req)

    async def _submit(self, req: Request) -> Any:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        req.fut = fut
        self._q.put(req)
        return await fut

    def _on_batch_done(self, done: BatchDone) -> None:
        for fut, value, exc in done.results:
            if fut is None or fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
        for fut, consumer, seqs in done.taken:
            if fut is not None and fut.cancelled() and self._state == "open":
                # The taker was cancelled before its items arrived: nobody holds them, so they go back
                # (taken again first, in order) instead of waiting in flight for the next rewind.
                self._q.put(NackRequest(None, consumer, seqs))
        if done.put_rows:
            self._credit.release(done.put_rows)
        if done.snapshot is not None:
            self._snapshot = done.snapshot
            self._oldest_created_s = done.oldest_created_s
        if done.broken is not None and self._broken is None:
            self._broken = done.broken
            log.error("outbox broken: %s", done.broken)
            done.wake.update(self._events)
        for name in done.wake:
            self._events[name].set()
        for name in done.exhausted if self._broken is None else ():
            # Takes read after this batch's commit: one that came back short saw everything there is.
            self._events[name].clear()
        for report in done.reports:
            self._report(report)

    def _report(self, report: OverflowReport) -> None:
        what = "high water" if report.high_water else "overflow"
        log.warning(
            "outbox %s %s: %d of %d bytes, %d dropped, %d rejected",
            what,
            "entered" if report.active else "cleared",
            report.size_bytes,
            report.max_bytes,
            report.dropped_overflow,
            report.rejected,
        )
        if self._on_overflow is not None:
            try:
                self._on_overflow(report)
            except Exception:
                log.exception("outbox on_overflow callback failed")
