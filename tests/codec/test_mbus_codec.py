"""M-Bus link and application layer units: encoders against protocols.md, parser, records, dates."""

from __future__ import annotations

import struct

import pytest

from dcud.codec import mbus_app
from dcud.codec.mbus import (
    FrameKind,
    Garbage,
    MbusFrame,
    MbusLinkParser,
    decode_frame,
    decode_manufacturer,
    encode_application_reset,
    encode_manufacturer,
    encode_req_ud1,
    encode_req_ud2,
    encode_select,
    encode_set_address,
    encode_set_baud,
    encode_snd_nke,
    encode_snd_ud,
    secondary_address_bytes,
    secondary_address_mask,
)
from dcud.codec.mbus_app import (
    DataField,
    MbusTelegram,
    decode_bcd,
    decode_date_g,
    decode_datetime_f,
    decode_datetime_i,
    decode_records,
    decode_telegram,
    decode_time_j,
    decode_user_data,
    encode_data,
    encode_manufacturer_data,
    encode_record,
    encode_variable_header,
)
from dcud.errors import LocalProtocolError, NegativeResponse, RemoteProtocolError
from dcud.sim.mbus_slave import encode_rsp_ud


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# ---------------------------------------------------------------------------------------------------
# Link layer encoders: the computed examples of protocols.md section 2


def test_protocols_md_examples() -> None:
    assert encode_snd_nke(5) == h("10 40 05 45 16")
    assert encode_req_ud2(5, fcb=False) == h("10 5B 05 60 16")
    assert encode_req_ud2(5, fcb=True) == h("10 7B 05 80 16")
    assert encode_snd_nke(0xFD) == h("10 40 FD 3D 16")
    assert encode_set_address(0, 5) == h("68 06 06 68 53 00 51 01 7A 05 24 16")
    assert encode_application_reset(5) == h("68 03 03 68 53 05 50 A8 16")
    assert encode_select("12345678FFFFFFFF") == h("68 0B 0B 68 53 FD 52 78 56 34 12 FF FF FF FF B2 16")
    assert encode_req_ud2(0xFD) == h("10 5B FD 58 16")


def test_other_encoders() -> None:
    assert encode_req_ud1(1, fcb=True) == h("10 7A 01 7B 16")
    assert encode_set_baud(1, 9600) == h("68 03 03 68 53 01 BD 11 16")
    assert encode_snd_ud(1, 0x51, b"", fcb=True) == h("68 03 03 68 73 01 51 C5 16")
    with pytest.raises(LocalProtocolError):
        encode_set_baud(1, 1234)
    with pytest.raises(LocalProtocolError):
        encode_set_address(1, 251)
    with pytest.raises(LocalProtocolError):
        encode_snd_ud(1, 0x51, bytes(253))
    with pytest.raises(LocalProtocolError):
        encode_snd_nke(256)


def test_secondary_masks() -> None:
    assert secondary_address_mask("12345678", "ACW", 14, 0x16) == "1234567804770E16"
    assert secondary_address_mask() == "F" * 16
    assert secondary_address_bytes("1234567804770E16") == h("78 56 34 12 77 04 0E 16")
    assert secondary_address_bytes("1F34567FFFFFFFFF") == h("7F 56 34 1F FF FF FF FF")
    for bad in ("123", "1234567G04770E16", "1234567804770E1"):
        with pytest.raises(LocalProtocolError):
            secondary_address_bytes(bad)


def test_manufacturer_packing() -> None:
    assert encode_manufacturer("ACW") == 0x0477
    assert decode_manufacturer(0x0477) == "ACW"
    assert decode_manufacturer(encode_manufacturer("KAM")) == "KAM"
    with pytest.raises(LocalProtocolError):
        encode_manufacturer("AB1")


