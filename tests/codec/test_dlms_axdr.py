"""A-XDR data: every type's encoding, date-time, compact array, bounds, and property tests."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.codec.dlms.axdr import (
    CLOCK_STATUS_NOT_SPECIFIED,
    DEVIATION_NOT_SPECIFIED,
    Array,
    Bcd,
    BitString,
    Boolean,
    CompactArray,
    CosemDate,
    CosemDateTime,
    CosemTime,
    Data,
    Date,
    DateTime,
    DontCare,
    DoubleLong,
    DoubleLongUnsigned,
    Enum,
    Float32,
    Float64,
    Integer,
    Long,
    Long64,
    Long64Unsigned,
    LongUnsigned,
    Null,
    OctetString,
    Structure,
    Time,
    TypeDesc,
    Unsigned,
    Utf8String,
    VisibleString,
    date_time_of,
    decode_data,
    encode_data,
    encode_length,
    number,
    to_json,
)
from dcud.errors import LocalProtocolError, RemoteProtocolError

from helpers.axdr_strategies import DATA

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (Null(), "00"),
        (DontCare(), "FF"),
        (Boolean(True), "0301"),
        (Boolean(False), "0300"),
        (BitString.from_bits("1011"), "0404B0"),
        (DoubleLong(-2), "05FFFFFFFE"),
        (DoubleLongUnsigned(5009), "0600001391"),
        (OctetString(b"\x01\x02"), "09020102"),
        (VisibleString("AB"), "0A024142"),
        (Utf8String("é"), "0C02C3A9"),
        (Bcd(0x42), "0D42"),
        (Integer(-3), "0FFD"),
        (Long(-300), "10FED4"),
        (Unsigned(200), "11C8"),
        (LongUnsigned(60), "12003C"),
        (Long64(-1), "14FFFFFFFFFFFFFFFF"),
        (Long64Unsigned(2**63), "158000000000000000"),
        (Enum(30), "161E"),
        (Float32(1.5), "173FC00000"),
        (Float64(-2.0), "18C000000000000000"),
        (Date(CosemDate(2024, 11, 21, 4)), "1A07E80B1504"),
        (Time(CosemTime(14, 30, 0, 0xFF)), "1B0E1E00FF"),
        (Array((Unsigned(1), Unsigned(2))), "0102110111 02".replace(" ", "")),
        (Structure((Integer(0), Enum(30))), "02020F00161E"),
    ],
)
def test_type_encodings(value: Data, wire: str) -> None:
    data = bytes.fromhex(wire)
    assert encode_data(value) == data
    assert decode_data(data) == value


def test_bit_string_is_exact_about_its_length() -> None:
    bits = BitString.from_bits("101100111")
    assert encode_data(bits).hex().upper() == "0409B380"
    assert bits.bits == "101100111" and to_json(bits) == "101100111"
    with pytest.raises(LocalProtocolError):
        BitString(b"\x00\x00", 3)
    with pytest.raises(LocalProtocolError):
        BitString.from_bits("102")


@pytest.mark.parametrize(
    ("length", "wire"),
    [(0, "00"), (127, "7F"), (128, "8180"), (255, "81FF"), (256, "820100"), (70000, "83011170")],
)
def test_length_forms(length: int, wire: str) -> None:
    assert encode_length(length).hex().upper() == wire
    value = OctetString(bytes(length))
    assert decode_data(encode_data(value)) == value


def test_long_form_lengths_that_cannot_be_are_refused() -> None:
    for bad in ("0980", "0985" + "00" * 5, "09820005AA"):
        with pytest.raises(RemoteProtocolError):
            decode_data(bytes.fromhex(bad))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Integer(128),
        lambda: Unsigned(-1),
        lambda: LongUnsigned(70000),
        lambda: DoubleLong(2**31),
        lambda: Long64Unsigned(-1),
        lambda: Enum(256),
        lambda: Unsigned(True),
        lambda: Bcd(300),
        lambda: VisibleString("€"),
        lambda: CosemDate(70000),
        lambda: CosemTime(hour=256),
        lambda: CosemDateTime(CosemDate(), CosemTime(), deviation=40000),
        lambda: CosemDateTime(CosemDate(), CosemTime(), deviation=-0x8000),
    ],
)
def test_out_of_range_values_are_local_errors(make) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_float32_overflow_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_data(Float32(1e300))


# ---------------------------------------------------------------------------------------------------
# Date-time


def test_date_time_with_deviation_and_status() -> None:
    wire = bytes.fromhex("07E50603040E091700FFC400")
    value = CosemDateTime.from_bytes(wire)
    assert value.deviation == -60 and value.clock_status == 0x00
    assert value.to_datetime() == datetime(2021, 6, 3, 14, 9, 23, tzinfo=timezone(timedelta(hours=1)))
    assert value.to_bytes() == wire
    assert str(value) == "2021-06-03T14:09:23.00 dev=-60 status=0x00"
    assert decode_data(b"\x19" + wire) == DateTime(value)
    assert date_time_of(OctetString(wire)) == value == date_time_of(DateTime(value))


def test_date_time_without_deviation_is_naive() -> None:
    value = CosemDateTime.from_bytes(bytes.fromhex("07E2020C0500000000800000"))
    assert value.deviation == DEVIATION_NOT_SPECIFIED and not value.deviation_specified
    assert value.to_datetime() == datetime(2018, 2, 12)
    assert value.to_bytes().hex().upper() == "07E2020C0500000000800000"


def test_unspecified_fields_round_trip_but_are_no_point_in_time() -> None:
    wire = bytes.fromhex("FFFF0C19FFFF1E00FF8000FF")
    value = CosemDateTime.from_bytes(wire)
    assert value.to_bytes() == wire
    assert str(value) == "****-12-25T**:30:00.**"
    with pytest.raises(RemoteProtocolError, match="leaves a field open"):
        value.to_datetime()
    with pytest.raises(RemoteProtocolError, match="not a valid time"):
        CosemDateTime.from_bytes(bytes.fromhex("07E50D01FF000000FF8000FF")).to_datetime()
    assert value.clock_status == CLOCK_STATUS_NOT_SPECIFIED


def test_date_time_from_datetime() -> None:
    aware = datetime(2020, 1, 6, 0, 3, tzinfo=timezone(timedelta(hours=1)))
    assert CosemDateTime.from_datetime(
        aware, 0xFF
    ).to_bytes().hex().upper() == "07E4010601000300 00FFC4FF".replace(" ", "")
    utc = CosemDateTime.from_datetime(datetime(2026, 11, 21, 13, 0, 0, 250_000, tzinfo=UTC))
    assert utc.to_bytes().hex().upper() == "07EA0B15060D00001900 0000".replace(" ", "")
    naive = CosemDateTime.from_datetime(datetime(2026, 11, 21, 13, 0))
    assert naive.deviation == DEVIATION_NOT_SPECIFIED and naive.to_datetime() == datetime(2026, 11, 21, 13, 0)
    with pytest.raises(RemoteProtocolError):
        CosemDateTime.from_bytes(b"\x00" * 11)


@PROPS
@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)), st.integers(-720, 720))
def test_date_time_round_trips_through_datetime(value: datetime, offset_min: int) -> None:
    aware = value.replace(
        microsecond=value.microsecond // 10_000 * 10_000, tzinfo=timezone(timedelta(minutes=offset_min))
    )
    cosem = CosemDateTime.from_datetime(aware)
    assert cosem.to_datetime() == aware
    assert CosemDateTime.from_bytes(cosem.to_bytes()) == cosem


# ---------------------------------------------------------------------------------------------------
# Compact array


def test_compact_array_encoding() -> None:
    rows = (
        Structure((Unsigned(1), LongUnsigned(0x0203))),
        Structure((Unsigned(4), LongUnsigned(0x0506))),
    )
    value = CompactArray(TypeDesc.of(rows[0]), rows)
    # tag 13, structure of 2 {unsigned, long-unsigned}, 6 bytes of contents
    wire = bytes.fromhex("1302021112" + "06" + "010203040506")
    assert encode_data(value) == wire
    assert decode_data(wire) == value
    assert to_json(value) == [[1, 0x0203], [4, 0x0506]]


def test_compact_array_with_inner_array_and_strings() -> None:
    rows = tuple(
        Structure((Array((Unsigned(i), Unsigned(i + 1))), OctetString(bytes([i])))) for i in range(3)
    )
    value = CompactArray(TypeDesc.of(rows[0]), rows)
    decoded = decode_data(encode_data(value))
    assert decoded == value
    assert encode_data(value)[:8].hex().upper() == "1302020100021109"


def test_compact_array_refusals() -> None:
    with pytest.raises(RemoteProtocolError, match="take no bytes"):
        decode_data(bytes.fromhex("1300" + "00"))
    with pytest.raises(RemoteProtocolError):
        decode_data(bytes.fromhex("1311" + "03" + "0102"))  # 3 content bytes claimed, 2 sent
    with pytest.raises(RemoteProtocolError):
        decode_data(bytes.fromhex("1312" + "03" + "010203"))  # 3 bytes of long-unsigned elements
    with pytest.raises(RemoteProtocolError, match="unknown"):
        decode_data(bytes.fromhex("1307" + "00"))
    with pytest.raises(LocalProtocolError):
        encode_data(CompactArray(TypeDesc(Unsigned.TAG), (Long(1),)))


# ---------------------------------------------------------------------------------------------------
# Bounds


def test_nesting_depth_is_bounded() -> None:
    deep = bytes.fromhex("0101" * 17 + "00")
    with pytest.raises(RemoteProtocolError, match="nested too deeply"):
        decode_data(deep)
    assert isinstance(decode_data(bytes.fromhex("0101" * 16 + "00")), Array)
    assert isinstance(decode_data(deep, max_depth=20), Array)


def test_element_count_is_bounded() -> None:
    many = bytes.fromhex("0182" + "1000") + b"\x00" * 0x1000
    with pytest.raises(RemoteProtocolError, match="too many data elements"):
        decode_data(many, max_elements=100)
    assert len(decode_data(many).items) == 0x1000  # type: ignore[union-attr]


def test_claimed_counts_beyond_the_input_are_refused_before_allocating() -> None:
    with pytest.raises(RemoteProtocolError, match="claims 4294967295 elements"):
        decode_data(bytes.fromhex("0184FFFFFFFF00"))


def test_trailing_bytes_and_unknown_tags() -> None:
    with pytest.raises(RemoteProtocolError, match="trailing"):
        decode_data(bytes.fromhex("110100"))
    with pytest.raises(RemoteProtocolError, match="unknown data type tag 7"):
        decode_data(bytes.fromhex("07"))
    with pytest.raises(RemoteProtocolError, match="not UTF-8"):
        decode_data(bytes.fromhex("0C01FF"))


def test_helpers() -> None:
    assert number(Long(-5)) == -5 and number(Float32(0.5)) == 0.5
    with pytest.raises(RemoteProtocolError):
        number(OctetString(b""))
    with pytest.raises(RemoteProtocolError):
        date_time_of(OctetString(b"\x00"))
    assert to_json(Float64(math.inf)) is None and to_json(Bcd(0x09)) == "09" and to_json(Null()) is None


# ---------------------------------------------------------------------------------------------------
# Properties


@PROPS
@given(DATA)
def test_encode_decode_round_trip(value: Data) -> None:
    wire = encode_data(value)
    decoded = decode_data(wire)
    assert encode_data(decoded) == wire  # bytes, so NaN floats compare too
    if not _has_nan(value):
        assert decoded == value


def _has_nan(value: Data) -> bool:
    if isinstance(value, Array | Structure):
        return any(_has_nan(i) for i in value.items)
    return isinstance(value, Float32 | Float64) and math.isnan(value.value)


_rows = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=5)), min_size=1, max_size=8
)


@PROPS
@given(_rows)
def test_compact_array_round_trip(rows: list[tuple[int, int, bytes]]) -> None:
    items = tuple(Structure((Unsigned(a), LongUnsigned(b), OctetString(c))) for a, b, c in rows)
    value = CompactArray(TypeDesc.of(items[0]), items)
    assert decode_data(encode_data(value)) == value


@PROPS
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_remote_protocol_errors(data: bytes) -> None:
    try:
        value = decode_data(data)
    except RemoteProtocolError:
        return
    assert decode_data(encode_data(value)) is not None


@PROPS
@given(DATA, st.data())
def test_every_truncation_is_a_remote_protocol_error(value: Data, data: st.DataObject) -> None:
    wire = encode_data(value)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(RemoteProtocolError):
        decode_data(wire[:cut])
