"""The config port's encrypted envelope (format version 2): AES-256-CBC, HMAC-SHA256, replay protection.

When the WM-E parameter ``fw_server_encrypt`` is 1, every body on the config port (both ways) is one
envelope, and so is an MQTT ``param/set`` request. The format is the contract with head-end tools;
``docs/remote-config.md`` has the same text and the changes from version 1.

Keys
    ``K`` = the 32 bytes of ``fw_server_key`` (:func:`dcud.config.wme.key_bytes`: 64 hex digits are
    the bytes they spell, 32 printable ASCII characters are their own bytes).
    Encryption key: ``K`` itself (AES-256-CBC "with the key fw_server_key").
    MAC key: HKDF-SHA256 (RFC 5869) of ``K`` with an empty salt and info
    ``"dcud fw_server mac v2"``, 32 bytes. The two keys are never the same bytes.

Layout (all integers big-endian)::

    offset  size  field
    0       4     magic "DCUE"
    4       1     version, 2
    5       1     kind: 1 request, 2 response (DCU to head-end), 3 stream header (a request whose
                  body follows the envelope, see below)
    6       2     reserved, 0
    8       8     timestamp: seconds since 1970-01-01 UTC of the sender's clock
    16      16    nonce: random, never reused
    32      16    IV: random
    48      16*n  ciphertext: AES-256-CBC(K, IV, PKCS#7-padded plaintext), n >= 1
    end-32  32    tag: HMAC-SHA256(mac key, len(device_id) as 1 byte || device_id
                                   || len(context) as 2 bytes || context || bytes 0..end-32)

``device_id`` is the DCU's ``device_id`` (dcud.toml): an envelope sealed for one DCU is refused by
every other one, even when a fleet shares one key. ``context`` binds an envelope to its use; neither
is transmitted (both ends know them): ``"<METHOD> <request-target>"`` for a request
(``"PUT /config"``, ``"PUT /config?dry_run=1"``), ``"RESPONSE <status> <request nonce as 32 lower-case
hex digits>"`` for a response, so that an upload cannot be replayed against another path or DCU, and
a response cannot be swapped for another one.

Streamed bodies (firmware, kind 3): the request body is a kind-3 envelope whose plaintext is a
56-byte manifest, followed by the body itself::

    manifest: body_bytes (8) || body_sha256 (32) || body_iv (16)      -> a 144-byte envelope
    body:     AES-256-CBC(K, body_iv, PKCS#7-padded file), body_bytes long, SHA-256 body_sha256

The DCU checks the envelope's tag (and the replay rules) **before it writes one byte of the body**,
then decrypts the body as it arrives into a temporary file, and installs it only if the body is
exactly ``body_bytes`` long and its SHA-256 matches (checked before the padding is looked at). So a
DCU with little RAM authenticates a large upload without holding or spooling it.

Checks, in this order (:func:`open_envelope`): length and magic/version/kind, then the tag (constant
time) **before anything is decrypted**, then decryption and padding. Only then the replay rules
(:class:`ReplayGuard`): the nonce was never seen, the timestamp is not older than the newest
accepted one minus the window (default 300 s), and, while the DCU's clock is known to be synchronised,
it is within the window of the DCU's clock. The guard's state is persisted durably before a request
is accepted, and a request whose state cannot be persisted is refused (:class:`ReplayStateError`).

This module is pure (no I/O except :class:`ReplayGuard`'s state file), and runnable as a small tool
for head-end scripts and tests (``K`` a file holding the key, or ``--key``, or ``DCUD_FW_KEY``)::

    alias envelope="python -m dcud.service.crypto_envelope"
    envelope seal --key-file K --device-id dcu-0001 --context "PUT /config" <wme.conf >body.bin
    envelope seal --stream --key-file K --device-id dcu-0001 --context "PUT /firmware" <fw.img >fw.bin
    envelope open --response --key-file K --device-id dcu-0001 --context "RESPONSE 200 <nonce>" <reply.bin
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dcud.config.wme import key_bytes
from dcud.errors import DcudError
from dcud.runtime.durable import write_durably

MAGIC: Final = b"DCUE"
VERSION: Final = 2
KIND_REQUEST: Final = 1
KIND_RESPONSE: Final = 2
KIND_STREAM: Final = 3
HEADER_BYTES: Final = 48
TAG_BYTES: Final = 32
BLOCK_BYTES: Final = 16
NONCE_BYTES: Final = 16
MIN_ENVELOPE_BYTES: Final = HEADER_BYTES + BLOCK_BYTES + TAG_BYTES
MAC_INFO: Final = b"dcud fw_server mac v2"
DEFAULT_WINDOW_S: Final = 300.0
DEFAULT_MAX_NONCES: Final = 1024
_HEADER = struct.Struct(">4sBBHQ16s16s")
_MANIFEST = struct.Struct(">Q32s16s")
MANIFEST_BYTES: Final = _MANIFEST.size
STREAM_HEADER_BYTES: Final = HEADER_BYTES + (MANIFEST_BYTES // BLOCK_BYTES + 1) * BLOCK_BYTES + TAG_BYTES
"""Size of a kind-3 envelope (the manifest padded to 64 bytes): 144."""
_MAX_CONTEXT_BYTES: Final = 0xFFFF
_MAX_DEVICE_ID_BYTES: Final = 0xFF
_KINDS: Final = (KIND_REQUEST, KIND_RESPONSE, KIND_STREAM)


class EnvelopeError(DcudError):
    """An envelope was refused. ``reason`` is a short stable code for replies and counters."""

    reason = "malformed"


class MalformedEnvelopeError(EnvelopeError):
    """Not an envelope of this format (too short, wrong magic, version or kind, bad length)."""

    reason = "malformed"


class EnvelopeAuthError(EnvelopeError):
    """The tag does not match: wrong key, wrong device_id or context, or the bytes were changed."""

    reason = "authentication failed"


class ReplayedEnvelopeError(EnvelopeError):
    """Authentic, but seen before, older than the window, or too far from the DCU's clock."""

    reason = "replayed or stale"


