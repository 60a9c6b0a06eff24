"""The MQTT uplink: retained status with LWT, retained states, QoS 1 delivery from the outbox, commands.

One connection to the monitoring broker. Readings and events are taken from the outbox in order with a
bounded in-flight window and acked only on PUBACK, so a broker that is down for hours costs outbox
space and nothing else: when it is back the backlog drains in order, at least once (receivers dedupe on
the item ``uid``). Retained states are coalesced per subtopic, so a flapping state never queues up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt

from dcud.config.model import MqttConfig
from dcud.config.mqtt_url import MqttUrl, parse_mqtt_url
from dcud.runtime.backoff import Backoff
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.uplink import UplinkReconnect
from dcud.service.commands import CommandRouter
from dcud.service.outbox import Outbox

CONSUMER = "mqtt"
OFFLINE = json.dumps({"state": "offline"}).encode()
_DISCONNECT_PUBLISH_TIMEOUT_S = 2.0
_MAX_COMMANDS = 8
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

    @classmethod
    def build(cls, settings: MqttConfig, device_id: str, topic_prefix: str) -> MqttServiceConfig:
        """Combine the [mqtt] table with the derived names."""
        return cls(settings, parse_mqtt_url(settings.url), device_id, topic_prefix)


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
        self.connected = False
        self.published_count = 0

    # -- connection ----------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        cfg = self.config
        settings = cfg.settings
        tls_context: ssl.SSLContext | None = None
        if cfg.url.tls:
            tls_context = ssl.create_default_context(cafile=settings.ca_file or None)
            if settings.cert_file:
                tls_context.load_cert_chain(settings.cert_file, settings.key_file or None)
        return aiomqtt.Client(
            cfg.url.host,
            cfg.url.port,
            username=cfg.url.username,
            password=cfg.url.password,
            identifier=settings.client_id or f"dcud-{cfg.device_id}",
            clean_session=settings.clean_session,
            keepalive=settings.keepalive_s,
            will=aiomqtt.Will(f"{cfg.topic_prefix}/status", OFFLINE, qos=1, retain=True),
            tls_context=tls_context,
            max_inflight_messages=settings.inflight,
            max_queued_incoming_messages=1000,
            timeout=10.0,
            logger=_CLIENT_LOG,
        )

    async def run(self, ctx: ServiceContext) -> None:
        """Connect, serve, reconnect with jittered backoff; publish offline on a graceful stop."""
        backoff = Backoff(initial_s=1.0, max_s=self.config.settings.reconnect_max_s)
        ctx.set_ready()  # ready means "running": a broker outage is a degraded state, not a start failure
        last_error = ""
        while not ctx.stopping.is_set():
            try:
                async with self._client() as client:
                    backoff.reset()
                    self.connected = True
                    ctx.log.info("connected", broker=self.config.url.redacted())
                    last_error = ""
                    await self._serve(ctx, client)
                    return
            except aiomqtt.MqttError as exc:
                error = str(exc)
                if error != last_error:  # once per state change, not once per retry
                    ctx.log.warning("broker unavailable", broker=self.config.url.redacted(), error=error)
                    last_error = error
            finally:
                self.connected = False
            if await ctx.sleep(backoff.next_delay_s()):
                return

    async def _serve(self, ctx: ServiceContext, client: aiomqtt.Client) -> None:
        prefix = self.config.topic_prefix
        await client.subscribe(f"{prefix}/cmd/#", qos=1)
        await self._publish_status(client)
        # Whatever an earlier connection (or an earlier run of this service) had in flight is taken again.
        await self._outbox.rewind(CONSUMER)
        pending: set[int] = set()
        epoch = self._reconnect.epoch if self._reconnect is not None else 0
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._states(ctx, client), name="dcud[mqtt:states]"),
                    tg.create_task(self._deliver(ctx, client, pending), name="dcud[mqtt:outbox]"),
                    tg.create_task(self._receive(ctx, client), name="dcud[mqtt:commands]"),
                    tg.create_task(self._status_loop(ctx, client), name="dcud[mqtt:status]"),
                ]
                if self._reconnect is not None:  # the connectivity watchdog asks for a fresh connection
                    tasks.append(
                        tg.create_task(_reconnect_on(self._reconnect, epoch), name="dcud[mqtt:reconnect]")
                    )
                # A failing loop cancels this wait; the TaskGroup then raises its error.
                await ctx.stopping.wait()
                for task in tasks:
                    task.cancel()
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from group
        finally:
            # Items handed out but never PUBACKed go back to the outbox, in order, for the next connection.
            if pending:
                await self._outbox.nack(CONSUMER, sorted(pending))
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

    async def _deliver(self, ctx: ServiceContext, client: aiomqtt.Client, pending: set[int]) -> None:
        """Publish outbox items in seq order with at most ``inflight`` awaiting PUBACK; ack in batches."""
        window = self.config.settings.inflight
        room = asyncio.Condition()
        acked: list[int] = []
        ack_ready = asyncio.Event()
        failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def publish_one(seq: int, topic: str, payload: bytes) -> None:
            try:
                await client.publish(topic, payload, qos=1, retain=False)
            except aiomqtt.MqttError as exc:
                if not failure.done():
                    failure.set_exception(exc)
                return
            acked.append(seq)
            ack_ready.set()

        async def flush_acks() -> None:
            # One outbox ack (one fsync) per batch of PUBACKs that arrived meanwhile, not one per item.
            while True:
                await ack_ready.wait()
                ack_ready.clear()
                batch = acked[:]
                del acked[:]
                if batch:
                    await self._outbox.ack(CONSUMER, batch)
                    pending.difference_update(batch)
                    self.published_count += len(batch)
                    ctx.beat()
                    async with room:
                        room.notify_all()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(flush_acks(), name="dcud[mqtt:acks]")
            tg.create_task(_raise_when_failed(failure), name="dcud[mqtt:failure]")
            while True:
                async with room:
                    await room.wait_for(lambda: len(pending) < window)
                items = await self._outbox.take(CONSUMER, window - len(pending))
                if not items:
                    await self._outbox.wait_for_items(CONSUMER)
                    continue
                for item in items:
                    pending.add(item.seq)
                    topic = f"{self.config.topic_prefix}/{item.subtopic}"
                    tg.create_task(publish_one(item.seq, topic, item.payload), name="dcud[mqtt:publish]")

    async def _receive(self, ctx: ServiceContext, client: aiomqtt.Client) -> None:
        """Serve ``<p>/cmd/<verb>`` requests concurrently (a meter read takes seconds), at most
        ``_MAX_COMMANDS`` at once; beyond that a request is answered "busy" at once instead of queueing."""
        base = f"{self.config.topic_prefix}/cmd/"
        running: set[asyncio.Task[None]] = set()

        async def serve(topic: str, verb: str, payload: bytes) -> None:
            reply = await self._commands.dispatch(verb, payload)
            await client.publish(f"{topic}/reply", json.dumps(reply, default=str), qos=1)
            ctx.beat()

        async with asyncio.TaskGroup() as tg:
            async for message in client.messages:
                topic = message.topic.value
                if not topic.startswith(base) or topic.endswith("/reply"):
                    continue
                verb = topic[len(base) :]
                payload = (
                    message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                )
                if len(running) >= _MAX_COMMANDS:
                    busy = self._commands.busy_reply(payload, f"{_MAX_COMMANDS} commands already running")
                    await client.publish(f"{topic}/reply", json.dumps(busy), qos=1)
                    continue
                task = tg.create_task(serve(topic, verb, payload), name=f"dcud[mqtt:cmd/{verb}]")
                running.add(task)
                task.add_done_callback(running.discard)


async def _reconnect_on(reconnect: UplinkReconnect, epoch: int) -> None:
    reason = await reconnect.wait_newer(epoch)
    raise aiomqtt.MqttError(f"reconnect requested: {reason}")


async def _raise_when_failed(failure: asyncio.Future[None]) -> None:
    await failure


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error inside (possibly nested) exception groups."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def status_document(
    *,
    device_id: str,
    version: str,
    started_monotonic_s: float,
    outbox: Outbox,
    bus: EventBus,
) -> dict[str, Any]:
    """The ``<p>/status`` payload: identity, uptime, clock, power and outbox health."""
    stats = outbox.stats()
    return {
        "state": "online",
        "device_id": device_id,
        "version": version,
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uptime_s": round(time.monotonic() - started_monotonic_s, 1),
        "clock": dict(bus.states.get("clock", {"synced": None})),
        "power": dict(bus.states.get("power", {"state": "unknown"})),
        "snmp": dict(bus.states["snmp"]) if "snmp" in bus.states else None,  # engine ID for v3 receivers
        "outbox": {
            "depth": stats.depth,
            "bytes": stats.size_bytes,
            "max_bytes": stats.max_bytes,
            "oldest_age_s": round(stats.oldest_age_s, 1),
            "high_water": stats.high_water,
            "dropped": dict(stats.dropped),
        },
    }
