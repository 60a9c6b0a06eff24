"""The MQTT uplink: retained status with LWT, retained states, QoS 1 delivery from the outbox, commands.

One connection to the monitoring broker. Readings and events are taken from the outbox in order with a
bounded in-flight window and acked only on PUBACK, so a broker that is down for hours costs outbox
space and nothing else: when it is back the backlog drains in order, at least once (receivers dedupe on
the item ``uid``). The outbox consumer engine (:mod:`dcud.service.outbox_sink`) does the taking, acking
and giving back, in batches of ``[mqtt] inflight`` items, two handed out at once: the second batch's
publishes wait in the connection's QoS 1 window (:mod:`dcud.service.mqtt_window`) and go out one by one
as PUBACKs of the first come in, so the window stays full while a completed batch is acked. Retained
states are coalesced per subtopic, so a flapping state never queues up.

Commands (``<p>/cmd/<verb>``) come in through a bounded ingress (docs/remote-config.md, "MQTT
commands"): MQTT 5 where the broker speaks it (``[mqtt] protocol = "auto"``), with the CONNECT
property Maximum Packet Size so that the broker never sends a message over ``[remote]
max_request_bytes``; under 3.1.1 such messages are dropped before they are queued (counted). The
incoming queue holds at most ``[remote] max_queued_requests`` messages (more: dropped, counted).
Retained messages on command topics are never executed (MQTT 5 subscribes with Retain As Published,
so a live retained publish is recognised too); each such topic is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho_mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from dcud.config.model import MqttConfig
from dcud.config.mqtt_url import MqttUrl, parse_mqtt_url
from dcud.runtime.bus import EventBus
from dcud.runtime.link import Link, LinkPolicy, first_error, run_link
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.uplink import UplinkReconnect
from dcud.service.commands import MAX_REQUEST_BYTES, CommandRouter, CommandStats
from dcud.service.mqtt_window import QosWindow
from dcud.service.outbox import Outbox, OutboxItem
from dcud.service.outbox_sink import Continuous, OutboxSink, SinkPolicy
from dcud.service.tls_banks import file_client_context

CONSUMER = "mqtt"
OFFLINE = json.dumps({"state": "offline"}).encode()
_DISCONNECT_PUBLISH_TIMEOUT_S = 2.0
_BATCHES_IN_FLIGHT = 2
_MAX_COMMANDS = 8
_PACKET_OVERHEAD_BYTES = 1024
"""Maximum Packet Size = max_request_bytes + this: fixed header, topic and properties of a command."""
_MAX_RETAINED_TOPICS_LOGGED = 256
_SESSION_NEVER_EXPIRES = 0xFFFFFFFF
_PROTOCOL_REFUSED = (1, 132)
"""CONNACK codes for "unsupported protocol version" (3.1.1: 1; MQTT 5: 0x84)."""
# aiomqtt warns whenever more than ten publishes await their PUBACK, which is our normal in-flight window.
_CLIENT_LOG = logging.getLogger("dcud.mqtt.client")
_CLIENT_LOG.setLevel(logging.ERROR)


@dataclass(frozen=True)
class MqttServiceConfig:
    """The MQTT service's slice of the configuration."""

    settings: MqttConfig
    url: MqttUrl
    device_id: str
    topic_prefix: str
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_queued_requests: int = 32

    @classmethod
    def build(
        cls,
        settings: MqttConfig,
        device_id: str,
        topic_prefix: str,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_queued_requests: int = 32,
    ) -> MqttServiceConfig:
        """Combine the [mqtt] table with the derived names and the command ingress bounds ([remote])."""
        return cls(
            settings,
            parse_mqtt_url(settings.url),
            device_id,
            topic_prefix,
            max_request_bytes,
            max_queued_requests,
        )


