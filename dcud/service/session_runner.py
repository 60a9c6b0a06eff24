"""Drives a sans-I/O protocol session (h11/aioquic style) against a leased port.

A session is any object with ``start(now)``, ``receive_data(data, now)``, ``handle_timer(now)`` (each
returning a list of actions) and ``next_deadline()``; ``now`` is the event loop's monotonic clock. The
actions are the shared types of :mod:`dcud.codec.actions`, matched by type, so the IEC 62056-21, M-Bus,
DLMS/COSEM and Modbus RTU sessions (and any later one) share this driver:

============== =====================================================
``Send``       ``port.write(action.data)``
``Drain``      ``await port.drain()`` (the UART has sent everything)
``SetBaud``    ``await port.set_baud(action.baud)`` (drains first)
``SetFraming`` ``await port.set_framing(action.framing)`` (drains first)
``Flush``      ``port.flush_input()``
``Done``       return ``action.result``
``Failed``     raise ``action.error``
============== =====================================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dcud.codec.actions import Done, Drain, Failed, Flush, Send, SetBaud, SetFraming
from dcud.errors import LocalProtocolError

READ_CHUNK_BYTES = 4096
MAX_STEPS = 1_000_000
"""A session that neither finishes nor stops asking is a bug; this bounds the loop anyway."""


class Session(Protocol):
    """The sans-I/O session interface (see the module docstring)."""

    def start(self, now: float) -> Sequence[object]:
        """First actions."""
        ...

    def receive_data(self, data: bytes, now: float) -> Sequence[object]:
        """Actions after receiving ``data`` at ``now``."""
        ...

    def handle_timer(self, now: float) -> Sequence[object]:
        """Actions once ``now`` has reached :meth:`next_deadline`."""
        ...

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is due, or None."""
        ...


class SessionPort(Protocol):
    """What the runner needs of a port (a :class:`~dcud.service.line.LeasedPort` has all of it)."""

    def write(self, data: bytes) -> object:
        """Queue bytes."""
        ...

    async def drain(self) -> None:
        """Wait until they are on the wire."""
        ...

    async def read(self, max_bytes: int = ..., timeout_s: float = ...) -> bytes:
        """Read what arrived, ``b""`` after ``timeout_s``."""
        ...

    async def set_baud(self, baud: int) -> None:
        """Drain and switch rate."""
        ...

    async def set_framing(self, framing: str) -> None:
        """Drain and switch the character framing (``"8N1"``...)."""
        ...

    def flush_input(self) -> None:
        """Drop unread input."""
        ...


_NOT_DONE = object()


async def _perform(actions: Sequence[object], port: SessionPort) -> Any:
    """Carry out ``actions``; returns the Done result, or ``_NOT_DONE``."""
    for action in actions:
        match action:
            case Send(data=data):
                port.write(data)
            case Drain():
                await port.drain()
            case SetBaud(baud=baud):
                await port.set_baud(baud)
            case SetFraming(framing=framing):
                await port.set_framing(framing)
            case Flush():
                port.flush_input()
            case Done(result=result):
                return result
            case Failed(error=error):
                if isinstance(error, BaseException):
                    raise error
                raise LocalProtocolError(f"session failed with a non-exception {error!r}")
            case _:
                raise LocalProtocolError(f"unknown session action {action!r}")
    return _NOT_DONE


async def run_session(
    session: Session,
    port: SessionPort,
    *,
    on_progress: Callable[[Session], None] | None = None,
) -> Any:
    """Run ``session`` to its end on ``port``; returns the ``Done`` result or raises the ``Failed`` error.

    ``on_progress`` is called after every step (scans use it for their progress bar). Transport
    failures propagate as :class:`~dcud.errors.TransportError`.
    """
    loop = asyncio.get_running_loop()
    actions = session.start(loop.time())
    for _ in range(MAX_STEPS):
        result = await _perform(actions, port)
        if result is not _NOT_DONE:
            return result
        if on_progress is not None:
            on_progress(session)
        deadline = session.next_deadline()
        if deadline is None:
            raise LocalProtocolError(f"{type(session).__name__} neither finished nor set a deadline")
        now = loop.time()
        if now >= deadline:
            actions = session.handle_timer(now)
            continue
        data = await port.read(READ_CHUNK_BYTES, deadline - now)
        actions = session.receive_data(data, loop.time()) if data else []
    raise LocalProtocolError(f"{type(session).__name__} did not finish within {MAX_STEPS} steps")


__all__ = ["Session", "SessionPort", "run_session"]
