"""The config port's envelope: format, tag before decryption, replay rules, the command-line tool."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from dcud.service import crypto_envelope as ce
from dcud.service.crypto_envelope import (
    KIND_REQUEST,
    KIND_RESPONSE,
    EnvelopeAuthError,
    EnvelopeError,
    EnvelopeKeys,
    MalformedEnvelopeError,
    ReplayedEnvelopeError,
    ReplayGuard,
    StreamDecryptor,
    open_envelope,
    parse_header,
    request_context,
    response_context,
    seal,
)

KEY_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
KEYS = EnvelopeKeys.from_parameter(KEY_HEX)
CTX = b"PUT /config"
DEV = "dcu-0001"


def test_key_derivation_known_answer() -> None:
    # HKDF-SHA256(K, salt = 32 zero bytes, info) with one output block, written out with hmac alone:
    # a head-end implementer can check their code against this.
    prk = hmac.new(b"\x00" * 32, bytes.fromhex(KEY_HEX), hashlib.sha256).digest()
    okm = hmac.new(prk, b"dcud fw_server mac v2" + b"\x01", hashlib.sha256).digest()
    assert KEYS.mac_key == okm
    assert KEYS.enc_key == bytes.fromhex(KEY_HEX)
    assert KEYS.mac_key != KEYS.enc_key
    assert "00010203" not in repr(KEYS)


def test_ascii_key_is_its_bytes() -> None:
    text = "0123456789abcdefghijklmnopqrstuv"
    assert EnvelopeKeys.from_parameter(text).enc_key == text.encode()


def test_layout_is_the_documented_one() -> None:
    nonce, iv = bytes(range(16)), bytes(range(16, 32))
    data = seal(KEYS, b"ntp_interval=300\n", CTX, device_id=DEV, now_s=1_700_000_000, nonce=nonce, iv=iv)
    assert data[:4] == b"DCUE" and data[4] == 2 and data[5] == KIND_REQUEST and data[6:8] == b"\0\0"
    assert int.from_bytes(data[8:16], "big") == 1_700_000_000
    assert data[16:32] == nonce and data[32:48] == iv
    ciphertext, tag = data[48:-32], data[-32:]
    assert len(ciphertext) == 32  # 17 bytes padded to two blocks
    decryptor = Cipher(algorithms.AES(bytes.fromhex(KEY_HEX)), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    assert padded == b"ntp_interval=300\n" + bytes([15]) * 15
    prefix = bytes([len(DEV)]) + DEV.encode() + len(CTX).to_bytes(2, "big") + CTX
    expected = hmac.new(KEYS.mac_key, prefix + data[:-32], hashlib.sha256)
    assert tag == expected.digest()


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000])
def test_round_trip(size: int) -> None:
    plaintext = bytes(i % 251 for i in range(size))
    data = seal(KEYS, plaintext, CTX, device_id=DEV)
    opened = open_envelope(KEYS, data, CTX, device_id=DEV)
    assert opened.plaintext == plaintext
    assert opened.nonce == parse_header(data).nonce


def test_every_changed_byte_is_refused_before_decryption(monkeypatch: pytest.MonkeyPatch) -> None:
    data = seal(KEYS, b"fw_server_encrypt=1\n", CTX, device_id=DEV)

    def no_decrypt(*_args: object) -> bytes:
        raise AssertionError("decrypted before the tag was checked")

    monkeypatch.setattr(ce, "decrypt", no_decrypt)
    for index in range(len(data)):
        tampered = bytearray(data)
        tampered[index] ^= 0x01
        with pytest.raises(EnvelopeError):
            open_envelope(KEYS, bytes(tampered), CTX, device_id=DEV)


def test_refusals_have_their_own_types() -> None:
    data = seal(KEYS, b"x", CTX, device_id=DEV)
    with pytest.raises(EnvelopeAuthError):
        open_envelope(KEYS, data, b"PUT /firmware", device_id=DEV)  # replayed against another resource
    with pytest.raises(EnvelopeAuthError):
        open_envelope(EnvelopeKeys.from_parameter("ff" * 32), data, CTX, device_id=DEV)
    with pytest.raises(MalformedEnvelopeError):
        open_envelope(KEYS, data[:-1], CTX, device_id=DEV)
    with pytest.raises(MalformedEnvelopeError):
        open_envelope(KEYS, b"DCUE", CTX, device_id=DEV)
    with pytest.raises(MalformedEnvelopeError):
        open_envelope(KEYS, b"ntp_interval=300\n" * 8, CTX, device_id=DEV)
    with pytest.raises(MalformedEnvelopeError):  # a response is not a request
        open_envelope(KEYS, seal(KEYS, b"x", CTX, device_id=DEV, kind=KIND_RESPONSE), CTX, device_id=DEV)
    longer = seal(KEYS, bytes(40), CTX, device_id=DEV)
    truncated = longer[:48] + longer[64:]  # one block less: length still fine, tag is not
    with pytest.raises(EnvelopeAuthError):
        open_envelope(KEYS, truncated, CTX, device_id=DEV)


def test_response_is_bound_to_status_and_request() -> None:
    request_nonce = bytes(16)
    body = seal(KEYS, b"{}", response_context(200, request_nonce), kind=KIND_RESPONSE, device_id=DEV)
    assert open_envelope(
        KEYS, body, response_context(200, request_nonce), expected_kind=KIND_RESPONSE, device_id=DEV
    )
    with pytest.raises(EnvelopeAuthError):
        open_envelope(
            KEYS, body, response_context(422, request_nonce), expected_kind=KIND_RESPONSE, device_id=DEV
        )
    with pytest.raises(EnvelopeAuthError):
        open_envelope(
            KEYS, body, response_context(200, b"\1" * 16), expected_kind=KIND_RESPONSE, device_id=DEV
        )
    assert request_context("PUT", "/config?dry_run=1") == b"PUT /config?dry_run=1"


def test_stream_decryptor_matches_one_shot() -> None:
    plaintext = bytes(range(256)) * 40
    data = seal(KEYS, plaintext, CTX, device_id=DEV)
    header = parse_header(data)
    stream = StreamDecryptor(KEYS, header.iv)
    ciphertext = data[48:-32]
    out = b"".join(stream.update(ciphertext[i : i + 100]) for i in range(0, len(ciphertext), 100))
    assert out + stream.finalize() == plaintext


# -- replay rules ------------------------------------------------------------------------------------


def test_replay_guard_refuses_a_nonce_twice() -> None:
    guard = ReplayGuard(300)
    guard.check(1000, b"a" * 16, now_s=0)
    with pytest.raises(ReplayedEnvelopeError, match="nonce"):
        guard.check(1000, b"a" * 16, now_s=0)
    guard.check(1001, b"b" * 16, now_s=0)
    assert guard.refused == 1


def test_replay_guard_window_follows_the_newest_accepted() -> None:
    guard = ReplayGuard(300)
    guard.check(10_000, b"a" * 16, now_s=0)
    guard.check(9_700, b"b" * 16, now_s=0)  # exactly the window: still accepted
    with pytest.raises(ReplayedEnvelopeError, match="older"):
        guard.check(9_699, b"c" * 16, now_s=0)
    # Nonces older than the window are forgotten; their timestamps are refused anyway.
    guard.check(20_000, b"d" * 16, now_s=0)
    assert guard.remembered == 1


def test_replay_guard_checks_the_clock_only_when_it_is_trusted() -> None:
    trusted = [False]
    guard = ReplayGuard(300, clock_trusted=lambda: trusted[0])
    guard.check(5, b"a" * 16, now_s=1_000_000)  # a DCU without a synced clock still accepts
    trusted[0] = True
    with pytest.raises(ReplayedEnvelopeError, match="clock"):
        guard.check(1_000_400, b"b" * 16, now_s=1_000_000)
    guard.check(1_000_250, b"c" * 16, now_s=1_000_000)


def test_trusted_clock_bounds_the_high_water_mark() -> None:
    guard = ReplayGuard(300, clock_trusted=lambda: True)
    guard.check(1_000_290, b"a" * 16, now_s=1_000_000)
    assert guard.high_water_s == 1_000_290
    guard.check(999_995, b"b" * 16, now_s=1_000_000)


def test_replay_guard_memory_is_bounded_and_raises_the_floor() -> None:
    guard = ReplayGuard(10_000, max_nonces=4)
    for i in range(10):
        guard.check(100 + i, bytes([i]) * 16, now_s=0)
    assert guard.remembered == 4
    # A forgotten nonce's timestamp is below the floor now: its replay is still refused.
    with pytest.raises(ReplayedEnvelopeError):
        guard.check(100, bytes([0]) * 16, now_s=0)
    guard.check(110, b"z" * 16, now_s=0)


def test_replay_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "replay.json"
    first = ReplayGuard(300, state_path=path)
    first.check(1000, b"a" * 16, now_s=0)
    assert path.stat().st_mode & 0o777 == 0o600
    second = ReplayGuard(300, state_path=path)
    with pytest.raises(ReplayedEnvelopeError):
        second.check(1000, b"a" * 16, now_s=0)
    with pytest.raises(ReplayedEnvelopeError):
        second.check(600, b"b" * 16, now_s=0)


def test_corrupt_replay_state_does_not_reopen_the_window(tmp_path: Path) -> None:
    path = tmp_path / "replay.json"
    path.write_text("{not json")
    guard = ReplayGuard(300, state_path=path)
    with pytest.raises(ReplayedEnvelopeError):
        guard.check(1000, b"a" * 16, now_s=0)
    assert json.dumps(guard.describe(0))


# -- the command-line tool -------------------------------------------------------------------------


class _Stdio:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def _run(monkeypatch: pytest.MonkeyPatch, argv: list[str], data: bytes) -> tuple[int, bytes]:
    out = _Stdio(b"")
    monkeypatch.setattr(sys, "stdin", _Stdio(data))
    monkeypatch.setattr(sys, "stdout", out)
    code = ce.main(argv)
    return code, out.buffer.getvalue()


def test_tool_seals_and_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--key", KEY_HEX, "--device-id", DEV]
    code, sealed = _run(monkeypatch, ["seal", *base, "--context", "PUT /config"], b"a=1\n")
    assert code == 0 and sealed[:4] == b"DCUE"
    code, plain = _run(monkeypatch, ["open", *base, "--context", "PUT /config"], sealed)
    assert (code, plain) == (0, b"a=1\n")
    code, nonce = _run(monkeypatch, ["nonce"], sealed)
    assert nonce.decode().strip() == parse_header(sealed).nonce.hex()
    code, _ = _run(monkeypatch, ["open", *base, "--context", "PUT /firmware"], sealed)
    assert code == 1
    other = ["--key", KEY_HEX, "--device-id", "dcu-0002", "--context", "PUT /config"]
    assert _run(monkeypatch, ["open", *other], sealed)[0] == 1


def test_tool_needs_a_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DCUD_DEVICE_ID", raising=False)
    with pytest.raises(SystemExit):
        _run(monkeypatch, ["seal", "--key", KEY_HEX, "--context", "PUT /config"], b"a=1\n")


def test_tool_seals_a_firmware_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    firmware = bytes(range(256)) * 300
    argv = ["seal", "--stream", "--key", KEY_HEX, "--device-id", DEV, "--context", "PUT /firmware"]
    code, sealed = _run(monkeypatch, argv, firmware)
    assert code == 0
    assert _open_stream(sealed, b"PUT /firmware") == firmware


# -- format version 2: device binding, streamed bodies ----------------------------------------------


def test_an_envelope_for_another_device_is_refused() -> None:
    # Regression (issue 13): the device_id is inside the tag, so a fleet-wide key cannot replay
    # an envelope sealed for dcu-A on dcu-B.
    data = seal(KEYS, b"ntp_interval=300\n", CTX, device_id="dcu-A")
    assert open_envelope(KEYS, data, CTX, device_id="dcu-A").plaintext == b"ntp_interval=300\n"
    with pytest.raises(EnvelopeAuthError):
        open_envelope(KEYS, data, CTX, device_id="dcu-B")
    # The length prefix keeps device_id and context apart: no shifting of bytes between them.
    with pytest.raises(EnvelopeAuthError):
        open_envelope(KEYS, data, b"APUT /config", device_id="dcu-")


def test_version_1_envelopes_are_refused_with_a_pointer() -> None:
    data = bytearray(seal(KEYS, b"x", CTX, device_id=DEV))
    data[4] = 1
    with pytest.raises(MalformedEnvelopeError, match="version 1 is no longer accepted"):
        open_envelope(KEYS, bytes(data), CTX, device_id=DEV)


def test_bad_device_ids_are_local_errors() -> None:
    with pytest.raises(ValueError):
        seal(KEYS, b"x", CTX, device_id="")
    with pytest.raises(ValueError):
        seal(KEYS, b"x", CTX, device_id="d" * 256)


def _open_stream(data: bytes, context: bytes, device_id: str = DEV, piece: int = 1000) -> bytes:
    header = ce.open_stream_header(KEYS, data[: ce.STREAM_HEADER_BYTES], context, device_id=device_id)
    opener = ce.StreamBodyOpener(KEYS, header.manifest)
    body = data[ce.STREAM_HEADER_BYTES :]
    out = b"".join(opener.update(body[i : i + piece]) for i in range(0, len(body), piece))
    return out + opener.finalize()


@pytest.mark.parametrize("size", [0, 1, 16, 17, 70_000])
def test_stream_round_trip(size: int) -> None:
    plaintext = bytes(i % 251 for i in range(size))
    data = ce.seal_stream(KEYS, plaintext, b"PUT /firmware", device_id=DEV)
    assert ce.STREAM_HEADER_BYTES == 144 and data[5] == ce.KIND_STREAM
    assert len(data) == 144 + (size // 16 + 1) * 16
    for piece in (1, 7, 16, 4096):
        assert _open_stream(data, b"PUT /firmware", piece=piece) == plaintext


def test_stream_header_layout_is_the_documented_one() -> None:
    body_iv = bytes(range(32, 48))
    data = ce.seal_stream(KEYS, b"firmware", b"PUT /firmware", device_id=DEV, body_iv=body_iv)
    opened = open_envelope(KEYS, data[:144], b"PUT /firmware", device_id=DEV, expected_kind=ce.KIND_STREAM)
    body = data[144:]
    assert opened.plaintext == len(body).to_bytes(8, "big") + hashlib.sha256(body).digest() + body_iv
    decryptor = Cipher(algorithms.AES(KEYS.enc_key), modes.CBC(body_iv)).decryptor()
    assert decryptor.update(body) + decryptor.finalize() == b"firmware" + bytes([8]) * 8


def test_stream_header_is_refused_for_another_device_or_context() -> None:
    data = ce.seal_stream(KEYS, b"fw", b"PUT /firmware", device_id=DEV)
    with pytest.raises(EnvelopeAuthError):
        ce.open_stream_header(KEYS, data[:144], b"PUT /firmware", device_id="dcu-9")
    with pytest.raises(EnvelopeAuthError):
        ce.open_stream_header(KEYS, data[:144], b"PUT /config", device_id=DEV)
    with pytest.raises(MalformedEnvelopeError):  # a one-shot envelope is not a stream header
        ce.open_stream_header(
            KEYS, seal(KEYS, bytes(56), b"PUT /firmware", device_id=DEV), b"x", device_id=DEV
        )
    with pytest.raises(MalformedEnvelopeError):
        ce.open_stream_header(KEYS, data[:143], b"PUT /firmware", device_id=DEV)


def test_a_changed_stream_body_is_refused_before_its_padding_is_read() -> None:
    data = ce.seal_stream(KEYS, bytes(1000), b"PUT /firmware", device_id=DEV)
    for index in (144, 600, len(data) - 1):  # last byte: the padding block, no oracle on it
        tampered = bytearray(data)
        tampered[index] ^= 0x80
        with pytest.raises(EnvelopeAuthError, match="SHA-256"):
            _open_stream(bytes(tampered), b"PUT /firmware")
    with pytest.raises(MalformedEnvelopeError, match="shorter"):
        _open_stream(data[:-16], b"PUT /firmware")
    with pytest.raises(MalformedEnvelopeError, match="longer"):
        _open_stream(data + bytes(16), b"PUT /firmware")


# -- durable replay state ----------------------------------------------------------------------------


def test_replay_state_is_written_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = ce.write_durably

    def recording(target: Path, data: bytes, mode: int = 0o600, **kw: bool) -> None:
        calls.append(target)
        real(target, data, mode, **kw)

    monkeypatch.setattr(ce, "write_durably", recording)
    guard = ReplayGuard(300, state_path=tmp_path / "replay.json")
    guard.check(1000, b"a" * 16, now_s=0)
    assert calls == [tmp_path / "replay.json"]


def test_a_replay_state_that_cannot_be_saved_refuses_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression (issue 13): the old _save swallowed OSError and accepted the request anyway.
    import errno

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ce, "write_durably", full)
    guard = ReplayGuard(300, state_path=tmp_path / "replay.json")
    with pytest.raises(ce.ReplayStateError, match="No space"):
        guard.check(1000, b"a" * 16, now_s=0)
    assert guard.accepted == 0 and guard.save_failures == 1
    # The nonce was presented: it is never accepted later, even once the disk works again.
    monkeypatch.undo()
    with pytest.raises(ReplayedEnvelopeError):
        guard.check(1000, b"a" * 16, now_s=0)
    guard.check(1001, b"b" * 16, now_s=0)
    assert json.loads((tmp_path / "replay.json").read_text())["high_water_s"] == 1001


def test_replay_state_in_an_unwritable_place_refuses(tmp_path: Path) -> None:
    blocker = tmp_path / "config_port"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    guard = ReplayGuard(300, state_path=blocker / "replay.json")
    with pytest.raises(ce.ReplayStateError):
        guard.check(int(time.time()) + 5, b"a" * 16, now_s=0)
