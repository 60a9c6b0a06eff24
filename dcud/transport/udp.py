"""UDP for every service that sends datagrams: resolution, one-shot sends, connected exchanges, sinks.

The event push (:mod:`dcud.service.eventpush`, and through it the power service's last gasp), the NTP
client (:mod:`dcud.service.ntp`) and the SNMP notifier's warm-up (:mod:`dcud.service.snmp`) used to carry
their own socket code; it lives here, once, and knows no protocol (design.md rule 2). SNMP's own traffic
goes through pysnmp's transport; the ICMP echo of the connectivity watchdog is no UDP.

- :func:`send_datagram`: resolve with the event loop's resolver and hand one datagram to the kernel
  (never blocks; a host name may take a DNS lookup: bound it with ``asyncio.timeout``);
- :func:`connected_socket`: a blocking socket connected to one server, for a request/answer exchange in
  a worker thread: the kernel then drops datagrams from any other address or port;
- :func:`loopback_sink`: a throw-away socket on loopback that receives and keeps nothing;
- :data:`SAFE_PAYLOAD_BYTES`: the largest payload that crosses any path unfragmented.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any, Final

__all__ = ["SAFE_PAYLOAD_BYTES", "connected_socket", "loopback_sink", "resolve", "send_datagram"]

SAFE_PAYLOAD_BYTES: Final = 1200
"""Fits one datagram on any path whose MTU is at least 1280 bytes (the IPv6 minimum): 1280 minus the
IPv6 and UDP headers, with room for tunnel overhead."""


async def resolve(host: str, port: int) -> tuple[int, Any]:
    """``(family, sockaddr)`` of the first UDP address of ``host``; ``OSError`` when there is none."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, _type, _proto, _canon, sockaddr = infos[0]
    return family, sockaddr


async def send_datagram(host: str, port: int, payload: bytes) -> None:
    """Send ``payload`` as one datagram to ``host:port``; raises ``OSError`` (resolution, no route...)."""
    family, sockaddr = await resolve(host, port)
    with socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as sock:
        sock.setblocking(False)
        sock.sendto(payload, sockaddr)


def connected_socket(host: str, port: int) -> socket.socket:
    """A blocking UDP socket connected to ``host:port`` (blocking resolution: call it in a thread).

    Datagrams from any other address or port are dropped by the kernel; an ICMP port unreachable
    surfaces as ``ConnectionRefusedError`` on the next receive. The caller closes it.
    """
    family, _type, _proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def loopback_sink(ipv6: bool = False) -> Iterator[tuple[str, int]]:
    """A socket bound on loopback (``::1`` or ``127.0.0.1``, a free port) for as long as the block
    runs; yields ``(address, port)``. Whatever is sent there is never read."""
    family, loopback = (socket.AF_INET6, "::1") if ipv6 else (socket.AF_INET, "127.0.0.1")
    with socket.socket(family, socket.SOCK_DGRAM) as sink:
        sink.bind((loopback, 0))
        yield loopback, sink.getsockname()[1]
