"""dcud/transport/udp.py on loopback: a datagram sent by name and by address (IPv4, IPv6), a connected
exchange that ignores other senders, the throw-away sink. Every wait bounded."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from dcud.transport.udp import SAFE_PAYLOAD_BYTES, connected_socket, loopback_sink, resolve, send_datagram


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)
    try:
        yield sock
    finally:
        sock.close()


def localhost_problem() -> str:
    """Why the name ``localhost`` cannot be used here ("" when it resolves to 127.0.0.1 first)."""
    try:
        infos = socket.getaddrinfo("localhost", 9, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        return f"'localhost' does not resolve on this machine ({exc}; no /etc/hosts, e.g. a bare chroot)"
    first = infos[0][4][0]
    return "" if first == "127.0.0.1" else f"'localhost' resolves to {first} first, not 127.0.0.1"


async def test_send_by_address(receiver: socket.socket) -> None:
    port = receiver.getsockname()[1]
    await send_datagram("127.0.0.1", port, b"one")
    await send_datagram("127.0.0.1", port, b"x" * SAFE_PAYLOAD_BYTES)
    assert receiver.recv(4096) == b"one"
    assert receiver.recv(4096) == b"x" * SAFE_PAYLOAD_BYTES


async def test_send_by_name(receiver: socket.socket) -> None:
    problem = localhost_problem()
    if problem and not os.environ.get("CI"):  # CI runs on a whole Debian machine and never skips
        pytest.skip(f"sending by name needs a resolvable localhost: {problem}")
    port = receiver.getsockname()[1]
    await send_datagram("localhost", port, b"x" * SAFE_PAYLOAD_BYTES)
    assert receiver.recv(4096) == b"x" * SAFE_PAYLOAD_BYTES


@pytest.mark.skipif(
    not has_ipv6_loopback() and not os.environ.get("CI"),
    reason="no IPv6 loopback in this network namespace; CI has one and never skips",
)
async def test_send_over_ipv6() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        sock.settimeout(5.0)
        await send_datagram("::1", sock.getsockname()[1], b"six")
        assert sock.recv(64) == b"six"


async def test_resolve_gives_the_family_and_address() -> None:
    family, sockaddr = await resolve("127.0.0.1", 9)
    assert family == socket.AF_INET and sockaddr == ("127.0.0.1", 9)


def test_a_connected_socket_hears_only_its_server(receiver: socket.socket) -> None:
    server_port = receiver.getsockname()[1]
    with connected_socket("127.0.0.1", server_port) as sock, loopback_sink() as (_host, _port):
        sock.settimeout(5.0)
        sock.send(b"request")
        data, client = receiver.recvfrom(64)
        assert data == b"request"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"spoofed", client)  # another port: the kernel drops it
        receiver.sendto(b"answer", client)
        assert sock.recv(64) == b"answer"


def test_the_loopback_sink_takes_datagrams_and_goes_away() -> None:
    with loopback_sink() as (host, port):
        assert host == "127.0.0.1" and port > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"warm-up", (host, port))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, port))  # the port is free again
