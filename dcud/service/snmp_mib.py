"""DCUD-MIB as data: the OIDs of ``mibs/DCUD-MIB.txt``, the event-to-trap mapping and the engine ID.

Pure and cheap to import (no pysnmp): ``dcud params`` and the status document use it to show the
SNMP engine ID without starting an SNMP engine.

OID layout (``<ent>`` is the enterprise OID, ``[snmp] enterprise_oid`` in dcud.toml)::

    <ent>                 dcudMIB            MODULE-IDENTITY
    <ent>.0               dcudNotifications  (last arc 0, RFC 3584 round trip)
    <ent>.0.<n>           one NOTIFICATION-TYPE per event type (TRAPS below)
    <ent>.1               dcudEventObjects   accessible-for-notify scalars, sent as <oid>.0
    <ent>.2               dcudConformance
    <ent>.3               dcudDevice         read-only scalars of the agent (DEVICE_OBJECTS)
    <ent>.4 .. <ent>.8    dcudLineTable ... dcudPortTable: one row per retained state (TABLES)

The agent's objects are data too: each names its MIB object, its arc, its SMI syntax and how its
value is read from a state document (the ``<p>/status`` document for the device scalars, the
retained ``<p>/<kind>/<name>/state`` document for a table row), so the agent serves exactly what
MQTT shows; ``tests/service/test_snmp_agent.py`` checks every name and OID against ``DCUD-MIB.txt``.

The default enterprise OID ``1.3.6.1.4.1.32473`` is a **placeholder**: 32473 is the Private Enterprise
Number IANA reserves for documentation (RFC 5612). A fleet operator replaces it with their own PEN in
``[snmp] enterprise_oid`` *and* in ``DCUD-MIB.txt`` (one line, ``dcudMIB ... ::= { enterprises 32473 }``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

PLACEHOLDER_ENTERPRISE_OID: Final = "1.3.6.1.4.1.32473"
"""RFC 5612 documentation PEN; replace with your own IANA Private Enterprise Number."""

SYS_UPTIME_OID: Final = "1.3.6.1.2.1.1.3.0"
SNMP_TRAP_OID_OID: Final = "1.3.6.1.6.3.1.1.4.1.0"


@dataclass(frozen=True, slots=True)
class TrapDef:
    """One NOTIFICATION-TYPE of DCUD-MIB: its name and last arc under ``dcudNotifications``."""

    name: str
    arc: int


TRAPS: Final[dict[str, TrapDef]] = {
    "power_loss": TrapDef("dcudPowerLoss", 1),
    "power_return": TrapDef("dcudPowerReturn", 2),
    "power_loss_unsurvived": TrapDef("dcudPowerLossUnsurvived", 3),
    "line_down": TrapDef("dcudLineDown", 4),
    "line_up": TrapDef("dcudLineUp", 5),
    "meter_silent": TrapDef("dcudMeterSilent", 6),
    "outbox_high_water": TrapDef("dcudOutboxHighWater", 7),
    "outbox_full": TrapDef("dcudOutboxFull", 8),
    "clock_unsync": TrapDef("dcudClockUnsync", 9),
    "clock_sync": TrapDef("dcudClockSync", 10),
    "uplink_unreachable": TrapDef("dcudUplinkUnreachable", 11),
    "drive_fault": TrapDef("dcudDriveFault", 12),
    "drive_fault_cleared": TrapDef("dcudDriveFaultCleared", 13),
    "drive_heartbeat_lost": TrapDef("dcudDriveHeartbeatLost", 14),
    "drive_heartbeat_restored": TrapDef("dcudDriveHeartbeatBack", 15),
    "drive_offline": TrapDef("dcudDriveOffline", 16),
    "drive_online": TrapDef("dcudDriveOnline", 17),
    "meter_error": TrapDef("dcudMeterError", 18),
    "meter_back": TrapDef("dcudMeterBack", 19),
    "outbox_corrupt": TrapDef("dcudOutboxCorrupt", 20),
    "config_changed": TrapDef("dcudConfigChanged", 21),
    "firmware_staged": TrapDef("dcudFirmwareStaged", 22),
    "input_change": TrapDef("dcudInputChange", 23),
    "outbox_high_water_cleared": TrapDef("dcudOutboxHighWaterCleared", 24),
    "outbox_full_cleared": TrapDef("dcudOutboxFullCleared", 25),
}
"""Event type (``<p>/event`` ``type``) -> trap. Events of other types send no trap."""

LAST_GASP_EVENTS: Final = frozenset({"power_loss"})
"""Always sent as an unacknowledged trap, also with ``[snmp] inform = true``: the last-gasp path hands
the datagram to the kernel synchronously and cannot wait for an acknowledgement."""

# The varbinds every trap carries after sysUpTime.0 and snmpTrapOID.0, in the MIB's OBJECTS order:
# (name, last arc under dcudEventObjects).
VARBINDS: Final[tuple[tuple[str, int], ...]] = (
    ("dcudDeviceId", 1),
    ("dcudEventType", 2),
    ("dcudEventTime", 3),
    ("dcudEventText", 4),
    ("dcudEventSubject", 5),
    ("dcudEventId", 6),
)

# The most specific first: a meter event also names its line.
_SUBJECT_FIELDS: Final = ("meter", "drive", "input", "line", "server", "host", "subject", "name")
_DISPLAY_STRING_MAX: Final = 255
_OID_RE = re.compile(r"^1\.3\.6\.1\.4\.1\.[0-9]+(\.[0-9]+)*$")
_ENGINE_ID_HEX = re.compile(r"^[0-9A-Fa-f]{10,64}$")


def valid_enterprise_oid(oid: str) -> bool:
    """Whether ``oid`` is under ``1.3.6.1.4.1`` (iso.org.dod.internet.private.enterprises)."""
    return bool(_OID_RE.match(oid))


def trap_oid(enterprise_oid: str, event_type: str) -> str | None:
    """The notification OID for an event type, or None when that event sends no trap."""
    trap = TRAPS.get(event_type)
    return f"{enterprise_oid}.0.{trap.arc}" if trap else None


def varbind_oid(enterprise_oid: str, arc: int) -> str:
    """Instance OID (``.0``, a scalar) of the event object with last arc ``arc``."""
    return f"{enterprise_oid}.1.{arc}.0"


def display_string(value: object) -> str:
    """A value as an SNMP DisplayString: printable, at most 255 characters."""
    text = "" if value is None else str(value)
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return text[:_DISPLAY_STRING_MAX]


def trap_values(device_id: str, event: dict[str, object]) -> list[tuple[int, str]]:
    """``(arc, text)`` for each event object, from an event payload (``type``, ``ts``, ``text``...)."""
    subject = next((event[f] for f in _SUBJECT_FIELDS if event.get(f) not in (None, "")), "")
    values = {
        "dcudDeviceId": device_id,
        "dcudEventType": event.get("type", ""),
        "dcudEventTime": event.get("ts", ""),
        "dcudEventText": event.get("text", ""),
        "dcudEventSubject": subject,
        "dcudEventId": event.get("uid", ""),
    }
    return [(arc, display_string(values[name])) for name, arc in VARBINDS]


def enterprise_number(enterprise_oid: str) -> int:
    """The PEN of an enterprise OID (the arc after ``1.3.6.1.4.1``)."""
    return int(enterprise_oid.split(".")[6])


def default_engine_id(device_id: str, enterprise_oid: str = PLACEHOLDER_ENTERPRISE_OID) -> bytes:
    """A stable SNMP engine ID for ``device_id`` (RFC 3411 SnmpEngineID, format 5 = octets).

    ``0x80000000 | PEN`` (4 bytes), ``05``, then the first 12 bytes of SHA-256 of the device id: the
    same device always gets the same ID (the receiver is configured once), and two DCUs never share
    one in practice. 17 bytes, within RFC 3411's 5..32.
    """
    head = (0x80000000 | enterprise_number(enterprise_oid)).to_bytes(4, "big")
    digest = hashlib.sha256(f"dcud:{device_id}".encode()).digest()[:12]
    return head + b"\x05" + digest


def parse_engine_id(text: str) -> bytes:
    """Parse a configured engine ID: hex digits, optionally ``0x``-prefixed or ``:``-separated.

    Raises ``ValueError`` unless it is 5..32 octets (RFC 3411).
    """
    cleaned = text.strip().replace(":", "").replace(" ", "")
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    if not _ENGINE_ID_HEX.match(cleaned) or len(cleaned) % 2:
        raise ValueError("expected 5..32 octets as hex digits, e.g. 0x80007ed9051a2b3c4d5e")
    return bytes.fromhex(cleaned)


def engine_id_for(configured: str, device_id: str, enterprise_oid: str) -> bytes:
    """The engine ID in force: the configured one, else :func:`default_engine_id`."""
    if configured:
        return parse_engine_id(configured)
    return default_engine_id(device_id, enterprise_oid)


def engine_id_hex(engine_id: bytes) -> str:
    """``0x``-prefixed lower-case hex, the form Net-SNMP's ``createUser -e`` takes."""
    return "0x" + engine_id.hex()


