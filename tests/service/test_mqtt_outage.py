"""Broker outage: the backlog waits in the outbox and drains in order, at least once, on recovery.

Real Mosquitto (with persistence, so the head-end subscriber's session survives the outage), the real
outbox and the real MQTT service under the supervisor, all in this process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from dcud.config.model import MqttConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import Supervisor, SupervisorOptions
from dcud.service.commands import CommandRouter
from dcud.service.mqtt import MqttService, MqttServiceConfig
from dcud.service.outbox import Outbox, OutboxLimits
from dcud.sim.peers import start_mosquitto

from helpers.daemon import start_daemon, write_site
from helpers.meters import wait_until
from helpers.notify import NotifySocket

pytestmark = pytest.mark.slow
PREFIX = "dcu/outage"


async def collect(port: int, expected: int, seen: list[int], timeout_s: float = 60.0) -> None:
    """A persistent-session head-end subscriber: appends every received seq until ``expected`` distinct."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="hes-1", clean_session=False) as client:
        await client.subscribe(f"{PREFIX}/meter/+/reading", qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                seen.append(int(json.loads(message.payload)["seq"]))
                if len(set(seen)) >= expected:
                    return


async def test_outage_then_ordered_catch_up(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "broker", persistence=True)
    port = broker.port
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), consumers=["mqtt"], device_id="outage")
    await outbox.open()
    settings = MqttConfig(url=broker.url, inflight=16, reconnect_max_s=1.0, status_interval_s=30)
    service = MqttService(
        MqttServiceConfig.build(settings, "outage", PREFIX), EventBus(), outbox, CommandRouter(), lambda: {}
    )
    sup = Supervisor([service], options=SupervisorOptions(grace_s=2))
    runner = asyncio.create_task(sup.run())
    seen: list[int] = []
    try:
        # The subscriber's session exists before anything is published.
        async with aiomqtt.Client("127.0.0.1", port, identifier="hes-1", clean_session=False) as client:
            await client.subscribe(f"{PREFIX}/meter/+/reading", qos=1)

        async def put(first: int, count: int) -> None:
            for seq in range(first, first + count):
                payload = json.dumps({"meter": "m1", "seq": seq, "values": []}).encode()
                await outbox.put("reading", "meter/m1/reading", payload)

        await put(0, 50)
        await collect(port, 50, seen)
        broker.stop()
        await put(50, 400)  # committed while the broker is down
        await wait_until(lambda: not service.connected, 5.0)
        assert outbox.stats().backlog["mqtt"] >= 400
        broker = start_mosquitto(tmp_path / "broker", port=port, persistence=True)
        await collect(port, 450, seen)
        # acks reach the outbox shortly after the PUBACKs
        await wait_until(lambda: outbox.stats().backlog["mqtt"] == 0, 10.0)
    finally:
        sup.request_stop()
        await asyncio.wait_for(runner, 10)
        await outbox.close()
        broker.stop()
    assert set(seen) == set(range(450))  # nothing lost
    first_seen: list[int] = []
    for seq in seen:
        if seq not in first_seen:
            first_seen.append(seq)
    assert first_seen == sorted(first_seen)  # delivered in order (duplicates allowed: at least once)
    assert outbox.stats().backlog["mqtt"] == 0


async def test_high_water_raised_as_event(tmp_path: Path, notify_socket: NotifySocket) -> None:
    broker = start_mosquitto(tmp_path / "broker")
    try:
        config = write_site(
            tmp_path / "site",
            mqtt_url=broker.url,
            toml_extra="[outbox]\nmax_bytes = 65536\nhigh_water_ratio = 0.5\n",
        )
        state = tmp_path / "site" / "state"
        state.mkdir(parents=True)
        # A backlog left by an earlier run: 60% of the bound, undelivered.
        prefill = Outbox(state / "outbox.sqlite", OutboxLimits(max_bytes=65536), ["mqtt"], "dcu-test")
        await prefill.open()
        for seq in range(40):
            await prefill.put(
                "reading", "meter/m1/reading", json.dumps({"seq": seq, "pad": "x" * 900}).encode()
            )
        await prefill.close()
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe("dcu/dcu-test/event", qos=1)
            proc = start_daemon(config, notify_socket)
            try:
                events = []
                async with asyncio.timeout(20):
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        events.append(json.loads(message.payload))
                        if events[-1]["type"] == "outbox_high_water":
                            break
                assert events[-1]["max_bytes"] == 65536
                assert "uid" not in events[-1] or events[-1]["uid"]
            finally:
                proc.terminate()
                proc.wait(timeout=20)
    finally:
        broker.stop()
