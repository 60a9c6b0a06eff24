"""Transparent TCP ports: a head-end's bytes to a meter line and back, untouched, under a line lease.

``tm_server_port`` (default 9000) serves the ``[[line]]`` with ``transparent = "primary"`` at ``tm.baud``,
``tm2.port`` (default 9002) the one with ``transparent = "secondary"`` at ``tm2.baud``; the EI client
(:mod:`dcud.service.ei_client`) bridges an outgoing connection the same way. docs/bridge.md is the user
guide; this docstring is the design.

Data path
---------
Client bytes are written to the line from the transport's ``data_received`` callback itself (no task
switch, no copy) whenever nothing is queued; meter bytes go out from a reader task with
``transport.write``. TCP_NODELAY is on. Backpressure both ways:

- client -> line: a leaky-bucket model of the UART (``baud / bits per character``) counts what the line
  has not sent yet; past a quarter second of wire time the session drains the line (tcdrain) before it
  writes more, and stops reading the socket meanwhile, so the TCP window closes on a fast client;
- line -> client: when the socket's send buffer is full the reader stops taking bytes from the line;
  a client that reads nothing for ``unsent_timeout_s`` is dead (``peer_not_reading``).

IEC 62056-21 awareness (:class:`~dcud.codec.iec_sniffer.IecSniffer`) puts the line switches at the right
byte: the option select is written and drained, then the UART changes rate (and framing for mode E),
and goes back when the meter does. With ``rfc2217 = true`` the port speaks Telnet COM-PORT-OPTION
(:mod:`dcud.codec.rfc2217`) and a client that sets the rate itself turns the sniffer off.

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
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from dcud.codec.iec62056 import encode_break, tx_time_s
from dcud.codec.iec_sniffer import Forward, IecSniffer, SnifferState, SnifferTimings, SwitchLine
from dcud.codec.rfc2217 import (
    FLOWCONTROL_RESUME,
    FLOWCONTROL_SUSPEND,
    NOTIFY_LINESTATE,
    NOTIFY_MODEMSTATE,
    PARITY_CODES,
    PURGE_DATA,
    SET_BAUDRATE,
    SET_CONTROL,
    SET_DATASIZE,
    SET_LINESTATE_MASK,
    SET_MODEMSTATE_MASK,
    SET_PARITY,
    SET_STOPSIZE,
    SIGNATURE,
    ClientData,
    PortRequest,
    Reply,
    Rfc2217Server,
    escape,
    framing_from_settings,
)
from dcud.config.model import LineConfig, TransparentConfig
from dcud.errors import DcudError, LocalProtocolError, TransportError
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.link import child_name, until_stopped
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.line import LeasedPort, LeaseTimeout, Line, LineBusyError, LineClosedError, LineRegistry
from dcud.service.tls_banks import (
    TlsBankError,
    Verify,
    fingerprint_sha256,
    load_bank,
    self_signed_bank,
    server_context,
    verify_from_wme,
)
from dcud.transport.tcp import (
    Admission,
    AllowList,
    SocketTuning,
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

INBOUND_HIGH_BYTES = 64 * 1024
"""Client bytes queued while the line is not ours (or is switching) before the socket stops being read."""
INBOUND_LOW_BYTES = 16 * 1024
LINE_QUEUE_S = 0.25
"""Wire time the session lets the UART hold before it waits for a drain."""
LINE_QUEUE_MIN_BYTES = 64
MODEL_SPEEDUP_MAX = 1024
"""How far the line model's drain rate may rise above the nominal rate when the driver keeps reporting
an empty queue (a pty or a network serial server has no wire at the configured rate)."""
READ_CHUNK_BYTES = 64 * 1024
WAITER_POLL_S = 1.0
"""How often an idle session holding the line looks for waiting readouts."""
SOCKET_WRITE_HIGH_BYTES = 64 * 1024
_IDLE = SnifferState.IDLE
_monotonic = time.monotonic
TRACE_LINE_BYTES = 1024
LOG_SUMMARY_S = 60.0
STATE_PUBLISH_MIN_S = 1.0
EOF_LINGER_S = 1.5
"""After a client's half-close: how long the line must be quiet before the session ends (meter answer)."""
EOF_LINGER_MAX_S = 10.0
BREAK_DRAIN_S = 2.0
"""Beyond its wire time, how long the IEC break may take to leave the UART before the lease goes anyway."""


def bits_per_char(framing: str) -> int:
    """Bits one character takes on the wire: start + data + parity + stop (``"7E1"`` -> 10)."""
    return 1 + int(framing[0]) + (0 if framing[1].upper() == "N" else 1) + int(framing[2])