# -- the read-only agent's objects --------------------------------------------------------------------

Syntax = Literal[
    "DisplayString", "Integer32", "Gauge32", "Counter32", "Counter64", "TimeTicks", "ObjectIdentifier"
]
"""SMI syntax on the wire (enumerations and TruthValue are Integer32)."""

Document = Mapping[str, Any]
Reader = Callable[[Document], object]
"""Reads one object's value from a state document: ``str`` for DisplayString, ``int`` otherwise."""

TRUE: Final = 1
FALSE: Final = 2
"""SNMPv2-TC TruthValue."""


@dataclass(frozen=True, slots=True)
class AgentObject:
    """One readable object of DCUD-MIB: a device scalar or a table column."""

    name: str
    arc: int
    syntax: Syntax
    read: Reader


@dataclass(frozen=True, slots=True)
class AgentTable:
    """One table of DCUD-MIB: a row per retained state ``<kind>/<name>``, indexed by ``<name>``.

    The index is the name as a DisplayString (length, then its octets: RFC 2578 section 7.7), so
    rows come in the order of their names' lengths, then bytes (``"m-2"`` before ``"m-10"`` only if
    shorter); a walk shows them as ``dcudMeterQuality."flat-12"``.
    """

    name: str
    arc: int
    kind: str
    index_name: str
    columns: tuple[AgentObject, ...]


