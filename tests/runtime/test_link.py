"""The link kernel (dcud/runtime/link.py) with fake connect/serve callbacks and a driven clock.

No fixed sleeps: the fake context's ``sleep`` advances a fake clock and returns at once (so backoff
delays are recorded, not waited), and everything else waits on conditions the fakes signal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from dcud.runtime.link import (
    STOPPED,
    ErrorLog,
    Link,
    LinkDown,
    LinkPolicy,
    LinkState,
    run_link,
    until_stopped,
)
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.uplink import UplinkReconnect

from helpers.meters import wait_until

BOUND_S = 10.0
"""Bound on every wait of these tests (they finish in milliseconds; the bound only catches a hang)."""


class RecordingLog:
    """A structlog stand-in that keeps (level, message, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def emit(message: str, **fields: Any) -> None:
            self.lines.append((level, message, fields))

        return emit


class DrivenContext:
    """A LinkContext whose clock the test drives: ``sleep`` advances it and returns at once."""

    name = "fake"

    def __init__(self, liveness_s: float = 30.0) -> None:
        self.stopping = asyncio.Event()
        self.liveness_s = liveness_s
        self.log = RecordingLog()
        self.now_s = 0.0
        self.slept: list[float] = []
        self.beats = 0

    def beat(self) -> None:
        self.beats += 1

    async def sleep(self, delay_s: float) -> bool:
        self.slept.append(delay_s)
        self.now_s += delay_s
        await asyncio.sleep(0)  # let others run, as a real sleep would
        return self.stopping.is_set()

    def monotonic(self) -> float:
        return self.now_s


class ScriptedLink(Link[int]):
    """Each connect takes the next step of a script: an exception to raise, or how long to stay up
    (on the driven clock) before serve ends with "closed"."""

    down_message = "peer unavailable"
    lost_message = "connection lost"

    def __init__(self, ctx: DrivenContext, script: list[BaseException | float], stop_after: int) -> None:
        self.ctx = ctx
        self.script = list(script)
        self.stop_after = stop_after
        self.downs: list[LinkDown] = []
        self.connects = 0
        self.closes = 0

    def connect(self) -> AbstractAsyncContextManager[int]:
        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[int]:
            self.connects += 1
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            try:
                yield int(step)
            finally:
                self.closes += 1

        return session()

    async def serve(self, up_s: int) -> str:
        self.ctx.now_s += up_s
        return "closed"

    def log_fields(self) -> dict[str, object]:
        return {"peer": "test"}

    async def on_down(self, down: LinkDown) -> None:
        self.downs.append(down)
        if len(self.downs) >= self.stop_after:
            self.ctx.stopping.set()


async def run_script(
    script: list[BaseException | float], policy: LinkPolicy, stop_after: int
) -> tuple[ScriptedLink, DrivenContext]:
    ctx = DrivenContext()
    link = ScriptedLink(ctx, script, stop_after)
    await asyncio.wait_for(run_link(ctx, link, policy, monotonic=ctx.monotonic), BOUND_S)
    return link, ctx


def no_jitter(**kw: Any) -> LinkPolicy:
    return LinkPolicy(jitter=0.0, **kw)


async def test_backoff_grows_to_its_bound_while_connecting_fails() -> None:
    link, ctx = await run_script([OSError(111, "refused")] * 6, no_jitter(initial_s=1, max_s=8), 6)
    assert [d.delay_s for d in link.downs] == [1, 2, 4, 8, 8, 8]
    assert all(d.phase == "connect" and d.up_s is None for d in link.downs)
    assert ctx.slept == [1, 2, 4, 8, 8, 8]  # the driven clock: each delay asked for, none waited
    assert link.state is LinkState.STOPPED


async def test_backoff_resets_only_after_a_stable_connection() -> None:
    # Up 0 s (accepted and dropped at once), 0 s, then 100 s (stable), then 0 s again.
    script: list[BaseException | float] = [0, 0, 100, 0]
    link, _ctx = await run_script(script, no_jitter(initial_s=1, max_s=60, stable_s=60), 4)
    assert [d.delay_s for d in link.downs] == [1, 2, 1, 2]
    assert [d.up_s for d in link.downs] == [0, 0, 100, 0]
    assert link.closes == 4  # every connection closed before the backoff


async def test_stable_s_zero_resets_on_every_connect() -> None:
    link, _ctx = await run_script([0, 0, 0], no_jitter(initial_s=1, stable_s=0), 3)
    assert [d.delay_s for d in link.downs] == [1, 1, 1]


async def test_one_log_line_per_change_of_error() -> None:
    a, b = OSError(111, "refused"), OSError(113, "no route")
    script: list[BaseException | float] = [a, a, a, b, b, a, 5, 5, a]
    link, ctx = await run_script(script, no_jitter(initial_s=1, stable_s=60), 9)
    lines = [(message, fields["error"]) for _level, message, fields in ctx.log.lines]
    assert lines == [
        ("peer unavailable", "refused"),
        ("peer unavailable", "no route"),
        ("peer unavailable", "refused"),
        ("connection lost", "closed"),
        ("connection lost", "closed"),  # coming up clears the memory: every loss after an up is logged
        ("peer unavailable", "refused"),
    ]
    assert all(fields["peer"] == "test" for _level, _message, fields in ctx.log.lines)
    assert [d.logged for d in link.downs] == [True, False, False, True, False, True, True, True, True]


async def test_fatal_errors_propagate_and_retry_errors_do_not() -> None:
    ctx = DrivenContext()
    link = ScriptedLink(ctx, [OSError(111, "refused"), ValueError("bad config")], stop_after=99)
    with pytest.raises(ValueError, match="bad config"):
        await asyncio.wait_for(run_link(ctx, link, no_jitter(), monotonic=ctx.monotonic), BOUND_S)
    assert len(link.downs) == 1


class GateLink(Link[str]):
    """A link whose connect and serve block until the test lets them go; records cancellations."""

    def __init__(
        self, *, connect_blocks: bool = False, serve_obeys_stop: bool = True, swallow_cancels: int = 0
    ) -> None:
        self.connect_blocks = connect_blocks
        self.serve_obeys_stop = serve_obeys_stop
        # serve swallows this many cancellations, as Python 3.11's asyncio.wait_for does when the
        # cancellation arrives in the turn its inner future completes (aiomqtt's publish/subscribe)
        self.swallow_cancels = swallow_cancels
        self.connecting = asyncio.Event()
        self.serving = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled: list[str] = []
        self.closed = 0
        self.connects = 0
        self.downs: list[LinkDown] = []
        self.stopping: asyncio.Event | None = None

    def connect(self) -> AbstractAsyncContextManager[str]:
        @contextlib.asynccontextmanager
        async def session() -> AsyncIterator[str]:
            self.connects += 1
            self.connecting.set()
            if self.connect_blocks:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled.append("connect")
                    raise
            try:
                yield f"conn{self.connects}"
            finally:
                self.closed += 1

        return session()

    async def serve(self, conn: str) -> str:
        self.serving.set()
        try:
            while True:
                try:
                    if self.serve_obeys_stop and self.stopping is not None:
                        await self.stopping.wait()
                        return "stopping"
                    await self.release.wait()
                    return "released"
                except asyncio.CancelledError:
                    self.cancelled.append("serve")
                    if self.swallow_cancels <= 0:
                        raise
                    self.swallow_cancels -= 1  # and serve on, like a swallowed cancellation
        finally:
            self.serving.clear()

    async def on_down(self, down: LinkDown) -> None:
        self.downs.append(down)


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def stop_and_join(ctx: ServiceContext, task: asyncio.Task[None]) -> None:
    ctx.stopping.set()
    await asyncio.wait_for(task, BOUND_S)
    assert not other_tasks(), other_tasks()


async def test_stop_while_connect_hangs_cancels_it() -> None:
    ctx = ServiceContext("fake", 30.0, lambda: None)
    link = GateLink(connect_blocks=True)
    task = asyncio.create_task(run_link(ctx, link, LinkPolicy()))
    await asyncio.wait_for(link.connecting.wait(), BOUND_S)
    assert any(t.get_name() == "dcud[fake:connect]" for t in other_tasks())
    await stop_and_join(ctx, task)
    assert link.cancelled == ["connect"]
    assert link.closed == 0 and link.state is LinkState.STOPPED


async def test_stop_while_serving_lets_serve_end_by_itself() -> None:
    ctx = ServiceContext("fake", 30.0, lambda: None)
    link = GateLink()
    link.stopping = ctx.stopping
    task = asyncio.create_task(run_link(ctx, link, LinkPolicy()))
    await asyncio.wait_for(link.serving.wait(), BOUND_S)
    assert link.state is LinkState.UP
    assert any(t.get_name() == "dcud[fake:serve]" for t in other_tasks())
    await stop_and_join(ctx, task)
    assert link.cancelled == [] and link.closed == 1 and link.downs == []


async def test_stop_while_serving_cancels_a_serve_that_ignores_it_after_the_grace() -> None:
    ctx = ServiceContext("fake", 30.0, lambda: None)
    link = GateLink(serve_obeys_stop=False)
    task = asyncio.create_task(run_link(ctx, link, LinkPolicy(stop_grace_s=0.01)))
    await asyncio.wait_for(link.serving.wait(), BOUND_S)
    await stop_and_join(ctx, task)
    assert link.cancelled == ["serve"] and link.closed == 1


async def test_stop_while_backing_off_ends_the_delay() -> None:
    ctx = ServiceContext("fake", 30.0, lambda: None)
    link = GateLink(serve_obeys_stop=False)
    task = asyncio.create_task(run_link(ctx, link, LinkPolicy(initial_s=3600, max_s=3600)))
    await asyncio.wait_for(link.serving.wait(), BOUND_S)
    link.release.set()  # serve ends: the link backs off for an hour
    for _ in range(1000):  # bounded: the state flips within a few loop turns
        if link.state is LinkState.BACKOFF:
            break
        await asyncio.sleep(0)
    assert link.state is LinkState.BACKOFF and link.downs[0].error == "released"
    await stop_and_join(ctx, task)
    assert link.connects == 1


async def test_reconnect_request_while_up_cancels_serve_and_connects_again() -> None:
    ctx = ServiceContext("fake", 30.0, lambda: None)
    reconnect = UplinkReconnect()
    reconnect.request("before the first connect")  # older requests do not count
    link = GateLink(serve_obeys_stop=False)
    task = asyncio.create_task(
        run_link(ctx, link, LinkPolicy(initial_s=0.001, max_s=0.001, stop_grace_s=0.01), reconnect=reconnect)
    )
    await asyncio.wait_for(link.serving.wait(), BOUND_S)
    assert any(t.get_name() == "dcud[fake:reconnect]" for t in other_tasks())
    reconnect.request("uplink unreachable")
    await wait_until(lambda: link.connects == 2 and link.serving.is_set(), BOUND_S, step_s=0.001)
    assert link.connects == 2 and link.cancelled == ["serve"] and link.closed == 1
    assert link.downs[0].phase == "reconnect"
    assert link.downs[0].error == "reconnect requested: uplink unreachable"
    await stop_and_join(ctx, task)


async def test_reconnect_request_reconnects_even_when_serve_swallows_the_cancellation() -> None:
    ctx = ServiceContext("fake", 3.0, lambda: None)  # beats (and cancels again) every second
    reconnect = UplinkReconnect()
    link = GateLink(serve_obeys_stop=False, swallow_cancels=1)
    task = asyncio.create_task(
        run_link(ctx, link, LinkPolicy(initial_s=0.001, max_s=0.001, stop_grace_s=0.01), reconnect=reconnect)
    )
    await asyncio.wait_for(link.serving.wait(), BOUND_S)
    reconnect.request("uplink unreachable")
    await wait_until(lambda: link.connects == 2 and link.serving.is_set(), BOUND_S, step_s=0.001)
    assert link.connects == 2 and link.cancelled == ["serve", "serve"] and link.closed == 1
    assert link.downs[0].phase == "reconnect"
    await stop_and_join(ctx, task)


async def test_stop_ends_a_serve_that_swallows_the_cancellation() -> None:
    ctx = ServiceContext("fake", 3.0, lambda: None)
    link = GateLink(serve_obeys_stop=False, swallow_cancels=2)
    task = asyncio.create_task(run_link(ctx, link, LinkPolicy(stop_grace_s=0.01)))
    await asyncio.wait_for(link.serving.wait(), BOUND_S)
    await stop_and_join(ctx, task)
    assert link.cancelled == ["serve", "serve", "serve"] and link.closed == 1


async def test_until_stopped_ends_work_that_swallows_the_cancellation() -> None:
    stopping = asyncio.Event()
    swallowed: list[str] = []

    async def stubborn() -> str:
        for _ in range(3):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                swallowed.append("cancel")
                if len(swallowed) == 2:
                    raise
        return "never"

    async def stop_soon() -> None:
        await asyncio.sleep(0)
        stopping.set()

    stopper = asyncio.create_task(stop_soon())
    result = await asyncio.wait_for(until_stopped(stopping, stubborn(), name="stubborn"), BOUND_S)
    await stopper
    assert result is STOPPED and swallowed == ["cancel", "cancel"]


async def test_the_kernel_beats_while_a_connection_is_up() -> None:
    beaten = asyncio.Event()
    ctx = DrivenContext(liveness_s=0.03)

    def beat() -> None:
        ctx.beats += 1
        if ctx.beats >= 3:
            beaten.set()

    ctx.beat = beat  # type: ignore[method-assign]
    link = GateLink(serve_obeys_stop=False)
    task = asyncio.create_task(run_link(ctx, link, LinkPolicy(stop_grace_s=0.01)))
    await asyncio.wait_for(beaten.wait(), BOUND_S)  # serve never beats: the kernel does
    ctx.stopping.set()
    await asyncio.wait_for(task, BOUND_S)


async def test_connect_timeout_is_a_retry() -> None:
    ctx = DrivenContext()
    link = GateLink(connect_blocks=True)
    original = link.on_down

    async def stop_after_first(down: LinkDown) -> None:
        await original(down)
        ctx.stopping.set()

    link.on_down = stop_after_first  # type: ignore[method-assign]
    await asyncio.wait_for(run_link(ctx, link, LinkPolicy(connect_timeout_s=0.01)), BOUND_S)
    assert link.cancelled == ["connect"]
    assert link.downs[0].phase == "connect" and "timed out" in link.downs[0].error


# -- until_stopped -------------------------------------------------------------------------------


async def test_until_stopped_returns_the_result_or_raises_the_error_unwrapped() -> None:
    stopping = asyncio.Event()

    async def answer() -> int:
        return 42

    async def fail() -> int:
        raise OSError(113, "no route")

    assert await until_stopped(stopping, answer()) == 42
    with pytest.raises(OSError, match="no route"):
        await until_stopped(stopping, fail())
    assert not other_tasks()


async def test_until_stopped_cancels_the_work_when_stopping_comes_first() -> None:
    stopping = asyncio.Event()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    race = asyncio.create_task(until_stopped(stopping, forever(), name="poll", owner="ntp"))
    await asyncio.wait_for(started.wait(), BOUND_S)
    assert any(t.get_name() == "dcud[ntp:poll]" for t in other_tasks())
    stopping.set()
    assert await asyncio.wait_for(race, BOUND_S) is STOPPED
    assert cancelled.is_set() and not other_tasks()
    assert await until_stopped(stopping, forever()) is STOPPED  # already stopping: never started


async def test_until_stopped_timeout_raises_and_cancels() -> None:
    never = asyncio.Event()
    with pytest.raises(TimeoutError):
        await until_stopped(asyncio.Event(), never.wait(), timeout_s=0.01)
    assert not other_tasks()


async def test_until_stopped_caller_cancelled_leaves_no_task() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    race = asyncio.create_task(until_stopped(asyncio.Event(), forever()))
    await asyncio.wait_for(started.wait(), BOUND_S)
    race.cancel()
    with pytest.raises(asyncio.CancelledError):
        await race
    assert not other_tasks()


def test_error_log_logs_once_per_change() -> None:
    log = RecordingLog()
    errors = ErrorLog(log, "push failed", level="error", target="x")
    assert errors.report("a") and not errors.report("a") and errors.report("b")
    errors.forget()
    assert errors.report("b")
    assert [(lvl, msg, f["error"], f["target"]) for lvl, msg, f in log.lines] == [
        ("error", "push failed", "a", "x"),
        ("error", "push failed", "b", "x"),
        ("error", "push failed", "b", "x"),
    ]
