"""Event push (WM-E ``eventpush_*``): one UDP datagram per event to the head-end.

Address (``eventpush_addr``)
    ``host``, ``host:port``, ``[v6-address]:port`` or a bare IPv6 address; ``host`` is an IP address or a
    DNS name. Without a port the datagram goes to :data:`DEFAULT_PORT` **9003** (next to the WM-E's
    9000-9002 ports; set the port explicitly in production). A phone number (``+`` and digits) is valid
    in the file but selects SMS, which needs a modem: the event push service reports "no SMS modem on this
    DCU" once (log and the ``push/event`` state) and sends nothing; :func:`send_event_push` refuses it
    with ``ValueError``.
Datagram
    UTF-8 text ``<device_id>: <text> <time>``, at most :data:`MAX_PAYLOAD_BYTES`; ``<time>`` is RFC 3339
    UTC (for power and input events the ``since`` of the event, with milliseconds, so two edges within
    one second are two datagrams). ``<text>`` is ``eventpush_sms_lost_text`` for ``power_loss`` and
    ``power_loss_unsurvived``, ``eventpush_sms_return_text`` for ``power_return``,
    ``eventpush_sms_text`` followed by ``<input>=<level>`` for ``input_change`` (``Input changed
    door=1``), and the event's own text for every other event.
Which events (``eventpush_sms_notify``, a bit mask)
    ====  ==============  ===================================================================
    bit   seed label      dcud events
    ====  ==============  ===================================================================
    1     Last GsmP       ``power_loss``, ``power_return``, ``power_loss_unsurvived``
    2     Input change    ``input_change``
    4     CDMA            the wide-area link and time: ``uplink_*``, ``link_*``, ``network_*``,
                          ``clock_*``
    8     Debug           every other event (lines, meters, drives, outbox, restarts...)
    ====  ==============  ===================================================================
Repeats (``eventpush_sms_ignore``, seconds)
    A datagram whose text without its trailing time equals one sent to the same address less than that
    many seconds ago is not sent (counted as ``suppressed``); 0 or unset: nothing is suppressed. This
    applies to every datagram dcud sends there, the power service's last-gasp fast path included, through
    the shared :data:`GATE`. The gate also sends an identical datagram (same text, same time) only once
    within :data:`DEDUPE_WINDOW_S`: the power service pushes its events directly (before they could go
    through the outbox) and the event push service then finds them already sent.
Delivery
    The service is outbox consumer ``udp-event`` (events only) on the outbox consumer engine
    (:mod:`dcud.service.outbox_sink`): it takes events in order and acks each one once its datagram was
    handed to the kernel (or suppressed, filtered, or found already sent). A send that fails locally (no
    route, DNS failure) gives that event and the rest of the batch back, and the engine retries after a
    backoff (1 s doubling to 60 s). UDP itself is fire-and-forget; the events are also on MQTT
    ``<p>/event``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.timefmt import rfc3339
from dcud.service.outbox import Outbox, OutboxItem
from dcud.service.outbox_sink import Continuous, OutboxSink, PartialDelivery, SinkPolicy
from dcud.transport.udp import SAFE_PAYLOAD_BYTES, send_datagram

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

__all__ = [
    "CONSUMER",
    "DEDUPE_WINDOW_S",
    "DEFAULT_PORT",
    "GATE",
    "MAX_PAYLOAD_BYTES",
    "NOTIFY_DEBUG",
    "NOTIFY_INPUT",
    "NOTIFY_LINK",
    "NOTIFY_POWER",
    "EventPushConfig",
    "EventPushGate",
    "EventPushService",
    "Verdict",
    "is_phone_number",
    "notify_bit",
    "parse_push_address",
    "push_datagram",
    "send_event_push",
]

DEFAULT_PORT: Final = 9003
MAX_PAYLOAD_BYTES: Final = SAFE_PAYLOAD_BYTES  # fits one datagram on any path MTU >= 1280 (IPv6 minimum)
DEDUPE_WINDOW_S: Final = 60.0
CONSUMER: Final = "udp-event"
NO_SMS_MODEM: Final = "no SMS modem on this DCU"

NOTIFY_POWER: Final = 1
"""``eventpush_sms_notify`` bit 1, "Last GsmP": power events."""
NOTIFY_INPUT: Final = 2
"""Bit 2, "Input change"."""
NOTIFY_LINK: Final = 4
"""Bit 4, "CDMA": the wide-area link and time events."""
NOTIFY_DEBUG: Final = 8
"""Bit 8, "Debug": every other event."""

POWER_EVENTS: Final = frozenset({"power_loss", "power_return", "power_loss_unsurvived"})
LINK_PREFIXES: Final = ("uplink_", "link_", "network_", "clock_")

_PHONE_RE = re.compile(r"^\+?[0-9]{3,15}$")
_TRAILING_TIME_RE = re.compile(r"\s+\d{4}-\d{2}-\d{2}T[0-9:.]+(?:Z|[+-]\d{2}:?\d{2})$")
_MAX_GATE_ENTRIES: Final = 512
_TAKE_LIMIT: Final = 64
EVENT_KINDS: Final = frozenset({"event"})
_SEND_TIMEOUT_S: Final = 5.0


def is_phone_number(addr: str) -> bool:
    """Whether ``eventpush_addr`` selects SMS (international phone number)."""
    return bool(_PHONE_RE.match(addr.strip())) and not _is_ip(addr.strip())


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_push_address(addr: str) -> tuple[str, int]:
    """``(host, port)`` of an event push address; ``ValueError`` when it is not host[:port]."""
    text = addr.strip()
    if not text:
        raise ValueError("empty event push address")
    if is_phone_number(text):
        raise ValueError("a phone number selects SMS, which needs a modem")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"unbalanced [ in {addr!r}")
        port_text = rest[1:] if rest.startswith(":") else rest
        if port_text and not port_text.isdigit():
            raise ValueError(f"bad port in {addr!r}")
        port = int(port_text) if port_text else DEFAULT_PORT
    elif _is_ip(text):  # bare IPv4 or IPv6
        host, port = text, DEFAULT_PORT
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port = text, DEFAULT_PORT
        else:
            if not port_text.isdigit():
                raise ValueError(f"bad port in {addr!r}")
            port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {addr!r}")
    if not host:
        raise ValueError(f"no host in {addr!r}")
    return host, port


# ---------------------------------------------------------------------------------------------- gate


class Verdict(StrEnum):
    """What the gate decided about one datagram."""

    SEND = "send"
    DUPLICATE = "duplicate"
    """The identical datagram went out less than DEDUPE_WINDOW_S ago (the other path sent it)."""
    SUPPRESSED = "suppressed"
    """A repeat within ``eventpush_sms_ignore``."""


@dataclass(frozen=True)
class _Claim:
    addr: str
    text: str
    key: str
    previous_key_s: float | None


def suppression_key(text: str) -> str:
    """The datagram text without its trailing time stamp: what makes two datagrams "repeats"."""
    return _TRAILING_TIME_RE.sub("", text)


class EventPushGate:
    """Dedupe of identical datagrams and suppression of repeats, shared by every sender in the process.

    ``clock`` is monotonic seconds (injectable for tests). Bounded: at most 512 remembered datagrams.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, ignore_s: float = 0.0) -> None:
        self.clock = clock
        self.ignore_s = ignore_s
        self._sent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._keys: OrderedDict[tuple[str, str], float] = OrderedDict()

    def _prune(self, now: float) -> None:
        horizon = max(DEDUPE_WINDOW_S, self.ignore_s)
        for table in (self._sent, self._keys):
            while table and (len(table) > _MAX_GATE_ENTRIES or now - next(iter(table.values())) > horizon):
                table.popitem(last=False)

    def admit(self, addr: str, text: str) -> tuple[Verdict, _Claim | None]:
        """Decide about one datagram; a SEND verdict records it (undo with :meth:`release`)."""
        now = self.clock()
        self._prune(now)
        sent_at = self._sent.get((addr, text))
        if sent_at is not None and now - sent_at < DEDUPE_WINDOW_S:
            return Verdict.DUPLICATE, None
        key = suppression_key(text)
        last = self._keys.get((addr, key))
        if self.ignore_s > 0 and last is not None and now - last < self.ignore_s:
            return Verdict.SUPPRESSED, None
        self._sent[(addr, text)] = now
        self._sent.move_to_end((addr, text))
        self._keys[(addr, key)] = now
        self._keys.move_to_end((addr, key))
        return Verdict.SEND, _Claim(addr, text, key, last)

    def release(self, claim: _Claim) -> None:
        """The datagram of ``claim`` could not be sent: forget it, so a later try is not deduped."""
        self._sent.pop((claim.addr, claim.text), None)
        if claim.previous_key_s is None:
            self._keys.pop((claim.addr, claim.key), None)
        else:
            self._keys[(claim.addr, claim.key)] = claim.previous_key_s


