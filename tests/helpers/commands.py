"""A real MQTT client (paho, its own thread) that sends ``<p>/cmd/<verb>`` requests to a running daemon."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

PREFIX = "dcu/dcu-test"


class Commander:
    """Publishes requests and collects every reply on ``<p>/cmd/#/reply`` (thread-safe)."""

    def __init__(self, port: int, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.replies: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"commander-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/cmd/#", qos=1)
        assert self._subscribed.wait(10), "no SUBACK"

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not message.topic.endswith("/reply"):
            return
        try:
            reply = json.loads(message.payload)
        except ValueError:
            reply = {"unparsable": message.payload.decode(errors="replace")}
        with self._cond:
            self.replies.append((message.topic, reply))
            self._cond.notify_all()

    def next_id(self) -> str:
        return f"t{next(self._ids)}-{uuid.uuid4().hex[:6]}"

    def publish(self, verb: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(f"{self.prefix}/cmd/{verb}", payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), "no PUBACK"

    def wait_for(self, request_id: Any, timeout_s: float = 30.0) -> dict[str, Any]:
        """The reply carrying ``request_id`` (bounded wait)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for _topic, reply in self.replies:
                    if reply.get("id") == request_id:
                        return reply
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no reply with id {request_id!r} within {timeout_s} s")
                self._cond.wait(remaining)

    def wait_until(self, predicate: Any, timeout_s: float = 30.0) -> list[tuple[str, dict[str, Any]]]:
        """Wait until ``predicate(replies)`` holds; returns the replies."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.replies):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"condition not met within {timeout_s} s; replies: {self.replies[-5:]}"
                    )
                self._cond.wait(remaining)
            return list(self.replies)

    def ids_seen(self) -> set[Any]:
        with self._cond:
            return {reply.get("id") for _topic, reply in self.replies}

    def request(
        self, verb: str, request: dict[str, Any] | None = None, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Send one request with a fresh id and return its reply."""
        body = dict(request or {})
        body.setdefault("id", self.next_id())
        self.publish(verb, json.dumps(body).encode())
        return self.wait_for(body["id"], timeout_s)

    def wait_serving(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Ping until the daemon answers: requests published before it subscribed are lost (bounded)."""
        deadline = time.monotonic() + timeout_s
        for _attempt in range(int(timeout_s) + 1):
            request_id = self.next_id()
            self.publish("ping", json.dumps({"id": request_id}).encode())
            try:
                return self.wait_for(request_id, min(1.0, max(0.1, deadline - time.monotonic())))
            except AssertionError:
                if time.monotonic() > deadline:
                    break
        raise AssertionError(f"the daemon did not answer cmd/ping within {timeout_s} s")

    def status(self) -> dict[str, Any]:
        reply = self.request("status")
        assert reply["ok"], reply
        return dict(reply["result"])

    def clear_retained(self, verb: str) -> None:
        self.publish(verb, b"", retain=True)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def set_mqtt_protocol(config: Path, protocol: str) -> None:
    """Add ``protocol = ...`` to the [mqtt] table that helpers.daemon.write_site writes last."""
    config.write_text(config.read_text() + f'protocol = "{protocol}"\n')
