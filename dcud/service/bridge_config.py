"""Configuration slices of the transparent ports and the EI client (from ``[transparent]`` and ``tm.*``).

docs/bridge.md explains every setting; :mod:`dcud.service.bridge` serves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcud.codec.bridge_session import SessionLimits
from dcud.config.model import LineConfig, TransparentConfig
from dcud.service.tls_banks import Verify, verify_from_wme
from dcud.transport.tcp import SocketTuning

__all__ = [
    "BridgeConfig",
    "SessionPolicy",
    "TlsSettings",
    "param",
    "resolve_listen",
    "tls_settings",
    "trace_path",
]


@dataclass(frozen=True)
class SessionPolicy:
    """Timing and limits of one transparent session (from ``[transparent]``)."""

    idle_timeout_s: float = 300.0
    lease_idle_s: float = 30.0
    lease_max_s: float = 900.0
    lease_wait_s: float = 120.0
    keepalive_idle_s: int = 60
    keepalive_interval_s: int = 10
    keepalive_count: int = 3
    unsent_timeout_s: float = 30.0
    iec_aware: bool = True
    iec_inactivity_s: float = 120.0

    def limits(
        self,
        *,
        rfc2217: bool = False,
        lazy_lease: bool = False,
        release_when_idle: bool = False,
        traced: bool = False,
    ) -> SessionLimits:
        """What the session machine needs of this policy (a :class:`SessionLimits`)."""
        return SessionLimits(
            idle_timeout_s=self.idle_timeout_s,
            lease_idle_s=self.lease_idle_s,
            lease_max_s=self.lease_max_s,
            iec_aware=self.iec_aware,
            iec_inactivity_s=self.iec_inactivity_s,
            rfc2217=rfc2217,
            lazy_lease=lazy_lease,
            release_when_idle=release_when_idle,
            traced=traced,
        )

    def tuning(self) -> SocketTuning:
        """The socket options of a session: NODELAY, keepalive, TCP_USER_TIMEOUT = ``unsent_timeout_s``."""
        return SocketTuning(
            keepalive_idle_s=self.keepalive_idle_s,
            keepalive_interval_s=self.keepalive_interval_s,
            keepalive_count=self.keepalive_count,
            user_timeout_s=self.unsent_timeout_s,
        )

    @classmethod
    def from_toml(cls, t: TransparentConfig) -> SessionPolicy:
        """The policy part of ``[transparent]``."""
        return cls(
            idle_timeout_s=t.idle_timeout_s,
            lease_idle_s=t.lease_idle_s,
            lease_max_s=t.lease_max_s,
            lease_wait_s=t.lease_wait_s,
            keepalive_idle_s=t.keepalive_idle_s,
            keepalive_interval_s=t.keepalive_interval_s,
            keepalive_count=t.keepalive_count,
            unsent_timeout_s=t.unsent_timeout_s,
            iec_aware=t.iec_aware,
            iec_inactivity_s=t.iec_inactivity_s,
        )


@dataclass(frozen=True)
class TlsSettings:
    """TLS of a transparent port (WM-E ``tm.tls_enable``, ``tm.cert``, ``tm.ca_cert``, ``tm.verify``...)."""

    enabled: bool = False
    cert_bank: int = 0
    """0: a self-signed device certificate (made on first use) instead of a bank."""
    ca_bank: int = 0
    verify: Verify = "none"
    use_crl: bool = False


@dataclass(frozen=True)
class BridgeConfig:
    """The slice of one transparent port service."""

    port_name: str
    """``tm`` (primary) or ``tm2`` (secondary): service name, owner strings, trace file names."""
    line: LineConfig
    port: int
    baud: int
    host: str = "127.0.0.1"
    """Listen address; empty: every interface."""
    allow: tuple[str, ...] = ()
    second_client: str = "takeover"
    busy_message: str = "BUSY transparent port in use\r\n"
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    tls: TlsSettings = field(default_factory=TlsSettings)
    rfc2217: bool = False
    trace_file: str = ""
    trace_max_bytes: int = 16 * 1024 * 1024
    max_pending: int = 8
    max_pending_per_source: int = 2
    handshake_timeout_s: float = 10.0
    state_dir: str = ""
    device_id: str = "dcud"


def param(params: Any, name: str, default: Any) -> Any:
    """A WM-E parameter's value, ``default`` when it is not set (or there are no parameters)."""
    try:
        value = params.get(name)
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def resolve_listen(listen: str, tls: TlsSettings, allow: Sequence[str] = ()) -> str:
    """The bind address for ``[transparent] listen`` (empty string: every interface).

    ``auto`` is default-deny: a transparent port gives full access to the meters on its line, so it
    listens beyond loopback only when the peer is authenticated or restricted: TLS with mandatory
    client certificates (``tm.verify=2``), or TLS plus a source allow-list. TLS alone with the WM-E
    default ``tm.verify=0`` encrypts but lets anyone in, so it stays on 127.0.0.1 until the installer
    says ``listen = "any"`` (or an address) on purpose.
    """
    if listen == "auto":
        guarded = tls.enabled and (tls.verify == "mandatory" or bool(allow))
        return "" if guarded else "127.0.0.1"
    if listen == "loopback":
        return "127.0.0.1"
    if listen == "any":
        return ""
    return listen


def tls_settings(params: Any) -> TlsSettings:
    """TLS of the transparent ports from the WM-E ``tm.*`` parameters."""
    return TlsSettings(
        enabled=bool(param(params, "tm.tls_enable", True)),
        cert_bank=int(param(params, "tm.cert", 0)),
        ca_bank=int(param(params, "tm.ca_cert", 0)),
        verify=verify_from_wme(int(param(params, "tm.verify", 0))),
        use_crl=bool(param(params, "tm.use_crl", False)),
    )


def trace_path(template: str, state_dir: Path, port_name: str) -> str:
    """The hex trace file of ``port_name`` (empty: no trace)."""
    if not template:
        return ""
    path = Path(template.replace("{port}", port_name))
    return str(path if path.is_absolute() else state_dir / path)