GATE: Final = EventPushGate()
"""The process-wide gate; the event push service sets its ``ignore_s`` from ``eventpush_sms_ignore``."""


async def push_datagram(addr: str, text: str, gate: EventPushGate = GATE) -> Verdict:
    """Send ``text`` to ``addr`` unless the gate says otherwise; raises ``OSError``/``ValueError``."""
    parse_push_address(addr)  # refuse a phone number or a bad address before claiming anything
    verdict, claim = gate.admit(addr, text)
    if verdict is not Verdict.SEND:
        return verdict
    assert claim is not None
    try:
        host, port = parse_push_address(addr)
        await send_datagram(host, port, text.encode("utf-8", errors="replace")[:MAX_PAYLOAD_BYTES])
    except BaseException:
        gate.release(claim)
        raise
    return Verdict.SEND


async def send_event_push(addr: str, text: str) -> None:
    """Send ``text`` as one UDP datagram to ``addr`` through :data:`GATE` (module doc).

    Raises ``OSError``/``ValueError``. Host names are resolved with the loop's resolver; the send itself
    never blocks.
    """
    await push_datagram(addr, text, GATE)


# ------------------------------------------------------------------------------------------ service


def notify_bit(event_type: str) -> int:
    """The ``eventpush_sms_notify`` bit that selects ``event_type`` (module doc)."""
    if event_type in POWER_EVENTS:
        return NOTIFY_POWER
    if event_type == "input_change":
        return NOTIFY_INPUT
    if event_type.startswith(LINK_PREFIXES):
        return NOTIFY_LINK
    return NOTIFY_DEBUG


