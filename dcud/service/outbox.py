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

    Results go back with one ``loop.call_soon_threadsafe`` per batch.

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
import contextlib
import heapq
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from dcud.errors import DcudError

__all__ = [
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

SCHEMA_VERSION: Final = 1
"""``PRAGMA user_version`` of the database layout this code writes."""

MAX_TAKE: Final = 10_000
"""Largest ``limit`` accepted by :meth:`Outbox.take` (bounds one read and its parameter list)."""

ROW_OVERHEAD_BYTES: Final = 64
"""Bytes charged per item on top of payload, kind and subtopic: uid, seq, timestamps, b-tree cell."""

_MIN_PLAUSIBLE_WALL_S: Final = 1_577_836_800.0  # 2020-01-01T00:00:00Z: earlier means the clock is not set
_GC_MIN_ITEMS: Final = 256  # delete delivered items in runs this long (or at maintenance, sweep, close)
_MAX_BATCH_REQUESTS: Final = 20_000  # requests per writer batch: bounds one transaction
_MAX_EXPIRE_PER_BATCH: Final = 100_000
_JOURNAL_SIZE_LIMIT_BYTES: Final = 8 * 1024 * 1024
_BUSY_TIMEOUT_S: Final = 2.0
_IN_CHUNK: Final = 500

_MARK_PREFIX: Final = "mark:"  # producer marks live in the meta table under this prefix
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26

_ITEM_COLUMNS: Final = "seq, uid, kind, subtopic, payload, created_s"


# --------------------------------------------------------------------------------------------- errors


class OutboxError(DcudError):
    """The outbox could not do what was asked; ``path`` is the database file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class OutboxFull(OutboxError):
    """``put`` refused: the outbox is full and the policy is ``REJECT_NEW``, or the item is too large."""


class OutboxCorrupt(OutboxError):
    """The file at ``path`` is not a readable outbox database. Nothing was deleted; the caller decides."""


class OutboxSchemaTooNew(OutboxError):
    """The database was written by a newer dcud (``found`` > ``supported``); it is left untouched."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        super().__init__(
            path, f"outbox schema version {found} is newer than this dcud supports ({supported}); refusing"
        )
        self.found = found
        self.supported = supported


class OutboxInUse(OutboxError):
    """Another process holds the database (a second dcud on the same ``state_dir``)."""


class OutboxClosed(OutboxError):
    """The outbox is not open (not yet opened, closing, or closed)."""


# ---------------------------------------------------------------------------------------- public data