def test_decode_frame_kinds() -> None:
    assert decode_frame(b"\xe5") == MbusFrame(FrameKind.ACK)
    short = decode_frame(h("10 7B 05 80 16"))
    assert (short.kind, short.control, short.address, short.fcb, short.fcv, short.from_master) == (
        FrameKind.SHORT,
        0x7B,
        5,
        True,
        True,
        True,
    )
    control = decode_frame(h("68 03 03 68 53 05 50 A8 16"))
    assert (control.kind, control.ci, control.data) == (FrameKind.CONTROL, 0x50, b"")
    for raw in (b"", h("10 5B 05 61 16"), h("10 5B 05 60 17"), h("68 03 04 68 53 05 50 A8 16"), h("E5 E5")):
        with pytest.raises(RemoteProtocolError):
            decode_frame(raw)
    with pytest.raises(RemoteProtocolError, match="incomplete"):
        decode_frame(h("68 03 03 68 53"))


# ---------------------------------------------------------------------------------------------------
# Link parser


def test_parser_reports_garbage_once_before_the_next_frame() -> None:
    parser = MbusLinkParser()
    parser.receive_data(h("00 01 02 E5 03 10 5B"))
    events = parser.events()
    assert events == [Garbage(3, h("00 01 02")), MbusFrame(FrameKind.ACK)]
    assert parser.pending_bytes == 3  # the 03 skipped, 10 5B waiting
    parser.receive_data(h("05 60 16"))
    assert parser.events() == [Garbage(1, h("03")), decode_frame(h("10 5B 05 60 16"))]
    assert parser.pending_bytes == 0
    assert parser.flush() == []
    assert parser.frames_total == 2 and parser.garbage_bytes_total == 4


def test_parser_flush_turns_a_partial_frame_into_garbage() -> None:
    parser = MbusLinkParser()
    parser.receive_data(h("68 10 10 68 08 01"))
    assert parser.events() == []
    assert parser.flush() == [Garbage(6, h("68 10 10 68 08 01"))]
    assert parser.pending_bytes == 0


def test_parser_garbage_head_is_bounded() -> None:
    parser = MbusLinkParser()
    parser.receive_data(bytes(1000))
    assert parser.events() == []
    [garbage] = parser.flush()
    assert isinstance(garbage, Garbage) and garbage.size_bytes == 1000 and len(garbage.head) == 256


def test_parser_finds_frame_inside_a_false_header() -> None:
    frame = encode_rsp_ud(1, ident="00000001", manufacturer="ABC", version=1, medium=7, access_number=1)
    parser = MbusLinkParser()
    parser.receive_data(h("68 40 40 68") + frame)  # a header promising 64 bytes swallows the real frame
    assert parser.events() == []  # waiting for the 70 bytes the false header promises
    parser.receive_data(bytes(60))
    events = parser.events()
    assert events[:2] == [Garbage(4, h("68 40 40 68")), decode_frame(frame)]


def test_flush_finds_a_frame_behind_a_false_header() -> None:
    # The false header never completes; at the end of the window the frame behind it still counts.
    parser = MbusLinkParser()
    parser.receive_data(h("68 40 40 68 E5 10 5B 05 60 16 01"))
    assert parser.events() == []
    assert parser.flush() == [
        Garbage(4, h("68 40 40 68")),
        MbusFrame(FrameKind.ACK),
        decode_frame(h("10 5B 05 60 16")),
        Garbage(1, h("01")),
    ]


def test_parser_clear() -> None:
    parser = MbusLinkParser()
    parser.receive_data(h("01 68 03"))
    parser.events()
    parser.clear()
    assert parser.pending_bytes == 0 and parser.flush() == []


# ---------------------------------------------------------------------------------------------------
# Application layer: primitives


def test_bcd() -> None:
    assert decode_bcd(h("78 56 34 12")) == 12345678
    assert decode_bcd(h("05 F0")) == -5
    assert decode_bcd(h("00")) == 0
    assert decode_bcd(h("BD EB DD")) == "DDEBBD"  # error marker digits kept
    assert decode_bcd(h("FF")) == "FF"


