"""The windowed QoS 1 publisher against a real Mosquitto: the bound on messages awaiting PUBACK across
overlapping calls, order on the wire, and a stalled broker failing the whole window (every call raises,
later calls at once)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiomqtt
import pytest

from dcud.service.mqtt_window import QosWindow
from dcud.sim.peers import Mosquitto

BOUND_S = 30.0


class CountingClient(aiomqtt.Client):
    """Counts publishes awaiting their PUBACK (the most at once)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.awaiting = 0
        self.most_awaiting = 0

    async def publish(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.awaiting += 1
        self.most_awaiting = max(self.most_awaiting, self.awaiting)
        try:
            await super().publish(*args, **kwargs)
        finally:
            self.awaiting -= 1


async def test_overlapping_calls_share_the_bound_and_keep_their_order(broker: Mosquitto) -> None:
    received: list[str] = []
    ready = asyncio.Event()

    async def subscriber() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="window-sub") as sub:
            await sub.subscribe("w/#", qos=1)
            ready.set()
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                received.append(message.payload.decode())
                if len(received) == 300:
                    return

    async with asyncio.timeout(BOUND_S), asyncio.TaskGroup() as tg:
        sub_task = tg.create_task(subscriber())
        await ready.wait()
        async with CountingClient("127.0.0.1", broker.port, identifier="window-pub") as client:
            window = QosWindow(client, 8)

            def messages(c: str) -> list[tuple[str, bytes]]:
                return [(f"w/{c}", f"{c}-{i}".encode()) for i in range(100)]

            counts = await asyncio.gather(*(window.publish(messages(c)) for c in "abc"))
        await sub_task
    assert counts == [100, 100, 100] and window.published == 300
    assert 1 < client.most_awaiting <= 8  # the window was used and never exceeded
    for c in "abc":  # each call's messages arrive in its order
        assert [m for m in received if m.startswith(c)] == [f"{c}-{i}" for i in range(100)]


async def test_a_stalled_broker_fails_the_window_for_every_call(broker: Mosquitto) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="window-stall", timeout=1.0) as client:
        window = QosWindow(client, 4)
        assert await window.publish([("s/x", b"before")]) == 1
        broker.process.send_signal(signal.SIGSTOP)  # alive, but no PUBACK ever comes
        try:
            async with asyncio.timeout(BOUND_S):
                results = await asyncio.gather(
                    window.publish((f"s/{i}", b"x") for i in range(10)),
                    window.publish((f"s/{i}", b"y") for i in range(10)),
                    return_exceptions=True,
                )
        finally:
            broker.process.send_signal(signal.SIGCONT)
        assert all(isinstance(r, aiomqtt.MqttError) for r in results), results
        assert isinstance(window.failure, aiomqtt.MqttError) and window.in_flight == 0
        with pytest.raises(aiomqtt.MqttError):
            await window.publish([("s/after", b"z")])  # at once: the window is failed for good
