"""The config/firmware port (``fw_server_port``, default 9001): HTTP/1.1 on asyncio streams with h11.

``curl`` is a client. Routes (docs/remote-config.md has examples):

==========  =============  =================================================================================
method      path           does
==========  =============  =================================================================================
``GET``     ``/config``    the parameter file in force, secrets masked (``text/plain``)
``PUT``     ``/config``    a **whole** WM-E parameter file: replaces the file in force (names it lacks go
                           back to their defaults). 200 + JSON of what changed, or 422 + every issue
``PATCH``   ``/config``    a **partial** file: changes only the names it lists (``name=`` unsets one)
``PUT``     ``/firmware``  stage a firmware file, ``X-Firmware-SHA256: <hex>`` required (422 on mismatch)
``GET``     ``/firmware``  what is staged
==========  =============  =================================================================================

``?dry_run=1`` on ``PUT``/``PATCH /config`` validates and reports without writing. Every response
closes the connection.

Writes without encryption: ``PUT``/``PATCH`` and firmware uploads on a plain port are refused (403,
nothing read, one log line) unless the installer opts in with ``[config_port] plain_writes = true``;
reads are always served.

Encryption (``fw_server_encrypt=1``): every request body, including that of a ``GET`` (an envelope of
nothing), is an envelope of :mod:`dcud.service.crypto_envelope` bound to this DCU's ``device_id`` and
``"<METHOD> <target>"``; every answer to an authenticated request is an envelope bound to its status
and the request's nonce. Plain bodies are refused (403), so are envelopes whose tag does not match
(403, checked before anything is decrypted), replays (403, with the DCU's clock in the answer so that a
head-end with a wrong clock can tell), and requests whose replay state cannot be saved (503). A
firmware upload is a streamed envelope: its 144-byte header is authenticated (and its nonce spent)
before one byte of the body is written anywhere; the body is then decrypted as it arrives and its
length and SHA-256 are checked against the header before it is installed. Encrypted bodies while
encryption is off are refused (400).

Where it listens (``[config_port] listen`` in dcud.toml): ``auto`` (default) is every interface when
``fw_server_encrypt=1`` and 127.0.0.1 only when not, because without the key anyone who reaches the
port could reconfigure the DCU; ``loopback``, ``any`` or an IP address choose explicitly (a plain port
on a non-loopback address is logged as a warning at every start).

Limits (all in ``[config_port]``): at most ``max_connections`` at once and
``max_connections_per_source`` from one address (more get 503 at once), the request head within
``header_timeout_s`` (else 408), a body at least ``min_body_rate_bytes_s`` on average over every
``body_rate_window_s`` (else 408: a slow client is cut long before the whole-request deadline), a
config request within ``request_timeout_s``, a firmware upload within ``firmware_timeout_s``, bodies up
to ``max_body_bytes`` / ``max_firmware_bytes`` (else 413, checked against Content-Length before
reading), a request head up to 16 KiB (else 431). A refused request changes nothing. Every refusal is
counted on the retained state ``<p>/config_port/state`` (member ``counters``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h11
import structlog

from dcud.config.loader import LoadedConfig
from dcud.config.model import ConfigPortConfig
from dcud.errors import ConfigError, ConfigIssue
from dcud.runtime.bus import EventBus
from dcud.runtime.events import EventSink
from dcud.runtime.link import Link, LinkDown, LinkPolicy, run_link
from dcud.runtime.supervisor import Service, ServiceContext
from dcud.service.crypto_envelope import (
    BLOCK_BYTES,
    HEADER_BYTES,
    KIND_RESPONSE,
    KIND_STREAM,
    STREAM_HEADER_BYTES,
    TAG_BYTES,
    EnvelopeAuthError,
    EnvelopeError,
    EnvelopeKeys,
    MalformedEnvelopeError,
    ReplayedEnvelopeError,
    ReplayGuard,
    ReplayStateError,
    StreamBodyOpener,
    is_envelope,
    open_envelope,
    open_stream_header,
    parse_header,
    request_context,
    response_context,
    seal,
)
from dcud.service.firmware import (
    FirmwareRejectedError,
    FirmwareStager,
    check_name,
    check_sha256,
)
from dcud.service.remote_config import (
    ApplyResult,
    ParameterWriteError,
    ReloadBusyError,
    Via,
    issues_json,
    mask_parameter_text,
)
from dcud.transport.tcp import (
    Admission,
    SocketTuning,
    SourceLimits,
    bound_addresses,
    is_loopback,
    linger_close,
    source_key,  # noqa: F401  (its old home: callers import it from here)
    start_stream_server,
)

log = structlog.get_logger("dcud.config_port")

SERVICE_NAME = "config_port"
MAX_HEAD_BYTES = 16 * 1024
READ_CHUNK_BYTES = 64 * 1024
ENVELOPE_OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES + 16
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
ROUTES: dict[str, tuple[str, ...]] = {"/config": ("GET", "PUT", "PATCH"), "/firmware": ("GET", "PUT")}
WRITE_METHODS = frozenset({"PUT", "PATCH"})
TUNING = SocketTuning()
"""Accepted connections: NODELAY, keepalive 60/10/3 and TCP_USER_TIMEOUT 30 s (docs/remote-config.md);
the header, body-rate and request deadlines bound a request's life long before those fire."""
PLAIN_WRITE_REFUSAL = (
    "writes on a plain config port are off: use fw_server_encrypt=1, or let the installer set "
    "[config_port] plain_writes = true in dcud.toml"
)


