"""Hostile clients against the running daemon's transparent port (``python -m dcud run``, real Mosquitto).

The port serves TLS with optional client certificates (``tm.verify=1``), so both identities are in
play: a certified client is known by its certificate, the others by their source address. Two sources
on loopback, 127.0.0.1 and 127.0.0.2. Three fixed batches (no randomness; every loop bounded):

A. takeover attempts against a session of 127.0.0.1 without a certificate: from 127.0.0.2, and with
   certificates from either address (all refused); then 127.0.0.1 itself (takes over);
B. takeover attempts against a session of certificate ``hes-good``: another subject, no certificate from
   the same address, a CA the port does not trust (all refused); then ``hes-good`` from the other
   address (takes over);
C. a handshake flood from 127.0.0.2 (garbage instead of a ClientHello, then connections that never
   send one) while 127.0.0.1 connects, three times, and bridges.

After each batch a session bridges bytes to the line, the daemon runs, and its log shows no service
failure (the supervisor logs each one, ``service failed``); at the end the retained ``bridge/tm`` state
has the counts. The summary (inputs, refusals, takeovers) is printed for SECURITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from dcud.sim.peers import Mosquitto, free_port

from helpers.bridge import PtyDevice, connect, read_exactly
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.meters import SocatPair, wait_until
from helpers.pki import Pki, client_ssl_context, make_pki

pytestmark = pytest.mark.slow
PREFIX = "dcu/dcu-test"
OTHER = ("127.0.0.2", 0)
BUSY = b"BUSY transparent port in use\r\n"
REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError, TimeoutError)


async def retained(port: int, topic: str, timeout_s: float = 10.0) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"probe-{time.monotonic_ns()}") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return dict(json.loads(message.payload))
    raise AssertionError("unreachable")


class Daemon:
    """The running daemon, its port and the checks made after every batch."""

    def __init__(self, proc: Any, config: Path, port: int, pki: Pki, device: PtyDevice) -> None:
        self.proc = proc
        self.config = config
        self.port = port
        self.pki = pki
        self.device = device

    async def tls(
        self, cert: Path | None, local: tuple[str, int] | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await connect(
            self.port, ssl=client_ssl_context(self.pki, cert), server_hostname="localhost", local_addr=local
        )

    async def refused(self, cert: Path | None, local: tuple[str, int] | None) -> str:
        """One takeover attempt that must not get the line: ``busy`` or ``tls`` (handshake refused)."""
        try:
            reader, writer = await self.tls(cert, local)
        except REFUSED:
            return "tls"
        try:
            writer.write(b"INTRUDER")
            answer = await asyncio.wait_for(reader.read(), 10)
        except REFUSED:
            return "tls"  # TLS 1.3: a refused client certificate shows after the client's handshake
        finally:
            writer.close()
        assert answer in (BUSY, b""), answer
        # Closed without a word: the server refused the certificate after the client's side of a
        # TLS 1.3 handshake was done (the client learns it from the end of the stream).
        return "busy" if answer == BUSY else "tls"

    async def healthy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes) -> None:
        """The session bridges bytes, the daemon runs, no service has failed."""
        payload = b"\x00\xff" + tag + bytes(range(256))
        writer.write(payload)
        await writer.drain()
        assert await read_exactly(reader, len(payload), 15) == payload
        assert self.proc.poll() is None, daemon_log(self.config)[-3000:]
        log = daemon_log(self.config)
        assert "service failed" not in log and "Traceback" not in log, log[-3000:]
        assert b"INTRUDER" not in bytes(self.device.received)


def _still_open(sock: socket.socket) -> bool:
    """Not closed by the port: no end of stream and no reset (a TLS alert before the close is read)."""
    for _ in range(100):  # bounded: an alert is a few bytes
        try:
            if sock.recv(4096, socket.MSG_DONTWAIT) == b"":
                return False
        except BlockingIOError:
            return True
        except OSError:
            return False
    return True


async def test_takeover_attempts_and_handshake_floods_against_the_daemon(
    tmp_path: Path, broker: Mosquitto
) -> None:
    site = tmp_path / "site"
    pki = make_pki(site)  # banks in site/state/certbank: 10 = the DCU, 20 = the head-ends' CA
    pair = SocatPair(tmp_path / "a", tmp_path / "b")
    pair.start()
    port = free_port()
    toml = (
        '[transparent]\nlisten = "loopback"\nhandshake_timeout_s = 60\n'
        f'[[line]]\nname = "rs485-1"\ndevice = "{pair.a}"\nkind = "rs232"\nbaud = 9600\n'
        'framing = "8N1"\ntransparent = "primary"\n'
    )
    wme = (
        f"tm_server_port={port}\ntm2.port={free_port()}\nfw_server_port={free_port()}\n"
        "tm.tls_enable=1\ntm.cert=10\ntm.ca_cert=20\ntm.verify=1\n"
    )
    config = write_site(site, mqtt_url=broker.url, toml_extra=toml, wme=wme)
    device = PtyDevice(pair.b)
    device.start()
    proc = start_daemon(config)
    d = Daemon(proc, config, port, pki, device)
    summary: dict[str, Any] = {}
    silent: list[socket.socket] = []
    try:
        for _ in range(400):  # bounded: up to 20 s for the port to listen
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            assert proc.poll() is None, daemon_log(config)[-3000:]
            await asyncio.sleep(0.05)

        # A. the session of 127.0.0.1 without a certificate: its address is its identity.
        r1, w1 = await d.tls(None)
        await d.healthy(r1, w1, b"A0")
        attempts_a = [(None, OTHER)] * 20 + [(pki.client_good, OTHER)] * 5 + [(pki.client_revoked, None)] * 5
        outcomes_a = [await d.refused(cert, local) for cert, local in attempts_a]
        assert outcomes_a == ["busy"] * 30
        await d.healthy(r1, w1, b"A1")
        r2, w2 = await d.tls(None)  # the same source: takes over
        await d.healthy(r2, w2, b"A2")
        assert await asyncio.wait_for(r1.read(), 10) == b""
        summary["A"] = {"inputs": len(attempts_a) + 1, "refused": outcomes_a.count("busy"), "taken_over": 1}

        # B. the session of certificate hes-good (from 127.0.0.2): the certificate is its identity.
        w2.close()
        r3, w3 = await d.tls(pki.client_good, OTHER)
        await d.healthy(r3, w3, b"B0")
        attempts_b = (
            [(pki.client_revoked, OTHER)] * 5
            + [(pki.client_revoked, None)] * 5
            + [(None, OTHER)] * 10
            + [(pki.client_foreign, OTHER)] * 5
        )
        outcomes_b = [await d.refused(cert, local) for cert, local in attempts_b]
        assert outcomes_b == ["busy"] * 20 + ["tls"] * 5
        await d.healthy(r3, w3, b"B1")
        r4, w4 = await d.tls(pki.client_good)  # the same certificate from the other address: takes over
        await d.healthy(r4, w4, b"B2")
        assert await asyncio.wait_for(r3.read(), 10) == b""
        summary["B"] = {
            "inputs": len(attempts_b) + 1,
            "refused": outcomes_b.count("busy"),
            "handshake_refused": outcomes_b.count("tls"),
            "taken_over": 1,
        }
        w4.close()

        # C. a handshake flood from 127.0.0.2 while 127.0.0.1 connects.
        for index in range(250):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(OTHER)
            silent.append(sock)
            # The connection is up before the port accepts it; the port may reset it at once.
            with contextlib.suppress(ConnectionError):
                sock.connect(("127.0.0.1", port))
            if index < 50:  # garbage instead of a ClientHello (the port may have reset it already)
                with contextlib.suppress(ConnectionError):
                    sock.sendall(b"\x16\x03\x01\xff\xff" + bytes(range(64)) * 4)
        for round_ in range(3):
            reader, writer = await d.tls(pki.client_good)
            await d.healthy(reader, writer, b"C%d" % round_)
            writer.close()
        # The two handshakes 127.0.0.2 may have pending are still pending (60 s handshake bound):
        # 127.0.0.1 got in while they held their slots. Every other flood connection was closed.
        await wait_until(lambda: sum(_still_open(s) for s in silent) == 2, 15)
        summary["C"] = {"inputs": len(silent) + 3, "connected_from_the_other_source": 3}

        # The retained state has the counts; the status is online, the same process all along.
        def counters_reached(state: dict[str, Any]) -> bool:
            return state.get("sessions", 0) >= 7 and state.get("refused_identity", 0) >= 50

        state: dict[str, Any] = {}
        for _ in range(40):  # bounded: the state is published at most once a second
            state = await retained(broker.port, f"{PREFIX}/bridge/tm/state")
            if counters_reached(state):
                break
            await asyncio.sleep(0.25)
        assert state["state"] == "listening"
        assert state["refused_identity"] == 50 and state["refused_busy"] == 0
        assert state["taken_over"] == 2 and state["sessions"] == 7
        assert state["dropped_pending"] == 0
        # TLS failures before C: the start-up probe (connected and closed) and B's 5 foreign certificates.
        earlier_tls_failures = 1 + 5
        flood_refused = state["dropped_pending_source"] + state["tls_failures"] - earlier_tls_failures
        assert flood_refused == 248  # all 250 but the two pending ones
        status = await retained(broker.port, f"{PREFIX}/status")
        assert status["state"] == "online"
        restarts = status.get("restarts")  # the status document's service-restart count, where it has one
        if isinstance(restarts, dict):
            assert not any(restarts.values()), restarts
        elif restarts is not None:
            assert restarts == 0, restarts
        summary["C"]["dropped_pending_source"] = state["dropped_pending_source"]
        summary["C"]["tls_failures"] = state["tls_failures"] - earlier_tls_failures
        summary["counters"] = {k: v for k, v in state.items() if isinstance(v, int)}
        summary["crashes"] = 0 if proc.poll() is None else 1
        summary["service_failures_logged"] = daemon_log(config).count("service failed")
        print("SUMMARY " + json.dumps(summary))
    finally:
        for sock in silent:
            sock.close()
        proc.terminate()
        with contextlib.suppress(Exception):
            proc.wait(20)
        device.stop()
        pair.kill()
    assert proc.returncode == 0, daemon_log(config)[-3000:]
