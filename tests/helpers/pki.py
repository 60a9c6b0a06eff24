"""A throw-away PKI for the TLS tests: a CA, the DCU's certificate banks, head-end client certificates
(good, revoked, foreign) and a CRL, plus the client side of a handshake against it."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dcud.service.tls_banks import bank_path

__all__ = ["NOW", "REFUSED", "Pki", "client_ssl_context", "make_pki"]

NOW = datetime.datetime.now(datetime.UTC)
"""The moment every certificate and the CRL are dated from (valid a day before to 30 days after)."""

REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError)
"""What a client sees when the DCU refuses its TLS handshake or drops the connection after it."""


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
    """Write a fresh PKI under ``tmp_path``: banks in ``state/certbank`` (10 = the DCU's certificate,
    chain and key for localhost/127.0.0.1; 20 = the CA; 21 = the CA and a CRL revoking ``hes-revoked``),
    the client PEMs (certificate and key) and the CA alone in ``ca.pem``."""
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


def client_ssl_context(pki: Pki, cert: Path | None) -> ssl.SSLContext:
    """A head-end's TLS client context trusting the test CA, presenting ``cert`` (a PEM with its key) or
    no certificate at all when ``cert`` is None."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert))
    return ctx
