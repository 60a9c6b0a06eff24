"""IEC 62056-21 message encoders and parsers (dcud.codec.iec62056)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dcud.codec import iec62056
from dcud.codec.iec62056 import (
    Ack,
    BccError,
    CommandMessage,
    DataMessage,
    DataSet,
    Identification,
    IecReceiver,
    Nak,
    OptionSelect,
    Request,
    address_matches,
    compute_bcc,
    crc16_arc,
    dataset_values,
    encode_break,
    encode_command,
    encode_data_message,
    encode_datasets,
    encode_error_message,
    encode_identification,
    encode_option_select,
    encode_p1_telegram,
    encode_password,
    encode_read,
    encode_request,
    encode_write,
    normalize_address,
    normalize_unit,
    numeric_value,
    parse_command_message,
    parse_data_message,
    parse_datasets,
    parse_identification,
    parse_option_select,
    parse_p1_telegram,
    parse_request,
)
from dcud.errors import LocalProtocolError, NegativeResponse, RemoteProtocolError

STX, ETX = b"\x02", b"\x03"


def xor(data: bytes) -> int:
    acc = 0
    for b in data:
        acc ^= b
    return acc


def stx_frame(text: str, end: bytes = ETX) -> bytes:
    body = text.encode("ascii") + end
    return STX + body + bytes([xor(body)])


def drain(rx: IecReceiver) -> list[object]:
    out: list[object] = []
    for _ in range(1000):
        try:
            msg = rx.next_message()
        except (RemoteProtocolError, NegativeResponse) as exc:
            out.append(type(exc))
            continue
        if msg is None:
            return out
        out.append(msg)
    raise AssertionError("receiver did not settle")


# -- sans-I/O rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["iec62056.py", "iec_session.py"])
def test_codec_imports_no_io(module: str) -> None:
    tree = ast.parse((Path(iec62056.__file__).parent / module).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"asyncio", "socket", "time", "logging", "threading"}


# -- request and addresses -------------------------------------------------------------------------


def test_encode_request() -> None:
    assert encode_request() == b"/?!\r\n"
    assert encode_request("12345678") == b"/?12345678!\r\n"
    assert encode_request("AB 12") == b"/?AB 12!\r\n"
    assert encode_request("9" * 32) == b"/?" + b"9" * 32 + b"!\r\n"


@pytest.mark.parametrize("address", ["9" * 33, "12-34", "12!", "ab/c", "\u00e9", "1\r\n"])
def test_encode_request_rejects_bad_address(address: str) -> None:
    with pytest.raises(LocalProtocolError):
        encode_request(address)


def test_parse_request() -> None:
    assert parse_request(b"/?0010203!\r\n") == Request("0010203")
    assert parse_request(b"/?!\r\n") == Request("")
    with pytest.raises(RemoteProtocolError):
        parse_request(b"/?12-3!\r\n")
    with pytest.raises(RemoteProtocolError):
        parse_request(b"/?123\r\n")


def test_address_matching() -> None:
    assert normalize_address("0010203") == "10203"
    assert normalize_address("000") == "0"
    assert normalize_address("") == ""
    assert address_matches("0010203", "10203")
    assert address_matches("10203", "0010203")
    assert address_matches("00", "0000")
    assert address_matches("", "12345")  # general request
    assert not address_matches("12345", "123456")
    assert not address_matches("0", "")


# -- identification --------------------------------------------------------------------------------


def test_identification_mode_c_fast() -> None:
    ident = parse_identification(b"/ISk5MT174-0001\r\n")
    assert ident == Identification(
        manufacturer="ISk",
        baud_char="5",
        ident="MT174-0001",
        escapes=(),
        mode="C",
        baud=9600,
        fast_reaction=True,
        raw=b"/ISk5MT174-0001\r\n",
    )
    assert ident.reaction_min_s == 0.02


def test_identification_mode_c_slow() -> None:
    ident = parse_identification(b"/LGZ4ZMD3104100.B32\r\n")
    assert (ident.mode, ident.baud, ident.fast_reaction, ident.reaction_min_s) == ("C", 4800, False, 0.2)


@pytest.mark.parametrize(
    ("char", "mode", "baud"),
    [
        ("0", "C", 300),
        ("1", "C", 600),
        ("2", "C", 1200),
        ("3", "C", 2400),
        ("4", "C", 4800),
        ("5", "C", 9600),
        ("6", "C", 19200),
        ("A", "B", 600),
        ("B", "B", 1200),
        ("C", "B", 2400),
        ("D", "B", 4800),
        ("E", "B", 9600),
        ("F", "B", 19200),
        ("G", "A", 300),
        ("7", "A", 300),
        (" ", "A", 300),
        ("-", "A", 300),
        ("z", "A", 300),
    ],
)
def test_identification_baud_chars(char: str, mode: str, baud: int) -> None:
    ident = parse_identification(f"/ABC{char}XYZ\r\n".encode())
    assert (ident.mode, ident.baud, ident.baud_char) == (mode, baud, char)


def test_identification_escapes() -> None:
    e = parse_identification(b"/LGZ5\\2ZMF100AC\r\n")
    assert (e.mode, e.escapes, e.ident, e.baud) == ("E", ("2",), "ZMF100AC", 9600)
    multi = parse_identification(b"/EMH5\\@\\2XYZ\r\n")
    assert (multi.mode, multi.escapes, multi.ident) == ("E", ("@", "2"), "XYZ")
    not_e = parse_identification(b"/EMH5\\@01LZQJ\r\n")
    assert (not_e.mode, not_e.escapes) == ("C", ("@",))
    # \2 only means mode E with a mode C/E baud character.
    assert parse_identification(b"/ABCE\\2X\r\n").mode == "B"
    assert parse_identification(b"/ABC5\r\n").ident == ""


def test_identification_pushed_is_mode_d() -> None:
    d = parse_identification(b"/ABC3METER\r\n", pushed=True)
    assert (d.mode, d.baud) == ("D", 2400)
    assert parse_identification(b"/KFM5KAIFA-METER\r\n", pushed=True).mode == "D"


@pytest.mark.parametrize(
    "line",
    [
        b"/AB\r\n",
        b"ABC5X\r\n",
        b"/ABC5X\n",
        b"/ABC5X",
        b"/A!C5X\r\n",
        b"/ABC/X\r\n",
        b"/AB\xc35X\r\n",
        b"/AB\r5X\r\n",
    ],
)
def test_identification_rejects(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_identification(line)


def test_encode_identification_round_trip() -> None:
    line = encode_identification("ISk", "5", "MT174", escapes=["2"])
    assert line == b"/ISk5\\2MT174\r\n"
    assert parse_identification(line).escapes == ("2",)
    with pytest.raises(LocalProtocolError):
        encode_identification("IS", "5", "X")
    with pytest.raises(LocalProtocolError):
        encode_identification("ISK", "!", "X")


# -- option select ---------------------------------------------------------------------------------


def test_option_select() -> None:
    assert encode_option_select("5") == bytes.fromhex("06 30 35 30 0D 0A")
    assert encode_option_select("5", mode_control="1") == bytes.fromhex("06 30 35 31 0D 0A")
    assert encode_option_select("5", "2", "2") == b"\x06252\r\n"
    opt = parse_option_select(b"\x06040\r\n")
    assert opt == OptionSelect("0", "4", "0")
    assert opt.baud == 4800
    assert parse_option_select(b"\x06090\r\n").baud is None


@pytest.mark.parametrize(
    ("z", "y", "v"), [("7", "0", "0"), ("A", "0", "0"), ("5", "3", "0"), ("5", "0", "3"), ("", "0", "0")]
)
def test_option_select_rejects(z: str, y: str, v: str) -> None:
    with pytest.raises(LocalProtocolError):
        encode_option_select(z, y, v)


@pytest.mark.parametrize(
    "frame", [b"\x0605\r\n", b"\x06A50\r\n", b"\x06050\n\n", b"\x15050\r\n", b"\x06\xb250\r\n"]
)
def test_parse_option_select_rejects(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_option_select(frame)


# -- BCC and CRC -----------------------------------------------------------------------------------


def test_bcc_modes() -> None:
    data = b"1.8.0(001234.5*kWh)\r\n!\r\n\x03"
    assert compute_bcc(data) == xor(data)
    assert compute_bcc(data, "sum7") == sum(data) & 0x7F
    with pytest.raises(LocalProtocolError):
        compute_bcc(data, "none")
    big = bytes(range(256)) * 37 + b"xyz"
    assert compute_bcc(big) == xor(big)
    for n in range(0, 300):
        chunk = big[:n]
        assert compute_bcc(chunk) == xor(chunk)


def test_crc16_arc_check_value() -> None:
    assert crc16_arc(b"123456789") == 0xBB3D
    assert crc16_arc(b"") == 0


# -- data messages ---------------------------------------------------------------------------------


def test_data_message_readout() -> None:
    frame = stx_frame("1.8.0(001234.5*kWh)\r\nF.F(00)\r\n!\r\n")
    msg = parse_data_message(frame)
    assert msg == DataMessage(
        block="1.8.0(001234.5*kWh)\r\nF.F(00)\r\n",
        datasets=[DataSet("1.8.0", [("001234.5", "kWh")]), DataSet("F.F", [("00", None)])],
        raw=frame,
        bcc_ok=True,
        readout=True,
        partial=False,
    )
    assert encode_data_message(msg.datasets) == frame


def test_data_message_bcc_modes() -> None:
    ds = [DataSet("6.8", [("0012.345", "GJ")])]
    sum7 = encode_data_message(ds, "sum7")
    assert parse_data_message(sum7, "sum7").bcc_ok
    with pytest.raises(BccError):
        parse_data_message(sum7, "xor")
    none = encode_data_message(ds, "none")
    assert none.endswith(ETX)
    msg = parse_data_message(none, "none")
    assert (msg.bcc_ok, msg.datasets) == (False, ds)
    with pytest.raises(RemoteProtocolError):
        parse_data_message(none + b"\x00", "none")
    with pytest.raises(RemoteProtocolError):
        parse_data_message(none, "xor")  # BCC missing


def test_data_message_partial_block() -> None:
    msg = parse_data_message(stx_frame("1.8.0(1)", end=b"\x04"))
    assert msg.partial and not msg.readout


def test_data_message_framing_errors() -> None:
    good = stx_frame("1.8.0(1)\r\n!\r\n")
    for bad in (b"", good[1:], good[:-2], good + b"x", b"\x01" + good[1:]):
        with pytest.raises(RemoteProtocolError):
            parse_data_message(bad)
    with pytest.raises(RemoteProtocolError):
        parse_data_message(stx_frame("1.8.0(1\r\n!\r\n"))
    with pytest.raises(RemoteProtocolError):
        parse_data_message(STX + "1.8.0(\u00e9)\x03".encode("latin-1") + b"\x00")


def test_error_message() -> None:
    frame = stx_frame("(ER01)")
    with pytest.raises(NegativeResponse) as info:
        parse_data_message(frame)
    assert (info.value.code, info.value.text) == (1, "ER01")
    with pytest.raises(NegativeResponse) as info:
        parse_data_message(encode_error_message("ER1A"))
    assert info.value.code == 0x1A
    # A single value without address is a normal programming reply, not an error.
    assert parse_data_message(stx_frame("(123000)")).datasets == [DataSet("", [("123000", None)])]


# -- programming mode ------------------------------------------------------------------------------


def test_programming_encoders() -> None:
    assert encode_password("00000000") == b"\x01P1\x02(00000000)\x03\x61"
    assert encode_write("0.9.1", "123000") == b"\x01W1\x020.9.1(123000)\x03\x5e"
    assert encode_break() == b"\x01B0\x03q"
    assert encode_read("1.8.0") == b"\x01R1\x021.8.0()\x03" + bytes([xor(b"R1\x021.8.0()\x03")])
    assert encode_read("P.01", 4).startswith(b"\x01R1\x02P.01(4)\x03")
    assert encode_password("secret", level=2).startswith(b"\x01P2\x02(secret)")
    partial = encode_command("W1", "0.9.1(1)", partial=True)
    assert partial[-2] == 0x04
    for frame in (encode_password("00000000"), encode_write("0.9.1", "123000"), encode_break(), partial):
        msg = parse_command_message(frame)
        assert msg.raw == frame and msg.bcc_ok
    assert parse_command_message(encode_break()) == CommandMessage("B0", "", encode_break(), True, False)
    assert parse_command_message(partial).partial


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_password("a(b"),
        lambda: encode_password("x", level=3),
        lambda: encode_write("0.9.1", "1)"),
        lambda: encode_write("", "1"),
        lambda: encode_read("1.8.0", -1),
        lambda: encode_read("a(b"),
        lambda: encode_command("X1"),
        lambda: encode_command("W"),
        lambda: encode_command("W1", "a\r\nb"),
        lambda: encode_error_message("x" * 33),
    ],
)
def test_programming_encoders_reject(call: object) -> None:
    with pytest.raises(LocalProtocolError):
        call()  # type: ignore[operator]


def test_command_message_errors() -> None:
    body = b"X1\x02(1)\x03"
    with pytest.raises(RemoteProtocolError):
        parse_command_message(b"\x01" + body + bytes([xor(body)]))
    body = b"W1(1)\x03"
    with pytest.raises(RemoteProtocolError):
        parse_command_message(b"\x01" + body + bytes([xor(body)]))
    with pytest.raises(BccError):
        parse_command_message(b"\x01B0\x03r")


# -- data sets -------------------------------------------------------------------------------------


def test_datasets_multiple_values_and_units() -> None:
    assert parse_datasets("0.1.2*04(2403010000)(2402010000)\r\n") == [
        DataSet("0.1.2*04", [("2403010000", None), ("2402010000", None)])
    ]
    assert parse_datasets("1.6.0(02.345*kW)(24-03-12 08:15)") == [
        DataSet("1.6.0", [("02.345", "kW"), ("24-03-12 08:15", None)])
    ]


def test_datasets_several_per_line() -> None:
    assert parse_datasets("1.8.1(1*kWh)1.8.2(2*kWh)\r\n2.8.0(3*kWh)\r\n") == [
        DataSet("1.8.1", [("1", "kWh")]),
        DataSet("1.8.2", [("2", "kWh")]),
        DataSet("2.8.0", [("3", "kWh")]),
    ]


def test_datasets_omitted_address_keeps_last() -> None:
    got = parse_datasets("P.01(2403151200)(15)(1.5.0)(kW)\r\n(0.512)(0.000)\r\n(0.498)\r\n")
    assert got == [
        DataSet("P.01", [("2403151200", None), ("15", None), ("1.5.0", None), ("kW", None)]),
        DataSet("P.01", [("0.512", None), ("0.000", None)]),
        DataSet("P.01", [("0.498", None)]),
    ]
    assert parse_datasets("(1)(2)") == [DataSet("", [("1", None), ("2", None)])]


def test_datasets_spaces_and_obis_forms() -> None:
    assert parse_datasets("1.8.0(0000000 kWh)") == [DataSet("1.8.0", [("0000000", "kWh")])]
    assert parse_datasets("1.8.0( 0012.5 *kWh )") == [DataSet("1.8.0", [("0012.5", "kWh")])]
    assert parse_datasets("  1-0:1.8.0*255(1*kWh)\r\n 1.8.0(2*kWh)") == [
        DataSet("1-0:1.8.0*255", [("1", "kWh")]),
        DataSet("1.8.0", [("2", "kWh")]),
    ]
    assert parse_datasets("C.1.1()(*)") == [DataSet("C.1.1", [("", None), ("", None)])]
    assert parse_datasets("") == []
    assert parse_datasets("\r\n") == []


@pytest.mark.parametrize(
    "block",
    [
        "1.8.0(1",
        "1.8.0(1(2))",
        "1.8.0)(1)",
        "1.8.0(1)\r\nF.F",
        "1.8.0(1\r\n)",
        "a/b(1)",
        "a!b(1)",
        "1.8.0(\x01)",
    ],
)
def test_datasets_malformed(block: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_datasets(block)


def test_encode_datasets() -> None:
    ds = [DataSet("1.8.0", [("1", "kWh"), ("2", None)]), DataSet("F.F", [("0", None)])]
    assert encode_datasets(ds) == "1.8.0(1*kWh)(2)\r\nF.F(0)\r\n"
    assert parse_datasets(encode_datasets(ds)) == ds
    for bad in (
        [DataSet("", [("1", None)])],
        [DataSet("a(b", [("1", None)])],
        [DataSet("1.8.0", [])],
        [DataSet("1.8.0", [("1*2", None)])],
        [DataSet("1.8.0", [("1", "k(Wh")])],
        [DataSet("1.8.0", [("1", "")])],
    ):
        with pytest.raises(LocalProtocolError):
            encode_datasets(bad)


# -- values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("kWh", "kWh"),
        ("KWH", "kWh"),
        ("kwh", "kWh"),
        ("kW", "kW"),
        ("V", "V"),
        ("A", "A"),
        ("Hz", "Hz"),
        ("HZ", "Hz"),
        ("m3", "m3"),
        ("M3", "m3"),
        ("m^3", "m3"),
        ("kVArh", "kvarh"),
        ("GJ", "GJ"),
        ("Cel", "degC"),
        ("furlong", "furlong"),
        (None, None),
    ],
)
def test_normalize_unit(unit: str | None, expected: str | None) -> None:
    assert normalize_unit(unit) == expected


def test_numeric_value() -> None:
    assert numeric_value("0012345.678") == 12345.678
    assert numeric_value("-1.5") == -1.5
    assert numeric_value(".5") == 0.5
    assert numeric_value("00000000", "kWh") == 0.0
    assert numeric_value("00000000") == "00000000"  # a unitless id keeps its zeros
    assert numeric_value("00012345") == "00012345"
    assert numeric_value("12345") == 12345.0
    assert numeric_value("12345678", None, "0.0.0") == "12345678"  # device address
    assert numeric_value("42", None, "1-0:96.1.0*255") == "42"
    assert numeric_value("42", None, "C.7.0") == "42"
    assert numeric_value("42", "kWh", "0.0.0") == 42.0
    assert numeric_value("12 345") == 12345.0
    for text in ("", "170102192002W", "24-03-12 08:15", "4B38", "inf", "nan", "1e3", "1.2.3"):
        assert numeric_value(text) == text


def test_dataset_values() -> None:
    got = dataset_values([DataSet("1.8.0", [("0012.5", "KWH"), ("x", None)])])
    assert got == [
        {"id": "1.8.0", "value": 12.5, "unit": "kWh", "raw": "0012.5*KWH"},
        {"id": "1.8.0", "value": "x", "unit": None, "raw": "x"},
    ]


# -- P1 --------------------------------------------------------------------------------------------


def test_p1_round_trip() -> None:
    ds = [DataSet("1-0:1.8.1", [("000004.426", "kWh")]), DataSet("0-0:96.13.0", [("", None)])]
    tele = encode_p1_telegram("ISk", "5", "MT382-1000", ds, escapes=["2"])
    parsed = parse_p1_telegram(tele)
    assert parsed.datasets == ds and parsed.crc is not None and parsed.raw == tele
    bare = encode_p1_telegram("ISk", "5", "MT382", ds, with_crc=False)
    assert parse_p1_telegram(bare).crc is None


@pytest.mark.parametrize("tail", [b"!XYZ\r\n", b"!12345\r\n", b"!0000\r\n"])
def test_p1_bad_crc_text(tail: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_p1_telegram(b"/ISk5MT382\r\n\r\n1.8.1(1)\r\n" + tail)


def test_p1_framing_errors() -> None:
    for bad in (
        b"ISk5\r\n!\r\n",
        b"/ISk5MT382",
        b"/ISk5MT382\r\n1.8.1(1)\r\n",
        b"/ISk5MT382\r\n1.8.1(1)!1234",
    ):
        with pytest.raises(RemoteProtocolError):
            parse_p1_telegram(bad)


# -- receiver --------------------------------------------------------------------------------------


def test_receiver_master_side_sequence() -> None:
    rx = IecReceiver()
    data_frame = encode_data_message([DataSet("1.8.0", [("1", "kWh")])])
    rx.receive_data(
        b"\x00\xff/?123!\r\n" + b"/ISk5MT174\r\n" + data_frame + b"\x06\x15" + stx_frame("(ER02)")
    )
    got = drain(rx)
    assert got[0] == Request("123")
    assert isinstance(got[1], Identification)
    assert isinstance(got[2], DataMessage)
    assert got[3:] == [Ack(), Nak(), NegativeResponse]
    assert rx.discarded_bytes == 2
    assert not rx.in_message


def test_receiver_meter_side() -> None:
    rx = IecReceiver(side="meter")
    rx.receive_data(b"/?123!\r\n\x06050\r\n")
    assert drain(rx) == [Request("123"), OptionSelect("0", "5", "0")]
    rx.receive_data(b"\x06")
    assert drain(rx) == []  # a lone ACK waits: it may start an option select
    assert rx.in_message
    rx.receive_data(b"\x15" + encode_break())
    assert drain(rx) == [Ack(), Nak(), CommandMessage("B0", "", encode_break(), True, False)]
    rx.receive_data(b"\x0605x\r\n/?1!\r\n")
    assert drain(rx) == [RemoteProtocolError, Request("1")]


def test_receiver_resynchronises_after_garbage() -> None:
    rx = IecReceiver()
    rx.receive_data(b"/" + b"x" * 200 + b"/ISk5MT174\r\n")
    got = drain(rx)
    assert got[0] is RemoteProtocolError
    assert isinstance(got[-1], Identification)
    rx.receive_data(stx_frame("1.8.0(1)\r\n!\r\n")[:-1] + b"\x00" + b"/ABC5\r\n")
    got = drain(rx)
    assert got == [BccError, parse_identification(b"/ABC5\r\n")]


def test_receiver_bounds_message_size() -> None:
    rx = IecReceiver(max_message_bytes=1000)
    rx.receive_data(b"\x02" + b"1" * 999)
    assert drain(rx) == []
    assert rx.in_message
    rx.receive_data(b"11")
    assert drain(rx) == [RemoteProtocolError]
    assert not rx.in_message
    rx.receive_data(stx_frame("1.8.0(1)\r\n!\r\n"))
    assert isinstance(drain(rx)[0], DataMessage)
    p1 = IecReceiver(side="p1", max_message_bytes=1000)
    p1.receive_data(b"/" + b"1" * 1001)
    assert drain(p1) == [RemoteProtocolError]


def test_receiver_bcc_none() -> None:
    rx = IecReceiver(bcc_mode="none")
    frame = encode_data_message([DataSet("1.8.0", [("1", None)])], "none")
    rx.receive_data(frame)
    (msg,) = drain(rx)
    assert isinstance(msg, DataMessage) and not msg.bcc_ok


def test_receiver_rejects_bad_config() -> None:
    with pytest.raises(LocalProtocolError):
        IecReceiver(side="slave")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        IecReceiver(bcc_mode="crc")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        IecReceiver(max_message_bytes=10)