class ConfigApi(Protocol):
    """What the port needs of :class:`~dcud.service.remote_config.Reloader`."""

    @property
    def current(self) -> LoadedConfig:
        """The configuration in force."""
        ...

    def current_text(self) -> str:
        """The parameter file in force."""
        ...

    async def apply_text(
        self, text: str, *, partial: bool, who: str, via: Via, authenticated: bool, dry_run: bool = False
    ) -> ApplyResult:
        """Validate, write and apply (see remote_config; unauthenticated: protected names refused)."""
        ...


@dataclass(frozen=True)
class ConfigPortSettings:
    """The config port's slice: port, bind address, encryption and limits. The key never shows in repr."""

    port: int
    host: str | None
    """Bind address; None: every interface."""
    encrypt: bool
    key_text: str | None = field(repr=False)
    limits: ConfigPortConfig
    state_dir: str
    device_id: str
    """Envelopes are bound to it: one sealed for another DCU is refused."""

    @classmethod
    def from_config(cls, config: LoadedConfig) -> ConfigPortSettings | None:
        """None when ``[config_port] enabled = false``."""
        table = config.toml.config_port
        if not table.enabled:
            return None
        params = config.params
        encrypt = params.get_bool("fw_server_encrypt")
        return cls(
            port=params.get_int("fw_server_port"),
            host=bind_host(table.listen, encrypt),
            encrypt=encrypt,
            key_text=params.get_opt_str("fw_server_key"),
            limits=table,
            state_dir=str(config.state_dir),
            device_id=config.device_id,
        )

    @property
    def exposed(self) -> bool:
        """Whether the port listens beyond loopback."""
        return self.host is None or not is_loopback(self.host)


def bind_host(listen: str, encrypt: bool) -> str | None:
    """The address to bind for ``[config_port] listen`` (None: every interface)."""
    if listen == "auto":
        return None if encrypt else "127.0.0.1"
    if listen == "loopback":
        return "127.0.0.1"
    if listen == "any":
        return None
    return listen


