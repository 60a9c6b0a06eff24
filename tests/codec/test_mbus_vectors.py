"""Every M-Bus vector in tests/vectors/ (libmbus, pyMeterBus): decoded, and parsed split at every byte.

libmbus's ``.norm.xml`` is libmbus's interpretation, not the truth: values, units and dates are compared
through the mapping tables below, and the few records where libmbus is wrong are listed in
``LIBMBUS_EXCEPTIONS`` with the reason and the value we produce instead (checked, not skipped).
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dcud.codec.mbus import (
    FrameKind,
    Garbage,
    LinkEvent,
    MbusLinkParser,
    decode_frame,
    encode_application_reset,
    encode_set_address,
    encode_set_secondary,
    encode_snd_ud,
)
from dcud.codec.mbus_app import (
    APPLICATION_ERRORS,
    DataField,
    MbusRecord,
    MbusTelegram,
    decode_records,
    decode_telegram,
    encode_record,
)
from dcud.errors import NegativeResponse, RemoteProtocolError

from helpers import TESTS

VECTORS = TESTS / "vectors"
LIBMBUS = VECTORS / "libmbus"
PYMETERBUS = VECTORS / "pyMeterBus"

TEST_FRAMES = sorted(p.stem for p in (LIBMBUS / "test-frames").glob("*.hex"))
ERROR_FRAMES = sorted(p.stem for p in (LIBMBUS / "error-frames").glob("*.hex"))
UNSUPPORTED_FRAMES = sorted(p.stem for p in (LIBMBUS / "unsupported-frames").glob("*.hex"))
PYMETERBUS_FRAMES = sorted(p.stem for p in PYMETERBUS.glob("*.hex"))
ALL_HEX = sorted(
    [
        *(LIBMBUS / "test-frames").glob("*.hex"),
        *(LIBMBUS / "error-frames").glob("*.hex"),
        *(LIBMBUS / "unsupported-frames").glob("*.hex"),
        *PYMETERBUS.glob("*.hex"),
    ]
)

# libmbus unit wording -> (our unit, factor from libmbus's number to ours).
UNIT_MAP: dict[str, tuple[str, float]] = {
    "": ("", 1.0),
    "-": ("", 1.0),
    "Wh": ("Wh", 1.0),
    "J": ("J", 1.0),
    "m^3": ("m3", 1.0),
    "kg": ("kg", 1.0),
    "s": ("s", 1.0),
    "W": ("W", 1.0),
    "J/h": ("J/h", 1.0),
    "m^3/h": ("m3/h", 1.0),
    "m^3/min": ("m3/min", 1.0),
    "m^3/s": ("m3/s", 1.0),
    "kg/h": ("kg/h", 1.0),
    "°C": ("degC", 1.0),
    "K": ("K", 1.0),
    "bar": ("bar", 1.0),
    "V": ("V", 1.0),
    "A": ("A", 1.0),
    "Units for H.C.A.": ("", 1.0),
    "Reserved": ("", 1.0),
    # Fixed data structure (CI 73): libmbus prints the counter unscaled in its own unit.
    "l": ("m3", 1e-3),
    "kWh": ("Wh", 1e3),
}

# libmbus quantity wording -> our quantity.
QUANTITY_MAP: dict[str, str] = {
    "Energy": "energy",
    "Volume": "volume",
    "Mass": "mass",
    "Power": "power",
    "Volume flow": "volume_flow",
    "Mass flow": "mass_flow",
    "Flow temperature": "flow_temperature",
    "Return temperature": "return_temperature",
    "Temperature difference": "temperature_difference",
    "External temperature": "external_temperature",
    "Pressure": "pressure",
    "Time point (date)": "date",
    "Time point (date & time)": "datetime",
    "On time": "on_time",
    "Operating time": "operating_time",
    "Averaging Duration": "averaging_duration",
    "Actuality Duration": "actuality_duration",
    "H.C.A.": "hca",
    "Reserved": "reserved",
    "Fabrication No": "fabrication_number",
    "(Enhanced) Identification": "enhanced_identification",
    "Manufacturer specific": "manufacturer_specific",
    "Error flags": "error_flags",
    "Software version": "software_version",
    "Firmware version": "firmware_version",
    "Dimensionless": "dimensionless",
    "Customer location": "customer_location",
    "Parameter set identification": "parameter_set_id",
    "Model / Version": "model_version",
    "Digital Input": "digital_input",
    "Digital Output": "digital_output",
    "Medium": "medium",
    "Special supplier information": "special_supplier_information",
    "Reset counter": "reset_counter",
    "Voltage": "voltage",
    "Current": "current",
}

FUNCTION_MAP: dict[str, str] = {
    "Instantaneous value": "instantaneous",
    "Maximum value": "maximum",
    "Minimum value": "minimum",
    "Value during error state": "error",
    "Actual value": "instantaneous",  # fixed data structure
    "Manufacturer specific": "instantaneous",  # DIF 0F: raw data
    "More records follow": "instantaneous",  # DIF 1F: raw data
}
SPECIAL_FUNCTION_QUANTITY = {
    "Manufacturer specific": "manufacturer_specific",
    "More records follow": "more_records_follow",
}

MEDIUM_MAP: dict[str, int] = {
    "Other": 0x00,
    "Oil": 0x01,
    "Electricity": 0x02,
    "Gas": 0x03,
    "Heat: Outlet": 0x04,
    "Heat": 0x04,  # fixed data structure
    "Warm water (30-90°C)": 0x06,
    "Water": 0x07,
    "Heat Cost Allocator": 0x08,
    "Heat: Inlet": 0x0C,
    "Heat / Cooling load meter": 0x0D,
    "Bus/System": 0x0E,
    "Cold water": 0x16,
    "Breaker: Electricity": 0x20,
}

# libmbus's way of printing a date the meter marks invalid or leaves empty; we give "".
LIBMBUS_NO_DATE = {"2000-00-00", "1900-01-00T00:00:00"}

_BCD_FOLD = (
    "non-decimal BCD digits in a value-during-error record (a vendor error marker): libmbus folds them "
    "into a number by skipping every high nibble >= A; we keep the digits as a hex string"
)
# (frame, record index) -> (reason, what we produce instead: value, unit, quantity, storage).
LIBMBUS_EXCEPTIONS: dict[tuple[str, int], tuple[str, object, str, str, int]] = {
    ("ELS_Elster-F96-Plus", 4): (_BCD_FOLD, "DDDDEBBD", "W", "power", 0),
    ("ELS_Elster-F96-Plus", 5): (_BCD_FOLD, "DDEBBD", "m3/h", "volume_flow", 0),
    ("abb_f95", 2): (_BCD_FOLD, "DDEBB4DD", "W", "power", 0),
    ("abb_f95", 3): (_BCD_FOLD, "EBB4DD", "m3/h", "volume_flow", 0),
    ("sen_pollutherm", 2): (
        "VIF 7B is reserved; libmbus fails to normalise it and writes an empty record (its raw .xml has "
        "value 302, which we report with quantity 'reserved')",
        302,
        "",
        "reserved",
        0,
    ),
    ("manual_frame2", 1): (
        "fixed data structure unit 3E means 'same unit as counter 1, historic value'; libmbus prints the "
        "raw 135 with unit 'reserved but historic', we resolve it to 0.135 m3, storage 1",
        0.135,
        "m3",
        "volume",
        1,
    ),
}


def read_hex(path: Path) -> bytes:
    """One line of space-separated hex bytes; a lone digit (manual_frame1's damaged ``D``) is one byte."""
    return bytes(int(token, 16) for token in path.read_text().split())


def read_xml(path: Path) -> ET.Element:
    """libmbus XML: declared ISO-8859-1, but the degree signs are UTF-8 bytes."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return ET.fromstring(re.sub(r"^<\?xml[^>]*\?>", "", text.strip()))


def xml_records(root: ET.Element) -> list[dict[str, str]]:
    """One dict per DataRecord: child tag -> text ('' when empty)."""
    return [{child.tag: (child.text or "") for child in rec} for rec in root.iter("DataRecord")]


def _decode(raw: bytes) -> MbusTelegram:
    return decode_telegram(decode_frame(raw))


def _numbers_close(ours: object, theirs: float) -> bool:
    return isinstance(ours, int | float) and math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# libmbus test-frames


def test_vector_inventory() -> None:
    assert len(TEST_FRAMES) == 76
    assert len(ERROR_FRAMES) == 20
    assert len(UNSUPPORTED_FRAMES) == 7
    assert len(PYMETERBUS_FRAMES) == 5
    for folder in (LIBMBUS, PYMETERBUS):
        assert (folder / "LICENSE").exists()
    assert (LIBMBUS / "COPYING").exists()


@pytest.mark.parametrize("name", TEST_FRAMES)
def test_libmbus_header(name: str) -> None:
    telegram = _decode(read_hex(LIBMBUS / "test-frames" / f"{name}.hex"))
    info = read_xml(LIBMBUS / "test-frames" / f"{name}.xml").find("SlaveInformation")
    assert info is not None
    fields = {child.tag: (child.text or "") for child in info}
    assert len(telegram.id) == 8
    # libmbus prints the ID's digits without leading zeros; two meters send hex digits in it.
    assert int(telegram.id, 16) == int(fields["Id"], 16)
    assert telegram.medium == MEDIUM_MAP[fields["Medium"]]
    assert telegram.access_number == int(fields["AccessNumber"])
    assert telegram.status == int(fields["Status"], 16)
    if "Manufacturer" in fields:  # CI 72; the fixed structure (CI 73) has none
        assert telegram.manufacturer == fields["Manufacturer"]
        assert telegram.version == int(fields["Version"])
        assert telegram.signature is not None
        assert f"{telegram.signature:04X}" == fields["Signature"]


def _check_record(name: str, ours: MbusRecord, theirs: dict[str, str]) -> None:
    exception = LIBMBUS_EXCEPTIONS.get((name, ours.index))
    if exception is not None:
        _reason, value, unit, quantity, storage = exception
        assert (ours.unit, ours.quantity, ours.storage) == (unit, quantity, storage)
        assert (
            ours.value == value if isinstance(value, str) else _numbers_close(ours.value, float(str(value)))
        )
        return
    function = theirs["Function"]
    assert ours.function == FUNCTION_MAP[function]
    assert ours.storage == int(theirs.get("StorageNumber", "0"))
    if "Tariff" in theirs:
        assert ours.tariff == int(theirs["Tariff"])
        assert ours.subunit == int(theirs["Device"])
    else:
        assert (ours.tariff, ours.subunit) == (0, 0)
    lib_unit = theirs.get("Unit", "")
    lib_quantity = theirs.get("Quantity", "")
    factor = 1.0
    if function in SPECIAL_FUNCTION_QUANTITY:
        assert ours.quantity == SPECIAL_FUNCTION_QUANTITY[function]
        assert ours.unit == ""
    elif lib_unit == "-" and lib_quantity not in QUANTITY_MAP:
        # Plain-text VIF: libmbus puts the meter's text into Quantity; it is our unit.
        assert ours.unit == lib_quantity
        assert ours.quantity == "plain_text_unit"
    else:
        unit, factor = UNIT_MAP[lib_unit]
        assert ours.unit == unit
        if lib_quantity:
            assert ours.quantity == QUANTITY_MAP[lib_quantity]
    expected = theirs.get("Value", "")
    if isinstance(ours.value, str):
        if ours.quantity in ("date", "datetime"):
            expected = expected.removesuffix("Z")
            assert ours.value == ("" if expected in LIBMBUS_NO_DATE else expected)
        elif re.fullmatch(r"[0-9A-F]{2}( [0-9A-F]{2})*", expected):
            assert ours.value == expected.replace(" ", "")  # raw bytes: we print hex without spaces
        else:
            assert ours.value == expected  # ASCII (LVAR) text
    else:
        assert _numbers_close(ours.value, float(expected) * factor), (ours.value, expected)


@pytest.mark.parametrize("name", TEST_FRAMES)
def test_libmbus_records(name: str) -> None:
    telegram = _decode(read_hex(LIBMBUS / "test-frames" / f"{name}.hex"))
    norm = xml_records(read_xml(LIBMBUS / "test-frames" / f"{name}.norm.xml"))
    raw = xml_records(read_xml(LIBMBUS / "test-frames" / f"{name}.xml"))
    assert len(telegram.records) == len(norm) == len(raw)
    assert [r.index for r in telegram.records] == list(range(len(norm)))
    for ours, theirs in zip(telegram.records, norm, strict=True):
        _check_record(name, ours, theirs)
    assert telegram.more_records_follow == any(r.get("Function") == "More records follow" for r in norm)


def test_libmbus_exceptions_are_few_and_real() -> None:
    assert len(LIBMBUS_EXCEPTIONS) <= 6
    for name, index in LIBMBUS_EXCEPTIONS:
        assert name in TEST_FRAMES
        assert index < len(_decode(read_hex(LIBMBUS / "test-frames" / f"{name}.hex")).records)


def test_json_shape() -> None:
    telegram = _decode(read_hex(LIBMBUS / "test-frames" / "ACW_Itron-BM-plus-m.hex"))
    assert telegram.to_json()["id"] == "11490378"
    assert telegram.manufacturer == "ACW" and telegram.medium_name == "cold water"
    assert telegram.records[1].to_json() == {
        "id": "1",
        "value": 54.321,
        "unit": "m3",
        "quantity": "volume",
        "storage": 0,
        "tariff": 0,
        "subunit": 0,
        "function": "instantaneous",
    }
    json.dumps(telegram.to_json())


# ---------------------------------------------------------------------------------------------------
# libmbus error-frames and unsupported-frames

LIBMBUS_ERROR_TEXT = {
    "Unspecified error": 0x00,
    "Unimplemented CI-Field": 0x01,
    "Buffer too long, truncated": 0x02,
    "Too many records": 0x03,
    "Premature end of record": 0x04,
    "More than 10 DIFE\u00b4s": 0x05,
    "More than 10 VIFE\u00b4s": 0x06,
    "Application busy": 0x08,
    "Too many readouts": 0x09,
}
APPLICATION_ERROR_FRAMES = [n for n in ERROR_FRAMES if (LIBMBUS / "error-frames" / f"{n}.xml").exists()]
MALFORMED_FRAMES = [n for n in ERROR_FRAMES if n not in APPLICATION_ERROR_FRAMES]


def _normalise_text(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("\u00b4s", "s"))


def test_error_frame_split() -> None:
    assert len(APPLICATION_ERROR_FRAMES) == 10
    assert len(MALFORMED_FRAMES) == 10


@pytest.mark.parametrize("name", APPLICATION_ERROR_FRAMES)
def test_application_error_frames(name: str) -> None:
    root = read_xml(LIBMBUS / "error-frames" / f"{name}.xml")
    text = root.findtext("SlaveInformation/Error")
    assert text is not None
    code = LIBMBUS_ERROR_TEXT[text]
    with pytest.raises(NegativeResponse) as info:
        _decode(read_hex(LIBMBUS / "error-frames" / f"{name}.hex"))
    assert info.value.code == code
    assert info.value.text == APPLICATION_ERRORS[code]
    assert _normalise_text(info.value.text) == _normalise_text(text)


@pytest.mark.parametrize("name", MALFORMED_FRAMES)
def test_malformed_frames_raise_remote_protocol_error(name: str) -> None:
    raw = read_hex(LIBMBUS / "error-frames" / f"{name}.hex")
    with pytest.raises(RemoteProtocolError) as info:
        _decode(raw)
    assert info.value.frame  # the offending bytes travel with the error


@pytest.mark.parametrize("name", UNSUPPORTED_FRAMES)
def test_unsupported_frames_typed_error_or_decode(name: str) -> None:
    raw = read_hex(LIBMBUS / "unsupported-frames" / f"{name}.hex")
    try:
        frame = decode_frame(raw)
    except RemoteProtocolError:
        assert name in ("invalid_length", "manual_frame1")
        return
    if frame.from_master:
        # manual_frame4/5/6: master SND_UD to FE, CI 51; decoded as records below.
        assert frame.kind is FrameKind.LONG and frame.address == 0xFE and frame.ci == 0x51
        decode_records(frame.data)
        return
    try:
        telegram = decode_telegram(frame)
    except RemoteProtocolError:
        assert name == "invalid_length2"  # CI 73 fixed structure one byte short
        return
    assert name == "svm_f22_telegram2"
    assert telegram.more_records_follow
    assert [r.quantity for r in telegram.records] == ["more_records_follow"]


def test_manual_frame1_is_a_damaged_application_reset() -> None:
    raw = read_hex(LIBMBUS / "unsupported-frames" / "manual_frame1.hex")
    good = encode_application_reset(0xFE, 0x10)
    assert good == bytes.fromhex("68 04 04 68 53 FE 50 10 B1 16")
    assert raw[1:] == good[1:] and raw[0] != good[0]
    parser = MbusLinkParser()
    parser.receive_data(raw)
    assert parser.events() == []
    assert parser.flush() == [Garbage(len(raw), raw)]


def test_manual_frame4_set_primary_address() -> None:
    raw = read_hex(LIBMBUS / "unsupported-frames" / "manual_frame4.hex")
    assert encode_set_address(0xFE, 8) == raw
    records, _ = decode_records(decode_frame(raw).data)
    assert [(r.quantity, r.value) for r in records] == [("bus_address", 8)]


def test_manual_frame5_set_secondary_address() -> None:
    raw = read_hex(LIBMBUS / "unsupported-frames" / "manual_frame5.hex")
    assert encode_set_secondary(0xFE, "01020304", 0x4024, version=1, medium=4) == raw
    assert encode_set_secondary(0xFE, "01020304", "PAD", version=1, medium=4) == raw


def test_manual_frame6_set_id_and_counter() -> None:
    raw = read_hex(LIBMBUS / "unsupported-frames" / "manual_frame6.hex")
    data = encode_record(12345678, vif=0x79, data_field=DataField.BCD8) + encode_record(
        107, vif=0x06, data_field=DataField.BCD8
    )
    assert encode_snd_ud(0xFE, 0x51, data) == raw
    records, more = decode_records(decode_frame(raw).data)
    assert not more
    assert [(r.quantity, r.value, r.unit) for r in records] == [
        ("enhanced_identification", 12345678, ""),
        ("energy", 107000, "Wh"),
    ]


# ---------------------------------------------------------------------------------------------------
# pyMeterBus

PYMETERBUS_UNITS = {
    "none": "",
    None: "",
    "Wh": "Wh",
    "J": "J",
    "m^3": "m3",
    "m^3/h": "m3/h",
    "W": "W",
    "C": "degC",
    "K": "K",
    "seconds": "s",
    "date": "",
    "%RH": "%RH",
    "%": "%",
    "dBm": "dBm",
}
PYMETERBUS_EXCEPTIONS: dict[tuple[str, int], tuple[str, str]] = {
    ("hyd", 7): (_BCD_FOLD.replace("libmbus", "pyMeterBus"), "DDEBBD"),
    ("hyd", 8): (_BCD_FOLD.replace("libmbus", "pyMeterBus"), "DDDDEBBD"),
    ("weptech", 2): (
        "reception level 01 FD 71 1E: pyMeterBus applies 2 x raw - 130 (-70 dBm), a formula EN 13757-3 "
        "does not have; read as plain dBm (jMbus, exmbus, MBusParser) it is +30 dBm, above the +27 dBm "
        "any metering radio may transmit, so the record is marked invalid and its value not published",
        "",
    ),
}


@pytest.mark.parametrize("name", PYMETERBUS_FRAMES)
def test_pymeterbus_frames(name: str) -> None:
    telegram = _decode(read_hex(PYMETERBUS / f"{name}.hex"))
    expected = json.loads((PYMETERBUS / f"{name}.expected.json").read_text())
    assert len(telegram.records) == expected["record_count"]
    for key, exp in expected["records"].items():
        ours = telegram.records[int(key)]
        if "unit" in exp:
            assert ours.unit == PYMETERBUS_UNITS[exp["unit"]], (key, ours)
        exception = PYMETERBUS_EXCEPTIONS.get((name, int(key)))
        value = exp["parsed_value"]
        if exception is not None:
            assert ours.value == exception[1]
            assert bool(ours.invalid) == (exception[1] == "")  # "" here: refused as impossible
        elif value is None:
            assert ours.value == ""
        elif isinstance(value, str):
            assert ours.value == value
        else:
            places = exp.get("_places", {}).get("parsed_value", 7)
            assert isinstance(ours.value, int | float)
            assert round(ours.value - value, places) == 0, (key, ours.value, value)


def test_pymeterbus_msb_first_header_and_dates() -> None:
    telegram = _decode(read_hex(PYMETERBUS / "unknown_pl.hex"))
    assert telegram.ci == 0x76
    assert telegram.id == "15531111"  # mode 2: the header is MSB first too
    assert telegram.records[0].quantity == "date"
    assert telegram.records[1].function == "error"
    assert telegram.records[2].tariff == 2


# ---------------------------------------------------------------------------------------------------
# Incremental link parsing: whole, split at every byte boundary, byte by byte, after garbage


def _events(chunks: list[bytes]) -> list[LinkEvent]:
    parser = MbusLinkParser()
    out: list[LinkEvent] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        out += parser.events()
    return out + parser.flush()


@pytest.mark.parametrize("path", ALL_HEX, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_link_parser_split_everywhere(path: Path) -> None:
    raw = read_hex(path)
    whole = _events([raw])
    for cut in range(1, len(raw)):
        assert _events([raw[:cut], raw[cut:]]) == whole, cut
    assert _events([bytes([b]) for b in raw]) == whole
    frames = [e for e in whole if not isinstance(e, Garbage)]
    try:
        reference = decode_frame(raw)
    except RemoteProtocolError:
        assert not frames
    else:
        assert frames == [reference]
        assert reference.encode() == raw


GARBAGE_PREFIXES = [
    b"\x00\xff",
    b"\x68\x10",
    b"\x10\x5b\x05\x61\x16",  # a short frame with a bad checksum
    b"\x68\x05\x05\x68\x01",  # a long-frame header that swallows the start of the real frame
    b"\x68\x04\x04\x68\x08\x01\x70\x00\x00\x16",  # a long frame with a bad checksum
]


@pytest.mark.parametrize("path", sorted((LIBMBUS / "test-frames").glob("*.hex"))[:20], ids=lambda p: p.stem)
@pytest.mark.parametrize("prefix", GARBAGE_PREFIXES, ids=lambda p: p.hex())
def test_link_parser_resyncs_after_garbage(path: Path, prefix: bytes) -> None:
    raw = read_hex(path)
    stream = prefix + raw + b"\xe5"
    expected = [Garbage(len(prefix), prefix), decode_frame(raw), decode_frame(b"\xe5")]
    assert _events([stream]) == expected
    assert _events([bytes([b]) for b in stream]) == expected
    for cut in range(1, len(stream), 7):
        assert _events([stream[:cut], stream[cut:]]) == expected
