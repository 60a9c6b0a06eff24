"""dcud/transport/tcp.py: allow-list, per-source limits, socket options read back on loopback, TLS
admission with a bounded handshake, reset-close. Loopback only; every wait bounded."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from dcud.service.tls_banks import self_signed_bank, server_context
from dcud.transport.tcp import (
    Admission,
    AllowList,
    SocketTuning,
    SourceLimits,
    accept_connection,
    accept_forever,
    bound_addresses,
    describe_tls_failure,
    is_loopback,
    listen_socket,
    open_connection,
    open_stream,
    peer_address,
    peer_certificate,
    reset_close,
    source_address,
    source_key,
    start_stream_server,
)

BOUND_S = 10.0
TUNING = SocketTuning(keepalive_idle_s=77, keepalive_interval_s=11, keepalive_count=4, user_timeout_s=12.5)


def test_allow_list_matches_cidr_and_mapped_addresses() -> None:
    allow = AllowList(["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"])
    assert allow.allows("10.200.3.4") and allow.allows("::ffff:10.1.1.1")
    assert allow.allows("2001:db8:1::5") and allow.allows("192.168.1.7")
    assert not allow.allows("192.168.1.8") and not allow.allows("2001:db9::1")
    assert not allow.allows("not-an-address")
    assert AllowList([]).allows("203.0.113.9")


def test_allow_list_with_only_a_typo_allows_nobody() -> None:
    allow = AllowList(["10.0.0.0/99"])
    assert allow.invalid == ["10.0.0.0/99"] and not allow.allows("10.0.0.1")


def test_sources_are_canonical_and_ipv6_counts_per_64() -> None:
    assert source_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_address("fe80::1%eth0") == "fe80::1"
    assert source_key("2001:db8:0:1::7") == source_key("2001:db8:0:1:ffff::1") == "2001:db8:0:1::/64"
    assert source_key("2001:db8:0:2::7") != source_key("2001:db8:0:1::7")
    assert source_key("10.1.2.3") == "10.1.2.3"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("localhost")
    assert peer_address(("::1", 9000, 0, 0)) == ("::1", "[::1]:9000")
    assert peer_address(("10.0.0.1", 9000)) == ("10.0.0.1", "10.0.0.1:9000")


def test_source_limits_count_per_source_and_in_total() -> None:
    limits = SourceLimits(max_total=3, max_per_source=2)
    assert limits.admit("10.0.0.1") is Admission.ADMITTED
    assert limits.admit("::ffff:10.0.0.1") is Admission.ADMITTED  # the same source
    assert limits.admit("10.0.0.1") is Admission.SOURCE_FULL
    assert limits.admit("2001:db8::1") is Admission.ADMITTED
    assert limits.admit("10.0.0.9") is Admission.TOTAL_FULL
    assert limits.in_use == 3 and limits.held_by("10.0.0.1") == 2
    limits.release("10.0.0.1")
    assert limits.admit("2001:db8::2") is Admission.ADMITTED  # the same /64 as 2001:db8::1: its 2nd
    limits.release("10.0.0.1")
    assert limits.admit("2001:db8::3") is Admission.SOURCE_FULL  # a third address of that /64
    for host in ("2001:db8::1", "2001:db8::2"):
        limits.release(host)
    assert limits.in_use == 0 and limits.sources == 0  # nothing kept for sources without a slot


def _options(sock: socket.socket) -> dict[str, int]:
    return {
        "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    }


EXPECTED = {"nodelay": 1, "keepalive": 1, "idle": 77, "interval": 11, "count": 4, "user_timeout_ms": 12500}


async def test_dialled_connection_is_tuned() -> None:
    server = await start_stream_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0, limit=1024)
    try:
        host, port = bound_addresses(server)[0]
        reader, writer = await open_stream(host, port, timeout_s=BOUND_S, tuning=TUNING)
        assert _options(writer.get_extra_info("socket")) == EXPECTED
        writer.close()
        _reader2, writer2 = await open_stream(
            host, port, timeout_s=BOUND_S, tuning=TUNING.without_keepalive()
        )
        assert _options(writer2.get_extra_info("socket"))["keepalive"] == 0
        writer2.close()
        _reader3, writer3 = await open_stream(host, port, timeout_s=BOUND_S)  # no tuning: kernel defaults
        assert _options(writer3.get_extra_info("socket"))["keepalive"] == 0
        writer3.close()
        del reader
    finally:
        server.close()


async def test_stream_server_tunes_accepted_connections() -> None:
    seen: asyncio.Queue[dict[str, int]] = asyncio.Queue()

    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await seen.put(_options(writer.get_extra_info("socket")))
        writer.close()

    server = await start_stream_server(handler, "127.0.0.1", 0, limit=1024, tuning=TUNING)
    try:
        host, port = bound_addresses(server)[0]
        _reader, writer = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(seen.get(), BOUND_S) == EXPECTED
        writer.close()
    finally:
        server.close()


async def test_listener_accepts_tunes_and_resets() -> None:
    listener = listen_socket("127.0.0.1", 0)
    accepted: asyncio.Queue[socket.socket] = asyncio.Queue()
    errors: list[OSError] = []
    acceptor = asyncio.create_task(
        accept_forever(listener, lambda s, _a: accepted.put_nowait(s), errors.append)
    )
    try:
        port = listener.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = await asyncio.wait_for(accepted.get(), BOUND_S)
        TUNING.apply(sock)
        assert _options(sock) == EXPECTED
        reset_close(sock)  # unwanted: RST, no FIN
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(BOUND_S):
                await reader.read(1)
        writer.close()
        assert errors == []
    finally:
        acceptor.cancel()
        listener.close()


async def test_listen_on_every_interface_takes_ipv4_clients() -> None:
    listener = listen_socket("", 0)
    try:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
        client.close()
    finally:
        listener.close()


async def test_tls_admission_bounds_the_handshake(tmp_path: Path) -> None:
    context = server_context(self_signed_bank(tmp_path, "dcu-test"))
    listener = listen_socket("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    port = listener.getsockname()[1]
    silent = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)  # never says hello
    try:
        sock, _address = await asyncio.wait_for(loop.sock_accept(listener), BOUND_S)
        with pytest.raises((TimeoutError, ConnectionError)) as info:
            await asyncio.wait_for(
                accept_connection(sock, asyncio.Protocol, ssl_context=context, handshake_timeout_s=0.05),
                BOUND_S,
            )
        assert describe_tls_failure(info.value) in ("handshake timeout", str(info.value))
        sock.close()
    finally:
        silent.close()
        listener.close()


async def test_plain_admission_has_no_peer_certificate() -> None:
    listener = listen_socket("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        port = listener.getsockname()[1]
        transport_c, _ = await open_connection("127.0.0.1", port, asyncio.Protocol, timeout_s=BOUND_S)
        sock, _address = await asyncio.wait_for(loop.sock_accept(listener), BOUND_S)
        transport = await accept_connection(sock, asyncio.Protocol)
        assert peer_certificate(transport) is None
        transport.close()
        transport_c.close()
    finally:
        listener.close()
