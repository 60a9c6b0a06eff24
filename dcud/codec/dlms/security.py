"""DLMS/COSEM security suite 0 (Green Book 9.2.3, IEC 62056-5-3): AES-128-GCM with a 12-byte tag.

A protected APDU carries a security header: the security control byte (SC: bits 0-3 the suite, bit 4
authentication, bit 5 encryption, bit 6 broadcast key, bit 7 compression), the sender's 4-byte invocation
counter (IC), then the ciphertext (or the plaintext when only authenticated) and the 12-byte GCM tag
(absent when only encrypted). The GCM nonce is the sender's 8-byte system title followed by the IC; the
additional authenticated data is ``SC || AK``, and for authentication only also the plaintext.

HLS mechanism 5 (GMAC) proves both ends: each side answers the other's challenge with
``f(challenge) = SC || IC || GMAC(SC || AK || challenge)`` (SC = 0x10) under its own system title.

The invocation counter of the sender never repeats under one key: :class:`InvocationCounter` hands out
values and refuses to wrap; the service keeps the next value durably between sessions. Keys never appear in
``repr()`` or error messages.

cryptography is imported by the functions that cipher, not with this module: a meter without security
(and the client session that imports this module for its types) does not load it (docs/benchmarks.md).
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass, field

from dcud.errors import LocalProtocolError, NegativeResponse, RemoteProtocolError

SYSTEM_TITLE_BYTES = 8
KEY_BYTES = 16
TAG_BYTES = 12
INVOCATION_COUNTER_MAX = 0xFFFF_FFFF
HEADER_BYTES = 5
"""Security control byte and invocation counter."""

SC_AUTHENTICATED = 0x10
SC_ENCRYPTED = 0x20
SC_BROADCAST_KEY = 0x40
SC_COMPRESSED = 0x80
SC_SUITE_MASK = 0x0F


class DecipheringError(RemoteProtocolError):
    """A protected APDU does not decipher or its tag does not verify (wrong keys, or tampering)."""


class AuthenticationFailed(NegativeResponse):
    """The association's authentication failed: a refused password, or an HLS proof that does not verify."""


class SecurityPolicy(enum.Enum):
    """The protection applied to every xDLMS APDU of an association (``security`` in dcud.toml)."""

    NONE = "none"
    AUTHENTICATED = "authenticated"
    ENCRYPTED = "encrypted"
    AUTHENTICATED_ENCRYPTED = "authenticated-encrypted"

    @property
    def security_control(self) -> int:
        """The SC byte of suite 0 for this policy (0 for none)."""
        return {
            SecurityPolicy.NONE: 0,
            SecurityPolicy.AUTHENTICATED: SC_AUTHENTICATED,
            SecurityPolicy.ENCRYPTED: SC_ENCRYPTED,
            SecurityPolicy.AUTHENTICATED_ENCRYPTED: SC_AUTHENTICATED | SC_ENCRYPTED,
        }[self]

    def satisfied_by(self, security_control: int) -> bool:
        """Whether an APDU protected with ``security_control`` gives at least this protection."""
        need = self.security_control
        return security_control & need == need


@dataclass(frozen=True, slots=True)
class Keys:
    """Suite 0 keys: the global unicast block cipher key (EK) and the authentication key (AK).

    ``repr()`` shows neither.
    """

    block_cipher_key: bytes = field(repr=False)
    authentication_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("block_cipher_key", "authentication_key"):
            if len(getattr(self, name)) != KEY_BYTES:
                raise LocalProtocolError(f"{name} must be {KEY_BYTES} bytes (32 hex digits)")

    def __repr__(self) -> str:
        return "Keys(<hidden>)"

    @classmethod
    def from_hex(cls, block_cipher_key: str, authentication_key: str) -> Keys:
        """From hex strings (spaces allowed); a malformed one raises LocalProtocolError without echoing it."""
        try:
            ek = bytes.fromhex(block_cipher_key.replace(" ", ""))
            ak = bytes.fromhex(authentication_key.replace(" ", ""))
        except ValueError:
            raise LocalProtocolError("a key is not hex") from None
        return cls(ek, ak)


