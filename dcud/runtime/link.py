"""The link kernel: the one implementation of a long-lived connection's life (design.md rule 8).

A *link* is anything dcud keeps open and opens again when it fails: the MQTT uplink, the EI client's
connection to the head-end, a serial line, a CAN bus, the config port's listening socket. Each
used to carry its own copy of "connect, serve, back off, log once"; now each supplies two callbacks
and a :class:`LinkPolicy`, and :func:`run_link` does the rest::

    class BrokerLink(Link[aiomqtt.Client]):
        down_message = "broker unavailable"

        def connect(self) -> AbstractAsyncContextManager[aiomqtt.Client]:
            return aiomqtt.Client(...)          # entered to connect, exited to close

        async def serve(self, client: aiomqtt.Client) -> str:
            ...                                  # until the connection ends (or ctx.stopping is set)
            return "closed by the broker"        # why it ended; or raise a retry error

    await run_link(ctx, BrokerLink(), LinkPolicy(initial_s=1, max_s=60, retry_on=(MqttError,)))

States (:class:`LinkState`, kept in :attr:`Link.state`)::

                 +-----------------------------------------------------+
                 v                                                     |
    CONNECTING --(connect() entered)--> UP --(serve() ended or raised  |
        |                                |    a retry error, or          |
        | retry error, or                |    a reconnect request)       |
        | connect_timeout_s              v                               |
        +--------------------------> BACKOFF --(delay over)------------+

    every state --(ctx.stopping)--> STOPPED; an error outside ``policy.retry_on`` --> raised (fatal)

Rules, the same for every link:

- **Backoff** (:class:`~dcud.runtime.backoff.Backoff`, exponential with jitter between
  ``initial_s`` and ``max_s``) after every failure. It goes back to ``initial_s`` only after a
  connection that stayed up at least ``stable_s``: a peer that accepts and drops at once keeps
  backing off instead of being hammered every ``initial_s``.
- **One log line per change of error** (:class:`ErrorLog`): a failure is logged (``down_message``,
  or ``lost_message`` when an up connection ended) when its text differs from the last one logged;
  coming up clears the memory, so every loss after an up is logged once.
- **Reconnect on request**: with an :class:`~dcud.runtime.uplink.UplinkReconnect`, a request made
  while the link is up cancels ``serve`` and the link goes through BACKOFF to CONNECTING again.
- **Stop at any point**: a connect in progress is cancelled at once; ``serve`` is expected to
  return by itself once ``ctx.stopping`` is set (to say goodbye: MQTT publishes its offline
  status) and is cancelled after ``stop_grace_s`` when it does not; a backoff delay ends at once.
- **Errors are classified**: those in ``policy.retry_on`` (raised by ``connect``/``serve``/closing)
  mean "back off and connect again"; anything else propagates out of :func:`run_link`, so the
  supervisor restarts the service (or gives up on it).
- **Named tasks**: connect, serve and the watchers run as ``dcud[<ctx.name>:connect]``,
  ``dcud[<ctx.name>:serve]``, ``dcud[<ctx.name>:reconnect]``..., children of the calling task
  inside a TaskGroup; none outlives :func:`run_link`.
- **Liveness**: the kernel beats ``ctx`` at least every ``ctx.liveness_s / 3`` in every state.

:func:`until_stopped` is the other half of the module: the one way to race a piece of work against
``ctx.stopping`` (an NTP query that may block for its timeout, a wait for a port to close...).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Literal, Protocol, TypeVar, cast

from dcud.runtime.backoff import Backoff
from dcud.runtime.uplink import UplinkReconnect

__all__ = [
    "STOPPED",
    "ErrorLog",
    "Link",
    "LinkContext",
    "LinkDown",
    "LinkPolicy",
    "LinkState",
    "Stopped",
    "cancel_until_done",
    "child_name",
    "describe_error",
    "first_error",
    "run_link",
    "until_stopped",
]

T = TypeVar("T")
C = TypeVar("C")


class Stopped(enum.Enum):
    """The type of :data:`STOPPED` (a one-member enum, so that ``result is STOPPED`` narrows types)."""

    STOPPED = "stopped"


STOPPED: Final = Stopped.STOPPED
"""What :func:`until_stopped` returns when the stop request came first."""


def _task_name(owner: str, item: str) -> str:
    return f"dcud[{owner}:{item}]"


def _owner_name() -> str:
    """The ``<service>`` part of the current task's ``dcud[<service>:<item>]`` name (else ``dcud``)."""
    task = asyncio.current_task()
    name = task.get_name() if task is not None else ""
    if name.startswith("dcud[") and name.endswith("]") and ":" in name:
        return name[5:-1].split(":", 1)[0]
    return "dcud"