class HttpError(Exception):
    """Ends a request with ``status`` and a short JSON error (never carries a secret)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


class SlowBodyError(HttpError):
    """A body slower than the minimum rate (counted apart from whole-request timeouts)."""


@dataclass
class PortCounters:
    """Counters of the port (member ``counters`` of its state document)."""

    connections: int = 0
    refused_busy: int = 0
    """Connections refused because ``max_connections`` were open."""
    refused_per_source: int = 0
    """Connections refused because ``max_connections_per_source`` were open from that source."""
    slow_bodies: int = 0
    """Requests cut because their body was slower than ``min_body_rate_bytes_s``."""
    plain_writes_refused: int = 0
    """Writes refused on a plain port without ``plain_writes = true``."""
    requests: dict[int, int] = field(default_factory=dict)
    auth_failures: int = 0
    replays: int = 0
    replay_state_failures: int = 0
    """Authentic requests refused because the replay state could not be saved."""

    def count(self, status: int) -> None:
        """Count one answer by status."""
        self.requests[status] = self.requests.get(status, 0) + 1

    def to_json(self) -> dict[str, Any]:
        """The counters as a JSON object (status codes as strings)."""
        data = {k: v for k, v in self.__dict__.items() if k != "requests"}
        return {**data, "requests": {str(k): v for k, v in sorted(self.requests.items())}}


@dataclass
class _Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    peer: str
    nonce: bytes | None = None
    """Set once an envelope was authenticated: the answer is sealed to it."""


class _RateBound:
    """Minimum body rate: every window of ``window_s`` must bring ``min_bytes``, or the body ends.

    A window that got its bytes starts a new one, so a client must keep up the rate all along; a
    stalled body fails within one window whatever the whole-request deadline says.
    """

    def __init__(self, min_rate_bytes_s: int, window_s: float, now: float) -> None:
        self.window_s = window_s
        self.min_bytes = max(1, int(min_rate_bytes_s * window_s))
        self.window_end = now + window_s
        self._got = 0

    def feed(self, size_bytes: int, now: float) -> None:
        """Bytes received at ``now``."""
        self._got += size_bytes
        if self._got >= self.min_bytes:
            self._got = 0
            self.window_end = now + self.window_s


class _Reader:
    """h11 events off a stream, each wait bounded by a deadline on the loop clock (and, for bodies,
    by the minimum rate)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: h11.Connection
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.conn = conn

    async def accept_body(self, timeout_s: float) -> None:
        """Send ``100 Continue`` when the client waits for it (curl does for large uploads)."""
        if self.conn.they_are_waiting_for_100_continue and self.conn.our_state is h11.SEND_RESPONSE:
            data = self.conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
            if data:
                self._writer.write(data)
                async with asyncio.timeout(timeout_s):
                    await self._writer.drain()

    async def next_event(self, deadline: float, rate: _RateBound | None = None) -> Any:
        loop = asyncio.get_running_loop()
        for _ in range(1_000_000):  # bounded: every pass reads at least one byte or ends
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(exc.error_status_hint, f"bad HTTP request: {exc}") from None
            if event is not h11.NEED_DATA:
                return event
            limit = deadline if rate is None else min(deadline, rate.window_end)
            remaining = limit - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    data = await self._reader.read(READ_CHUNK_BYTES)
            except TimeoutError:
                if rate is not None and rate.window_end < deadline:
                    raise SlowBodyError(
                        408,
                        f"body slower than {rate.min_bytes} bytes in {rate.window_s:g} s "
                        "(min_body_rate_bytes_s)",
                    ) from None
                raise HttpError(408, "request not received in time") from None
            if rate is not None:
                rate.feed(len(data), loop.time())
            self.conn.receive_data(data)
        raise HttpError(400, "request too fragmented")


