"""The outbox consumer engine against a real outbox (SQLite in tmp_path) and a scripted fake sink, on a
ManualClock: order, at least once, no loss, retries per schedule, partial deliveries, hangs, timeouts,
cancellation, the window bound, log lines and the retained state documents of the uplinks on it."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import ManualClock
from dcud.runtime.supervisor import ServiceContext
from dcud.service.datapush import (
    DataPushService,
    DataPushServiceConfig,
    PushError,
    PushMachine,
    PushSchedule,
    RetryPolicy,
)
from dcud.service.outbox import Outbox, OutboxItem, OutboxLimits
from dcud.service.outbox_sink import (
    ClockTimer,
    Continuous,
    OutboxSink,
    PartialDelivery,
    SinkPolicy,
)

CONSUMER = "up"
BOUND_S = 30.0  # bounds every wait; never a timing assertion


class ScriptedSink:
    """A sink whose calls follow a script: ``ok``, ``("fail", exc)``, ``("partial", k, exc)``,
    ``("short", k)`` (returns the first k seqs), ``hang`` (until the test releases it), ``("raise", exc)``."""

    def __init__(self, clock: ManualClock, script: Sequence[Any] = ()) -> None:
        self.clock = clock
        self.script: deque[Any] = deque(script)
        self.calls: list[tuple[float, list[int]]] = []
        self.delivered: list[int] = []
        self.in_flight: dict[int, list[int]] = {}
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self._called = asyncio.Condition()

    async def in_flight_calls(self, n: int) -> None:
        """Until ``n`` calls are in progress at once."""
        async with self._called:
            await self._called.wait_for(lambda: len(self.in_flight) >= n)

    async def deliver(self, items: Sequence[OutboxItem]) -> Collection[int]:
        seqs = [item.seq for item in items]
        self.calls.append((self.clock.time(), seqs))
        call = len(self.calls)
        self.in_flight[call] = seqs
        self.most_in_flight = max(self.most_in_flight, sum(len(s) for s in self.in_flight.values()))
        async with self._called:
            self._called.notify_all()
        try:
            action = self.script.popleft() if self.script else "ok"
            if action == "hang":
                await self.release.wait()
                action = "ok"
            if action == "ok":
                self.delivered += seqs
                return seqs
            kind = action[0]
            if kind in ("fail", "raise"):
                raise action[1]
            if kind == "partial":
                self.delivered += seqs[: action[1]]
                raise PartialDelivery(seqs[: action[1]], action[2])
            assert kind == "short"
            self.delivered += seqs[: action[1]]
            return seqs[: action[1]]
        finally:
            del self.in_flight[call]


async def filled(tmp_path: Path, n: int, kind: str = "reading") -> Outbox:
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), [CONSUMER], "dcu-1")
    await outbox.open()
    await outbox.put_many([(kind, "meter/m/reading", json.dumps({"n": i}).encode()) for i in range(n)])
    return outbox


def start(
    engine: OutboxSink, sink: Any, clock: ManualClock, liveness_s: float = 30.0
) -> tuple[ServiceContext, asyncio.Task[None]]:
    ctx = ServiceContext("sink-test", liveness_s, lambda: None, clock)
    return ctx, asyncio.create_task(engine.run(ctx, sink), name="dcud[sink-test:main]")


async def drive(clock: ManualClock, done: Callable[[], bool], task: asyncio.Task[None]) -> None:
    """Let the engine work; whenever it is parked on the clock, move the clock to its next deadline."""
    async with asyncio.timeout(BOUND_S):
        while not done():
            if task.done():
                task.result()
                raise AssertionError("the engine ended early")
            deadline = clock.next_deadline_s()
            if deadline is not None:
                clock.advance(max(0.0, deadline - clock.monotonic()))
            await asyncio.sleep(0.002)


async def stop(ctx: ServiceContext, task: asyncio.Task[None]) -> None:
    ctx.stopping.set()
    async with asyncio.timeout(BOUND_S):
        await task


def backlog(outbox: Outbox) -> int:
    return outbox.stats().backlog[CONSUMER]


# -------------------------------------------------------------------------------- order, no loss


async def test_every_item_once_in_order_through_failures_partials_and_short_returns(tmp_path: Path) -> None:
    clock = ManualClock()
    outbox = await filled(tmp_path, 50)
    try:
        sink = ScriptedSink(
            clock, ["ok", ("fail", OSError("down")), ("partial", 3, OSError("cut")), ("short", 5), "ok"]
        )
        engine = OutboxSink(
            outbox,
            SinkPolicy(CONSUMER, batch_items=8, retry_on=(OSError,)),
            Continuous(jitter=0.0),
            timer=ClockTimer(clock),
        )
        ctx, task = start(engine, sink, clock)
        await drive(clock, lambda: backlog(outbox) == 0, task)
        await stop(ctx, task)
        assert sink.delivered == list(range(1, 51))  # in order, none lost, none twice
        assert engine.delivered_items == 50 and outbox.stats().in_flight[CONSUMER] == 0
        t0 = sink.calls[0][0]
        assert [(t - t0, seqs[0]) for t, seqs in sink.calls[:6]] == [
            (0, 1),  # ok
            (0, 9),  # fails: nothing delivered
            (1, 9),  # 1 s later: 9..11 delivered, then cut
            (3, 12),  # 2 s later: 5 of 8 returned, the rest goes back
            (7, 17),  # 4 s later; success resets the backoff
            (7, 25),
        ]
        assert [r.outcome for r in engine.attempt_log][:5] == [
            "ok",
            "OSError: down",
            "OSError: cut",
            "3 of 8 items not delivered",
            "ok",
        ]
        assert engine.last_error is not None and engine.last_error["attempt"] == 3
    finally:
        await outbox.close()


async def test_the_data_push_schedule_on_a_manual_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    outbox = await filled(tmp_path, 10)
    try:
        sink = ScriptedSink(clock, [("fail", OSError("refused"))] * 4)
        policy = RetryPolicy(retry_delay_s=60, max_retries=2, rest_s=3600)
        machine = PushMachine(policy, PushSchedule((300.0,)).next_cycle_s, clock.time())
        first_cycle = machine.wake_at
        engine = OutboxSink(
            outbox,
            SinkPolicy(CONSUMER, batch_items=100, retry_on=(OSError,)),
            machine,
            timer=ClockTimer(clock),
        )
        ctx, task = start(engine, sink, clock, liveness_s=30_000.0)
        await drive(clock, lambda: backlog(outbox) == 0, task)
        await stop(ctx, task)
        # 1 + 2 retries 60 s apart, a rest of 3600 s, a failed first try, then a retry that works
        assert [t - first_cycle for t, _ in sink.calls] == [0, 60, 120, 3720, 3780]
        assert [r.number for r in engine.attempt_log] == [1, 2, 3, 1, 2]
        assert machine.rests == 1 and machine.failures_total == 4
        assert sink.delivered == list(range(1, 11))
    finally:
        await outbox.close()


# ------------------------------------------------------------------------ hangs, timeouts, cancellation


async def test_a_hanging_attempt_times_out_gives_back_and_halves_the_batch(tmp_path: Path) -> None:
    clock = ManualClock()
    outbox = await filled(tmp_path, 20)
    try:
        sink = ScriptedSink(clock, ["hang"])
        engine = OutboxSink(
            outbox,
            SinkPolicy(CONSUMER, batch_items=8, timeout_s=0.05, adaptive_batch=True),
            Continuous(jitter=0.0),
            timer=ClockTimer(clock),
        )
        ctx, task = start(engine, sink, clock)
        await drive(clock, lambda: backlog(outbox) == 0, task)
        await stop(ctx, task)
        assert [seqs for _, seqs in sink.calls] == [
            [1, 2, 3, 4, 5, 6, 7, 8],  # hangs: timed out, all given back
            [1, 2, 3, 4],  # half the batch
            [5, 6, 7, 8, 9, 10, 11, 12],  # doubled again
            [13, 14, 15, 16, 17, 18, 19, 20],
        ]
        assert sink.delivered == list(range(1, 21))
        assert engine.attempt_log[0].outcome == "attempt timed out after 0.05 s"
    finally:
        await outbox.close()


async def test_cancelled_while_delivering_gives_everything_back_in_order(tmp_path: Path) -> None:
    clock = ManualClock()
    outbox = await filled(tmp_path, 30)
    try:
        hanging = ScriptedSink(clock, ["hang"] * 10)
        policy = SinkPolicy(CONSUMER, batch_items=4, window_items=12)
        engine = OutboxSink(outbox, policy, Continuous(), timer=ClockTimer(clock))
        ctx, task = start(engine, hanging, clock)
        async with asyncio.timeout(BOUND_S):
            await hanging.in_flight_calls(3)
        for _ in range(3):  # round trips through the writer: a 4th take would be answered by now
            await outbox.ack(CONSUMER, [])
            await asyncio.sleep(0)
        assert len(hanging.calls) == 3 and hanging.most_in_flight == 12  # the window bound
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await outbox.ack(CONSUMER, [])
        assert outbox.stats().in_flight[CONSUMER] == 0 and hanging.delivered == []
        # a new run delivers from the first item on, in order, nothing lost
        sink = ScriptedSink(clock)
        ctx, task = start(engine, sink, clock)
        await drive(clock, lambda: backlog(outbox) == 0, task)
        await stop(ctx, task)
        assert sink.delivered == list(range(1, 31))
        assert sink.most_in_flight <= 12
    finally:
        await outbox.close()


async def test_an_error_outside_retry_on_ends_the_run_and_gives_the_batch_back(tmp_path: Path) -> None:
    clock = ManualClock()
    outbox = await filled(tmp_path, 5)
    try:
        sink = ScriptedSink(clock, [("raise", ConnectionAbortedError("broker gone"))])
        engine = OutboxSink(
            outbox, SinkPolicy(CONSUMER, batch_items=3), Continuous(), timer=ClockTimer(clock)
        )
        _ctx, task = start(engine, sink, clock)
        with pytest.raises(ConnectionAbortedError, match="broker gone"):  # unwrapped, for retry_on upstream
            async with asyncio.timeout(BOUND_S):
                await task
        await outbox.ack(CONSUMER, [])
        assert outbox.stats().in_flight[CONSUMER] == 0
        assert [i.seq for i in await outbox.take(CONSUMER, 10)] == [1, 2, 3, 4, 5]
    finally:
        await outbox.close()


async def test_only_its_kinds_are_taken_and_the_rest_is_settled(tmp_path: Path) -> None:
    clock = ManualClock()
    outbox = await filled(tmp_path, 3)
    try:
        await outbox.put("event", "event", b'{"type":"x"}')
        sink = ScriptedSink(clock)
        policy = SinkPolicy(CONSUMER, batch_items=10, kinds=frozenset({"event"}))
        engine = OutboxSink(outbox, policy, Continuous(), timer=ClockTimer(clock))
        ctx, task = start(engine, sink, clock)
        await drive(clock, lambda: backlog(outbox) == 0, task)
        await stop(ctx, task)
        assert sink.delivered == [4]
    finally:
        await outbox.close()


# ---------------------------------------------------------------------------------- logs and state


async def test_a_failure_is_logged_once_per_change_and_the_recovery_once(tmp_path: Path) -> None:
    clock = ManualClock()
    outbox = await filled(tmp_path, 3)
    try:
        down = ("fail", OSError("down"))
        sink = ScriptedSink(clock, [down, down, down, ("fail", OSError("no route")), "ok"])
        policy = SinkPolicy(
            CONSUMER,
            batch_items=10,
            retry_on=(OSError,),
            failed_message="thing failed",
            recovered_message="thing recovered",
        )
        changes: list[int] = []
        engine = OutboxSink(
            outbox,
            policy,
            Continuous(jitter=0.0),
            timer=ClockTimer(clock),
            on_change=lambda: changes.append(engine.delivered_items),
            log_fields={"peer": "x"},
        )
        with structlog.testing.capture_logs() as logs:
            ctx, task = start(engine, sink, clock)
            await drive(clock, lambda: backlog(outbox) == 0, task)
            await stop(ctx, task)
        lines = [(e["event"], e.get("error")) for e in logs if e["event"].startswith("thing")]
        assert lines == [
            ("thing failed", "OSError: down"),
            ("thing failed", "OSError: no route"),
            ("thing recovered", None),
        ]
        assert all(e["peer"] == "x" for e in logs if e["event"].startswith("thing"))
        assert changes[0] == 0 and changes[-1] == 3  # published at start, after attempts, at the end
    finally:
        await outbox.close()


PUSH_STATE_FIELDS = {  # docs/mqtt.md, <p>/push/ftp/state
    "target",
    "consumer",
    "phase",
    "backlog",
    "in_flight",
    "batch_items",
    "attempt",
    "max_retries",
    "retry_delay_s",
    "rest_s",
    "next_wakeup",
    "last_success",
    "last_error",
    "pushed_items",
    "counters",
}


class OneFailureUploader:
    """The data push's Uploader: fails once, then takes every batch."""

    consumer = "ftp"

    def __init__(self) -> None:
        self.failed = False

    async def deliver(self, items: Sequence[OutboxItem], now_s: float) -> dict[str, Any]:
        if not self.failed:
            self.failed = True
            raise PushError("login refused")
        return {"files": ["f1"]}

    async def close(self) -> None:
        pass


