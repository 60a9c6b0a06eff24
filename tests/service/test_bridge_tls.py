"""TLS on the transparent port: certificate banks, verify none/optional/mandatory, CRL, self-signed."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from dcud.service.bridge import TlsSettings
from dcud.service.tls_banks import (
    TlsBankError,
    client_context,
    load_bank,
    server_context,
    verify_from_wme,
)

from helpers.bridge import PtyDevice, bridge_harness, connect, read_exactly
from helpers.meters import wait_until
from helpers.pki import REFUSED, client_ssl_context, make_pki


async def _echo_once(port: int, ctx: ssl.SSLContext, payload: bytes = b"\x00\xff\x7e tls") -> bytes:
    """Connect with TLS, send, read the echo; raises on a refused handshake or a closed connection."""
    reader, writer = await connect(port, ssl=ctx, server_hostname="localhost")
    try:
        writer.write(payload)
        await writer.drain()
        return await read_exactly(reader, len(payload), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("verify", ["none", "optional", "mandatory"])
async def test_verify_modes(tmp_path: Path, verify: str) -> None:
    pki = make_pki(tmp_path)
    tls = TlsSettings(enabled=True, cert_bank=10, ca_bank=20, verify=verify)  # type: ignore[arg-type]
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(pki.state_dir)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        try:
            assert await _echo_once(h.port, client_ssl_context(pki, pki.client_good)) == b"\x00\xff\x7e tls"
            if verify == "mandatory":
                with pytest.raises(REFUSED):
                    await _echo_once(h.port, client_ssl_context(pki, None))
            else:
                assert await _echo_once(h.port, client_ssl_context(pki, None)) == b"\x00\xff\x7e tls"
            if verify != "none":
                with pytest.raises(REFUSED):
                    await _echo_once(h.port, client_ssl_context(pki, pki.client_foreign))
            records = await h.wait_audits(1 if verify == "mandatory" else 2)
        finally:
            device.stop()
    assert all(r["tls"] for r in records)
    if verify != "none":
        assert records[0]["client_cert"] == "commonName=hes-good"
    if verify == "mandatory":
        # The refused client never became a session, never got the line, never reached the meter.
        assert len(h.audits()) == 1
        assert h.bridge.counters["tls_failures"] == 2
        assert bytes(device.received) == b"\x00\xff\x7e tls"


async def test_mandatory_refuses_a_client_without_certificate_before_the_line(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsSettings(enabled=True, cert_bank=10, ca_bank=20, verify="mandatory")
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(pki.state_dir)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        with pytest.raises(REFUSED):
            await _echo_once(h.port, client_ssl_context(pki, None), b"PROGRAMMING COMMAND")
        await wait_until(lambda: h.bridge.counters["tls_failures"] == 1, 10)
        assert h.line.counters.leases_granted == 0
        assert device.received == b""
        assert h.audits() == []
        device.stop()


async def test_crl_refuses_a_revoked_client(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsSettings(enabled=True, cert_bank=10, ca_bank=21, verify="mandatory", use_crl=True)
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(pki.state_dir)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        assert await _echo_once(h.port, client_ssl_context(pki, pki.client_good)) == b"\x00\xff\x7e tls"
        with pytest.raises(REFUSED):
            await _echo_once(h.port, client_ssl_context(pki, pki.client_revoked))
        await h.wait_audits(1)
        device.stop()
        assert h.bridge.counters["tls_failures"] == 1


async def test_crl_on_without_a_crl_keeps_the_port_closed_and_says_why(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsSettings(enabled=True, cert_bank=10, ca_bank=20, verify="mandatory", use_crl=True)
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(pki.state_dir)}) as h:
        assert h.bridge.state == "tls_error"
        assert "holds no X509 CRL" in h.bridge.tls_error
        await wait_until(lambda: "bridge_tls_error" in h.events.types(), 10)
        assert h.bus.states["bridge/tm"]["state"] == "tls_error"
        assert h.bridge.bound_port is None


async def test_tls_without_a_bank_uses_a_self_signed_device_certificate(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tls = TlsSettings(enabled=True)
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(state)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        assert await _echo_once(h.port, ctx) == b"\x00\xff\x7e tls"
        device.stop()
    assert (state / "certbank" / "selfsigned.pem").exists()
    assert (state / "certbank" / "selfsigned.pem").stat().st_mode & 0o077 == 0


async def test_plain_client_on_a_tls_port_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsSettings(enabled=True, cert_bank=10)
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(pki.state_dir)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        reader, writer = await connect(h.port)
        writer.write(b"/?12345678!\r\n")
        assert b"/?" not in await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await wait_until(lambda: h.bridge.counters["tls_failures"] == 1, 10)
        assert device.received == b""
        device.stop()


def test_bank_api(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    assert load_bank(pki.state_dir, 10) == pki.state_dir / "certbank" / "10.pem"
    with pytest.raises(TlsBankError, match="not a bank"):
        load_bank(pki.state_dir, 0)
    with pytest.raises(TlsBankError, match="certificate bank 99"):
        load_bank(pki.state_dir, 99)
    (pki.state_dir / "certbank" / "30.pem").write_text("not pem")
    with pytest.raises(TlsBankError, match="no PEM"):
        load_bank(pki.state_dir, 30)
    with pytest.raises(TlsBankError, match="needs a CA bank"):
        server_context(load_bank(pki.state_dir, 10), verify="mandatory")
    with pytest.raises(TlsBankError, match="no usable certificate"):
        server_context(load_bank(pki.state_dir, 20))
    ctx = client_context(ca_bank=load_bank(pki.state_dir, 20), cert_bank=pki.client_good)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert client_context(verify="none").verify_mode == ssl.CERT_NONE
    assert [verify_from_wme(c) for c in (0, 1, 2)] == ["none", "optional", "mandatory"]
    with pytest.raises(TlsBankError):
        verify_from_wme(3)