def text(value: object) -> str:
    """A document member as DisplayString text: ``""`` for null, errors as ``<type>: <message>``."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        message = value.get("message", "")
        kind = value.get("type", "")
        return display_string(f"{kind}: {message}" if kind else message)
    if isinstance(value, bool):
        return "true" if value else "false"
    return display_string(value)


def number(value: object, scale: float = 1.0) -> int:
    """A numeric member as an integer (scaled, rounded); 0 for null or anything not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    try:
        return round(value * scale)
    except (OverflowError, ValueError):  # inf, nan
        return 0


def truth(value: object) -> int:
    """A boolean member as a TruthValue: true(1) for ``true``, false(2) otherwise."""
    return TRUE if value is True else FALSE


def _member(document: Document, *path: str) -> object:
    value: object = document
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _text_at(*path: str) -> Reader:
    return lambda doc: text(_member(doc, *path))


def _number_at(*path: str, scale: float = 1.0) -> Reader:
    return lambda doc: number(_member(doc, *path), scale)


def _enum_at(path: tuple[str, ...], values: Mapping[object, int]) -> Reader:
    def read(doc: Document) -> int:
        value = _member(doc, *path)
        # bool is a subclass of int: look booleans up by identity so True never matches 1.
        for key, code in values.items():
            if value is key or (not isinstance(value, bool) and not isinstance(key, bool) and value == key):
                return code
        return 0

    return read


def _sum_at(*path: str) -> Reader:
    def read(doc: Document) -> int:
        value = _member(doc, *path)
        if not isinstance(value, Mapping):
            return 0
        return sum(number(v) for v in value.values())

    return read