async def test_the_data_push_state_keeps_every_documented_field(tmp_path: Path) -> None:
    (tmp_path / "wme.conf").write_text("datapush_host=ftp://u:p@127.0.0.1:21/\ndatapush_periodic=5\n")
    (tmp_path / "dcud.toml").write_text('device_id = "dcu-1"\nstate_dir = "state"\n')
    slice_ = DataPushServiceConfig.from_config(load_config(tmp_path / "dcud.toml"))
    assert slice_ is not None
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["ftp"], "dcu-1")
    await outbox.open()
    try:
        await outbox.put_many([("reading", "meter/m/reading", b"{}") for _ in range(3)])
        bus = EventBus()
        clock = ManualClock()
        service = DataPushService(slice_, bus, outbox, OneFailureUploader(), ClockTimer(clock))
        ctx = ServiceContext("datapush", 30.0, lambda: None, clock)
        task = asyncio.create_task(service.run(ctx))
        await drive(clock, lambda: outbox.stats().backlog["ftp"] == 0, task)
        await stop(ctx, task)
        state = bus.states["push/ftp"]
        assert set(state) == PUSH_STATE_FIELDS | {"last_files"}
        assert set(state["counters"]) == {"cycles", "attempts", "successes", "failures", "rests"}
        assert set(state["last_error"]) == {"ts", "message", "attempt"}
        assert state["pushed_items"] == 3 and state["backlog"] == 0 and state["in_flight"] == 0
        assert state["last_files"] == ["f1"] and state["last_success"] is not None
        assert state["last_error"]["message"] == "login refused" and state["phase"] == "waiting"
    finally:
        await outbox.close()


