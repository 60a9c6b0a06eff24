"""COSEM interface classes: registers and units, clock, profile generic, association object list; OBIS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcud.codec.dlms.apdu import GetRequestNormal, decode_apdu
from dcud.codec.dlms.axdr import (
    Array,
    Boolean,
    DoubleLong,
    DoubleLongUnsigned,
    Enum,
    Float32,
    Integer,
    LongUnsigned,
    Null,
    OctetString,
    Structure,
    Unsigned,
    encode_data,
)
from dcud.codec.dlms.cosem import (
    CLOCK_TIME,
    CaptureObject,
    ScalerUnit,
    clock_time,
    clock_value,
    decode_capture_objects,
    decode_object_list,
    decode_scaler_unit,
    entry_descriptor,
    find_object,
    profile_rows,
    range_descriptor,
    scaled,
    unit_symbol,
)
from dcud.codec.dlms.obis import AttributeRef, Obis, ObisError
from dcud.errors import LocalProtocolError, RemoteProtocolError

PROFILE = AttributeRef.parse("7/1.0.99.1.0.255/2")
CLOCK_COLUMN = CaptureObject(8, Obis.parse("0.0.1.0.0.255"), 2)
ENERGY_COLUMN = CaptureObject(3, Obis.parse("1.0.1.8.0.255"), 2)


# ---------------------------------------------------------------------------------------------------
# OBIS


@pytest.mark.parametrize(
    "text", ["1.0.1.8.0.255", "1-0:1.8.0*255", "1-0:1.8.0.255", "1-0:1.8.0", " 1-0:1.8.0&255 "]
)
def test_obis_forms(text: str) -> None:
    obis = Obis.parse(text)
    assert obis == Obis(1, 0, 1, 8, 0, 255)
    assert str(obis) == "1.0.1.8.0.255" and obis.display() == "1-0:1.8.0*255"
    assert Obis.from_bytes(obis.to_bytes()) == obis


@pytest.mark.parametrize("text", ["", "1.8.0", "1.0.1.8.0.256", "1-0:1.8", "a.b.c.d.e.f", "1.0.1.8.0.255.1"])
def test_bad_obis_is_a_value_error(text: str) -> None:
    with pytest.raises(ObisError):
        Obis.parse(text)
    with pytest.raises(ValueError):
        Obis.parse(text)


def test_attribute_references() -> None:
    ref = AttributeRef.parse("3/1-0:1.8.0*255/2")
    assert ref == AttributeRef(3, Obis(1, 0, 1, 8, 0, 255), 2) and str(ref) == "3/1.0.1.8.0.255/2"
    for bad in ("3/1.0.1.8.0.255", "x/1.0.1.8.0.255/2", "3/1.0.1.8.0.255/200", "70000/1.0.1.8.0.255/2"):
        with pytest.raises(ObisError):
            AttributeRef.parse(bad)
    with pytest.raises(LocalProtocolError):
        Obis.from_bytes(b"\x01\x02")


@given(st.lists(st.integers(0, 255), min_size=6, max_size=6))
def test_obis_round_trips(groups: list[int]) -> None:
    obis = Obis(*groups)
    assert Obis.parse(str(obis)) == obis == Obis.parse(obis.display())


# ---------------------------------------------------------------------------------------------------
# Register


def test_scaler_unit_and_scaling() -> None:
    wh = decode_scaler_unit(Structure((Integer(0), Enum(30))))
    assert wh == ScalerUnit(0, 30) and wh.symbol == "Wh"
    assert scaled(DoubleLongUnsigned(20_411_500), wh) == (20_411_500, "Wh")
    kilo = ScalerUnit(3, 30)
    assert scaled(DoubleLongUnsigned(20_411), kilo) == (20_411_000, "Wh")
    volts = ScalerUnit(-1, 35)
    assert scaled(LongUnsigned(2301), volts) == (230.1, "V")
    assert scaled(DoubleLong(12345), ScalerUnit(-3, 27)) == (12.345, "W")
    assert scaled(Float32(1.5), ScalerUnit(2, 44)) == (150.0, "Hz")
    assert scaled(Unsigned(7), None) == (7, None)
    assert decode_scaler_unit(ScalerUnit(-2, 9).to_data()).symbol == "degC"


@pytest.mark.parametrize(
    ("unit", "symbol"),
    [
        (27, "W"),
        (29, "var"),
        (30, "Wh"),
        (32, "varh"),
        (33, "A"),
        (35, "V"),
        (44, "Hz"),
        (13, "m3"),
        (9, "degC"),
        (255, None),
        (0, None),
        (200, None),
    ],
)
def test_unit_symbols(unit: int, symbol: str | None) -> None:
    assert unit_symbol(unit) == symbol


@pytest.mark.parametrize(
    "value",
    [
        Structure((Integer(0),)),
        Structure((Integer(0), Integer(30))),
        Structure((Float32(1.0), Enum(30))),
        OctetString(b"\x00"),
    ],
)
def test_bad_scaler_unit(value: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_scaler_unit(value)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError):
        scaled(OctetString(b"1"), ScalerUnit(0, 30))


# ---------------------------------------------------------------------------------------------------
# Clock


def test_clock_value_and_back() -> None:
    when = datetime(2026, 11, 21, 14, 30, tzinfo=timezone(timedelta(hours=1)))
    value = clock_value(when)
    assert value.value.hex().upper() == "07EA0B15060E1E0000FFC400"
    assert clock_time(value).to_datetime() == when
    assert AttributeRef.parse("8/0.0.1.0.0.255/2") == CLOCK_TIME


# ---------------------------------------------------------------------------------------------------
# Profile generic


def test_range_descriptor_matches_a_published_request() -> None:
    # Circutor/gosem: 2020-01-01 10:00..11:00 UTC, clock status ok, all columns.
    access = range_descriptor(
        datetime(2020, 1, 1, 10, tzinfo=UTC), datetime(2020, 1, 1, 11, tzinfo=UTC), clock_status=0x00
    )
    wire = GetRequestNormal(PROFILE, access).encode()
    assert wire.hex().upper() == (
        "C001C100070100630100FF0201010204020412000809060000010000FF0F02120000"
        "090C07E40101030A000000000000090C07E40101030B0000000000000100"
    )
    assert decode_apdu(wire) == GetRequestNormal(PROFILE, access)


def test_range_descriptor_with_columns_and_entry_descriptor() -> None:
    access = range_descriptor(
        datetime(2024, 1, 1), datetime(2024, 1, 2), columns=[CLOCK_COLUMN, ENERGY_COLUMN]
    )
    columns = access.parameters.items[3]  # type: ignore[union-attr]
    assert isinstance(columns, Array) and len(columns.items) == 2
    assert decode_capture_objects(columns) == [CLOCK_COLUMN, ENERGY_COLUMN]
    entry = entry_descriptor(1, 96)
    assert encode_data(entry.parameters).hex().upper() == "020406000000010600000060120001120000"
    assert entry.selector == 2


def _row(time: datetime | None, energy: int) -> Structure:
    cell = Null() if time is None else clock_value(time)
    return Structure((cell, DoubleLongUnsigned(energy)))


def test_profile_rows_fill_compressed_times() -> None:
    start = datetime(2024, 3, 1, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    buffer = Array((_row(start, 10), _row(None, 11), _row(None, 12), _row(start + timedelta(hours=2), 13)))
    rows = profile_rows(buffer, [CLOCK_COLUMN, ENERGY_COLUMN], capture_period_s=900)
    times = [r.time.to_datetime() for r in rows]  # type: ignore[union-attr]
    assert times == [
        start,
        start + timedelta(minutes=15),
        start + timedelta(minutes=30),
        start + timedelta(hours=2),
    ]
    assert [r.values[1] for r in rows] == [DoubleLongUnsigned(e) for e in (10, 11, 12, 13)]


def test_profile_rows_refusals() -> None:
    with pytest.raises(RemoteProtocolError, match="no period"):
        profile_rows(Array((_row(None, 1),)), [CLOCK_COLUMN, ENERGY_COLUMN], capture_period_s=900)
    with pytest.raises(RemoteProtocolError, match="no period"):
        profile_rows(Array((_row(datetime(2024, 1, 1), 1), _row(None, 2))), [CLOCK_COLUMN, ENERGY_COLUMN])
    with pytest.raises(RemoteProtocolError, match="2 columns"):
        profile_rows(Array((Structure((Null(),)),)), [CLOCK_COLUMN, ENERGY_COLUMN])
    assert profile_rows(Array((Structure((Unsigned(1),)),)), [])[0].time is None


# ---------------------------------------------------------------------------------------------------
# Association LN object list


def _entry(class_id: int, obis: str, attributes: int, methods: Array) -> Structure:
    attribute_access = Array(
        tuple(
            Structure(
                (Integer(i), Enum(1 if i > 1 else 3), Null() if i != 2 else Array((Integer(1), Integer(2))))
            )
            for i in range(1, attributes + 1)
        )
    )
    return Structure(
        (
            LongUnsigned(class_id),
            Unsigned(0),
            OctetString(Obis.parse(obis).to_bytes()),
            Structure((attribute_access, methods)),
        )
    )


def test_object_list() -> None:
    value = Array(
        (
            _entry(8, "0.0.1.0.0.255", 9, Array((Structure((Integer(1), Enum(1))),))),
            _entry(7, "1.0.99.1.0.255", 8, Array((Structure((Integer(1), Boolean(True))),))),
            _entry(3, "1.0.1.8.0.255", 3, Array(())),
        )
    )
    objects = decode_object_list(value)
    assert [(o.class_id, str(o.obis), len(o.attributes), len(o.methods)) for o in objects] == [
        (8, "0.0.1.0.0.255", 9, 1),
        (7, "1.0.99.1.0.255", 8, 1),
        (3, "1.0.1.8.0.255", 3, 0),
    ]
    profile = find_object(objects, Obis.parse("1.0.99.1.0.255"))
    assert profile is not None and profile.class_name == "Profile generic"
    assert profile.attributes[1].selectors == (1, 2) and profile.attributes[1].readable
    assert not profile.attributes[1].writable and profile.attributes[0].writable
    assert profile.methods[0].access_mode == 1
    assert profile.to_json()["obis"] == "1.0.99.1.0.255"
    assert find_object(objects, Obis.parse("0.0.96.1.0.255")) is None


@pytest.mark.parametrize(
    "value",
    [
        Array((Structure((LongUnsigned(8),)),)),
        Array((Structure((LongUnsigned(8), Unsigned(0), OctetString(b"\x00"), Structure(()))),)),
        Array((Structure((LongUnsigned(8), Unsigned(0), OctetString(bytes(6)), Structure(()))),)),
        Structure(()),
    ],
)
def test_bad_object_lists(value: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_object_list(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# The sans-I/O rule


@pytest.mark.parametrize(
    "module",
    [
        "axdr.py",
        "reader.py",
        "cosem_datetime.py",
        "obis.py",
        "apdu.py",
        "apdu_common.py",
        "acse.py",
        "xdlms.py",
        "selective_access.py",
        "ciphered.py",
        "security.py",
        "cosem.py",
        "client.py",
    ],
)
def test_dlms_codec_imports_no_io(module: str) -> None:
    import ast
    from pathlib import Path

    import dcud.codec.dlms

    tree = ast.parse((Path(dcud.codec.dlms.__file__).parent / module).read_text())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    assert not {m.split(".")[0] for m in modules} & {"asyncio", "socket", "time", "logging", "threading"}
    assert not [m for m in modules if m.startswith(("dcud.service", "dcud.transport", "dcud.runtime"))]