def test_dates() -> None:
    assert decode_date_g(h("DF 1C")) == "2014-12-31"
    assert decode_date_g(h("00 00")) == ""
    assert decode_datetime_f(h("0B 0B CD 13")) == "2014-03-13T11:11:00"
    assert decode_datetime_f(h("10 09 05 C5")) == "1996-05-05T09:16:00"  # no century bits, yy > 80
    assert decode_datetime_f(h("A1 15 E9 17")) == ""  # IV flag: the meter says invalid
    assert decode_datetime_f(h("0B 2B CD 13")) == "2014-03-13T11:11:00"  # hundred-year bits = 1
    assert decode_datetime_f(h("0B 4B CD 13")) == "2114-03-13T11:11:00"  # hundred-year bits = 2
    assert decode_datetime_i(h("1E 0B 0B CD 13 00")) == "2014-03-13T11:11:30"
    assert decode_datetime_i(h("1E 8B 0B CD 13 00")) == ""
    assert decode_time_j(h("1E 0B 0B")) == "11:11:30"
    assert decode_time_j(h("3F 3F 1F")) == ""


def _one(data: bytes) -> mbus_app.MbusRecord:
    records, _ = decode_records(data)
    assert len(records) == 1
    return records[0]


def test_vif_units_and_exponents() -> None:
    cases = [
        (h("04 06 01 00 00 00"), 1000, "Wh", "energy"),
        (h("04 0E 01 00 00 00"), 1000000, "J", "energy"),
        (h("04 13 31 D4 00 00"), 54.321, "m3", "volume"),
        (h("02 1B 05 00"), 5, "kg", "mass"),
        (h("02 23 02 00"), 172800, "s", "on_time"),
        (h("02 26 01 00"), 3600, "s", "operating_time"),
        (h("02 2D 07 00"), 700, "W", "power"),
        (h("02 33 01 00"), 1000, "J/h", "power"),
        (h("02 3B 0A 00"), 0.01, "m3/h", "volume_flow"),
        (h("02 43 01 00"), 0.0001, "m3/min", "volume_flow"),
        (h("02 4F 01 00"), 0.01, "m3/s", "volume_flow"),
        (h("02 53 01 00"), 1, "kg/h", "mass_flow"),
        (h("02 5A D2 04"), 123.4, "degC", "flow_temperature"),
        (h("02 5F 28 00"), 40, "degC", "return_temperature"),
        (h("02 61 37 00"), 0.55, "K", "temperature_difference"),
        (h("02 65 FE FF"), -0.02, "degC", "external_temperature"),
        (h("02 6A 0A 00"), 1.0, "bar", "pressure"),
        (h("02 FD 48 E6 08"), 227.8, "V", "voltage"),
        (h("02 FD 59 0A 00"), 0.01, "A", "current"),
        (h("01 FD 1C 60"), 96, "Bd", "baud_rate"),
        (h("02 FB 01 02 00"), 2000000, "Wh", "energy"),
        (h("02 FB 1A 13 02"), 53.1, "%", "relative_humidity"),
        (h("0A FB 5A 12 03"), 31.2, "degF", "flow_temperature"),
        (h("01 FD 71 A9"), -87, "dBm", "reception_level"),
        (h("02 6E 05 00"), 5, "", "hca"),
    ]
    for data, value, unit, quantity in cases:
        record = _one(data)
        assert (record.unit, record.quantity) == (unit, quantity), data.hex()
        assert record.value == pytest.approx(value), data.hex()


