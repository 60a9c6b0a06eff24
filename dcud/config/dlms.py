"""``[[meter]] protocol = "dlms"``: the rules between fields, and the values derived from them.

The struct (:class:`dcud.config.model.DlmsConfig`) checks each field on its own; :func:`check_dlms_meter`
checks the combinations and reports each problem as ``file:line: meter[name].key: message`` (through
the loader's issue callback): exactly one of ``line``/``host``, a DLMS line that is not an M-Bus line,
the HDLC physical address, the OBIS codes, what LLS and HLS-GMAC need, the key file. The service and
the CLI derive the session parameters with the helpers here (:func:`meter_keys`,
:func:`client_system_title`, :func:`parse_host`, :func:`parse_object`), so that they read a meter exactly
as the loader validated it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcud.codec.dlms.obis import AttributeRef, Obis, ObisError
from dcud.codec.dlms.security import Keys
from dcud.config.model import DlmsConfig, LineConfig, MeterConfig
from dcud.errors import LocalProtocolError

DLMS_TCP_PORT = 4059
"""IANA port of DLMS/COSEM over TCP (the wrapper, IEC 62056-47)."""
MAX_PHYSICAL_ADDRESS = 0x3FFF
"""The lower HDLC address holds 14 bits in the 4-byte form."""
MAX_OBJECTS = 64
MAX_EVENT_LOGS = 8
KEY_FILE_MAX_BYTES = 64 * 1024
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")

Issue = Callable[[str, int, str, str, str], None]
"""The loader's ``issue(array, index, name, key, message)``."""


class DlmsConfigError(ValueError):
    """A DLMS setting that cannot be used (the message says why, never the secret)."""


@dataclass(frozen=True, slots=True)
class ObjectSpec:
    """One entry of ``objects``: its OBIS code, and the attribute when written ``class/OBIS/attribute``."""

    text: str
    obis: Obis
    ref: AttributeRef | None = None


def parse_object(text: str) -> ObjectSpec:
    """``1.0.1.8.0.255`` (or ``1-0:1.8.0*255``) or ``3/1.0.1.8.0.255/2``; DlmsConfigError otherwise."""
    try:
        if "/" in text:
            ref = AttributeRef.parse(text)
            return ObjectSpec(text, ref.obis, ref)
        return ObjectSpec(text, Obis.parse(text))
    except (ObisError, LocalProtocolError) as exc:
        raise DlmsConfigError(f'"{text}": {exc}') from None


def parse_obis(text: str) -> Obis:
    """An OBIS code; DlmsConfigError otherwise."""
    try:
        return Obis.parse(text)
    except (ObisError, LocalProtocolError) as exc:
        raise DlmsConfigError(f'"{text}": {exc}') from None


def parse_host(text: str) -> tuple[str, int]:
    """``ip:port``, ``[v6]:port``, ``name:port``, or any of them without the port (4059)."""
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise DlmsConfigError(f'"{text}": missing "]" after an IPv6 address')
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise DlmsConfigError(f'"{text}": expected ":port" after "]"')
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DlmsConfigError(f'"{text}": not an IPv6 address in brackets') from None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif value.count(":") > 1:
        raise DlmsConfigError(f'"{text}": write an IPv6 address in brackets: "[2001:db8::7]:4059"')
    if not host:
        raise DlmsConfigError(f'"{text}": no host')
    if not value.startswith("["):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME.match(host):
                raise DlmsConfigError(f'"{text}": not an IP address or host name') from None
    port = DLMS_TCP_PORT
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise DlmsConfigError(f'"{text}": port must be 1..65535')
        port = int(port_text)
    return host, port


def physical_address(address: str) -> int | None:
    """The meter's ``address`` as an HDLC physical address (None: empty, the one-byte address form)."""
    text = address.strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > MAX_PHYSICAL_ADDRESS:
        raise DlmsConfigError(f"HDLC physical address: expected 0..{MAX_PHYSICAL_ADDRESS}, got {address!r}")
    return int(text)


def read_key_file(path: Path) -> Mapping[str, Any]:
    """The table of a TOML or JSON key file (at most :data:`KEY_FILE_MAX_BYTES`), unchecked: what
    :func:`load_key_file` and ``dcud decode dlms --key-file`` read. No message quotes the file."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(KEY_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise DlmsConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(raw) > KEY_FILE_MAX_BYTES:
        raise DlmsConfigError(f"key file {path} is larger than {KEY_FILE_MAX_BYTES} bytes")
    data: Any
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError):
        # Neither message may quote the file: it holds keys.
        raise DlmsConfigError(f"key file {path} is neither TOML nor JSON") from None
    if not isinstance(data, Mapping):
        raise DlmsConfigError(f"key file {path}: expected a table")
    return data


def load_key_file(path: Path) -> tuple[str, str]:
    """``(block_cipher_key, authentication_key)`` hex from a TOML or JSON key file."""
    data = read_key_file(path)
    keys = []
    for name in ("block_cipher_key", "authentication_key"):
        value = data.get(name)
        if not isinstance(value, str) or not re.fullmatch(r"[0-9A-Fa-f]{32}", value):
            raise DlmsConfigError(f"key file {path}: {name} must be 32 hex digits")
        keys.append(value)
    return keys[0], keys[1]


def needs_keys(dlms: DlmsConfig) -> bool:
    """Whether the association needs EK and AK (HLS-GMAC or any security policy)."""
    return dlms.auth == "hls-gmac" or dlms.security != "none"


def meter_keys(dlms: DlmsConfig, base_dir: Path) -> Keys | None:
    """The keys of a meter (inline or from ``key_file``, relative to ``base_dir``), None when not needed."""
    if not needs_keys(dlms):
        return None
    if dlms.key_file:
        path = Path(dlms.key_file)
        ek, ak = load_key_file(path if path.is_absolute() else base_dir / path)
    else:
        ek, ak = dlms.block_cipher_key, dlms.authentication_key
    if not ek or not ak:
        raise DlmsConfigError("block_cipher_key and authentication_key (or key_file) are required")
    return Keys.from_hex(ek, ak)


def client_system_title(dlms: DlmsConfig, device_id: str) -> bytes:
    """dcud's system title: the configured one, else ``DCU`` and 5 bytes of SHA-256(device_id) (stable)."""
    if dlms.system_title:
        return bytes.fromhex(dlms.system_title)
    return b"DCU" + hashlib.sha256(device_id.encode()).digest()[:5]