@dataclass(frozen=True)
class EventPushConfig:
    """The event push service's slice of the configuration."""

    addr: str
    device_id: str
    notify_mask: int = NOTIFY_POWER
    ignore_s: float = 0.0
    lost_text: str = "Power loss"
    return_text: str = "Power return"
    input_text: str = "Input changed"
    consumer: str = CONSUMER

    @property
    def sends(self) -> bool:
        """False for a phone number (SMS needs a modem this DCU does not have)."""
        return not is_phone_number(self.addr)

    @classmethod
    def from_config(cls, config: LoadedConfig) -> EventPushConfig | None:
        """The slice, or None when ``eventpush_addr`` is unset."""
        params = config.params
        addr = params.get_opt_str("eventpush_addr")
        if not addr:
            return None
        return cls(
            addr=addr,
            device_id=config.device_id,
            notify_mask=params.get_opt_int("eventpush_sms_notify") or 0,
            ignore_s=float(params.get_opt_int("eventpush_sms_ignore") or 0),
            lost_text=params.get_opt_str("eventpush_sms_lost_text") or "Power loss",
            return_text=params.get_opt_str("eventpush_sms_return_text") or "Power return",
            input_text=params.get_opt_str("eventpush_sms_text") or "Input changed",
        )

    def render(self, event: Mapping[str, Any]) -> str:
        """The datagram text of one event payload (module doc)."""
        event_type = str(event.get("type", ""))
        if event_type in ("power_loss", "power_loss_unsurvived"):
            text = self.lost_text
        elif event_type == "power_return":
            text = self.return_text
        elif event_type == "input_change":
            text = self.input_text
            if event.get("input") not in (None, "") and event.get("level") in (0, 1):
                text = f"{text} {event['input']}={event['level']}"
        else:
            text = str(event.get("text") or event_type)
        timed = event_type in POWER_EVENTS or event_type == "input_change"
        stamp = event.get("since") if timed and event.get("since") else event.get("ts")
        return f"{self.device_id}: {text} {stamp}" if stamp else f"{self.device_id}: {text}"


