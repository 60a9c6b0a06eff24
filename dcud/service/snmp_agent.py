"""The read-only SNMP agent: GET, GETNEXT and GETBULK of DCUD-MIB, with pysnmp 7 on asyncio.

What it serves (``mibs/DCUD-MIB.txt``, :mod:`dcud.service.snmp_mib`): the device scalars
(``dcudDevice``) and one table each of lines, meters, drives, push targets and transparent ports, plus
the standard objects a manager expects of any agent: the SNMPv2-MIB ``system`` and ``snmp`` groups,
``snmpEngine`` (so a manager can read dcud's engine ID) and ``usmStats``. Nothing is writable: a SET
is answered ``notWritable``.

**Values equal what MQTT shows, by construction.** Every request reads the same documents dcud
publishes: ``Runtime.status()`` (``<p>/status``) for the device objects, and the retained state
documents of the event bus (``line/<name>``, ``meter/<name>``, ``drive/<name>``, ``push/<name>``,
``bridge/<name>``, ``uplink``) for the rest, at the moment the request arrives: no copy, no polling
loop. A table row exists exactly while its state document does.

**Access.** SNMPv2c with the read-only community ``[snmp] agent_community`` (a secret; empty: no
v2c), and SNMPv3 with the trap sender's USM user: ``snmp_user`` with ``snmp_auth_algo`` /
``snmp_auth_key`` and ``snmp_priv_algo`` / ``snmp_priv_key`` (served only when authentication is
configured; the security level is the user's, pysnmp refuses a lower one with a report). SNMPv1 is
not spoken (its messages count as bad versions). dcud is the authoritative engine, with the trap
sender's engine ID and engine clock (:func:`dcud.service.snmp.engine_clock`).

**Every request is hostile input.** pysnmp decodes and authenticates; a wrong community is dropped
and a wrong or unknown v3 user gets the RFC 3414 report, and both are counted
(``snmpInBadCommunityNames``, ``usmStats*``, and the ``snmp/agent`` state). Responses are bounded:
at most ``[snmp] agent_max_message_bytes`` (and never more than the manager's own maximum), at most
:data:`MAX_VARBINDS` variable bindings; a GET or GETNEXT that does not fit answers ``tooBig``, a
GETBULK is cut short (RFC 3416 4.2.3). Datagrams beyond ``agent_max_requests_per_s`` (a token
bucket) are dropped and counted, so a flood cannot starve the meter polling of CPU. No exception
leaves the datagram handler; an unexpected one answers ``genErr`` when a response is still possible,
and is counted and logged once per kind. The agent keeps no per-request or per-peer state beyond
what pysnmp expires itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from dcud import __version__
from dcud.config.loader import LoadedConfig
from dcud.runtime.backoff import Backoff
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service import snmp_mib
from dcud.service.snmp import AUTH_ALGOS, PRIV_ALGOS, EngineClock, engine_clock, usm_protocols

log = structlog.get_logger("dcud.snmp_agent")

Oid = tuple[int, ...]
Value = tuple[str, object]
"""``(syntax, value)``: an SMI syntax name (:data:`dcud.service.snmp_mib.Syntax` or ``OctetString``)
and a Python ``int`` / ``str`` / ``bytes`` / OID tuple."""

MAX_VARBINDS: Final = 256
"""Most variable bindings in one response (a GETBULK stops there)."""
STATE_MIN_INTERVAL_S: Final = 5.0
"""Least gap between two ``snmp/agent`` state documents caused by traffic (a walk is many requests)."""
STATE_SUBTOPIC: Final = "snmp/agent"
_V3_HEADER_BYTES: Final = 200
"""Worst-case msgGlobalData + USM security parameters + privacy padding around a v3 scoped PDU."""
_V2C_HEADER_BYTES: Final = 32
"""version + community TLV headers + message SEQUENCE around a v2c PDU (the community itself added)."""
_PDU_HEADER_BYTES: Final = 40
"""PDU tag, request-id, error-status, error-index and the varbind list header, generously."""
_MAX_INT32: Final = 2**31 - 1

SYSTEM_OID: Final[Oid] = (1, 3, 6, 1, 2, 1, 1)
SNMP_GROUP_OID: Final[Oid] = (1, 3, 6, 1, 2, 1, 11)
SNMP_ENGINE_OID: Final[Oid] = (1, 3, 6, 1, 6, 3, 10, 2, 1)
USM_STATS_OID: Final[Oid] = (1, 3, 6, 1, 6, 3, 15, 1, 1)
SYS_SERVICES: Final = 72
"""sysServices: applications (64) + end-to-end (8)."""

# SNMPv2-MIB snmp group and usmStats: (arc, the pysnmp instance symbol, state document key).
_SNMP_COUNTERS: Final = (
    (1, "snmpInPkts", "in_packets"),
    (3, "snmpInBadVersions", "bad_versions"),
    (4, "snmpInBadCommunityNames", "bad_community_names"),
    (5, "snmpInBadCommunityUses", "bad_community_uses"),
    (6, "snmpInASNParseErrs", "asn_parse_errors"),
    (31, "snmpSilentDrops", "silent_drops"),
    (32, "snmpProxyDrops", "proxy_drops"),
)
_USM_COUNTERS: Final = (
    (1, "usmStatsUnsupportedSecLevels", "unsupported_sec_levels"),
    (2, "usmStatsNotInTimeWindows", "not_in_time_windows"),
    (3, "usmStatsUnknownUserNames", "unknown_user_names"),
    (4, "usmStatsUnknownEngineIDs", "unknown_engine_ids"),
    (5, "usmStatsWrongDigests", "wrong_digests"),
    (6, "usmStatsDecryptionErrors", "decryption_errors"),
)
REFUSALS: Final = (
    "bad_community_names",
    "bad_community_uses",
    "unsupported_sec_levels",
    "unknown_user_names",
    "wrong_digests",
    "decryption_errors",
)
"""The counters that mean "refused": a wrong community, user, key or security level.
(``unknown_engine_ids`` and ``not_in_time_windows`` are part of every SNMPv3 manager's discovery.)"""


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentServiceConfig:
    """The agent's slice of the configuration."""

    device_id: str
    host: str
    port: int
    community: str = field(repr=False)
    user: str = field(repr=False)
    auth: str
    auth_key: str = field(repr=False)
    priv: str
    priv_key: str = field(repr=False)
    engine_id: bytes
    enterprise_oid: str
    state_dir: Path
    max_message_bytes: int = 1472
    max_requests_per_s: int = 100

    @property
    def v3(self) -> bool:
        """Whether SNMPv3 is served (the USM user has authentication)."""
        return bool(self.user) and self.auth != "none" and bool(self.auth_key)

    @property
    def security_level(self) -> str:
        """The v3 user's level: authNoPriv or authPriv ("" without v3)."""
        if not self.v3:
            return ""
        return "authPriv" if self.priv != "none" and self.priv_key else "authNoPriv"

    @classmethod
    def from_config(cls, config: LoadedConfig) -> AgentServiceConfig | None:
        """The slice, or None when the agent is off (no ``agent_listen``, or nobody may use it)."""
        section = config.toml.snmp
        if not section.agent_listen:
            return None
        host, _, port = section.agent_listen.rpartition(":")
        params = config.params
        cfg = cls(
            device_id=config.device_id,
            host=host.strip("[]"),
            port=int(port),
            community=section.agent_community,
            user=params.get_opt_str("snmp_user") or "",
            auth=AUTH_ALGOS.get(params.get_int("snmp_auth_algo"), "none"),
            auth_key=params.get_opt_str("snmp_auth_key") or "",
            priv=PRIV_ALGOS.get(params.get_int("snmp_priv_algo"), "none"),
            priv_key=params.get_opt_str("snmp_priv_key") or "",
            engine_id=snmp_mib.engine_id_for(section.engine_id, config.device_id, section.enterprise_oid),
            enterprise_oid=section.enterprise_oid,
            state_dir=config.state_dir,
            max_message_bytes=section.agent_max_message_bytes,
            max_requests_per_s=section.agent_max_requests_per_s,
        )
        if not cfg.community and not cfg.v3:
            log.warning(
                "SNMP agent is off: agent_listen is set but there is neither an agent_community (v2c) "
                "nor an SNMPv3 user with authentication (snmp_user, snmp_auth_algo, snmp_auth_key)",
                listen=section.agent_listen,
            )
            return None
        return cfg


# -- the MIB view: what a request reads ----------------------------------------------------------


class Snapshot:
    """What one request reads: the status document and the retained states, taken lazily once."""

    def __init__(
        self,
        status: Callable[[], Mapping[str, Any]],
        states: Mapping[str, Mapping[str, Any]],
        counters: Callable[[str], int],
        engine: Mapping[str, object],
    ) -> None:
        self._status = status
        self._device: Mapping[str, Any] | None = None
        self.states = states
        self.counter = counters
        self.engine = engine
        self._rows: dict[str, tuple[list[Oid], dict[Oid, Mapping[str, Any]]]] = {}

    @property
    def device(self) -> Mapping[str, Any]:
        """The ``<p>/status`` document plus the ``uplink`` state (the watchdog's verdict)."""
        if self._device is None:
            uplink = self.states.get("uplink")
            self._device = {**self._status(), "uplink": dict(uplink) if uplink is not None else {}}
        return self._device

    def rows(self, kind: str) -> tuple[list[Oid], dict[Oid, Mapping[str, Any]]]:
        """The rows of the table of ``kind``: sorted indexes and the state document of each."""
        cached = self._rows.get(kind)
        if cached is not None:
            return cached
        docs: dict[Oid, Mapping[str, Any]] = {}
        prefix = kind + "/"
        for subtopic, document in list(self.states.items()):
            if not subtopic.startswith(prefix):
                continue
            index = snmp_mib.row_index(subtopic[len(prefix) :])
            if index is not None and isinstance(document, Mapping):
                docs[index] = document
        result = (sorted(docs), docs)
        self._rows[kind] = result
        return result


NO_SUCH_OBJECT: Final = "noSuchObject"
NO_SUCH_INSTANCE: Final = "noSuchInstance"
Lookup = Value | str
"""A value, or :data:`NO_SUCH_OBJECT` / :data:`NO_SUCH_INSTANCE`."""

ScalarReader = Callable[[Snapshot], object]


@dataclass(frozen=True)
class Scalars:
    """A group of scalars ``<prefix>.<arc>.0``."""

    prefix: Oid
    objects: tuple[tuple[int, str, ScalarReader], ...]
    """``(arc, syntax, reader)`` in arc order."""

    def get(self, oid: Oid, snap: Snapshot) -> Lookup:
        """The value at ``oid`` (which starts with :attr:`prefix`)."""
        depth = len(self.prefix)
        for arc, syntax, read in self.objects:
            if len(oid) > depth and oid[depth] == arc:
                return (syntax, read(snap)) if oid[depth + 1 :] == (0,) else NO_SUCH_INSTANCE
        return NO_SUCH_OBJECT

    def next(self, oid: Oid, snap: Snapshot) -> tuple[Oid, Value] | None:
        """The first instance after ``oid`` in this group, or None."""
        for arc, syntax, read in self.objects:
            instance = (*self.prefix, arc, 0)
            if instance > oid:
                return instance, (syntax, read(snap))
        return None


@dataclass(frozen=True)
class Table:
    """One table of :data:`dcud.service.snmp_mib.TABLES`, its rows from the retained states."""

    prefix: Oid
    """The table's OID; its entry is ``prefix + (1,)``."""
    kind: str
    columns: tuple[snmp_mib.AgentObject, ...]

    def get(self, oid: Oid, snap: Snapshot) -> Lookup:
        """The value at ``oid`` (which starts with :attr:`prefix`)."""
        entry = (*self.prefix, 1)
        depth = len(entry)
        if oid[:depth] != entry or len(oid) <= depth:
            return NO_SUCH_OBJECT
        column = next((c for c in self.columns if c.arc == oid[depth]), None)
        if column is None:
            return NO_SUCH_OBJECT
        _keys, docs = snap.rows(self.kind)
        document = docs.get(oid[depth + 1 :])
        if document is None:
            return NO_SUCH_INSTANCE
        return column.syntax, column.read(document)

    def next(self, oid: Oid, snap: Snapshot) -> tuple[Oid, Value] | None:
        """The first cell after ``oid`` in this table (column by column, row by row), or None."""
        keys, docs = snap.rows(self.kind)
        if not keys:
            return None
        entry = (*self.prefix, 1)
        for column in self.columns:
            head = (*entry, column.arc)
            if oid < head:
                position = 0
            elif oid[: len(head)] == head:
                position = bisect_right(keys, oid[len(head) :])
                if position == len(keys):
                    continue
            else:
                continue
            index = keys[position]
            return (*head, *index), (column.syntax, column.read(docs[index]))
        return None


Subtree = Scalars | Table


def build_view(enterprise_oid: str) -> tuple[Subtree, ...]:
    """Every subtree the agent serves, in OID order."""
    ent = snmp_mib.oid_tuple(enterprise_oid)

    def counter(name: str) -> ScalarReader:
        return lambda snap: snap.counter(name)

    def device(obj: snmp_mib.AgentObject) -> ScalarReader:
        return lambda snap: obj.read(snap.device)

    system = Scalars(
        SYSTEM_OID,
        (
            (
                1,
                "DisplayString",
                lambda s: f"dcud {s.device.get('version', __version__)} Data Concentrator Unit",
            ),
            (2, "ObjectIdentifier", lambda _s: ent),
            (3, "TimeTicks", lambda s: snmp_mib.number(s.device.get("uptime_s"), 100)),
            (4, "DisplayString", lambda _s: ""),
            (5, "DisplayString", lambda s: snmp_mib.text(s.device.get("device_id"))),
            (6, "DisplayString", lambda _s: ""),
            (7, "Integer32", lambda _s: SYS_SERVICES),
        ),
    )
    snmp_group = Scalars(
        SNMP_GROUP_OID,
        tuple(
            sorted(
                [(arc, "Counter32", counter(symbol)) for arc, symbol, _ in _SNMP_COUNTERS]
                + [
                    (30, "Integer32", lambda _s: snmp_mib.FALSE),  # snmpEnableAuthenTraps: disabled
                ]
            )
        ),
    )
    dcud_device = Scalars(
        (*ent, snmp_mib.DEVICE_ARC),
        tuple((obj.arc, obj.syntax, device(obj)) for obj in snmp_mib.DEVICE_OBJECTS),
    )
    tables = [Table((*ent, t.arc), t.kind, t.columns) for t in snmp_mib.TABLES]
    snmp_engine = Scalars(
        SNMP_ENGINE_OID,
        (
            (1, "OctetString", lambda s: s.engine["id"]),
            (2, "Integer32", lambda s: s.engine["boots"]),
            (3, "Integer32", lambda s: s.engine["time"]),
            (4, "Integer32", lambda s: s.engine["max_message_size"]),
        ),
    )
    usm_stats = Scalars(
        USM_STATS_OID, tuple((arc, "Counter32", counter(symbol)) for arc, symbol, _ in _USM_COUNTERS)
    )
    subtrees: list[Subtree] = [system, snmp_group, dcud_device, *tables, snmp_engine, usm_stats]
    return tuple(sorted(subtrees, key=lambda s: s.prefix))


def view_get(view: Sequence[Subtree], oid: Oid, snap: Snapshot) -> Lookup:
    """GET semantics (RFC 3416 4.2.1): a value, noSuchInstance or noSuchObject."""
    for subtree in view:
        if oid[: len(subtree.prefix)] == subtree.prefix:
            return subtree.get(oid, snap)
    return NO_SUCH_OBJECT


def view_next(view: Sequence[Subtree], oid: Oid, snap: Snapshot) -> tuple[Oid, Value] | None:
    """GETNEXT semantics (RFC 3416 4.2.2): the first instance after ``oid``; None at the end of the MIB."""
    for subtree in view:
        found = subtree.next(oid, snap)
        if found is not None:
            return found
    return None


# -- the pysnmp glue -----------------------------------------------------------------------------


@dataclass
class AgentCounters:
    """What the agent counts besides pysnmp's own counters (``snmp/agent`` state)."""

    datagrams: int = 0
    rate_limited: int = 0
    get: int = 0
    getnext: int = 0
    getbulk: int = 0
    too_big: int = 0
    truncated: int = 0
    unknown_context: int = 0
    set_refused: int = 0
    errors: int = 0

    def to_json(self) -> dict[str, int]:
        """The counters as a JSON object."""
        return dict(vars(self))


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` stored; :meth:`take` spends one if there is one."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        """Spend a token; False when none is left (the caller drops the work)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Agent:
    """One pysnmp engine serving the DCUD-MIB view on one UDP socket.

    Create it inside a running event loop; :meth:`open` binds (OSError when it cannot), :meth:`close`.
    """

    def __init__(
        self,
        config: AgentServiceConfig,
        bus: EventBus,
        status: Callable[[], Mapping[str, Any]],
        clock: EngineClock,
        on_traffic: Callable[[], None] | None = None,
    ) -> None:
        from pysnmp.carrier.asyncio.dgram import udp, udp6
        from pysnmp.entity import config as snmp_config
        from pysnmp.entity import engine
        from pysnmp.entity.rfc3413 import context
        from pysnmp.proto import rfc1902

        self.config = config
        self._bus = bus
        self._status = status
        self._on_traffic = on_traffic
        self.counters = AgentCounters()
        self._logged: set[str] = set()
        self._bucket = TokenBucket(config.max_requests_per_s, max(10.0, config.max_requests_per_s * 2.0))
        self.view = build_view(config.enterprise_oid)
        # pysnmp's own message size stays at its default: its v2c path cannot work below 612 bytes
        # (it subtracts 128 and insists on RFC 3417's 484). Our responses are bounded by the budget
        # the responder computes from max_message_bytes, so nothing bigger is ever sent.
        self.engine: Any = engine.SnmpEngine(snmpEngineID=rfc1902.OctetString(config.engine_id))
        clock.apply(self.engine)
        self.clock = clock
        # No SNMPv1: its messages count as bad versions (snmpInBadVersions) and are dropped.
        self.engine.message_processing_subsystems.pop(0, None)
        builder = self.engine.get_mib_builder()
        self._instances: dict[str, Any] = {}
        for _arc, symbol, _key in _SNMP_COUNTERS:
            (self._instances[symbol],) = builder.import_symbols("__SNMPv2-MIB", symbol)
        for _arc, symbol, _key in _USM_COUNTERS:
            (self._instances[symbol],) = builder.import_symbols("__SNMP-USER-BASED-SM-MIB", symbol)
        (self._unknown_contexts,) = builder.import_symbols("__SNMP-TARGET-MIB", "snmpUnknownContexts")
        ipv6 = ":" in config.host
        module: Any = udp6 if ipv6 else udp
        self._transport: Any = module.UdpTransport().open_server_mode((config.host, config.port))
        snmp_config.add_transport(self.engine, module.DOMAIN_NAME, self._transport)
        # Our own receive callback around pysnmp's: rate bound, counting, and no exception escapes.
        dispatcher = self.engine.transport_dispatcher
        dispatcher.unregister_recv_callback(None)
        dispatcher.register_recv_callback(self._receive, None)
        if config.community:
            snmp_config.add_v1_system(self.engine, "dcud-agent-v2c", config.community)
        if config.v3:
            auth_proto, priv_proto = usm_protocols(config.auth, config.priv)
            priv = config.security_level == "authPriv"
            snmp_config.add_v3_user(
                self.engine,
                config.user,
                auth_proto,
                config.auth_key,
                priv_proto if priv else snmp_config.USM_PRIV_NONE,
                config.priv_key if priv else None,
            )
        snmp_context = context.SnmpContext(self.engine)
        self._responder = _make_responder(self, self.engine, snmp_context)
        self.bound: tuple[str, int] | None = None

    async def open(self) -> None:
        """Wait until the socket is bound; OSError (address in use, no permission for port < 1024)."""
        pending = getattr(self._transport, "_lport", None)
        if pending is not None:
            transport, _protocol = await pending
            sockname = transport.get_extra_info("sockname")
            if sockname:
                self.bound = (str(sockname[0]), int(sockname[1]))

    def close(self) -> None:
        """Close the socket and the engine's dispatcher."""
        with contextlib.suppress(Exception):
            self._responder.close(self.engine)
        with contextlib.suppress(Exception):
            self.engine.close_dispatcher()

    # -- datagrams -------------------------------------------------------------------------------

    def _receive(self, _dispatcher: Any, domain: Any, address: Any, message: Any) -> None:
        self.counters.datagrams += 1
        try:
            if not self._bucket.take():
                self.counters.rate_limited += 1
                self._log_once("rate", "SNMP requests above agent_max_requests_per_s are dropped (counted)")
                return
            self.engine.message_dispatcher.receive_message(self.engine, domain, address, message)
        except Exception as exc:  # hostile input must never take the agent down
            self.counters.errors += 1
            self._log_once(type(exc).__name__, "SNMP request failed", error=repr(exc)[:200])
        finally:
            if self._on_traffic is not None:
                with contextlib.suppress(Exception):
                    self._on_traffic()

    def _log_once(self, kind: str, message: str, **fields: object) -> None:
        if kind in self._logged or len(self._logged) >= 64:
            return
        self._logged.add(kind)
        log.warning(message, **fields)

    # -- answering -------------------------------------------------------------------------------

    def counter(self, symbol: str) -> int:
        """The current value of one of pysnmp's counters (snmpInPkts, usmStatsWrongDigests...)."""
        instance = self._instances.get(symbol)
        return int(instance.syntax) if instance is not None else 0

    def snapshot(self) -> Snapshot:
        """The data one request reads."""
        engine = {
            "id": self.config.engine_id,
            "boots": self.clock.boots,
            "time": max(0, int(time.time()) - self.clock.started_unix_s),
            "max_message_size": self.config.max_message_bytes,
        }
        return Snapshot(self._status, self._bus.states, self.counter, engine)

    def state_document(self) -> dict[str, Any]:
        """The ``snmp/agent`` state: where it listens, who may ask, and what it counted."""
        pysnmp_counts = {key: self.counter(symbol) for _a, symbol, key in (*_SNMP_COUNTERS, *_USM_COUNTERS)}
        cfg = self.config
        return {
            "listen": f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}",
            "bound": list(self.bound) if self.bound else None,
            # agent_community is a secret: only whether it is set.
            "v2c": bool(cfg.community),
            "v3": cfg.security_level or None,
            "engine_id": snmp_mib.engine_id_hex(cfg.engine_id),
            "engine_boots": self.clock.boots,
            "refused": sum(pysnmp_counts[key] for key in REFUSALS),
            **self.counters.to_json(),
            **pysnmp_counts,
        }

    def answer(self, pdu: Any, budget_bytes: int) -> tuple[int, int, list[tuple[Any, Any]]]:
        """``(error_status, error_index, varbinds)`` for a GET, GETNEXT or GETBULK PDU."""
        from pysnmp.proto import rfc1905
        from pysnmp.proto.api import v2c

        request = [(tuple(name), value) for name, value in v2c.apiPDU.get_varbinds(pdu)]
        snap = self.snapshot()
        sizer = _Sizer(budget_bytes)
        tag = pdu.tagSet
        if tag == rfc1905.GetRequestPDU.tagSet:
            self.counters.get += 1
            out: list[Binding] = []
            for oid, _ in request:
                found = view_get(self.view, oid, snap)
                binding = (oid, found)
                if not sizer.add(binding) or len(out) >= MAX_VARBINDS:
                    self.counters.too_big += 1
                    return TOO_BIG, 0, []
                out.append(binding)
            return 0, 0, [_wire(b) for b in out]
        if tag == rfc1905.GetNextRequestPDU.tagSet:
            self.counters.getnext += 1
            out = []
            for oid, _ in request:
                binding = _next_binding(self.view, oid, snap)
                if not sizer.add(binding) or len(out) >= MAX_VARBINDS:
                    self.counters.too_big += 1
                    return TOO_BIG, 0, []
                out.append(binding)
            return 0, 0, [_wire(b) for b in out]
        self.counters.getbulk += 1
        non_repeaters = max(0, int(v2c.apiBulkPDU.get_non_repeaters(pdu)))
        max_repetitions = max(0, int(v2c.apiBulkPDU.get_max_repetitions(pdu)))
        n = min(non_repeaters, len(request))
        out = []
        for oid, _ in request[:n]:
            binding = _next_binding(self.view, oid, snap)
            if not sizer.add(binding) or len(out) >= MAX_VARBINDS:
                self.counters.truncated += 1
                return 0, 0, [_wire(b) for b in out]
            out.append(binding)
        cursors = [oid for oid, _ in request[n:]]
        for _ in range(max_repetitions if cursors else 0):
            ended = True
            following = []
            for oid in cursors:
                binding = _next_binding(self.view, oid, snap)
                if binding[1] != END_OF_MIB:
                    ended = False
                if not sizer.add(binding) or len(out) >= MAX_VARBINDS:
                    self.counters.truncated += 1
                    return 0, 0, [_wire(b) for b in out]
                out.append(binding)
                following.append(binding[0])
            cursors = following
            if ended:  # RFC 3416 4.2.3 (2): every repeater is at the end of the MIB
                break
        return 0, 0, [_wire(b) for b in out]


TOO_BIG: Final = 1
GEN_ERR: Final = 5
NOT_WRITABLE: Final = 17
END_OF_MIB: Final = "endOfMibView"
Binding = tuple[Oid, Lookup]


def _next_binding(view: Sequence[Subtree], oid: Oid, snap: Snapshot) -> Binding:
    found = view_next(view, oid, snap)
    return (oid, END_OF_MIB) if found is None else found


def encode_value(found: Lookup) -> Any:
    """A lookup result as a pysnmp value (exceptions as the RFC 3416 exception values)."""
    from pysnmp.proto import rfc1902, rfc1905

    if found == NO_SUCH_OBJECT:
        return rfc1905.noSuchObject
    if found == NO_SUCH_INSTANCE:
        return rfc1905.noSuchInstance
    if found == END_OF_MIB:
        return rfc1905.endOfMibView
    assert isinstance(found, tuple)
    syntax, value = found
    if syntax == "DisplayString":
        return rfc1902.OctetString(snmp_mib.display_string(value).encode("ascii"))
    if syntax == "OctetString":
        return rfc1902.OctetString(value if isinstance(value, bytes) else str(value).encode())
    if syntax == "ObjectIdentifier":
        return rfc1902.ObjectIdentifier(value)
    number = int(value) if isinstance(value, int) else 0
    if syntax == "Integer32":
        return rfc1902.Integer32(max(-_MAX_INT32 - 1, min(_MAX_INT32, number)))
    if syntax == "Gauge32":
        return rfc1902.Gauge32(max(0, min(2**32 - 1, number)))
    if syntax == "Counter32":
        return rfc1902.Counter32(max(0, number) % 2**32)
    if syntax == "Counter64":
        return rfc1902.Counter64(max(0, number) % 2**64)
    if syntax == "TimeTicks":
        return rfc1902.TimeTicks(max(0, number) % 2**32)
    raise ValueError(f"unknown syntax {syntax}")


def _wire(binding: Binding) -> tuple[Any, Any]:
    from pysnmp.proto import rfc1902

    oid, found = binding
    return rfc1902.ObjectName(oid), encode_value(found)


class _Sizer:
    """Adds up the BER size of response variable bindings against a budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.remaining = budget_bytes

    def add(self, binding: Binding) -> bool:
        """Count one binding; False (and nothing counted) when it does not fit."""
        from pyasn1.codec.ber import encoder  # type: ignore[import-untyped]

        name, value = _wire(binding)
        size = len(encoder.encode(name)) + len(encoder.encode(value)) + 4  # + the VarBind SEQUENCE header
        if size > self.remaining:
            return False
        self.remaining -= size
        return True


def _make_responder(agent: Agent, engine: Any, snmp_context: Any) -> Any:
    """The command responder (a pysnmp class, so defined where pysnmp is imported)."""
    from pysnmp.entity.rfc3413 import cmdrsp
    from pysnmp.proto import rfc1905

    class Responder(cmdrsp.CommandResponderBase):  # type: ignore[misc]
        """GET, GETNEXT and GETBULK from the DCUD-MIB view; every SET is refused (read-only)."""

        SUPPORTED_PDU_TYPES = (
            rfc1905.GetRequestPDU.tagSet,
            rfc1905.GetNextRequestPDU.tagSet,
            rfc1905.GetBulkRequestPDU.tagSet,
            rfc1905.SetRequestPDU.tagSet,
        )

        budget_bytes = 0

        def process_pdu(
            self,
            snmpEngine: Any,  # noqa: N803 (pysnmp's signature)
            messageProcessingModel: Any,  # noqa: N803
            securityModel: Any,  # noqa: N803
            securityName: Any,  # noqa: N803
            securityLevel: Any,  # noqa: N803
            contextEngineId: Any,  # noqa: N803
            contextName: Any,  # noqa: N803
            pduVersion: Any,  # noqa: N803
            PDU: Any,  # noqa: N803
            maxSizeResponseScopedPDU: Any,  # noqa: N803
            stateReference: Any,  # noqa: N803
        ) -> None:
            cfg = agent.config
            if int(messageProcessingModel) == 3:
                local = cfg.max_message_bytes - _V3_HEADER_BYTES
            else:
                local = cfg.max_message_bytes - _V2C_HEADER_BYTES - len(cfg.community)
            scoped = min(int(maxSizeResponseScopedPDU), local)
            self.budget_bytes = (
                scoped - _PDU_HEADER_BYTES - len(bytes(contextEngineId)) - len(bytes(contextName))
            )
            try:
                super().process_pdu(
                    snmpEngine,
                    messageProcessingModel,
                    securityModel,
                    securityName,
                    securityLevel,
                    contextEngineId,
                    contextName,
                    pduVersion,
                    PDU,
                    maxSizeResponseScopedPDU,
                    stateReference,
                )
            except Exception as exc:  # never out of the handler; the pending request is released
                agent.counters.errors += 1
                agent._log_once(type(exc).__name__, "SNMP request failed", error=repr(exc)[:200])
                self.release_state_information(stateReference)

        def handle_management_operation(
            self,
            snmpEngine: Any,  # noqa: N803
            stateReference: Any,  # noqa: N803
            contextName: Any,  # noqa: N803
            PDU: Any,  # noqa: N803
            *_: Any,
        ) -> None:
            from pysnmp.proto.api import v2c

            if bytes(contextName):
                # Only the default context exists. RFC 3413 asks for an snmpUnknownContexts report,
                # which pysnmp 7 cannot send from a command responder (it refuses to report on a
                # response, LoopTerminated): answer genErr instead of staying silent, and count it.
                agent.counters.unknown_context += 1
                agent._unknown_contexts.syntax += 1
                status, index, varbinds = GEN_ERR, 1, list(v2c.apiPDU.get_varbinds(PDU))
            elif PDU.tagSet == rfc1905.SetRequestPDU.tagSet:
                # Read-only: every SET is refused, on its first variable (RFC 3416 4.2.5).
                agent.counters.set_refused += 1
                status, index, varbinds = NOT_WRITABLE, 1, list(v2c.apiPDU.get_varbinds(PDU))
            else:
                try:
                    status, index, varbinds = agent.answer(PDU, self.budget_bytes)
                except Exception as exc:
                    agent.counters.errors += 1
                    agent._log_once(type(exc).__name__, "SNMP request failed", error=repr(exc)[:200])
                    status, index, varbinds = GEN_ERR, 1, list(v2c.apiPDU.get_varbinds(PDU))
            self.send_varbinds(snmpEngine, stateReference, status, index, varbinds)
            self.release_state_information(stateReference)

    return Responder(engine, snmp_context)


# -- the service ---------------------------------------------------------------------------------


class SnmpAgentService:
    """Supervised service ``snmp-agent``: the read-only agent on ``[snmp] agent_listen``."""

    name = "snmp-agent"

    def __init__(
        self, config: AgentServiceConfig, bus: EventBus, status: Callable[[], Mapping[str, Any]]
    ) -> None:
        self.config = config
        self._bus = bus
        self._status = status
        self.agent: Agent | None = None
        self._publish_handle: asyncio.TimerHandle | None = None
        self._last_publish_s = 0.0
        self._state = "starting"
        self._error = ""

    def _publish(self) -> None:
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self._publish_handle = None
        self._last_publish_s = time.monotonic()
        agent = self.agent
        document: dict[str, Any] = {"state": self._state, "error": self._error or None}
        if agent is not None:
            document.update(agent.state_document())
        self._bus.set_state(STATE_SUBTOPIC, document)

    def _on_traffic(self) -> None:
        # A walk is hundreds of requests: publish at most every STATE_MIN_INTERVAL_S.
        if self._publish_handle is not None:
            return
        delay = self._last_publish_s + STATE_MIN_INTERVAL_S - time.monotonic()
        if delay <= 0:
            self._publish()
        else:
            self._publish_handle = asyncio.get_running_loop().call_later(delay, self._publish)

    async def run(self, ctx: ServiceContext) -> None:
        """Bind (retrying with backoff while the port is taken or forbidden), serve until stopped."""
        cfg = self.config
        clock = engine_clock(cfg.state_dir)
        backoff = Backoff(initial_s=1.0, max_s=60.0)
        last_error = ""
        try:
            while not ctx.stopping.is_set():
                agent = Agent(cfg, self._bus, self._status, clock, self._on_traffic)
                try:
                    await agent.open()
                except OSError as exc:
                    agent.close()
                    error = exc.strerror or str(exc)
                    if error != last_error:  # once per state change
                        hint = (
                            " (ports below 1024 need the snmp-port systemd drop-in)"
                            if cfg.port < 1024
                            else ""
                        )
                        ctx.log.error(f"cannot listen{hint}", host=cfg.host, port=cfg.port, error=error)
                        last_error = error
                    self._state, self._error = "failed", error
                    self._publish()
                    ctx.set_ready()  # degraded, not a start failure: meters keep being read
                    if await ctx.sleep(backoff.next_delay_s()):
                        return
                    continue
                self.agent = agent
                self._state, self._error = "listening", ""
                self._publish()
                ctx.log.info(
                    "SNMP agent listening",
                    address=agent.bound,
                    v2c=bool(cfg.community),
                    v3=cfg.security_level or None,
                    engine_id=snmp_mib.engine_id_hex(cfg.engine_id),
                )
                ctx.set_ready()
                try:
                    await ctx.heartbeat_forever()
                finally:
                    agent.close()
                return
        finally:
            if self._publish_handle is not None:
                self._publish_handle.cancel()
                self._publish_handle = None
            if self.agent is not None:
                self._state = "stopped"
                self._publish()
