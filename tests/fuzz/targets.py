"""Fuzz targets shared by the hypothesis harnesses (CI) and the atheris scripts (on demand).

Each target takes one ``bytes`` input and either returns or raises: a return means the code under test
behaved (it may have refused the input with its typed error), an exception is a finding. The first
byte(s) of the input pick options (receiver side, BCC mode, chunk boundaries...) so that one byte
string reproduces one run exactly; crash inputs are kept in ``tests/vectors/fuzz-regressions/<target>/``.

Targets:
``iec``      IEC 62056-21 receiver (split at data-chosen boundaries), the message parsers, a readout session
``mbus``     M-Bus link parser, frame and application-layer decoders, a readout session
``wme``      the WM-E parameter parser, renderer (round trip), remote-config merge and masking
``http``     the config port's request handling, plain and encrypted, on in-memory streams
``envelope`` the envelope opener on arbitrary bytes
``dlms``     the DLMS APDU and A-XDR decoders, suite 0 unprotect, and a client session fed the bytes as
             the meter's APDUs (2-byte length prefix each), with or without HLS and ciphering
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcud.codec import iec62056 as iec
from dcud.codec.actions import Done, Failed
from dcud.codec.dlms.apdu import decode_apdu
from dcud.codec.dlms.axdr import decode_data
from dcud.codec.dlms.client import Auth, DlmsClient, DlmsClientConfig, GetRequest
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.security import Keys, SecurityPolicy, unprotect
from dcud.codec.dlms.transport import ApduIn
from dcud.codec.iec_session import IecReadout
from dcud.codec.mbus import MbusLinkParser, decode_frame
from dcud.codec.mbus_app import decode_records, decode_user_data
from dcud.codec.mbus_session import MbusReadout
from dcud.config.wme import CATALOGUE, ParameterSet, parse_parameter_text, render_parameter_file
from dcud.errors import ConfigError, ConfigIssue, NegativeResponse, ProtocolError
from dcud.service.crypto_envelope import EnvelopeError, EnvelopeKeys, open_envelope
from dcud.service.remote_config import (
    ApplyResult,
    mask_parameter_text,
    merge_parameter_text,
    parse_updates,
)

TYPED = (ProtocolError, NegativeResponse)
FUZZ_KEY = "5a" * 32
FUZZ_KEYS = EnvelopeKeys.from_parameter(FUZZ_KEY)
"""The port's key in the harness: the strategies seal some bodies with it to reach the deep paths."""
ATTACKER_KEYS = EnvelopeKeys.from_parameter("a5" * 32)
FUZZ_DEVICE = "dcu-fuzz"
"""The harness DCU's device_id (envelopes are bound to it)."""
_SIDES: tuple[iec.ReceiverSide, ...] = ("master", "meter", "p1")


def _cuts(data: bytes, selector: int) -> list[bytes]:
    """Split ``data`` at boundaries derived from ``selector`` (one byte of the input)."""
    if not data:
        return [b""]
    step = 1 + selector % max(1, len(data))
    return [data[i : i + step] for i in range(0, len(data), step)]


# -- IEC 62056-21 ----------------------------------------------------------------------------------


def iec_target(data: bytes) -> None:
    """Receiver + parsers + readout session: only typed errors, and chunking never matters."""
    if len(data) < 2:
        return
    side = _SIDES[data[0] % 3]
    bcc_mode = iec.BCC_MODES[data[1] % len(iec.BCC_MODES)]
    body = data[2:]
    for limit in (iec.DEFAULT_MAX_MESSAGE_BYTES, 512):  # 512: over-long messages are reached too
        whole = _drain_iec(side, bcc_mode, [body], limit)
        split = _drain_iec(side, bcc_mode, _cuts(body, data[0] >> 2), limit)
        assert whole == split, f"IEC receiver result depends on how the bytes were split (limit {limit})"
    for parse in (
        iec.parse_identification,
        iec.parse_request,
        iec.parse_option_select,
        iec.parse_p1_telegram,
        lambda d: iec.parse_data_message(d, bcc_mode),
        lambda d: iec.parse_command_message(d, bcc_mode),
        lambda d: iec.parse_datasets(d.decode("latin-1")),
    ):
        with contextlib.suppress(*TYPED):
            parse(body)
    session = IecReadout("1", bcc_mode=bcc_mode)
    session.start(0.0)
    now = 0.0
    for chunk in _cuts(body, data[1]):
        now += 0.05
        session.receive_data(chunk, now)
        session.handle_timer(now)
    for _ in range(20):  # time always ends a session
        deadline = session.next_deadline()
        if deadline is None:
            break
        session.handle_timer(deadline)
    assert session.next_deadline() is None and session.state in ("done", "failed")


def _drain_iec(
    side: iec.ReceiverSide, bcc_mode: iec.BccMode, chunks: list[bytes], max_bytes: int
) -> list[Any]:
    rx = iec.IecReceiver(side=side, bcc_mode=bcc_mode, max_message_bytes=max_bytes)
    out: list[Any] = []
    for chunk in chunks:
        rx.receive_data(chunk)
        for _ in range(100_000):
            try:
                message = rx.next_message()
            except TYPED as exc:
                out.append(type(exc).__name__)
                continue
            if message is None:
                break
            out.append(message)
        else:
            raise AssertionError("IEC receiver did not settle")
    return out


# -- M-Bus --------------------------------------------------------------------------------------------


def mbus_target(data: bytes) -> None:
    """Link parser (split-independent, consumes every byte), decoders (typed errors), a session."""
    if not data:
        return
    whole = _parse_link([data])
    assert whole == _parse_link(_cuts(data, data[0])), "M-Bus link events depend on the split"
    with contextlib.suppress(*TYPED):
        decode_frame(data)
    if len(data) > 1:
        with contextlib.suppress(*TYPED):
            decode_user_data(data[0], data[1:], address=data[-1])
    with contextlib.suppress(*TYPED):
        decode_records(data, msb_first=bool(data[0] & 1))
    session = MbusReadout(data[0] % 251)
    session.start(0.0)
    now = 0.0
    for chunk in _cuts(data, data[-1]):
        now += 0.02
        session.receive_data(chunk, now)
        session.handle_timer(now)
    for _ in range(200):
        deadline = session.next_deadline()
        if deadline is None:
            break
        session.handle_timer(deadline)
    assert session.next_deadline() is None


def _parse_link(chunks: list[bytes]) -> list[Any]:
    parser = MbusLinkParser()
    events: list[Any] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        events += parser.events()
    return events + parser.flush()


# -- WM-E parameter file ------------------------------------------------------------------------------

_SECRETS = [name for name, p in CATALOGUE.items() if p.secret]


def wme_target(data: bytes) -> None:
    """Parser never raises; issues are well formed; render round-trips; secrets never echo; merge is sane."""
    text = data.decode("utf-8", errors="replace")
    params, issues = parse_parameter_text(text, "fuzz.conf")
    lines = text.count("\n") + 1
    for issue in issues:
        assert isinstance(issue, ConfigIssue) and 0 <= issue.line <= lines
        str(issue)
    again, again_issues = parse_parameter_text(render_parameter_file(params), "fuzz.conf")
    assert dict(again.raw) == dict(params.raw), "render/parse round trip changed the values"
    assert not [i for i in again_issues if "set twice" in i.message]
    # A secret value in the input never shows in an issue or in the masked text.
    secret_values = _secret_values(text)
    shown = "\n".join(str(i) for i in issues) + mask_parameter_text(text)
    for value in secret_values:
        assert value not in shown, "a secret value was echoed"
    updates, _lines, _issues = parse_updates(text)
    merged, written = merge_parameter_text(text, updates)
    assert all(1 <= n <= merged.count("\n") for n in written)
    params.masked()
    with contextlib.suppress(ValueError, KeyError):
        ParameterSet("fuzz.conf", dict(updates))


def _secret_values(text: str) -> list[str]:
    """Values of secret parameters that could only leak from their own line (long, and nowhere else)."""
    values, others = [], []
    for line in text.split("\n"):
        name, sep, value = line.partition("=")
        value = value.strip(" \t\r")
        if sep and name.strip() in _SECRETS:
            values.append(value)
        else:
            others.append(line)
    rest = "\n".join(others) + "\n".join(CATALOGUE) + "***"
    return [v for v in values if len(v) >= 8 and v not in rest and not any(v in o for o in values if o != v)]


# -- the config port ----------------------------------------------------------------------------------


class _FakeApi:
    """Stands for the reloader: records applies, validates like the loader would (parser only)."""

    def __init__(self) -> None:
        self.applied: list[str] = []

    @property
    def current(self) -> Any:
        raise AssertionError("not used by the port")

    def current_text(self) -> str:
        return f"fw_server_key={FUZZ_KEY}\nntp_interval=600\n"

    async def apply_text(
        self, text: str, *, partial: bool, who: str, via: str, authenticated: bool, dry_run: bool = False
    ) -> ApplyResult:
        _params, issues = parse_parameter_text(text, "upload")
        if issues:
            raise ConfigError(issues)
        self.applied.append(text)
        return ApplyResult({}, [], "fuzz", dry_run)


class _MemoryWriter:
    """The parts of asyncio.StreamWriter the port uses, writing into a buffer."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.buffer += data

    async def drain(self) -> None:
        return None

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class HttpHarness:
    """One config port service per mode (plain, plain with ``plain_writes``, encrypted) on one
    long-lived event loop. Bit 0 of the first byte picks encryption, bit 1 the plain-writes opt-in."""

    def __init__(self) -> None:
        from dcud.config.model import ConfigPortConfig
        from dcud.service.config_port import ConfigPortService, ConfigPortSettings
        from dcud.service.crypto_envelope import ReplayGuard
        from dcud.service.firmware import FirmwareStager

        self._tmp = tempfile.TemporaryDirectory(prefix="dcud-fuzz-http-")
        state = Path(self._tmp.name)
        self.runner = asyncio.Runner()
        self.services = []
        self.apis = []
        for index, (encrypt, plain_writes) in enumerate(((False, False), (True, False), (False, True))):
            limits = ConfigPortConfig(
                max_body_bytes=4096, max_firmware_bytes=4096, header_timeout_s=5.0, plain_writes=plain_writes
            )
            settings = ConfigPortSettings(
                port=0,
                host="127.0.0.1",
                encrypt=encrypt,
                key_text=FUZZ_KEY,
                limits=limits,
                state_dir=str(state),
                device_id=FUZZ_DEVICE,
            )
            api = _FakeApi()
            service = ConfigPortService(settings, api)
            if encrypt:
                service._keys = FUZZ_KEYS
                service._guard = ReplayGuard(300)
            service._firmware = FirmwareStager(state / f"fw{index}", None, 4096)
            self.services.append(service)
            self.apis.append(api)

    def run(self, data: bytes) -> None:
        if not data:
            return
        encrypted = bool(data[0] & 1)
        index = 1 if encrypted else (2 if data[0] & 2 else 0)
        service = self.services[index]
        api = self.apis[index]
        before = len(api.applied)
        staged_before = service._firmware.staged
        guard = service._guard
        accepted_before = guard.accepted if guard is not None else 0
        response = self.runner.run(self._one(service, data[1:]))
        if not response:  # the client closed without sending a request: nothing to answer
            assert not data[1:].strip(b" \t\r\n"), f"no answer to {data[1:80]!r}"
            return
        assert response.startswith(b"HTTP/1.1 "), response[:80]
        status = int(response[9:12])
        assert status in (100, 200, 400, 403, 404, 405, 408, 411, 413, 422, 431, 500, 503), status
        if status == 500:
            raise AssertionError("internal error answered")
        if index == 0:
            # A plain port without the opt-in never changes anything.
            assert len(api.applied) == before, "a plain write was applied without plain_writes"
            assert service._firmware.staged == staged_before, "firmware staged without plain_writes"
        if encrypted:
            # Nothing is applied unless an envelope passed the tag and the replay checks.
            assert guard is not None
            if len(api.applied) > before or service._firmware.staged != staged_before:
                assert guard.accepted > accepted_before, "an unauthenticated body was applied"
            assert FUZZ_KEY.encode() not in response

    async def _one(self, service: Any, data: bytes) -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        writer = _MemoryWriter()
        await service._connection(reader, writer)
        assert writer.closed
        return bytes(writer.buffer)


_HTTP: HttpHarness | None = None


def http_target(data: bytes) -> None:
    """Whatever arrives, the port answers with a well-formed HTTP status and never applies garbage."""
    global _HTTP  # noqa: PLW0603 (one harness per process: loop and temp dir are reused)
    if _HTTP is None:
        _HTTP = HttpHarness()
    _HTTP.run(data)


def envelope_target(data: bytes) -> None:
    """Bytes not sealed with the key (the harness feeds forgeries and mutations): only EnvelopeError."""
    try:
        open_envelope(FUZZ_KEYS, data, b"PUT /config", device_id=FUZZ_DEVICE)
    except EnvelopeError:
        return
    raise AssertionError("forged envelope accepted")


# -- DLMS/COSEM application layer ------------------------------------------------------------------

DLMS_KEYS = Keys(bytes(range(16)), bytes(range(0xD0, 0xE0)))
DLMS_SERVER_TITLE = bytes.fromhex("4D4D4D0000BC614E")
_DLMS_CONFIGS = (
    DlmsClientConfig(response_timeout_s=1.0),
    DlmsClientConfig(
        auth=Auth.HLS_GMAC,
        keys=DLMS_KEYS,
        system_title=bytes.fromhex("4D4D4D0000000001"),
        challenge=b"K56iVagY",
        response_timeout_s=1.0,
    ),
    DlmsClientConfig(
        auth=Auth.LLS,
        password=b"12345678",
        security=SecurityPolicy.AUTHENTICATED_ENCRYPTED,
        keys=DLMS_KEYS,
        system_title=bytes.fromhex("4D4D4D0000000001"),
        response_timeout_s=1.0,
        max_blocks=20,
    ),
)
_DLMS_REQUESTS = [
    GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2")),
    GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/3")),
]


class _LengthPrefixedApdus:
    """An ApduTransport for the fuzzer: each APDU from the 'meter' is a 2-byte length and the bytes."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def open(self, now: float) -> list[object]:
        from dcud.codec.dlms.transport import LinkUp

        return [LinkUp()]

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        return []

    def receive_data(self, data: bytes, now: float) -> list[object]:
        self.buffer += data
        out: list[object] = []
        while len(self.buffer) >= 2 and len(self.buffer) >= 2 + int.from_bytes(self.buffer[:2], "big"):
            size = int.from_bytes(self.buffer[:2], "big")
            out.append(ApduIn(bytes(self.buffer[2 : 2 + size])))
            del self.buffer[: 2 + size]
        return out

    def handle_timer(self, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def close(self, now: float) -> list[object]:
        from dcud.codec.dlms.transport import LinkDown

        return [LinkDown(None)]


def dlms_target(data: bytes) -> None:
    """Decoders raise only typed errors; a session fed anything ends once, in Done or Failed."""
    if not data:
        return
    with contextlib.suppress(*TYPED):
        apdu = decode_apdu(data[1:])
        assert decode_apdu(apdu.encode()).encode() == apdu.encode(), "APDU does not re-encode stably"
    with contextlib.suppress(*TYPED):
        decode_data(data[1:])
    with contextlib.suppress(*TYPED):
        unprotect(data[1:], system_title=DLMS_SERVER_TITLE, keys=DLMS_KEYS)
    client = DlmsClient(_LengthPrefixedApdus(), _DLMS_CONFIGS[data[0] % 3], _DLMS_REQUESTS)
    ends = [a for a in client.start(0.0) if isinstance(a, Done | Failed)]
    now = 0.0
    for chunk in _cuts(data[1:], data[0] >> 2):
        now += 0.01
        ends += [a for a in client.receive_data(chunk, now) if isinstance(a, Done | Failed)]
    for _ in range(50):
        deadline = client.next_deadline()
        if deadline is None:
            break
        ends += [a for a in client.handle_timer(deadline) if isinstance(a, Done | Failed)]
    assert client.next_deadline() is None, "the session never ended"
    assert len(ends) == 1, f"the session ended {len(ends)} times"


class CommandHarness:
    """The command router with every verb's real request struct and do-nothing handlers."""

    def __init__(self) -> None:
        from dcud.service.commands import CommandRouter, Request
        from dcud.service.device_commands import RebootRequest, RestartRequest
        from dcud.service.drive_commands import DriveReadRequest, DriveRequest, DriveWriteRequest
        from dcud.service.polling import ReadRequest, ScanRequest
        from dcud.service.remote_config import ParamGetRequest, ParamSetRequest, parameter_updates

        self.loop = asyncio.new_event_loop()
        self.router = CommandRouter()

        async def done(request: Any, _ctx: Any) -> dict[str, Any]:
            if isinstance(request, ParamSetRequest) and request.set is not None:
                parameter_updates(request.set)  # the per-value check the real handler makes
            return {}

        verbs: dict[str, type[Any]] = {
            "ping": Request,
            "param/get": ParamGetRequest,
            "param/set": ParamSetRequest,
            "read": ReadRequest,
            "scan": ScanRequest,
            "drive/enable": DriveRequest,
            "drive/read": DriveReadRequest,
            "drive/write": DriveWriteRequest,
            "restart": RestartRequest,
            "reboot": RebootRequest,
        }
        changing = ("param/set", "drive/write", "restart", "reboot")
        for verb, request_type in verbs.items():
            self.router.register(verb, request_type, done, state_changing=verb in changing)
        self.verbs = list(verbs)

    def run(self, data: bytes) -> None:
        verb = self.verbs[data[0] % len(self.verbs)] if data else "ping"
        reply = self.loop.run_until_complete(self.router.dispatch(verb, data[1:]))
        assert set(reply) <= {"id", "ok", "result", "error"} and isinstance(reply["ok"], bool), reply
        if not reply["ok"]:
            assert reply["error"]["type"] != "internal", reply
            assert isinstance(reply["error"]["message"], str)


_COMMANDS: CommandHarness | None = None


def commands_target(data: bytes) -> None:
    """First byte: the verb; the rest: the MQTT payload. Always one well-formed reply, never internal."""
    global _COMMANDS  # noqa: PLW0603 (one harness per process: the loop is reused)
    if _COMMANDS is None:
        _COMMANDS = CommandHarness()
    _COMMANDS.run(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "dlms": dlms_target,
    "iec": iec_target,
    "mbus": mbus_target,
    "wme": wme_target,
    "http": http_target,
    "envelope": envelope_target,
    "commands": commands_target,
}

REGRESSIONS = Path(__file__).resolve().parent.parent / "vectors" / "fuzz-regressions"


def crash_dir() -> Path:
    """Where harnesses save a failing input: ``$DCUD_FUZZ_CRASH_DIR`` or ``build/fuzz-crashes``."""
    default = Path(__file__).resolve().parent.parent.parent / "build" / "fuzz-crashes"
    return Path(os.environ.get("DCUD_FUZZ_CRASH_DIR", str(default)))


def run_keeping_crash(target: str, data: bytes) -> None:
    """Run a target; on a finding, save the input (last one wins: hypothesis replays the minimal one last)."""
    try:
        TARGETS[target](data)
    except Exception:
        directory = crash_dir() / target
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "last-crash.bin").write_bytes(data)
        raise


def regression_name(data: bytes) -> str:
    """File name of a kept crash input: its SHA-1, as libFuzzer names artifacts."""
    return f"crash-{hashlib.sha1(data).hexdigest()}"


def seal_for_seed(plaintext: bytes, context: bytes) -> bytes:
    """An envelope sealed with the harness key (seeds for the coverage-guided fuzzer)."""
    from dcud.service.crypto_envelope import seal

    return seal(FUZZ_KEYS, plaintext, context, device_id=FUZZ_DEVICE)
