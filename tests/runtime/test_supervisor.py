"""The supervisor: readiness, restarts and budget, watchdog withholding, live replace, grace."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from dcud.errors import ServiceFailed
from dcud.runtime.supervisor import ServiceContext, Supervisor, SupervisorOptions

from helpers.meters import wait_until
from helpers.notify import RecordingNotifier

FAST = SupervisorOptions(
    grace_s=0.5, liveness_s=0.3, restart_budget=2, restart_initial_s=0.01, restart_max_s=0.02
)


@dataclass
class Svc:
    name: str
    config: object = 0
    fail_times: int = 0
    ready_after: asyncio.Event | None = None
    beat: bool = True
    ignore_stop: bool = False
    runs: int = 0
    stopped: list[str] = field(default_factory=list)

    async def run(self, ctx: ServiceContext) -> None:
        self.runs += 1
        if self.ready_after is not None:
            await self.ready_after.wait()
        if self.runs <= self.fail_times:
            raise RuntimeError(f"boom {self.runs}")
        ctx.set_ready()
        if self.ignore_stop:
            await asyncio.sleep(3600)
        while not ctx.stopping.is_set():
            if self.beat:
                await ctx.sleep(0.05)
            else:
                await asyncio.wait([asyncio.ensure_future(ctx.stopping.wait())])
        self.stopped.append(self.name)


async def _run_until(sup: Supervisor, condition: asyncio.Event | None = None, delay_s: float = 0.0) -> None:
    task = asyncio.create_task(sup.run())
    if condition is not None:
        await asyncio.wait_for(condition.wait(), 5)
    await asyncio.sleep(delay_s)
    sup.request_stop()
    await asyncio.wait_for(task, 5)


async def test_ready_only_when_all_services_ready() -> None:
    notifier = RecordingNotifier()
    gate = asyncio.Event()
    slow = Svc("slow", ready_after=gate)
    sup = Supervisor([Svc("a"), slow], notifier, FAST)
    task = asyncio.create_task(sup.run())
    await wait_until(lambda: "STATUS=waiting for slow" in notifier.sent, 5, step_s=0.01)  # "a" is ready
    assert "READY=1" not in notifier.sent
    assert any("waiting for slow" in line for line in notifier.sent)
    gate.set()
    await asyncio.wait_for(sup.all_ready.wait(), 5)
    assert notifier.sent.count("READY=1") == 1
    sup.request_stop()
    await asyncio.wait_for(task, 5)
    assert "STOPPING=1" in notifier.sent


async def test_failed_service_restarts_then_budget_spent() -> None:
    flaky = Svc("flaky", fail_times=1)
    sup = Supervisor([flaky], RecordingNotifier(), FAST)
    await _run_until(sup, sup.all_ready)
    assert flaky.runs == 2

    hopeless = Svc("hopeless", fail_times=100)
    sup2 = Supervisor([hopeless], RecordingNotifier(), FAST)
    with pytest.raises(ServiceFailed) as info:
        await asyncio.wait_for(sup2.run(), 5)
    assert info.value.service == "hopeless"
    assert hopeless.runs == FAST.restart_budget + 1


async def test_watchdog_withheld_while_a_service_is_wedged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = RecordingNotifier()
    healthy = Supervisor([Svc("ok")], notifier, FAST)
    await _run_until(healthy, healthy.all_ready, delay_s=0.5)
    assert "WATCHDOG=1" in notifier.sent

    notifier2 = RecordingNotifier()
    wedged = Supervisor([Svc("wedged", beat=False)], notifier2, FAST)
    await _run_until(wedged, wedged.all_ready, delay_s=1.0)
    assert any(line.startswith("STATUS=stalled: wedged") for line in notifier2.sent)
    # Pings stop once the service is stalled: none after the first stalled status.
    first_stalled = next(i for i, line in enumerate(notifier2.sent) if line.startswith("STATUS=stalled"))
    assert "WATCHDOG=1" not in notifier2.sent[first_stalled:]


async def test_replace_restarts_only_changed_services() -> None:
    a, b = Svc("a", config=1), Svc("b", config=1)
    sup = Supervisor([a, b], RecordingNotifier(), FAST)
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(sup.all_ready.wait(), 5)
    a2, b2, c = Svc("a", config=1), Svc("b", config=2), Svc("c")
    changed = await sup.replace([a2, b2, c])
    assert changed == ["b", "c"]
    assert a2.runs == 0 and a.stopped == []
    assert b.stopped == ["b"]
    await asyncio.wait_for(sup.all_ready.wait(), 5)
    assert sorted(sup.service_names()) == ["a", "b", "c"]
    sup.request_stop()
    await asyncio.wait_for(task, 5)


async def test_grace_period_then_cancel() -> None:
    stubborn = Svc("stubborn", ignore_stop=True)
    sup = Supervisor([stubborn], RecordingNotifier(), FAST)
    await _run_until(sup, sup.all_ready)
    assert stubborn.stopped == []


@dataclass
class Swallower:
    """Ignores the stop and swallows the first cancellation (as Python 3.11's asyncio.wait_for can)."""

    name: str = "swallower"
    config: object = 0
    cancellations: int = 0

    async def run(self, ctx: ServiceContext) -> None:
        ctx.set_ready()
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations > 1:
                    raise


async def test_grace_period_then_cancel_until_the_service_has_ended() -> None:
    swallower = Swallower()
    sup = Supervisor([swallower], RecordingNotifier(), FAST)
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(sup.all_ready.wait(), 5)
    sup.request_stop()
    await asyncio.wait_for(task, 5)  # before: waited for the swallower for ever
    assert swallower.cancellations == 2
