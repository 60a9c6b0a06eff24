"""MQTT data push to a second real Mosquitto, independent of the monitoring broker (dcud as a process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from dcud.service.datapush import parse_push_target
from dcud.service.mqtt_push import push_topic_prefix, with_uid
from dcud.service.outbox import Outbox, OutboxItem, OutboxLimits
from dcud.sim.peers import Mosquitto, start_mosquitto
from dcud.sim.readings import iec_reading, mbus_reading, reading_bytes

from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.mqtt import Subscriber
from helpers.notify import NotifySocket

pytestmark = pytest.mark.slow
T0 = 1_780_000_000.0


def test_uid_goes_first_and_the_prefix_comes_from_the_path() -> None:
    assert json.loads(with_uid(b'{"meter":"a","seq":1}', "d-1-7")) == {"uid": "d-1-7", "meter": "a", "seq": 1}
    assert with_uid(b'{"meter":"a"}', "x").startswith(b'{"uid":"x",')
    assert json.loads(with_uid(b"{}", "x")) == {"uid": "x"}
    assert json.loads(with_uid(b"not json", "x")) == {"uid": "x", "payload": "not json"}
    assert push_topic_prefix(parse_push_target("mqtt://h/utility/{device_id}/"), "d1") == "utility/d1"
    assert push_topic_prefix(parse_push_target("mqtts://u:p@h:8883"), "d1") == "dcu/d1"


async def prefill(state: Path, count: int) -> list[OutboxItem]:
    outbox = Outbox(state / "outbox.sqlite", OutboxLimits(), ["mqtt", "mqtt-push"], "dcu-test")
    await outbox.open()
    try:
        rows = []
        for n in range(count):
            doc = iec_reading("e1", n, T0 + n) if n % 2 else mbus_reading("w1", n, T0 + n)
            rows.append(("reading", f"meter/{doc['meter']}/reading", reading_bytes(doc)))
        await outbox.put("event", "event", json.dumps({"type": "line_down", "text": "x"}).encode())
        return await outbox.put_many(rows)
    finally:
        await outbox.close()


class Collector(Subscriber):
    """A QoS 1 subscriber that keeps every reading message of one broker (``messages``: topic, payload)."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(port, [topic], "", name=f"collector-{port}")

    async def start(self) -> None:
        await self.__aenter__()

    async def stop(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # its broker may have stopped first
            await self.__aexit__()


async def wait_for(condition: Callable[[], bool], what: str, config: Path, timeout_s: float = 60.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached\n{daemon_log(config)[-3000:]}")


def site(tmp_path: Path, monitoring_port: int, push_port: int) -> Path:
    return write_site(
        tmp_path / "site",
        mqtt_url=f"mqtt://127.0.0.1:{monitoring_port}",
        wme=(
            f"datapush_host=mqtt://127.0.0.1:{push_port}/utility/{{device_id}}\n"
            "datapush_retry_delay=1\ndatapush_max_retries=100\ndatapush_timeout=5000\n"
        ),
        toml_extra="[datapush]\nperiod_s = 0.5\nbatch_items = 50\n",
    )


async def test_push_broker_gets_readings_while_monitoring_broker_is_down(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket
) -> None:
    push = start_mosquitto(tmp_path / "push-broker")
    monitoring_port = broker.port
    broker.stop()  # the monitoring broker is down for the whole first part
    config = site(tmp_path, monitoring_port, push.port)
    items = await prefill(tmp_path / "site" / "state", 300)
    pushed = Collector(push.port, "utility/dcu-test/meter/+/reading")
    await pushed.start()
    proc = start_daemon(config, notify_socket)
    monitoring: Collector | None = None
    try:
        notify_socket.wait_for("READY=1")
        await wait_for(lambda: len(pushed.messages) >= len(items), "push delivery", config)
        uids = [payload["uid"] for _topic, payload in pushed.messages]
        assert uids == [item.uid for item in items]  # all, in order, none twice
        assert {topic for topic, _ in pushed.messages} == {
            "utility/dcu-test/meter/e1/reading",
            "utility/dcu-test/meter/w1/reading",
        }
        # the monitoring broker comes back: its own consumer catches up independently
        restarted = start_mosquitto(tmp_path / "monitoring-again", port=monitoring_port)
        monitoring = Collector(monitoring_port, "dcu/dcu-test/meter/+/reading")
        await monitoring.start()
        await wait_for(lambda: len(monitoring.messages) >= len(items), "monitoring catch-up", config)  # type: ignore[union-attr]
        assert [(p["meter"], p["seq"]) for _t, p in monitoring.messages] == [
            (p["meter"], p["seq"]) for _t, p in pushed.messages
        ]
        restarted.stop()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        await pushed.stop()
        if monitoring is not None:
            await monitoring.stop()
        push.stop()


async def test_monitoring_gets_readings_while_push_broker_is_down_then_push_catches_up(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket
) -> None:
    push_dir = tmp_path / "push-broker"
    push = start_mosquitto(push_dir)
    push_port = push.port
    push.stop()
    config = site(tmp_path, broker.port, push_port)
    items = await prefill(tmp_path / "site" / "state", 300)
    monitoring = Collector(broker.port, "dcu/dcu-test/meter/+/reading")
    await monitoring.start()
    proc = start_daemon(config, notify_socket)
    pushed: Collector | None = None
    try:
        notify_socket.wait_for("READY=1")
        await wait_for(lambda: len(monitoring.messages) >= len(items), "monitoring delivery", config)
        assert [p["seq"] for _t, p in monitoring.messages] == list(range(300))
        await wait_for(lambda: "data push failed" in daemon_log(config), "a failed push attempt", config)
        push = start_mosquitto(tmp_path / "push-again", port=push_port)
        pushed = Collector(push_port, "utility/dcu-test/meter/+/reading")
        await pushed.start()
        await wait_for(lambda: len(pushed.messages) >= len(items), "push catch-up", config)  # type: ignore[union-attr]
        uids = [payload["uid"] for _topic, payload in pushed.messages]
        assert uids == [item.uid for item in items]
        log = daemon_log(config)
        assert "data push failed" in log and "data push recovered" in log
        # the push state is retained on the monitoring broker: backlog, retries, last error and success
        states = Collector(broker.port, "dcu/dcu-test/push/mqtt/state")
        await states.start()

        def caught_up() -> bool:
            return any(s["backlog"] == 0 and s["last_success"] for _t, s in states.messages)

        await wait_for(caught_up, "retained push state", config)
        state = [s for _t, s in states.messages if s["backlog"] == 0][-1]
        assert state["counters"]["failures"] >= 1 and state["last_error"]["message"]
        assert state["target"] == f"mqtt://127.0.0.1:{push_port}/utility/{{device_id}}"
        await states.stop()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        await monitoring.stop()
        if pushed is not None:
            await pushed.stop()
        push.stop()