def test_reception_level_is_plain_dbm() -> None:
    """01 FD 71 A9: -87 dBm as jMbus, exmbus and MBusParser read it (the old decoder said -304 dBm)."""
    record = _one(h("01 FD 71 A9"))
    assert (record.value, record.unit, record.quantity, record.invalid) == (-87, "dBm", "reception_level", "")
    assert "invalid" not in record.to_json()
    assert _one(h("02 FD 71 A9 FF")).value == -87  # the same level in a 16-bit record
    # The same record inside a whole RSP_UD, parsed split at every byte boundary.
    frame = encode_rsp_ud(
        3,
        ident="12345678",
        manufacturer="WEP",
        version=2,
        medium=0x1B,
        access_number=7,
        records=[h("01 FD 71 A9"), encode_record(2210, vif=0x65, data_field=DataField.INT16)],
    )
    for cut in range(len(frame) + 1):
        parser = MbusLinkParser()
        parser.receive_data(frame[:cut])
        parser.receive_data(frame[cut:])
        (event,) = parser.events()
        assert isinstance(event, MbusFrame)
        telegram = decode_telegram(event)
        assert isinstance(telegram, MbusTelegram)
        assert [(r.value, r.unit) for r in telegram.records] == [(-87, "dBm"), (pytest.approx(22.1), "degC")]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("01 FD 71 1E", "reception_level 30 dBm is physically impossible (allowed: -174..+27 dBm)"),
        ("02 FD 71 00 80", "reception_level -32768 dBm is physically impossible"),
        ("02 65 00 80", "external_temperature -327.68 degC is physically impossible (allowed: >= -273.15"),
        ("02 5B 00 FE", "flow_temperature -512 degC"),
        ("02 FB 1A E9 03", "relative_humidity 100.1 % is physically impossible (allowed: 0..+100 %)"),
        ("05 5B" + struct.pack("<f", float("nan")).hex(), "flow_temperature is not a number"),
    ],
)
def test_physically_impossible_values_are_refused_not_published(record: str, reason: str) -> None:
    # An impossible record between two good ones: it keeps its place, loses its value, the rest decode.
    data = h("02 5B 16 00") + h(record) + h("02 FB 1A 13 02")
    records, _more = decode_records(data)
    assert [r.value for r in records] == [22, "", pytest.approx(53.1)]
    bad = records[1]
    assert bad.invalid.startswith(reason)
    assert bad.to_json()["invalid"] == bad.invalid
    assert bad.to_json()["raw"] == bad.raw_data != ""
    assert records[0].invalid == records[2].invalid == ""


def test_physical_ranges_keep_legitimate_extremes() -> None:
    assert _one(h("01 FD 71 80")).value == -128  # the weakest level a signed byte holds
    assert _one(h("01 FD 71 1B")).value == 27  # +27 dBm: the strongest a metering radio may send
    assert _one(h("02 65 4D 95")).value == pytest.approx(-273.15)  # absolute zero itself is allowed
    assert _one(h("02 61 00 80")).value == pytest.approx(-327.68)  # a temperature difference may be negative
    assert _one(h("02 FB 1A E8 03")).value == pytest.approx(100.0)


def test_integer_values_stay_int_and_negatives() -> None:
    assert _one(h("04 06 01 00 00 00")).value == 1000
    assert isinstance(_one(h("04 06 01 00 00 00")).value, int)
    assert _one(h("02 2B FF FF")).value == -1
    assert _one(h("02 FD 17 FF FF")).value == 0xFFFF  # error flags are a bit field
    assert _one(h("06 03 01 00 00 00 00 80")).value == -(2**47) + 1
    assert _one(h("07 03 FF FF FF FF FF FF FF 7F")).value == 2**63 - 1


def test_real_and_bcd_records() -> None:
    assert _one(h("05 2B") + struct.pack("<f", 1.5)).value == 1.5
    assert _one(h("0C 13 43 94 36 01")).value == pytest.approx(1369.443)
    assert _one(h("0E 03 01 00 00 00 00 00")).value == 1
    assert _one(h("0A 5A 12 F0")).value == pytest.approx(-1.2)


def test_vife_corrections() -> None:
    assert _one(h("04 83 74 10 27 00 00")).value == pytest.approx(100.0)  # 10000 Wh x 10^-2
    assert _one(h("04 83 7D 01 00 00 00")).value == 1000  # Wh x 10^3
    assert _one(h("04 83 3B 88 13 00 00")).value == 5000  # forward flow only: no scaling
    assert _one(h("04 83 FF 74 88 13 00 00")).value == 5000  # after FF: manufacturer VIFEs, ignored


def test_storage_tariff_subunit_function() -> None:
    record = _one(h("C4 C0 40 06 00 00 00 00"))
    assert (record.storage, record.tariff, record.subunit) == (1, 0, 3)
    record = _one(h("8C 80 40 13 12 00 00 00"))
    assert (record.storage, record.tariff, record.subunit) == (0, 0, 2)
    record = _one(h("84 10 06 00 00 00 00"))
    assert record.tariff == 1
    record = _one(h("82 0F 6C 00 00"))
    assert record.storage == 30
    functions = [_one(bytes([0x02 | (f << 4), 0x13, 0, 0])).function for f in range(4)]
    assert functions == ["instantaneous", "maximum", "minimum", "error"]
    assert _one(h("82 0F 6C 00 00")).raw_dif == "820F"