class _Body:
    """The pieces of one request body, size- and rate-bounded."""

    def __init__(self, events: _Reader, deadline: float, rate: _RateBound, max_bytes: int) -> None:
        self._events = events
        self._deadline = deadline
        self._rate = rate
        self.max_bytes = max_bytes
        self.size_bytes = 0

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body; None once it is complete."""
        for _ in range(16):  # bounded: h11 yields Data, EndOfMessage or ConnectionClosed
            event = await self._events.next_event(self._deadline, self._rate)
            if isinstance(event, h11.EndOfMessage):
                return None
            if isinstance(event, h11.ConnectionClosed):
                raise HttpError(400, "connection closed before the body was complete")
            if isinstance(event, h11.Data) and event.data:
                self.size_bytes += len(event.data)
                if self.size_bytes > self.max_bytes:
                    raise HttpError(413, f"body larger than {self.max_bytes} bytes")
                return bytes(event.data)
        raise HttpError(400, "unexpected HTTP events in a body")


class ConfigPortService:
    """Supervised service ``config_port``."""

    name = SERVICE_NAME

    def __init__(
        self,
        config: ConfigPortSettings,
        api: ConfigApi,
        bus: EventBus | None = None,
        clock_trusted: Callable[[], bool] = lambda: False,
        event: Callable[..., Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._api = api
        self._bus = bus
        self._event = event
        """``Runtime.event``: a staged firmware raises ``firmware_staged`` (outbox, MQTT, SNMP)."""
        self._clock_trusted = clock_trusted
        self.counters = PortCounters()
        self._keys: EnvelopeKeys | None = None
        self._guard: ReplayGuard | None = None
        self._firmware: FirmwareStager | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._applying: set[asyncio.Task[Any]] = set()
        self._admission = SourceLimits(
            config.limits.max_connections, config.limits.max_connections_per_source
        )
        """Open connections, in total and per source (entries only while a connection is counted)."""
        self._state = "starting"
        self._error: str | None = None
        self.bound: list[tuple[str, int]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, ctx: ServiceContext) -> None:
        """Bind (retrying with backoff while the port is taken), serve until stopped."""
        cfg = self.config
        state_dir = Path(cfg.state_dir)
        if cfg.encrypt:
            if cfg.key_text is None:  # the loader refuses this; never serve plain by mistake
                raise ConfigError([ConfigIssue("", 0, "fw_server_key", "encryption needs fw_server_key")])
            self._keys = EnvelopeKeys.from_parameter(cfg.key_text)
            self._guard = ReplayGuard(
                cfg.limits.replay_window_s,
                state_path=state_dir / "config_port" / "replay.json",
                clock_trusted=self._clock_trusted,
            )
        self._firmware = FirmwareStager(state_dir / "firmware", self._bus, cfg.limits.max_firmware_bytes)
        if cfg.exposed and not cfg.encrypt:
            ctx.log.warning(
                "config port is plain (fw_server_encrypt=0) and listens beyond loopback: "
                "anyone who reaches it can reconfigure this DCU",
                listen=cfg.limits.listen,
            )
        await run_link(ctx, _ListenerLink(self, ctx), LinkPolicy(initial_s=1.0, max_s=60.0))

    @property
    def _per_source(self) -> dict[str, int]:
        """Open connections per source (tests read it)."""
        return self._admission.by_source

    @contextlib.asynccontextmanager
    async def _listening(self, ctx: ServiceContext) -> AsyncIterator[asyncio.Server]:
        """Bound and serving; on the way out: closed, idle connections ended, state ``stopped``."""
        server = await start_stream_server(
            self._connection,
            self.config.host,
            self.config.port,
            limit=READ_CHUNK_BYTES,
            tuning=TUNING,
            owner=ctx.name,
        )
        try:
            self.bound = bound_addresses(server)
            ctx.log.info(
                "listening", addresses=[f"{h}:{p}" for h, p in self.bound], encrypted=self.config.encrypt
            )
            self._publish("listening", None)
            ctx.set_ready()
            yield server
        finally:
            server.close()
            await self._close_idle_connections()
            self._publish("stopped", None)

    async def _close_idle_connections(self) -> None:
        # A connection waiting for its apply to finish keeps going (it answers once the reload that
        # may be stopping this very service is done); every other one is closed now.
        idle = [t for t in self._handlers if t not in self._applying]
        for task in idle:
            task.cancel()
        if idle:
            await asyncio.wait(idle, timeout=2.0)

    def _publish(self, state: str, error: str | None) -> None:
        self._state, self._error = state, error
        if self._bus is None:
            return
        self._bus.set_state(
            "config_port",
            {
                "state": state,
                "port": self.config.port,
                "listen": self.config.limits.listen,
                "addresses": [f"{h}:{p}" for h, p in self.bound],
                "encrypted": self.config.encrypt,
                "plain_writes": self.config.limits.plain_writes,
                "error": error,
                "counters": self.counters.to_json(),
            },
        )

    def _publish_counters(self) -> None:
        self._publish(self._state, self._error)

    # -- one connection ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer_info = writer.get_extra_info("peername")
        peer = str(peer_info[0]) if isinstance(peer_info, tuple) else "local"
        limits = self.config.limits
        counted = False
        self.counters.connections += 1
        try:
            admission = self._admission.admit(peer)
            if admission is Admission.TOTAL_FULL:
                self.counters.refused_busy += 1
                self._publish_counters()
                log.warning("connection refused: port busy", peer=peer, limit=limits.max_connections)
                await self._write_raw(writer, 503, _error_body("too many connections"))
                return
            if admission is Admission.SOURCE_FULL:
                self.counters.refused_per_source += 1
                self._publish_counters()
                log.warning(
                    "connection refused: too many from this source",
                    peer=peer,
                    limit=limits.max_connections_per_source,
                )
                await self._write_raw(writer, 503, _error_body("too many connections from this address"))
                return
            counted = True
            if task is not None:
                self._handlers.add(task)
            await self._serve(reader, writer, peer)
            await linger_close(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # one bad connection must never fail the service
            log.error("connection failed", peer=peer, error=repr(exc))
        finally:
            if counted:
                self._admission.release(peer)
            if task is not None:
                self._handlers.discard(task)
                self._applying.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        events = _Reader(reader, writer, conn)
        request: _Request | None = None
        try:
            head = await events.next_event(start + self.config.limits.header_timeout_s)
            if isinstance(head, h11.ConnectionClosed):
                return
            if not isinstance(head, h11.Request):  # pragma: no cover - h11 yields a Request first
                raise HttpError(400, "expected a request")
            request = _parse_request(head, peer)
            status, body, content_type = await self._handle(request, events, start)
        except HttpError as exc:
            if isinstance(exc, SlowBodyError):
                self.counters.slow_bodies += 1
                log.warning("slow body cut", peer=peer, error=str(exc))
            status, body, content_type = exc.status, _error_body(str(exc), **exc.extra), "application/json"
        except EnvelopeError as exc:
            status = 400 if isinstance(exc, MalformedEnvelopeError) else 403
            if isinstance(exc, EnvelopeAuthError):
                self.counters.auth_failures += 1
            message = str(exc) if isinstance(exc, MalformedEnvelopeError) else exc.reason
            body, content_type = _error_body(message), "application/json"
            log.warning("envelope refused", peer=peer, reason=exc.reason)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # a bug: answer it, log it, keep serving
            log.error("request failed", peer=peer, error=repr(exc))
            status, body, content_type = 500, _error_body("internal error"), "application/json"
        self.counters.count(status)
        self._publish_counters()
        if request is not None and request.nonce is not None and self._keys is not None:
            body = seal(
                self._keys,
                body,
                response_context(status, request.nonce),
                device_id=self.config.device_id,
                kind=KIND_RESPONSE,
            )
            content_type = "application/octet-stream"
        allow = ", ".join(ROUTES.get(request.path, ())) if request is not None and status == 405 else ""
        await self._respond(conn, writer, status, body, content_type, allow=allow)

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        *,
        allow: str = "",
    ) -> None:
        if conn.our_state is not h11.SEND_RESPONSE:
            await self._write_raw(writer, status, body, content_type)
            return
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
        ]
        if allow:
            headers.append(("Allow", allow))
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, "")))
        data = (
            (data or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        )
        await self._write(writer, data)

    async def _write_raw(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str = "application/json"
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        await self._write(writer, head.encode("ascii") + body)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self.config.limits.header_timeout_s):
            await writer.drain()

    # -- requests ------------------------------------------------------------------------------

    async def _handle(self, request: _Request, events: _Reader, start: float) -> tuple[int, bytes, str]:
        methods = ROUTES.get(request.path)
        if methods is None:
            raise HttpError(404, f"no such resource {request.path[:64]!r}; try /config or /firmware")
        if request.method not in methods:
            raise HttpError(405, f"{request.method} not allowed on {request.path}")
        limits = self.config.limits
        if request.method in WRITE_METHODS and self._keys is None and not limits.plain_writes:
            # Refused from the head alone: no body is read, no 100 Continue is sent.
            self.counters.plain_writes_refused += 1
            log.warning("plain write refused", peer=request.peer, method=request.method, path=request.path)
            raise HttpError(403, PLAIN_WRITE_REFUSAL)
        if request.path == "/firmware" and request.method == "PUT":
            return await self._put_firmware(request, events, start + limits.firmware_timeout_s)
        max_bytes = limits.max_body_bytes + (ENVELOPE_OVERHEAD_BYTES if self.config.encrypt else 0)
        body = await self._read_body(request, events, start + limits.request_timeout_s, max_bytes)
        plaintext = self._unwrap(request, body)
        if request.path == "/firmware":
            firmware = self._firmware
            return 200, _json(dict(firmware.status()) if firmware else {"staged": None}), "application/json"
        if request.method == "GET":
            text = mask_parameter_text(self._api.current_text())
            return 200, text.encode("utf-8"), "text/plain; charset=utf-8"
        return await self._put_config(request, plaintext)

    def _check_length(self, request: _Request, max_bytes: int) -> None:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise HttpError(413, f"body larger than {max_bytes} bytes")

    async def _open_body(self, request: _Request, events: _Reader, deadline: float, max_bytes: int) -> _Body:
        """Check the declared length, let a waiting client send, and start the rate bound."""
        self._check_length(request, max_bytes)
        limits = self.config.limits
        await events.accept_body(limits.header_timeout_s)
        now = asyncio.get_running_loop().time()
        rate = _RateBound(limits.min_body_rate_bytes_s, limits.body_rate_window_s, now)
        return _Body(events, deadline, rate, max_bytes)

    async def _read_body(self, request: _Request, events: _Reader, deadline: float, max_bytes: int) -> bytes:
        body = await self._open_body(request, events, deadline, max_bytes)
        chunks: list[bytes] = []
        for _ in range(max_bytes + 2):  # bounded: each chunk carries at least one byte
            chunk = await body.next_chunk()
            if chunk is None:
                return b"".join(chunks)
            chunks.append(chunk)
        raise HttpError(400, "body too fragmented")

    def _unwrap(self, request: _Request, body: bytes) -> bytes:
        """The plaintext of a request body: checks the envelope when encryption is on."""
        if self._keys is None:
            if is_envelope(body):
                raise HttpError(400, "encrypted body, but fw_server_encrypt=0 on this DCU")
            return body
        if not is_envelope(body):
            raise HttpError(403, "encryption required (fw_server_encrypt=1): send an envelope")
        opened = open_envelope(
            self._keys,
            body,
            request_context(request.method, request.target),
            device_id=self.config.device_id,
        )
        self._check_replay(request, opened.timestamp_s, opened.nonce)
        return opened.plaintext

    def _check_replay(self, request: _Request, timestamp_s: int, nonce: bytes) -> None:
        assert self._guard is not None
        now = time.time()
        try:
            self._guard.check(timestamp_s, nonce, now)
        except ReplayedEnvelopeError as exc:
            self.counters.replays += 1
            log.warning("replayed or stale envelope refused", peer=request.peer, reason=str(exc))
            raise HttpError(403, f"{exc.reason}: {exc}", **self._guard.describe(now)) from None
        except ReplayStateError as exc:
            # Accepting would let this very request be replayed after a restart: refuse it.
            self.counters.replay_state_failures += 1
            log.error("replay state not saved, request refused", peer=request.peer, error=str(exc))
            raise HttpError(
                503, f"{exc.reason}: the DCU cannot store its replay state; nothing changed"
            ) from None
        request.nonce = nonce  # from here on, answers are sealed

    async def _put_config(self, request: _Request, plaintext: bytes) -> tuple[int, bytes, str]:
        try:
            text = plaintext.decode("utf-8")
        except UnicodeDecodeError as exc:
            issue = ConfigIssue("upload", 0, "", f"not UTF-8 text (byte {exc.start})")
            return 422, _json({"ok": False, "errors": issues_json([issue])}), "application/json"
        dry_run = request.query.get("dry_run", "0") not in ("0", "", "false")
        task = asyncio.current_task()
        if task is not None:
            self._applying.add(task)
        try:
            result = await self._api.apply_text(
                text,
                partial=request.method == "PATCH",
                who=request.peer,
                via="config-port",
                authenticated=request.nonce is not None,  # the body came in an envelope whose tag matched
                dry_run=dry_run,
            )
        except ConfigError as exc:
            return 422, _json({"ok": False, "errors": issues_json(exc.issues)}), "application/json"
        except ReloadBusyError as exc:
            raise HttpError(503, str(exc)) from None
        except ParameterWriteError as exc:
            raise HttpError(500, str(exc)) from None
        finally:
            if task is not None:
                self._applying.discard(task)
        return 200, _json(result.to_json()), "application/json"

    async def _put_firmware(
        self, request: _Request, events: _Reader, deadline: float
    ) -> tuple[int, bytes, str]:
        firmware = self._firmware
        assert firmware is not None
        try:
            sha256 = check_sha256(request.headers.get("x-firmware-sha256") or request.query.get("sha256"))
            name = check_name(request.headers.get("x-firmware-name") or request.query.get("name"))
        except FirmwareRejectedError as exc:
            raise HttpError(422, str(exc)) from None
        keys = self._keys
        # Encrypted: the stream header, then the padded file (at most one block more than the file).
        max_bytes = firmware.max_bytes + (STREAM_HEADER_BYTES + BLOCK_BYTES if keys else 0)
        body = await self._open_body(request, events, deadline, max_bytes)
        first = await body.next_chunk()
        if first is None:
            if keys is not None:
                raise HttpError(403, "encryption required (fw_server_encrypt=1): send an envelope")
            raise HttpError(422, "empty firmware file")
        opener: StreamBodyOpener | None = None
        if keys is not None:
            opener, first = await self._open_firmware_stream(request, body, first, keys)
        elif is_envelope(first):
            raise HttpError(400, "encrypted body, but fw_server_encrypt=0 on this DCU")
        # Only now, with the request authenticated (or plain writes allowed), is anything written.
        upload = firmware.begin(sha256, name, request.peer)
        try:
            chunk: bytes | None = first
            for _ in range(max_bytes + 2):  # bounded: each chunk carries at least one byte
                if chunk is None:
                    break
                upload.write(opener.update(chunk) if opener is not None else chunk)
                chunk = await body.next_chunk()
            if opener is not None:
                upload.write(opener.finalize())  # length and SHA-256 against the header, then padding
            record = await asyncio.to_thread(upload.commit)
        except FirmwareRejectedError as exc:
            status = 413 if "larger" in str(exc) else 422
            raise HttpError(status, str(exc)) from None
        finally:
            upload.abort()
        log.info("firmware staged", peer=request.peer, sha256=record.sha256, size_bytes=record.size_bytes)
        if self._event is not None:
            try:
                await self._event(
                    "firmware_staged",
                    f"firmware {record.name} staged ({record.size_bytes} bytes, sha256 {record.sha256})",
                    name=record.name,
                    sha256=record.sha256,
                    size_bytes=record.size_bytes,
                    who=record.who,
                )
            except Exception as exc:  # the file is staged; a failed event must not turn that into an error
                log.error("firmware_staged event not committed", error=repr(exc))
        return 200, _json({"ok": True, "staged": record.to_json()}), "application/json"

    async def _open_firmware_stream(
        self, request: _Request, body: _Body, first: bytes, keys: EnvelopeKeys
    ) -> tuple[StreamBodyOpener, bytes]:
        """Read and authenticate the stream header (tag, then replay rules) before any body byte is
        written; returns the body's opener and the body bytes that came with the header."""
        if not is_envelope(first[:4]) and len(first) >= 4:
            raise HttpError(403, "encryption required (fw_server_encrypt=1): send an envelope")
        head = first
        for _ in range(STREAM_HEADER_BYTES + 1):  # bounded: each chunk carries at least one byte
            if len(head) >= STREAM_HEADER_BYTES:
                break
            chunk = await body.next_chunk()
            if chunk is None:
                break
            head += chunk
        if not is_envelope(head):
            raise HttpError(403, "encryption required (fw_server_encrypt=1): send an envelope")
        if parse_header(head).kind != KIND_STREAM:
            raise MalformedEnvelopeError(
                "PUT /firmware needs a streamed envelope (kind 3: crypto_envelope seal --stream)"
            )
        if len(head) < STREAM_HEADER_BYTES:
            raise MalformedEnvelopeError("body shorter than a stream header")
        stream = open_stream_header(
            keys,
            head[:STREAM_HEADER_BYTES],
            request_context(request.method, request.target),
            device_id=self.config.device_id,
        )
        body_bytes = stream.manifest.body_bytes
        assert self._firmware is not None
        if body_bytes > self._firmware.max_bytes + BLOCK_BYTES:
            raise HttpError(413, f"firmware larger than {self._firmware.max_bytes} bytes")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != STREAM_HEADER_BYTES + body_bytes:
            raise MalformedEnvelopeError("Content-Length does not match the stream header")
        self._check_replay(request, stream.timestamp_s, stream.nonce)
        return StreamBodyOpener(keys, stream.manifest), head[STREAM_HEADER_BYTES:]