# -- configuration slices ------------------------------------------------------------------------


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


# -- small helpers -------------------------------------------------------------------------------


class HexTrace:
    """Troubleshooting trace: one line per chunk (``time session dir length hex``) or note.

    ``c>m`` is client to meter, ``m>c`` meter to client, ``--`` a note (lease, switch, end). The file is
    rotated to ``<file>.1`` when it reaches ``max_bytes``; a write error turns the trace off (logged once).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._file: Any = None
        self._size = 0
        self.failed = False

    def _open(self) -> Any:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="ascii", buffering=1)
            self._size = self._file.tell()
        return self._file

    def _write(self, text: str) -> None:
        if self.failed:
            return
        try:
            handle = self._open()
            if self._size + len(text) > self.max_bytes:
                handle.close()
                self._file = None
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                handle = self._open()
            handle.write(text)
            self._size += len(text)
        except OSError as exc:
            self.failed = True
            log.error("hex trace off", file=str(self.path), error=exc.strerror or str(exc))

    def data(self, sid: str, direction: str, data: bytes) -> None:
        """Record a chunk of traffic."""
        stamp = rfc3339_ms(time.time())
        for off in range(0, len(data), TRACE_LINE_BYTES):
            piece = data[off : off + TRACE_LINE_BYTES]
            self._write(f"{stamp} {sid} {direction} {len(piece)} {piece.hex()}\n")

    def note(self, sid: str, text: str) -> None:
        """Record an event of the session."""
        self._write(f"{rfc3339_ms(time.time())} {sid} -- {text}\n")

    def close(self) -> None:
        """Close the file (reopened on the next write)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class _SummaryLog:
    """Logs the first occurrence at once, then one summary with the count per ``LOG_SUMMARY_S``."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = 0
        self.unlogged = 0
        self.last_s = -LOG_SUMMARY_S

    def hit(self, **fields: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last_s >= LOG_SUMMARY_S:
            log.warning(self.message, total=self.count, since_last_log=self.unlogged + 1, **fields)
            self.last_s = now
            self.unlogged = 0
        else:
            self.unlogged += 1


# -- the session ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Raw:
    """Client bytes not yet decoded (Telnet) or sniffed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class _Switch:
    """Drain, then change the line's rate/framing."""

    baud: int
    framing: str
    reason: str


_LineOp = bytes | _Switch | PortRequest
_Queued = _Raw | _LineOp


