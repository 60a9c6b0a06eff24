"""Unit tests of dcud.service.outbox against a real SQLite file in tmp_path (no fakes, no timing)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dcud.errors import DcudError
from dcud.service.outbox import (
    ROW_OVERHEAD_BYTES,
    SCHEMA_VERSION,
    Outbox,
    OutboxClosed,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    OutboxInUse,
    OutboxItem,
    OutboxLimits,
    OutboxSchemaTooNew,
    OverflowPolicy,
    OverflowReport,
)

T0 = 1_750_000_000.0  # a plausible wall clock (2025)
BOUND_S = 30.0  # bounds every wait in these tests; never a timing assertion


class Clock:
    """Injectable wall clock."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    tmp_path: Path,
    consumers: Sequence[str] = ("mqtt",),
    limits: OutboxLimits | None = None,
    **kwargs: Any,
) -> Outbox:
    return Outbox(tmp_path / "state" / "outbox.db", limits or OutboxLimits(), consumers, "dcu-7", **kwargs)


def seqs(items: list[OutboxItem]) -> list[int]:
    return [i.seq for i in items]


async def put_n(outbox: Outbox, n: int, kind: str = "reading", payload: bytes = b"{}") -> list[OutboxItem]:
    return await outbox.put_many([(kind, "meter/m/reading", payload)] * n)


def item_bytes(payload: bytes, kind: str = "reading", subtopic: str = "meter/m/reading") -> int:
    return len(payload) + len(kind) + len(subtopic) + ROW_OVERHEAD_BYTES


# ------------------------------------------------------------------------------------- basics


async def test_put_returns_committed_item_with_stable_uid(tmp_path: Path) -> None:
    clock = Clock()
    async with make(tmp_path, wall_clock=clock) as outbox:
        item = await outbox.put("event", "event", b'{"type": "power_loss"}')
        assert item.seq == 1
        assert item.kind == "event" and item.subtopic == "event"
        assert item.payload == b'{"type": "power_loss"}'
        assert item.created_s == T0
        assert item.uid.startswith("dcu-7-") and item.uid.endswith("-1")
    # Committed means visible to a fresh connection, not only to ours.
    conn = sqlite3.connect(tmp_path / "state" / "outbox.db")
    assert conn.execute("SELECT uid, payload FROM items").fetchall() == [(item.uid, item.payload)]
    conn.close()
    async with make(tmp_path) as outbox:
        assert await outbox.take("mqtt", 10) == [item]