class ReplayStateError(EnvelopeError):
    """Authentic and fresh, but the replay state could not be saved: the request is refused, because
    accepting it would let it be replayed after a restart."""

    reason = "replay state not saved"


@dataclass(frozen=True)
class EnvelopeKeys:
    """The two keys derived from one ``fw_server_key``. ``repr`` never shows them."""

    enc_key: bytes
    mac_key: bytes

    def __repr__(self) -> str:
        return "EnvelopeKeys(***)"

    @classmethod
    def from_secret(cls, key: bytes) -> EnvelopeKeys:
        """Derive from the 32 key bytes (see the module docstring)."""
        # cryptography costs ~9 MB of RSS: imported only when a DCU actually uses encryption.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(key) != 32:
            raise ValueError("fw_server_key must be 32 bytes (AES-256)")
        mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_INFO).derive(key)
        return cls(enc_key=bytes(key), mac_key=mac_key)

    @classmethod
    def from_parameter(cls, text: str) -> EnvelopeKeys:
        """Derive from the ``fw_server_key`` parameter text (64 hex digits or 32 ASCII characters)."""
        return cls.from_secret(key_bytes(text))


@dataclass(frozen=True)
class Opened:
    """An authenticated, decrypted envelope."""

    plaintext: bytes
    timestamp_s: int
    nonce: bytes
    kind: int


def is_envelope(data: bytes) -> bool:
    """Whether ``data`` starts like an envelope (a cheap test to tell it from a plain body)."""
    return data[:4] == MAGIC


def _mac_prefix(context: bytes, device_id: str) -> bytes:
    device = device_id.encode("utf-8")
    if not device or len(device) > _MAX_DEVICE_ID_BYTES:
        raise ValueError("device_id must be 1..255 bytes")
    if len(context) > _MAX_CONTEXT_BYTES:
        raise ValueError("context too long")
    return bytes([len(device)]) + device + struct.pack(">H", len(context)) + context


