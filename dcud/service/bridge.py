"""Transparent TCP ports: a head-end's bytes to a meter line and back, untouched, under a line lease.

``tm_server_port`` (default 9000) serves the ``[[line]]`` with ``transparent = "primary"`` at ``tm.baud``,
``tm2.port`` (default 9002) the one with ``transparent = "secondary"`` at ``tm2.baud``; the EI client
(:mod:`dcud.service.ei_client`) bridges an outgoing connection the same way. docs/bridge.md is the user
guide; this docstring is the design. The bridge is four modules, one responsibility each:

- :mod:`dcud.codec.bridge_session` -- a session's decisions, sans-I/O (the UART model, the IEC
  sniffer, RFC 2217, the client queue, every deadline: idle, lease idle, ``lease_max``, IEC
  inactivity, the linger after a half-close);
- :mod:`dcud.service.bridge_session` -- a session's I/O: the client transport, the leased port, the
  lease, the reader and the pump that carry out the machine's actions;
- this module -- the listening service: admission, the second-client policy, state and audit;
- :mod:`dcud.service.bridge_config` (settings) and :mod:`dcud.service.bridge_trace` (hex trace, audit
  record, summary log lines).

Leases (design.md rule 4)
-------------------------
A session takes its line's lease (kind ``bridge``, so ``<p>/line/<name>/state`` shows it as owner and
polls waiting behind it are reported *deferred*). After ``lease_idle_s`` without a byte either way it
hands the line to whoever waits and takes it back (queueing ahead of polls) when the client sends
again; the EI client's permanent connection takes the line only while the head-end talks. A session
that held the line ``lease_max_s`` while readouts wait is ended. Bytes are never interleaved: the line
is only written under the lease, and each lease starts at the session's settings with input flushed.

Sessions
--------
Admission, all at connect time (nothing of it on the per-chunk path): the source allow-list (checked
before any TLS work), TLS (handshake bounded, at most ``max_pending`` handshakes at once and at most
``max_pending_per_source`` of them from one source, so one address cannot keep others out), then the
second-client policy. ``takeover`` ends the running session (``taken_over``) only for a client that
proves the session's identity: the same client certificate (subject and issuer) when the client sent
one, else the same source address; anyone else is refused like ``refuse`` does (``busy_message``, then
close; counted as ``refused_identity``). Sessions end on client close, ``idle_timeout_s``, dead peer
(TCP keepalive ``keepalive_idle_s``/``_interval_s``/``_count``, TCP_USER_TIMEOUT and the unread bound
``unsent_timeout_s``), takeover, ``lease_max_s``, line failure or stop.

A session that gives up its lease (it ends, or hands an idle line to waiting readouts) while the IEC
sniffer sees the meter in programming mode first writes the break ``SOH B0 ETX BCC`` at the rate in
force and drains it: the next lease holder never inherits an open password session.

Each session leaves one audit record: a ``bridge session`` log line and a ``bridge_session`` event with
peer, start, end, bytes each way and the reason. An optional hex trace file records the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from dcud.codec.bridge_session import (
    BREAK_DRAIN_S,
    EOF_LINGER_MAX_S,
    EOF_LINGER_S,
    INBOUND_HIGH_BYTES,
    INBOUND_LOW_BYTES,
    LINE_QUEUE_MIN_BYTES,
    LINE_QUEUE_S,
    MODEL_SPEEDUP_MAX,
    WAITER_POLL_S,
    bits_per_char,
)
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.bridge_config import (
    BridgeConfig,
    SessionPolicy,
    TlsSettings,
    param,
    resolve_listen,
    tls_settings,
    trace_path,
)
from dcud.service.bridge_session import READ_CHUNK_BYTES, SOCKET_WRITE_HIGH_BYTES, BridgeSession
from dcud.service.bridge_trace import HexTrace, SummaryLog, audit
from dcud.service.line import Line, LineRegistry
from dcud.service.tls_banks import (
    TlsBankError,
    fingerprint_sha256,
    load_bank,
    self_signed_bank,
    server_context,
)
from dcud.transport.tcp import (
    Admission,
    AllowList,
    SourceLimits,
    accept_connection,
    accept_forever,
    describe_tls_failure,
    listen_socket,
    peer_address,
    peer_certificate,
    reset_close,
    source_address,
    source_key,
)

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig

log = structlog.get_logger("dcud.bridge")

STATE_PUBLISH_MIN_S = 1.0
_param = param  # the EI client's and older callers' name


# -- the listening service -------------------------------------------------------------------------


class BridgeService:
    """Supervised service ``bridge.<port_name>``: one transparent port (see the module docstring)."""

    def __init__(
        self,
        config: BridgeConfig,
        lines: LineRegistry,
        bus: EventBus | None = None,
        event: EventSink | None = None,
    ) -> None:
        self.config = config
        self.name = f"bridge.{config.port_name}"
        self._lines = lines
        self._bus = bus
        self._event = event
        self._allow = AllowList(config.allow)
        self._ssl: ssl.SSLContext | None = None
        self._line: Line | None = None
        self._ctx: ServiceContext | None = None
        self._active: BridgeSession | None = None
        self._sessions: set[BridgeSession] = set()
        self._admission = SourceLimits(config.max_pending, config.max_pending_per_source)
        """Connections in admission (TLS handshakes), in total and per source."""
        self._tuning = config.policy.tuning()
        self._seq = 0
        self.state = "starting"
        self.tls_error = ""
        self.counters: dict[str, int] = {
            "sessions": 0,
            "refused_busy": 0,
            "refused_identity": 0,
            "refused_address": 0,
            "dropped_pending": 0,
            "dropped_pending_source": 0,
            "tls_failures": 0,
            "taken_over": 0,
        }
        self._refused_address_log = SummaryLog("connection from a source outside the allow-list dropped")
        self._tls_log = SummaryLog("TLS handshake failed")
        self._busy_log = SummaryLog("second client refused: port busy")
        self._identity_log = SummaryLog("second client refused: not the identity of the running session")
        self._pending_log = SummaryLog("too many connections in admission; dropped")
        self._source_pending_log = SummaryLog("too many connections in admission from one source; dropped")
        self._publish_handle: asyncio.TimerHandle | None = None
        self._last_publish = 0.0
        self.trace: HexTrace | None = None
        if config.trace_file:
            self.trace = HexTrace(Path(config.trace_file), config.trace_max_bytes)
        self.bound_port: int | None = None
        """The port actually bound (differs from ``config.port`` only when that is 0, in tests)."""

    @property
    def _pending(self) -> int:
        """Connections in admission now (tests read it)."""
        return self._admission.in_use

    @property
    def _pending_by_source(self) -> dict[str, int]:
        """Connections in admission per source (tests read it)."""
        return self._admission.by_source

    # -- state ----------------------------------------------------------------------------------

    def state_document(self) -> dict[str, Any]:
        """The retained ``<p>/bridge/<port_name>`` document."""
        active = self._active if self._active is not None and not self._active.done else None
        cfg = self.config
        return {
            "port": cfg.port_name,
            "tcp_port": self.bound_port or cfg.port,
            "line": cfg.line.name,
            "state": self.state,
            "tls": cfg.tls.enabled,
            "tls_error": self.tls_error or None,
            "rfc2217": cfg.rfc2217,
            "session": None
            if active is None
            else {
                "peer": active.peer,
                "since": rfc3339_ms(active.started_s),
                "bytes_to_meter": active.bytes_c2m,
                "bytes_to_client": active.bytes_m2c,
            },
            **self.counters,
        }

    def _publish(self, *, now: bool = False) -> None:
        if self._bus is None:
            return
        loop = asyncio.get_running_loop()
        if now or loop.time() - self._last_publish >= STATE_PUBLISH_MIN_S:
            if self._publish_handle is not None:
                self._publish_handle.cancel()
                self._publish_handle = None
            self._last_publish = loop.time()
            self._bus.set_state(f"bridge/{self.config.port_name}", self.state_document())
        elif self._publish_handle is None:
            self._publish_handle = loop.call_at(
                self._last_publish + STATE_PUBLISH_MIN_S, self._delayed_publish
            )

    def _delayed_publish(self) -> None:
        self._publish_handle = None
        self._publish(now=True)

    # -- run ------------------------------------------------------------------------------------

    async def _tls_context(self, ctx: ServiceContext) -> ssl.SSLContext | None:
        """The server context, retried every 30 s while a bank is missing (the port stays closed)."""
        tls = self.config.tls
        if not tls.enabled:
            return None
        reported = ""
        while True:
            try:
                state_dir = Path(self.config.state_dir)
                if tls.cert_bank:
                    cert = load_bank(state_dir, tls.cert_bank)
                else:
                    cert = await asyncio.to_thread(self_signed_bank, state_dir, self.config.device_id)
                ca = load_bank(state_dir, tls.ca_bank) if tls.ca_bank else None
                context = server_context(cert, ca_bank=ca, verify=tls.verify, use_crl=tls.use_crl)
                ctx.log.info(
                    "TLS ready",
                    port=self.config.port_name,
                    cert=str(cert),
                    sha256=fingerprint_sha256(cert),
                    verify=tls.verify,
                    crl=tls.use_crl,
                )
                self.tls_error = ""
                return context
            except (TlsBankError, OSError) as exc:
                message = str(exc)
                self.tls_error = message
                self.state = "tls_error"
                self._publish(now=True)
                if message != reported:
                    reported = message
                    ctx.log.error(
                        "TLS not available; port stays closed", port=self.config.port_name, error=message
                    )
                    if self._event is not None:
                        await self._event(
                            "bridge_tls_error",
                            f"transparent port {self.config.port_name} closed: {message}",
                            port=self.config.port_name,
                        )
                if await ctx.sleep(30.0):
                    return None

    async def run(self, ctx: ServiceContext) -> None:
        """Listen until stopped."""
        self._ctx = ctx
        cfg = self.config
        ctx.set_ready()  # a missing line or certificate is a degraded port, not a failed daemon
        self._ssl = await self._tls_context(ctx)
        if cfg.tls.enabled and self._ssl is None:
            return
        while (line := self._lines.get(cfg.line.name)) is None:
            if await ctx.sleep(0.1):
                return
        self._line = line
        listener = listen_socket(cfg.host, cfg.port)
        self.bound_port = listener.getsockname()[1]
        self.state = "listening"
        ctx.log.info(
            "transparent port listening",
            port=cfg.port_name,
            address=cfg.host or "*",
            tcp_port=self.bound_port,
            line=cfg.line.name,
            baud=cfg.baud,
            tls=cfg.tls.enabled,
            rfc2217=cfg.rfc2217,
            second_client=cfg.second_client,
        )
        self._publish(now=True)
        accepting = ctx.spawn("accept", accept_forever(listener, self._accepted, self._accept_failed))
        try:
            await ctx.heartbeat_forever()
        finally:
            accepting.cancel()
            listener.close()
            for session in list(self._sessions):
                session.end("stopping")
            self.state = "stopped"
            self._publish(now=True)
            if self.trace is not None:
                self.trace.close()

    # -- admission ------------------------------------------------------------------------------

    def _accept_failed(self, exc: OSError) -> None:
        """EMFILE, ENFILE, ENOBUFS...: counted in the summary log; the listener rests and goes on."""
        self._pending_log.hit(port=self.config.port_name, error=exc.strerror or str(exc))

    def _drop(self, sock: socket.socket) -> None:
        reset_close(sock)
        self._publish()

    def _accepted(self, sock: socket.socket, address: Any) -> None:
        """Decide about a new connection at once, before asyncio (or TLS) ever reads from it."""
        host, shown = peer_address(address)
        if not self._allow.allows(host):
            self.counters["refused_address"] += 1
            self._refused_address_log.hit(port=self.config.port_name, peer=shown)
            self._drop(sock)
            return
        ready = self._ctx is not None and self._line is not None
        verdict = self._admission.admit(host) if ready else Admission.TOTAL_FULL
        if verdict is Admission.TOTAL_FULL:
            self.counters["dropped_pending"] += 1
            self._pending_log.hit(port=self.config.port_name, peer=shown, pending=self._admission.in_use)
            self._drop(sock)
            return
        if verdict is Admission.SOURCE_FULL:
            self.counters["dropped_pending_source"] += 1
            self._source_pending_log.hit(port=self.config.port_name, peer=shown, source=source_key(host))
            self._drop(sock)
            return
        assert self._ctx is not None and self._line is not None
        sock.setblocking(False)
        self._tuning.apply(sock)
        self._seq += 1
        session = BridgeSession(
            sid=f"{self.config.port_name}#{self._seq}",
            port_name=self.config.port_name,
            peer=shown,
            line=self._line,
            baud=self.config.baud,
            framing=self.config.line.effective_framing,
            policy=self.config.policy,
            rfc2217=self.config.rfc2217,
            trace=self.trace,
            tls=self._ssl is not None,
            source=host,
        )
        try:
            self._ctx.spawn(f"session-{self._seq}", self._admit(session, sock, host))
        except RuntimeError:
            self._admission.release(host)
            sock.close()

    async def _admit(self, session: BridgeSession, sock: socket.socket, host: str) -> None:
        """TLS, the second-client policy, then the session; never raises (a helper failure fails the port)."""
        try:
            try:
                transport = await accept_connection(
                    sock,
                    lambda: session,
                    ssl_context=self._ssl,
                    handshake_timeout_s=self.config.handshake_timeout_s,
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                self.counters["tls_failures" if self._ssl is not None else "dropped_pending"] += 1
                self._tls_log.hit(
                    port=self.config.port_name, peer=session.peer, error=describe_tls_failure(exc)
                )
                with contextlib.suppress(OSError):
                    sock.close()
                self._publish()
                return
            finally:
                self._admission.release(host)  # out of admission (handshake done or failed)
            if self._ssl is not None:
                cert = peer_certificate(transport)
                if cert is not None:
                    # Only a verified certificate is ever returned here (CERT_OPTIONAL/REQUIRED).
                    session.client_cert = cert.subject
                    session.identity = ("certificate", f"{cert.subject}; issuer {cert.issuer}")
            session.attach(transport)
            active = self._active
            if active is not None and not active.done:
                if self.config.second_client == "takeover" and session.identity == active.identity:
                    self.counters["taken_over"] += 1
                    active.end("taken_over", f"by {session.peer}")
                else:
                    if self.config.second_client == "refuse":
                        self.counters["refused_busy"] += 1
                        self._busy_log.hit(port=self.config.port_name, peer=session.peer, active=active.peer)
                    else:
                        self.counters["refused_identity"] += 1
                        self._identity_log.hit(
                            port=self.config.port_name, peer=session.peer, active=active.peer
                        )
                    session._send_raw(self.config.busy_message.encode("utf-8", "replace"))
                    transport.close()
                    self._publish()
                    return
            await self._serve(session)
        except Exception as exc:  # a session's failure must never take the port down
            log.error("transparent session failed", port=self.config.port_name, error=repr(exc))
            with contextlib.suppress(OSError):
                sock.close()

    async def _serve(self, session: BridgeSession) -> None:
        cfg = self.config
        self._active = session
        self._sessions.add(session)
        self.counters["sessions"] += 1
        log.info("bridge session started", port=cfg.port_name, session=session.sid, peer=session.peer)
        self._publish(now=True)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            if self._active is session:
                self._active = None
            self._publish(now=True)
            await self._audit(session)

    async def _audit(self, session: BridgeSession) -> None:
        await audit(session, self._event)


# -- building from the configuration -------------------------------------------------------------


def build_bridge_services(
    config: LoadedConfig, lines: LineRegistry, bus: EventBus, event: EventSink
) -> Sequence[Service]:
    """The transparent ports and the EI client (``SERVICE_BUILDERS`` entry)."""
    from dcud.service.ei_client import build_ei_client

    toml = config.toml
    params = config.params
    t = toml.transparent
    tls = tls_settings(params)
    allow = tuple(t.allow)
    services: list[Service] = []
    roles = {"primary": ("tm", "tm_server_port", 9000, "tm.baud", 9600)}
    roles["secondary"] = ("tm2", "tm2.port", 9002, "tm2.baud", 2400)
    for line in toml.line:
        if line.transparent is None:
            continue
        port_name, port_param, port_default, baud_param, baud_default = roles[line.transparent]
        port = int(_param(params, port_param, port_default))
        if not port:
            continue
        services.append(
            BridgeService(
                BridgeConfig(
                    port_name=port_name,
                    line=line,
                    port=port,
                    baud=int(_param(params, baud_param, baud_default)),
                    host=resolve_listen(t.listen, tls, allow),
                    allow=allow,
                    second_client=t.second_client,
                    busy_message=t.busy_message,
                    policy=SessionPolicy.from_toml(t),
                    tls=tls,
                    rfc2217=t.rfc2217,
                    trace_file=trace_path(t.trace_file, config.state_dir, port_name),
                    trace_max_bytes=t.trace_max_bytes,
                    max_pending=t.max_pending,
                    max_pending_per_source=t.max_pending_per_source,
                    handshake_timeout_s=t.handshake_timeout_s,
                    state_dir=str(config.state_dir),
                    device_id=config.device_id,
                ),
                lines,
                bus,
                event,
            )
        )
    services.extend(build_ei_client(config, lines, bus, event))
    return services


__all__ = [
    "BREAK_DRAIN_S",
    "EOF_LINGER_MAX_S",
    "EOF_LINGER_S",
    "INBOUND_HIGH_BYTES",
    "INBOUND_LOW_BYTES",
    "LINE_QUEUE_MIN_BYTES",
    "LINE_QUEUE_S",
    "MODEL_SPEEDUP_MAX",
    "READ_CHUNK_BYTES",
    "SOCKET_WRITE_HIGH_BYTES",
    "WAITER_POLL_S",
    "AllowList",
    "BridgeConfig",
    "BridgeService",
    "BridgeSession",
    "HexTrace",
    "SessionPolicy",
    "TlsSettings",
    "audit",
    "bits_per_char",
    "build_bridge_services",
    "resolve_listen",
    "source_address",
    "source_key",
    "tls_settings",
    "trace_path",
]