class _ListenerLink(Link[asyncio.Server]):
    """The listening socket as the link kernel drives it: bind (retried while the port is taken),
    then serve until stopped."""

    down_message = "cannot listen"
    down_level = "error"

    def __init__(self, service: ConfigPortService, ctx: ServiceContext) -> None:
        self._service = service
        self._ctx = ctx

    def log_fields(self) -> dict[str, object]:
        return {"port": self._service.config.port, "host": self._service.config.host}

    def describe(self, exc: BaseException) -> str:
        return f"{getattr(exc, 'strerror', None) or exc}"

    def connect(self) -> AbstractAsyncContextManager[asyncio.Server]:
        return self._service._listening(self._ctx)

    async def serve(self, server: asyncio.Server) -> str:
        await self._ctx.heartbeat_forever()
        return "closed"

    async def on_down(self, down: LinkDown) -> None:
        self._service._publish("failed", down.error)
        self._ctx.set_ready()  # degraded, not a start failure: meters keep being read


def _parse_request(head: h11.Request, peer: str) -> _Request:
    # h11 bounds only a head that arrives in pieces; one that arrives whole is bounded here.
    if len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers) > MAX_HEAD_BYTES:
        raise HttpError(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
    method = head.method.decode("ascii", errors="replace").upper()
    target = head.target.decode("latin-1")
    parts = urllib.parse.urlsplit(target)
    try:
        query = dict(urllib.parse.parse_qsl(parts.query, max_num_fields=16))
    except ValueError:
        raise HttpError(400, "bad query string") from None
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
    return _Request(method, target, parts.path, query, headers, peer)


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


def _error_body(message: str, **extra: Any) -> bytes:
    return _json({"ok": False, "error": message, **extra})


def build_config_port_services(
    config: LoadedConfig, api: ConfigApi | None, bus: EventBus, event: EventSink
) -> list[Service]:
    """The config port, when enabled (``SERVICE_BUILDERS`` entry); needs the reloader as ``api``."""
    settings = ConfigPortSettings.from_config(config)
    if settings is None or api is None:
        return []
    from dcud.service.ntp import clock_synced

    return [ConfigPortService(settings, api, bus, lambda: clock_synced(bus) is True, event)]