def new_mac(keys: EnvelopeKeys, context: bytes, device_id: str) -> hmac.HMAC:
    """An HMAC-SHA256 already fed with the device_id and context prefix."""
    mac = hmac.new(keys.mac_key, digestmod="sha256")
    mac.update(_mac_prefix(context, device_id))
    return mac


def _encrypt(keys: EnvelopeKeys, iv: bytes, plaintext: bytes) -> bytes:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    padder = padding.PKCS7(BLOCK_BYTES * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(keys.enc_key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def seal(
    keys: EnvelopeKeys,
    plaintext: bytes,
    context: bytes,
    *,
    device_id: str,
    kind: int = KIND_REQUEST,
    now_s: float | None = None,
    nonce: bytes | None = None,
    iv: bytes | None = None,
) -> bytes:
    """Encrypt and authenticate ``plaintext`` for ``context`` on the DCU ``device_id``; ``now_s``
    defaults to the wall clock."""
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind}")
    nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES)
    iv = iv if iv is not None else secrets.token_bytes(BLOCK_BYTES)
    if len(nonce) != NONCE_BYTES or len(iv) != BLOCK_BYTES:
        raise ValueError("nonce and IV are 16 bytes each")
    timestamp = int(time.time() if now_s is None else now_s)
    header = _HEADER.pack(MAGIC, VERSION, kind, 0, max(0, timestamp), nonce, iv)
    ciphertext = _encrypt(keys, iv, plaintext)
    mac = new_mac(keys, context, device_id)
    mac.update(header)
    mac.update(ciphertext)
    return header + ciphertext + mac.digest()


@dataclass(frozen=True)
class EnvelopeHeader:
    """The clear fields of an envelope's first 48 bytes."""

    kind: int
    timestamp_s: int
    nonce: bytes
    iv: bytes


def parse_header(data: bytes, expected_kind: int | None = None) -> EnvelopeHeader:
    """The header fields; MalformedEnvelopeError unless magic, version, reserved and kind are right."""
    if len(data) < HEADER_BYTES:
        raise MalformedEnvelopeError("envelope shorter than its header")
    magic, version, kind, reserved, timestamp, nonce, iv = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedEnvelopeError("not an envelope (magic)")
    if version == 1:
        raise MalformedEnvelopeError(
            "envelope format version 1 is no longer accepted: seal with this DCU's device_id "
            "(format version 2, docs/remote-config.md)"
        )
    if version != VERSION or reserved != 0:
        raise MalformedEnvelopeError(f"unsupported envelope version {version}")
    if kind not in _KINDS or (expected_kind is not None and kind != expected_kind):
        raise MalformedEnvelopeError(f"unexpected envelope kind {kind}")
    return EnvelopeHeader(kind, timestamp, nonce, iv)


def check_length(total_bytes: int) -> None:
    """MalformedEnvelopeError unless ``total_bytes`` can be a whole envelope."""
    body = total_bytes - HEADER_BYTES - TAG_BYTES
    if body < BLOCK_BYTES or body % BLOCK_BYTES:
        raise MalformedEnvelopeError("envelope length is not header + 16*n + tag")


def open_envelope(
    keys: EnvelopeKeys,
    data: bytes,
    context: bytes,
    *,
    device_id: str,
    expected_kind: int = KIND_REQUEST,
) -> Opened:
    """Check the tag, then decrypt; raises MalformedEnvelopeError or EnvelopeAuthError. No replay check."""
    header = parse_header(data, expected_kind)
    check_length(len(data))
    body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    mac = new_mac(keys, context, device_id)
    mac.update(body)
    if not hmac.compare_digest(mac.digest(), tag):
        raise EnvelopeAuthError("authentication tag does not match")
    ciphertext = body[HEADER_BYTES:]
    return Opened(decrypt(keys, header.iv, ciphertext), header.timestamp_s, header.nonce, header.kind)


def decrypt(keys: EnvelopeKeys, iv: bytes, ciphertext: bytes) -> bytes:
    """AES-256-CBC decryption and PKCS#7 unpadding of an already authenticated ciphertext."""
    stream = StreamDecryptor(keys, iv)
    return stream.update(ciphertext) + stream.finalize()


