"""The peer's JSON configuration (``--config peer.json``): transports, clients, keys, clock, profiles.

Every key is optional except that at least one transport is needed; unknown keys are errors, so a typo
in a test's configuration fails loudly instead of testing the default.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cosem import parse_utc

GREEN_BOOK_BLOCK_CIPHER_KEY = "000102030405060708090A0B0C0D0E0F"
GREEN_BOOK_AUTHENTICATION_KEY = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"
AUTHS = ("none", "lls", "hls-gmac")
SECURITIES = {"none": 0x00, "authenticated": 0x10, "encrypted": 0x20, "authenticated-encrypted": 0x30}


class ConfigError(ValueError):
    """The configuration is not valid; the message names the key."""


@dataclass(frozen=True)
class HdlcConfig:
    """HDLC on a tty: the device, this meter's physical address, its largest information field."""

    device: str
    physical_address: int = 17
    max_info_field: int = 128
    baud: int = 0
    inactivity_timeout_s: float = 0.0


@dataclass(frozen=True)
class TcpConfig:
    """The wrapper on TCP (port 0: any free port, reported when ready)."""

    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class ClientConfig:
    """One client SAP the meter knows and how it must authenticate and protect its APDUs."""

    sap: int
    auth: str = "none"
    password: bytes = b""
    security: int = 0x00
    can_write: bool = False


@dataclass(frozen=True)
class Event:
    """An event-log entry: when and which code."""

    at_s: float
    code: int


@dataclass(frozen=True)
class PeerConfig:
    """The whole configuration."""

    hdlc: HdlcConfig | None
    tcp: TcpConfig | None
    logical_device: int = 1
    system_title: bytes = bytes.fromhex("4D4D4D0000BC614E")
    block_cipher_key: bytes = bytes.fromhex(GREEN_BOOK_BLOCK_CIPHER_KEY)
    authentication_key: bytes = bytes.fromhex(GREEN_BOOK_AUTHENTICATION_KEY)
    server_invocation_counter: int = 1
    max_pdu_size: int = 512
    clients: tuple[ClientConfig, ...] = ()
    clock_start_s: float = 0.0
    clock_running: bool = False
    deviation_min: int = 0
    profile_start_s: float = 0.0
    capture_period_s: int = 900
    profile_max_entries: int = 4320
    events: tuple[Event, ...] = ()
    event_log_max_entries: int = 100
    control_host: str = "127.0.0.1"
    control_port: int = 0
    request_log: str | None = None
    challenge_seed: int | None = None
    silent: bool = False


def _take(obj: dict[str, Any], where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected an object")
    unknown = set(obj) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    return obj


def _int(obj: dict[str, Any], key: str, default: int, lo: int, hi: int, where: str) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where}.{key}: expected an integer {lo}..{hi}, got {value!r}")
    return value


def _hex(obj: dict[str, Any], key: str, default: str, size: int, where: str) -> bytes:
    value = obj.get(key, default)
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key}: expected hex, got {value!r}") from None
    if len(raw) != size:
        raise ConfigError(f"{where}.{key}: expected {size} bytes, got {len(raw)}")
    return raw


def _time(obj: dict[str, Any], key: str, default_s: float, where: str) -> float:
    value = obj.get(key)
    if value is None:
        return default_s
    try:
        return parse_utc(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key}: expected an ISO 8601 time, got {value!r}") from None


def default_clients() -> tuple[ClientConfig, ...]:
    """Public client 16 (no security), 32 with LLS password ``12345678``, 1 with HLS-GMAC and ciphering."""
    return (
        ClientConfig(16, "none"),
        ClientConfig(32, "lls", b"12345678", 0x00, True),
        ClientConfig(1, "hls-gmac", b"", 0x30, True),
    )


