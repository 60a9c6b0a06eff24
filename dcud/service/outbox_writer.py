"""The outbox's writer thread: the one owner of the SQLite connection (see :mod:`dcud.service.outbox`).

The event-loop side (:class:`~dcud.service.outbox.Outbox`) puts requests on a queue; the thread takes
everything pending as one batch: the write phase in one transaction (puts with group commit, acks, cursor
moves, garbage collection, age expiry, overflow drops, counters), ``COMMIT``, then the read phase (takes
see committed rows only). Results go back in one :class:`BatchDone` per batch through
``loop.call_soon_threadsafe``. Schema creation and migrations live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from dcud.runtime.durable import fsync_dir
from dcud.service.outbox_types import (
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

__all__ = [
    "AckRequest",
    "BatchDone",
    "NackRequest",
    "OutboxWriter",
    "PutRequest",
    "Request",
    "Result",
    "StopRequest",
    "SweepRequest",
    "TakeRequest",
]

log = logging.getLogger("dcud.service.outbox")

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


# ------------------------------------------------------------------------------ writer-side internals


@dataclass(slots=True)
class Request:
    """One request to the writer; ``fut`` (set by the loop side) receives its result."""

    fut: asyncio.Future[Any] | None


@dataclass(slots=True)
class PutRequest(Request):
    """Store ``rows`` in one transaction."""

    rows: list[tuple[str, str, bytes, int]]  # kind, subtopic, payload, size_bytes
    marks: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class AckRequest(Request):
    """Mark ``seqs`` delivered for ``consumer``."""

    consumer: str
    seqs: list[int]


@dataclass(slots=True)
class NackRequest(Request):
    """Give ``seqs`` back (all in flight for ``None``: a rewind)."""

    consumer: str
    seqs: list[int] | None  # None: every item in flight (rewind)


@dataclass(slots=True)
class SweepRequest(Request):
    """Collect garbage and expire by age now."""


@dataclass(slots=True)
class TakeRequest(Request):
    """Hand out up to ``limit`` committed items (read phase, after the commit)."""

    consumer: str
    limit: int
    kinds: frozenset[str] | None


@dataclass(slots=True)
class StopRequest(Request):
    """Commit, checkpoint and end the thread."""


Result = tuple["asyncio.Future[Any] | None", Any, BaseException | None]


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
class BatchDone:
    """What one batch hands back to the event loop (results, snapshot, wakeups, reports)."""

    results: list[Result] = field(default_factory=list)
    put_rows: int = 0
    snapshot: OutboxStats | None = None
    oldest_created_s: float | None = None
    reports: list[OverflowReport] = field(default_factory=list)
    wake: set[str] = field(default_factory=set)
    exhausted: set[str] = field(default_factory=set)
    taken: list[tuple[asyncio.Future[Any] | None, str, list[int]]] = field(default_factory=list)
    """Per non-empty take: its future, consumer and seqs (a cancelled taker's items go back)."""
    broken: OutboxError | None = None


def _row_item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(seq=row[0], uid=row[1], kind=row[2], subtopic=row[3], payload=row[4], created_s=row[5])


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry survive a power cut (the runtime's fsync_dir, as an OutboxError)."""
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise OutboxError(directory, f"cannot sync directory: {exc}") from exc


class OutboxWriter:
    """The writer thread's state and loop; every method runs in the thread except :meth:`start`."""

    def __init__(
        self,
        path: Path,
        limits: OutboxLimits,
        consumers: Sequence[str],
        device_id: str,
        *,
        wall_clock: Callable[[], float],
        maintenance_interval_s: float,
        requests: queue.SimpleQueue[Request],
        loop: asyncio.AbstractEventLoop,
        on_batch_done: Callable[[BatchDone], None],
    ) -> None:
        self.path = path
        self.limits = limits
        self.consumers = tuple(consumers)
        self.device_id = device_id
        self._wall_clock = wall_clock
        self._maintenance_interval_s = maintenance_interval_s
        self._q = requests
        self._loop = loop
        self._on_batch_done = on_batch_done
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
        self.marks: dict[str, str] = {}
        """Producer marks as committed (see ``Outbox.put_many``). Read from the event loop: plain dict
        reads and one-key writes are atomic under the GIL."""
        self._pending_marks: dict[str, str] = {}  # those of the open transaction

    def start(self, open_fut: asyncio.Future[None]) -> threading.Thread:
        """Start the thread; ``open_fut`` resolves (in the loop) once the database is open, or fails."""
        thread = threading.Thread(target=self._writer_main, args=(open_fut,), name="dcud-outbox", daemon=True)
        thread.start()
        return thread

    def _post(self, done: BatchDone) -> None:
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
            self._post(BatchDone(results=[(open_fut, None, err)]))
            return
        done = BatchDone(results=[(open_fut, None, None)], reports=reports)
        self._fill_snapshot(done)
        self._post(done)
        try:
            self._serve()
        finally:
            self._close_conn()

    def _serve(self) -> None:
        next_maintenance = time.monotonic() + self._maintenance_interval_s
        while not self._loop_gone:
            batch: list[Request] = []
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

    def _fail_batch(self, batch: list[Request], err: OutboxError) -> bool:
        done = BatchDone(broken=err)
        stop = False
        for req in batch:
            if isinstance(req, PutRequest):
                done.put_rows += len(req.rows)
            if isinstance(req, StopRequest):
                stop = True
                done.results.append((req.fut, None, None))
            else:
                done.results.append((req.fut, None, err))
        self._post(done)
        return stop

    def _handle(self, batch: list[Request], maintain: bool) -> bool:
        """Process one batch; returns True when the writer must stop."""
        conn, store = self._conn, self._store
        assert conn is not None and store is not None
        done = BatchDone()
        writes = [r for r in batch if not isinstance(r, TakeRequest | StopRequest)]
        takes = [r for r in batch if isinstance(r, TakeRequest)]
        stop = next((r for r in batch if isinstance(r, StopRequest)), None)
        done.put_rows = sum(len(r.rows) for r in writes if isinstance(r, PutRequest))

        if writes or maintain or stop is not None:
            saved = store.copy()
            self._in_tx = False
            self._hit_overflow = False
            self._new_items = False
            results: list[Result] = []
            try:
                force = maintain or stop is not None
                for req in writes:
                    results.append(self._apply(req, done))
                    force = force or isinstance(req, SweepRequest)
                self._flush_cursors()
                self._collect(force)
                self._persist_counters(saved)
                if self._in_tx:
                    conn.execute("COMMIT")
                    self._in_tx = False
                    self._commits += 1
                self.marks.update(self._pending_marks)
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
            if items:
                done.taken.append((take.fut, take.consumer, [item.seq for item in items]))
            if exhausted:
                done.exhausted.add(take.consumer)

        if self._writer_broken is None:
            done.reports = self._pressure()
        self._fill_snapshot(done)
        if stop is not None:
            self._finish()
            done.results.append((stop.fut, None, None))
            leftovers: list[Request] = []
            while True:
                try:
                    leftovers.append(self._q.get_nowait())
                except queue.Empty:
                    break
            closed = OutboxClosed(self.path, "closed")
            done.results.extend((r.fut, None, closed) for r in leftovers)
            done.put_rows += sum(len(r.rows) for r in leftovers if isinstance(r, PutRequest))
        self._post(done)
        return stop is not None

    def _apply(self, req: Request, done: BatchDone) -> Result:
        if isinstance(req, PutRequest):
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
        if isinstance(req, AckRequest):
            cons = self._cons[req.consumer]
            for seq in req.seqs:
                if cons.outstanding.pop(seq, None) is not None:
                    cons.redo.discard(seq)
            return (req.fut, None, None)
        if isinstance(req, NackRequest):
            cons = self._cons[req.consumer]
            before = len(cons.redo)
            if req.seqs is None:
                cons.redo.update(cons.outstanding)
            else:
                cons.redo.update(s for s in req.seqs if s in cons.outstanding)
            if len(cons.redo) != before:
                done.wake.add(req.consumer)
            return (req.fut, None, None)
        return (req.fut, None, None)  # SweepRequest: the collect step of this batch is forced

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
        if not plausible_wall_s(now) or store.head_created_s is None:
            return
        cutoff = now - self.limits.max_age_s
        if not plausible_wall_s(store.head_created_s) or store.head_created_s >= cutoff:
            return
        self._gc(force=True)
        store.dropped_age += self._delete_head(
            lambda created_s, _freed: created_s >= cutoff or not plausible_wall_s(created_s),
            _MAX_EXPIRE_PER_BATCH,
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

    def _take(self, req: TakeRequest) -> tuple[list[OutboxItem], bool]:
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

    def _fill_snapshot(self, done: BatchDone) -> None:
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
        self.marks = {
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