class StreamDecryptor:
    """Incremental AES-256-CBC decryption + PKCS#7 unpadding of an authenticated ciphertext."""

    def __init__(self, keys: EnvelopeKeys, iv: bytes) -> None:
        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._decryptor = Cipher(algorithms.AES(keys.enc_key), modes.CBC(iv)).decryptor()
        self._unpadder = padding.PKCS7(BLOCK_BYTES * 8).unpadder()

    def update(self, ciphertext: bytes) -> bytes:
        """Plaintext for this piece of ciphertext (may lag behind by up to one block)."""
        return self._unpadder.update(self._decryptor.update(ciphertext))

    def finalize(self) -> bytes:
        """The last plaintext bytes; MalformedEnvelopeError on bad padding."""
        try:
            return self._unpadder.update(self._decryptor.finalize()) + self._unpadder.finalize()
        except ValueError:
            # Only a key holder can get here (the tag or hash matched): a broken sender, not an oracle.
            raise MalformedEnvelopeError("bad padding") from None


# -- streamed bodies (kind 3) ----------------------------------------------------------------------


@dataclass(frozen=True)
class StreamManifest:
    """What a kind-3 envelope promises about the body that follows it."""

    body_bytes: int
    """Length of the encrypted body (a multiple of 16, at least 16)."""
    body_sha256: bytes
    body_iv: bytes


@dataclass(frozen=True)
class StreamHeader:
    """An authenticated kind-3 envelope: its replay fields and the manifest of the body."""

    timestamp_s: int
    nonce: bytes
    manifest: StreamManifest


def seal_stream(
    keys: EnvelopeKeys,
    plaintext: bytes,
    context: bytes,
    *,
    device_id: str,
    now_s: float | None = None,
    nonce: bytes | None = None,
    iv: bytes | None = None,
    body_iv: bytes | None = None,
) -> bytes:
    """A streamed request body: the kind-3 envelope of the manifest, then the encrypted body."""
    body_iv = body_iv if body_iv is not None else secrets.token_bytes(BLOCK_BYTES)
    if len(body_iv) != BLOCK_BYTES:
        raise ValueError("body IV is 16 bytes")
    body = _encrypt(keys, body_iv, plaintext)
    manifest = _MANIFEST.pack(len(body), hashlib.sha256(body).digest(), body_iv)
    header = seal(
        keys, manifest, context, device_id=device_id, kind=KIND_STREAM, now_s=now_s, nonce=nonce, iv=iv
    )
    return header + body


def open_stream_header(keys: EnvelopeKeys, data: bytes, context: bytes, *, device_id: str) -> StreamHeader:
    """Authenticate the first :data:`STREAM_HEADER_BYTES` of a streamed body (tag before decryption)."""
    if len(data) != STREAM_HEADER_BYTES:
        raise MalformedEnvelopeError(f"a stream header is {STREAM_HEADER_BYTES} bytes")
    opened = open_envelope(keys, data, context, device_id=device_id, expected_kind=KIND_STREAM)
    if len(opened.plaintext) != MANIFEST_BYTES:
        raise MalformedEnvelopeError("stream manifest has the wrong size")
    body_bytes, body_sha256, body_iv = _MANIFEST.unpack(opened.plaintext)
    if body_bytes < BLOCK_BYTES or body_bytes % BLOCK_BYTES:
        raise MalformedEnvelopeError("stream body length is not 16*n")
    return StreamHeader(opened.timestamp_s, opened.nonce, StreamManifest(body_bytes, body_sha256, body_iv))