def _first_number(*paths: tuple[str, ...]) -> Reader:
    def read(doc: Document) -> int:
        for path in paths:
            value = _member(doc, *path)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return number(value)
        return 0

    return read


def _first_text(*paths: tuple[str, ...]) -> Reader:
    def read(doc: Document) -> str:
        for path in paths:
            value = _member(doc, *path)
            if value not in (None, ""):
                return text(value)
        return ""

    return read


DEVICE_ARC: Final = 3
"""``dcudDevice``: the device scalars, read from the ``<p>/status`` document plus ``uplink``."""

DEVICE_OBJECTS: Final[tuple[AgentObject, ...]] = (
    AgentObject("dcudDevId", 1, "DisplayString", _text_at("device_id")),
    AgentObject("dcudDevVersion", 2, "DisplayString", _text_at("version")),
    AgentObject("dcudDevUptime", 3, "TimeTicks", _number_at("uptime_s", scale=100)),
    AgentObject("dcudDevPower", 4, "Integer32", _enum_at(("power", "state"), {"ok": 1, "lost": 2})),
    AgentObject("dcudDevPowerSince", 5, "DisplayString", _text_at("power", "since")),
    AgentObject("dcudDevClockSynced", 6, "Integer32", _enum_at(("clock", "synced"), {True: 1, False: 2})),
    AgentObject("dcudDevClockOffset", 7, "Integer32", _number_at("clock", "offset_s", scale=1000)),
    AgentObject("dcudDevClockServer", 8, "DisplayString", _text_at("clock", "server")),
    AgentObject("dcudDevOutboxDepth", 9, "Gauge32", _number_at("outbox", "depth")),
    AgentObject("dcudDevOutboxBytes", 10, "Gauge32", _number_at("outbox", "bytes")),
    AgentObject("dcudDevOutboxMaxBytes", 11, "Gauge32", _number_at("outbox", "max_bytes")),
    AgentObject("dcudDevOutboxOldestAge", 12, "Gauge32", _number_at("outbox", "oldest_age_s")),
    AgentObject("dcudDevOutboxDropped", 13, "Counter32", _sum_at("outbox", "dropped")),
    AgentObject(
        "dcudDevOutboxHighWater", 14, "Integer32", lambda doc: truth(_member(doc, "outbox", "high_water"))
    ),
    AgentObject(
        "dcudDevUplinkState", 15, "Integer32", _enum_at(("uplink", "reachable"), {True: 1, False: 2})
    ),
    AgentObject("dcudDevUplinkHost", 16, "DisplayString", _text_at("uplink", "host")),
)

