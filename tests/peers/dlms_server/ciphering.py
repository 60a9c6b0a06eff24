"""Security suite 0 (Green Book 9.2.7): AES-128-GCM with a 12-byte tag, GMAC for HLS mechanism 5.

Written on ``cryptography``'s AES-GCM primitives; the published Green Book examples (HLS Table 43, the
ciphered InitiateRequest) are checked in tests/sim/test_dlms_peer.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TAG_BYTES = 12
SC_AUTHENTICATED = 0x10
SC_ENCRYPTED = 0x20
SC_SUITE_MASK = 0x0F


class SecurityError(Exception):
    """Protected data that does not verify or decipher (wrong key, forged or damaged bytes)."""


@dataclass(frozen=True)
class Keys:
    """The global block cipher key (EK) and authentication key (AK)."""

    block_cipher: bytes
    authentication: bytes


def _iv(system_title: bytes, invocation_counter: int) -> bytes:
    if len(system_title) != 8:
        raise SecurityError("a system title has 8 bytes")
    return system_title + invocation_counter.to_bytes(4, "big")


def protect(sc: int, system_title: bytes, ic: int, key: bytes, ak: bytes, plain: bytes) -> bytes:
    """SC || IC || (ciphertext or plaintext) || tag, as the ciphered content of a glo/ded APDU."""
    iv = _iv(system_title, ic)
    header = bytes([sc]) + ic.to_bytes(4, "big")
    if sc & SC_ENCRYPTED and not sc & SC_AUTHENTICATED:
        # encryption only: GCM's counter mode without the tag (the first counter block is J0 + 1)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(iv + b"\x00\x00\x00\x02")).encryptor()
        return header + encryptor.update(plain) + encryptor.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    if sc & SC_ENCRYPTED:
        encryptor.authenticate_additional_data(bytes([sc]) + ak)
        body = encryptor.update(plain) + encryptor.finalize()
    else:
        encryptor.authenticate_additional_data(bytes([sc]) + ak + plain)
        encryptor.finalize()
        body = plain
    return header + body + encryptor.tag[:TAG_BYTES]


def unprotect(content: bytes, system_title: bytes, key: bytes, ak: bytes) -> tuple[int, int, bytes]:
    """Verify and decipher SC || IC || data || tag; returns (SC, IC, plaintext). Raises SecurityError."""
    if len(content) < 5:
        raise SecurityError("ciphered content shorter than SC and IC")
    sc = content[0]
    ic = int.from_bytes(content[1:5], "big")
    if sc & SC_SUITE_MASK != 0 or sc & 0xC0:
        raise SecurityError(f"security control 0x{sc:02X}: only suite 0, no broadcast key, no compression")
    if not sc & (SC_ENCRYPTED | SC_AUTHENTICATED):
        raise SecurityError("security control asks for no protection")
    iv = _iv(system_title, ic)
    body = content[5:]
    if sc & SC_ENCRYPTED and not sc & SC_AUTHENTICATED:
        decryptor = Cipher(algorithms.AES(key), modes.CTR(iv + b"\x00\x00\x00\x02")).decryptor()
        return sc, ic, decryptor.update(body) + decryptor.finalize()
    if len(body) < TAG_BYTES:
        raise SecurityError("no room for the authentication tag")
    data, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
    decryptor = Cipher(algorithms.AES(key), modes.GCM(iv, tag, min_tag_length=TAG_BYTES)).decryptor()
    try:
        if sc & SC_ENCRYPTED:
            decryptor.authenticate_additional_data(bytes([sc]) + ak)
            plain = decryptor.update(data) + decryptor.finalize()
        else:
            decryptor.authenticate_additional_data(bytes([sc]) + ak + data)
            decryptor.finalize()
            plain = data
    except InvalidTag:
        raise SecurityError("authentication tag does not verify") from None
    return sc, ic, plain


def gmac(
    system_title: bytes, ic: int, key: bytes, ak: bytes, challenge: bytes, sc: int = SC_AUTHENTICATED
) -> bytes:
    """The 12-byte GMAC over SC || AK || challenge (HLS mechanism 5, passes 3 and 4)."""
    encryptor = Cipher(algorithms.AES(key), modes.GCM(_iv(system_title, ic))).encryptor()
    encryptor.authenticate_additional_data(bytes([sc]) + ak + challenge)
    encryptor.finalize()
    return encryptor.tag[:TAG_BYTES]


def hls_answer(system_title: bytes, ic: int, key: bytes, ak: bytes, challenge: bytes) -> bytes:
    """f(challenge) = SC || IC || GMAC, what one side sends to prove it holds the keys."""
    return bytes([SC_AUTHENTICATED]) + ic.to_bytes(4, "big") + gmac(system_title, ic, key, ak, challenge)
