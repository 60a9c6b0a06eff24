"""Property tests: random bytes only ever raise the typed errors; encoders and decoders round-trip."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.codec.mbus import (
    FrameKind,
    Garbage,
    MbusFrame,
    MbusLinkParser,
    decode_frame,
    encode_long,
    encode_short,
)
from dcud.codec.mbus_app import (
    FUNCTIONS,
    PHYSICAL_RANGES,
    DataField,
    MbusRecord,
    decode_records,
    decode_user_data,
    encode_record,
)
from dcud.codec.mbus_session import Done, Failed, Flush, MbusReadout, MbusScan, Send
from dcud.errors import NegativeResponse, ProtocolError, RemoteProtocolError

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(chunks: list[bytes]) -> list[MbusFrame | Garbage]:
    parser = MbusLinkParser()
    events: list[MbusFrame | Garbage] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        events += parser.events()
    return events + parser.flush()


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


_frames = st.one_of(
    st.just(MbusFrame(FrameKind.ACK)),
    st.builds(lambda c, a: MbusFrame(FrameKind.SHORT, c, a), st.integers(0, 255), st.integers(0, 255)),
    st.builds(
        lambda c, a, ci, data: MbusFrame(FrameKind.LONG if data else FrameKind.CONTROL, c, a, ci, data),
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=252),
    ),
)
# Bytes that look like frames often: real starts, stops and frame pieces mixed with noise.
_noisy = st.lists(
    st.one_of(
        st.binary(max_size=8),
        st.sampled_from([b"\xe5", b"\x10", b"\x68", b"\x16", b"\x68\x03\x03\x68"]),
        _frames.map(lambda f: f.encode()),
    ),
    max_size=12,
).map(b"".join)


@PROPS
@given(_noisy, st.lists(st.integers(0, 10_000), max_size=6))
def test_link_parser_never_raises_and_is_split_independent(data: bytes, cuts: list[int]) -> None:
    whole = _parse([data])
    assert _parse(_split(data, cuts)) == whole
    consumed = sum(e.size_bytes if isinstance(e, Garbage) else len(e.encode()) for e in whole)
    assert consumed == len(data)


@PROPS
@given(
    st.lists(_frames, min_size=1, max_size=5),
    st.binary(max_size=6),
    st.lists(st.integers(0, 2000), max_size=4),
)
def test_frames_round_trip_through_the_parser(frames: list[MbusFrame], noise: bytes, cuts: list[int]) -> None:
    stream = b"".join(f.encode() for f in frames)
    assert [e for e in _parse(_split(stream, cuts)) if isinstance(e, MbusFrame)] == frames
    for frame in frames:
        assert decode_frame(frame.encode()) == frame
    # Noise that cannot start a frame is skipped and every frame after it comes through.
    noise = bytes(b for b in noise if b not in (0xE5, 0x10, 0x68))
    assert [e for e in _parse([noise + stream]) if isinstance(e, MbusFrame)] == frames


@PROPS
@given(st.binary(max_size=300))
def test_decode_frame_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except RemoteProtocolError:
        return
    assert frame.encode() == data


@PROPS
@given(st.integers(0, 255), st.binary(max_size=252))
def test_decode_user_data_only_raises_typed_errors(ci: int, data: bytes) -> None:
    try:
        telegram = decode_user_data(ci, data)
    except (ProtocolError, NegativeResponse):
        return
    for record in telegram.records:
        assert isinstance(record.value, int | float | str)
        record.to_json()
    telegram.to_json()


_record_bytes = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=12),
        st.sampled_from([b"\x0f", b"\x1f", b"\x2f", b"\x0d", b"\xfd", b"\xfb", b"\x7c", b"\xfc", b"\x8b"]),
        st.builds(
            lambda dif, vif, data: bytes([dif, vif]) + data,
            st.integers(0, 255),
            st.integers(0, 255),
            st.binary(max_size=8),
        ),
    ),
    max_size=10,
).map(b"".join)


@PROPS
@given(_record_bytes, st.booleans())
def test_decode_records_only_raises_remote_protocol_error(data: bytes, msb_first: bool) -> None:
    try:
        records, _more = decode_records(data, msb_first)
    except RemoteProtocolError:
        return
    assert [r.index for r in records] == list(range(len(records)))
    for record in records:
        _assert_physical(record)


def _assert_physical(record: MbusRecord) -> None:
    """A published number is inside its physical range; a refused one is "" with a reason and raw bytes."""
    bounds = PHYSICAL_RANGES.get((record.quantity, record.unit))
    if record.invalid:
        assert bounds is not None and record.value == ""
        assert record.to_json()["invalid"] == record.invalid
        assert record.to_json()["raw"] == record.raw_data
    elif bounds is not None and not isinstance(record.value, str):
        assert bounds[0] <= record.value <= bounds[1], record


# vif -> (unit, exponent) for the round trip, written out independently of the decoder's tables.
_VIFS: dict[int, tuple[str, int]] = {
    0x03: ("Wh", 0),
    0x06: ("Wh", 3),
    0x0E: ("J", 6),
    0x13: ("m3", -3),
    0x16: ("m3", 0),
    0x1B: ("kg", 0),
    0x2B: ("W", 0),
    0x2A: ("W", -1),
    0x3B: ("m3/h", -3),
    0x5A: ("degC", -1),
    0x61: ("K", -2),
    0x6A: ("bar", -1),
}
_INT_SIZES = {
    DataField.INT8: 1,
    DataField.INT16: 2,
    DataField.INT24: 3,
    DataField.INT32: 4,
    DataField.INT48: 6,
    DataField.INT64: 8,
}
_BCD_DIGITS = {
    DataField.BCD2: 2,
    DataField.BCD4: 4,
    DataField.BCD6: 6,
    DataField.BCD8: 8,
    DataField.BCD12: 12,
}


@st.composite
def _raw_values(draw: st.DrawFn) -> tuple[int, int | float]:
    field = draw(st.sampled_from([*_INT_SIZES, *_BCD_DIGITS, DataField.REAL32]))
    if field in _INT_SIZES:
        bits = 8 * _INT_SIZES[field]
        return field, draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    if field in _BCD_DIGITS:
        digits = _BCD_DIGITS[field]
        return field, draw(st.integers(-(10 ** (digits - 1) - 1), 10**digits - 1))
    value = draw(st.floats(width=32, allow_nan=False, allow_infinity=False))
    return field, struct.unpack("<f", struct.pack("<f", value))[0]


@PROPS
@given(
    _raw_values(),
    st.sampled_from(sorted(_VIFS)),
    st.integers(0, 2**41 - 1),
    st.integers(0, 2**20 - 1),
    st.integers(0, 2**10 - 1),
    st.sampled_from(FUNCTIONS),
)
def test_record_round_trip(
    field_value: tuple[int, int | float], vif: int, storage: int, tariff: int, subunit: int, function: str
) -> None:
    data_field, raw = field_value
    encoded = encode_record(
        raw,
        vif=vif,
        data_field=data_field,
        storage=storage,
        tariff=tariff,
        subunit=subunit,
        function=function,
    )
    records, more = decode_records(encoded)
    assert not more and len(records) == 1
    record = records[0]
    unit, exp = _VIFS[vif]
    assert (record.unit, record.storage, record.tariff, record.subunit, record.function) == (
        unit,
        storage,
        tariff,
        subunit,
        function,
    )
    expected = raw * 10**exp
    bounds = PHYSICAL_RANGES.get((unit and record.quantity, unit))
    if bounds is not None and not bounds[0] <= expected <= bounds[1]:
        assert record.value == "" and "physically impossible" in record.invalid
        return
    assert isinstance(record.value, int | float) and not record.invalid
    if exp >= 0 and isinstance(raw, int):
        assert record.value == expected and isinstance(record.value, int)
    else:
        assert abs(record.value - expected) <= 1e-9 * max(1.0, abs(expected))


@PROPS
@given(st.lists(st.binary(max_size=40), max_size=6), st.lists(st.booleans(), max_size=6))
def test_sessions_survive_random_answers(answers: list[bytes], timeouts: list[bool]) -> None:
    """Random bytes and timeouts in any order: a session only ever hands out actions and finishes."""
    for session in (MbusReadout(5), MbusReadout(secondary="1234FFFF"), MbusScan.secondary(max_probes=3)):
        now = 0.0
        actions = session.start(now)
        steps = 0
        while not session.done:
            steps += 1
            assert steps < 500
            assert all(isinstance(a, Send | Flush | Done | Failed) for a in actions)
            index = steps % (len(answers) + 1)
            if index < len(answers) and not (timeouts and timeouts[index % len(timeouts)]):
                now += 0.01
                actions = session.receive_data(answers[index], now)
            else:
                deadline = session.next_deadline()
                assert deadline is not None
                now = max(now, deadline)
                actions = session.handle_timer(now)
        assert session.next_deadline() is None


def test_short_and_long_encoders_are_the_frame_encoders() -> None:
    assert encode_short(0x5B, 5) == MbusFrame(FrameKind.SHORT, 0x5B, 5).encode()
    assert encode_long(0x08, 1, 0x72, b"\x01") == MbusFrame(FrameKind.LONG, 0x08, 1, 0x72, b"\x01").encode()
