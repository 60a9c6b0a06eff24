"""Every IEC 62056-21 / DSMR vector in tests/vectors/, whole and split at every byte boundary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dcud.codec.iec62056 import (
    BccError,
    BccMode,
    CommandMessage,
    DataMessage,
    DataSet,
    Identification,
    IecReceiver,
    P1Telegram,
    ReceiverSide,
    compute_bcc,
    crc16_arc,
    dataset_values,
    parse_command_message,
    parse_data_message,
    parse_p1_telegram,
)
from dcud.codec.iec_session import Done, Drain, IecReadout, Send, SetBaud
from dcud.errors import NegativeResponse, ProtocolError, RemoteProtocolError

from helpers import TESTS

VECTORS = TESTS / "vectors"
DSMR = VECTORS / "dsmr_parser"
PWITAB = VECTORS / "pwitab-iec62056-21"
OURS = VECTORS / "dcud-iec"

DSMR_FILES = sorted(DSMR.glob("TELEGRAM_*.txt"))
OUR_CAPTURES = sorted(p.stem for p in OURS.glob("*.json"))

WITH_CRC = {
    "TELEGRAM_FLUVIUS_V171",
    "TELEGRAM_FLUVIUS_V171_ALT",
    "TELEGRAM_ISKRA_IE",
    "TELEGRAM_SAGEMCOM_T210_D_R",
    "TELEGRAM_UNPADDED_CRC",
    "TELEGRAM_V4_2",
    "TELEGRAM_V5",
    "TELEGRAM_V5_EON_HU",
    "TELEGRAM_V5_TWO_MBUS",
}

# One or more (address, index of the data set with that address, expected values) per telegram,
# read off the telegram text (and matching upstream dsmr_parser's test expectations).
DSMR_SPOT: dict[str, list[tuple[str, list[tuple[str, str | None]]]]] = {
    "TELEGRAM_ESY5Q3DA1004_V304": [
        ("1-0:1.8.0*255", [("00032549.5061662", "kWh")]),
        ("0-0:96.1.255*255", [("1ESY1336001560", None)]),
    ],
    "TELEGRAM_ESY5Q3DB1024_V304": [("1-0:2.8.0*255", [("00019949.3221493", "kWh")])],
    "TELEGRAM_FLUVIUS_V171": [
        ("1-0:1.8.1", [("000000.034", "kWh")]),
        ("0-1:24.2.3", [("200512134558S", None), ("00112.384", "m3")]),
        ("1-0:32.7.0", [("234.7", "V")]),
    ],
    "TELEGRAM_FLUVIUS_V171_ALT": [("1-0:1.8.1", [("000301.548", "kWh")])],
    "TELEGRAM_ISKRA_IE": [("1-0:1.8.1", [("000010.181", "kWh")]), ("1-0:31.7.0", [("000", "A")])],
    "TELEGRAM_SAGEMCOM_T210_D_R": [
        ("1-0:1.8.1", [("005017120", "Wh")]),
        ("1-0:3.7.0", [("000000000", "var")]),
    ],
    "TELEGRAM_UNPADDED_CRC": [("0-1:24.2.1", [("260215200523W", None), ("240.860", "GJ")])],
    "TELEGRAM_V2_2": [("1-0:1.8.1", [("00001.001", "kWh")]), ("0-1:24.4.0", [("1", None)])],
    "TELEGRAM_V3": [("1-0:1.8.1", [("12345.678", "kWh")]), ("0-0:17.0.0", [("016", "A")])],
    "TELEGRAM_V4_2": [
        ("1-0:1.8.1", [("001581.123", "kWh")]),
        ("0-1:24.2.1", [("161129200000W", None), ("00981.443", "m3")]),
    ],
    "TELEGRAM_V5": [
        ("1-0:1.8.1", [("000004.426", "kWh")]),
        ("1-0:1.8.2", [("000002.399", "kWh")]),
        ("1-0:32.7.0", [("0230.0", "V")]),
        ("0-1:24.2.1", [("170102161005W", None), ("00000.107", "m3")]),
        ("0-2:96.1.0", [("", None)]),
    ],
    "TELEGRAM_V5_EON_HU": [("1-0:1.8.1", [("000047.719", "kWh")]), ("1-0:14.7.0", [("50.00", "Hz")])],
    "TELEGRAM_V5_TWO_MBUS": [
        ("1-0:1.8.1", [("002130.115", "kWh")]),
        ("0-2:24.2.1", [("200426223001S", None), ("00246.138", "m3")]),
    ],
}


def outcomes(side: ReceiverSide, chunks: list[bytes], bcc_mode: BccMode = "xor") -> list[Any]:
    """Everything a receiver yields for ``chunks``: messages, and errors as (type name, message)."""
    rx = IecReceiver(side=side, bcc_mode=bcc_mode)
    out: list[Any] = []
    for chunk in chunks:
        rx.receive_data(chunk)
        for _ in range(10_000):
            try:
                msg = rx.next_message()
            except (ProtocolError, NegativeResponse) as exc:
                out.append((type(exc).__name__, str(exc)))
                continue
            if msg is None:
                break
            out.append(msg)
    return out


def assert_split_invariant(side: ReceiverSide, data: bytes, bcc_mode: BccMode = "xor") -> list[Any]:
    """Feed ``data`` whole, split at every boundary and byte by byte: all give the same outcome."""
    whole = outcomes(side, [data], bcc_mode)
    for k in range(1, len(data)):
        assert outcomes(side, [data[:k], data[k:]], bcc_mode) == whole, f"split at {k}"
    assert outcomes(side, [data[i : i + 1] for i in range(len(data))], bcc_mode) == whole
    return whole


# -- pwitab BCC vectors ----------------------------------------------------------------------------


def load_bcc_vectors() -> list[tuple[bytes, int, str]]:
    rows = []
    for line in (PWITAB / "bcc_vectors.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        hex_frame, expected, note = (part.strip() for part in line.split(";", 2))
        rows.append((bytes.fromhex(hex_frame), int(expected, 16), note))
    return rows


BCC_VECTORS = load_bcc_vectors()


def test_bcc_vector_count() -> None:
    assert len(BCC_VECTORS) == 4
    assert (PWITAB / "LICENSE.txt").exists()


@pytest.mark.parametrize(("frame", "expected", "note"), BCC_VECTORS, ids=[n[:30] for _, _, n in BCC_VECTORS])
def test_bcc_vector(frame: bytes, expected: int, note: str) -> None:
    assert compute_bcc(frame[1:-1]) == expected
    corrupted = frame[-1] != expected
    parse = parse_command_message if frame[0] == 0x01 else parse_data_message
    if corrupted:
        with pytest.raises(BccError) as info:
            parse(frame)
        assert info.value.expected == expected
        assert info.value.frame == frame
    else:
        msg = parse(frame)
        assert msg.bcc_ok and msg.raw == frame
    side: ReceiverSide = "meter" if frame[0] == 0x01 else "master"
    got = assert_split_invariant(side, frame)
    assert len(got) == 1
    if corrupted:
        assert got[0][0] == "BccError"
    else:
        assert got[0] == msg


def test_bcc_vector_contents() -> None:
    write, password, data, _bad = (parse_command_message(BCC_VECTORS[0][0]), None, None, None)
    assert isinstance(write, CommandMessage)
    assert (write.command, write.data) == ("W2", "C003(910324092239)")
    password = parse_command_message(BCC_VECTORS[1][0])
    assert (password.command, password.data) == ("P0", "(1234567)")
    data = parse_data_message(BCC_VECTORS[2][0])
    assert isinstance(data, DataMessage)
    assert data.datasets == [DataSet("3:171.0", [("0", None)])]
    assert not data.readout


# -- DSMR P1 telegrams -----------------------------------------------------------------------------


def test_dsmr_vector_count() -> None:
    assert len(DSMR_FILES) == 13
    assert (DSMR / "LICENSE").exists()
    assert {p.stem for p in DSMR_FILES} >= WITH_CRC
    assert set(DSMR_SPOT) == {p.stem for p in DSMR_FILES}


@pytest.mark.parametrize("path", DSMR_FILES, ids=[p.stem for p in DSMR_FILES])
def test_dsmr_telegram(path: Path) -> None:
    data = path.read_bytes()
    tele = parse_p1_telegram(data)
    assert tele.ident.mode == "D"
    assert data.startswith(tele.raw)
    if path.stem in WITH_CRC:
        assert tele.crc is not None
        assert tele.crc == crc16_arc(data[: data.index(b"!") + 1])
    else:
        assert tele.crc is None
    assert tele.datasets, "no data sets"
    by_address: dict[str, list[DataSet]] = {}
    for ds in tele.datasets:
        by_address.setdefault(ds.address, []).append(ds)
        assert ds.values
    for address, values in DSMR_SPOT[path.stem]:
        assert by_address[address][0].values == values, address
    # Every data line of the telegram became at least one data set.
    lines = [ln for ln in tele.block.split("\r\n") if ln]
    assert len(tele.datasets) == len(lines)
    published = dataset_values(tele.datasets)
    assert all(set(v) == {"id", "value", "unit", "raw"} for v in published)


@pytest.mark.parametrize("path", DSMR_FILES, ids=[p.stem for p in DSMR_FILES])
def test_dsmr_telegram_split(path: Path) -> None:
    data = path.read_bytes()
    got = assert_split_invariant("p1", data)
    assert got == [parse_p1_telegram(data)]
    # Two telegrams back to back come out as two.
    assert outcomes("p1", [data + data]) == got * 2


def test_dsmr_crc_corruption_rejected() -> None:
    data = (DSMR / "TELEGRAM_V5.txt").read_bytes()
    bad = data.replace(b"000004.426", b"000004.427")
    with pytest.raises(RemoteProtocolError, match="CRC mismatch"):
        parse_p1_telegram(bad)
    got = outcomes("p1", [bad])
    assert len(got) == 1 and got[0][0] == "RemoteProtocolError"


def test_dsmr_v5_values() -> None:
    tele = parse_p1_telegram((DSMR / "TELEGRAM_V5.txt").read_bytes())
    assert tele.ident.manufacturer == "ISk"
    assert tele.ident.escapes == ("2",)
    assert tele.ident.ident == "MT382-1000"
    assert tele.crc == 0x6EEE
    values = {(v["id"], v["raw"]): v for v in dataset_values(tele.datasets)}
    v181 = values[("1-0:1.8.1", "000004.426*kWh")]
    assert v181["value"] == pytest.approx(4.426)
    assert v181["unit"] == "kWh"
    assert values[("1-0:1.7.0", "00.244*kW")]["value"] == pytest.approx(0.244)
    assert values[("0-1:24.2.1", "00000.107*m3")]["unit"] == "m3"
    assert values[("0-0:1.0.0", "170102192002W")]["value"] == "170102192002W"
    assert values[("1-3:0.2.8", "50")]["value"] == "50"  # DSMR version: an identifier, kept as sent


def test_dsmr_quirks() -> None:
    unpadded = parse_p1_telegram((DSMR / "TELEGRAM_UNPADDED_CRC.txt").read_bytes())
    assert unpadded.crc == 0xB9F
    assert unpadded.ident.manufacturer == "NWA"
    iskra_ie = parse_p1_telegram((DSMR / "TELEGRAM_ISKRA_IE.txt").read_bytes())
    assert iskra_ie.ident.ident == "\x02MIE5T-200"  # upstream's "\2" became a real STX byte
    v22 = parse_p1_telegram((DSMR / "TELEGRAM_V2_2.txt").read_bytes())
    gas = [ds for ds in v22.datasets if ds.address == "0-1:24.3.0"]
    assert len(gas) == 2  # the reading on the next line keeps the address
    assert gas[0].values[-1] == ("m3", None)
    assert gas[1].values == [("00001.001", None)]
    esy = (DSMR / "TELEGRAM_ESY5Q3DB1024_V304.txt").read_bytes()
    tele = parse_p1_telegram(esy)
    assert tele.raw.endswith(b"!\r\n")
    assert len(tele.raw) < len(esy)  # EasyMeter's trailing lines are not part of the telegram
    rx = IecReceiver(side="p1")
    rx.receive_data(esy)
    assert rx.next_message() == tele
    assert rx.next_message() is None
    assert rx.discarded_bytes == len(esy) - len(tele.raw)
    assert not rx.in_message


# -- our computed mode C / mode A readouts ---------------------------------------------------------


def load_capture(name: str) -> tuple[bytes, dict[str, Any]]:
    return (OURS / f"{name}.bin").read_bytes(), json.loads((OURS / f"{name}.json").read_text())


def test_our_capture_count() -> None:
    assert len(OUR_CAPTURES) == 4
    assert "computed" in (OURS / "README.md").read_text()


@pytest.mark.parametrize("name", OUR_CAPTURES)
def test_our_capture_decode(name: str) -> None:
    stream, exp = load_capture(name)
    bcc_mode: BccMode = exp["bcc_mode"]
    got = assert_split_invariant("master", stream, bcc_mode)
    assert len(got) == 2
    ident, data = got
    assert isinstance(ident, Identification)
    for key, value in exp["ident"].items():
        got_value = getattr(ident, key)
        assert (list(got_value) if isinstance(got_value, tuple) else got_value) == value, key
    assert isinstance(data, DataMessage)
    assert data.raw == bytes.fromhex(exp["data_message_hex"])
    assert data.bcc_ok and data.readout and not data.partial
    assert [[ds.address, [list(v) for v in ds.values]] for ds in data.datasets] == exp["datasets"]
    # The other check byte convention rejects the frame.
    other: BccMode = "xor" if bcc_mode == "sum7" else "sum7"
    with pytest.raises(BccError):
        parse_data_message(data.raw, other)


@pytest.mark.parametrize("name", OUR_CAPTURES)
def test_our_capture_session_replay(name: str) -> None:
    """The session sends exactly the request and option select of the capture, then decodes it."""
    stream, exp = load_capture(name)
    ident_len = stream.index(b"\r\n") + 2
    session = IecReadout(exp["address"], bcc_mode=exp["bcc_mode"])
    actions = session.start(0.0)
    assert Send(exp["request"].encode("ascii")) in actions
    assert session.receive_data(stream[:ident_len], 1.0) == []
    if exp["option_select"] is not None:
        deadline = session.next_deadline()
        assert deadline is not None
        baud = exp["ident"]["baud"]
        assert session.handle_timer(deadline) == [
            Send(exp["option_select"].encode("ascii")),
            Drain(),
            SetBaud(baud),
        ]
    else:
        baud = 300
    rest = stream[ident_len:]
    final = []
    for i in range(len(rest)):  # the data message trickles in byte by byte
        final += session.receive_data(rest[i : i + 1], 2.0 + i * 0.001)
    assert len(final) == 1 and isinstance(final[0], Done)
    result = final[0].result
    assert result.raw == bytes.fromhex(exp["data_message_hex"])
    assert result.bcc_ok and result.baud == baud
    values = result.to_values()
    assert len(values) == sum(len(v) for _, v in exp["datasets"])


def test_our_capture_values() -> None:
    stream, _ = load_capture("lgz_zmd_mode_c_4800_full_obis")
    got = outcomes("master", [stream])
    values = dataset_values(got[1].datasets)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for v in values:
        by_id.setdefault(str(v["id"]), []).append(v)
    assert by_id["1-0:1.8.0*255"] == [
        {"id": "1-0:1.8.0*255", "value": 1234.5, "unit": "kWh", "raw": "0001234.5*kWh"}
    ]
    assert by_id["1-0:2.8.0*255"][0]["value"] == 0.0
    assert by_id["1-0:2.8.0*255"][0]["unit"] == "kWh"
    assert [v["value"] for v in by_id["0.1.2*04"]] == [
        "2403010000",
        "2402010000",
    ]  # time stamps, kept as sent
    assert len(by_id["P.01"]) == 12
    stream, _ = load_capture("iskra_mt174_mode_c_9600")
    got = outcomes("master", [stream])
    md = [v for v in dataset_values(got[1].datasets) if v["id"] == "1.6.0"]
    assert [v["value"] for v in md] == [2.345, "24-03-12 08:15"]


def test_all_vectors_accounted() -> None:
    """Every file under the IEC vector folders is used by a test above."""
    assert sorted(p.name for p in PWITAB.iterdir()) == ["LICENSE.txt", "bcc_vectors.txt"]
    assert {p.name for p in DSMR.iterdir()} == {"LICENSE"} | {p.name for p in DSMR_FILES}
    names = {p.name for p in OURS.iterdir()}
    assert names == {"README.md"} | {f"{n}.bin" for n in OUR_CAPTURES} | {f"{n}.json" for n in OUR_CAPTURES}


def test_p1_telegram_type() -> None:
    data = (DSMR / "TELEGRAM_V4_2.txt").read_bytes()
    (tele,) = outcomes("p1", [b"noise\xff\x00" + data])
    assert isinstance(tele, P1Telegram)
    assert tele.ident.manufacturer == "KFM"
    profile = next(ds for ds in tele.datasets if ds.address == "1-0:99.97.0")
    assert len(profile.values) == 8
    assert profile.values[3] == ("0000237126", "s")