async def test_take_hands_out_in_seq_order_and_skips_in_flight(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        put = await put_n(outbox, 10)
        assert seqs(put) == list(range(1, 11))
        assert seqs(await outbox.take("mqtt", 4)) == [1, 2, 3, 4]
        assert seqs(await outbox.take("mqtt", 4)) == [5, 6, 7, 8]
        await outbox.ack("mqtt", [1, 2, 3, 4])
        assert seqs(await outbox.take("mqtt", 4)) == [9, 10]
        assert await outbox.take("mqtt", 4) == []
        await put_n(outbox, 1)
        assert seqs(await outbox.take("mqtt", 4)) == [11]


async def test_consumers_are_independent(tmp_path: Path) -> None:
    async with make(tmp_path, ("mqtt", "ftp")) as outbox:
        await put_n(outbox, 5)
        got = await outbox.take("mqtt", 5)
        await outbox.ack("mqtt", seqs(got))
        assert seqs(await outbox.take("ftp", 2)) == [1, 2]
        assert await outbox.take("mqtt", 5) == []
        assert outbox.stats().backlog == {"mqtt": 0, "ftp": 5}
        assert outbox.stats().in_flight == {"mqtt": 0, "ftp": 2}


async def test_out_of_order_acks_advance_the_durable_cursor_only_when_contiguous(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 6)
        await outbox.take("mqtt", 6)
        await outbox.ack("mqtt", [2, 3, 5])
        assert outbox.stats().backlog["mqtt"] == 6  # 1 is missing: the cursor stays at 0
    async with make(tmp_path) as outbox:
        # Acks above the gap lived in memory only: at-least-once brings them back.
        assert seqs(await outbox.take("mqtt", 10)) == [1, 2, 3, 4, 5, 6]
        await outbox.ack("mqtt", [3, 2])
        await outbox.ack("mqtt", [1])
        await outbox.ack("mqtt", [6, 999, 1])  # unknown and repeated seqs are ignored
        assert outbox.stats().backlog["mqtt"] == 3  # cursor at 3; 4 is outstanding
    async with make(tmp_path) as outbox:
        assert seqs(await outbox.take("mqtt", 10)) == [4, 5, 6]


async def test_nack_gives_back_in_order_before_newer_items(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 8)
        assert seqs(await outbox.take("mqtt", 5)) == [1, 2, 3, 4, 5]
        await outbox.nack("mqtt", [4, 2, 77])
        assert seqs(await outbox.take("mqtt", 1)) == [2]
        assert seqs(await outbox.take("mqtt", 3)) == [4, 6, 7]
        await outbox.ack("mqtt", [1, 2, 3, 4, 5, 6, 7])
        assert seqs(await outbox.take("mqtt", 3)) == [8]


async def test_rewind_gives_back_everything_in_flight(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 5)
        await outbox.take("mqtt", 3)
        await outbox.ack("mqtt", [2])
        await outbox.rewind("mqtt")
        assert outbox.stats().in_flight["mqtt"] == 0
        assert seqs(await outbox.take("mqtt", 10)) == [1, 3, 4, 5]


async def test_a_take_cancelled_before_its_answer_gives_its_items_back(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 4)
        taker = asyncio.create_task(outbox.take("mqtt", 3))
        await asyncio.sleep(0)  # the request is with the writer; its answer cannot arrive before we yield
        taker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taker
        await outbox.ack("mqtt", [])  # one round trip: the writer answered the take, the give-back is queued
        assert seqs(await outbox.take("mqtt", 10)) == [1, 2, 3, 4]  # no rewind needed, in order
        assert outbox.stats().in_flight["mqtt"] == 4


async def test_kinds_filter_settles_other_kinds_for_that_consumer(tmp_path: Path) -> None:
    events = frozenset({"event"})
    async with make(tmp_path, ("mqtt", "udp")) as outbox:
        await put_n(outbox, 3, "reading")
        await put_n(outbox, 1, "event")
        await put_n(outbox, 2, "reading")
        await put_n(outbox, 1, "event")
        got = await outbox.take("udp", 10, events)
        assert [(i.seq, i.kind) for i in got] == [(4, "event"), (7, "event")]
        assert await outbox.take("udp", 10, events) == []
        await outbox.ack("udp", [4, 7])
        everything = await outbox.take("mqtt", 10)
        await outbox.ack("mqtt", seqs(everything))
        await outbox.sweep()
        # Readings did not hold udp back: every row is gone.
        assert outbox.stats().items == 0
        assert outbox.stats().depth == 0


async def test_restart_resumes_unacked_and_never_reuses_a_seq(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        first = await put_n(outbox, 4)
        await outbox.take("mqtt", 4)
        await outbox.ack("mqtt", [1, 2])
    async with make(tmp_path) as outbox:
        again = await outbox.take("mqtt", 10)
        assert again == first[2:]  # same seq, uid, payload, created_s
        await outbox.ack("mqtt", seqs(again))
        await outbox.sweep()
        assert outbox.stats().items == 0
    async with make(tmp_path) as outbox:  # empty table: AUTOINCREMENT keeps counting
        assert (await outbox.put("event", "event", b"{}")).seq == 5


async def test_uids_of_a_recreated_database_never_repeat(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        old = await outbox.put("event", "event", b"{}")
    (tmp_path / "state" / "outbox.db").unlink()
    async with make(tmp_path) as outbox:
        new = await outbox.put("event", "event", b"{}")
    assert old.seq == new.seq == 1
    assert old.uid != new.uid


async def test_gc_deletes_only_what_every_consumer_passed(tmp_path: Path) -> None:
    async with make(tmp_path, ("mqtt", "ftp")) as outbox:
        await put_n(outbox, 10)
        await outbox.ack("mqtt", seqs(await outbox.take("mqtt", 10)))
        await outbox.sweep()
        assert outbox.stats().items == 10
        await outbox.ack("ftp", seqs(await outbox.take("ftp", 6)))
        await outbox.sweep()
        assert outbox.stats().items == 4
        assert outbox.stats().depth == 4
    conn = sqlite3.connect(tmp_path / "state" / "outbox.db")
    assert [r[0] for r in conn.execute("SELECT seq FROM items ORDER BY seq")] == [7, 8, 9, 10]
    conn.close()


async def test_gc_runs_by_itself_in_batches(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 600)
        await outbox.ack("mqtt", seqs(await outbox.take("mqtt", 600)))
        assert outbox.stats().items == 0  # a run of 600 delivered items is collected without a sweep


async def test_consumers_not_configured_keep_their_cursor_but_hold_nothing(tmp_path: Path) -> None:
    async with make(tmp_path, ("mqtt", "ftp")) as outbox:
        await put_n(outbox, 3)
        await outbox.ack("ftp", seqs(await outbox.take("ftp", 1)))
    async with make(tmp_path, ("mqtt",)) as outbox:
        await outbox.ack("mqtt", seqs(await outbox.take("mqtt", 10)))
        await outbox.sweep()
        assert outbox.stats().items == 0
        with pytest.raises(ValueError, match="unknown consumer"):
            await outbox.take("ftp", 1)
        await put_n(outbox, 2)
    conn = sqlite3.connect(tmp_path / "state" / "outbox.db")
    assert dict(conn.execute("SELECT consumer, acked_seq FROM cursors")) == {"mqtt": 3, "ftp": 1}
    conn.close()
    async with make(tmp_path, ("mqtt", "ftp")) as outbox:
        # ftp's row survived; what was deleted meanwhile is gone, the rest is its backlog.
        assert seqs(await outbox.take("ftp", 10)) == [4, 5]


async def test_new_consumer_starts_at_the_oldest_stored_item(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 5)
        await outbox.ack("mqtt", seqs(await outbox.take("mqtt", 2)))
        await outbox.sweep()
    async with make(tmp_path, ("mqtt", "snmp")) as outbox:
        assert seqs(await outbox.take("snmp", 10)) == [3, 4, 5]


async def test_put_many_gets_consecutive_seqs(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await outbox.put("event", "event", b"a")
        many = await outbox.put_many([("reading", f"meter/m{i}/reading", b"%d" % i) for i in range(5)])
        assert seqs(many) == [2, 3, 4, 5, 6]
        assert [i.subtopic for i in many] == [f"meter/m{i}/reading" for i in range(5)]
        assert await outbox.put_many([]) == []


# ----------------------------------------------------------------------------- limits, overflow


async def test_overflow_drop_oldest_counts_and_reports_once_per_transition(tmp_path: Path) -> None:
    payload = b"x" * 100
    size = item_bytes(payload)
    reports: list[OverflowReport] = []
    limits = OutboxLimits(max_bytes=10 * size, high_water_ratio=0.9, clear_ratio=0.5)
    async with make(tmp_path, limits=limits, on_overflow=reports.append) as outbox:
        await put_n(outbox, 10, payload=payload)
        assert [(r.high_water, r.active) for r in reports] == [(True, True)]
        for _ in range(5):
            await outbox.put("reading", "meter/m/reading", payload)
        stats = outbox.stats()
        assert stats.dropped == {"overflow": 5, "age": 0}
        assert stats.items == 10 and stats.size_bytes == 10 * size
        assert stats.overflow and stats.high_water
        # One report for entering overflow, not one per dropped item.
        assert [(r.high_water, r.active) for r in reports] == [(True, True), (False, True)]
        assert reports[1].policy is OverflowPolicy.DROP_OLDEST
        assert reports[1].dropped_overflow == 1
        assert seqs(await outbox.take("mqtt", 100)) == list(range(6, 16))  # the oldest went first
        await outbox.ack("mqtt", list(range(6, 16)))
        await outbox.sweep()
        assert [(r.high_water, r.active) for r in reports[2:]] == [(False, False), (True, False)]
        assert not outbox.stats().overflow and not outbox.stats().high_water
    async with make(tmp_path, limits=limits) as outbox:
        assert outbox.stats().dropped == {"overflow": 5, "age": 0}  # counters are durable


async def test_overflow_drops_delivered_items_before_undelivered_ones(tmp_path: Path) -> None:
    payload = b"x" * 100
    limits = OutboxLimits(max_bytes=4 * item_bytes(payload))
    async with make(tmp_path, limits=limits) as outbox:
        await put_n(outbox, 4, payload=payload)
        await outbox.ack("mqtt", seqs(await outbox.take("mqtt", 2)))
        await put_n(outbox, 2, payload=payload)
        assert outbox.stats().dropped["overflow"] == 0
        assert not outbox.stats().overflow
        assert seqs(await outbox.take("mqtt", 10)) == [3, 4, 5, 6]


async def test_overflow_reject_new(tmp_path: Path) -> None:
    payload = b"x" * 100
    reports: list[OverflowReport] = []
    limits = OutboxLimits(max_bytes=4 * item_bytes(payload), policy=OverflowPolicy.REJECT_NEW)
    async with make(tmp_path, limits=limits, on_overflow=reports.append) as outbox:
        await put_n(outbox, 4, payload=payload)
        for _ in range(3):
            with pytest.raises(OutboxFull) as info:
                await outbox.put("reading", "meter/m/reading", payload)
        assert isinstance(info.value, DcudError)
        with pytest.raises(OutboxFull):
            await put_n(outbox, 2, payload=payload)  # all or nothing
        stats = outbox.stats()
        assert stats.rejected == 5
        assert stats.dropped == {"overflow": 0, "age": 0}
        assert [(r.high_water, r.active) for r in reports] == [(True, True), (False, True)]
        assert reports[1].rejected == 1
        assert seqs(await outbox.take("mqtt", 10)) == [1, 2, 3, 4]  # nothing was lost
        await outbox.ack("mqtt", [1, 2, 3, 4])
        await outbox.sweep()
        assert (await outbox.put("reading", "meter/m/reading", payload)).seq == 5
        assert [(r.high_water, r.active) for r in reports[2:]] == [(False, False), (True, False)]


async def test_item_larger_than_max_bytes_is_rejected_under_any_policy(tmp_path: Path) -> None:
    async with make(tmp_path, limits=OutboxLimits(max_bytes=1000)) as outbox:
        await outbox.put("event", "event", b"small")
        with pytest.raises(OutboxFull, match="do not fit"):
            await outbox.put("reading", "meter/m/reading", b"x" * 1000)
        assert outbox.stats().rejected == 1
        assert outbox.stats().dropped["overflow"] == 0
        assert outbox.stats().items == 1


async def test_high_water_has_hysteresis(tmp_path: Path) -> None:
    payload = b"x" * 100
    size = item_bytes(payload)
    reports: list[OverflowReport] = []
    limits = OutboxLimits(max_bytes=10 * size, high_water_ratio=0.8, clear_ratio=0.5)
    async with make(tmp_path, limits=limits, on_overflow=reports.append) as outbox:
        await put_n(outbox, 7, payload=payload)
        assert reports == []
        await put_n(outbox, 1, payload=payload)
        assert [(r.high_water, r.active, r.size_bytes) for r in reports] == [(True, True, 8 * size)]
        await outbox.ack("mqtt", seqs(await outbox.take("mqtt", 2)))
        await outbox.sweep()
        await put_n(outbox, 2, payload=payload)  # 6 then 8 again: no new report
        assert len(reports) == 1
        await outbox.ack("mqtt", seqs(await outbox.take("mqtt", 4)))
        await outbox.sweep()  # 4 of 10: below clear_ratio
        assert [(r.high_water, r.active) for r in reports] == [(True, True), (True, False)]


async def test_high_water_is_reported_at_open(tmp_path: Path) -> None:
    payload = b"x" * 100
    limits = OutboxLimits(max_bytes=10 * item_bytes(payload))
    async with make(tmp_path, limits=limits) as outbox:
        await put_n(outbox, 9, payload=payload)
    reports: list[OverflowReport] = []
    async with make(tmp_path, limits=limits, on_overflow=reports.append) as outbox:
        await asyncio.sleep(0)  # the open batch's reports are delivered by a loop callback
        assert [(r.high_water, r.active) for r in reports] == [(True, True)]


async def test_a_failing_callback_does_not_break_the_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(report: OverflowReport) -> None:
        raise RuntimeError("callback bug")

    limits = OutboxLimits(max_bytes=3 * item_bytes(b"x"))
    async with make(tmp_path, limits=limits, on_overflow=boom) as outbox:
        for _ in range(5):
            await put_n(outbox, 1, payload=b"x")
        assert outbox.stats().dropped["overflow"] == 2
    assert "on_overflow callback failed" in caplog.text


async def test_age_expiry_drops_undelivered_items_and_counts_them(tmp_path: Path) -> None:
    clock = Clock()
    limits = OutboxLimits(max_age_s=3600.0)
    async with make(tmp_path, ("mqtt", "ftp"), limits=limits, wall_clock=clock) as outbox:
        await put_n(outbox, 3)  # delivered to both: deleted, not "dropped"
        await put_n(outbox, 4)  # undelivered: will expire
        for consumer in ("mqtt", "ftp"):
            await outbox.ack(consumer, seqs(await outbox.take(consumer, 3)))
        clock.now += 1800.0
        await put_n(outbox, 2)  # younger
        clock.now += 1800.0 + 1.0
        assert outbox.stats().oldest_age_s == pytest.approx(3601.0)
        await outbox.sweep()
        stats = outbox.stats()
        assert stats.dropped == {"overflow": 0, "age": 4}
        assert stats.items == 2
        assert stats.oldest_age_s == pytest.approx(1801.0)
        assert seqs(await outbox.take("mqtt", 10)) == [8, 9]


async def test_age_expiry_also_happens_on_put(tmp_path: Path) -> None:
    clock = Clock()
    async with make(tmp_path, limits=OutboxLimits(max_age_s=10.0), wall_clock=clock) as outbox:
        await put_n(outbox, 2)
        clock.now += 11.0
        await put_n(outbox, 1)
        assert outbox.stats().dropped["age"] == 2


async def test_no_age_expiry_while_the_clock_was_or_is_unset(tmp_path: Path) -> None:
    clock = Clock(now=1000.0)  # a box without RTC before NTP: 1970
    async with make(tmp_path, limits=OutboxLimits(max_age_s=60.0), wall_clock=clock) as outbox:
        await put_n(outbox, 2)
        clock.now = 5000.0
        await outbox.sweep()
        assert outbox.stats().items == 2
        clock.now = T0  # NTP sync: 55 years "later"
        await outbox.sweep()
        stats = outbox.stats()
        assert stats.items == 2 and stats.dropped["age"] == 0
        assert stats.oldest_age_s == 0.0  # unknown, not 55 years


# ------------------------------------------------------------------------- waiting and stats


async def test_wait_for_items_wakes_on_put_and_not_before(tmp_path: Path) -> None:
    async with make(tmp_path, ("mqtt", "ftp")) as outbox:
        assert await outbox.take("mqtt", 10) == []  # clears the "maybe something" flag
        waiter = asyncio.create_task(outbox.wait_for_items("mqtt"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiter.done()
        await outbox.put("event", "event", b"{}")
        await asyncio.wait_for(waiter, BOUND_S)
        assert seqs(await outbox.take("mqtt", 10)) == [1]


async def test_wait_for_items_returns_at_once_while_items_are_pending(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 3)
        await asyncio.wait_for(outbox.wait_for_items("mqtt"), BOUND_S)
        await outbox.take("mqtt", 1)  # a full batch: more may be there
        await asyncio.wait_for(outbox.wait_for_items("mqtt"), BOUND_S)
        await outbox.take("mqtt", 10)  # a short batch: drained
        waiter = asyncio.create_task(outbox.wait_for_items("mqtt"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiter.done()
        await outbox.nack("mqtt", [2])  # a give-back makes something takeable
        await asyncio.wait_for(waiter, BOUND_S)


async def test_wait_for_items_raises_on_close(tmp_path: Path) -> None:
    outbox = make(tmp_path)
    await outbox.open()
    await outbox.take("mqtt", 1)
    waiter = asyncio.create_task(outbox.wait_for_items("mqtt"))
    await asyncio.sleep(0)
    await outbox.close()
    with pytest.raises(OutboxClosed):
        await asyncio.wait_for(waiter, BOUND_S)


async def test_stats(tmp_path: Path) -> None:
    clock = Clock()
    async with make(tmp_path, ("mqtt", "ftp"), wall_clock=clock) as outbox:
        empty = outbox.stats()
        assert (empty.depth, empty.items, empty.size_bytes, empty.oldest_age_s) == (0, 0, 0, 0.0)
        await outbox.put("event", "event", b"12345")
        clock.now += 5.0
        await put_n(outbox, 3, payload=b"ab")
        clock.now += 5.0
        await outbox.take("mqtt", 2)
        await outbox.ack("mqtt", [1])
        stats = outbox.stats()
        assert stats.depth == 4
        assert stats.items == 4
        assert stats.size_bytes == item_bytes(b"12345", "event", "event") + 3 * item_bytes(b"ab")
        assert stats.max_bytes == 64 * 1024 * 1024
        assert stats.backlog == {"mqtt": 3, "ftp": 4}
        assert stats.in_flight == {"mqtt": 1, "ftp": 0}
        assert stats.oldest_age_s == pytest.approx(10.0)
        assert stats.rejected == 0 and stats.dropped == {"overflow": 0, "age": 0}
        await outbox.ack("ftp", seqs(await outbox.take("ftp", 1)))
        assert outbox.stats().depth == 3
        assert outbox.stats().oldest_age_s == pytest.approx(5.0)


async def test_backpressure_bounds_pending_puts(tmp_path: Path) -> None:
    async with make(tmp_path, max_pending_puts=1) as outbox:
        items = await asyncio.gather(*(outbox.put("reading", "m", b"%d" % i) for i in range(50)))
        assert sorted(seqs(list(items))) == list(range(1, 51))
        # One pending put at a time: every put had to wait for the previous commit.
        assert outbox.stats().commits == 50


async def test_cancelled_put_waiting_for_room_does_not_leak_capacity(tmp_path: Path) -> None:
    async with make(tmp_path, max_pending_puts=1) as outbox:
        tasks = [asyncio.create_task(outbox.put("reading", "m", b"%d" % i)) for i in range(10)]
        await asyncio.sleep(0)
        for task in tasks[1:5]:
            task.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(d, OutboxItem) for d in done) >= 6
        await asyncio.wait_for(outbox.put("reading", "m", b"last"), BOUND_S)


# --------------------------------------------------------------------- errors and file states


async def test_corrupt_file_raises_typed_error_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    path.parent.mkdir()
    junk = b"this is not sqlite at all\n" * 200
    path.write_bytes(junk)
    outbox = make(tmp_path)
    with pytest.raises(OutboxCorrupt) as info:
        await outbox.open()
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert isinstance(info.value, DcudError)
    assert path.read_bytes() == junk
    with pytest.raises(OutboxClosed):
        await outbox.put("event", "event", b"{}")
    await outbox.close()


async def test_damaged_pages_are_reported_as_corrupt(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await put_n(outbox, 2000, payload=b"y" * 100)
    path = tmp_path / "state" / "outbox.db"
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 6 * page] = b"\xa5" * (3 * page)
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxCorrupt):
        await make(tmp_path).open()


async def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(OutboxCorrupt, match="not an outbox database"):
        await make(tmp_path).open()


async def test_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    async with make(tmp_path) as outbox:
        await outbox.put("event", "event", b"{}")
    path = tmp_path / "state" / "outbox.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(OutboxSchemaTooNew) as info:
        await make(tmp_path).open()
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert not isinstance(info.value, OutboxCorrupt)  # the service must not move it aside
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)
    conn.close()


async def test_a_second_outbox_on_the_same_file_is_refused(tmp_path: Path) -> None:
    async with make(tmp_path):
        with pytest.raises(OutboxInUse):
            await make(tmp_path).open()


async def test_closed_outbox_refuses_calls(tmp_path: Path) -> None:
    outbox = make(tmp_path)
    with pytest.raises(OutboxClosed):
        await outbox.put("event", "event", b"{}")
    await outbox.open()
    await outbox.close()
    await outbox.close()  # idempotent
    with pytest.raises(OutboxClosed):
        await outbox.put("event", "event", b"{}")
    with pytest.raises(OutboxClosed):
        await outbox.take("mqtt", 1)
    with pytest.raises(OutboxClosed):
        await outbox.open()


async def test_close_commits_puts_already_submitted(tmp_path: Path) -> None:
    outbox = make(tmp_path)
    await outbox.open()
    puts = [asyncio.create_task(outbox.put("reading", "m", b"%d" % i)) for i in range(100)]
    await asyncio.sleep(0)  # every put is submitted
    await outbox.close()
    results = await asyncio.gather(*puts, return_exceptions=True)
    committed = [r for r in results if isinstance(r, OutboxItem)]
    assert all(isinstance(r, OutboxItem | OutboxClosed) for r in results)
    async with make(tmp_path) as again:
        assert seqs(await again.take("mqtt", 1000)) == sorted(seqs(committed))


async def test_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        OutboxLimits(max_bytes=0)
    with pytest.raises(ValueError):
        OutboxLimits(high_water_ratio=0.5, clear_ratio=0.6)
    with pytest.raises(ValueError):
        make(tmp_path, ("mqtt", "mqtt"))
    with pytest.raises(ValueError):
        Outbox(tmp_path / "x.db", OutboxLimits(), ["mqtt"], "")
    async with make(tmp_path) as outbox:
        with pytest.raises(ValueError):
            await outbox.take("mqtt", 0)
        with pytest.raises(ValueError):
            await outbox.take("mqtt", 1, frozenset())
        with pytest.raises(ValueError):
            await outbox.take("nobody", 1)
        with pytest.raises(ValueError):
            await outbox.put("", "event", b"{}")


def test_error_tree() -> None:
    for cls in (OutboxFull, OutboxCorrupt, OutboxSchemaTooNew, OutboxInUse, OutboxClosed):
        assert issubclass(cls, OutboxError)
    assert issubclass(OutboxError, DcudError)


# ----------------------------------------------------------------------------- model test

KINDS_OF = {"mqtt": None, "udp": frozenset({"event"})}


class ModelConsumer:
    """What one consumer should see, in plain Python."""

    def __init__(self) -> None:
        self.scan = 0
        self.outstanding: dict[int, str] = {}
        self.redo: set[int] = set()

    def cursor(self) -> int:
        return min(self.outstanding) - 1 if self.outstanding else self.scan

    def take(self, stored: list[tuple[int, str]], limit: int, kinds: frozenset[str] | None) -> list[int]:
        ok = [s for s in sorted(self.redo) if kinds is None or self.outstanding[s] in kinds]
        out = ok[:limit]
        self.redo.difference_update(out)
        if len(ok) > limit:
            return out
        remaining = limit - len(out)
        if remaining == 0:
            return out
        fresh = [(s, k) for s, k in stored if s > self.scan and (kinds is None or k in kinds)][:remaining]
        for s, k in fresh:
            self.outstanding[s] = k
            out.append(s)
        if len(fresh) == remaining:
            self.scan = fresh[-1][0]
        elif stored:
            self.scan = max(self.scan, stored[-1][0])
        return out

    def restart(self) -> None:
        self.scan = self.cursor()
        self.outstanding.clear()
        self.redo.clear()


class OutboxMachine(RuleBasedStateMachine):
    """Random put/take/ack/nack/rewind/restart sequences against ModelConsumer."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.loop = asyncio.new_event_loop()
        self.outbox = self.open()
        self.stored: list[tuple[int, str]] = []
        self.uids: dict[int, str] = {}
        self.model = {name: ModelConsumer() for name in KINDS_OF}

    def open(self) -> Outbox:
        outbox = Outbox(self.dir / "outbox.db", OutboxLimits(), list(KINDS_OF), "dcu-m")
        self.loop.run_until_complete(outbox.open())
        return outbox

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, BOUND_S))

    @rule(kind=st.sampled_from(["reading", "event"]), n=st.integers(1, 3))
    def put(self, kind: str, n: int) -> None:
        items = self.run(self.outbox.put_many([(kind, "t", b"p")] * n))
        expect_first = self.stored[-1][0] + 1 if self.stored else (max(self.uids) + 1 if self.uids else 1)
        assert seqs(items) == list(range(expect_first, expect_first + n))
        for item in items:
            self.stored.append((item.seq, kind))
            self.uids[item.seq] = item.uid

    @rule(consumer=st.sampled_from(sorted(KINDS_OF)), limit=st.integers(1, 5))
    def take(self, consumer: str, limit: int) -> None:
        kinds = KINDS_OF[consumer]
        got = self.run(self.outbox.take(consumer, limit, kinds))
        assert seqs(got) == self.model[consumer].take(self.stored, limit, kinds)
        for item in got:
            assert item.uid == self.uids[item.seq]

    @precondition(lambda self: any(m.outstanding for m in self.model.values()))
    @rule(data=st.data(), give_back=st.booleans())
    def ack_or_nack(self, data: st.DataObject, give_back: bool) -> None:
        consumer = data.draw(st.sampled_from([c for c, m in self.model.items() if m.outstanding]))
        model = self.model[consumer]
        chosen = data.draw(st.lists(st.sampled_from(sorted(model.outstanding)), unique=True, min_size=1))
        # Unknown, already acked or never taken seqs: must be ignored.
        noise = data.draw(
            st.lists(st.integers(-2, 200).filter(lambda s: s not in model.outstanding), max_size=2)
        )
        if give_back:
            self.run(self.outbox.nack(consumer, chosen + noise))
            model.redo.update(chosen)
        else:
            self.run(self.outbox.ack(consumer, chosen + noise))
            for s in chosen:
                del model.outstanding[s]
                model.redo.discard(s)

    @rule(consumer=st.sampled_from(sorted(KINDS_OF)))
    def rewind(self, consumer: str) -> None:
        self.run(self.outbox.rewind(consumer))
        self.model[consumer].redo.update(self.model[consumer].outstanding)

    @rule()
    def restart(self) -> None:
        self.run(self.outbox.close())
        self.outbox = self.open()
        for model in self.model.values():
            model.restart()

    @rule()
    def sweep(self) -> None:
        self.run(self.outbox.sweep())
        floor = min(m.cursor() for m in self.model.values())
        self.stored = [(s, k) for s, k in self.stored if s > floor]

    @invariant()
    def stats_agree(self) -> None:
        stats = self.outbox.stats()
        for name, model in self.model.items():
            assert stats.in_flight[name] == len(model.outstanding) - len(model.redo)

    def teardown(self) -> None:
        try:
            self.run(self.outbox.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


OutboxMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestOutboxModel = OutboxMachine.TestCase
