"""A background MQTT subscriber that keeps what dcud publishes: events in order, retained states by topic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

import aiomqtt


class Subscriber:
    """Subscribes (QoS 1) to ``topics`` on the Mosquitto at 127.0.0.1:``port`` in a background task.

    Topics are read relative to ``prefix`` (``dcu/<device>``): the payload of ``<prefix>/event`` is
    appended to ``events``; any other message is the latest state of its topic in ``states``, keyed
    by the topic without ``<prefix>/`` and without ``/state`` (``meter/heat-1``, ``power``). Every
    message is also in ``messages`` (its full topic and payload), in arrival order. Payloads
    are JSON objects; one that is not fails the background task (seen on exit), unless
    ``skip_non_json`` (for a ``#`` subscription that also sees plain-text topics). ``async with``
    returns once the subscriptions are made; ``wait`` is bounded by ``wait_timeout_s`` unless told.
    """

    def __init__(
        self,
        port: int,
        topics: Sequence[str],
        prefix: str,
        *,
        name: str = "sub",
        skip_non_json: bool = False,
        wait_timeout_s: float = 15.0,
    ) -> None:
        self.port = port
        self.topics = tuple(topics)
        self.prefix = prefix
        self.name = name
        self.skip_non_json = skip_non_json
        self.wait_timeout_s = wait_timeout_s
        self.events: list[dict[str, Any]] = []
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.states: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        identifier = f"{self.name}-{time.monotonic_ns()}"
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=identifier) as client:
            for topic in self.topics:
                await client.subscribe(topic, qos=1)
            self._ready.set()
            async for message in client.messages:
                if self.skip_non_json and (
                    not isinstance(message.payload, bytes) or message.payload[:1] != b"{"
                ):
                    continue
                assert isinstance(message.payload, bytes)
                payload = dict(json.loads(message.payload))
                self.messages.append((message.topic.value, payload))
                topic = message.topic.value.removeprefix(self.prefix + "/")
                if topic == "event":
                    self.events.append(payload)
                else:
                    self.states[topic.removesuffix("/state")] = payload
                self.changed.set()

    async def wait(
        self, condition: Callable[[], object], what: str = "a condition", timeout_s: float | None = None
    ) -> None:
        """Until ``condition()`` holds, checked on every message; AssertionError naming ``what`` and the
        states seen after ``timeout_s`` (``wait_timeout_s`` by default)."""
        try:
            async with asyncio.timeout(self.wait_timeout_s if timeout_s is None else timeout_s):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; states: {sorted(self.states)}") from None

    async def next_change(self, timeout_s: float = 5.0) -> None:
        """Until the next message arrives, or ``timeout_s`` passes (no error then)."""
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.changed.wait()