class MqttService:
    """Supervised service ``mqtt``."""

    name = "mqtt"

    def __init__(
        self,
        config: MqttServiceConfig,
        bus: EventBus,
        outbox: Outbox,
        commands: CommandRouter,
        status: Callable[[], Mapping[str, Any]],
        reconnect: UplinkReconnect | None = None,
    ) -> None:
        self.config = config
        self._bus = bus
        self._outbox = outbox
        self._commands = commands
        self._status = status
        self._reconnect = reconnect
        inflight = config.settings.inflight
        # Batches of one window, two handed out at once: the next batch's publishes wait in the QoS window
        # and go out one by one as the PUBACKs of the current one come in, so the window stays full
        # while a completed batch is acked in the outbox (one commit per window of items).
        self._outbox_sink = OutboxSink(
            outbox,
            SinkPolicy(CONSUMER, batch_items=inflight, window_items=_BATCHES_IN_FLIGHT * inflight),
            Continuous(),
        )
        self.connected = False
        self.protocol = ""
        """The MQTT version of the connection ("5" or "3.1.1"), "" while not connected."""
        self._retained_logged: set[str] = set()

    @property
    def published_count(self) -> int:
        """Readings and events PUBACKed by the broker and acked in the outbox."""
        return self._outbox_sink.delivered_items

    @property
    def stats(self) -> CommandStats:
        """The command counters (shared with the router: they outlive this service)."""
        return self._commands.stats

    # -- connection ----------------------------------------------------------------------------

    def _client(self, v5: bool) -> aiomqtt.Client:
        cfg = self.config
        settings = cfg.settings
        tls_context: ssl.SSLContext | None = None
        if cfg.url.tls:
            tls_context = file_client_context(
                ca_file=settings.ca_file, cert_file=settings.cert_file, key_file=settings.key_file
            )
        properties: Properties | None = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # The broker must not send us anything bigger (MQTT 5, 3.1.2.11.4): it drops such messages.
            properties.MaximumPacketSize = cfg.max_request_bytes + _PACKET_OVERHEAD_BYTES
            if not settings.clean_session:
                # What a 3.1.1 persistent session is: kept by the broker until the client comes back.
                properties.SessionExpiryInterval = _SESSION_NEVER_EXPIRES
        return aiomqtt.Client(
            cfg.url.host,
            cfg.url.port,
            username=cfg.url.username,
            password=cfg.url.password,
            identifier=settings.client_id or f"dcud-{cfg.device_id}",
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else settings.clean_session,
            # paho refuses clean_start under 3.1.1 unless it is left at its default.
            clean_start=settings.clean_session if v5 else paho_mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=settings.keepalive_s,
            will=aiomqtt.Will(f"{cfg.topic_prefix}/status", OFFLINE, qos=1, retain=True),
            tls_context=tls_context,
            max_inflight_messages=settings.inflight,
            queue_type=ingress_queue_type(
                f"{cfg.topic_prefix}/cmd/", cfg.max_request_bytes, self._commands.stats
            ),
            max_queued_incoming_messages=cfg.max_queued_requests,
            timeout=10.0,
            logger=_CLIENT_LOG,
        )

    async def run(self, ctx: ServiceContext) -> None:
        """Connect, serve, reconnect with jittered backoff (the link kernel); offline on a graceful stop."""
        ctx.set_ready()  # ready means "running": a broker outage is a degraded state, not a start failure
        policy = LinkPolicy(
            initial_s=1.0, max_s=self.config.settings.reconnect_max_s, retry_on=(aiomqtt.MqttError,)
        )
        await run_link(ctx, _BrokerLink(self, ctx), policy, reconnect=self._reconnect)

    async def _serve(self, ctx: ServiceContext, client: aiomqtt.Client, v5: bool) -> None:
        prefix = self.config.topic_prefix
        if v5:
            # No Local: our own replies (<p>/cmd/<verb>/reply) never come back to take queue room.
            # Retain As Published: a live retained publish keeps its flag, so it is never executed.
            options = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
            await client.subscribe(f"{prefix}/cmd/#", options=options)
        else:
            await client.subscribe(f"{prefix}/cmd/#", qos=1)
        await self._publish_status(client)
        # The engine gives back whatever an earlier connection had in flight first, and whatever this
        # one has in flight (published, no PUBACK) when it ends, in order, for the next connection.
        sink = _BrokerSink(prefix, QosWindow(client, self.config.settings.inflight))
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._states(ctx, client), name="dcud[mqtt:states]"),
                    tg.create_task(self._outbox_sink.run(ctx, sink), name="dcud[mqtt:outbox]"),
                    tg.create_task(self._receive(ctx, client), name="dcud[mqtt:commands]"),
                    tg.create_task(self._status_loop(ctx, client), name="dcud[mqtt:status]"),
                ]
                # A failing loop cancels this wait; the TaskGroup then raises its error. A reconnect
                # request (the connectivity watchdog) cancels this whole task: see run_link.
                await ctx.stopping.wait()
                for task in tasks:
                    task.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from group
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                f"{prefix}/status", OFFLINE, qos=1, retain=True, timeout=_DISCONNECT_PUBLISH_TIMEOUT_S
            )
        ctx.log.info("published offline status")

    # -- loops ---------------------------------------------------------------------------------

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        payload = json.dumps(dict(self._status()), separators=(",", ":"))
        await client.publish(f"{self.config.topic_prefix}/status", payload, qos=1, retain=True)

    async def _status_loop(self, ctx: ServiceContext, client: aiomqtt.Client) -> None:
        while not await ctx.sleep(self.config.settings.status_interval_s):
            await self._publish_status(client)

    async def _states(self, ctx: ServiceContext, client: aiomqtt.Client) -> None:
        watcher = self._bus.watch()
        try:
            while True:
                for update in await watcher.next_batch():
                    payload = json.dumps(dict(update.payload), separators=(",", ":"), default=str)
                    # Every retained state document lives at <p>/<subtopic>/state (design.md section 6:
                    # <p>/line/<name>/state, <p>/meter/<name>/state, <p>/drive/<name>/state...).
                    topic = f"{self.config.topic_prefix}/{update.subtopic}/state"
                    await client.publish(topic, payload, 1, True)
                    ctx.beat()
        finally:
            watcher.close()

    async def _receive(self, ctx: ServiceContext, client: aiomqtt.Client) -> None:
        """Serve ``<p>/cmd/<verb>`` requests concurrently (a meter read takes seconds), at most
        ``_MAX_COMMANDS`` at once; beyond that a request is answered "busy" at once instead of queueing.
        Retained messages are never executed. Nothing a message holds can end this loop: the router
        never raises, and only the broker connection failing (MqttError) ends the service's session."""
        base = f"{self.config.topic_prefix}/cmd/"
        running: set[asyncio.Task[None]] = set()

        async def serve(topic: str, verb: str, payload: bytes) -> None:
            # The reply is PUBACKed before a restart or reboot it asked for begins (CommandRouter.serve).
            await self._commands.serve(
                verb, payload, lambda reply: client.publish(f"{topic}/reply", reply, qos=1)
            )
            ctx.beat()

        async with asyncio.TaskGroup() as tg:
            async for message in client.messages:
                topic = message.topic.value
                if not topic.startswith(base) or topic.endswith("/reply"):
                    continue
                if message.retain:
                    self._ignore_retained(ctx, topic)
                    continue
                verb = topic[len(base) :]
                payload = message.payload if isinstance(message.payload, bytes) else b""
                if len(running) >= _MAX_COMMANDS:
                    busy = self._commands.busy_reply(payload, f"{_MAX_COMMANDS} commands already running")
                    await client.publish(f"{topic}/reply", json.dumps(busy), qos=1)
                    continue
                task = tg.create_task(serve(topic, verb, payload), name=f"dcud[mqtt:cmd/{verb[:64]}]")
                running.add(task)
                task.add_done_callback(running.discard)

    def _ignore_retained(self, ctx: ServiceContext, topic: str) -> None:
        """A retained command is never executed: count it, log it once per topic (bounded)."""
        self.stats.retained_ignored += 1
        if topic in self._retained_logged or len(self._retained_logged) >= _MAX_RETAINED_TOPICS_LOGGED:
            return
        self._retained_logged.add(topic)
        ctx.log.warning(
            "retained command ignored (retained messages on command topics are never executed; "
            "clear it with an empty retained publish)",
            topic=topic[:200],
        )