class StreamBodyOpener:
    """Decrypts a streamed body as it arrives, hashing the ciphertext; :meth:`finalize` refuses a body
    that is not exactly the one its authenticated manifest describes, before padding is looked at."""

    def __init__(self, keys: EnvelopeKeys, manifest: StreamManifest) -> None:
        self.manifest = manifest
        self.received_bytes = 0
        self._hash = hashlib.sha256()
        self._decryptor = StreamDecryptor(keys, manifest.body_iv)

    def update(self, ciphertext: bytes) -> bytes:
        """Plaintext of this piece (lags up to one block); MalformedEnvelopeError past the length."""
        self.received_bytes += len(ciphertext)
        if self.received_bytes > self.manifest.body_bytes:
            raise MalformedEnvelopeError("body longer than its manifest says")
        self._hash.update(ciphertext)
        return self._decryptor.update(ciphertext)

    def finalize(self) -> bytes:
        """The last plaintext bytes, once length and SHA-256 match the manifest."""
        if self.received_bytes != self.manifest.body_bytes:
            raise MalformedEnvelopeError("body shorter than its manifest says")
        if not hmac.compare_digest(self._hash.digest(), self.manifest.body_sha256):
            raise EnvelopeAuthError("body does not match its authenticated manifest (SHA-256)")
        return self._decryptor.finalize()


def request_context(method: str, target: str) -> bytes:
    """The context of a request: ``"<METHOD> <request-target>"``."""
    return f"{method} {target}".encode("latin-1")


def response_context(status: int, request_nonce: bytes) -> bytes:
    """The context of a response: ``"RESPONSE <status> <request nonce hex>"``."""
    return f"RESPONSE {status} {request_nonce.hex()}".encode("ascii")


