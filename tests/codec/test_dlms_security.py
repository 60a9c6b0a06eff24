"""Security suite 0: tampering, wrong keys, counters, key hygiene (the Green Book vectors are in
test_dlms_vectors.py)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.codec.dlms.security import (
    INVOCATION_COUNTER_MAX,
    DecipheringError,
    InvocationCounter,
    Keys,
    SecurityPolicy,
    protect,
    unprotect,
    verify_hls_gmac,
)
from dcud.errors import LocalProtocolError, RemoteProtocolError

from helpers.dlms import GREEN_BOOK_KEYS, SERVER_TITLE

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PLAIN = bytes.fromhex("C0010000080000010000FF0200")


def _protect(sc: int, keys: Keys = GREEN_BOOK_KEYS, title: bytes = SERVER_TITLE) -> bytes:
    return protect(PLAIN, security_control=sc, system_title=title, invocation_counter=7, keys=keys)


@pytest.mark.parametrize("sc", [0x10, 0x30])
def test_any_flipped_bit_fails_the_tag(sc: int) -> None:
    protected = _protect(sc)
    for position in range(1, len(protected)):  # byte 0 (SC) changes the rules; covered below
        tampered = bytearray(protected)
        tampered[position] ^= 0x01
        with pytest.raises(DecipheringError, match="wrong keys or system title"):
            unprotect(bytes(tampered), system_title=SERVER_TITLE, keys=GREEN_BOOK_KEYS)


@pytest.mark.parametrize("sc", [0x10, 0x30])
def test_wrong_key_or_title_fails_without_naming_the_key(sc: int) -> None:
    protected = _protect(sc)
    wrong_ak = Keys(GREEN_BOOK_KEYS.block_cipher_key, bytes(16))
    for keys, title in ((wrong_ak, SERVER_TITLE), (GREEN_BOOK_KEYS, bytes(8))):
        with pytest.raises(DecipheringError) as info:
            unprotect(protected, system_title=title, keys=keys)
        assert "D0D1" not in str(info.value) and "0001020304" not in str(info.value)


def test_encryption_only_has_no_tag_and_decrypts_with_ctr() -> None:
    protected = _protect(0x20)
    assert len(protected) == 5 + len(PLAIN)
    assert unprotect(protected, system_title=SERVER_TITLE, keys=GREEN_BOOK_KEYS).plaintext == PLAIN


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x30\x00\x00", "shorter than its security header"),
        (b"\x10\x00\x00\x00\x01" + b"\x00" * 5, "shorter than its authentication tag"),
        (b"\x31\x00\x00\x00\x01" + b"\x00" * 20, "suite 1"),
        (b"\x00\x00\x00\x00\x01" + b"\x00" * 20, "no protection"),
        (b"\x70\x00\x00\x00\x01" + b"\x00" * 20, "broadcast key"),
    ],
)
def test_malformed_headers_are_remote_errors(content: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        unprotect(content, system_title=SERVER_TITLE, keys=GREEN_BOOK_KEYS)


def test_protect_refuses_what_suite_0_does_not_do() -> None:
    for sc in (0x00, 0x11, 0x70, 0xB0):
        with pytest.raises(LocalProtocolError):
            _protect(sc)
    with pytest.raises(LocalProtocolError):
        protect(
            PLAIN, security_control=0x30, system_title=b"short", invocation_counter=1, keys=GREEN_BOOK_KEYS
        )
    with pytest.raises(LocalProtocolError):
        protect(
            PLAIN,
            security_control=0x30,
            system_title=SERVER_TITLE,
            invocation_counter=-1,
            keys=GREEN_BOOK_KEYS,
        )


def test_invocation_counter_never_repeats_and_refuses_to_wrap() -> None:
    counter = InvocationCounter(INVOCATION_COUNTER_MAX - 1)
    assert counter.last_used is None
    assert [counter.take(), counter.take()] == [INVOCATION_COUNTER_MAX - 1, INVOCATION_COUNTER_MAX]
    assert counter.last_used == INVOCATION_COUNTER_MAX
    with pytest.raises(LocalProtocolError, match="exhausted"):
        counter.take()
    assert counter.last_used == INVOCATION_COUNTER_MAX
    with pytest.raises(LocalProtocolError):
        InvocationCounter(-1)


def test_keys_stay_out_of_reprs_and_errors() -> None:
    assert repr(GREEN_BOOK_KEYS) == "Keys(<hidden>)"
    with pytest.raises(LocalProtocolError) as info:
        Keys.from_hex("zz0102030405060708090A0B0C0D0E0F", "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
    assert "zz01" not in str(info.value) and "D0D1" not in str(info.value)
    with pytest.raises(LocalProtocolError, match="16 bytes"):
        Keys(b"short", bytes(16))
    assert (
        Keys.from_hex("00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F", "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
        == GREEN_BOOK_KEYS
    )


def test_policy_levels() -> None:
    both = SecurityPolicy.AUTHENTICATED_ENCRYPTED
    assert both.security_control == 0x30 and both.satisfied_by(0x30) and not both.satisfied_by(0x10)
    assert SecurityPolicy.AUTHENTICATED.satisfied_by(0x30) and SecurityPolicy.NONE.satisfied_by(0x00)
    assert not SecurityPolicy.ENCRYPTED.satisfied_by(0x10)


def test_hls_verification_refuses_malformed_answers() -> None:
    for answer in (b"", b"\x30" + bytes(16), b"\x10" + bytes(10)):
        assert not verify_hls_gmac(
            answer, system_title=SERVER_TITLE, keys=GREEN_BOOK_KEYS, challenge=b"12345678"
        )


@PROPS
@given(st.binary(max_size=200), st.sampled_from([0x10, 0x20, 0x30]), st.integers(0, INVOCATION_COUNTER_MAX))
def test_protect_unprotect_round_trip(plaintext: bytes, sc: int, counter: int) -> None:
    protected = protect(
        plaintext,
        security_control=sc,
        system_title=SERVER_TITLE,
        invocation_counter=counter,
        keys=GREEN_BOOK_KEYS,
    )
    opened = unprotect(protected, system_title=SERVER_TITLE, keys=GREEN_BOOK_KEYS)
    assert (opened.plaintext, opened.security_control, opened.invocation_counter) == (plaintext, sc, counter)


@PROPS
@given(st.binary(max_size=80))
def test_random_content_only_raises_remote_errors(content: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        unprotect(content, system_title=SERVER_TITLE, keys=GREEN_BOOK_KEYS)
