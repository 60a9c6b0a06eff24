"""The polling schedule as a pure object, with explicit times: alignment, catch-up after the DCU was off or
the line down, NTP steps, holds behind a transparent session, pauses after a line error, order on a line,
bounded concurrency for TCP meters; and, for random sequences of times and outcomes, every slot read at
most once and none passed over without being counted."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.config.model import MeterConfig
from dcud.service.meter_read import LineReadouts
from dcud.service.poll_schedule import Held, Outcome, PollSchedule, Read, first_slot_s

MONO = 100.0
WALL = 1_800_000_000.0  # a multiple of 900 (and of every interval below)
FAR = 1e9  # a recheck period that never caps a deadline


def line_schedule(*intervals: int, recheck_s: float = FAR, wall: float = WALL) -> PollSchedule:
    schedule = PollSchedule(recheck_s=recheck_s)
    schedule.add_group("rs485-1")
    for order, interval in enumerate(intervals):
        schedule.add(f"m{order}", "rs485-1", interval, order, wall)
    return schedule


def test_slots_are_aligned_to_the_wall_clock_and_waited_for_on_the_monotonic_one() -> None:
    assert first_slot_s(1000.0, 900) == 1800.0
    assert first_slot_s(1800.0, 900) == 2700.0  # strictly after
    schedule = line_schedule(900, wall=WALL + 100.5)
    meter = schedule.meter("m0")
    assert meter.next_due_s == WALL + 900
    assert schedule.take("rs485-1", MONO, WALL + 100.5) is None
    # 799.5 s of wall time to go: the deadline is on the monotonic clock, whatever its origin.
    assert schedule.next_deadline("rs485-1", MONO, WALL + 100.5) == pytest.approx(MONO + 799.5)
    assert schedule.take("rs485-1", MONO + 799.4, WALL + 899.9) is None
    read = schedule.take("rs485-1", MONO + 799.5, WALL + 900)
    assert read == Read("m0", "rs485-1", WALL + 900, missed=0)
    assert schedule.done(read, "ok", MONO + 801, WALL + 901.5) == []
    assert meter.next_due_s == WALL + 1800 and meter.missed == 0


def test_the_deadline_is_rechecked_so_a_wall_clock_step_is_noticed() -> None:
    schedule = line_schedule(900, recheck_s=10.0)
    assert schedule.next_deadline("rs485-1", MONO, WALL) == MONO + 10.0
    # NTP steps the wall clock 1 h forward while the worker sleeps: at the recheck the meter is late and
    # is read for the latest slot that started, the slots in between counted as missed.
    read = schedule.take("rs485-1", MONO + 10.0, WALL + 3600 + 10.0)
    assert read is not None and read.slot_s == WALL + 3600 and read.missed == 3
    assert schedule.meter("m0").missed == 3


def test_catch_up_after_the_dcu_was_off_reads_the_latest_slot_once() -> None:
    schedule = line_schedule(900)
    read = schedule.take("rs485-1", MONO, WALL + 900)
    assert read is not None
    schedule.done(read, "ok", MONO, WALL + 900)
    # Suspended for a day: the monotonic clock stood still, the wall clock did not.
    late = schedule.take("rs485-1", MONO + 1, WALL + 86400 + 900 + 42)
    assert late == Read("m0", "rs485-1", WALL + 86400 + 900, missed=95)
    schedule.done(late, "ok", MONO + 2, WALL + 86400 + 943)
    assert schedule.meter("m0").next_due_s == WALL + 86400 + 1800
    assert schedule.take("rs485-1", MONO + 3, WALL + 86400 + 944) is None  # not read twice


def test_a_small_step_back_delays_the_next_slot_and_never_reads_one_twice() -> None:
    schedule = line_schedule(900)
    read = schedule.take("rs485-1", MONO, WALL + 900)
    assert read is not None
    schedule.done(read, "ok", MONO, WALL + 901)
    # The wall clock steps back 5 minutes: slot WALL+900 comes again, but it was read.
    assert schedule.take("rs485-1", MONO + 2, WALL + 601) is None
    assert schedule.next_deadline("rs485-1", MONO + 2, WALL + 601) == MONO + 2 + 1199
    again = schedule.take("rs485-1", MONO + 1201, WALL + 1800)
    assert again is not None and again.slot_s == WALL + 1800
    assert schedule.meter("m0").realigned == 0


def test_a_step_back_of_years_restarts_the_slots_and_is_counted() -> None:
    schedule = line_schedule(900)
    read = schedule.take("rs485-1", MONO, WALL + 900)
    assert read is not None
    schedule.done(read, "ok", MONO, WALL + 901)
    # Booted with the RTC years ahead, NTP corrected it: waiting for the old next slot would take years.
    back = WALL - 5 * 365 * 86400 + 100
    assert schedule.next_deadline("rs485-1", MONO + 1, back) == MONO + 1 + 800
    meter = schedule.meter("m0")
    assert meter.realigned == 1 and meter.next_due_s == first_slot_s(back, 900)
    later = schedule.take("rs485-1", MONO + 801, back + 800)
    assert later is not None and later.slot_s == first_slot_s(back, 900) and later.missed == 0


def test_meters_of_one_line_are_read_one_at_a_time_oldest_slot_first_then_in_order() -> None:
    schedule = line_schedule(60, 60, 20)
    now = WALL + 60
    got = []
    for _ in range(3):
        read = schedule.take("rs485-1", MONO, now)
        assert read is not None
        assert schedule.take("rs485-1", MONO, now) is None  # one readout at a time on a line
        got.append((read.meter, read.slot_s))
        schedule.done(read, "ok", MONO, now)
    # m2 (every 20 s) was due since +20: the oldest first (for its latest slot), then configuration order.
    assert got == [("m2", WALL + 60), ("m0", WALL + 60), ("m1", WALL + 60)]
    assert schedule.meter("m2").missed == 2  # its slots at +20 and +40 ended unread
    assert schedule.take("rs485-1", MONO, now) is None
    again = schedule.take("rs485-1", MONO + 20, now + 20)
    assert again is not None and (again.meter, again.slot_s) == ("m2", WALL + 80)


def test_an_overloaded_line_reads_every_meter_once_per_pass_and_counts_what_it_missed() -> None:
    schedule = line_schedule(1, 1, 1)
    mono, wall = MONO, WALL + 1
    order = []
    for _ in range(9):  # each readout takes 2 s: three meters need 6 s per 1-s slot
        read = schedule.take("rs485-1", mono, wall)
        assert read is not None
        order.append(read.meter)
        mono, wall = mono + 2, wall + 2
        schedule.done(read, "ok", mono, wall)
    assert order == ["m0", "m1", "m2"] * 3  # nobody starves
    for name in ("m0", "m1", "m2"):
        assert schedule.meter(name).missed > 0


def test_a_transparent_session_holds_every_due_meter_of_the_line_and_they_keep_their_slot() -> None:
    schedule = line_schedule(900, 900, 3600)
    now = WALL + 900
    read = schedule.take("rs485-1", MONO, now)
    assert read is not None and read.meter == "m0"
    held = schedule.done(read, "deferred", MONO + 10, now + 10)
    # m2 is not due (hourly, next at +3600): not held.
    assert held == [Held("m0", "deferred"), Held("m1", "deferred")]
    again = schedule.take("rs485-1", MONO + 10, now + 10)
    assert again == read  # deferred, not failed: the same slot, at once (the lease wait was the wait)
    schedule.done(again, "ok", MONO + 20, now + 20)
    nxt = schedule.take("rs485-1", MONO + 20, now + 20)
    assert nxt is not None and (nxt.meter, nxt.slot_s) == ("m1", now)


def test_a_line_down_for_longer_than_a_slot_reads_the_latest_slot_and_counts_the_rest() -> None:
    schedule = line_schedule(900)
    mono, wall = MONO, WALL + 900
    for _ in range(5):  # each lease attempt waits 10 s for a line that is down
        read = schedule.take("rs485-1", mono, wall)
        assert read is not None and read.slot_s == WALL + 900
        mono, wall = mono + 10, wall + 10
        assert schedule.done(read, "line_down", mono, wall) == [Held("m0", "line_down")]
    mono, wall = mono + 2000, wall + 2000  # the line is back 33 min later
    read = schedule.take("rs485-1", mono, wall)
    assert read is not None and read.slot_s == WALL + 2700 and read.missed == 2
    schedule.done(read, "ok", mono, wall)
    assert schedule.meter("m0").missed == 2 and schedule.meter("m0").next_due_s == WALL + 3600


def test_a_line_error_pauses_the_line_and_reports_it_down() -> None:
    schedule = line_schedule(900, 900)
    now = WALL + 900
    read = schedule.take("rs485-1", MONO, now)
    assert read is not None
    held = schedule.done(read, "line_error", MONO, now)
    assert held == [Held("m0", "line_down"), Held("m1", "line_down")]
    assert schedule.take("rs485-1", MONO + 0.5, now + 0.5) is None  # the line service is reopening
    assert schedule.next_deadline("rs485-1", MONO + 0.5, now + 0.5) == MONO + schedule.line_error_pause_s
    assert schedule.take("rs485-1", MONO + 1.0, now + 1.0) == read


def test_a_failed_readout_consumes_its_slot_no_second_attempt_before_the_next() -> None:
    schedule = line_schedule(900)
    read = schedule.take("rs485-1", MONO, WALL + 900)
    assert read is not None
    assert schedule.done(read, "failed", MONO + 5, WALL + 905) == []  # a meter's failure holds nobody
    assert schedule.take("rs485-1", MONO + 5, WALL + 905) is None
    assert schedule.next_deadline("rs485-1", MONO + 5, WALL + 905) == MONO + 5 + 895
    # The retries of one slot are the readout's, within its lease: IEC sign-ons on a scheduled read.
    iec = MeterConfig(name="a", line="l", protocol="iec62056-21", retries=2)
    assert LineReadouts.attempts(iec, "poll") == 3 and LineReadouts.attempts(iec, "cli") == 1
    mbus = MeterConfig(name="b", line="l", protocol="mbus", retries=2)
    assert LineReadouts.attempts(mbus, "poll") == 1  # M-Bus repeats at link level in its session


def test_tcp_meters_run_a_bounded_number_at_once_and_hold_only_themselves() -> None:
    schedule = PollSchedule(recheck_s=10.0)
    schedule.add_group("tcp:", concurrency=3, shared_line=False)
    for i in range(5):
        schedule.add(f"t{i}", "tcp:", 900, i, WALL)
    now = WALL + 900
    reads = [schedule.take("tcp:", MONO, now) for _ in range(3)]
    assert [r.meter for r in reads if r is not None] == ["t0", "t1", "t2"]
    assert schedule.take("tcp:", MONO, now) is None  # three at once
    assert schedule.next_deadline("tcp:", MONO, now) == MONO + 10.0
    assert reads[1] is not None
    assert schedule.done(reads[1], "line_error", MONO + 1, now + 1) == [Held("t1", "line_down")]
    nxt = schedule.take("tcp:", MONO + 1, now + 1)
    assert nxt is not None and nxt.meter == "t3"  # t1 pauses alone; t3 and t4 are not held
    assert reads[0] is not None and reads[2] is not None
    schedule.done(reads[0], "ok", MONO + 1.5, now + 1.5)
    last = schedule.take("tcp:", MONO + 1.5, now + 1.5)
    assert last is not None and last.meter == "t4"
    schedule.done(reads[2], "busy", MONO + 3, now + 3)  # held behind a command: due again at once
    again = schedule.take("tcp:", MONO + 3, now + 3)
    assert again is not None and again.meter == "t1"  # its pause is over, and its order comes first
    assert schedule.take("tcp:", MONO + 3, now + 3) is None  # t2 waits: three at once


def test_reporting_a_read_that_is_not_in_progress_is_refused() -> None:
    schedule = line_schedule(900)
    read = schedule.take("rs485-1", MONO, WALL + 900)
    assert read is not None
    schedule.done(read, "ok", MONO, WALL + 900)
    with pytest.raises(ValueError, match="not in progress"):
        schedule.done(read, "ok", MONO, WALL + 900)


# -- property: every slot read at most once, none passed over without being counted ----------------


@dataclass
class Ledger:
    first_s: float
    interval_s: int
    consumed: list[float] = field(default_factory=list)


OUTCOMES: list[Outcome] = ["ok", "failed", "deferred", "busy", "line_down", "line_error"]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0.0, 12.0), st.sampled_from([0.0, 0.0, 0.0, 37.0, 600.0])),
        st.tuples(st.just("take"), st.integers(0, 3), st.just(0.0)),
        st.tuples(st.just("done"), st.integers(0, 3), st.sampled_from(range(len(OUTCOMES)))),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    intervals=st.lists(st.sampled_from([1, 2, 3, 5, 7, 60]), min_size=1, max_size=4),
    shared=st.booleans(),
    concurrency=st.integers(1, 3),
    start=st.floats(0.0, 1000.0),
    ops=steps,
)
def test_every_slot_is_read_at_most_once_and_none_is_skipped_unreported(
    intervals: list[int], shared: bool, concurrency: int, start: float, ops: list[tuple[str, float, float]]
) -> None:
    schedule = PollSchedule(recheck_s=5.0)
    schedule.add_group("g", concurrency=1 if shared else concurrency, shared_line=shared)
    mono, wall = MONO, WALL + start
    ledgers = {}
    for order, interval in enumerate(intervals):
        slots = schedule.add(f"m{order}", "g", interval, order, wall)
        ledgers[f"m{order}"] = Ledger(slots.next_due_s, interval)
    limit = 1 if shared else concurrency
    in_flight: list[Read] = []
    paused_until = 0.0  # a shared line pauses after a line error
    for op, a, b in ops:
        if op == "advance":
            mono += a
            wall += a + b  # b: the wall clock stepped forward (suspend, NTP)
        elif op == "take":
            before = {
                name: (s.next_due_s, s.order)
                for name in ledgers
                if not (s := schedule.meter(name)).reading and s.next_due_s <= wall and mono >= s.not_before_s
            }
            read = schedule.take("g", mono, wall)
            if read is None:
                assert len(in_flight) >= limit or not before or mono < paused_until
                continue
            assert read.meter not in {r.meter for r in in_flight}
            assert before[read.meter] == min(before.values())  # the oldest slot first, then the order
            # A slot that has begun and not ended: the next one, or the latest after a catch-up.
            assert read.slot_s <= wall < read.slot_s + ledgers[read.meter].interval_s
            in_flight.append(read)
            assert len(in_flight) <= limit
        elif in_flight:
            read = in_flight.pop(int(a) % len(in_flight))
            outcome = OUTCOMES[int(b)]
            schedule.done(read, outcome, mono, wall)
            if outcome in ("ok", "failed"):
                ledgers[read.meter].consumed.append(read.slot_s)
            elif outcome == "line_error" and shared:
                paused_until = max(paused_until, mono + schedule.line_error_pause_s)
        deadline = schedule.next_deadline("g", mono, wall)
        assert mono <= deadline <= mono + 5.0
        for name, ledger in ledgers.items():
            slots = schedule.meter(name)
            assert slots.realigned == 0  # the wall clock never went back here
            consumed = ledger.consumed
            assert consumed == sorted(set(consumed))  # each slot read at most once, in order
            # Every slot from the first up to the next one is either read or counted as missed.
            assert slots.next_due_s == ledger.first_s + ledger.interval_s * (len(consumed) + slots.missed)


@settings(max_examples=200, deadline=None)
@given(
    interval=st.sampled_from([1, 5, 60, 900]),
    moves=st.lists(st.tuples(st.floats(0.0, 100.0), st.floats(-4000.0, 4000.0)), max_size=60),
)
def test_wall_clock_steps_either_way_never_repeat_a_slot_unless_counted(
    interval: int, moves: list[tuple[float, float]]
) -> None:
    schedule = line_schedule(interval, recheck_s=5.0)
    mono, wall = MONO, WALL
    read_slots: list[float] = []
    epochs = 0
    for elapsed, step in moves:
        mono += elapsed
        wall += elapsed + step
        read = schedule.take("rs485-1", mono, wall)
        realigned = schedule.meter("m0").realigned
        if realigned != epochs:  # a step back beyond an interval: the slots start again, counted
            epochs = realigned
            read_slots = []
        if read is not None:
            assert read.slot_s <= wall
            assert not read_slots or read.slot_s > read_slots[-1]
            read_slots.append(read.slot_s)
            schedule.done(read, "ok", mono, wall)
        # Never more than one interval beyond the next slot, whatever the clock did.
        assert schedule.meter("m0").next_due_s <= first_slot_s(wall, interval) + interval