class OverflowPolicy(StrEnum):
    """What ``put`` does when the outbox is full."""

    DROP_OLDEST = "drop_oldest"
    REJECT_NEW = "reject_new"


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One durable item, as handed out by :meth:`Outbox.take`."""

    seq: int
    """Delivery order; increasing, never reused within one database file."""
    uid: str
    """Stable id for receivers to dedupe: ``<device_id>-<epoch>-<seq>``, stored with the item."""
    kind: str
    subtopic: str
    payload: bytes
    created_s: float
    """Wall clock (``time.time()``) at put."""


@dataclass(frozen=True)
class OutboxLimits:
    """Size and age bounds and what happens when they are hit."""

    max_bytes: int = 64 * 1024 * 1024
    max_age_s: float = 30 * 86_400.0
    policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST
    high_water_ratio: float = 0.8
    clear_ratio: float = 0.7
    """The high-water alarm clears below this fraction of ``max_bytes`` (hysteresis)."""

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {self.max_age_s}")
        if not 0.0 < self.clear_ratio <= self.high_water_ratio <= 1.0:
            raise ValueError(
                "need 0 < clear_ratio <= high_water_ratio <= 1,"
                f" got {self.clear_ratio} and {self.high_water_ratio}"
            )


@dataclass(frozen=True, slots=True)
class OverflowReport:
    """A transition of the outbox's fill state, passed to ``on_overflow``."""

    high_water: bool
    """True: the "nearly full" mark (``high_water_ratio``); False: overflow (``outbox_full``)."""
    active: bool
    """True: the state was entered; False: it cleared."""
    policy: OverflowPolicy
    size_bytes: int
    max_bytes: int
    dropped_overflow: int
    """Items dropped to make room, over the life of the database."""
    rejected: int
    """Puts refused, over the life of the database."""


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A cheap snapshot of the outbox, refreshed by the writer after every batch."""

    depth: int
    """Items not yet delivered to every registered consumer."""
    items: int
    """Rows stored (``depth`` plus delivered items awaiting batched deletion)."""
    size_bytes: int
    max_bytes: int
    oldest_age_s: float
    """Age of the oldest undelivered item; 0.0 when there is none or the clock was not set."""
    backlog: Mapping[str, int]
    """Per registered consumer: items after its cursor, including those in flight."""
    in_flight: Mapping[str, int]
    """Per registered consumer: items taken and neither acked nor given back."""
    dropped: Mapping[str, int]
    """Items dropped undelivered, by reason (``overflow``, ``age``), over the life of the database."""
    rejected: int
    high_water: bool
    overflow: bool
    commits: int
    """Transactions committed since open (puts per commit shows how well group commit works)."""


# ------------------------------------------------------------------------------ writer-side internals


@dataclass(slots=True)
class _Req:
    fut: asyncio.Future[Any] | None


@dataclass(slots=True)
class _Put(_Req):
    rows: list[tuple[str, str, bytes, int]]  # kind, subtopic, payload, size_bytes
    marks: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class _Ack(_Req):
    consumer: str
    seqs: list[int]


@dataclass(slots=True)
class _Nack(_Req):
    consumer: str
    seqs: list[int] | None  # None: every item in flight (rewind)


@dataclass(slots=True)
class _Sweep(_Req):
    pass


@dataclass(slots=True)
class _Take(_Req):
    consumer: str
    limit: int
    kinds: frozenset[str] | None


@dataclass(slots=True)
class _Stop(_Req):
    pass


_Result = tuple["asyncio.Future[Any] | None", Any, BaseException | None]


@dataclass(slots=True)
class _Store:
    """Writer-thread state that mirrors the database; copied before a transaction, restored on rollback."""

    next_seq: int
    head_seq: int  # oldest stored seq; next_seq when empty
    head_created_s: float | None
    count: int
    size_bytes: int
    durable: dict[str, int]  # cursor rows as committed, registered consumers only
    dropped_overflow: int
    dropped_age: int
    rejected: int

    def copy(self) -> _Store:
        return replace(self, durable=dict(self.durable))


class _Consumer:
    """Delivery state of one consumer; lives in the writer thread."""

    __slots__ = ("heap", "name", "outstanding", "redo", "scan")

    def __init__(self, name: str, cursor: int) -> None:
        self.name = name
        self.scan = cursor  # every seq <= scan was handed out, settled, or does not exist
        self.outstanding: dict[int, str] = {}  # handed out, not acked: seq -> kind
        self.redo: set[int] = set()  # subset of outstanding given back (nack, rewind)
        self.heap: list[int] = []  # outstanding seqs, lazily pruned

    def cursor(self) -> int:
        """Highest seq below which everything is settled."""
        heap = self.heap
        while heap and heap[0] not in self.outstanding:
            heapq.heappop(heap)
        return heap[0] - 1 if heap else self.scan


@dataclass(slots=True)
class _BatchDone:
    results: list[_Result] = field(default_factory=list)
    put_rows: int = 0
    snapshot: OutboxStats | None = None
    oldest_created_s: float | None = None
    reports: list[OverflowReport] = field(default_factory=list)
    wake: set[str] = field(default_factory=set)
    exhausted: set[str] = field(default_factory=set)
    broken: OutboxError | None = None


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


def _row_item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(seq=row[0], uid=row[1], kind=row[2], subtopic=row[3], payload=row[4], created_s=row[5])


def _plausible(wall_s: float) -> bool:
    return wall_s >= _MIN_PLAUSIBLE_WALL_S


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry survive a power cut."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutboxError(directory, f"cannot sync directory: {exc}") from exc


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
        self._q: queue.SimpleQueue[_Req] = queue.SimpleQueue()
        self._state = "new"  # new -> opening -> open -> closing -> closed
        self._broken: OutboxError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
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
        # Writer-thread state (touched only by the writer thread after open()).
        self._conn: sqlite3.Connection | None = None
        self._store: _Store | None = None
        self._cons: dict[str, _Consumer] = {}
        self._uid_prefix = ""
        self._in_tx = False
        self._commits = 0
        self._hit_overflow = False
        self._new_items = False
        self._is_high = False
        self._is_over = False
        self._loop_gone = False
        self._writer_broken: OutboxError | None = None
        # Producer marks (put_many's ``marks``): committed ones, readable from the loop (plain dict
        # reads and one-key writes are atomic under the GIL), and those of the open transaction.
        self._marks: dict[str, str] = {}
        self._pending_marks: dict[str, str] = {}

    # ---------------------------------------------------------------------------- event-loop side

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
        self._thread = threading.Thread(
            target=self._writer_main, args=(fut,), name="dcud-outbox", daemon=True
        )
        self._thread.start()
        try:
            await fut
        except BaseException:
            self._state = "closed"
            self._q.put(_Stop(None))  # ends the thread if the failure was our cancellation
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
        self._q.put(_Stop(fut))
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
        result: list[OutboxItem] = await self._submit(_Put(None, rows, marked))
        return result

    def mark(self, key: str) -> str | None:
        """The last committed value of a producer mark (see :meth:`put_many`), or None."""
        return self._marks.get(key)

    async def take(self, consumer: str, limit: int, kinds: frozenset[str] | None = None) -> list[OutboxItem]:
        """Up to ``limit`` committed items for ``consumer`` in seq order; [] when there is nothing.

        Given-back items come first, then items after everything handed out so far. Items of kinds not in
        ``kinds`` are settled for this consumer as the take steps over them.
        """
        self._check_consumer(consumer)
        if not 1 <= limit <= MAX_TAKE:
            raise ValueError(f"limit must be 1..{MAX_TAKE}, got {limit}")
        if kinds is not None and not kinds:
            raise ValueError("kinds must be None (all) or non-empty: an empty filter would settle everything")
        self._check_open()
        result: list[OutboxItem] = await self._submit(
            _Take(None, consumer, limit, None if kinds is None else frozenset(kinds))
        )
        return result

    async def ack(self, consumer: str, seqs: Iterable[int]) -> None:
        """Mark items delivered; returns once the advanced cursor (if it moved) is committed.

        Acks may come in any order; unknown or repeated seqs are ignored.
        """
        await self._simple(_Ack(None, self._check_consumer(consumer), [int(s) for s in seqs]))

    async def nack(self, consumer: str, seqs: Iterable[int]) -> None:
        """Give items back: they are taken again, in order, before newer items."""
        await self._simple(_Nack(None, self._check_consumer(consumer), [int(s) for s in seqs]))

    async def rewind(self, consumer: str) -> None:
        """Give back every item the consumer has in flight (call when a consumer (re)starts its session)."""
        await self._simple(_Nack(None, self._check_consumer(consumer), None))

    async def sweep(self) -> None:
        """Run garbage collection and age expiry now (the writer also does so periodically)."""
        await self._simple(_Sweep(None))

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
        if created is None or not _plausible(created) or not _plausible(now):
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

    async def _simple(self, req: _Req) -> None:
        self._check_open()
        await self._submit(req)

    async def _submit(self, req: _Req) -> Any:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        req.fut = fut
        self._q.put(req)
        return await fut

    def _on_batch_done(self, done: _BatchDone) -> None:
        for fut, value, exc in done.results:
            if fut is None or fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
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

    # ----------------------------------------------------------------------------- writer thread

    def _post(self, done: _BatchDone) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._on_batch_done, done)
        except RuntimeError:  # the loop was closed without close(): nobody is left to answer
            self._loop_gone = True

    def _writer_main(self, open_fut: asyncio.Future[None]) -> None:
        try:
            self._db_open()
            reports = self._pressure()
        except BaseException as exc:
            err = exc if isinstance(exc, OutboxError) else OutboxError(self.path, f"cannot open: {exc!r}")
            self._close_conn()
            self._post(_BatchDone(results=[(open_fut, None, err)]))
            return
        done = _BatchDone(results=[(open_fut, None, None)], reports=reports)
        self._fill_snapshot(done)
        self._post(done)
        try:
            self._serve()
        finally:
            self._close_conn()

    def _serve(self) -> None:
        next_maintenance = time.monotonic() + self._maintenance_interval_s
        while not self._loop_gone:
            batch: list[_Req] = []
            with contextlib.suppress(queue.Empty):  # the timeout is the maintenance tick
                batch.append(self._q.get(timeout=max(0.0, next_maintenance - time.monotonic())))
            while len(batch) < _MAX_BATCH_REQUESTS:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            maintain = time.monotonic() >= next_maintenance
            if maintain:
                next_maintenance = time.monotonic() + self._maintenance_interval_s
            if self._writer_broken is not None:
                if self._fail_batch(batch, self._writer_broken):
                    return
                continue
            try:
                if self._handle(batch, maintain):
                    return
            except Exception as exc:  # a bug: answer this batch and every later request with an error
                log.exception("outbox writer failed")
                self._rollback()
                self._writer_broken = OutboxError(self.path, f"outbox writer failed: {exc!r}")
                if self._fail_batch(batch, self._writer_broken):
                    return

    def _fail_batch(self, batch: list[_Req], err: OutboxError) -> bool:
        done = _BatchDone(broken=err)
        stop = False
        for req in batch:
            if isinstance(req, _Put):
                done.put_rows += len(req.rows)
            if isinstance(req, _Stop):
                stop = True
                done.results.append((req.fut, None, None))
            else:
                done.results.append((req.fut, None, err))
        self._post(done)
        return stop

    def _handle(self, batch: list[_Req], maintain: bool) -> bool:
        """Process one batch; returns True when the writer must stop."""
        conn, store = self._conn, self._store
        assert conn is not None and store is not None
        done = _BatchDone()
        writes = [r for r in batch if not isinstance(r, _Take | _Stop)]
        takes = [r for r in batch if isinstance(r, _Take)]
        stop = next((r for r in batch if isinstance(r, _Stop)), None)
        done.put_rows = sum(len(r.rows) for r in writes if isinstance(r, _Put))

        if writes or maintain or stop is not None:
            saved = store.copy()
            self._in_tx = False
            self._hit_overflow = False
            self._new_items = False
            results: list[_Result] = []
            try:
                force = maintain or stop is not None
                for req in writes:
                    results.append(self._apply(req, done))
                    force = force or isinstance(req, _Sweep)
                self._flush_cursors()
                self._collect(force)
                self._persist_counters(saved)
                if self._in_tx:
                    conn.execute("COMMIT")
                    self._in_tx = False
                    self._commits += 1
                self._marks.update(self._pending_marks)
                self._pending_marks.clear()
            except sqlite3.Error as exc:
                err = self._map_error(exc)
                self._pending_marks.clear()
                self._rollback()
                self._store = store = saved
                self._new_items = self._hit_overflow = False
                results = [(r.fut, None, err) for r in writes]
                if isinstance(err, OutboxCorrupt):
                    self._writer_broken = done.broken = err
                log.error("outbox write failed: %s", err)
            done.results.extend(results)
            if self._new_items:
                done.wake.update(self._cons)

        for take in takes:
            try:
                items, exhausted = self._take(take)
            except sqlite3.Error as exc:
                done.results.append((take.fut, None, self._map_error(exc)))
                continue
            done.results.append((take.fut, items, None))
            if exhausted:
                done.exhausted.add(take.consumer)

        if self._writer_broken is None:
            done.reports = self._pressure()
        self._fill_snapshot(done)
        if stop is not None:
            self._finish()
            done.results.append((stop.fut, None, None))
            leftovers: list[_Req] = []
            while True:
                try:
                    leftovers.append(self._q.get_nowait())
                except queue.Empty:
                    break
            closed = OutboxClosed(self.path, "closed")
            done.results.extend((r.fut, None, closed) for r in leftovers)
            done.put_rows += sum(len(r.rows) for r in leftovers if isinstance(r, _Put))
        self._post(done)
        return stop is not None

    def _apply(self, req: _Req, done: _BatchDone) -> _Result:
        if isinstance(req, _Put):
            try:
                items = self._insert(req.rows)
                if req.marks:
                    assert self._conn is not None
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        [(_MARK_PREFIX + key, value) for key, value in req.marks],
                    )
                    self._pending_marks.update(req.marks)
                return (req.fut, items, None)
            except OutboxFull as exc:
                return (req.fut, None, exc)
        if isinstance(req, _Ack):
            cons = self._cons[req.consumer]
            for seq in req.seqs:
                if cons.outstanding.pop(seq, None) is not None:
                    cons.redo.discard(seq)
            return (req.fut, None, None)
        if isinstance(req, _Nack):
            cons = self._cons[req.consumer]
            before = len(cons.redo)
            if req.seqs is None:
                cons.redo.update(cons.outstanding)
            else:
                cons.redo.update(s for s in req.seqs if s in cons.outstanding)
            if len(cons.redo) != before:
                done.wake.add(req.consumer)
            return (req.fut, None, None)
        return (req.fut, None, None)  # _Sweep: the collect step of this batch is forced

    def _rollback(self) -> None:
        if self._in_tx and self._conn is not None:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back already
                self._conn.execute("ROLLBACK")
        self._in_tx = False

    def _tx(self) -> None:
        if not self._in_tx:
            assert self._conn is not None
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def _insert(self, rows: list[tuple[str, str, bytes, int]]) -> list[OutboxItem]:
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        need = sum(r[3] for r in rows)
        self._make_room(need, len(rows))
        self._tx()
        now = self._wall_clock()
        first = store.next_seq
        records = [
            (first + i, f"{self._uid_prefix}{first + i}", kind, subtopic, payload, now, size)
            for i, (kind, subtopic, payload, size) in enumerate(rows)
        ]
        conn.executemany(
            "INSERT INTO items (seq, uid, kind, subtopic, payload, created_s, size_bytes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            records,
        )
        store.next_seq = first + len(records)
        if store.count == 0:
            store.head_seq, store.head_created_s = first, now
        store.count += len(records)
        store.size_bytes += need
        self._new_items = True
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5]) for r in records]

    def _make_room(self, need_bytes: int, n_items: int) -> None:
        store, limits = self._store, self.limits
        assert store is not None
        if need_bytes > limits.max_bytes:
            store.rejected += n_items
            raise OutboxFull(self.path, f"{need_bytes} bytes do not fit in max_bytes={limits.max_bytes}")
        if store.size_bytes + need_bytes <= limits.max_bytes:
            return
        self._gc(force=True)  # delivered items go first, and are not counted as dropped
        if store.size_bytes + need_bytes <= limits.max_bytes:
            return
        self._hit_overflow = True
        if limits.policy is OverflowPolicy.REJECT_NEW:
            store.rejected += n_items
            raise OutboxFull(
                self.path, f"outbox full ({store.size_bytes} of {limits.max_bytes} bytes), policy reject_new"
            )
        n = self._delete_head(
            lambda _created, freed: freed >= store.size_bytes + need_bytes - limits.max_bytes
        )
        store.dropped_overflow += n

    def _delete_head(self, stop_before: Callable[[float, int], bool], max_items: int | None = None) -> int:
        """Delete the longest prefix of items, row by row, until ``stop_before(created_s, freed)``."""
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        freed = n = 0
        last = None
        cur = conn.execute("SELECT seq, created_s, size_bytes FROM items ORDER BY seq")
        try:
            for seq, created_s, size in cur:
                if stop_before(created_s, freed) or n == max_items:
                    break
                last, freed, n = seq, freed + size, n + 1
        finally:
            cur.close()
        if last is not None:
            self._tx()
            conn.execute("DELETE FROM items WHERE seq <= ?", (last,))
            store.count -= n
            store.size_bytes -= freed
            self._refresh_head()
        return n

    def _refresh_head(self) -> None:
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        row = conn.execute("SELECT seq, created_s FROM items ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            store.head_seq, store.head_created_s = store.next_seq, None
        else:
            store.head_seq, store.head_created_s = row

    def _floor(self) -> int:
        """Highest seq every registered consumer has durably passed (head - 1 when none are registered)."""
        store = self._store
        assert store is not None
        if not store.durable:
            return store.head_seq - 1
        return min(store.durable.values())

    def _gc(self, force: bool) -> None:
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        floor = self._floor()
        run = floor - store.head_seq + 1
        if run <= 0 or (run < _GC_MIN_ITEMS and not force):
            return
        self._tx()
        n, freed = conn.execute(
            "SELECT count(*), coalesce(sum(size_bytes), 0) FROM items WHERE seq <= ?", (floor,)
        ).fetchone()
        conn.execute("DELETE FROM items WHERE seq <= ?", (floor,))
        store.count -= n
        store.size_bytes -= freed
        self._refresh_head()

    def _collect(self, force: bool) -> None:
        store = self._store
        assert store is not None
        self._gc(force)
        now = self._wall_clock()
        if not _plausible(now) or store.head_created_s is None:
            return
        cutoff = now - self.limits.max_age_s
        if not _plausible(store.head_created_s) or store.head_created_s >= cutoff:
            return
        self._gc(force=True)
        store.dropped_age += self._delete_head(
            lambda created_s, _freed: created_s >= cutoff or not _plausible(created_s), _MAX_EXPIRE_PER_BATCH
        )

    def _flush_cursors(self) -> None:
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        for name, cons in self._cons.items():
            cursor = cons.cursor()
            if cursor != store.durable[name]:
                self._tx()
                conn.execute("UPDATE cursors SET acked_seq = ? WHERE consumer = ?", (cursor, name))
                store.durable[name] = cursor

    def _persist_counters(self, before: _Store) -> None:
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        for key in ("dropped_overflow", "dropped_age", "rejected"):
            value = getattr(store, key)
            if value != getattr(before, key):
                self._tx()
                conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _take(self, req: _Take) -> tuple[list[OutboxItem], bool]:
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        cons = self._cons[req.consumer]
        kinds = req.kinds
        out: list[OutboxItem] = []
        if cons.redo:
            wanted = sorted(s for s in cons.redo if kinds is None or cons.outstanding[s] in kinds)
            if len(wanted) > req.limit:
                wanted = wanted[: req.limit]
                more_redo = True
            else:
                more_redo = False
            found: dict[int, tuple[Any, ...]] = {}
            for i in range(0, len(wanted), _IN_CHUNK):  # SQLite before 3.32 allows 999 parameters
                chunk = wanted[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT {_ITEM_COLUMNS} FROM items WHERE seq IN ({marks})"
                found.update((row[0], row) for row in conn.execute(sql, chunk))
            for seq in wanted:
                cons.redo.discard(seq)
                row = found.get(seq)
                if row is None:  # dropped meanwhile (overflow or age): nothing left to deliver
                    del cons.outstanding[seq]
                else:
                    out.append(_row_item(row))
            if more_redo:
                return out, False
        remaining = req.limit - len(out)
        tail = store.next_seq - 1
        if remaining == 0:
            return out, False
        if cons.scan >= tail:
            return out, True
        if kinds is None:
            sql = f"SELECT {_ITEM_COLUMNS} FROM items WHERE seq > ? ORDER BY seq LIMIT ?"
            params: list[Any] = [cons.scan, remaining]
        else:
            marks = ",".join("?" * len(kinds))
            sql = (
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE seq > ? AND kind IN ({marks}) ORDER BY seq LIMIT ?"
            )
            params = [cons.scan, *sorted(kinds), remaining]
        rows = conn.execute(sql, params).fetchall()
        for row in rows:
            out.append(_row_item(row))
            cons.outstanding[row[0]] = row[2]
            heapq.heappush(cons.heap, row[0])
        if len(rows) == remaining:
            cons.scan = rows[-1][0]
            return out, False
        cons.scan = tail  # everything up to the tail was seen: the rest is settled (other kinds)
        return out, True

    def _pressure(self) -> list[OverflowReport]:
        store, limits = self._store, self.limits
        assert store is not None
        size = store.size_bytes
        high_bytes = limits.high_water_ratio * limits.max_bytes
        reports: list[OverflowReport] = []

        def report(high_water: bool, active: bool) -> None:
            reports.append(
                OverflowReport(
                    high_water=high_water,
                    active=active,
                    policy=limits.policy,
                    size_bytes=size,
                    max_bytes=limits.max_bytes,
                    dropped_overflow=store.dropped_overflow,
                    rejected=store.rejected,
                )
            )

        if not self._is_high and size >= high_bytes:
            self._is_high = True
            report(True, True)
        if self._hit_overflow and not self._is_over:
            self._is_over = True
            report(False, True)
        elif self._is_over and not self._hit_overflow and size < high_bytes:
            self._is_over = False
            report(False, False)
        if self._is_high and size < limits.clear_ratio * limits.max_bytes:
            self._is_high = False
            report(True, False)
        self._hit_overflow = False
        return reports

    def _fill_snapshot(self, done: _BatchDone) -> None:
        store, conn = self._store, self._conn
        assert store is not None and conn is not None
        tail = store.next_seq - 1
        backlog: dict[str, int] = {}
        in_flight: dict[str, int] = {}
        floor = tail
        for name, cons in self._cons.items():
            cursor = max(cons.cursor(), store.head_seq - 1)
            floor = min(floor, cursor)
            backlog[name] = max(0, tail - cursor)
            in_flight[name] = len(cons.outstanding) - len(cons.redo)
        if not self._cons:
            floor = store.head_seq - 1
        oldest: float | None = None
        if floor < tail:
            try:
                row = conn.execute(
                    "SELECT created_s FROM items WHERE seq > ? ORDER BY seq LIMIT 1", (floor,)
                ).fetchone()
            except sqlite3.Error:
                row = None
            oldest = None if row is None else row[0]
        done.oldest_created_s = oldest
        done.snapshot = OutboxStats(
            depth=max(0, tail - floor),
            items=store.count,
            size_bytes=store.size_bytes,
            max_bytes=self.limits.max_bytes,
            oldest_age_s=0.0,
            backlog=backlog,
            in_flight=in_flight,
            dropped={"overflow": store.dropped_overflow, "age": store.dropped_age},
            rejected=store.rejected,
            high_water=self._is_high,
            overflow=self._is_over,
            commits=self._commits,
        )

    def _finish(self) -> None:
        """Last act of close(): cursors and collection were committed by this batch; checkpoint."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # the data is safe in the WAL; the next open replays it
            log.warning("outbox checkpoint at close failed: %s", exc)
        self._close_conn()

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                log.warning("outbox close failed: %s", exc)
            self._conn = None

    def _map_error(self, exc: sqlite3.Error) -> OutboxError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        text = str(exc)
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "not a database" in text or "malformed" in text:
            return OutboxCorrupt(self.path, f"not a readable outbox database: {text}")
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return OutboxInUse(self.path, f"database is in use by another process: {text}")
        return OutboxError(self.path, f"sqlite: {text}")

    # ----------------------------------------------------------------------------- open + schema

    def _db_open(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(path, f"cannot create directory: {exc}") from exc
        if path.exists() and not path.is_file():
            raise OutboxCorrupt(path, "not a regular file")
        created = not path.exists()
        try:
            self._conn = conn = sqlite3.connect(
                str(path), timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True
            )
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # before WAL: no shared-memory index at all
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(path, f"cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT_BYTES}")
            conn.execute("BEGIN EXCLUSIVE")  # takes the lock now and keeps it (exclusive locking mode)
            self._in_tx = True
            self._migrate(conn)
            conn.execute("COMMIT")
            self._in_tx = False
            check = conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise OutboxCorrupt(
                    path, f"integrity check failed: {'; '.join(str(r[0]) for r in check[:5])}"
                )
            self._load()
        except sqlite3.Error as exc:
            raise self._map_error(exc) from exc
        if created:
            _fsync_dir(path.parent)  # SQLite syncs the directory for a new WAL, not for the database file

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxSchemaTooNew(self.path, version, SCHEMA_VERSION)
        if version == 0:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if tables:
                raise OutboxCorrupt(self.path, f"not an outbox database (tables: {', '.join(tables)})")
        for step in range(version, SCHEMA_VERSION):
            _MIGRATIONS[step](conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _load(self) -> None:
        conn = self._conn
        assert conn is not None
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        cursors = dict(conn.execute("SELECT consumer, acked_seq FROM cursors").fetchall())
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        max_item = conn.execute("SELECT max(seq) FROM items").fetchone()[0]
        last = max(row[0] if row else 0, max_item or 0, *cursors.values(), 0)
        count, size = conn.execute("SELECT count(*), coalesce(sum(size_bytes), 0) FROM items").fetchone()
        self._uid_prefix = f"{self.device_id}-{meta['epoch']}-"
        self._marks = {
            str(key)[len(_MARK_PREFIX) :]: str(value)
            for key, value in meta.items()
            if str(key).startswith(_MARK_PREFIX)
        }
        self._store = store = _Store(
            next_seq=last + 1,
            head_seq=last + 1,
            head_created_s=None,
            count=count,
            size_bytes=size,
            durable={},
            dropped_overflow=int(meta["dropped_overflow"]),
            dropped_age=int(meta["dropped_age"]),
            rejected=int(meta["rejected"]),
        )
        self._refresh_head()
        new = [name for name in self.consumers if name not in cursors]
        if new:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO cursors (consumer, acked_seq) VALUES (?, ?)",
                [(name, store.head_seq - 1) for name in new],
            )
            conn.execute("COMMIT")
            cursors.update(dict.fromkeys(new, store.head_seq - 1))
        for name in self.consumers:
            store.durable[name] = cursors[name]
            self._cons[name] = _Consumer(name, cursors[name])
        log.info(
            "outbox open: %s, %d items, %d bytes, consumers %s",
            self.path,
            count,
            size,
            ", ".join(f"{n}@{cursors[n]}" for n in self.consumers),
        )


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE items ("
        " seq INTEGER PRIMARY KEY AUTOINCREMENT,"  # AUTOINCREMENT: a seq is never reused, even when empty
        " uid TEXT NOT NULL,"
        " kind TEXT NOT NULL,"
        " subtopic TEXT NOT NULL,"
        " payload BLOB NOT NULL,"
        " created_s REAL NOT NULL,"
        " size_bytes INTEGER NOT NULL)"
    )
    conn.execute("CREATE TABLE cursors (consumer TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL) WITHOUT ROWID")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("epoch", secrets.token_hex(4)), ("dropped_overflow", 0), ("dropped_age", 0), ("rejected", 0)],
    )


_MIGRATIONS: Final[dict[int, Callable[[sqlite3.Connection], None]]] = {0: _migrate_0_to_1}
"""Step ``n`` upgrades a database from ``user_version`` n to n + 1, inside the open transaction."""