class EventPushService:
    """Supervised service ``eventpush``: events from the outbox to ``eventpush_addr`` (module doc), on the
    outbox consumer engine (:class:`~dcud.service.outbox_sink.Continuous` schedule: a failed send is
    retried after a backoff of 1 s doubling to 60 s)."""

    name = "eventpush"

    def __init__(
        self,
        config: EventPushConfig,
        bus: EventBus,
        outbox: Outbox,
        gate: EventPushGate = GATE,
    ) -> None:
        self.config = config
        self._bus = bus
        self._gate = gate
        self.counters: dict[str, int] = dict.fromkeys(
            ("sent", "suppressed", "duplicate", "filtered", "failed"), 0
        )
        self.last_success: str | None = None
        self._no_modem: dict[str, Any] | None = None
        self.engine = OutboxSink(
            outbox,
            SinkPolicy(
                config.consumer,
                batch_items=_TAKE_LIMIT,
                kinds=EVENT_KINDS,
                retry_on=(OSError, ValueError),
                failed_message="event push failed",
            ),
            Continuous(initial_s=1.0, max_s=60.0),
            describe=str,
            on_change=self._publish,
            log_fields={"addr": config.addr},
        )

    @property
    def last_error(self) -> dict[str, Any] | None:
        """``{"ts", "message"}`` of the last failed send (or of "no SMS modem")."""
        error = self.engine.last_error
        if error is None:
            return self._no_modem
        return {"ts": error["ts"], "message": error["message"]}

    def _publish(self) -> None:
        self._bus.set_state(
            "push/event",
            {
                "target": self.config.addr,
                "notify_mask": self.config.notify_mask,
                "ignore_s": self.config.ignore_s,
                "backlog": self.engine.backlog() if self.config.sends else 0,
                "last_success": self.last_success,
                "last_error": self.last_error,
                "counters": dict(self.counters),
            },
        )

    async def run(self, ctx: ServiceContext) -> None:
        """Deliver events until stopped (or, for a phone number, report once and idle)."""
        cfg = self.config
        if not cfg.sends:
            ctx.log.warning(NO_SMS_MODEM, eventpush_addr=cfg.addr)
            self._no_modem = {"ts": _utc_now(), "message": NO_SMS_MODEM}
            self._publish()
            ctx.set_ready()
            await ctx.heartbeat_forever()
            return
        self._gate.ignore_s = cfg.ignore_s
        try:
            await self.engine.run(ctx, self)
        finally:
            self._gate.ignore_s = 0.0  # the window belongs to this configuration

    async def deliver(self, items: Sequence[OutboxItem]) -> list[int]:
        """The engine's :class:`~dcud.service.outbox_sink.Sink`: one datagram per selected event, in
        order; filtered, suppressed and already-sent events count as delivered. A send that fails
        raises :class:`~dcud.service.outbox_sink.PartialDelivery` with what went out before it."""
        cfg = self.config
        done: list[int] = []
        for item in items:
            try:
                event = json.loads(item.payload)
            except ValueError:
                event = {}
            if not isinstance(event, dict):
                event = {}
            if not cfg.notify_mask & notify_bit(str(event.get("type", ""))):
                self.counters["filtered"] += 1
                done.append(item.seq)
                continue
            text = cfg.render(event)
            try:
                async with asyncio.timeout(_SEND_TIMEOUT_S):  # a DNS lookup may hang
                    verdict = await push_datagram(cfg.addr, text, self._gate)
            except (OSError, ValueError) as exc:  # TimeoutError is an OSError
                self.counters["failed"] += 1
                raise PartialDelivery(done, exc) from exc
            if verdict is Verdict.SEND:
                self.counters["sent"] += 1
                self.last_success = _utc_now()
            else:
                self.counters[str(verdict)] += 1
            done.append(item.seq)
        return done


def _utc_now() -> str:
    return rfc3339(time.time())
