"""DCUD-MIB as data: the OIDs of ``mibs/DCUD-MIB.txt``, the event-to-trap mapping and the engine ID.

Pure and cheap to import (no pysnmp): ``dcud params`` and the status document use it to show the
SNMP engine ID without starting an SNMP engine.

OID layout (``<ent>`` is the enterprise OID, ``[snmp] enterprise_oid`` in dcud.toml)::

    <ent>                 dcudMIB            MODULE-IDENTITY
    <ent>.0               dcudNotifications  (last arc 0, RFC 3584 round trip)
    <ent>.0.<n>           one NOTIFICATION-TYPE per event type (TRAPS below)
    <ent>.1               dcudEventObjects   accessible-for-notify scalars, sent as <oid>.0
    <ent>.2               dcudConformance

The default enterprise OID ``1.3.6.1.4.1.32473`` is a **placeholder**: 32473 is the Private Enterprise
Number IANA reserves for documentation (RFC 5612). A fleet operator replaces it with their own PEN in
``[snmp] enterprise_oid`` *and* in ``DCUD-MIB.txt`` (one line, ``dcudMIB ... ::= { enterprises 32473 }``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

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
}
"""Event type (``<p>/event`` ``type``) -> trap. Events of other types send no trap."""

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

_SUBJECT_FIELDS: Final = ("line", "meter", "server", "host", "subject")
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
