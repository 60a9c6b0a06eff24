"""TCP for every service that listens or dials: socket tuning, admission, TLS, listeners, connects.

The transparent ports (:mod:`dcud.service.bridge`), the EI client, the config port, the device-manager
push and the connectivity probe used to carry their own socket code; it lives here now, once, and
knows no protocol (design.md rule 2). The DLMS/TCP meter client dials with :func:`open_connection`.

Socket tuning (:class:`SocketTuning`)
    TCP_NODELAY (a meter protocol is request/response: never wait for more bytes), TCP keepalive
    (``keepalive_idle_s``, ``keepalive_interval_s``, ``keepalive_count``: a silent dead peer is found
    in ``idle + interval x count`` seconds) and TCP_USER_TIMEOUT (``user_timeout_s``: data we sent
    that the peer does not acknowledge for that long ends the connection). Options the kernel does not
    have are skipped: tuning never fails a connection.
Admission
    :class:`AllowList` (source networks in CIDR; IPv4-mapped IPv6 counts as IPv4; an invalid entry
    matches nothing, so a typo narrows access and never widens it). :class:`SourceLimits`: at most
    ``max_total`` connections (or handshakes) at once and at most ``max_per_source`` of them from one
    source, where a source is an IPv4 address or an IPv6 /64 (:func:`source_key`: one subscriber
    holds a whole /64 to pick addresses from). :func:`reset_close` drops an unwanted connection with
    an RST, so it leaves no TIME_WAIT state behind.
TLS admission
    :func:`accept_connection` wraps an accepted socket in a transport, with the TLS handshake bounded
    by ``handshake_timeout_s``; :func:`peer_certificate` is the verified client certificate's subject
    and issuer (the peer's identity), :func:`describe_tls_failure` the short reason of a failed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ipaddress
import itertools
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("dcud.tcp")

__all__ = [
    "Admission",
    "AllowList",
    "PeerCertificate",
    "SocketTuning",
    "SourceLimits",
    "accept_connection",
    "accept_forever",
    "bound_addresses",
    "describe_tls_failure",
    "is_loopback",
    "linger_close",
    "listen_socket",
    "open_connection",
    "open_stream",
    "peer_address",
    "peer_name",
    "reset_close",
    "source_address",
    "source_key",
    "start_stream_server",
]

IPV6_SOURCE_PREFIX = 64
"""IPv6 sources are counted per /64: one host usually holds a whole /64 and picks addresses in it."""
LISTEN_BACKLOG = 64
ACCEPT_RETRY_S = 0.1
"""After a failed accept (EMFILE, ENFILE, ENOBUFS...): how long the listener rests before the next one."""
LINGER_S = 1.0
"""After the answer: how long :func:`linger_close` reads and drops what a client still sends."""

# Linux values, for Python builds that do not name them.
_TCP_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", 4)
_TCP_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", 5)
_TCP_KEEPCNT = getattr(socket, "TCP_KEEPCNT", 6)
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


# -- socket tuning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SocketTuning:
    """The options every long-lived TCP connection of dcud gets (module docstring)."""

    nodelay: bool = True
    keepalive: bool = True
    """False: SO_KEEPALIVE off (the EI client's ``ei_client_top_keepalive = 0``)."""
    keepalive_idle_s: int = 60
    keepalive_interval_s: int = 10
    keepalive_count: int = 3
    user_timeout_s: float = 30.0
    """TCP_USER_TIMEOUT; 0: the kernel's default (retransmissions for about 15 minutes)."""

    def options(self) -> list[tuple[int, int, int]]:
        """``(level, option, value)`` for ``setsockopt``, in the order they are set."""
        options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.nodelay))]
        if self.keepalive:
            options += [
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                (socket.IPPROTO_TCP, _TCP_KEEPIDLE, self.keepalive_idle_s),
                (socket.IPPROTO_TCP, _TCP_KEEPINTVL, self.keepalive_interval_s),
                (socket.IPPROTO_TCP, _TCP_KEEPCNT, self.keepalive_count),
            ]
        else:
            options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0))
        options.append((socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(self.user_timeout_s * 1000)))
        return options

    def apply(self, sock: Any) -> None:
        """Set the options on ``sock`` (a socket, or asyncio's TransportSocket); never raises."""
        for level, name, value in self.options():
            with contextlib.suppress(OSError):
                sock.setsockopt(level, name, value)

    def apply_to(self, transport: asyncio.BaseTransport) -> None:
        """:meth:`apply` on a transport's socket, when it has one."""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.apply(sock)

    def without_keepalive(self) -> SocketTuning:
        """The same with SO_KEEPALIVE off."""
        return dataclasses.replace(self, keepalive=False)


