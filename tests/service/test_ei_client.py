"""EI client against a test head-end: login, bridging to the primary line, keepalive, reconnects, and TLS
(the server verified by default; the password never sent to an unverified server)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import load_config
from dcud.service.ei_client import EiClientConfig, EiClientService, build_ei_client
from dcud.sim.peers import free_port

from helpers.bridge import FAST_POLICY, Harness, PtyDevice, bridge_harness, policy
from helpers.certs import make_cert
from helpers.daemon import write_site
from helpers.meters import wait_until
from helpers.tls_capture import capture_server, server_context


@dataclass
class HeadEnd:
    """A test head-end server: takes the EI connection, checks the login, talks through it."""

    port: int
    expect_login: bytes | None = None
    answer: bytes = b"OK welcome\r\n"
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    logins: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.expect_login is not None:
            login = await reader.readexactly(len(self.expect_login))
            self.logins.append(login)
            writer.write(self.answer)
            if not self.answer.startswith(b"OK"):
                await writer.drain()
                writer.close()
                return
        self.connections.append((reader, writer))
        self.connected.set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for _reader, writer in self.connections:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
            self.server = None

    async def talk(self, payload: bytes) -> bytes:
        reader, writer = self.connections[-1]
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)


def ei_service(h: Harness, port: int, **kw: Any) -> EiClientService:
    config = EiClientConfig(
        host="127.0.0.1",
        port=port,
        line=h.line_config,
        baud=9600,
        keepalive_s=120,
        policy=kw.pop("policy", policy(idle_timeout_s=0.0, lease_idle_s=0.5)),
        reconnect_initial_s=0.05,
        reconnect_max_s=0.3,
        login_timeout_s=2.0,
        **kw,
    )
    return EiClientService(config, h.lines, h.bus, h.events)


@contextlib.asynccontextmanager
async def ei_setup(tmp_path: Path, head_end: HeadEnd, **kw: Any) -> Any:
    services: list[EiClientService] = []

    def extra(h: Harness) -> list[Any]:
        services.append(ei_service(h, head_end.port, **kw))
        return services

    async with bridge_harness(tmp_path, extra_services=extra) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        try:
            yield h, services[0], device
        finally:
            device.stop()


async def test_connects_logs_in_bridges_and_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    head_end = HeadEnd(free_port(), expect_login=b"USER hes-1\r\nPASS s3cret pass\r\n")
    await head_end.start()
    async with ei_setup(tmp_path, head_end, auth_mode="E", username="hes-1", password="s3cret pass") as (
        h,
        service,
        _device,
    ):
        await asyncio.wait_for(head_end.connected.wait(), 10)
        assert head_end.logins == [b"USER hes-1\r\nPASS s3cret pass\r\n"]
        payload = bytes(range(256)) * 8
        assert await head_end.talk(payload) == payload
        await wait_until(lambda: h.bus.states.get("bridge/ei", {}).get("state") == "connected", 5)
        assert "s3cret" not in str(h.bus.states["bridge/ei"]) and "s3cret" not in repr(service.config)
        # The head-end restarts: the connection drops, dcud reconnects once it is back.
        await head_end.stop()
        head_end.connected.clear()
        await wait_until(lambda: service.state == "backoff", 10)
        await head_end.start()
        await asyncio.wait_for(head_end.connected.wait(), 20)
        assert await head_end.talk(b"\x00again\xff") == b"\x00again\xff"
        records = await h.wait_audits(1)
        await head_end.stop()
    assert records[0]["port"] == "ei"
    assert records[0]["bytes_to_meter"] == len(payload)
    assert service.connects >= 2


async def test_refused_login_backs_off_and_never_bridges(tmp_path: Path) -> None:
    head_end = HeadEnd(free_port(), expect_login=b"USER u\r\nPASS wrong\r\n", answer=b"ERR bad password\r\n")
    await head_end.start()
    async with ei_setup(tmp_path, head_end, auth_mode="E", username="u", password="wrong") as (
        h,
        service,
        dev,
    ):
        await wait_until(lambda: len(head_end.logins) >= 3, 20)
        assert service.failures >= 2
        assert "login refused" in service.last_error
        assert h.line.counters.leases_granted == 0
        assert dev.received == b""
        await head_end.stop()


async def test_no_authentication_bridges_at_once_and_leases_only_while_talking(tmp_path: Path) -> None:
    head_end = HeadEnd(free_port())
    await head_end.start()
    async with ei_setup(tmp_path, head_end) as (h, service, _device):
        await asyncio.wait_for(head_end.connected.wait(), 10)
        await wait_until(lambda: service.state == "connected", 5)
        assert h.line.holder is None  # connected, silent: the line stays free for readouts
        assert await head_end.talk(b"/?!\r\n") == b"/?!\r\n"
        assert h.line.holder is not None and h.line.holder.owner.startswith("bridge:ei:")
        await wait_until(lambda: h.line.holder is None, 10)  # handed back after lease_idle_s
        assert service.state == "connected"
        assert await head_end.talk(b"more") == b"more"
        sock = service.session._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == FAST_POLICY.keepalive_idle_s
        await head_end.stop()


async def test_unreachable_head_end_keeps_retrying_quietly(tmp_path: Path) -> None:
    head_end = HeadEnd(free_port())  # never started: connection refused
    async with ei_setup(tmp_path, head_end) as (_h, service, _device):
        await wait_until(lambda: service.failures >= 3, 20)
        assert service.state in ("backoff", "connecting")
        assert service.connects == 0


# -- TLS: the server is verified, and the password never goes to one that is not ----------------------

PASSWORD = "Pa55-w0rd secret"


@contextlib.asynccontextmanager
async def ei_from_config(
    tmp_path: Path,
    port: int,
    toml: str = "",
    wme: str = "",
    auth: str = "E",
    banks: dict[int, bytes] | None = None,
) -> Any:
    """The EI client as the daemon builds it from dcud.toml and wme.conf (and certificate banks)."""
    services: list[Any] = []
    site = tmp_path / "site"

    def extra(h: Harness) -> list[Any]:
        line = (
            f'[[line]]\nname = "rs485-1"\ndevice = "{h.pair.a}"\nkind = "rs232"\nbaud = 9600\n'
            'framing = "8N1"\ntransparent = "primary"\n'
        )
        params = (
            f"ei_client_addr=127.0.0.1\nei_client_port={port}\nei_client_auth_mode={auth}\n"
            f"ei_client_type=hes-1\nei_client_pass={PASSWORD}\n{wme}"
        )
        loaded = load_config(
            write_site(site, toml_extra=f"[transparent]\nei_tls = true\n{toml}{line}", wme=params)
        )
        services.extend(build_ei_client(loaded, h.lines, h.bus, h.events))
        return services

    (site / "state" / "certbank").mkdir(parents=True, exist_ok=True)
    for number, pem in (banks or {}).items():
        (site / "state" / "certbank" / f"{number}.pem").write_bytes(pem)
    async with bridge_harness(tmp_path, extra_services=extra) as h:
        yield h, services[0]


def _ok_after_login(received: bytes) -> bytes:
    return b"OK welcome\r\n" if received.endswith(b"\r\n") and received.count(b"\r\n") == 2 else b""


@pytest.mark.parametrize("ca", ["system store", "another CA in tm.ca_cert"])
async def test_tls_by_default_verifies_the_server_and_never_sends_it_the_password(
    tmp_path: Path, ca: str
) -> None:
    rogue_cert, rogue_key = make_cert("rogue-head-end")
    other_cert, _ = make_cert("the-real-head-end")
    async with capture_server(server_context(rogue_cert, rogue_key, str(tmp_path)), _ok_after_login) as rogue:
        banks = {} if ca == "system store" else {3: other_cert}
        wme = "tm.ca_cert=3\n" if banks else ""
        async with ei_from_config(tmp_path, rogue.port, wme=wme, banks=banks) as (h, service):
            await wait_until(lambda: service.failures >= 2 and len(rogue.connections) >= 2, 20)
            assert "CERTIFICATE_VERIFY_FAILED" in service.last_error
            assert h.bus.states["bridge/ei"]["tls_verify"] == "mandatory"
            assert service.connects == 0 and h.line.counters.leases_granted == 0
    assert not any(c.handshake_done for c in rogue.connections)
    assert rogue.all_plaintext() == b""
    assert PASSWORD.encode() not in rogue.all_raw() and b"PASS" not in rogue.all_raw()


async def test_tls_to_a_verified_server_logs_in(tmp_path: Path) -> None:
    cert, key = make_cert("head-end")
    async with (
        capture_server(server_context(cert, key, str(tmp_path)), _ok_after_login) as head_end,
        ei_from_config(tmp_path, head_end.port, wme="tm.ca_cert=3\n", banks={3: cert}) as (h, service),
    ):
        await wait_until(lambda: service.state == "connected", 20)
        assert head_end.connections[-1].plaintext == f"USER hes-1\r\nPASS {PASSWORD}\r\n".encode()
        assert h.bus.states["bridge/ei"]["tls"] is True


@pytest.mark.parametrize("auth", ["E", "N"])
async def test_verify_none_is_encryption_only_and_never_carries_the_password(
    tmp_path: Path, auth: str
) -> None:
    cert, key = make_cert("anyone")
    async with (
        capture_server(server_context(cert, key, str(tmp_path))) as server,
        ei_from_config(tmp_path, server.port, toml='ei_tls_verify = "none"\n', auth=auth) as (h, service),
    ):
        if auth == "E":
            await wait_until(lambda: service.state == "refused", 10)
            assert "EI password not sent to an unverified server" in service.last_error
            assert h.bus.states["bridge/ei"]["state"] == "refused"
            assert server.connections == []  # not even a connection: nothing to retry
        else:
            await wait_until(lambda: service.state == "connected", 20)
            assert server.connections[-1].handshake_done
    assert PASSWORD.encode() not in server.all_raw() + server.all_plaintext()
