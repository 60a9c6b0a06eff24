"""Outbox drain to a local Mosquitto: items/s delivered with QoS 1 (PUBACK) and acked in the outbox.

Prefills N readings (as after an outage), then starts the real MQTT service and times the drain until
the outbox backlog is empty and a subscriber has received every item. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import aiomqtt

from dcud.config.model import MqttConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import Supervisor, SupervisorOptions
from dcud.service.commands import CommandRouter
from dcud.service.mqtt import MqttService, MqttServiceConfig
from dcud.service.outbox import Outbox, OutboxLimits
from dcud.sim.peers import start_mosquitto

ITEMS = int(os.environ.get("BENCH_ITEMS", "20000"))
PREFIX = "dcu/bench"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = start_mosquitto(workdir / "broker")
        outbox = Outbox(workdir / "outbox.sqlite", OutboxLimits(max_bytes=1 << 30), ["mqtt"], "bench")
        await outbox.open()
        payload = {"meter": "m", "values": [{"id": "1.8.0", "value": 1234.5, "unit": "kWh"}]}
        batch = 1000
        for first in range(0, ITEMS, batch):
            await outbox.put_many(
                [
                    ("reading", "meter/m/reading", json.dumps({**payload, "seq": i}).encode())
                    for i in range(first, min(ITEMS, first + batch))
                ]
            )
        received = 0
        done = asyncio.Event()

        async def subscriber(ready: asyncio.Event) -> None:
            nonlocal received
            async with aiomqtt.Client("127.0.0.1", broker.port, max_queued_incoming_messages=0) as client:
                await client.subscribe(f"{PREFIX}/meter/+/reading", qos=1)
                ready.set()
                async for _ in client.messages:
                    received += 1
                    if received >= ITEMS:
                        done.set()
                        return

        ready = asyncio.Event()
        sub = asyncio.create_task(subscriber(ready))
        await ready.wait()
        settings = MqttConfig(url=broker.url, status_interval_s=3600)
        service = MqttService(
            MqttServiceConfig.build(settings, "bench", PREFIX),
            EventBus(),
            outbox,
            CommandRouter(),
            lambda: {},
        )
        sup = Supervisor([service], options=SupervisorOptions(grace_s=5))
        started = time.monotonic()
        runner = asyncio.create_task(sup.run())
        async with asyncio.timeout(600):
            await done.wait()
            # The outbox acks trail the PUBACKs by one batch; its stats have no change event to await.
            while outbox.stats().backlog["mqtt"]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        elapsed = time.monotonic() - started
        sup.request_stop()
        await runner
        sub.cancel()
        await outbox.close()
        broker.stop()
    print(
        json.dumps(
            {
                "bench": "mqtt_drain",
                "items": ITEMS,
                "drain_items_per_s": round(ITEMS / elapsed),
                "elapsed_s": round(elapsed, 2),
                "inflight": settings.inflight,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
