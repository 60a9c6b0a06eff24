"""Device-manager push (WM-E ``dm.*``): a periodic status document to the device manager server.

When ``dm.push_enable=1`` with ``dm.server`` and ``dm.port`` set, dcud connects to ``dm.server:dm.port``
at start and then every ``dm.push_interval`` seconds, sends one status document and closes.

Framing
    One TCP connection per push (TLS when ``dm.tls_enable=1``). The document is one JSON object, UTF-8,
    on a single line terminated by ``\\n`` (JSON Lines); dcud then closes its side (TLS close_notify
    first). Nothing is expected back; a server may close at any time after the newline. The document::

        {"type": "dcud.dm.status", "version": 1, "device_id": ..., "ts": RFC 3339 UTC, "seq": n,
         "status": <the <p>/status document>,
         "lines": {name: <p>/line/<name>/state}, "meters": {name: <p>/meter/<name>/state},
         "drives": {name: ...}, "push": {target: <p>/push/<target>}}

    ``seq`` counts pushes since dcud started (1, 2, ...).
TLS and certificate banks
    The banks are those of :mod:`dcud.service.tls_banks` (shared with the transparent ports and the EI
    client): bank ``n`` (1..255) is the PEM file ``state_dir/certbank/<n>.pem``. ``dm.cert`` selects the
    bank with our client certificate and key (0: no client certificate), ``dm.ca_cert`` the bank with the
    trusted CA certificates and, for CRL checks, the CRL (0: the system's trust store). ``dm.use_crl=1``
    checks the server's certificate against that CRL. ``dm.verify``: 0 = no verification; 1 = optional:
    verified when possible, and when verification fails the push goes on unverified (reported as
    ``"verified": false`` in ``push/dm`` and logged once); 2 = mandatory: chain and host name must verify,
    and nothing is sent to a server that does not: the handshake fails before the document is written,
    and with ``dm.tls_enable=0`` (nothing to verify) no connection is made at all (``push/dm`` says why).
Failures
    A failed push is logged once per change of error and shown in ``push/dm``; the next push is at the
    next interval (the document is a snapshot: nothing is queued, and the outbox is not involved).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dcud.runtime.bus import EventBus
from dcud.runtime.link import STOPPED, ErrorLog, until_stopped
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.timefmt import rfc3339
from dcud.service.tls_banks import TlsBankError, client_context, load_bank
from dcud.transport.tcp import open_stream

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

__all__ = ["DmPushConfig", "DmPushService", "dm_document", "dm_tls_context"]

_CONNECT_TIMEOUT_S: Final = 10.0
VERIFY_NONE: Final = 0
VERIFY_OPTIONAL: Final = 1
VERIFY_MANDATORY: Final = 2


@dataclass(frozen=True)
class DmPushConfig:
    """The device-manager push service's slice of the configuration."""

    server: str
    port: int
    interval_s: float
    device_id: str
    state_dir: Path
    tls: bool = False
    cert_bank: int = 0
    ca_bank: int = 0
    verify: int = VERIFY_NONE
    use_crl: bool = False
    timeout_s: float = _CONNECT_TIMEOUT_S

    @property
    def refusal(self) -> str | None:
        """Why no push may be made at all (mandatory verification of a server that cannot be verified)."""
        if self.verify == VERIFY_MANDATORY and not self.tls:
            return (
                "not pushed: dm.verify=2 (mandatory) needs dm.tls_enable=1; "
                "a plain connection cannot verify the device manager"
            )
        return None

    @classmethod
    def from_config(cls, config: LoadedConfig) -> DmPushConfig | None:
        """The slice, or None unless ``dm.push_enable`` with a server and a port."""
        params = config.params
        server = params.get_opt_str("dm.server")
        port = params.get_int("dm.port")
        if not params.get_bool("dm.push_enable") or not server or port == 0:
            return None
        return cls(
            server=server,
            port=port,
            interval_s=params.get_float("dm.push_interval"),
            device_id=config.device_id,
            state_dir=config.state_dir,
            tls=params.get_bool("dm.tls_enable"),
            cert_bank=params.get_int("dm.cert"),
            ca_bank=params.get_int("dm.ca_cert"),
            verify=params.get_int("dm.verify"),
            use_crl=params.get_bool("dm.use_crl"),
        )


def dm_tls_context(cfg: DmPushConfig, verify: bool) -> ssl.SSLContext:
    """Client TLS context from the certificate banks; ``verify=False`` accepts any server certificate."""
    cert = load_bank(cfg.state_dir, cfg.cert_bank) if cfg.cert_bank else None
    if not verify:
        return client_context(cert_bank=cert, verify="none")
    ca = load_bank(cfg.state_dir, cfg.ca_bank) if cfg.ca_bank else None
    return client_context(ca_bank=ca, cert_bank=cert, verify="mandatory", use_crl=cfg.use_crl, system_ca=True)


