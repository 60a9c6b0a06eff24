"""EI client: dcud dials out to the head-end and bridges that connection to the primary meter line.

WM-E parameters: ``ei_client_addr``/``ei_client_port`` (off while either is unset/0),
``ei_client_top_keepalive`` (TCP keepalive idle time; 0 = no keepalive), ``ei_client_auth_mode``
(``N`` none, ``E`` username/password) with ``ei_client_type`` (the username, despite its name) and
``ei_client_pass``. ``[transparent]`` adds ``ei_login_timeout_s``, ``ei_reconnect_max_s``, ``ei_tls`` and
``ei_tls_verify``.

The connection is kept open: when it drops (server closed it, keepalive or TCP_USER_TIMEOUT found the
peer dead, login refused) dcud reconnects with exponential backoff and jitter, from 1 s up to
``ei_reconnect_max_s``; the backoff restarts after a connection that lasted at least a minute.

Login exchange (``ei_client_auth_mode=E``), line-based ASCII, right after the TCP (or TLS) connect::

    dcud -> HES   USER <ei_client_type> CR LF
    dcud -> HES   PASS <ei_client_pass> CR LF
    HES  -> dcud  OK [text] CR LF            login accepted; every later byte is meter traffic
    HES  -> dcud  anything else, or nothing within ei_login_timeout_s: refused; dcud closes and backs off

The value runs to the end of its line (it may hold spaces, never CR or LF); the reply line may end with
LF alone. Bytes the HES sends after the ``OK`` line in the same segment are already meter traffic.
With ``N`` there is no exchange: bridging starts at connect. The password goes over the wire as it is:
use ``ei_tls = true`` (or a VPN/private APN) when the path is not trusted.

TLS (``ei_tls = true``) verifies the server by default (``ei_tls_verify = "mandatory"``): its chain
against the CA bank ``tm.ca_cert`` (0: the system trust store) and its host name or IP address against
``ei_client_addr``; a server that fails is dropped in the handshake, before a byte of the login is
written. The password is never sent to an unverified server: with ``ei_tls_verify = "none"`` (encryption
only, an installer's choice in dcud.toml) only ``ei_client_auth_mode=N`` connects, and ``E`` keeps the
client off (state ``refused``, logged once) instead of sending the password to whoever answers.

The bridged session is the transparent port's (:class:`~dcud.service.bridge_session.BridgeSession`): IEC
62056-21 aware, traced, audited (``bridge_session`` with ``port = "ei"``). Because the connection is
permanent, it takes the line's lease only while the head-end talks and hands it back after
``lease_idle_s`` of silence, so scheduled readouts run between the head-end's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from dcud.config.model import LineConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.link import Link, LinkDown, LinkPolicy, run_link, until_stopped
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.bridge_config import SessionPolicy, TlsSettings, tls_settings, trace_path
from dcud.service.bridge_config import param as _param
from dcud.service.bridge_session import BridgeSession
from dcud.service.bridge_trace import HexTrace, audit
from dcud.service.line import LineRegistry
from dcud.service.tls_banks import TlsBankError, Verify, client_context, load_bank
from dcud.transport.tcp import open_connection

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

log = structlog.get_logger("dcud.ei_client")

MAX_LOGIN_LINE_BYTES = 512
CONNECT_TIMEOUT_S = 15.0
STABLE_CONNECTION_S = 60.0
"""A connection that lasted this long resets the reconnect backoff."""


class LoginRefused(Exception):
    """The head-end did not answer ``OK`` to the login."""


UNVERIFIED_PASSWORD = (
    'EI password not sent to an unverified server: ei_tls_verify = "none" with ei_client_auth_mode=E '
    '(set ei_tls_verify = "mandatory" with the server\'s CA in bank tm.ca_cert, or use auth mode N)'
)


@dataclass(frozen=True)
class EiClientConfig:
    """The EI client's slice of the configuration."""

    host: str
    port: int
    line: LineConfig
    baud: int
    keepalive_s: int = 600
    auth_mode: str = "N"
    username: str = ""
    password: str = field(default="", repr=False)
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    login_timeout_s: float = 10.0
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 300.0
    tls_enabled: bool = False
    tls: TlsSettings = field(default_factory=TlsSettings)
    """Certificate banks (``tm.cert``, ``tm.ca_cert``, ``tm.use_crl``); ``tm.verify`` is the ports' own."""
    tls_verify: Verify = "mandatory"
    """Whether the server's certificate is verified (``[transparent] ei_tls_verify``)."""
    trace_file: str = ""
    trace_max_bytes: int = 16 * 1024 * 1024
    state_dir: str = ""

    @property
    def password_blocked(self) -> bool:
        """True when a login would send the password to a server whose certificate is not verified."""
        return self.auth_mode == "E" and self.tls_enabled and self.tls_verify == "none"

    def login_lines(self) -> bytes:
        """What dcud sends to log in (empty for ``N``)."""
        if self.auth_mode != "E":
            return b""
        return f"USER {self.username}\r\nPASS {self.password}\r\n".encode("utf-8", "replace")


