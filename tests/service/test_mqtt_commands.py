"""MQTT command ingress against the running daemon and a real Mosquitto: one regression test per item.

The first is the reported crash: a retained ``[`` x 60000 on ``<p>/cmd/ping`` made json.loads raise
RecursionError in the MQTT service on every (re)connect, until the restart budget ended the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import aiomqtt
import pytest

from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service.commands import CommandRouter, CommandStats
from dcud.service.mqtt import MqttService, MqttServiceConfig, ingress_queue_type
from dcud.sim.peers import Mosquitto

from helpers.commands import Commander, set_mqtt_protocol
from helpers.daemon import daemon_log, start_daemon, stop_daemon, write_site
from helpers.notify import NotifySocket

pytestmark = pytest.mark.slow
DEEP = b"[" * 60000


def no_failures(config: Path) -> None:
    log = daemon_log(config)
    assert "service failed" not in log and "RecursionError" not in log, log[-4000:]


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_retained_deep_json_on_cmd_ping_does_not_crash_the_daemon(
    tmp_path: Path, broker: Mosquitto, commander: Commander, notify_socket: NotifySocket, protocol: str
) -> None:
    config = write_site(tmp_path / "site", mqtt_url=broker.url)
    set_mqtt_protocol(config, protocol)
    commander.publish("ping", DEEP, retain=True)  # waits on the broker before the daemon connects
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        reply = commander.wait_serving()
        assert reply["ok"] and reply["result"]["pong"] is True
        # The same bytes live (not retained): refused with a typed error, the service keeps running.
        commander.publish("ping", DEEP)
        commander.publish("status", b'{"id": "deep", "x": ' + b"{" * 30000)
        commander.wait_until(
            lambda rs: sum(1 for _t, r in rs if r.get("error", {}).get("type") == "BadRequestError") >= 2
        )
        status = commander.status()
        assert status["restarts"] == {"total": 0, "services": {}}
        assert status["commands"]["retained_ignored"] == 1
        assert status["commands"]["internal_errors"] == 0
        # A reconnect (the daemon restarted, the broker delivers the retained message again).
        stop_daemon(proc)
        proc = start_daemon(config, notify_socket)
        assert commander.wait_serving()["ok"]
        assert commander.status()["restarts"]["total"] == 0
        no_failures(config)
        assert daemon_log(config).count("retained command ignored") == 2  # once per topic, per run
    finally:
        commander.clear_retained("ping")
        stop_daemon(proc)


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_retained_commands_are_never_executed(
    tmp_path: Path, broker: Mosquitto, commander: Commander, notify_socket: NotifySocket, protocol: str
) -> None:
    config = write_site(
        tmp_path / "site", mqtt_url=broker.url, toml_extra="[remote]\nplain_param_set = true\n"
    )
    set_mqtt_protocol(config, protocol)
    request = json.dumps({"id": "retained-1", "set": {"ntp_interval": "300"}}).encode()
    commander.publish("param/set", request, retain=True)  # there before the daemon subscribes
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        commander.wait_serving()
        if protocol == "auto":
            # MQTT 5 (Retain As Published): a retained publish to a running daemon is not executed either.
            commander.publish(
                "param/set",
                json.dumps({"id": "retained-2", "set": {"ntp_interval": "301"}}).encode(),
                retain=True,
            )
        values = commander.request("param/get", {"names": ["ntp_interval"]})["result"]["values"]
        assert values == {"ntp_interval": "600"}
        status = commander.status()
        assert status["commands"]["retained_ignored"] == (2 if protocol == "auto" else 1)
        assert {"retained-1", "retained-2"}.isdisjoint(commander.ids_seen())
        # A plain (not retained) request still works: the option is on.
        assert commander.request("param/set", {"set": {"ntp_interval": "302"}})["ok"]
        no_failures(config)
        assert ('"protocol": "5"' in daemon_log(config)) == (protocol == "auto")
    finally:
        commander.clear_retained("param/set")
        stop_daemon(proc)


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_oversize_messages_are_dropped_before_they_are_queued(
    tmp_path: Path, broker: Mosquitto, commander: Commander, notify_socket: NotifySocket, protocol: str
) -> None:
    config = write_site(
        tmp_path / "site", mqtt_url=broker.url, toml_extra="[remote]\nmax_request_bytes = 4096\n"
    )
    set_mqtt_protocol(config, protocol)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        assert commander.wait_serving()["ok"]
        big = json.dumps({"id": "big", "pad": "x" * 8192}).encode()
        commander.publish("ping", big)
        assert commander.request("ping")["ok"]  # sent after the big one: the big one was handled first
        assert "big" not in commander.ids_seen()
        counters = commander.status()["commands"]
        # MQTT 5: the broker honours our Maximum Packet Size and never sends it; 3.1.1: dcud drops it.
        assert counters["oversize_dropped"] == (0 if protocol == "auto" else 1)
        # Between max_request_bytes and the packet bound (MQTT 5): dcud's own check drops it.
        commander.publish("ping", json.dumps({"id": "mid", "pad": "x" * 4200}).encode())
        assert commander.request("ping")["ok"]
        assert "mid" not in commander.ids_seen()
        assert commander.status()["commands"]["oversize_dropped"] == (1 if protocol == "auto" else 2)
        no_failures(config)
    finally:
        stop_daemon(proc)


def test_the_ingress_queue_is_bounded_and_drops_are_counted() -> None:
    stats = CommandStats()

    async def go() -> None:
        queue = ingress_queue_type("p/cmd/", 100, stats)(maxsize=2)

        def message(topic: str, payload: bytes) -> aiomqtt.Message:
            return aiomqtt.Message(topic, payload, qos=1, retain=False, mid=1, properties=None)

        queue.put_nowait(message("p/cmd/ping", b"{}"))
        queue.put_nowait(message("p/cmd/ping/reply", b"{}"))  # our own reply (3.1.1 has no No Local)
        queue.put_nowait(message("p/cmd/ping", b"x" * 101))
        queue.put_nowait(message("p/cmd/status", b"{}"))
        queue.put_nowait(message("p/cmd/ping", b"{}"))  # full
        assert queue.qsize() == 2

    asyncio.run(go())
    assert (stats.oversize_dropped, stats.queue_full_dropped) == (1, 1)


def test_a_broker_without_mqtt_5_gets_3_1_1(tmp_path: Path) -> None:
    """protocol = "auto": CONNECT as MQTT 5; a broker that refuses the version gets a 3.1.1 CONNECT next."""
    levels: list[int] = []

    async def go() -> None:
        got_two = asyncio.Event()

        async def old_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(4096)
            levels.append(data[data.index(b"MQTT") + 4])
            writer.write(b"\x20\x02\x00\x01")  # 3.1.1 CONNACK: unacceptable protocol version
            await writer.drain()
            writer.close()
            if len(levels) >= 2:
                got_two.set()

        server = await asyncio.start_server(old_broker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        from dcud.config.model import MqttConfig

        settings = MqttConfig(url=f"mqtt://127.0.0.1:{port}", reconnect_max_s=1)
        service = MqttService(
            MqttServiceConfig.build(settings, "old", "dcu/old"),
            EventBus(),
            None,
            CommandRouter(),
            dict,  # type: ignore[arg-type]
        )
        ctx = ServiceContext("mqtt", 30.0, lambda: None)
        task = asyncio.create_task(service.run(ctx))
        try:
            await asyncio.wait_for(got_two.wait(), 20)
        finally:
            task.cancel()  # the fake broker never answers the 3.1.1 CONNECT: cancel the connect
            with contextlib.suppress(asyncio.CancelledError):
                await task
            server.close()

    asyncio.run(go())
    assert levels[:2] == [5, 4]
