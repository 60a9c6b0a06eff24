"""Blocking calls off the event loop in daemon threads that never hold up a stop.

``asyncio.to_thread`` uses the default executor, and ``asyncio.run`` waits for its threads at exit: one
blocking socket call with a 60 s timeout (ntplib waits out its timeout on an unanswered UDP request)
would then delay a graceful stop by a minute. A daemon thread per call is cheap at the rates dcud needs
(one NTP query per interval) and is abandoned, not awaited, when the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def in_daemon_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` in a new daemon thread and await its result; cancelling abandons the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle_result(value: T) -> None:
        if not future.done():
            future.set_result(value)

    def settle_error(exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    def worker() -> None:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task, which decides
            # RuntimeError: the loop is closed, nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle_error, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle_result, value)

    threading.Thread(target=worker, name=f"dcud-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future