class _Login(asyncio.Protocol):
    """First protocol of the connection: collects the login answer (and anything before the handover)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answer.done():
            return
        eol = self.buffer.find(b"\n")
        if eol >= 0:
            line = bytes(self.buffer[: eol + 1])
            del self.buffer[: eol + 1]
            self.answer.set_result(line)
        elif len(self.buffer) > MAX_LOGIN_LINE_BYTES:
            self.answer.set_exception(LoginRefused("login answer too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("closed during login"))
        if not self.lost.done():
            self.lost.set_result(exc)


class EiClientService:
    """Supervised service ``ei-client`` (see the module docstring)."""

    name = "ei-client"

    def __init__(
        self,
        config: EiClientConfig,
        lines: LineRegistry,
        bus: EventBus | None = None,
        event: EventSink | None = None,
    ) -> None:
        self.config = config
        self._lines = lines
        self._bus = bus
        self._event = event
        self.state = "starting"
        self.since_s = time.time()
        self.connects = 0
        self.failures = 0
        self.last_error = ""
        self.session: BridgeSession | None = None
        self._seq = 0
        self.trace: HexTrace | None = None
        if config.trace_file:
            self.trace = HexTrace(Path(config.trace_file), config.trace_max_bytes)

    def state_document(self) -> dict[str, Any]:
        """The retained ``<p>/bridge/ei/state`` document (no credentials)."""
        cfg = self.config
        return {
            "port": "ei",
            "server": f"{cfg.host}:{cfg.port}",
            "line": cfg.line.name,
            "state": self.state,
            "since": rfc3339_ms(self.since_s),
            "auth_mode": cfg.auth_mode,
            "tls": cfg.tls_enabled,
            "tls_verify": cfg.tls_verify if cfg.tls_enabled else None,
            "connects": self.connects,
            "failures": self.failures,
            "last_error": self.last_error or None,
        }

    def _set_state(self, state: str, error: str = "") -> None:
        if state != self.state:
            self.since_s = time.time()
        self.state = state
        if error:
            self.last_error = error
        if self._bus is not None:
            self._bus.set_state("bridge/ei", self.state_document())

    def _ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.tls_enabled:
            return None
        state_dir = Path(cfg.state_dir)
        cert = load_bank(state_dir, cfg.tls.cert_bank) if cfg.tls.cert_bank else None
        if cfg.tls_verify == "none":
            return client_context(cert_bank=cert, verify="none")
        ca = load_bank(state_dir, cfg.tls.ca_bank) if cfg.tls.ca_bank else None
        return client_context(
            ca_bank=ca, cert_bank=cert, verify="mandatory", use_crl=cfg.tls.use_crl, system_ca=True
        )

    async def run(self, ctx: ServiceContext) -> None:
        """Keep a bridged connection to the head-end until stopped (the link kernel reconnects)."""
        cfg = self.config
        ctx.set_ready()  # an unreachable head-end is a degraded uplink, not a failed daemon
        if cfg.password_blocked:
            # Fixed by the configuration: no retry can change it, so no connection is ever made.
            ctx.log.error("EI client off", server=f"{cfg.host}:{cfg.port}", error=UNVERIFIED_PASSWORD)
            self._set_state("refused", UNVERIFIED_PASSWORD)
            await ctx.stopping.wait()
            return
        while (line := self._lines.get(cfg.line.name)) is None:
            if await ctx.sleep(0.2):
                return
        policy = LinkPolicy(
            initial_s=cfg.reconnect_initial_s,
            max_s=cfg.reconnect_max_s,
            stable_s=STABLE_CONNECTION_S,
            retry_on=RETRY_ERRORS,
        )
        await run_link(ctx, _HeadEndLink(self, ctx, line), policy)

    async def _dial(self) -> tuple[asyncio.Transport, _Login, ssl.SSLContext | None]:
        """TCP (or TLS) to the head-end, tuned, logged in; the connection is aborted on any failure."""
        cfg = self.config
        context = self._ssl_context()
        login = _Login()
        tuning = cfg.policy.tuning()
        transport, _ = await open_connection(
            cfg.host,
            cfg.port,
            lambda: login,
            timeout_s=CONNECT_TIMEOUT_S,
            tuning=tuning if cfg.keepalive_s else tuning.without_keepalive(),
            ssl_context=context,
        )
        try:
            greeting = cfg.login_lines()
            if greeting and context is not None and cfg.tls_verify != "mandatory":
                raise LoginRefused(UNVERIFIED_PASSWORD)  # a guard: run() never gets here so
            if greeting:
                transport.write(greeting)
                async with asyncio.timeout(cfg.login_timeout_s):
                    answer = await login.answer
                if not answer.rstrip(b"\r\n").split(b" ", 1)[0] == b"OK":
                    raise LoginRefused(f"login refused: {answer[:60].decode('ascii', 'replace').strip()!r}")
        except BaseException:
            transport.abort()
            raise
        return transport, login, context

    def _bridge(
        self, ctx: ServiceContext, line: Any, dialled: tuple[asyncio.Transport, _Login, Any]
    ) -> BridgeSession:
        """Hand the logged-in connection to a bridge session (with what arrived after the ``OK``)."""
        cfg = self.config
        transport, login, context = dialled
        self.connects += 1
        self._seq += 1
        peer = f"{cfg.host}:{cfg.port}"
        session = BridgeSession(
            sid=f"ei#{self._seq}",
            port_name="ei",
            peer=peer,
            line=line,
            baud=cfg.baud,
            framing=cfg.line.effective_framing,
            policy=cfg.policy,
            trace=self.trace,
            lazy_lease=True,
            release_when_idle=True,
            tls=context is not None,
        )
        self.session = session
        transport.set_protocol(session)
        session.attach(transport)
        if login.lost.done():
            session.connection_lost(login.lost.result())
        rest = bytes(login.buffer)
        login.buffer.clear()
        if rest:
            session.data_received(rest)
        ctx.log.info("EI connection up", server=peer, auth=cfg.auth_mode, tls=context is not None)
        self._set_state("connected")
        return session


RETRY_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    ssl.SSLError,
    LoginRefused,
    TlsBankError,
)
"""What makes the EI client back off and dial again (anything else fails the service)."""


class _HeadEndLink(Link[BridgeSession]):
    """The EI connection as the link kernel drives it: dial and log in, then bridge until it ends."""

    down_message = "EI connection down; reconnecting"

    def __init__(self, service: EiClientService, ctx: ServiceContext, line: Any) -> None:
        self._service = service
        self._ctx = ctx
        self._line = line

    def log_fields(self) -> dict[str, object]:
        cfg = self._service.config
        return {"server": f"{cfg.host}:{cfg.port}"}

    def describe(self, exc: BaseException) -> str:
        return _describe(exc)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[BridgeSession]:
        self._service._set_state("connecting")
        dialled = await self._service._dial()
        yield self._service._bridge(self._ctx, self._line, dialled)

    def connect(self) -> AbstractAsyncContextManager[BridgeSession]:
        return self._connection()

    async def serve(self, session: BridgeSession) -> str:
        """Bridge until the session ends; a stop ends it gracefully ("stopping"), then the audit."""
        try:
            await until_stopped(
                self._ctx.stopping, session.run(), name="session", on_stop=lambda: session.end("stopping")
            )
        finally:
            await audit(session, self._service._event)
        return session.reason or "closed"

    async def on_down(self, down: LinkDown) -> None:
        if down.exc is not None:
            self._service.failures += 1
        self._service._set_state("backoff", down.error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timeout"
    return str(exc) or type(exc).__name__


def build_ei_client(
    config: LoadedConfig, lines: LineRegistry, bus: EventBus, event: EventSink
) -> Sequence[Service]:
    """The EI client when ``ei_client_addr`` and ``ei_client_port`` are set and a primary line exists."""
    params = config.params
    host = _param(params, "ei_client_addr", None)
    port = int(_param(params, "ei_client_port", 0))
    if not host or not port:
        return []
    primary = [line for line in config.toml.line if line.transparent == "primary"]
    if not primary:
        log.warning('EI client configured but no line has transparent = "primary"; EI client off')
        return []
    t = config.toml.transparent
    keepalive = int(_param(params, "ei_client_top_keepalive", 600))
    base = SessionPolicy.from_toml(t)
    policy = dataclasses.replace(
        base,
        idle_timeout_s=0.0,  # the connection is kept: only the line lease idles
        keepalive_idle_s=max(1, keepalive) if keepalive else base.keepalive_idle_s,
        keepalive_interval_s=min(base.keepalive_interval_s, max(1, keepalive // 4)) if keepalive else 10,
        lease_max_s=t.lease_max_s,
    )
    slice_ = EiClientConfig(
        host=str(host),
        port=port,
        line=primary[0],
        baud=int(_param(params, "tm.baud", 9600)),
        keepalive_s=keepalive,
        auth_mode=str(_param(params, "ei_client_auth_mode", "N")),
        username=str(_param(params, "ei_client_type", "")),
        password=str(_param(params, "ei_client_pass", "")),
        policy=policy,
        login_timeout_s=t.ei_login_timeout_s,
        reconnect_max_s=t.ei_reconnect_max_s,
        tls_enabled=t.ei_tls,
        tls=tls_settings(params),
        tls_verify=t.ei_tls_verify,
        trace_file=trace_path(t.trace_file, config.state_dir, "ei"),
        trace_max_bytes=t.trace_max_bytes,
        state_dir=str(config.state_dir),
    )
    return [EiClientService(slice_, lines, bus, event)]


__all__ = ["EiClientConfig", "EiClientService", "LoginRefused", "build_ei_client"]
