"""Admission on the transparent ports: who may take a running session over, and pending handshakes per source.

Two sources on loopback: 127.0.0.1 and 127.0.0.2 (both local on Linux; the port listens on 127.0.0.1 and
the client binds its end to the other address).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path

from dcud.service.bridge import TlsSettings

from helpers.bridge import PtyDevice, bridge_harness, closed_by_peer, connect, read_exactly
from helpers.meters import wait_until
from helpers.pki import REFUSED, Pki, client_ssl_context, make_pki

OTHER = ("127.0.0.2", 0)
BUSY = b"BUSY transparent port in use\r\n"


def test_source_identity_and_admission_keys() -> None:
    from dcud.service.bridge import source_address, source_key

    assert source_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_address("fe80::1%eth0") == "fe80::1"
    assert source_address("2001:DB8::0001") == "2001:db8::1"
    assert source_key("10.1.2.3") == "10.1.2.3"
    assert source_key("::ffff:10.1.2.3") == "10.1.2.3"
    # One IPv6 host holds a /64 and may pick any address in it: it is one source for admission.
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::7") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("not-an-address") == "not-an-address"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await read_exactly(reader, len(payload), 10)


async def test_takeover_from_another_address_is_refused_and_the_session_goes_on(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path, bridge={"second_client": "takeover"}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        r1, w1 = await connect(h.port)
        assert await _echo(r1, w1, b"head-end") == b"head-end"
        for attempt in range(3):
            r2, w2 = await connect(h.port, local_addr=OTHER)
            w2.write(b"INTRUDER %d" % attempt)
            assert await asyncio.wait_for(r2.read(), 10) == BUSY
            w2.close()
            assert await _echo(r1, w1, b"still %d" % attempt) == b"still %d" % attempt
        assert h.bridge.counters["refused_identity"] == 3
        assert h.bridge.counters["taken_over"] == 0
        assert b"INTRUDER" not in bytes(device.received)
        assert h.audits() == []  # refused clients never became sessions
        # The same source may take over (a head-end whose old connection died without a FIN).
        r3, w3 = await connect(h.port)
        assert await _echo(r3, w3, b"again") == b"again"
        assert await asyncio.wait_for(r1.read(), 10) == b""
        (record,) = await h.wait_audits(1)
        assert record["reason"] == "taken_over" and record["detail"].startswith("by 127.0.0.1:")
        assert h.bridge.counters["taken_over"] == 1
        w3.close()
        w1.close()
        device.stop()


async def test_refuse_policy_refuses_the_same_address_too(tmp_path: Path) -> None:
    async with bridge_harness(tmp_path, bridge={"second_client": "refuse"}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        r1, w1 = await connect(h.port)
        assert await _echo(r1, w1, b"one") == b"one"
        for local in (None, OTHER):
            r2, w2 = await connect(h.port, local_addr=local)
            assert await asyncio.wait_for(r2.read(), 10) == BUSY
            w2.close()
        assert h.bridge.counters["refused_busy"] == 2 and h.bridge.counters["refused_identity"] == 0
        w1.close()
        device.stop()


async def _tls(
    port: int, pki: Pki, cert: Path | None, local: tuple[str, int] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await connect(
        port, ssl=client_ssl_context(pki, cert), server_hostname="localhost", local_addr=local
    )


async def test_with_client_certificates_only_the_same_subject_takes_over(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    # Optional client certificates: a certified client is known by its certificate, the others by address.
    tls = TlsSettings(enabled=True, cert_bank=10, ca_bank=20, verify="optional")
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(pki.state_dir)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        r1, w1 = await _tls(h.port, pki, pki.client_good)
        assert await _echo(r1, w1, b"certified") == b"certified"
        refused = [
            (pki.client_revoked, None),  # another subject of the same CA (no CRL here): valid, not the same
            (pki.client_revoked, OTHER),
            (None, None),  # the same address without a certificate is not the certificate's holder
            (None, OTHER),
        ]
        for cert, local in refused:
            r2, w2 = await _tls(h.port, pki, cert, local)
            w2.write(b"INTRUDER")
            assert await asyncio.wait_for(r2.read(), 10) == BUSY
            w2.close()
        # A certificate of a CA the port does not trust never gets past the handshake.
        with contextlib.suppress(*REFUSED):
            r2, w2 = await _tls(h.port, pki, pki.client_foreign)
            w2.write(b"INTRUDER")
            assert await closed_by_peer(r2, 10)
        assert await _echo(r1, w1, b"still mine") == b"still mine"
        assert h.bridge.counters["refused_identity"] == len(refused)
        # The same certificate takes over, from any address.
        r3, w3 = await _tls(h.port, pki, pki.client_good, OTHER)
        assert await _echo(r3, w3, b"the same hes") == b"the same hes"
        (record,) = await h.wait_audits(1)
        assert record["reason"] == "taken_over" and record["client_cert"] == "commonName=hes-good"
        assert b"INTRUDER" not in bytes(device.received)
        w3.close()
        w1.close()
        device.stop()


async def test_a_handshake_flood_from_one_source_does_not_keep_another_out(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tls = TlsSettings(enabled=True)
    bridge = {"tls": tls, "state_dir": str(state), "max_pending": 8, "handshake_timeout_s": 30.0}
    async with bridge_harness(tmp_path, bridge=bridge) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        # 40 connections from 127.0.0.2 that never send a ClientHello: they would hold their
        # handshake slots for 30 s. At most max_pending_per_source (2) of them get one.
        silent: list[socket.socket] = []
        for _ in range(40):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(OTHER)
            silent.append(sock)
            with contextlib.suppress(ConnectionError):
                sock.connect(("127.0.0.1", h.port))
        await wait_until(lambda: sum(_still_open(s) for s in silent) == h.bridge._pending > 0, 10)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for round_ in range(3):  # 127.0.0.1 gets in while the flood's handshakes are still pending
            reader, writer = await connect(h.port, ssl=ctx)
            assert await _echo(reader, writer, b"honest %d" % round_) == b"honest %d" % round_
            writer.close()
            await h.wait_audits(round_ + 1)
        assert sum(_still_open(s) for s in silent) == 2
        assert h.bridge._pending_by_source == {"127.0.0.2": 2}
        assert h.bridge.counters["dropped_pending_source"] == 38
        assert h.bridge.counters["dropped_pending"] == 0
        for sock in silent:
            sock.close()
        device.stop()


def _still_open(sock: socket.socket) -> bool:
    """Not closed by the port (no end of stream, no reset)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