class _Ended(Exception):
    """Internal: the session has ended; unwinds helper tasks."""


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` to its end even if this task is cancelled meanwhile; then re-raise the cancel.

    ``work`` must be bounded in time by itself (the break's drain has a deadline), so the loop ends.
    """
    task = asyncio.get_running_loop().create_task(work, name=child_name("wind-down"))
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    task.result()
    if cancelled is not None:
        raise cancelled


def _not_leased(data: bytes) -> int:
    raise LocalProtocolError("bridge session wrote to a line it does not hold")


class BridgeSession(asyncio.Protocol):
    """One client connection bridged to one line (see the module docstring)."""

    def __init__(
        self,
        *,
        sid: str,
        port_name: str,
        peer: str,
        line: Line,
        baud: int,
        framing: str,
        policy: SessionPolicy,
        rfc2217: bool = False,
        trace: HexTrace | None = None,
        lazy_lease: bool = False,
        release_when_idle: bool = False,
        tls: bool = False,
        source: str = "",
    ) -> None:
        self.sid = sid
        self.port_name = port_name
        self.peer = peer
        self.line = line
        self.baud = baud
        self.framing = framing
        self.policy = policy
        self.trace = trace
        self.tls = tls
        self.lazy_lease = lazy_lease
        self.release_when_idle = release_when_idle
        self.owner = f"bridge:{port_name}:{peer}"
        self.telnet = Rfc2217Server() if rfc2217 else None
        timings = SnifferTimings(
            programming_idle_s=policy.iec_inactivity_s, hdlc_idle_s=policy.iec_inactivity_s
        )
        self.sniffer = IecSniffer(baud, framing, timings) if policy.iec_aware else None
        self.client_cert: str | None = None
        self.identity: tuple[str, str] = ("address", source_address(source))
        """Who may take this session over: ``("certificate", subject and issuer)`` for a TLS client that
        sent a verified certificate, else ``("address", source address)``."""
        self.breaks_sent = 0
        """IEC programming sessions this session closed with a break when it gave up the line."""
        self.reason: str | None = None
        self.detail = ""
        self.started_s = time.time()
        self.ended_s: float | None = None
        self.bytes_c2m = 0
        self.bytes_m2c = 0
        self.leases = 0
        self.yields = 0
        self.lease_wait_s = 0.0
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()
        self._transport: asyncio.Transport | None = None
        self._port: LeasedPort | None = None
        self._fast = False
        self._ops: collections.deque[_Queued] = collections.deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._blocked = asyncio.Event()
        """Set while the client cannot take more (the inverse of ``_writable``)."""
        self._output_pending: Callable[[], int] | None = None
        self._write_paused = False
        self._suspended = False
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._finish: tuple[str, str, bool] | None = None
        """Set when the client sent its last byte: (reason, detail, linger for the meter's answer)."""
        self._finish_at = 0.0
        self._client_line: tuple[int, str] | None = None
        """Rate and framing an RFC 2217 client set (re-applied on every lease); None: session defaults."""
        self._lease_since = 0.0
        self._bucket = 0.0
        self._bucket_t = 0.0
        """When the line model was last aged, on ``time.monotonic``: the loop's clock moves in steps
        (uvloop's in whole milliseconds), and a model aged on it sees no drain between chunks that
        arrive within one step, fills up and sends the hot path to the driver (an ioctl) for nothing."""
        self._spilled = 0
        """Bytes the port kept in user space at the last direct write (the driver was full)."""
        self._line_write: Callable[[bytes], int | None] = _not_leased
        """The leased port's write (valid while ``_port`` is set): the hot path's one call."""
        self._cps = baud / bits_per_char(framing)
        self._cps_max = self._cps * MODEL_SPEEDUP_MAX
        self._queue_limit = LINE_QUEUE_MIN_BYTES

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the session has ended (or is ending)."""
        return self.reason is not None

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Start using ``transport`` (after TLS, if any) and greet an RFC 2217 client."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=SOCKET_WRITE_HIGH_BYTES)
        if self.telnet is not None:
            self._transport.write(self.telnet.greeting())
        if self.trace is not None:
            self.trace.note(self.sid, f"session {self.port_name} from {self.peer} line {self.line.name}")

    def end(self, reason: str, detail: str = "") -> None:
        """End the session with ``reason`` (the first reason given wins)."""
        if self.reason is None:
            self.reason = reason
            self.detail = detail
            self._ended.set()

    async def run(self) -> None:
        """Bridge until the session ends; closes the connection; the caller writes the audit record."""
        try:
            # The session's own end (client gone, idle, taken over...) is its "stopping": the body
            # is cancelled then, and waited for (it hands the line back in order).
            await until_stopped(self._ended, self._body(), name=f"{self.sid}/body")
        except asyncio.CancelledError:
            self.end("stopping")
            raise
        except Exception as exc:  # the body's bug ends this session, never the port
            log.error("bridge session failed", session=self.sid, error=repr(exc))
            self.end("error", repr(exc))
        finally:
            self.end("closed")  # a guard: every path that ends the body has set a reason already
            self._close_transport()
            self.ended_s = time.time()
            if self.trace is not None:
                self.trace.note(self.sid, f"end {self.reason} {self.detail}".rstrip())

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self.reason in ("client_closed", "idle_timeout", "stopping", "lease_max"):
            transport.close()  # what is buffered still goes out, then FIN
        else:
            transport.abort()  # dead or replaced peer: do not wait on it

    def record(self) -> dict[str, Any]:
        """The audit record of this session."""
        end = self.ended_s if self.ended_s is not None else time.time()
        doc: dict[str, Any] = {
            "session": self.sid,
            "port": self.port_name,
            "line": self.line.name,
            "peer": self.peer,
            "tls": self.tls,
            "start": rfc3339_ms(self.started_s),
            "end": rfc3339_ms(end),
            "duration_s": round(end - self.started_s, 3),
            "bytes_to_meter": self.bytes_c2m,
            "bytes_to_client": self.bytes_m2c,
            "reason": self.reason or "open",
            "leases": self.leases,
            "lease_yields": self.yields,
            "lease_wait_s": round(self.lease_wait_s, 3),
        }
        if self.detail:
            doc["detail"] = self.detail
        if self.client_cert:
            doc["client_cert"] = self.client_cert
        if self.sniffer is not None:
            stats = self.sniffer.stats
            doc["iec"] = {
                "signons": stats.signons,
                "switches": stats.switches,
                "readouts": stats.readouts,
                "bcc_errors": stats.bcc_errors,
                "breaks_sent": self.breaks_sent,
            }
        return doc

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Plain TCP: the transport is the session's (TLS sessions are attached after the handshake)."""
        if self._transport is None:
            self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Client bytes: straight to the line when possible, else queued (bounded).

        On the hot path the bytes go to the line first and the books are kept after (the meter
        starts on them while the session counts them, ages its line model and scans for an IEC
        sign-on): an idle sniffer never switches the line on client bytes, and the unaged model is
        an upper bound of the line's backlog. Anything else takes the careful path below.
        """
        sniffer = self.sniffer
        size = len(data)
        if (
            self._fast
            and self.trace is None
            and self.telnet is None
            and (sniffer is None or sniffer.state is _IDLE)
            and not self._spilled
            and self._bucket + size <= self._queue_limit
        ):
            try:
                self._spilled = self._line_write(data) or 0
            except DcudError as exc:  # the line failed under us: this session is over
                self.end("line_error", str(exc))
                return
            now = self._loop.time()
            self.last_activity = now
            self.bytes_c2m += size
            self._leak()
            self._bucket += size
            if sniffer is not None and not sniffer.client_passes(data):
                sniffer.from_client(data, now)  # from idle: forwards the chunk whole, never a switch
            return
        now = self._loop.time()
        self.last_activity = now
        self.bytes_c2m += len(data)
        if self.trace is not None:
            self.trace.data(self.sid, "c>m", data)
        port = self._port
        if port is not None and self._fast and not self._timer_due(now):
            items: list[_LineOp] | None = None
            single: bytes | None = None
            if self.telnet is not None:
                items = self._client_ops(data, now)
            elif sniffer is None or self._client_line is not None:
                single = data
            else:
                actions = sniffer.from_client(data, now)
                first = actions[0] if len(actions) == 1 else None
                if isinstance(first, Forward):
                    single = first.data
                else:
                    items = [
                        a.data if isinstance(a, Forward) else _Switch(a.baud, a.framing, a.reason)
                        for a in actions
                    ]
            if single is not None:
                # The common case, one chunk to write: no list of line operations built.
                try:
                    if self._write_now(port, single):
                        return
                except DcudError as exc:  # the line failed under us: this session is over
                    self.end("line_error", str(exc))
                    return
                self._ops.append(single)
                self._fast = False
                self._wake.set()
                return
            assert items is not None
            for index, item in enumerate(items):
                try:
                    if isinstance(item, bytes) and self._write_now(port, item):
                        continue
                except DcudError as exc:  # the line failed under us: this session is over
                    self.end("line_error", str(exc))
                    return
                self._ops.extend(items[index:])
                self._fast = False
                self._wake.set()
                return
            return
        self._ops.append(_Raw(data))
        self._queued_bytes += len(data)
        if self._queued_bytes > INBOUND_HIGH_BYTES and not self._reading_paused:
            self._pause_reading()
        self._wake.set()

    def eof_received(self) -> bool | None:
        """The client half-closed: its last bytes still go to the line, the meter's answer still comes back.

        The session ends once everything queued is written and the line has been quiet for
        ``EOF_LINGER_S`` (``echo '/?!' | nc -N dcu 9000`` gets its identification line).
        """
        self._client_done("client_closed", "", linger=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone (a reset or a timeout means a dead peer); queued bytes still go out."""
        if exc is None:
            self._client_done("client_closed", "", linger=False)
        elif isinstance(exc, TimeoutError):
            self._client_done("peer_dead", str(exc) or "timeout", linger=False)
        else:
            self._client_done("client_reset", str(exc) or type(exc).__name__, linger=False)
        self._writable.set()
        self._blocked.clear()

    def _client_done(self, reason: str, detail: str, *, linger: bool) -> None:
        """The client sends no more: end now, or once the queued bytes are on the line (and lingered)."""
        first = self._finish
        if first is not None:
            reason, detail = first[0], first[1]
            linger = linger and first[2]
        if first is None:
            self._finish_at = self._loop.time()
        self._finish = (reason, detail, linger)
        if not self._ops and not linger:
            self.end(reason, detail)
        self._wake.set()

    def pause_writing(self) -> None:
        """The socket's send buffer is full: stop taking bytes from the line."""
        self._write_paused = True
        self._writable.clear()
        self._blocked.set()

    def resume_writing(self) -> None:
        """The socket drained: take bytes from the line again."""
        self._write_paused = False
        if not self._suspended:
            self._writable.set()
            self._blocked.clear()

    # -- client -> line ------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(RuntimeError):
                transport.pause_reading()
        self._reading_paused = True

    def _maybe_resume_reading(self) -> None:
        if self._reading_paused and self._queued_bytes <= INBOUND_LOW_BYTES:
            self._reading_paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                with contextlib.suppress(RuntimeError):
                    transport.resume_reading()

    def _timer_due(self, now: float) -> bool:
        sniffer = self.sniffer
        if sniffer is None:
            return False
        deadline = sniffer.next_deadline()
        return deadline is not None and deadline <= now

    def _client_ops(self, data: bytes, now: float) -> list[_LineOp]:
        """Decode (Telnet) and sniff client bytes into what must happen on the line, in order."""
        if self.telnet is None:
            payloads: list[bytes | PortRequest] = [data]
        else:
            payloads = []
            for event in self.telnet.receive(data):
                if isinstance(event, ClientData):
                    payloads.append(event.data)
                elif isinstance(event, Reply):
                    self._send_raw(event.data)
                else:
                    payloads.append(event)
        sniffer = self.sniffer
        if sniffer is None or self._client_line is not None:
            return list(payloads)
        items: list[_LineOp] = []
        for payload in payloads:
            if isinstance(payload, PortRequest):
                items.append(payload)
                continue
            for action in sniffer.from_client(payload, now):
                if isinstance(action, Forward):
                    items.append(action.data)
                else:
                    items.append(_Switch(action.baud, action.framing, action.reason))
        return items

    def _leak(self) -> None:
        """Age the line model: what the wire has sent since the last call leaves the bucket."""
        now = _monotonic()
        if self._bucket:
            self._bucket = max(0.0, self._bucket - (now - self._bucket_t) * self._cps)
        self._bucket_t = now

    def _line_backlog(self) -> float:
        """Bytes written to the line and not on the wire yet: the port's count, else the model's."""
        pending = self._output_pending
        if pending is not None:
            return float(pending())
        self._leak()
        return self._bucket

    def _write_now(self, port: LeasedPort, data: bytes) -> bool:
        """Write if the line's queue has room (no drain needed); False: the pump must do it.

        The wire-rate model answers first; the port's own count (an ioctl) is asked only when the
        model says the queue is full or the last write left bytes in user space (the driver refused
        them: the model is behind the truth).
        """
        limit = self._queue_limit
        size = len(data)
        self._leak()
        queued = self._bucket
        pending = self._output_pending
        if pending is not None and (queued + size > limit or self._spilled):
            truth = float(pending())
            if truth * 2 < queued and self._cps < self._cps_max:
                # The device drains faster than its nominal rate (a pty, a serial server on the
                # network): let the model follow, so the driver is not asked on every write.
                self._cps = min(self._cps * 4, self._cps_max)
            queued = truth
            self._spilled = 0
        self._bucket = queued
        if queued + size > limit and (queued or size > limit):
            return False
        self._spilled = self._line_write(data) or 0
        self._bucket += size
        return True

    async def _write_line(self, port: LeasedPort, data: bytes) -> None:
        limit = self._queue_limit
        for off in range(0, len(data), limit):
            piece = data[off : off + limit]
            queued = self._line_backlog()
            if queued and queued + len(piece) > limit:
                await port.drain()
                self._bucket = 0.0
            port.write(piece)
            self._bucket += len(piece)

    def _set_rate(self, baud: int, framing: str) -> None:
        self._cps = baud / bits_per_char(framing)
        self._cps_max = self._cps * MODEL_SPEEDUP_MAX
        self._queue_limit = max(LINE_QUEUE_MIN_BYTES, int(self._cps * LINE_QUEUE_S))

    async def _switch(self, port: LeasedPort, baud: int, framing: str, reason: str) -> None:
        await port.set_framing(framing)
        await port.set_baud(baud)
        self._bucket = 0.0
        self._set_rate(port.baud, port.framing)
        if self.trace is not None:
            self.trace.note(self.sid, f"line {port.baud} {port.framing} ({reason})")

    async def _pump(self, port: LeasedPort) -> None:
        """Carries out queued client bytes, line switches and RFC 2217 requests, in order."""
        loop = self._loop
        while True:
            while self._ops:
                item = self._ops.popleft()
                if isinstance(item, _Raw):
                    self._queued_bytes -= len(item.data)
                    self._ops.extendleft(reversed(self._client_ops(item.data, loop.time())))
                    self._maybe_resume_reading()
                    continue
                if isinstance(item, bytes):
                    await self._write_line(port, item)
                elif isinstance(item, _Switch):
                    await self._switch(port, item.baud, item.framing, item.reason)
                else:
                    await self._port_request(port, item)
            self._maybe_resume_reading()
            self._fast = True
            self._wake.clear()
            deadline = self.sniffer.next_deadline() if self.sniffer is not None else None
            if self._finish is not None:
                reason, detail, linger = self._finish
                quiet_at = min(self.last_activity + EOF_LINGER_S, self._finish_at + EOF_LINGER_MAX_S)
                if not linger or loop.time() >= quiet_at:
                    self.end(reason, detail)
                    raise _Ended
                deadline = quiet_at if deadline is None else min(deadline, quiet_at)
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            if self._timer_due(loop.time()) and self.sniffer is not None:
                for action in self.sniffer.handle_timer(loop.time()):
                    if isinstance(action, SwitchLine):
                        self._fast = False
                        self._ops.append(_Switch(action.baud, action.framing, action.reason))

    async def _port_request(self, port: LeasedPort, request: PortRequest) -> None:
        """Carry out an RFC 2217 COM-PORT-OPTION command and answer with the value in force."""
        telnet = self.telnet
        assert telnet is not None
        command, value = request.command, request.number
        reply: bytes | None = None
        if command == SET_BAUDRATE:
            if value:
                with contextlib.suppress(TransportError):
                    await self._switch(port, value, port.framing, "RFC 2217 client")
                self._client_line = (port.baud, port.framing)
            reply = telnet.baud_reply(port.baud)
        elif command in (SET_DATASIZE, SET_PARITY, SET_STOPSIZE):
            if value:
                wanted = framing_from_settings(
                    port.framing,
                    data_bits=value if command == SET_DATASIZE else 0,
                    parity=value if command == SET_PARITY else 0,
                    stop_bits=value if command == SET_STOPSIZE else 0,
                )
                with contextlib.suppress(TransportError, ValueError):
                    await self._switch(port, port.baud, wanted, "RFC 2217 client")
                self._client_line = (port.baud, port.framing)
            framing = port.framing
            current = {
                SET_DATASIZE: int(framing[0]),
                SET_PARITY: PARITY_CODES.get(framing[1], 1),
                SET_STOPSIZE: int(framing[2]),
            }[command]
            reply = telnet.reply(command, current)
        elif command == SET_CONTROL:
            # No flow control, break or modem lines on a meter line: queries get "none/off", settings
            # of DTR/RTS/break are acknowledged as asked (there is nothing to switch).
            answer = {0: 1, 2: 1, 3: 1, 4: 6, 7: 8, 10: 11, 13: 1, 14: 1, 15: 1, 16: 1, 17: 1, 18: 1, 19: 1}
            reply = telnet.reply(command, answer.get(value, value))
        elif command == NOTIFY_LINESTATE:
            reply = telnet.reply(command, 0)
        elif command == NOTIFY_MODEMSTATE:
            reply = telnet.reply(command, 0x30)  # no modem lines: report CTS and DSR as on
        elif command == FLOWCONTROL_SUSPEND:
            self._suspended = True
            self._writable.clear()
            self._blocked.set()
        elif command == FLOWCONTROL_RESUME:
            self._suspended = False
            if not self._write_paused:
                self._writable.set()
                self._blocked.clear()
        elif command in (SET_LINESTATE_MASK, SET_MODEMSTATE_MASK):
            reply = telnet.reply(command, request.value or b"\x00")
        elif command == PURGE_DATA:
            if value in (1, 3):
                port.flush_input()
            reply = telnet.reply(command, value)
        elif command == SIGNATURE and not request.value:
            reply = telnet.signature_reply()
        if reply is not None:
            self._send_raw(reply)

    # -- line -> client ------------------------------------------------------------------------

    def _send_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _on_line_data(self, data: bytes) -> None:
        """Meter bytes to the client (through the sniffer); never raises (it may run in a port callback)."""
        transport = self._transport
        sniffer = self.sniffer
        if (
            data
            and transport is not None
            and self.telnet is None
            and self.trace is None
            and (sniffer is None or sniffer.state is _IDLE)
        ):
            # The hot path: to the client first, the books after (an idle sniffer only forwards).
            try:
                if not transport.is_closing():
                    transport.write(data)
                self.last_activity = self._loop.time()
                self.bytes_m2c += len(data)
            except Exception as exc:  # a bug here must end this session, not the line's reader
                log.error("bridge session failed on line data", session=self.sid, error=repr(exc))
                self.end("error", repr(exc))
            return
        if not data:  # the port closed (push API: an empty chunk is its end of file)
            self.end("line_error", "line closed")
            return
        try:
            now = self._loop.time()
            self.last_activity = now
            self.bytes_m2c += len(data)
            if self.trace is not None:
                self.trace.data(self.sid, "m>c", data)
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            telnet = self.telnet
            sniffer = self.sniffer
            if sniffer is None or self._client_line is not None or sniffer.state is _IDLE:
                transport.write(escape(data) if telnet is not None else data)
                return
            for action in sniffer.from_meter(data, now):
                if isinstance(action, Forward):
                    transport.write(escape(action.data) if telnet is not None else action.data)
                else:
                    self._fast = False
                    self._ops.append(_Switch(action.baud, action.framing, action.reason))
                    self._wake.set()
        except Exception as exc:  # a bug here must end this session, not the line's reader
            log.error("bridge session failed on line data", session=self.sid, error=repr(exc))
            self.end("error", repr(exc))

    async def _reader(self, port: LeasedPort) -> None:
        """Line -> client, reading from the leased port; stops taking bytes while the client is full."""
        set_receiver = getattr(port, "set_receiver", None)
        if callable(set_receiver):
            await self._push_reader(set_receiver)
            return
        while True:
            if not self._writable.is_set():
                await self._wait_writable()
            data = await port.read(READ_CHUNK_BYTES, timeout_s=30.0)
            if data:
                self._on_line_data(data)

    async def _push_reader(self, set_receiver: Callable[[Callable[[bytes], None] | None], None]) -> None:
        """The port hands received bytes over at once; while the client is full they wait in the port."""
        try:
            while True:
                set_receiver(self._on_line_data)
                await self._blocked.wait()
                set_receiver(None)
                await self._wait_writable()
        finally:
            with contextlib.suppress(Exception):
                set_receiver(None)

    async def _wait_writable(self) -> None:
        if self._suspended and not self._write_paused:
            await self._writable.wait()
            return
        try:
            async with asyncio.timeout(self.policy.unsent_timeout_s):
                await self._writable.wait()
        except TimeoutError:
            self.end("peer_not_reading", f"client read nothing for {self.policy.unsent_timeout_s:g} s")
            raise _Ended from None

    # -- leases ----------------------------------------------------------------------------------

    async def _body(self) -> None:
        lazy = self.lazy_lease
        loop = self._loop
        while True:
            if lazy and not await self._wait_for_client_data():
                return
            asked = loop.time()
            try:
                async with self.line.lease(self.owner, "bridge", timeout_s=self.policy.lease_wait_s) as port:
                    self.lease_wait_s += loop.time() - asked
                    yielded = await self._hold(port)
            except LeaseTimeout as exc:
                self.end("line_unavailable", str(exc))
                return
            except LineBusyError as exc:
                self.end("line_busy", str(exc))
                return
            except LineClosedError as exc:
                self.end("line_removed", str(exc))
                return
            except (TransportError, DcudError) as exc:
                self.end("line_error", str(exc))
                return
            if not yielded:
                return
            self.yields += 1
            lazy = True

    async def _wait_for_client_data(self) -> bool:
        """Without the line: wait until the client sends (True) or the session idles out (False)."""
        loop = self._loop
        while not self._ops:
            if self._finish is not None:
                self.end(self._finish[0], self._finish[1])
                return False
            self._wake.clear()
            idle_s = self.policy.idle_timeout_s
            timeout = None if not idle_s else max(0.0, self.last_activity + idle_s - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                self.end("idle_timeout")
                return False
        return True

    async def _hold(self, port: LeasedPort) -> bool:
        """Serve the session on the leased line; True when the lease is handed back (idle)."""
        loop = self._loop
        self.leases += 1
        baud, framing = self._client_line or (self.baud, self.framing)
        await port.set_framing(framing)
        await port.set_baud(baud)
        port.flush_input()
        self._set_rate(port.baud, port.framing)
        self._bucket = 0.0
        self._spilled = 0
        pending = getattr(port, "output_pending", None)
        self._output_pending = pending if callable(pending) else None
        direct = getattr(port, "direct_writer", None)
        self._line_write = direct() if callable(direct) else port.write
        if self.sniffer is not None:
            self.sniffer.reset()
        self._lease_since = loop.time()
        if self.trace is not None:
            self.trace.note(self.sid, f"lease {self.line.name} {port.baud} {port.framing}")
        self._port = port
        self._fast = not self._ops
        self._wake.set()
        # Helpers of this lease, named after the session; they end (cancelled) before the lease does.
        tasks = [
            loop.create_task(self._reader(port), name=child_name(f"{self.sid}/reader")),
            loop.create_task(self._pump(port), name=child_name(f"{self.sid}/pump")),
        ]
        watcher = loop.create_task(self._watch(port), name=child_name(f"{self.sid}/watch"))
        yielded = False
        try:
            done, _ = await asyncio.wait([*tasks, watcher], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    yielded = task is watcher and bool(task.result())
                elif isinstance(exc, _Ended):
                    pass
                elif isinstance(exc, DcudError):
                    self.end("line_error", str(exc))
                else:
                    raise exc
            return yielded
        finally:
            self._port = None
            self._line_write = _not_leased
            self._fast = False
            for task in (*tasks, watcher):
                task.cancel()
            # The session's end cancels this task, often while it is already here: the helpers must
            # be gone and the meter out of programming mode before the lease goes, cancelled or not.
            await _to_the_end(self._wind_down([*tasks, watcher], port))
            if yielded and self.trace is not None:
                self.trace.note(self.sid, "lease handed back (idle)")

    async def _wind_down(self, helpers: list[asyncio.Future[Any]], port: LeasedPort) -> None:
        await asyncio.wait(helpers)
        await self._close_programming(port)

    async def _close_programming(self, port: LeasedPort) -> None:
        """Before the lease goes: break an IEC programming session the client left open (never raises).

        Written at the rate in force (the meter's programming rate) and drained, so the meter is back
        at sign-on before anybody else gets the line. Twice when the client stopped inside a frame:
        the meter takes the first break as the rest of that frame. Skipped when an RFC 2217 client set
        the line itself (the sniffer is not following that session).
        """
        sniffer = self.sniffer
        if sniffer is None or self._client_line is not None or not sniffer.programming:
            return
        frame = encode_break()
        data = frame * 2 if sniffer.client_frame_open else frame
        try:
            baud, framing = port.baud, port.framing
            port.write(data)
            async with asyncio.timeout(tx_time_s(len(data), baud) + BREAK_DRAIN_S):
                await port.drain()
        except (DcudError, TimeoutError) as exc:
            log.warning("IEC programming session left open: break not sent", session=self.sid, error=str(exc))
            return
        self.breaks_sent += 1
        sniffer.reset()
        log.info("IEC programming session closed with a break", session=self.sid, baud=baud, framing=framing)
        if self.trace is not None:
            self.trace.note(self.sid, f"break B0 at {baud} {framing} (programming session left open)")

    async def _watch(self, port: LeasedPort) -> bool:
        """Idle timeout, lease_max and yielding the idle line to waiting readouts."""
        loop = self._loop
        policy = self.policy
        while True:
            now = loop.time()
            idle = now - self.last_activity
            if policy.idle_timeout_s and idle >= policy.idle_timeout_s:
                self.end("idle_timeout")
                raise _Ended
            waiting = port.waiting
            held = now - self._lease_since
            if policy.lease_max_s and held >= policy.lease_max_s and waiting:
                self.end("lease_max", f"held the line {held:.0f} s while {waiting} waited")
                raise _Ended
            if idle >= policy.lease_idle_s and (waiting or self.release_when_idle) and not self._ops:
                return True
            wake = [
                now + WAITER_POLL_S
                if idle >= policy.lease_idle_s
                else self.last_activity + policy.lease_idle_s
            ]
            if policy.idle_timeout_s:
                wake.append(self.last_activity + policy.idle_timeout_s)
            if policy.lease_max_s:
                wake.append(max(self._lease_since + policy.lease_max_s, now + WAITER_POLL_S))
            await asyncio.sleep(max(0.01, min(wake) - now))


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
        self._refused_address_log = _SummaryLog("connection from a source outside the allow-list dropped")
        self._tls_log = _SummaryLog("TLS handshake failed")
        self._busy_log = _SummaryLog("second client refused: port busy")
        self._identity_log = _SummaryLog("second client refused: not the identity of the running session")
        self._pending_log = _SummaryLog("too many connections in admission; dropped")
        self._source_pending_log = _SummaryLog("too many connections in admission from one source; dropped")
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


async def audit(session: BridgeSession, event: EventSink | None) -> None:
    """Write the session's audit record: a log line and a ``bridge_session`` event."""
    record = session.record()
    log.info("bridge session", **record)
    if event is None:
        return
    text = (
        f"transparent session {record['port']} {record['peer']} ended ({record['reason']}): "
        f"{record['bytes_to_meter']} B to meter, {record['bytes_to_client']} B to client"
    )
    try:
        await event("bridge_session", text, **record)
    except Exception as exc:  # the outbox may refuse (full, reject_new): the log line stays
        log.error("audit event not committed", session=session.sid, error=repr(exc))


# -- building from the configuration -------------------------------------------------------------


def _param(params: Any, name: str, default: Any) -> Any:
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
        enabled=bool(_param(params, "tm.tls_enable", True)),
        cert_bank=int(_param(params, "tm.cert", 0)),
        ca_bank=int(_param(params, "tm.ca_cert", 0)),
        verify=verify_from_wme(int(_param(params, "tm.verify", 0))),
        use_crl=bool(_param(params, "tm.use_crl", False)),
    )


def trace_path(template: str, state_dir: Path, port_name: str) -> str:
    """The hex trace file of ``port_name`` (empty: no trace)."""
    if not template:
        return ""
    path = Path(template.replace("{port}", port_name))
    return str(path if path.is_absolute() else state_dir / path)


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
]