def parse(raw: dict[str, Any]) -> PeerConfig:
    """Validate a decoded JSON configuration."""
    top = _take(
        raw,
        "config",
        {
            "hdlc", "tcp", "logical_device", "system_title", "block_cipher_key", "authentication_key",
            "server_invocation_counter", "max_pdu_size", "clients", "clock", "profile", "events",
            "event_log_max_entries", "control", "request_log", "challenge_seed", "silent",
        },
    )  # fmt: skip
    hdlc = None
    if top.get("hdlc") is not None:
        h = _take(
            top["hdlc"],
            "hdlc",
            {"device", "physical_address", "max_info_field", "baud", "inactivity_timeout_s"},
        )
        if not isinstance(h.get("device"), str):
            raise ConfigError("hdlc.device: expected the path of a tty")
        inactivity_s = h.get("inactivity_timeout_s", 0)
        if isinstance(inactivity_s, bool) or not isinstance(inactivity_s, int | float) or inactivity_s < 0:
            raise ConfigError("hdlc.inactivity_timeout_s: expected seconds >= 0")
        hdlc = HdlcConfig(
            h["device"],
            _int(h, "physical_address", 17, 0, 0x3FFD, "hdlc"),
            _int(h, "max_info_field", 128, 32, 2030, "hdlc"),
            _int(h, "baud", 0, 0, 10_000_000, "hdlc"),
            float(inactivity_s),
        )
    tcp = None
    if top.get("tcp") is not None:
        t = _take(top["tcp"], "tcp", {"host", "port"})
        tcp = TcpConfig(str(t.get("host", "127.0.0.1")), _int(t, "port", 0, 0, 65535, "tcp"))
    if hdlc is None and tcp is None:
        raise ConfigError("config: give hdlc, tcp or both")
    clients = default_clients()
    if "clients" in top:
        if not isinstance(top["clients"], list) or not top["clients"]:
            raise ConfigError("clients: expected a non-empty list")
        parsed = []
        for i, raw_client in enumerate(top["clients"]):
            where = f"clients[{i}]"
            c = _take(raw_client, where, {"sap", "auth", "password", "security", "can_write"})
            auth = c.get("auth", "none")
            if auth not in AUTHS:
                raise ConfigError(f"{where}.auth: expected one of {AUTHS}, got {auth!r}")
            security = c.get("security", "none")
            if security not in SECURITIES:
                raise ConfigError(f"{where}.security: expected one of {sorted(SECURITIES)}, got {security!r}")
            if SECURITIES[security] and auth != "hls-gmac":
                raise ConfigError(f"{where}.security: ciphering needs auth = hls-gmac here (system titles)")
            password = c.get("password", "")
            if not isinstance(password, str) or (auth == "lls" and not password):
                raise ConfigError(f"{where}.password: an LLS client needs a password")
            parsed.append(
                ClientConfig(
                    _int(c, "sap", 16, 1, 0x7F, where),
                    auth,
                    password.encode(),
                    SECURITIES[security],
                    bool(c.get("can_write", auth != "none")),
                )
            )
        if len({c.sap for c in parsed}) != len(parsed):
            raise ConfigError("clients: each sap once")
        clients = tuple(parsed)
    clock = _take(top.get("clock", {}), "clock", {"start", "running", "deviation_min"})
    start_s = _time(clock, "start", float(int(time.time())), "clock")
    running = clock.get("running", "start" not in clock)
    if not isinstance(running, bool):
        raise ConfigError("clock.running: expected true or false")
    profile = _take(top.get("profile", {}), "profile", {"start", "period_s", "max_entries"})
    period_s = _int(profile, "period_s", 900, 60, 86400, "profile")
    default_profile_start = (int(start_s) // period_s) * period_s - 10 * 86400
    events = []
    for i, raw_event in enumerate(top.get("events", [])):
        e = _take(raw_event, f"events[{i}]", {"at", "code"})
        events.append(Event(_time(e, "at", 0.0, f"events[{i}]"), _int(e, "code", 1, 0, 255, f"events[{i}]")))
    if not top.get("events"):
        base = float(default_profile_start)
        events = [
            Event(base + 3600, 1),
            Event(base + 5400, 2),
            Event(base + 86400 + 60, 1),
            Event(base + 86400 + 3000, 2),
        ]
    if len({e.at_s for e in events}) != len(events):
        raise ConfigError("events: each time once")
    control = _take(top.get("control", {}), "control", {"host", "port"})
    seed = top.get("challenge_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError("challenge_seed: expected an integer or null")
    request_log = top.get("request_log")
    if request_log is not None and not isinstance(request_log, str):
        raise ConfigError("request_log: expected a path")
    return PeerConfig(
        hdlc=hdlc,
        tcp=tcp,
        logical_device=_int(top, "logical_device", 1, 0, 0x3FFD, "config"),
        system_title=_hex(top, "system_title", "4D4D4D0000BC614E", 8, "config"),
        block_cipher_key=_hex(top, "block_cipher_key", GREEN_BOOK_BLOCK_CIPHER_KEY, 16, "config"),
        authentication_key=_hex(top, "authentication_key", GREEN_BOOK_AUTHENTICATION_KEY, 16, "config"),
        server_invocation_counter=_int(top, "server_invocation_counter", 1, 0, 0xFFFFFFFE, "config"),
        max_pdu_size=_int(top, "max_pdu_size", 512, 64, 0xFFFF, "config"),
        clients=clients,
        clock_start_s=start_s,
        clock_running=running,
        deviation_min=_int(clock, "deviation_min", 0, -720, 720, "clock"),
        profile_start_s=_time(profile, "start", float(default_profile_start), "profile"),
        capture_period_s=period_s,
        profile_max_entries=_int(profile, "max_entries", 4320, 1, 1_000_000, "profile"),
        events=tuple(events),
        event_log_max_entries=_int(top, "event_log_max_entries", 100, 1, 10_000, "config"),
        control_host=str(control.get("host", "127.0.0.1")),
        control_port=_int(control, "port", 0, 0, 65535, "control"),
        request_log=request_log,
        challenge_seed=seed,
        silent=bool(top.get("silent", False)),
    )


def load(path: Path) -> PeerConfig:
    """Read and validate ``path``."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse(raw)
