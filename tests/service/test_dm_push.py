"""Device-manager push against a real TCP/TLS server on loopback: framing, content, certificate banks,
verify modes 0/1/2 and a client certificate; with mandatory verification nothing reaches an unverified
server."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service.dm_push import DmPushConfig, DmPushService
from dcud.service.tls_banks import bank_path

from helpers.certs import make_cert
from helpers.meters import wait_until
from helpers.tls_capture import capture_server, server_context


@dataclass
class DmServer:
    port: int = 0
    connections: list[list[bytes]] = field(default_factory=list)
    peer_certs: list[Any] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        self.peer_certs.append(ssl_object.getpeercert() if ssl_object is not None else None)
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(5):
                while line := await reader.readline():
                    chunks.append(line)
        except (ConnectionError, ssl.SSLError):
            pass
        self.connections.append(chunks)
        self.arrived.set()
        writer.close()


async def serve(context: ssl.SSLContext | None = None) -> AsyncIterator[DmServer]:
    server_state = DmServer()
    server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0, ssl=context)
    server_state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield server_state


def dm_config(tmp_path: Path, port: int, extra: str = "") -> DmPushConfig:
    (tmp_path / "wme.conf").write_text(
        f"dm.push_enable=1\ndm.server=127.0.0.1\ndm.port={port}\ndm.push_interval=1\n"
        # A plain push is an explicit choice (dcud's default is dm.verify=2); tests of verification
        # set their own dm.verify.
        f"{'' if 'dm.verify' in extra else 'dm.verify=0' + chr(10)}{extra}"
    )
    (tmp_path / "dcud.toml").write_text('device_id = "dcu-7"\nstate_dir = "state"\n')
    config = DmPushConfig.from_config(load_config(tmp_path / "dcud.toml"))
    assert config is not None
    return config


def status() -> dict[str, Any]:
    return {"state": "online", "device_id": "dcu-7", "outbox": {"depth": 3}}


def test_disabled_without_enable_server_or_port(tmp_path: Path) -> None:
    (tmp_path / "dcud.toml").write_text('device_id = "d"\nstate_dir = "s"\n')
    for wme in ("dm.server=127.0.0.1\ndm.port=5\n", "dm.push_enable=1\ndm.port=5\n", "dm.push_enable=1\n"):
        (tmp_path / "wme.conf").write_text(wme)
        assert DmPushConfig.from_config(load_config(tmp_path / "dcud.toml")) is None


async def test_plain_push_framing_and_content(tmp_path: Path) -> None:
    async for server in serve():
        bus = EventBus()
        bus.set_state("line/rs485-1", {"state": "open", "errors": 0})
        bus.set_state("line/rs485-1/scan", {"state": "done"})  # not a line's health: left out
        bus.set_state("meter/flat-12", {"quality": "ok"})
        bus.set_state("push/ftp", {"phase": "waiting", "backlog": 0})
        service = DmPushService(dm_config(tmp_path, server.port), bus, status)
        ctx = ServiceContext("dm", 30.0, lambda: None)
        task = asyncio.create_task(service.run(ctx))  # pushes at once, then every dm.push_interval
        async with asyncio.timeout(10):
            await server.arrived.wait()
        assert await service.push_once(ctx)
        ctx.stopping.set()
        await task
        await wait_until(lambda s=server: len(s.connections) >= 2, 1.0, step_s=0.01)
        for seq, chunks in enumerate(server.connections[:2], start=1):
            assert len(chunks) == 1 and chunks[0].endswith(b"\n")  # one JSON line per connection
            doc = json.loads(chunks[0])
            assert doc["type"] == "dcud.dm.status" and doc["version"] == 1 and doc["seq"] == seq
            assert doc["device_id"] == "dcu-7" and doc["status"] == status()
            assert doc["lines"] == {"rs485-1": {"state": "open", "errors": 0}}
            assert doc["meters"] == {"flat-12": {"quality": "ok"}}
            assert doc["push"]["ftp"]["phase"] == "waiting"
        state = bus.states["push/dm"]
        assert state["pushes"] >= 2 and state["failures"] == 0 and state["last_error"] is None


def write_bank(state_dir: Path, bank: int, *pems: bytes) -> None:
    """A certificate bank as dcud.service.tls_banks reads it: one PEM file of certificates and keys."""
    path = bank_path(state_dir, bank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(pems))


@pytest.mark.parametrize(
    ("verify", "ca", "expect_ok", "expect_verified"),
    [
        (2, "right", True, True),
        (2, "wrong", False, None),
        (1, "wrong", True, False),  # optional: goes on unverified
        (1, "right", True, True),
        (0, "wrong", True, False),
        (2, "system", False, None),  # dm.ca_cert=0: the system's trust store, which knows no test CA
        (1, "system", True, False),
    ],
)
async def test_tls_banks_and_verify_modes(
    tmp_path: Path, verify: int, ca: str, expect_ok: bool, expect_verified: bool | None
) -> None:
    server_cert, server_key = make_cert("dm-server")
    other_cert, _ = make_cert("someone-else")
    client_cert, client_key = make_cert("dcu-7")
    (tmp_path / "server.pem").write_bytes(server_cert)
    (tmp_path / "server.key").write_bytes(server_key)
    (tmp_path / "client-ca.pem").write_bytes(client_cert)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    context.load_verify_locations(cafile=tmp_path / "client-ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED  # the device manager wants our client certificate
    async for server in serve(context):
        ca_bank = 0 if ca == "system" else 2
        config = dm_config(
            tmp_path, server.port, f"dm.tls_enable=1\ndm.cert=1\ndm.ca_cert={ca_bank}\ndm.verify={verify}\n"
        )
        write_bank(config.state_dir, 1, client_cert, client_key)
        if ca_bank:
            write_bank(config.state_dir, ca_bank, server_cert if ca == "right" else other_cert)
        bus = EventBus()
        service = DmPushService(config, bus, status)
        ctx = ServiceContext("dm", 30.0, lambda: None)
        ok = await service.push_once(ctx)
        assert ok is expect_ok, bus.states["push/dm"]
        assert bus.states["push/dm"]["verified"] is expect_verified
        if expect_ok:
            await wait_until(lambda s=server: bool(s.connections and s.connections[-1]), 2.0, step_s=0.01)
            assert json.loads(server.connections[-1][0])["device_id"] == "dcu-7"
            subject = dict(x[0] for x in server.peer_certs[-1]["subject"])
            assert subject["commonName"] == "dcu-7"
        else:
            assert "CERTIFICATE_VERIFY_FAILED" in bus.states["push/dm"]["last_error"]["message"]


async def test_unreachable_server_is_recorded_not_raised(tmp_path: Path) -> None:
    async for server in serve():
        port = server.port
    bus = EventBus()
    service = DmPushService(dm_config(tmp_path, port), bus, status)
    ctx = ServiceContext("dm", 30.0, lambda: None)
    assert not await service.push_once(ctx)
    assert not await service.push_once(ctx)
    assert bus.states["push/dm"]["failures"] == 2 and bus.states["push/dm"]["pushes"] == 0


@pytest.mark.parametrize("ca", ["system", "wrong"])
async def test_mandatory_verification_sends_nothing_to_an_unverified_server(tmp_path: Path, ca: str) -> None:
    rogue_cert, rogue_key = make_cert("rogue-dm")
    other_cert, _ = make_cert("the-real-dm")
    async with capture_server(server_context(rogue_cert, rogue_key, str(tmp_path))) as rogue:
        ca_bank = 0 if ca == "system" else 2
        config = dm_config(tmp_path, rogue.port, f"dm.tls_enable=1\ndm.ca_cert={ca_bank}\ndm.verify=2\n")
        if ca_bank:
            write_bank(config.state_dir, ca_bank, other_cert)
        bus = EventBus()
        service = DmPushService(config, bus, status)
        ctx = ServiceContext("dm", 30.0, lambda: None)
        for _ in range(3):
            assert not await service.push_once(ctx)
        assert "CERTIFICATE_VERIFY_FAILED" in bus.states["push/dm"]["last_error"]["message"]
    assert len(rogue.connections) == 3 and not any(c.handshake_done for c in rogue.connections)
    assert rogue.all_plaintext() == b"" and b"dcu-7" not in rogue.all_raw()


async def test_mandatory_verification_without_tls_makes_no_connection(tmp_path: Path) -> None:
    # A listening socket nobody accepts on: a connection the push made would wait in its backlog.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        port = listener.getsockname()[1]
        config = dm_config(tmp_path, port, "dm.tls_enable=0\ndm.verify=2\n")
        bus = EventBus()
        service = DmPushService(config, bus, status)
        ctx = ServiceContext("dm", 30.0, lambda: None)
        assert not await service.push_once(ctx)
        assert not await service.push_once(ctx)
        state = bus.states["push/dm"]
        assert state["failures"] == 2 and state["pushes"] == 0
        assert "dm.verify=2 (mandatory) needs dm.tls_enable=1" in state["last_error"]["message"]
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()