# -- sources: allow-list, identity, limits -------------------------------------------------------


def source_address(host: str) -> str:
    """The canonical form of a peer address (IPv4-mapped IPv6 as IPv4, no zone): a session's identity."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def source_key(host: str) -> str:
    """What the per-source limits count: the IPv4 address, or the IPv6 /64 network."""
    canonical = source_address(host)
    if ":" in canonical:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_network(f"{canonical}/{IPV6_SOURCE_PREFIX}", strict=False))
    return canonical


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address) is a loopback address; a name or garbage is not."""
    try:
        return ipaddress.ip_address(source_address(host)).is_loopback
    except ValueError:
        return False


class AllowList:
    """Source networks allowed to connect (empty: everybody); IPv4-mapped IPv6 counts as IPv4.

    An entry that is no address/network matches nothing (logged): a typo narrows access, never widens it.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.invalid: list[str] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.invalid.append(entry)
        if self.invalid:
            log.error("allow-list entries that match nothing", entries=self.invalid)

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an address string) may connect."""
        if not self.networks and not self.invalid:
            return True
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.networks)


class Admission(enum.Enum):
    """What :meth:`SourceLimits.admit` decided."""

    ADMITTED = "admitted"
    TOTAL_FULL = "total_full"
    """``max_total`` are in use."""
    SOURCE_FULL = "source_full"
    """``max_per_source`` are in use by this connection's source."""


class SourceLimits:
    """At most ``max_total`` slots at once, at most ``max_per_source`` per :func:`source_key`.

    A slot is whatever the caller counts: a connection (the config port) or a connection in
    admission (the transparent ports count TLS handshakes). The table holds only sources with a
    slot in use, so it is bounded by ``max_total``.
    """

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.in_use = 0
        self._by_source: dict[str, int] = {}

    def admit(self, host: str) -> Admission:
        """Take a slot for a connection from ``host`` when both limits allow it."""
        if self.in_use >= self.max_total:
            return Admission.TOTAL_FULL
        key = source_key(host)
        held = self._by_source.get(key, 0)
        if held >= self.max_per_source:
            return Admission.SOURCE_FULL
        self._by_source[key] = held + 1
        self.in_use += 1
        return Admission.ADMITTED

    def release(self, host: str) -> None:
        """Give back the slot :meth:`admit` gave to ``host``."""
        key = source_key(host)
        left = self._by_source.get(key, 0) - 1
        if left > 0:
            self._by_source[key] = left
        else:
            self._by_source.pop(key, None)
        self.in_use = max(0, self.in_use - 1)

    def held_by(self, host: str) -> int:
        """Slots in use by ``host``'s source."""
        return self._by_source.get(source_key(host), 0)

    @property
    def sources(self) -> int:
        """Sources with a slot in use."""
        return len(self._by_source)

    @property
    def by_source(self) -> dict[str, int]:
        """Slots in use per source key (a copy)."""
        return dict(self._by_source)


def peer_address(address: Any) -> tuple[str, str]:
    """``(host, "host:port")`` of an address tuple from ``accept`` (IPv6 in brackets)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        shown = f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
        return host, shown
    return "", str(address)


def peer_name(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """``(host, "host:port")`` of a socket transport's peer (IPv6 in brackets)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return peer_address(peer)
    return "", str(peer)


# -- listening -----------------------------------------------------------------------------------