def test_lvar_and_plain_text() -> None:
    record = _one(h("0D FD 11 05") + b"olleH")
    assert record.value == "Hello" and record.quantity == "customer"
    assert _one(h("0D 13 C2 34 12")).value == pytest.approx(1.234)
    assert _one(h("0D 13 D2 34 12")).value == pytest.approx(-1.234)
    assert _one(h("0D FD 16 E2 01 02")).value == 0x0201
    record = _one(h("02 FC 03 48 52 25 74 D4 11"))
    assert (record.unit, record.quantity) == ("%RH", "plain_text_unit")
    assert record.value == pytest.approx(45.64)
    with pytest.raises(RemoteProtocolError):
        decode_records(h("0D 13 FB 00"))


def test_dates_in_records() -> None:
    assert _one(h("42 6C DF 1C")).value == "2014-12-31"
    record = _one(h("04 6D 0B 0B CD 13"))
    assert (record.value, record.quantity) == ("2014-03-13T11:11:00", "datetime")
    assert _one(h("06 6D 1E 0B 0B CD 13 00")).value == "2014-03-13T11:11:30"
    record = _one(h("03 6D 1E 0B 0B"))
    assert (record.value, record.quantity) == ("11:11:30", "time")
    assert _one(h("04 FD 30 0B 0B CD 13")).quantity == "tariff_start"


def test_special_difs() -> None:
    records, more = decode_records(h("2F 2F 01 13 05 2F 0F 01 02 03"))
    assert not more
    assert [(r.index, r.quantity, r.value) for r in records] == [
        (0, "volume", 0.005),
        (1, "manufacturer_specific", "010203"),
    ]
    records, more = decode_records(h("1F"))
    assert more and records[0].quantity == "more_records_follow"
    for reserved in ("3F", "7F", "4F 00"):
        with pytest.raises(RemoteProtocolError):
            decode_records(h(reserved))
    assert _one(h("00 13")).value == ""


def test_structural_errors() -> None:
    cases = [
        "84",  # DIFE missing
        "04",  # VIF missing
        "04 93",  # VIFE missing
        "04 13 01",  # data short
        "0D 13",  # LVAR missing
        "04 FD",  # FD without its code
        "8B" + " 8B" * 10 + " 60 04 37 18 02",  # 11 DIFEs
        "03 E0" + " 84" * 11 + " 37 18 02",  # 11 VIFEs
    ]
    for text in cases:
        with pytest.raises(RemoteProtocolError):
            decode_records(h(text))


# ---------------------------------------------------------------------------------------------------
# Telegrams


def test_ci_variants() -> None:
    header = encode_variable_header(
        "12345678", manufacturer="ACW", version=14, medium=0x16, access_number=10, status=0, signature=0
    )
    record = encode_record(54321, vif=0x13, data_field=DataField.INT32)
    telegram = decode_user_data(0x72, header + record, address=8)
    assert (telegram.id, telegram.manufacturer, telegram.version, telegram.medium) == (
        "12345678",
        "ACW",
        14,
        0x16,
    )
    assert telegram.secondary_address == "1234567804770E16"
    short = decode_user_data(0x7A, h("0A 00 00 00") + record)
    assert (short.access_number, short.id, short.version) == (10, "", None)
    assert short.secondary_address == ""
    bare = decode_user_data(0x78, record)
    assert bare.records[0].value == pytest.approx(54.321)
    msb = decode_user_data(0x76, h("12 34 56 78 04 77 0E 16 0A 00 00 00") + h("04 13 00 00 D4 31"))
    assert (msb.id, msb.manufacturer) == ("12345678", "ACW")
    assert msb.records[0].value == pytest.approx(54.321)
    alarm = decode_user_data(0x71, h("05"))
    assert alarm.records[0].quantity == "alarm_status" and alarm.records[0].value == 5
    with pytest.raises(RemoteProtocolError):
        decode_user_data(0x7A, h("0A 00"))
    with pytest.raises(RemoteProtocolError):
        decode_user_data(0x55, b"")
    with pytest.raises(NegativeResponse) as info:
        decode_user_data(0x70, h("42"))
    assert info.value.code == 0x42 and "unknown" in info.value.text


