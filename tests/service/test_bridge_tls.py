"""TLS on the transparent port: certificate banks, verify none/optional/mandatory, CRL, self-signed."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.bridge import PtyDevice, bridge_harness, connect, read_exactly
from helpers.meters import wait_until

from dcud.service.bridge import TlsSettings
from dcud.service.tls_banks import (
    TlsBankError,
    bank_path,
    client_context,
    load_bank,
    server_context,
    verify_from_wme,
)

NOW = datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    """A test CA, the DCU's server bank, client certificates (good, revoked, foreign) and a CRL."""

    state_dir: Path
    client_good: Path
    client_revoked: Path
    client_foreign: Path
    ca_file: Path


def make_pki(tmp_path: Path) -> Pki:
    state = tmp_path / "state"
    (state / "certbank").mkdir(parents=True)
    ca_key = _key()
    ca = _cert("dcud test CA", ca_key, ca=True)
    issuer = (ca.subject, ca_key)
    server_key = _key()
    server = _cert("dcu-test", server_key, issuer, server=True)
    bank_path(state, 10).write_bytes(_pem(server) + _pem(ca) + _pem_key(server_key))

    def client(name: str, by: tuple[x509.Name, ec.EllipticCurvePrivateKey]) -> tuple[Path, x509.Certificate]:
        key = _key()
        cert = _cert(name, key, by)
        path = tmp_path / f"{name}.pem"
        path.write_bytes(_pem(cert) + _pem_key(key))
        return path, cert

    good, _ = client("hes-good", issuer)
    revoked, revoked_cert = client("hes-revoked", issuer)
    other_key = _key()
    other_ca = _cert("other CA", other_key, ca=True)
    foreign, _ = client("hes-foreign", (other_ca.subject, other_key))
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW - datetime.timedelta(hours=1))
        .next_update(NOW + datetime.timedelta(days=7))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked_cert.serial_number)
            .revocation_date(NOW - datetime.timedelta(minutes=5))
            .build()
        )
        .sign(ca_key, hashes.SHA256())
    )
    bank_path(state, 20).write_bytes(_pem(ca))
    bank_path(state, 21).write_bytes(_pem(ca) + crl.public_bytes(serialization.Encoding.PEM))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_pem(ca))
    return Pki(state, good, revoked, foreign, ca_file)


def _client_ctx(pki: Pki, cert: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert))
    return ctx


async def _echo_once(port: int, ctx: ssl.SSLContext, payload: bytes = b"\x00\xff\x7e tls") -> bytes:
    """Connect with TLS, send, read the echo; raises on a refused handshake or a closed connection."""
    reader, writer = await connect(port, ssl=ctx, server_hostname="localhost")
    try:
        writer.write(payload)
        await writer.drain()
        return await read_exactly(reader, len(payload), 10)
    finally:
        writer.close()


REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError)


@pytest.mark.parametrize("verify", ["none", "optional", "mandatory"])
async def test_verify_modes(tmp_path: Path, verify: str) -> None:
    pki = make_pki(tmp_path)
    tls = TlsSettings(enabled=True, cert_bank=10, ca_bank=20, verify=verify)  # type: ignore[arg-type]
    async with bridge_harness(tmp_path, bridge={"tls": tls, "state_dir": str(pki.state_dir)}) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        try:
            assert await _echo_once(h.port, _client_ctx(pki, pki.client_good)) == b"\x00\xff\x7e tls"
            if verify == "mandatory":
                with pytest.raises(REFUSED):
                    await _echo_once(h.port, _client_ctx(pki, None))
            else:
                assert await _echo_once(h.port, _client_ctx(pki, None)) == b"\x00\xff\x7e tls"
            if verify != "none":
                with pytest.raises(REFUSED):
                    await _echo_once(h.port, _client_ctx(pki, pki.client_foreign))
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
            await _echo_once(h.port, _client_ctx(pki, None), b"PROGRAMMING COMMAND")
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
        assert await _echo_once(h.port, _client_ctx(pki, pki.client_good)) == b"\x00\xff\x7e tls"
        with pytest.raises(REFUSED):
            await _echo_once(h.port, _client_ctx(pki, pki.client_revoked))
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