def dm_document(
    device_id: str, seq: int, status: Mapping[str, Any], states: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The status document (module doc) from the ``<p>/status`` content and the bus's states."""
    groups: dict[str, dict[str, Any]] = {"lines": {}, "meters": {}, "drives": {}, "push": {}}
    where = {"line": "lines", "meter": "meters", "drive": "drives", "push": "push"}
    for subtopic, state in states.items():
        kind, _, name = subtopic.partition("/")
        if kind in where and name and "/" not in name:
            groups[where[kind]][name] = dict(state)
    return {
        "type": "dcud.dm.status",
        "version": 1,
        "device_id": device_id,
        "ts": rfc3339(time.time()),
        "seq": seq,
        "status": dict(status),
        **groups,
    }


class DmPushService:
    """Supervised service ``dm``: the periodic status push (module doc)."""

    name = "dm"

    def __init__(
        self,
        config: DmPushConfig,
        bus: EventBus,
        status: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.config = config
        self._bus = bus
        self._status = status
        self.seq = 0
        self.pushes = 0
        self.failures = 0
        self.verified: bool | None = None
        self.last_success: str | None = None
        self.last_error: dict[str, Any] | None = None
        self._error_log: ErrorLog | None = None

    @property
    def target(self) -> str:
        """``host:port`` (IPv6 in brackets)."""
        host = f"[{self.config.server}]" if ":" in self.config.server else self.config.server
        return f"{host}:{self.config.port}"

    def _publish(self) -> None:
        self._bus.set_state(
            "push/dm",
            {
                "target": self.target,
                "tls": self.config.tls,
                "verified": self.verified,
                "interval_s": self.config.interval_s,
                "pushes": self.pushes,
                "failures": self.failures,
                "last_success": self.last_success,
                "last_error": self.last_error,
            },
        )

    async def run(self, ctx: ServiceContext) -> None:
        """Push now, then every interval, until stopped."""
        ctx.set_ready()
        self._publish()
        while not ctx.stopping.is_set():
            # A push may wait for its whole timeout on a silent server; a stop does not wait for it.
            if await until_stopped(ctx.stopping, self.push_once(ctx), name="push") is STOPPED:
                return
            if await ctx.sleep(self.config.interval_s):
                return

    async def push_once(self, ctx: ServiceContext) -> bool:
        """One push; True on success. Errors are recorded, never raised."""
        self.seq += 1
        refusal = self.config.refusal
        if refusal is not None:
            self._failed(ctx, refusal)
            return False
        document = dm_document(self.config.device_id, self.seq, self._status(), self._bus.states)
        line = json.dumps(document, separators=(",", ":"), default=str).encode() + b"\n"
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await self._send(ctx, line)
        except (OSError, TimeoutError, ValueError, TlsBankError) as exc:
            self._failed(ctx, str(exc) or type(exc).__name__)
            return False
        self.pushes += 1
        self.last_success = _utc_now()
        if self.last_error is not None:
            ctx.log.info("device manager push recovered", target=self.target)
        self._errors(ctx).forget()
        self.last_error = None
        self._publish()
        return True

    def _errors(self, ctx: ServiceContext) -> ErrorLog:
        if self._error_log is None:
            self._error_log = ErrorLog(ctx.log, "device manager push failed", target=self.target)
        return self._error_log

    def _failed(self, ctx: ServiceContext, message: str) -> None:
        """Count and show a failed push; log it once per change of message."""
        self.failures += 1
        self._errors(ctx).report(message)
        self.last_error = {"ts": _utc_now(), "message": message}
        self._publish()

    async def _send(self, ctx: ServiceContext, line: bytes) -> None:
        cfg = self.config
        context: ssl.SSLContext | None = None
        if cfg.tls:
            context = dm_tls_context(cfg, verify=cfg.verify != VERIFY_NONE)
        try:
            reader, writer = await open_stream(
                cfg.server, cfg.port, timeout_s=cfg.timeout_s, ssl_context=context
            )
        except ssl.SSLCertVerificationError as exc:
            if cfg.verify != VERIFY_OPTIONAL:
                raise
            if self.verified is not False:
                ctx.log.warning("device manager certificate not verified; pushing anyway", error=str(exc))
            self.verified = False
            context = dm_tls_context(cfg, verify=False)
            reader, writer = await open_stream(
                cfg.server, cfg.port, timeout_s=cfg.timeout_s, ssl_context=context
            )
        else:
            if cfg.tls:
                self.verified = cfg.verify != VERIFY_NONE
        try:
            writer.write(line)
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        del reader


def _utc_now() -> str:
    return rfc3339(time.time())
