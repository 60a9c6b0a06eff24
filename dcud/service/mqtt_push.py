"""MQTT data push (``datapush_host = mqtt://`` or ``mqtts://``): readings to a utility's broker.

This broker is independent of the monitoring broker of dcud.toml ``[mqtt]``: its own connection, client
id ``dcud-<device_id>-push``, outbox consumer ``mqtt-push``, and schedule and retries of
:mod:`dcud.service.datapush`. Either broker can be down without holding the other one back.

Topic and payload
    ``<prefix>/meter/<name>/reading``, QoS 1, not retained; ``<prefix>`` is the URL path without its
    leading ``/`` (``{device_id}`` is replaced), ``dcu/<device_id>`` when the URL has no path. The payload
    is the reading document of ``<p>/meter/<name>/reading`` with the outbox item id added as its first
    member, ``"uid"``: delivery is at-least-once and receivers dedupe on it.
Session
    A push cycle connects (clean session), publishes its batch with up to ``[datapush] mqtt_inflight``
    messages awaiting PUBACK (the windowed publisher the MQTT uplink uses too,
    :mod:`dcud.service.mqtt_window`), and stays connected while a catch-up continues; it disconnects when the
    cycle's backlog is delivered. A batch is acked in the outbox only when every message of it has its
    PUBACK; a failure gives the whole batch back, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any, Final

import aiomqtt

from dcud.config.model import DataPushConfig
from dcud.service.datapush import DataPushServiceConfig, PushError, PushTarget, tls_context
from dcud.service.mqtt import drop_socket
from dcud.service.mqtt_window import QosWindow
from dcud.service.outbox import OutboxItem

__all__ = ["CONSUMER", "MqttPusher", "push_topic_prefix", "with_uid"]

CONSUMER: Final = "mqtt-push"
_DISCONNECT_TIMEOUT_S: Final = 2.0
_CLIENT_LOG = logging.getLogger("dcud.mqtt_push.client")
# aiomqtt warns "There are N pending publish calls" once N > 10; a window of PUBACKs in flight is the
# design here, so only its errors are worth a log line.
_CLIENT_LOG.setLevel(logging.ERROR)


def push_topic_prefix(target: PushTarget, device_id: str) -> str:
    """The topic prefix of a push URL (module doc)."""
    prefix = target.path.strip("/").replace("{device_id}", device_id)
    return prefix or f"dcu/{device_id}"


def with_uid(payload: bytes, uid: str) -> bytes:
    """The JSON object ``payload`` with ``"uid"`` inserted first (no re-encoding of the rest)."""
    body = payload.strip()
    head = b'{"uid":' + json.dumps(uid).encode()
    if body.startswith(b"{") and body != b"{}" and len(body) > 2:
        return head + b"," + body[1:]
    if body == b"{}":
        return head + b"}"
    return head + b',"payload":' + json.dumps(body.decode("utf-8", errors="replace")).encode() + b"}"


class MqttPusher:
    """:class:`~dcud.service.datapush.Uploader` for ``mqtt://`` and ``mqtts://``."""

    consumer = CONSUMER

    def __init__(
        self, target: PushTarget, options: DataPushConfig, device_id: str, timeout_s: float = 15.0
    ) -> None:
        self.target = target
        self.options = options
        self.device_id = device_id
        self.topic_prefix = push_topic_prefix(target, device_id)
        self.timeout_s = timeout_s
        self._client: aiomqtt.Client | None = None
        self.published = 0

    @classmethod
    def from_slice(cls, slice_: DataPushServiceConfig) -> MqttPusher:
        """Build from the data push service's slice."""
        return cls(slice_.target, slice_.options, slice_.device_id, slice_.policy.timeout_s)

    async def _session(self) -> aiomqtt.Client:
        if self._client is not None:
            return self._client
        target = self.target
        client = aiomqtt.Client(
            target.host,
            target.port,
            username=target.username,
            password=target.password,
            identifier=f"dcud-{self.device_id}-push",
            clean_session=True,
            keepalive=60,
            tls_context=tls_context(self.options) if target.tls else None,
            max_inflight_messages=self.options.mqtt_inflight,
            timeout=self.timeout_s,
            logger=_CLIENT_LOG,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise PushError(f"MQTT: {exc}") from exc
        self._client = client
        return client

    async def deliver(self, items: Sequence[OutboxItem], now_s: float) -> dict[str, Any]:
        """Publish every item with QoS 1 (at most ``mqtt_inflight`` awaiting PUBACK, one
        :class:`~dcud.service.mqtt_window.QosWindow`); return when all are PUBACKed, else raise."""
        client = await self._session()
        prefix = self.topic_prefix
        window = QosWindow(client, self.options.mqtt_inflight)
        try:
            await window.publish(
                (f"{prefix}/{item.subtopic}", with_uid(item.payload, item.uid)) for item in items
            )
        except aiomqtt.MqttError as exc:
            raise PushError(f"MQTT: {exc}") from None
        except TimeoutError:
            raise TimeoutError("MQTT: no PUBACK in time") from None
        self.published += len(items)
        return {"topic_prefix": prefix, "messages": len(items)}

    async def close(self) -> None:
        """Disconnect (bounded); a broker that does not answer is simply dropped."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(_DISCONNECT_TIMEOUT_S):
                await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, TimeoutError, OSError, RuntimeError):
            drop_socket(client)  # a stalled broker never answers DISCONNECT