def test_fixed_structure_binary_and_stored() -> None:
    # Status 0xC0: binary counters, stored values; units 0x05 kWh / 0x29 l; medium heat (4).
    data = h("93 92 91 90 10 C0 05 69") + (6531).to_bytes(4, "little") + (69).to_bytes(4, "little")
    telegram = decode_user_data(0x73, data)
    assert (telegram.id, telegram.medium, telegram.medium_name) == ("90919293", 4, "heat")
    assert [(r.value, r.unit, r.storage) for r in telegram.records] == [
        (6531000, "Wh", 1),
        (pytest.approx(0.069), "m3", 1),
    ]
    msb = decode_user_data(0x77, h("90 91 92 93 10 00 05 69 00 00 65 31 00 00 00 69"))
    assert msb.id == "90919293" and msb.records[0].value == 6531000


def test_decode_telegram_refuses_non_rsp_ud() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_telegram(decode_frame(encode_set_address(1, 2)))
    with pytest.raises(RemoteProtocolError):
        decode_telegram(MbusFrame(FrameKind.ACK))


# ---------------------------------------------------------------------------------------------------
# Encoders


def test_encode_record_examples() -> None:
    assert encode_record(54321, vif=0x13, data_field=DataField.INT32) == h("04 13 31 D4 00 00")
    assert encode_record(11490378, vif=0x78, data_field=DataField.BCD8) == h("0C 78 78 03 49 11")
    assert encode_record("2014-03-13T11:11", vif=0x6D, data_field=DataField.INT32) == h("04 6D 0B 0B CD 13")
    assert encode_record("2014-12-31", vif=0x6C, data_field=DataField.INT16, storage=1) == h("42 6C DF 1C")
    assert encode_record(0, vif=0x06, data_field=DataField.INT32, subunit=3, storage=1) == h(
        "C4 C0 40 06 00 00 00 00"
    )
    assert encode_record(0, vif=0x06, data_field=DataField.INT32, tariff=1) == h("84 10 06 00 00 00 00")
    assert encode_record(-5, vif=0x13, data_field=DataField.BCD4) == h("0A 13 05 F0")
    assert (
        encode_record("Hello", vif=h("FD 11"), data_field=DataField.VARIABLE) == h("0D FD 11 05") + b"olleH"
    )
    assert encode_record(b"\x01\x02", vif=h("FD 16"), data_field=DataField.VARIABLE) == h("0D FD 16 E2 01 02")
    assert encode_record(None, vif=0x13, data_field=DataField.NONE, function="maximum") == h("10 13")
    assert encode_manufacturer_data(h("01 02"), more_records_follow=True) == h("1F 01 02")


def test_encode_record_rejects_bad_input() -> None:
    bad: list[tuple[object, dict[str, object]]] = [
        (70000, {"data_field": DataField.INT16}),
        (123, {"data_field": DataField.BCD2}),
        ("xx", {"data_field": DataField.BCD4}),
        (1.5, {"data_field": DataField.INT32}),
        ("x" * 200, {"data_field": DataField.VARIABLE}),
        (1, {"data_field": DataField.VARIABLE}),
        (1, {"data_field": DataField.INT8, "function": "average"}),
        (1, {"data_field": DataField.INT8, "storage": -1}),
        (1, {"data_field": DataField.INT8, "storage": 2**50}),
    ]
    for value, kwargs in bad:
        with pytest.raises(LocalProtocolError):
            encode_record(value, vif=0x13, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode_data("2014-99-99T", DataField.INT32, date_kind=True)
    with pytest.raises(LocalProtocolError):
        encode_variable_header("1234", manufacturer="ACW", version=1, medium=1, access_number=1)


def test_encode_rsp_ud_round_trip() -> None:
    frame = encode_rsp_ud(
        8,
        ident="11490378",
        manufacturer="ACW",
        version=14,
        medium=0x16,
        access_number=10,
        records=[encode_record(54321, vif=0x13, data_field=DataField.INT32)],
        manufacturer_data=h("00 01 75 13"),
    )
    telegram = decode_telegram(decode_frame(frame))
    assert isinstance(telegram, MbusTelegram)
    assert [r.value for r in telegram.records] == [pytest.approx(54.321), "00017513"]
    assert not telegram.more_records_follow
