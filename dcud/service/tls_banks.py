"""Certificate banks: numbered PEM files under ``state_dir``, and the TLS contexts built from them.

The WM-E parameters select certificates by *bank number* (``tm.cert``, ``tm.ca_cert``, ``dm.*``...); a
bank is one file, ``<state_dir>/certbank/<number>.pem``, that holds PEM blocks:

- a *certificate bank* used as our own identity: the certificate (then its chain) and the unencrypted
  private key (``-----BEGIN PRIVATE KEY-----``, ``RSA``/``EC PRIVATE KEY`` forms too);
- a *CA bank* used to verify the peer: one or more CA certificates and, for CRL checking, the CRLs
  (``-----BEGIN X509 CRL-----``) of those CAs in the same file.

Bank 0 means "none". The device manager (remote configuration) writes banks atomically (temporary
file + rename), so a reader never sees half a file. API, kept small on purpose:

- :func:`load_bank` -> the path of an existing, plausible bank (or :class:`TlsBankError`);
- :func:`server_context` / :func:`client_context` -> an :class:`ssl.SSLContext` (TLS 1.2 minimum);
- :func:`file_client_context` -> the same client context from file paths of dcud.toml (``ca_file``,
  ``cert_file``, ``key_file``: the MQTT uplink, the FTPS and MQTTS data push);
- :func:`self_signed_bank` -> a device certificate made on first use, for TLS without a configured bank.

``verify`` is ``"none"`` (no peer certificate asked for / checked), ``"optional"`` (a server asks for a
client certificate and verifies it when one is sent; a client side treats it like mandatory) or
``"mandatory"`` (a peer without a valid certificate is refused during the handshake).
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Literal

from dcud.errors import DcudError
from dcud.runtime.durable import write_durably

__all__ = [
    "BANK_DIR",
    "TlsBankError",
    "Verify",
    "bank_path",
    "client_context",
    "file_client_context",
    "fingerprint_sha256",
    "load_bank",
    "self_signed_bank",
    "server_context",
    "verify_from_wme",
]

BANK_DIR = "certbank"
MAX_BANK = 255
SELF_SIGNED_NAME = "selfsigned.pem"

Verify = Literal["none", "optional", "mandatory"]
_VERIFY_BY_CODE: dict[int, Verify] = {0: "none", 1: "optional", 2: "mandatory"}


class TlsBankError(DcudError):
    """A certificate bank is missing, unreadable or unusable; the message says which and why."""


def verify_from_wme(code: int) -> Verify:
    """``tm.verify`` / ``dm.verify`` code (0, 1, 2) as a verify mode."""
    try:
        return _VERIFY_BY_CODE[code]
    except KeyError:
        raise TlsBankError(f"verification code must be 0, 1 or 2, got {code}") from None


def bank_path(state_dir: Path | str, number: int) -> Path:
    """Where bank ``number`` lives (whether or not it exists)."""
    return Path(state_dir) / BANK_DIR / f"{number}.pem"


def load_bank(state_dir: Path | str, number: int) -> Path:
    """The path of bank ``number``; TlsBankError when it is 0, out of range, missing or holds no PEM."""
    if not 1 <= number <= MAX_BANK:
        raise TlsBankError(f"certificate bank {number} is not a bank (1..{MAX_BANK}; 0 = none)")
    path = bank_path(state_dir, number)
    try:
        head = path.read_bytes()
    except OSError as exc:
        raise TlsBankError(f"certificate bank {number} ({path}): {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in head:
        raise TlsBankError(f"certificate bank {number} ({path}) holds no PEM block")
    return path


def _has_crl(path: Path) -> bool:
    return b"-----BEGIN X509 CRL-----" in path.read_bytes()


def _verify_settings(
    ctx: ssl.SSLContext, ca_bank: Path | None, verify: Verify, use_crl: bool, *, server: bool
) -> None:
    if verify == "none":
        ctx.verify_mode = ssl.CERT_NONE
        return
    if ca_bank is None:
        raise TlsBankError(f"certificate verification {verify!r} needs a CA bank (tm.ca_cert / dm.ca_cert)")
    try:
        ctx.load_verify_locations(cafile=str(ca_bank))
    except (ssl.SSLError, OSError) as exc:
        raise TlsBankError(f"CA bank {ca_bank}: {exc}") from exc
    if use_crl:
        if not _has_crl(ca_bank):
            # OpenSSL would refuse every peer ("unable to get certificate CRL"): say why instead.
            raise TlsBankError(f"CRL checking is on but CA bank {ca_bank} holds no X509 CRL")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_OPTIONAL if (server and verify == "optional") else ssl.CERT_REQUIRED


def server_context(
    cert_bank: Path,
    *,
    ca_bank: Path | None = None,
    verify: Verify = "none",
    use_crl: bool = False,
) -> ssl.SSLContext:
    """TLS server context: our identity from ``cert_bank``, client certificates per ``verify``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(cert_bank))
    except (ssl.SSLError, OSError) as exc:
        raise TlsBankError(f"certificate bank {cert_bank}: no usable certificate and key ({exc})") from exc
    _verify_settings(ctx, ca_bank, verify, use_crl, server=True)
    return ctx