TABLES: Final[tuple[AgentTable, ...]] = (
    AgentTable(
        "dcudLineTable",
        4,
        "line",
        "dcudLineName",
        (
            AgentObject("dcudLineState", 2, "DisplayString", _text_at("state")),
            AgentObject("dcudLineDevice", 3, "DisplayString", _text_at("device")),
            AgentObject("dcudLineKind", 4, "DisplayString", _text_at("kind")),
            AgentObject("dcudLineLeaseOwner", 5, "DisplayString", _text_at("lease", "owner")),
            AgentObject("dcudLineBytesRx", 6, "Counter64", _number_at("bytes_rx")),
            AgentObject("dcudLineBytesTx", 7, "Counter64", _number_at("bytes_tx")),
            AgentObject("dcudLineErrors", 8, "Counter32", _number_at("errors")),
            AgentObject("dcudLineLastError", 9, "DisplayString", _text_at("last_error")),
            AgentObject("dcudLineSince", 10, "DisplayString", _text_at("since")),
        ),
    ),
    AgentTable(
        "dcudMeterTable",
        5,
        "meter",
        "dcudMeterName",
        (
            AgentObject("dcudMeterLine", 2, "DisplayString", _text_at("line")),
            AgentObject("dcudMeterProtocol", 3, "DisplayString", _text_at("protocol")),
            AgentObject("dcudMeterQuality", 4, "DisplayString", _text_at("quality")),
            AgentObject("dcudMeterStatus", 5, "DisplayString", _text_at("status")),
            AgentObject("dcudMeterLastSuccess", 6, "DisplayString", _text_at("last_success")),
            AgentObject("dcudMeterLastError", 7, "DisplayString", _text_at("last_error")),
            AgentObject("dcudMeterConsecutiveFailures", 8, "Gauge32", _number_at("consecutive_failures")),
            AgentObject("dcudMeterReads", 9, "Counter32", _number_at("counters", "reads")),
            AgentObject("dcudMeterReadsOk", 10, "Counter32", _number_at("counters", "ok")),
            AgentObject("dcudMeterReadsFailed", 11, "Counter32", _number_at("counters", "failed")),
        ),
    ),
    AgentTable(
        "dcudDriveTable",
        6,
        "drive",
        "dcudDriveName",
        (
            AgentObject("dcudDriveProtocol", 2, "DisplayString", _text_at("protocol")),
            AgentObject("dcudDriveIsOnline", 3, "Integer32", lambda doc: truth(_member(doc, "online"))),
            AgentObject("dcudDriveNmt", 4, "DisplayString", _text_at("nmt")),
            AgentObject("dcudDriveCia402", 5, "DisplayString", _text_at("cia402")),
            AgentObject("dcudDriveErrorCode", 6, "Integer32", _number_at("error_code")),
            AgentObject("dcudDriveErrorText", 7, "DisplayString", _text_at("error_text")),
            AgentObject("dcudDriveHeartbeat", 8, "DisplayString", _text_at("heartbeat")),
            AgentObject("dcudDriveLastError", 9, "DisplayString", _text_at("last_error")),
        ),
    ),
    AgentTable(
        "dcudPushTable",
        7,
        "push",
        "dcudPushName",
        (
            AgentObject("dcudPushTarget", 2, "DisplayString", _text_at("target")),
            AgentObject("dcudPushPhase", 3, "DisplayString", _text_at("phase")),
            AgentObject("dcudPushBacklog", 4, "Gauge32", _number_at("backlog")),
            AgentObject("dcudPushLastSuccess", 5, "DisplayString", _text_at("last_success")),
            AgentObject("dcudPushLastError", 6, "DisplayString", _text_at("last_error")),
            AgentObject(
                "dcudPushPushed",
                7,
                "Counter32",
                _first_number(("pushed_items",), ("counters", "sent"), ("pushes",)),
            ),
        ),
    ),
    AgentTable(
        "dcudPortTable",
        8,
        "bridge",
        "dcudPortName",
        (
            AgentObject("dcudPortTcpPort", 2, "Integer32", _number_at("tcp_port")),
            AgentObject("dcudPortLine", 3, "DisplayString", _text_at("line")),
            AgentObject("dcudPortState", 4, "DisplayString", _text_at("state")),
            AgentObject("dcudPortTls", 5, "Integer32", lambda doc: truth(_member(doc, "tls"))),
            AgentObject("dcudPortPeer", 6, "DisplayString", _first_text(("session", "peer"), ("server",))),
            AgentObject("dcudPortSessions", 7, "Counter32", _first_number(("sessions",), ("connects",))),
            AgentObject(
                "dcudPortLastError", 8, "DisplayString", _first_text(("tls_error",), ("last_error",))
            ),
        ),
    ),
)
"""The agent's tables, in OID order. Column 1 of each is its index (not-accessible)."""

MAX_INDEX_BYTES: Final = 64
"""Longest row name served (dcud.toml names are at most 64 characters)."""


def oid_tuple(oid: str) -> tuple[int, ...]:
    """``"1.3.6.1"`` -> ``(1, 3, 6, 1)``."""
    return tuple(int(arc) for arc in oid.split("."))


def row_index(name: str) -> tuple[int, ...] | None:
    """The index of the row ``name`` (length, then octets), None for a name that cannot be one."""
    data = name.encode("utf-8", "replace")
    if not data or len(data) > MAX_INDEX_BYTES or "/" in name:
        return None
    return (len(data), *data)
