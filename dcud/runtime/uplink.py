"""Uplink reconnect requests: the connectivity watchdog asks, uplink services (MQTT...) obey.

One :class:`UplinkReconnect` lives in the runtime for the life of the process (it survives reloads, so
a service instance kept across a reload still sees requests). A service remembers :attr:`epoch` when it
connects and awaits :meth:`wait_newer` next to its work; when it returns, the service drops its
connection and connects again.
"""

from __future__ import annotations

import asyncio


class UplinkReconnect:
    """A counter of reconnect requests with a wake-up for waiters."""

    def __init__(self) -> None:
        self.epoch = 0
        self.reason = ""
        self._changed = asyncio.Event()

    def request(self, reason: str) -> None:
        """Ask every uplink to reconnect (non-blocking; safe from any coroutine)."""
        self.epoch += 1
        self.reason = reason
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_newer(self, epoch: int) -> str:
        """Return (the reason) once a request newer than ``epoch`` was made."""
        while self.epoch <= epoch:
            await self._changed.wait()
        return self.reason