def client_context(
    *,
    ca_bank: Path | None = None,
    cert_bank: Path | None = None,
    key_file: Path | None = None,
    verify: Verify = "mandatory",
    use_crl: bool = False,
    check_hostname: bool = True,
    system_ca: bool = False,
) -> ssl.SSLContext:
    """TLS client context: the server verified against ``ca_bank`` (unless ``verify="none"``).

    ``cert_bank`` adds our client certificate (its key in the same file, or in ``key_file``).
    ``check_hostname`` applies when verifying. Without a ``ca_bank``, ``system_ca`` verifies against the
    system's trust store (no CRL) instead of refusing.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_bank is not None:
        try:
            ctx.load_cert_chain(certfile=str(cert_bank), keyfile=None if key_file is None else str(key_file))
        except (ssl.SSLError, OSError) as exc:
            raise TlsBankError(
                f"certificate bank {cert_bank}: no usable certificate and key ({exc})"
            ) from exc
    if verify == "none":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_bank is None and system_ca:
        ctx.load_default_certs()
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        _verify_settings(ctx, ca_bank, verify, use_crl, server=False)
    ctx.check_hostname = check_hostname
    return ctx


def file_client_context(
    *, ca_file: str = "", cert_file: str = "", key_file: str = "", verify: bool = True
) -> ssl.SSLContext:
    """:func:`client_context` from dcud.toml paths: ``ca_file`` empty means the system trust store.

    ``verify=False`` accepts any server certificate (lab only: ``[datapush] tls_verify = false``).
    Raises :class:`TlsBankError` naming the file that is missing or unusable.
    """
    return client_context(
        ca_bank=Path(ca_file) if ca_file else None,
        cert_bank=Path(cert_file) if cert_file else None,
        key_file=Path(key_file) if cert_file and key_file else None,
        verify="mandatory" if verify else "none",
        system_ca=True,
    )


def self_signed_bank(state_dir: Path | str, common_name: str, *, days: int = 3650) -> Path:
    """``<state_dir>/certbank/selfsigned.pem``, created on first use (P-256 key, ``common_name``).

    Used when TLS is on but no certificate bank is selected, so the port is encrypted rather than
    plain or closed; the head-end can pin its fingerprint (logged at start). Written atomically, mode 0600.
    """
    path = Path(state_dir) / BANK_DIR / SELF_SIGNED_NAME
    if path.exists():
        return path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "dcud")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_durably(path, pem)
    return path


def fingerprint_sha256(cert_bank: Path) -> str:
    """SHA-256 fingerprint (``AA:BB:...``) of the first certificate in a bank, for logs."""
    der = ssl.PEM_cert_to_DER_cert(_first_cert(cert_bank.read_text(errors="replace")))
    import hashlib

    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _first_cert(text: str) -> str:
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise TlsBankError("no certificate in bank")
    return text[begin : end + len("-----END CERTIFICATE-----")] + "\n"