async def test_the_event_push_state_keeps_its_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dcud.service.eventpush as eventpush

    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["udp-event"], "dcu-1")
    await outbox.open()
    try:
        await outbox.put("event", "event", json.dumps({"type": "power_loss", "ts": "t"}).encode())
        failures = [OSError("no route")]
        real = eventpush.push_datagram

        async def flaky(addr: str, text: str, gate: eventpush.EventPushGate) -> eventpush.Verdict:
            if failures:
                raise failures.pop()
            return await real(addr, text, gate)

        monkeypatch.setattr(eventpush, "push_datagram", flaky)
        bus = EventBus()
        config = eventpush.EventPushConfig(addr="127.0.0.1:9", device_id="dcu-1")
        service = eventpush.EventPushService(config, bus, outbox, eventpush.EventPushGate())
        clock = ManualClock()
        ctx = ServiceContext("eventpush", 30.0, lambda: None, clock)
        task = asyncio.create_task(service.run(ctx))
        await drive(clock, lambda: outbox.stats().backlog["udp-event"] == 0, task)
        await stop(ctx, task)
        state = bus.states["push/event"]
        assert set(state) == {
            "target",
            "notify_mask",
            "ignore_s",
            "backlog",
            "last_success",
            "last_error",
            "counters",
        }
        assert state["last_error"]["message"] == "no route" and set(state["last_error"]) == {"ts", "message"}
        assert state["counters"] == {"sent": 1, "suppressed": 0, "duplicate": 0, "filtered": 0, "failed": 1}
    finally:
        await outbox.close()