def check_system_title(system_title: bytes, who: str = "system title") -> bytes:
    """``system_title`` if it has eight bytes, else LocalProtocolError."""
    if len(system_title) != SYSTEM_TITLE_BYTES:
        raise LocalProtocolError(f"{who} must be {SYSTEM_TITLE_BYTES} bytes, not {len(system_title)}")
    return bytes(system_title)


@dataclass(slots=True)
class InvocationCounter:
    """The sending side's invocation counter: ``next_value`` is the next one to use, ``last_used`` the last.

    Values only go up; taking one beyond 2^32 - 1 raises LocalProtocolError (the keys must be changed).
    ``limit`` (at most 2^32 - 1) is the last value this holder may take: the service passes the end of
    the range it reserved durably, so that a value past the reservation is never used (and so never
    reused after a crash).
    """

    next_value: int
    last_used: int | None = None
    limit: int = INVOCATION_COUNTER_MAX

    def __post_init__(self) -> None:
        if not 0 <= self.next_value <= INVOCATION_COUNTER_MAX + 1:
            raise LocalProtocolError(f"invocation counter {self.next_value} out of range")
        if not 0 <= self.limit <= INVOCATION_COUNTER_MAX:
            raise LocalProtocolError(f"invocation counter limit {self.limit} out of range")

    def take(self) -> int:
        """The next value, marked as used."""
        if self.next_value > INVOCATION_COUNTER_MAX:
            raise LocalProtocolError("invocation counter exhausted: new keys are needed")
        if self.next_value > self.limit:
            raise LocalProtocolError(f"invocation counter reservation exhausted at {self.limit}")
        value = self.next_value
        self.last_used = value
        self.next_value = value + 1
        return value


def _iv(system_title: bytes, invocation_counter: int) -> bytes:
    return check_system_title(system_title) + invocation_counter.to_bytes(4, "big")


def _check_sc(security_control: int) -> None:
    if security_control & SC_SUITE_MASK != 0:
        raise LocalProtocolError(f"security suite {security_control & SC_SUITE_MASK} is not supported")
    if not security_control & (SC_AUTHENTICATED | SC_ENCRYPTED):
        raise LocalProtocolError("security control byte asks for no protection")
    if security_control & (SC_COMPRESSED | SC_BROADCAST_KEY):
        raise LocalProtocolError("compression and the broadcast key are not supported")


def protect(
    plaintext: bytes, *, security_control: int, system_title: bytes, invocation_counter: int, keys: Keys
) -> bytes:
    """``SC || IC || ciphertext-or-plaintext || tag`` for ``plaintext`` (the body of a glo-* APDU)."""
    _check_sc(security_control)
    if not 0 <= invocation_counter <= INVOCATION_COUNTER_MAX:
        raise LocalProtocolError(f"invocation counter {invocation_counter} out of range")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    iv = _iv(system_title, invocation_counter)
    header = bytes([security_control]) + invocation_counter.to_bytes(4, "big")
    aesgcm = AESGCM(keys.block_cipher_key)
    sc_ak = bytes([security_control]) + keys.authentication_key
    if security_control & SC_ENCRYPTED:
        aad = sc_ak if security_control & SC_AUTHENTICATED else None
        sealed = aesgcm.encrypt(iv, plaintext, aad)
        ciphertext, tag = sealed[:-16], sealed[-16:]
        if security_control & SC_AUTHENTICATED:
            return header + ciphertext + tag[:TAG_BYTES]
        return header + ciphertext
    tag = aesgcm.encrypt(iv, b"", sc_ak + plaintext)
    return header + plaintext + tag[:TAG_BYTES]


@dataclass(frozen=True, slots=True)
class Unprotected:
    """What :func:`unprotect` recovered: the header fields and the plaintext."""

    security_control: int
    invocation_counter: int
    plaintext: bytes