class ReplayGuard:
    """Refuses an authentic envelope seen before or too old; bounded memory, optional state file.

    Accepts ``(timestamp_s, nonce)`` when, with ``H`` the newest timestamp accepted so far:

    1. ``timestamp_s >= H - window_s`` and ``timestamp_s > floor_s`` (the floor rises when the oldest
       remembered nonce is forgotten because ``max_nonces`` is reached);
    2. the nonce is not among the remembered ones (every nonce accepted within the window);
    3. when ``clock_trusted()`` (the DCU clock is NTP-synchronised): ``|timestamp_s - now_s| <= window_s``.
       Without a synchronised clock rule 3 is skipped, so that a DCU whose clock is wrong can still be
       reconfigured (to fix its NTP server, say); rules 1 and 2 still refuse replays.

    ``H`` never moves more than ``window_s`` ahead of a trusted clock. The state is saved durably
    (:func:`~dcud.runtime.durable.write_durably`) before :meth:`check` accepts, so replays stay refused
    across restarts and power cuts; when it cannot be saved, :meth:`check` raises
    :class:`ReplayStateError` and the caller refuses the request. The nonce stays remembered in memory
    then (an envelope once presented is never accepted later), so a refusal never opens a hole.
    """

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        state_path: Path | None = None,
        max_nonces: int = DEFAULT_MAX_NONCES,
        clock_trusted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.window_s = window_s
        self.max_nonces = max_nonces
        self.state_path = state_path
        self._clock_trusted = clock_trusted
        self.high_water_s = 0
        self.floor_s = -1
        self._nonces: dict[bytes, int] = {}
        self.refused = 0
        self.accepted = 0
        self.save_failures = 0
        if state_path is not None:
            self._load(state_path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            self.high_water_s = int(data["high_water_s"])
            self.floor_s = int(data["floor_s"])
            nonces = data["nonces"]
            if not isinstance(nonces, dict):
                raise TypeError("nonces")
            self._nonces = {bytes.fromhex(k): int(v) for k, v in list(nonces.items())[-self.max_nonces :]}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            # An unreadable state must not reopen the window: refuse everything not newer than now.
            self.floor_s = int(time.time())
            self.high_water_s = self.floor_s
            self._nonces = {}

    @property
    def remembered(self) -> int:
        """How many nonces are remembered now."""
        return len(self._nonces)

    def check(self, timestamp_s: int, nonce: bytes, now_s: float) -> None:
        """Accept and remember, or raise ReplayedEnvelopeError (nothing is remembered then) or
        ReplayStateError (remembered in memory, but not saved: refuse the request)."""
        trusted = self._clock_trusted()
        problem = ""
        if nonce in self._nonces:
            problem = "nonce already used"
        elif timestamp_s <= self.floor_s or timestamp_s < self.high_water_s - self.window_s:
            problem = "older than the replay window"
        elif trusted and abs(timestamp_s - now_s) > self.window_s:
            problem = "timestamp too far from the DCU clock"
        if problem:
            self.refused += 1
            raise ReplayedEnvelopeError(problem)
        self._nonces[nonce] = timestamp_s
        newest = timestamp_s if not trusted else min(timestamp_s, int(now_s + self.window_s))
        self.high_water_s = max(self.high_water_s, newest)
        self._prune()
        self._save()
        self.accepted += 1

    def _prune(self) -> None:
        oldest_allowed = self.high_water_s - self.window_s
        for nonce, ts in list(self._nonces.items()):
            if ts < oldest_allowed:
                del self._nonces[nonce]
        while len(self._nonces) > self.max_nonces:
            nonce, ts = min(self._nonces.items(), key=lambda item: item[1])
            del self._nonces[nonce]
            self.floor_s = max(self.floor_s, ts)

    def _save(self) -> None:
        if self.state_path is None:
            return
        data = {
            "high_water_s": self.high_water_s,
            "floor_s": self.floor_s,
            "nonces": {k.hex(): v for k, v in self._nonces.items()},
        }
        try:
            write_durably(self.state_path, json.dumps(data).encode("ascii"), 0o600)
        except OSError as exc:
            self.save_failures += 1
            raise ReplayStateError(f"cannot save {self.state_path.name}: {exc.strerror or exc}") from None

    def describe(self, now_s: float) -> dict[str, object]:
        """What a refused client may be told to fix its clock (nothing secret)."""
        return {
            "dcu_time_s": int(now_s),
            "oldest_accepted_ts": max(self.floor_s + 1, int(self.high_water_s - self.window_s)),
            "window_s": self.window_s,
        }


# -- a small tool for head-end scripts and tests --------------------------------------------------


def _read_key(args: argparse.Namespace) -> EnvelopeKeys:
    text = Path(args.key_file).read_text().strip() if args.key_file else (args.key or "")
    if not text:
        text = os.environ.get("DCUD_FW_KEY", "")
    return EnvelopeKeys.from_parameter(text)


def main(argv: list[str] | None = None) -> int:
    """``seal``: stdin plaintext to an envelope on stdout (``--stream``: a streamed firmware body);
    ``open``: the reverse (exit 1 if refused); ``nonce``: the nonce of a sealed request."""
    parser = argparse.ArgumentParser(prog="python -m dcud.service.crypto_envelope")
    parser.add_argument("action", choices=["seal", "open", "nonce"])
    parser.add_argument("--key", help="fw_server_key text (or DCUD_FW_KEY in the environment)")
    parser.add_argument("--key-file", help="file holding the fw_server_key text")
    parser.add_argument(
        "--device-id",
        default=os.environ.get("DCUD_DEVICE_ID", ""),
        help="the DCU's device_id (or DCUD_DEVICE_ID)",
    )
    parser.add_argument("--context", default="", help='e.g. "PUT /config" or "RESPONSE 200 <nonce hex>"')
    parser.add_argument("--response", action="store_true", help="seal/open a response (kind 2)")
    parser.add_argument("--stream", action="store_true", help="seal a streamed body (PUT /firmware, kind 3)")
    args = parser.parse_args(argv)
    data = sys.stdin.buffer.read()
    if args.action == "nonce":  # the nonce of a sealed request, to open its response with
        sys.stdout.buffer.write(parse_header(data).nonce.hex().encode() + b"\n")
        return 0
    if not args.device_id:
        parser.error("--device-id (or DCUD_DEVICE_ID) is required: envelopes are bound to one DCU")
    keys = _read_key(args)
    kind = KIND_RESPONSE if args.response else KIND_REQUEST
    context = args.context.encode("latin-1")
    if args.action == "seal":
        if args.stream:
            sealed = seal_stream(keys, data, context, device_id=args.device_id)
        else:
            sealed = seal(keys, data, context, device_id=args.device_id, kind=kind)
        sys.stdout.buffer.write(sealed)
        return 0
    try:
        opened = open_envelope(keys, data, context, device_id=args.device_id, expected_kind=kind)
    except EnvelopeError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(opened.plaintext)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
