"""The runtime layer's shared helpers: the clock, the event log, RFC 3339 stamps, fixed workers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SYSTEM_CLOCK, ManualClock
from dcud.runtime.context import Runtime
from dcud.runtime.events import EventLog
from dcud.runtime.supervisor import ServiceContext, Supervisor, SupervisorOptions, Worker
from dcud.runtime.timefmt import rfc3339, rfc3339_ms

from helpers.notify import RecordingNotifier

FAST = SupervisorOptions(grace_s=0.5, liveness_s=30.0, restart_initial_s=5.0, restart_max_s=5.0)


async def test_manual_clock_wakes_sleepers_in_deadline_order_only_when_advanced() -> None:
    clock = ManualClock(monotonic_s=10.0, wall_s=1_000.0)
    woke: list[str] = []

    async def sleeper(name: str, delay_s: float) -> None:
        await clock.sleep(delay_s)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 5.0)), asyncio.create_task(sleeper("early", 1.0))]
    await clock.wait_for_sleepers(2)
    assert clock.next_deadline_s() == 11.0
    clock.advance(0.5)
    await asyncio.sleep(0)
    assert woke == []
    clock.advance(0.5)
    await asyncio.wait_for(tasks[1], 5)
    assert woke == ["early"] and clock.sleepers() == 1
    clock.advance(10)
    await asyncio.wait_for(tasks[0], 5)
    assert woke == ["early", "late"]
    assert (clock.monotonic(), clock.time()) == (21.0, 1_011.0)
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_manual_clock_wait_ends_on_the_event_or_the_manual_deadline() -> None:
    clock = ManualClock()
    event = asyncio.Event()
    waiter = asyncio.create_task(clock.wait(event, 30.0))
    await clock.wait_for_sleepers(1)
    event.set()
    assert await asyncio.wait_for(waiter, 5) is True
    assert clock.sleepers() == 0  # the deadline of a finished wait no longer counts

    event.clear()
    waiter = asyncio.create_task(clock.wait(event, 30.0))
    await clock.wait_for_sleepers(1)
    clock.advance(29.9)
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(0.1)
    assert await asyncio.wait_for(waiter, 5) is False

    cancelled = asyncio.create_task(clock.sleep(1.0))
    await clock.wait_for_sleepers(1)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert clock.sleepers() == 0


async def test_system_clock_wait() -> None:
    event = asyncio.Event()
    assert await SYSTEM_CLOCK.wait(event, 0.0) is False
    event.set()
    assert await SYSTEM_CLOCK.wait(event, 10.0) is True


async def test_service_context_sleeps_on_its_clock_and_beats() -> None:
    clock = ManualClock()
    ctx = ServiceContext("svc", 30.0, lambda: None, clock)
    before = ctx.last_beat_s
    sleeping = asyncio.create_task(ctx.sleep(60.0))
    await clock.wait_for_sleepers(1)
    clock.advance(60.0)
    assert await asyncio.wait_for(sleeping, 5) is False
    assert ctx.last_beat_s >= before
    sleeping = asyncio.create_task(ctx.sleep(60.0))
    await clock.wait_for_sleepers(1)
    ctx.stopping.set()
    assert await asyncio.wait_for(sleeping, 5) is True


def test_rfc3339_forms() -> None:
    assert rfc3339(1_795_096_800.0) == "2026-11-19T14:00:00Z"
    assert rfc3339(1_795_096_800.999) == "2026-11-19T14:00:00Z"
    assert rfc3339_ms(1_795_096_800.123) == "2026-11-19T14:00:00.123Z"
    assert rfc3339_ms(0.0) == "1970-01-01T00:00:00.000Z"


async def test_event_log_stamps_on_its_clock_commits_then_tells_listeners() -> None:
    clock = ManualClock(wall_s=1_795_096_800.0)
    committed: list[dict[str, Any]] = []

    async def commit(payload: bytes) -> str:
        committed.append(json.loads(payload))
        return f"u-{len(committed)}"

    runtime = Runtime("dcu-1", "dcu/dcu-1", EventBus(), EventLog(commit, clock), clock)
    assert runtime.started_monotonic_s == clock.monotonic()
    await runtime.event("outbox_corrupt", "moved aside", path="/x")
    assert committed == [
        {"type": "outbox_corrupt", "ts": "2026-11-19T14:00:00Z", "text": "moved aside", "path": "/x"}
    ]
    heard: list[Any] = []

    def broken(_event: Any) -> None:
        raise RuntimeError("listener bug")

    runtime.add_event_listener(broken)  # gets the early event, fails: logged, never raised
    runtime.add_event_listener(heard.append)  # early events went to the first listener only
    await runtime.event("drive_fault", "fault")
    assert [(e["type"], e["uid"]) for e in heard] == [("drive_fault", "u-2")]


async def test_request_restart_stops_the_daemon() -> None:
    stops: list[bool] = []
    runtime = Runtime("d", "dcu/d", EventBus(), EventLog(_no_commit))
    runtime.stop_daemon = lambda: stops.append(True)
    runtime.request_restart("daily restart")
    assert runtime.restart_reason == "daily restart" and stops == [True]


async def _no_commit(_payload: bytes) -> str:
    return "u"


@dataclass
class Flaky:
    name: str = "flaky"
    config: object = 0
    runs: int = 0
    stopped: list[str] = field(default_factory=list)

    async def run(self, ctx: ServiceContext) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("boom")
        ctx.set_ready()
        await ctx.stopping.wait()
        self.stopped.append(self.name)


async def test_restart_backoff_waits_on_the_supervisor_clock() -> None:
    clock = ManualClock()
    flaky = Flaky()
    sup = Supervisor([flaky], RecordingNotifier(), FAST, clock=clock)
    task = asyncio.create_task(sup.run())
    await clock.wait_for_sleepers(1)  # failed once; backing off (2.5 to 5 s of manual time)
    assert flaky.runs == 1 and not sup.all_ready.is_set()
    clock.advance(5.0)
    await asyncio.wait_for(sup.all_ready.wait(), 5)
    assert flaky.runs == 2
    sup.request_stop()
    await asyncio.wait_for(task, 5)


async def test_fixed_workers_survive_replace_and_stop_last() -> None:
    order: list[str] = []
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            order.append("worker")

    notifier = RecordingNotifier()

    class Recording(Flaky):
        async def run(self, ctx: ServiceContext) -> None:
            await super().run(ctx)
            order.append(self.name)

    service = Recording(runs=1)  # runs healthy from the start
    sup = Supervisor([service], notifier, FAST, fixed=[Worker("app-work", work)])
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(sup.all_ready.wait(), 5)
    await asyncio.wait_for(started.wait(), 5)
    assert "STATUS=ready: 1 services" in notifier.sent[-1]  # workers are not counted as features
    assert await sup.replace([]) == ["flaky"]  # the reload path: the worker keeps running
    assert order == ["flaky"] and sup.service_names() == []
    with pytest.raises(ValueError):
        await sup.replace([Recording(name="app-work")])
    sup.request_stop()
    await asyncio.wait_for(task, 5)
    assert order == ["flaky", "worker"]
