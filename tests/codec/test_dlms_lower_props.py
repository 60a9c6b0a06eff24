"""Property tests of the DLMS lower layers: random bytes only ever raise the typed errors, chunking
never changes an outcome, encode/decode round-trips, and the link state machine fed random frame
sequences never raises."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.codec.actions import Drain, Flush, Send, SetBaud, SetFraming
from dcud.codec.dlms.hdlc import (
    LLC_RESPONSE,
    FrameKind,
    HdlcAddress,
    HdlcFrame,
    HdlcParameters,
    decode_frame,
    decode_parameters,
    encode_frame,
    encode_parameters,
    i_control,
    rnr_control,
    rr_control,
    u_control,
)
from dcud.codec.dlms.hdlc_link import HdlcLink
from dcud.codec.dlms.mode_e import ModeESettings
from dcud.codec.dlms.transport import ApduIn, LinkDown, LinkUp
from dcud.codec.dlms.wrapper import (
    WrapperFrame,
    WrapperReader,
    WrapperTransport,
    decode_wrapper,
    encode_wrapper,
)
from dcud.errors import RemoteProtocolError

from helpers.dlms import drain_hdlc

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CLIENT = HdlcAddress.client(16)
SERVER = HdlcAddress.server(1, 17)


def _srv(control: int, info: bytes = b"", segmented: bool = False) -> bytes:
    return encode_frame(HdlcFrame(CLIENT, SERVER, control, info, segmented))


HDLC_PIECES = [
    b"\x7e",
    b"\x7e\xa0",
    b"\x7e\xa8",
    b"\xa0\x07",
    b"\x21\x02\x23",
    b"\xe6\xe7\x00",
    _srv(u_control(FrameKind.UA)),
    _srv(i_control(0, 1), LLC_RESPONSE + b"\x7e\x7e"),
    _srv(rr_control(1)),
    bytes.fromhex("7EA023210002002373F6C58180140502008006020080070400000001080400000001CE6A7E"),
]
hdlc_bytes = st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(HDLC_PIECES)), max_size=30).map(
    b"".join
)


@SETTINGS
@given(hdlc_bytes, st.integers(min_value=1, max_value=40))
def test_reader_random_bytes_typed_and_chunking_independent(data: bytes, step: int) -> None:
    whole = drain_hdlc([data])
    split = drain_hdlc([data[i : i + step] for i in range(0, len(data), step)])
    assert whole == split


@SETTINGS
@given(hdlc_bytes)
def test_decode_frame_and_parameters_only_typed_errors(data: bytes) -> None:
    for parse in (decode_frame, decode_parameters):
        with contextlib.suppress(RemoteProtocolError):
            parse(data)


def _address(server: bool) -> st.SearchStrategy[HdlcAddress]:
    if not server:
        return st.integers(0, 127).map(HdlcAddress.client)
    return st.one_of(
        st.integers(0, 127).map(lambda u: HdlcAddress(u, None, 1)),
        st.tuples(st.integers(0, 127), st.integers(0, 127)).map(lambda t: HdlcAddress(t[0], t[1], 2)),
        st.tuples(st.integers(0, 0x3FFF), st.integers(0, 0x3FFF)).map(lambda t: HdlcAddress(t[0], t[1], 4)),
    )


frames_st = st.builds(
    HdlcFrame,
    destination=st.one_of(_address(True), _address(False)),
    source=st.one_of(_address(True), _address(False)),
    control=st.integers(0, 255),
    info=st.binary(max_size=300),
    segmented=st.booleans(),
)


@SETTINGS
@given(st.lists(frames_st, min_size=1, max_size=4), st.binary(max_size=5), st.integers(1, 50))
def test_frames_round_trip_through_encoder_decoder_and_reader(
    frames: list[HdlcFrame], noise: bytes, step: int
) -> None:
    raws = [encode_frame(f) for f in frames]
    for frame, raw in zip(frames, raws, strict=True):
        assert decode_frame(raw) == frame
    # Noise without a flag in front, frames back to back: every frame comes out, whatever the chunks.
    stream = noise.replace(b"\x7e", b"") + b"".join(raws)
    got, errors = drain_hdlc([stream[i : i + step] for i in range(0, len(stream), step)])
    assert got == frames and errors == 0


@SETTINGS
@given(st.integers(1, 2032), st.integers(1, 2032), st.integers(1, 7), st.integers(1, 7))
def test_parameters_round_trip(tx: int, rx: int, wtx: int, wrx: int) -> None:
    params = HdlcParameters(tx, rx, wtx, wrx)
    assert decode_parameters(encode_parameters(params)) == params


# -- the link --------------------------------------------------------------------------------------

SERVER_FRAMES = (
    [
        _srv(u_control(FrameKind.UA)),
        _srv(u_control(FrameKind.UA), encode_parameters(HdlcParameters(64, 64, 2, 2))),
        _srv(u_control(FrameKind.UA), b"\x81\x80\x03\x07\x01\x09"),
        _srv(u_control(FrameKind.DM)),
        _srv(u_control(FrameKind.FRMR), b"\x10\x00\x08"),
        _srv(u_control(FrameKind.UI), b"push"),
        _srv(0x09),
    ]
    + [
        _srv(control, info, seg)
        for control in [i_control(ns, nr, pf) for ns in range(3) for nr in range(3) for pf in (False, True)]
        for info, seg in [
            (LLC_RESPONSE + b"r", False),
            (LLC_RESPONSE + b"s" * 70, True),
            (b"t", True),
            (b"", False),
        ]
    ]
    + [_srv(rr_control(nr, pf)) for nr in range(4) for pf in (False, True)]
    + [_srv(rnr_control(1))]
)

step_st = st.one_of(
    st.tuples(st.just("frame"), st.sampled_from(SERVER_FRAMES), st.integers(0, 40)),
    st.tuples(st.just("bytes"), st.binary(max_size=20), st.just(0)),
    st.tuples(st.just("timer"), st.just(b""), st.just(0)),
    st.tuples(st.just("send"), st.binary(max_size=300), st.just(0)),
    st.tuples(st.just("close"), st.just(b""), st.just(0)),
)

ALLOWED = (Send, Drain, SetBaud, SetFraming, Flush, LinkUp, ApduIn, LinkDown)


def _check_out(out: list[object], downs: list[object]) -> None:
    for item in out:
        assert isinstance(item, ALLOWED), item
        if isinstance(item, LinkDown):
            downs.append(item)
            assert item.error is None or isinstance(item.error, Exception)


@SETTINGS
@given(
    st.lists(step_st, max_size=40),
    st.sampled_from([HdlcParameters(), HdlcParameters(64, 64, 2, 2)]),
    st.sampled_from([None, b"", b"/ABC5\\2XYZ\r\n", b"/ABC5XYZ\r\n"]),
)
def test_link_fed_random_frame_sequences_never_raises(
    steps: list[Any], params: HdlcParameters, ident: bytes | None
) -> None:
    mode_e = ident is not None
    link = HdlcLink(
        physical_address=17,
        parameters=params,
        response_timeout_s=1.0,
        max_retries=2,
        baud=9600,
        mode_e=ModeESettings() if mode_e else False,
        max_apdu_bytes=500,
    )
    now = 0.0
    downs: list[object] = []
    _check_out(link.open(now), downs)
    if ident:
        # Without an identification first, random bytes reach the sign-on's IEC receiver.
        _check_out(link.receive_data(ident, 0.1), downs)
    for kind, data, cut in steps:
        now += 0.05
        if kind == "frame":
            at = min(cut, len(data))
            out = link.receive_data(data[:at], now) + link.receive_data(data[at:], now)
        elif kind == "bytes":
            out = link.receive_data(data, now)
        elif kind == "timer":
            deadline = link.next_deadline()
            now = max(now, deadline) if deadline is not None else now
            out = link.handle_timer(now)
        elif kind == "send":
            out = link.send_apdu(data, now) if link.state == "ready" else []
        else:
            out = link.close(now)
        _check_out(out, downs)
    assert len(downs) <= 1
    if downs:
        assert link.next_deadline() is None
    # Whatever happened, the link always ends: close, then the timers, bounded.
    _check_out(link.close(now), downs)
    for _ in range(20):
        deadline = link.next_deadline()
        if deadline is None:
            break
        now = max(now, deadline)
        _check_out(link.handle_timer(now), downs)
    assert link.next_deadline() is None
    assert len(downs) == 1


# -- the wrapper -----------------------------------------------------------------------------------

WRAPPER_PIECES = [
    b"\x00\x01",
    b"\x00\x01\x00\x01\x00\x10",
    b"\x00\x03",
    encode_wrapper(WrapperFrame(1, 16, b"ab")),
]
wrapper_bytes = st.lists(st.one_of(st.binary(max_size=8), st.sampled_from(WRAPPER_PIECES)), max_size=20).map(
    b"".join
)


def _wrapper_drain(chunks: list[bytes]) -> tuple[list[WrapperFrame], bool]:
    reader = WrapperReader(max_apdu_bytes=200)
    got: list[WrapperFrame] = []
    failed = False
    for chunk in chunks:
        reader.receive_data(chunk)
        for _ in range(1000):
            try:
                frame = reader.next_frame()
            except RemoteProtocolError:
                failed = True
                break
            if frame is None:
                break
            got.append(frame)
    return got, failed


@SETTINGS
@given(wrapper_bytes, st.integers(1, 30))
def test_wrapper_random_bytes_typed_and_chunking_independent(data: bytes, step: int) -> None:
    assert _wrapper_drain([data]) == _wrapper_drain([data[i : i + step] for i in range(0, len(data), step)])
    with contextlib.suppress(RemoteProtocolError):
        decode_wrapper(data)
    transport = WrapperTransport()
    transport.open(0.0)
    transport.send_apdu(b"x", 0.0)
    for item in transport.receive_data(data, 0.1):
        assert isinstance(item, ApduIn | LinkDown)


@SETTINGS
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=2000))
def test_wrapper_round_trip(source: int, destination: int, apdu: bytes) -> None:
    frame = WrapperFrame(source, destination, apdu)
    assert decode_wrapper(encode_wrapper(frame)) == frame