def child_name(item: str) -> str:
    """``dcud[<service>:<item>]`` for a helper task of the current task (which awaits or cancels it)."""
    return _task_name(_owner_name(), item)


async def cancel_until_done(
    task: asyncio.Task[Any], step_s: float = 1.0, beat: Callable[[], None] | None = None
) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``step_s`` while it runs on.

    Once is not always enough: Python 3.11's ``asyncio.wait_for`` (aiomqtt's publish and subscribe wait
    with it) returns its result instead of raising when the cancellation arrives in the loop turn in which
    its inner future completes. The task has then swallowed the cancellation and would go on serving a
    connection its owner has given up (a reconnect request that never reconnects). ``beat`` is called
    after each step (the service's liveness).
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=step_s)
        if beat is not None:
            beat()


async def until_stopped(
    stopping: asyncio.Event,
    work: Awaitable[T],
    *,
    timeout_s: float | None = None,
    name: str = "work",
    owner: str | None = None,
    on_stop: Callable[[], None] | None = None,
) -> T | Stopped:
    """Await ``work`` unless ``stopping`` is set first: then cancel it and return :data:`STOPPED`.

    ``work``'s result is returned and its exception raised as they are (not wrapped in a group).
    With ``timeout_s``, ``work`` is cancelled and ``TimeoutError`` raised when it takes longer.
    With ``on_stop``, a stop calls it instead of cancelling ``work`` (which is to end by itself
    then, e.g. a session told to close gracefully) and waits for ``work`` to end.
    ``work`` runs as the task ``dcud[<owner>:<name>]`` (owner: the current task's service) and is
    gone when this returns, whichever way it returns (also when the caller is cancelled).
    """
    if stopping.is_set():
        if isinstance(work, Coroutine):
            work.close()
        return STOPPED
    box: list[tuple[bool, Any]] = []

    async def guarded() -> None:
        try:
            box.append((True, await work))
        except Exception as exc:  # handed to the caller below, unwrapped
            box.append((False, exc))

    who = owner or _owner_name()
    timed_out = False
    async with asyncio.TaskGroup() as tg:
        worker = tg.create_task(guarded(), name=_task_name(who, name))
        stopper = tg.create_task(stopping.wait(), name=_task_name(who, f"{name}:stopping"))
        await asyncio.wait({worker, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if on_stop is not None and not worker.done() and stopping.is_set():
            on_stop()
            await asyncio.wait({worker})
        if not worker.done():
            timed_out = not stopping.is_set()
            await cancel_until_done(worker)
    if box:
        ok, value = box[0]
        if ok:
            return cast(T, value)
        raise value
    if stopping.is_set():
        return STOPPED
    if timed_out:
        raise TimeoutError(f"{name}: no result within {timeout_s} s")
    raise asyncio.CancelledError  # the work cancelled itself


def describe_error(exc: BaseException) -> str:
    """Short text of an error for logs and state documents (an OSError by its strerror)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return str(exc) or "timeout"
    return str(exc) or type(exc).__name__


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error inside (possibly nested) exception groups: what a TaskGroup of helpers
    failed with, raised on as it is so that callers classify it (``retry_on``) like a direct error."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class ErrorLog:
    """Logs a failure once per change of its text: "once per state change, not once per retry".

    Used by the link kernel for its links, and on its own by periodic jobs that are no links
    (the device-manager push, the UDP event push).
    """

    def __init__(self, log: Any, message: str, *, level: str = "warning", **fields: object) -> None:
        self._log = log
        self.message = message
        self.level = level
        self.fields = fields
        self.last = ""
        """The error text logged last ("" after :meth:`forget`)."""

    def report(self, error: str, *, message: str | None = None, **fields: object) -> bool:
        """Log ``error`` unless it is the one logged last; True when it was logged."""
        if error == self.last:
            return False
        self.last = error
        getattr(self._log, self.level)(message or self.message, **self.fields, **fields, error=error)
        return True

    def forget(self) -> None:
        """The failure is over (the link came up): the next one is logged even if it is the same."""
        self.last = ""


class LinkContext(Protocol):
    """What :func:`run_link` needs of its caller (a :class:`~dcud.runtime.supervisor.ServiceContext`)."""

    @property
    def name(self) -> str:
        """Task names are ``dcud[<name>:<item>]``."""
        ...

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the link must end."""
        ...

    @property
    def liveness_s(self) -> float:
        """The kernel beats at least every third of it."""
        ...

    @property
    def log(self) -> Any:
        """A structlog logger: the link's down lines go there."""
        ...

    def beat(self) -> None:
        """Tell the watchdog the service makes progress."""
        ...

    async def sleep(self, delay_s: float) -> bool:
        """Sleep up to ``delay_s``; True when stopping meanwhile."""
        ...


class LinkState(enum.StrEnum):
    """Where a link is in its life (module docstring)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    UP = "up"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(frozen=True)
class LinkPolicy:
    """How one link backs off, when it counts as stable, and which errors are worth a retry.

    The differences between links live here (and in their callbacks), not in copies of the loop.
    """

    initial_s: float = 1.0
    """First delay after a failure."""
    max_s: float = 60.0
    """Longest delay (the delays double up to it)."""
    factor: float = 2.0
    jitter: float = 0.5
    """Fraction of each delay that is random, so that a fleet does not reconnect in step."""
    stable_s: float = 60.0
    """A connection up at least this long resets the backoff (0: every successful connect does)."""
    connect_timeout_s: float | None = None
    """Bound on ``connect()`` (None: the link's own timeouts bound it)."""
    stop_grace_s: float = 3.0
    """How long ``serve`` may take to return by itself once stopping is set before it is cancelled."""
    retry_on: tuple[type[BaseException], ...] = (OSError,)
    """Errors that mean "back off and connect again"; any other error is fatal (raised)."""

    def backoff(self) -> Backoff:
        """A fresh backoff with these bounds."""
        return Backoff(self.initial_s, self.max_s, self.factor, self.jitter)


@dataclass(frozen=True)
class LinkDown:
    """What :meth:`Link.on_down` is told each time the link goes down (before the backoff delay)."""

    error: str
    """The failure's text (``describe``), or the reason ``serve`` returned."""
    phase: Literal["connect", "serve", "reconnect"]
    """Connecting failed; or the up connection ended (``serve`` returned or raised); or a reconnect
    was requested."""
    exc: BaseException | None
    """The exception, when the link went down by one."""
    up_s: float | None
    """How long the connection was up (None: it never came up)."""
    delay_s: float
    """The backoff delay that follows."""
    logged: bool
    """Whether the kernel logged this failure (it is a change of error)."""


class Link(Generic[C]):
    """One long-lived connection, as :func:`run_link` drives it (python-can's ``BusABC`` style).

    Subclasses override :meth:`connect` and :meth:`serve`, and may override :meth:`describe`,
    :meth:`on_down`, :meth:`log_fields` and the class attributes for their log lines.
    """

    down_message: ClassVar[str] = "link down"
    """Logged (once per change of error) when connecting fails."""
    lost_message: ClassVar[str | None] = None
    """Logged when an up connection ends (None: ``down_message``)."""
    down_level: ClassVar[str] = "warning"

    state: LinkState = LinkState.IDLE
    """Maintained by the kernel."""

    def connect(self) -> AbstractAsyncContextManager[C]:
        """The connection as an async context manager: entered to connect, exited to close.

        Entering may be cancelled (stop, ``connect_timeout_s``): it must then leave nothing open.
        """
        raise NotImplementedError

    async def serve(self, conn: C) -> str:
        """Use the connection until it ends; return why ("closed by peer"), or raise a retry error.

        Must return soon after ``ctx.stopping`` is set (it is cancelled after ``stop_grace_s``).
        """
        raise NotImplementedError

    def describe(self, exc: BaseException) -> str:
        """The text of a failure (logs, state documents)."""
        return describe_error(exc)

    def log_fields(self) -> Mapping[str, object]:
        """Fields of the down log lines (which broker, which line...)."""
        return {}

    async def on_down(self, down: LinkDown) -> None:
        """Called every time the link goes down, before the backoff delay (publish a state...)."""
        return None


@dataclass
class _Done:
    value: Any


@dataclass
class _Failed:
    exc: Exception


@dataclass
class _Interrupted:
    why: Literal["stopped", "reconnect", "timeout"]
    detail: str = ""


_Outcome = _Done | _Failed | _Interrupted


class _Runner(Generic[C]):
    def __init__(
        self,
        ctx: LinkContext,
        link: Link[C],
        policy: LinkPolicy,
        reconnect: UplinkReconnect | None,
        monotonic: Callable[[], float],
    ) -> None:
        self.ctx = ctx
        self.link = link
        self.policy = policy
        self.reconnect = reconnect
        self.monotonic = monotonic
        self.errors = ErrorLog(ctx.log, link.down_message, level=link.down_level)

    def _retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.policy.retry_on)

    async def run(self) -> None:
        ctx, link, policy = self.ctx, self.link, self.policy
        backoff = policy.backoff()
        try:
            while not ctx.stopping.is_set():
                link.state = LinkState.CONNECTING
                down = await self._connect_and_serve()
                if down is None:  # stopping
                    return
                error, phase, exc, up_s = down
                if up_s is not None and up_s >= policy.stable_s:
                    backoff.reset()
                delay_s = backoff.next_delay_s()
                message = link.down_message if phase == "connect" else (link.lost_message or None)
                logged = self.errors.report(error, message=message, **link.log_fields())
                link.state = LinkState.BACKOFF
                await link.on_down(LinkDown(error, phase, exc, up_s, delay_s, logged))
                if await self._sleep(delay_s):
                    return
        finally:
            link.state = LinkState.STOPPED

    async def _connect_and_serve(
        self,
    ) -> tuple[str, Literal["connect", "serve", "reconnect"], BaseException | None, float | None] | None:
        """One pass: connect, serve, close. None when stopping; else (error, phase, exc, up_s)."""
        link, policy = self.link, self.policy
        manager = link.connect()
        entered = await self._watch(manager.__aenter__(), "connect", timeout_s=policy.connect_timeout_s)
        if isinstance(entered, _Interrupted):
            if entered.why == "stopped":
                return None
            error = f"connect timed out after {policy.connect_timeout_s:g} s"
            return error, "connect", TimeoutError(error), None
        if isinstance(entered, _Failed):
            if not self._retryable(entered.exc):
                raise entered.exc
            return link.describe(entered.exc), "connect", entered.exc, None
        conn: C = entered.value
        if self.ctx.stopping.is_set():  # connected in the same instant the stop came
            await self._close(manager, None)
            return None
        link.state = LinkState.UP
        self.errors.forget()
        up_at = self.monotonic()
        epoch = self.reconnect.epoch if self.reconnect is not None else 0
        try:
            served = await self._watch(link.serve(conn), "serve", epoch=epoch, grace_s=policy.stop_grace_s)
        except BaseException as exc:  # cancelled from outside: close, then go on being cancelled
            with contextlib.suppress(Exception):
                await self._close(manager, exc)
            raise
        failure = served.exc if isinstance(served, _Failed) else None
        try:
            await self._close(manager, failure)
        except Exception as exc:
            if not self._retryable(exc):
                raise
            if isinstance(served, _Done) and not self.ctx.stopping.is_set():
                served = _Failed(exc)  # closing was the first sign of trouble
        up_s = self.monotonic() - up_at
        if isinstance(served, _Failed):
            if not self._retryable(served.exc):
                raise served.exc
            if self.ctx.stopping.is_set():
                return None
            return link.describe(served.exc), "serve", served.exc, up_s
        if self.ctx.stopping.is_set():
            return None
        if isinstance(served, _Interrupted):
            return f"reconnect requested: {served.detail}", "reconnect", None, up_s
        return str(served.value or "closed"), "serve", None, up_s

    @staticmethod
    async def _close(manager: AbstractAsyncContextManager[C], exc: BaseException | None) -> None:
        await manager.__aexit__(
            type(exc) if exc is not None else None, exc, exc.__traceback__ if exc else None
        )

    async def _watch(
        self,
        work: Coroutine[Any, Any, Any],
        item: str,
        *,
        timeout_s: float | None = None,
        epoch: int | None = None,
        grace_s: float = 0.0,
    ) -> _Outcome:
        """Run ``work`` as ``dcud[<name>:<item>]`` while watching stop, reconnect and the deadline."""
        ctx = self.ctx
        name = ctx.name
        box: list[_Outcome] = []

        async def guarded() -> None:
            try:
                box.append(_Done(await work))
            except Exception as exc:  # classified by the caller
                box.append(_Failed(exc))

        loop = asyncio.get_running_loop()
        beat_s = max(0.01, ctx.liveness_s / 3)
        deadline = None if timeout_s is None else loop.time() + timeout_s
        interrupted: _Interrupted | None = None
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(guarded(), name=_task_name(name, item))
            stop = tg.create_task(ctx.stopping.wait(), name=_task_name(name, f"{item}:stopping"))
            watched: set[asyncio.Task[Any]] = {task, stop}
            again: asyncio.Task[str] | None = None
            if epoch is not None and self.reconnect is not None:
                again = tg.create_task(self.reconnect.wait_newer(epoch), name=_task_name(name, "reconnect"))
                watched.add(again)
            while not task.done():
                wait_s = beat_s if deadline is None else max(0.0, min(beat_s, deadline - loop.time()))
                done, _ = await asyncio.wait(watched, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                ctx.beat()
                if task in done:
                    break
                if stop in done:
                    if grace_s > 0:
                        await asyncio.wait({task}, timeout=grace_s)
                    interrupted = _Interrupted("stopped")
                    break
                if again is not None and again in done:
                    interrupted = _Interrupted("reconnect", again.result())
                    break
                if deadline is not None and loop.time() >= deadline:
                    interrupted = _Interrupted("timeout")
                    break
            for helper in (stop, again):
                if helper is not None and not helper.done():
                    helper.cancel()
            await cancel_until_done(task, beat_s, ctx.beat)
        if interrupted is None:
            # The work ended by itself; an empty box means it cancelled itself, which no link does.
            return box[0] if box else _Failed(RuntimeError(f"{item} cancelled itself"))
        if box:
            outcome = box[0]
            if isinstance(outcome, _Done) and interrupted.why != "reconnect":
                return outcome  # finished by itself meanwhile (a connect that succeeded must be closed)
            if isinstance(outcome, _Failed) and not self._retryable(outcome.exc):
                return outcome  # a fatal error while going away is still fatal
        return interrupted

    async def _sleep(self, delay_s: float) -> bool:
        """The backoff delay, beating at least every third of the liveness bound; True when stopping."""
        chunk_s = max(0.01, self.ctx.liveness_s / 3)
        remaining = delay_s
        while True:
            step = min(remaining, chunk_s)
            if await self.ctx.sleep(step):
                return True
            remaining -= step
            if remaining <= 0:
                return False


async def run_link(
    ctx: LinkContext,
    link: Link[C],
    policy: LinkPolicy,
    *,
    reconnect: UplinkReconnect | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Keep ``link`` up until ``ctx.stopping`` is set (module docstring); raises only fatal errors.

    ``reconnect``: requests made while the link is up end the connection and start a new one.
    ``monotonic``: the clock that measures how long a connection stayed up (tests drive it).
    """
    await _Runner(ctx, link, policy, reconnect, monotonic).run()