def unprotect(content: bytes, *, system_title: bytes, keys: Keys) -> Unprotected:
    """Check and remove the protection of ``content`` (``SC || IC || ...``) sent under ``system_title``.

    Raises :class:`DecipheringError` when the tag does not verify, RemoteProtocolError when the header is
    malformed or asks for something suite 0 here does not do.
    """
    if len(content) < HEADER_BYTES:
        raise RemoteProtocolError("protected APDU shorter than its security header", content)
    security_control = content[0]
    invocation_counter = int.from_bytes(content[1:5], "big")
    body = content[5:]
    try:
        _check_sc(security_control)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"protected APDU: {exc}", content) from None
    iv = _iv(system_title, invocation_counter)
    sc_ak = bytes([security_control]) + keys.authentication_key
    authenticated = bool(security_control & SC_AUTHENTICATED)
    if authenticated and len(body) < TAG_BYTES:
        raise RemoteProtocolError("protected APDU shorter than its authentication tag", content)
    payload, tag = (body[:-TAG_BYTES], body[-TAG_BYTES:]) if authenticated else (body, b"")
    if security_control & SC_ENCRYPTED:
        if authenticated:
            plaintext = _gcm_open(keys.block_cipher_key, iv, sc_ak, payload, tag)
        else:
            # Encryption only: GCM without its tag is AES-CTR starting at counter block J0 + 1.
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

            ctr = Cipher(
                algorithms.AES(keys.block_cipher_key), modes.CTR(iv + b"\x00\x00\x00\x02")
            ).decryptor()
            plaintext = ctr.update(payload) + ctr.finalize()
    else:
        _gcm_open(keys.block_cipher_key, iv, sc_ak + payload, b"", tag)
        plaintext = payload
    return Unprotected(security_control, invocation_counter, plaintext)


def _gcm_open(key: bytes, iv: bytes, aad: bytes, ciphertext: bytes, tag: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    decryptor = Cipher(algorithms.AES(key), modes.GCM(iv, tag, min_tag_length=TAG_BYTES)).decryptor()
    decryptor.authenticate_additional_data(aad)
    plaintext = decryptor.update(ciphertext)
    try:
        return plaintext + decryptor.finalize()
    except InvalidTag:
        raise DecipheringError("authentication tag does not verify (wrong keys or system title?)") from None


def gmac(
    *, security_control: int, system_title: bytes, invocation_counter: int, keys: Keys, challenge: bytes
) -> bytes:
    """The 12-byte GMAC tag over ``SC || AK || challenge`` (HLS mechanism 5)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = bytes([security_control]) + keys.authentication_key + challenge
    return AESGCM(keys.block_cipher_key).encrypt(_iv(system_title, invocation_counter), b"", aad)[:TAG_BYTES]


def hls_gmac_response(*, system_title: bytes, invocation_counter: int, keys: Keys, challenge: bytes) -> bytes:
    """``f(challenge) = SC || IC || GMAC`` with SC 0x10: the 17 bytes that answer the peer's challenge."""
    tag = gmac(
        security_control=SC_AUTHENTICATED,
        system_title=system_title,
        invocation_counter=invocation_counter,
        keys=keys,
        challenge=challenge,
    )
    return bytes([SC_AUTHENTICATED]) + invocation_counter.to_bytes(4, "big") + tag


def verify_hls_gmac(response: bytes, *, system_title: bytes, keys: Keys, challenge: bytes) -> bool:
    """Whether ``response`` is a valid ``f(challenge)`` computed under ``system_title`` (constant time)."""
    if len(response) != HEADER_BYTES + TAG_BYTES or response[0] != SC_AUTHENTICATED:
        return False
    expected = hls_gmac_response(
        system_title=system_title,
        invocation_counter=int.from_bytes(response[1:5], "big"),
        keys=keys,
        challenge=challenge,
    )
    return hmac.compare_digest(expected, response)


__all__ = [
    "HEADER_BYTES",
    "INVOCATION_COUNTER_MAX",
    "SC_AUTHENTICATED",
    "SC_BROADCAST_KEY",
    "SC_COMPRESSED",
    "SC_ENCRYPTED",
    "SYSTEM_TITLE_BYTES",
    "TAG_BYTES",
    "AuthenticationFailed",
    "DecipheringError",
    "InvocationCounter",
    "Keys",
    "SecurityPolicy",
    "Unprotected",
    "check_system_title",
    "gmac",
    "hls_gmac_response",
    "protect",
    "unprotect",
    "verify_hls_gmac",
]
