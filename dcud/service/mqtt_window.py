"""The one windowed QoS 1 publisher: the MQTT uplink and the MQTT data push both publish through it.

A well-behaved client of any broker (design.md section 1) keeps a bounded number of QoS 1 messages
awaiting their PUBACK. :class:`QosWindow` is that bound for one connection:

- :meth:`QosWindow.publish` publishes a batch and returns once every message of it is PUBACKed; at
  most ``size`` messages of all calls together await their PUBACK at once (the MQTT uplink runs
  several batches at once through one window, to keep it full while it acks the earlier ones in the
  outbox);
- the first publish that fails fails the window: every other publish in flight (of any call) is
  cancelled, every call raises that error, and so does every later call. A failed publish means the
  connection is gone; the next connection gets a new window. The caller gives the batch back to the
  outbox (:mod:`dcud.service.outbox_sink` does), so nothing is lost and nothing half-known is acked.

Publishes run as named helper tasks (``dcud[<service>:publish]``) inside a TaskGroup of the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiomqtt

from dcud.runtime.link import child_name, first_error

__all__ = ["QosWindow"]


class QosWindow:
    """At most ``size`` QoS 1 messages of ``client`` awaiting PUBACK; one failure fails the window."""

    def __init__(self, client: aiomqtt.Client, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        self.client = client
        self.size = size
        self.failure: BaseException | None = None
        """The error that failed the window (None while it works)."""
        self.published = 0
        """Messages PUBACKed through this window."""
        self._room = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        """Messages published and not yet PUBACKed."""
        return len(self._tasks)

    async def publish(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Publish ``(topic, payload)`` pairs (QoS 1, not retained); return how many, all PUBACKed.

        Raises the error of the first publish that failed (``aiomqtt.MqttError``, ``TimeoutError``), in
        this call or another one: the window is then failed for good.
        """
        self._check()
        count = 0
        name = child_name("publish")
        try:
            async with asyncio.TaskGroup() as tg:
                for topic, payload in messages:
                    await self._room.acquire()
                    if self.failure is not None:
                        self._room.release()
                        break
                    task = tg.create_task(self._one(topic, payload), name=name)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    count += 1
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        self._check()  # another call's failure cancelled publishes of this one
        return count

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def _one(self, topic: str, payload: bytes) -> None:
        try:
            await self.client.publish(topic, payload, qos=1, retain=False)
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
                me = asyncio.current_task()
                for task in list(self._tasks):
                    if task is not me:
                        task.cancel()
            raise
        else:
            self.published += 1
        finally:
            self._room.release()