def ingress_queue_type(
    command_base: str, max_bytes: int, stats: CommandStats
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's incoming queue, bounded in size by the client and here in what it accepts.

    Called in the event loop for every message the client received (aiomqtt's ``_on_message``):
    command messages over ``max_bytes`` are dropped and counted before they take a slot; our own
    replies (3.1.1 has no No Local) are dropped silently; a full queue drops and counts.
    """

    class IngressQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            topic = item.topic.value
            if topic.endswith("/reply"):
                return
            payload = item.payload
            size = len(payload) if isinstance(payload, bytes | bytearray | str) else 0
            if size > max_bytes and topic.startswith(command_base):
                stats.oversize_dropped += 1
                return
            if self.full():
                stats.queue_full_dropped += 1
                return
            super().put_nowait(item)

    return IngressQueue


def _refuses_protocol(exc: aiomqtt.MqttError) -> bool:
    """Whether a failed connect says the broker does not speak the MQTT version we asked for."""
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return isinstance(exc, MqttConnectError) and value in _PROTOCOL_REFUSED


class _BrokerLink(Link[aiomqtt.Client]):
    """The broker connection as the link kernel drives it (one per run of the service)."""

    down_message = "broker unavailable"

    def __init__(self, service: MqttService, ctx: ServiceContext) -> None:
        self._service = service
        self._ctx = ctx
        self.v5 = service.config.settings.protocol != "3.1.1"
        """Cleared for good once an ``auto`` broker refused MQTT 5."""

    def log_fields(self) -> dict[str, object]:
        return {"broker": self._service.config.url.redacted()}

    def describe(self, exc: BaseException) -> str:
        return str(exc)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiomqtt.Client]:
        service, ctx = self._service, self._ctx
        client = await self._connect(service._client(self.v5))
        service.connected = True
        service.protocol = "5" if self.v5 else "3.1.1"
        ctx.log.info("connected", broker=service.config.url.redacted(), protocol=service.protocol)
        try:
            yield client
        finally:
            service.connected = False
            service.protocol = ""
            await client.__aexit__(None, None, None)

    async def _connect(self, client: aiomqtt.Client) -> aiomqtt.Client:
        service = self._service
        try:
            await _enter(client)
            return client
        except aiomqtt.MqttError as exc:
            if not (self.v5 and service.config.settings.protocol == "auto" and _refuses_protocol(exc)):
                raise
        self._ctx.log.warning(
            "broker does not speak MQTT 5; using 3.1.1", broker=service.config.url.redacted()
        )
        self.v5 = False
        client = service._client(False)
        await _enter(client)
        return client

    def connect(self) -> AbstractAsyncContextManager[aiomqtt.Client]:
        return self._session()

    async def serve(self, client: aiomqtt.Client) -> str:
        await self._service._serve(self._ctx, client, self.v5)
        return "closed"


async def _enter(client: aiomqtt.Client) -> None:
    """Connect ``client``; a connect that is cancelled (stop) leaves no socket behind."""
    try:
        await client.__aenter__()
    except asyncio.CancelledError:
        drop_socket(client)
        raise


def drop_socket(client: aiomqtt.Client) -> None:
    """Close a client's socket under paho: for a broker that never answers DISCONNECT (or a connect
    abandoned half-way), so that nothing leaks across retries."""
    with contextlib.suppress(Exception):
        sock = client._client.socket()
        if sock is not None:
            sock.close()


class _BrokerSink:
    """The outbox engine's sink on one broker connection: every item to ``<p>/<subtopic>``, QoS 1."""

    def __init__(self, topic_prefix: str, window: QosWindow) -> None:
        self._prefix = topic_prefix
        self._window = window

    async def deliver(self, items: Sequence[OutboxItem]) -> list[int]:
        """Publish the batch through the connection's window; all PUBACKed, or the error ends the session."""
        prefix = self._prefix
        await self._window.publish((f"{prefix}/{item.subtopic}", item.payload) for item in items)
        return [item.seq for item in items]