def check_dlms_meter(
    meter: MeterConfig,
    index: int,
    lines: Mapping[str, LineConfig],
    base_dir: Path,
    issue: Issue,
) -> None:
    """Every cross-field rule of one ``[[meter]]`` that is (or claims to be) a DLMS meter."""

    def bad(key: str, message: str) -> None:
        issue("meter", index, meter.name, key, message)

    if meter.protocol != "dlms":
        if meter.host:
            bad("host", 'only a protocol = "dlms" meter is reached over TCP')
        if meter.dlms is not None:
            bad("dlms", 'a [meter.dlms] table needs protocol = "dlms"')
        return
    dlms = meter.dlms or DlmsConfig()
    if bool(meter.line) == bool(meter.host):
        bad("line" if meter.line else "", "exactly one of line (HDLC) and host (TCP wrapper) is required")
    if meter.line:
        line_cfg = lines.get(meter.line)
        if line_cfg is None:
            bad("line", f'no [[line]] named "{meter.line}"')
        elif line_cfg.kind == "mbus":
            bad("protocol", f'DLMS/COSEM meter on M-Bus line "{line_cfg.name}"')
        try:
            physical_address(meter.address)
        except DlmsConfigError as exc:
            bad("address", str(exc))
    if meter.host:
        try:
            parse_host(meter.host)
        except DlmsConfigError as exc:
            bad("host", str(exc))
        if meter.address:
            bad("address", "a TCP meter has no HDLC address (the wrapper addresses logical_device)")
        if dlms.mode_e:
            bad("dlms.mode_e", "mode E is an IEC 62056-21 sign-on on a serial line, not on TCP")
    if dlms.iec_address and not dlms.mode_e:
        bad("dlms.iec_address", "only used with mode_e = true")
    if dlms.iec_address and not re.fullmatch(r"[0-9A-Za-z ]{1,32}", dlms.iec_address):
        bad("dlms.iec_address", "up to 32 characters of 0-9, A-Z, a-z and space")
    _check_objects(dlms, bad)
    _check_security(dlms, base_dir, bad)


def _check_objects(dlms: DlmsConfig, bad: Callable[[str, str], None]) -> None:
    if len(dlms.objects) > MAX_OBJECTS:
        bad("dlms.objects", f"at most {MAX_OBJECTS} objects")
    seen: set[str] = set()
    for text in dlms.objects:
        try:
            spec = parse_object(text)
        except DlmsConfigError as exc:
            bad("dlms.objects", str(exc))
            continue
        key = str(spec.ref) if spec.ref is not None else str(spec.obis)
        if key in seen:
            bad("dlms.objects", f'"{text}" is listed twice')
        seen.add(key)
    if dlms.profile:
        try:
            parse_obis(dlms.profile)
        except DlmsConfigError as exc:
            bad("dlms.profile", str(exc))
    if len(dlms.event_logs) > MAX_EVENT_LOGS:
        bad("dlms.event_logs", f"at most {MAX_EVENT_LOGS} event logs")
    logs: set[Obis] = set()
    for text in dlms.event_logs:
        try:
            obis = parse_obis(text)
        except DlmsConfigError as exc:
            bad("dlms.event_logs", str(exc))
            continue
        if obis in logs:
            bad("dlms.event_logs", f'"{text}" is listed twice')
        logs.add(obis)


def _check_security(dlms: DlmsConfig, base_dir: Path, bad: Callable[[str, str], None]) -> None:
    if dlms.auth == "lls" and not dlms.password:
        bad("dlms.password", "auth = lls needs the password")
    if dlms.auth != "lls" and dlms.password:
        bad("dlms.password", "only used with auth = lls")
    inline = bool(dlms.block_cipher_key or dlms.authentication_key)
    if dlms.key_file and inline:
        bad("dlms.key_file", "give the keys inline or in key_file, not both")
    if not needs_keys(dlms):
        if inline or dlms.key_file:
            bad("dlms.security", "keys are given but neither auth = hls-gmac nor a security policy uses them")
        return
    if dlms.key_file:
        try:
            meter_keys(dlms, base_dir)
        except DlmsConfigError as exc:
            bad("dlms.key_file", str(exc))
        return
    for name in ("block_cipher_key", "authentication_key"):
        if not getattr(dlms, name):
            why = "auth = hls-gmac" if dlms.auth == "hls-gmac" else f"security = {dlms.security}"
            bad(f"dlms.{name}", f"{why} needs it (32 hex digits), or key_file")


__all__ = [
    "DLMS_TCP_PORT",
    "DlmsConfigError",
    "ObjectSpec",
    "check_dlms_meter",
    "client_system_title",
    "load_key_file",
    "meter_keys",
    "needs_keys",
    "parse_host",
    "parse_obis",
    "parse_object",
    "physical_address",
    "read_key_file",
]