def listen_socket(host: str, port: int, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A non-blocking listening socket on ``host`` (an address), or on every interface for ``""``
    (IPv6 dual-stack where the host has IPv6, IPv4 otherwise)."""
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    elif socket.has_dualstack_ipv6():
        try:
            sock = socket.create_server(
                ("", port), family=socket.AF_INET6, backlog=backlog, dualstack_ipv6=True
            )
        except OSError:  # IPv6 disabled on this host
            sock = socket.create_server(("", port), family=socket.AF_INET, backlog=backlog)
    else:
        sock = socket.create_server(("", port), family=socket.AF_INET, backlog=backlog)
    sock.setblocking(False)
    return sock


async def accept_forever(
    listener: socket.socket,
    on_accept: Callable[[socket.socket, Any], None],
    on_error: Callable[[OSError], None],
) -> None:
    """Accept connections until cancelled; ``on_accept(sock, address)`` decides about each at once,
    before asyncio (or TLS) ever reads from it. A failed accept (out of descriptors...) is reported
    to ``on_error`` and the listener rests :data:`ACCEPT_RETRY_S` instead of spinning."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock, address = await loop.sock_accept(listener)
        except OSError as exc:
            on_error(exc)
            await asyncio.sleep(ACCEPT_RETRY_S)
            continue
        on_accept(sock, address)


def reset_close(sock: socket.socket) -> None:
    """Close at once with a reset: no FIN_WAIT/TIME_WAIT state kept for an unwanted connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def start_stream_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str | None,
    port: int,
    *,
    limit: int,
    tuning: SocketTuning | None = None,
    owner: str = "dcud",
) -> asyncio.Server:
    """asyncio's stream server on ``host`` (None: every interface), each connection tuned first.

    asyncio runs each handler in a task of its own; it is named ``dcud[<owner>:conn-<n>]``.
    """
    numbers = itertools.count(1)

    async def tuned(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"dcud[{owner}:conn-{next(numbers)}]")
        if tuning is not None:
            tuning.apply_to(writer.transport)
        await handler(reader, writer)

    return await asyncio.start_server(tuned, host, port, reuse_address=True, limit=limit)


def bound_addresses(server: asyncio.Server) -> list[tuple[str, int]]:
    """``(host, port)`` of every socket a server listens on."""
    return [(str(sock.getsockname()[0]), int(sock.getsockname()[1])) for sock in server.sockets]


async def linger_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read and drop what the client still sends (a refused body) for a moment, so
    that the kernel does not reset the connection before the client has read the answer."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            for _ in range(64):
                if not await reader.read(64 * 1024):
                    return


# -- TLS admission -------------------------------------------------------------------------------


async def accept_connection(
    sock: socket.socket,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    ssl_context: ssl.SSLContext | None = None,
    handshake_timeout_s: float = 10.0,
) -> asyncio.Transport:
    """The transport of an accepted socket, after its TLS handshake (bounded) when TLS is on.

    Raises ``ssl.SSLError``, ``OSError``, ``TimeoutError``... when the handshake fails; the caller
    closes the socket then.
    """
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(
        protocol_factory,
        sock,
        ssl=ssl_context,
        ssl_handshake_timeout=handshake_timeout_s if ssl_context is not None else None,
    )
    return transport


@dataclass(frozen=True)
class PeerCertificate:
    """The identity a verified client certificate proves."""

    subject: str
    issuer: str


def peer_certificate(transport: asyncio.BaseTransport) -> PeerCertificate | None:
    """The peer's certificate, when it sent one (only a verified one is ever returned by ssl)."""
    cert = transport.get_extra_info("peercert")
    if not isinstance(cert, dict) or not cert:
        return None
    return PeerCertificate(_dn(cert.get("subject")), _dn(cert.get("issuer")))


def _dn(rdns: Any) -> str:
    parts = []
    for rdn in rdns or ():
        for key, value in rdn:
            parts.append(f"{key}={value}")
    return ",".join(parts)


def describe_tls_failure(exc: BaseException) -> str:
    """Short reason of a failed handshake (or accept) for logs and counters."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return "handshake timeout"
    return str(exc) or type(exc).__name__


# -- dialling ------------------------------------------------------------------------------------


async def open_connection(
    host: str,
    port: int,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    timeout_s: float,
    tuning: SocketTuning | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Dial ``host:port`` (TCP, then TLS when ``ssl_context``) within ``timeout_s``, then tune it.

    ``server_hostname`` defaults to ``host`` with TLS (the name the certificate must carry).
    Raises ``OSError``/``ssl.SSLError`` from the connect and ``TimeoutError`` after ``timeout_s``.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        transport, protocol = await loop.create_connection(
            protocol_factory,
            host,
            port,
            ssl=ssl_context,
            server_hostname=(server_hostname or host) if ssl_context is not None else None,
        )
    if tuning is not None:
        tuning.apply_to(transport)
    return transport, protocol


async def open_stream(
    host: str,
    port: int,
    *,
    timeout_s: float,
    tuning: SocketTuning | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    limit: int = 64 * 1024,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`open_connection` as asyncio streams."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    transport, protocol = await open_connection(
        host,
        port,
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
        timeout_s=timeout_s,
        tuning=tuning,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer
