"""DLMS test helpers: a tiny wrapper transport (IEC 62056-47 framing) and a scripted meter.

The transport implements ``ApduTransport`` so the client session runs without HDLC; the scripted meter is
a server built on the codec's server-side APDUs (AARE, GET/SET/ACTION responses, ciphering), with knobs
for the failures the client must handle. ``drive`` runs a client against a meter on an injected clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from dcud.codec.actions import Done, Failed, Send
from dcud.codec.dlms.apdu import (
    AARE,
    AARQ,
    GLO_TAGS,
    RLRE,
    RLRQ,
    AccessResult,
    ActionRequestNormal,
    ActionResponseNormal,
    ActionResult,
    Apdu,
    ApplicationContext,
    CipheredApdu,
    ConfirmedServiceError,
    Conformance,
    ExceptionResponse,
    GetRequestNext,
    GetRequestNormal,
    GetRequestWithList,
    GetResponseNormal,
    GetResponseWithDatablock,
    GetResponseWithList,
    InitiateRequest,
    InitiateResponse,
    Mechanism,
    SetRequestNormal,
    SetRequestWithDatablock,
    SetRequestWithFirstDatablock,
    SetResponseDatablock,
    SetResponseLastDatablock,
    SetResponseNormal,
    decode_apdu,
    decode_xdlms_initiate,
    encode_get_results,
)
from dcud.codec.dlms.axdr import Data, OctetString, decode_data, encode_data
from dcud.codec.dlms.client import DlmsClient
from dcud.codec.dlms.cosem import ASSOCIATION_LN_OBIS, CLASS_ASSOCIATION_LN
from dcud.codec.dlms.hdlc import HdlcFrame, HdlcFrameReader
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.security import (
    InvocationCounter,
    Keys,
    SecurityPolicy,
    hls_gmac_response,
    protect,
    unprotect,
    verify_hls_gmac,
)
from dcud.codec.dlms.transport import ApduIn, LinkDown, LinkUp
from dcud.errors import DcudError, RemoteProtocolError

EK = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
AK = bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
GREEN_BOOK_KEYS = Keys(EK, AK)
CLIENT_TITLE = bytes.fromhex("4D4D4D0000000001")
SERVER_TITLE = bytes.fromhex("4D4D4D0000BC614E")
WRAPPER_VERSION = 1
METER_CONFORMANCE = Conformance(0x00501F)
"""GET, SET, ACTION, selective access, block transfer with GET, priority: no lists, no SET blocks."""
CLIENT_WPORT = 0x10
SERVER_WPORT = 0x01


def wrap(apdu: bytes, source: int, destination: int) -> bytes:
    """An IEC 62056-47 wrapper frame."""
    header = WRAPPER_VERSION.to_bytes(2, "big") + source.to_bytes(2, "big") + destination.to_bytes(2, "big")
    return header + len(apdu).to_bytes(2, "big") + apdu


class WrapperDeframer:
    """Splits a byte stream into wrapper payloads (bytes arrive split anywhere)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out: list[bytes] = []
        while len(self.buffer) >= 8:
            if int.from_bytes(self.buffer[0:2], "big") != WRAPPER_VERSION:
                raise RemoteProtocolError("wrapper version is not 1", bytes(self.buffer))
            length = int.from_bytes(self.buffer[6:8], "big")
            if len(self.buffer) < 8 + length:
                break
            out.append(bytes(self.buffer[8 : 8 + length]))
            del self.buffer[: 8 + length]
        return out


