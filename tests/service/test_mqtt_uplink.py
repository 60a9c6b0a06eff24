"""The MQTT uplink against a real Mosquitto: retained status, LWT, ordered at-least-once delivery."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from dcud.sim.peers import Mosquitto

from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.notify import NotifySocket

pytestmark = pytest.mark.slow
PREFIX = "dcu/dcu-test"


async def retained(port: int, topic: str, timeout_s: float = 10.0) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"probe-{time.monotonic_ns()}") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return dict(json.loads(message.payload))
    raise AssertionError("unreachable")


async def wait_status(port: int, state: str, timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await retained(port, f"{PREFIX}/status", timeout_s)
        if status.get("state") == state:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"status stayed {status}")
        await asyncio.sleep(0.2)


async def test_status_online_offline_and_lwt(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket
) -> None:
    config = write_site(tmp_path / "site", mqtt_url=broker.url)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        status = await wait_status(broker.port, "online")
        assert status["device_id"] == "dcu-test"
        assert "uptime_s" in status and "version" in status
        assert status["outbox"]["depth"] >= 0 and "oldest_age_s" in status["outbox"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
        await wait_status(broker.port, "offline")
        # kill -9: the broker publishes the retained LWT (offline) once the socket closes.
        proc = start_daemon(config, notify_socket)
        await wait_status(broker.port, "online")
        proc.kill()
        proc.wait(timeout=10)
        await wait_status(broker.port, "offline", timeout_s=30)
    finally:
        proc.kill()


async def test_cmd_ping_reply(tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket) -> None:
    config = write_site(tmp_path / "site", mqtt_url=broker.url)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        await wait_status(broker.port, "online")
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe(f"{PREFIX}/cmd/+/reply", qos=1)
            await client.publish(f"{PREFIX}/cmd/ping", json.dumps({"id": 7}), qos=1)
            await client.publish(f"{PREFIX}/cmd/nonsense", b"not json", qos=1)
            replies: dict[str, dict[str, Any]] = {}
            async with asyncio.timeout(10):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    replies[message.topic.value] = json.loads(message.payload)
                    if len(replies) == 2:
                        break
        assert replies[f"{PREFIX}/cmd/ping/reply"] == {
            "id": 7,
            "ok": True,
            "result": replies[f"{PREFIX}/cmd/ping/reply"]["result"],
        }
        assert replies[f"{PREFIX}/cmd/ping/reply"]["result"]["pong"] is True
        assert replies[f"{PREFIX}/cmd/nonsense/reply"]["ok"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