class TestWrapperTransport:
    """A minimal ApduTransport over the wrapper framing (no HDLC), recording what the client asked."""

    __test__ = False

    def __init__(self, *, fail_open: bool = False) -> None:
        self.deframer = WrapperDeframer()
        self.opened = 0
        self.closed = 0
        self.sent: list[bytes] = []
        self.fail_open = fail_open
        self.up = False

    def open(self, now: float) -> list[object]:
        self.opened += 1
        if self.fail_open:
            return []
        self.up = True
        return [LinkUp()]

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        self.sent.append(apdu)
        return [Send(wrap(apdu, CLIENT_WPORT, SERVER_WPORT))]

    def receive_data(self, data: bytes, now: float) -> list[object]:
        try:
            return [ApduIn(apdu) for apdu in self.deframer.feed(data)]
        except DcudError as exc:
            self.up = False
            return [LinkDown(exc)]

    def handle_timer(self, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def close(self, now: float) -> list[object]:
        self.closed += 1
        self.up = False
        return [LinkDown(None)]


@dataclass
class ScriptedMeter:
    """A DLMS server for tests, speaking through the wrapper framing.

    ``objects`` answers GET (and takes SET); ``actions`` maps a method reference to its return value.
    ``block_bytes`` splits GET responses whose encoding exceeds it into data blocks.
    """

    objects: dict[AttributeRef, Data] = field(default_factory=dict)
    actions: dict[AttributeRef, Data | None] = field(default_factory=dict)
    mechanism: int | None = None
    password: bytes = b""
    keys: Keys | None = None
    policy: SecurityPolicy = SecurityPolicy.NONE
    system_title: bytes = SERVER_TITLE
    stoc: bytes = b"P6wRJ21F"
    invocation_counter: int = 0x01234567
    conformance: Conformance = METER_CONFORMANCE
    max_pdu: int = 500
    block_bytes: int | None = None
    silent_on: Callable[[Apdu], bool] | None = None
    refuse_hls: bool = False
    forge_ctos: bool = False
    answer_rlrq: bool = True
    received: list[Apdu] = field(default_factory=list)
    client_counters: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deframer = WrapperDeframer()
        self.counter = InvocationCounter(self.invocation_counter)
        self.client_title: bytes | None = None
        self.ctos = b""
        self.authenticated = False
        self.pending_blocks: list[bytes] = []
        self.set_target: AttributeRef | None = None
        self.set_buffer = bytearray()
        self.set_block = 0

    # -- framing --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[bytes]:
        """Bytes from the client; returns wrapper frames to send back."""
        out: list[bytes] = []
        for apdu in self.deframer.feed(data):
            reply = self.handle(apdu)
            if reply is not None:
                out.append(wrap(reply, SERVER_WPORT, CLIENT_WPORT))
        return out

    # -- ciphering ------------------------------------------------------------------------------

    def _open(self, apdu: Apdu) -> Apdu:
        if isinstance(apdu, CipheredApdu):
            assert self.keys is not None and self.client_title is not None
            opened = unprotect(apdu.content, system_title=self.client_title, keys=self.keys)
            if self.client_counters and opened.invocation_counter <= self.client_counters[-1]:
                raise AssertionError("client reused an invocation counter")
            self.client_counters.append(opened.invocation_counter)
            return decode_apdu(opened.plaintext)
        return apdu

    def _seal(self, plain: bytes) -> bytes:
        if self.policy is SecurityPolicy.NONE:
            return plain
        assert self.keys is not None
        content = protect(
            plain,
            security_control=self.policy.security_control,
            system_title=self.system_title,
            invocation_counter=self.counter.take(),
            keys=self.keys,
        )
        return CipheredApdu(GLO_TAGS[plain[0]], content).encode()

    # -- services -------------------------------------------------------------------------------

    def handle(self, data: bytes) -> bytes | None:
        apdu = decode_apdu(data)
        if isinstance(apdu, AARQ):
            self.received.append(apdu)
            return self._associate(apdu)
        if isinstance(apdu, RLRQ):
            self.received.append(apdu)
            return RLRE(0).encode() if self.answer_rlrq else None
        try:
            plain = self._open(apdu)
        except DcudError:
            return ExceptionResponse(1, 5).encode()
        self.received.append(plain)
        if self.silent_on is not None and self.silent_on(plain):
            return None
        reply = self._serve(plain)
        return None if reply is None else self._seal(reply)

    def _associate(self, aarq: AARQ) -> bytes:
        secured = self.policy is not SecurityPolicy.NONE
        self.client_title = aarq.calling_ap_title
        user = decode_xdlms_initiate(aarq.user_information or b"")
        if isinstance(user, CipheredApdu):
            try:
                assert self.keys is not None and self.client_title is not None
                opened = unprotect(user.content, system_title=self.client_title, keys=self.keys)
                self.client_counters.append(opened.invocation_counter)
                user = decode_xdlms_initiate(opened.plaintext)
            except DcudError:
                error = ConfirmedServiceError(1, 6, 0).encode()
                return AARE(aarq.application_context, 1, 1, user_information=error).encode()
        assert isinstance(user, InitiateRequest)
        if aarq.mechanism != self.mechanism:
            return AARE(aarq.application_context, 1, 11).encode()
        response = InitiateResponse(self.conformance & user.conformance, self.max_pdu)
        initiate = self._seal(response.encode()) if secured else response.encode()
        title = self.system_title if secured or self.mechanism == Mechanism.HLS_GMAC else None
        if self.mechanism == Mechanism.LLS and aarq.authentication_value != self.password:
            return AARE(aarq.application_context, 1, 13, user_information=initiate).encode()
        if self.mechanism == Mechanism.HLS_GMAC:
            self.ctos = aarq.authentication_value or b""
            return AARE(
                aarq.application_context,
                0,
                14,
                responding_ap_title=title,
                mechanism=Mechanism.HLS_GMAC,
                authentication_value=self.stoc,
                user_information=initiate,
            ).encode()
        self.authenticated = True
        context = ApplicationContext.LN_CIPHERING if secured else ApplicationContext.LN
        return AARE(
            context, 0, 0, responding_ap_title=title, mechanism=self.mechanism, user_information=initiate
        ).encode()

    def _serve(self, apdu: Apdu) -> bytes | None:
        if isinstance(apdu, ActionRequestNormal) and apdu.method == AttributeRef(
            CLASS_ASSOCIATION_LN, ASSOCIATION_LN_OBIS, 1
        ):
            return self._hls(apdu)
        if not self.authenticated:
            return ExceptionResponse(1, 1).encode()
        iip = getattr(apdu, "invoke_id_and_priority", 0xC1)
        if isinstance(apdu, GetRequestNormal):
            value = self.objects.get(apdu.attribute)
            if value is None:
                return GetResponseNormal(AccessResult(4), iip).encode()
            return self._respond_get(encode_data(value), GetResponseNormal(value, iip).encode(), iip)
        if isinstance(apdu, GetRequestWithList):
            results = tuple(self.objects.get(i.attribute) or AccessResult(4) for i in apdu.items)
            whole = GetResponseWithList(results, iip).encode()
            return self._respond_get(encode_get_results(results), whole, iip)
        if isinstance(apdu, GetRequestNext):
            if not self.pending_blocks:
                return GetResponseWithDatablock(True, apdu.block_number + 1, AccessResult(16), iip).encode()
            chunk = self.pending_blocks.pop(0)
            return GetResponseWithDatablock(
                not self.pending_blocks, apdu.block_number + 1, chunk, iip
            ).encode()
        if isinstance(apdu, SetRequestNormal):
            self.objects[apdu.attribute] = apdu.value
            return SetResponseNormal(0, iip).encode()
        if isinstance(apdu, SetRequestWithFirstDatablock):
            self.set_target, self.set_buffer, self.set_block = apdu.attribute, bytearray(apdu.raw_data), 1
            return self._set_block_reply(apdu.last_block, iip)
        if isinstance(apdu, SetRequestWithDatablock):
            self.set_buffer += apdu.raw_data
            self.set_block += 1
            return self._set_block_reply(apdu.last_block, iip)
        if isinstance(apdu, ActionRequestNormal):
            if apdu.method not in self.actions:
                return ActionResponseNormal(ActionResult(11), iip).encode()
            returned = self.actions[apdu.method]
            return ActionResponseNormal(ActionResult(0, returned), iip).encode()
        return ExceptionResponse(2, 2).encode()

    def _respond_get(self, raw: bytes, whole: bytes, iip: int) -> bytes:
        if self.block_bytes is None or len(raw) <= self.block_bytes:
            return whole
        chunks = [raw[i : i + self.block_bytes] for i in range(0, len(raw), self.block_bytes)]
        self.pending_blocks = chunks[1:]
        return GetResponseWithDatablock(False, 1, chunks[0], iip).encode()

    def _set_block_reply(self, last: bool, iip: int) -> bytes:
        if not last:
            return SetResponseDatablock(self.set_block, iip).encode()
        assert self.set_target is not None
        self.objects[self.set_target] = decode_data(bytes(self.set_buffer))
        return SetResponseLastDatablock(0, self.set_block, iip).encode()

    def _hls(self, apdu: ActionRequestNormal) -> bytes:
        iip = apdu.invoke_id_and_priority
        assert self.keys is not None and self.client_title is not None
        reply = apdu.parameters
        ok = (
            isinstance(reply, OctetString)
            and not self.refuse_hls
            and verify_hls_gmac(
                reply.value, system_title=self.client_title, keys=self.keys, challenge=self.stoc
            )
        )
        if not ok:
            return ActionResponseNormal(ActionResult(3), iip).encode()
        self.authenticated = True
        challenge = b"forged-challenge" if self.forge_ctos else self.ctos
        answer = hls_gmac_response(
            system_title=self.system_title,
            invocation_counter=self.counter.take(),
            keys=self.keys,
            challenge=challenge,
        )
        return ActionResponseNormal(ActionResult(0, OctetString(answer)), iip).encode()


@dataclass
class DriveResult:
    """How a driven session ended."""

    final: Done[object] | Failed
    steps: int
    timers: int


def drive(
    client: DlmsClient,
    meter: ScriptedMeter,
    *,
    chunking: str = "whole",
    rng: random.Random | None = None,
    max_steps: int = 10_000,
) -> DriveResult:
    """Run ``client`` against ``meter`` on a fake clock until Done/Failed.

    ``chunking``: ``whole`` (each reply in one piece), ``bytes`` (one byte at a time) or ``random``.
    """
    now = 0.0
    pending: list[bytes] = []
    actions = client.start(now)
    timers = 0
    for step in range(max_steps):
        for action in actions:
            if isinstance(action, Send):
                pending.extend(meter.feed(action.data))
            elif isinstance(action, Done | Failed):
                return DriveResult(action, step, timers)
        actions = []
        if pending:
            reply = pending.pop(0)
            for piece in _split(reply, chunking, rng):
                actions += client.receive_data(piece, now)
            continue
        deadline = client.next_deadline()
        assert deadline is not None, "the session waits on nothing"
        now = max(now, deadline)
        timers += 1
        actions = client.handle_timer(now)
    raise AssertionError("session did not end")


def _split(data: bytes, chunking: str, rng: random.Random | None) -> list[bytes]:
    if chunking == "whole":
        return [data]
    if chunking == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    assert rng is not None
    pieces, start = [], 0
    while start < len(data):
        size = rng.randint(1, 17)
        pieces.append(data[start : start + size])
        start += size
    return pieces


class IdleLink:
    """An ``ApduTransport`` that is up at once and never answers; a test's link overrides what it scripts."""

    def open(self, now: float) -> list[object]:
        return [LinkUp()]

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        return []

    def receive_data(self, data: bytes, now: float) -> list[object]:
        return []

    def handle_timer(self, now: float) -> list[object]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def close(self, now: float) -> list[object]:
        return [LinkDown(None)]


def drain_hdlc(chunks: list[bytes], reader: HdlcFrameReader | None = None) -> tuple[list[HdlcFrame], int]:
    """Feed ``chunks`` in turn to ``reader`` (a new one by default), taking every frame after each: the
    frames and the count of typed errors (damaged frames skipped). The reader never holds more than a
    frame."""
    reader = reader if reader is not None else HdlcFrameReader()
    frames: list[HdlcFrame] = []
    errors = 0
    for chunk in chunks:
        reader.receive_data(chunk)
        for _ in range(10_000):
            try:
                frame = reader.next_frame()
            except RemoteProtocolError:
                errors += 1
                continue
            if frame is None:
                break
            frames.append(frame)
        assert reader.buffered_bytes <= 2049
    return frames, errors
