"""HDLC frame codec (IEC 62056-46): published vectors, the stream reader, addresses, parameters."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dcud.codec.crc import crc16_x25
from dcud.codec.dlms.hdlc import (
    FrameKind,
    HdlcAddress,
    HdlcFrame,
    HdlcFrameReader,
    HdlcParameters,
    control_kind,
    decode_address,
    decode_frame,
    decode_parameters,
    describe_frmr,
    encode_frame,
    encode_parameters,
    i_control,
    negotiate,
    rnr_control,
    rr_control,
    u_control,
)
from dcud.errors import LocalProtocolError, RemoteProtocolError

from helpers import TESTS
from helpers.dlms import drain_hdlc

VECTORS = TESTS / "vectors" / "dlms" / "hdlc"


def _load() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(VECTORS.glob("*.json")):
        for frame in json.loads(path.read_text())["frames"]:
            out.append((f"{path.stem}:{frame['name']}", frame))
    return out


FRAMES = _load()


def _address(spec: dict[str, Any]) -> HdlcAddress:
    return HdlcAddress(spec["upper"], spec["lower"], spec["size"])


def _read_all(chunks: list[bytes]) -> list[HdlcFrame]:
    reader = HdlcFrameReader()
    frames = []
    for chunk in chunks:
        reader.receive_data(chunk)
        for _ in range(100):
            frame = reader.next_frame()
            if frame is None:
                break
            frames.append(frame)
    return frames


def test_vector_files_are_there() -> None:
    assert len(FRAMES) >= 9
    assert (VECTORS / "LICENSE.epri-dlms-cosem").is_file()
    assert (VECTORS / "LICENSE.u9n-dlms-cosem").is_file()


@pytest.mark.parametrize(("name", "spec"), FRAMES, ids=[n for n, _ in FRAMES])
def test_published_frame_decodes_as_its_source_states(name: str, spec: dict[str, Any]) -> None:
    raw = bytes.fromhex(spec["hex"])
    frame = decode_frame(raw)
    assert frame.destination == _address(spec["destination"])
    assert frame.source == _address(spec["source"])
    assert frame.kind is FrameKind(spec["kind"])
    assert frame.poll_final is spec["poll_final"]
    assert frame.segmented is spec["segmented"]
    assert frame.info == bytes.fromhex(spec["info_hex"])
    if "ns" in spec:
        assert (frame.ns, frame.nr) == (spec["ns"], spec["nr"])
    if "parameters" in spec:
        assert decode_parameters(frame.info) == HdlcParameters(**spec["parameters"])
    assert encode_frame(frame) == raw


@pytest.mark.parametrize(("name", "spec"), FRAMES, ids=[n for n, _ in FRAMES])
def test_published_frame_split_at_every_boundary(name: str, spec: dict[str, Any]) -> None:
    raw = bytes.fromhex(spec["hex"])
    expected = decode_frame(raw)
    for cut in range(1, len(raw)):
        assert _read_all([raw[:cut], raw[cut:]]) == [expected], f"cut at {cut}"
    assert _read_all([bytes([b]) for b in raw]) == [expected]


def test_all_published_frames_back_to_back_byte_by_byte() -> None:
    raws = [bytes.fromhex(spec["hex"]) for _, spec in FRAMES]
    stream = b"".join(raws)
    assert _read_all([bytes([b]) for b in stream]) == [decode_frame(r) for r in raws]


def test_crc_x25_check_values() -> None:
    assert crc16_x25(b"123456789") == 0x906E
    crc = json.loads((VECTORS / "u9n_dlms_cosem.json").read_text())["crc"][0]
    assert crc16_x25(bytes.fromhex(crc["data_hex"])).to_bytes(2, "little") == bytes.fromhex(crc["check_hex"])


def test_frame_with_7e_inside_decodes() -> None:
    # The DLMS UA AARQ frame has HCS 7E CB; build more with 7E in the data and in the length.
    aarq = bytes.fromhex(dict(FRAMES)["dlms_ua_examples:i_frame_aarq_hcs_contains_7e"]["hex"])
    assert 0x7E in aarq[1:-1]
    assert _read_all([aarq]) == [decode_frame(aarq)]
    server = HdlcAddress.server(1, 17)
    client = HdlcAddress.client(16)
    info = bytes([0x7E] * 40) + b"\x7e\xa0\x07\x03\x21\x93\x0f\x01\x7e"  # a fake frame in the data
    frame = HdlcFrame(client, server, i_control(2, 3), info, segmented=True)
    raw = encode_frame(frame)
    assert raw[2] != 0x7E
    for cut in range(1, len(raw)):
        assert _read_all([raw[:cut], raw[cut:]]) == [frame]
    long = HdlcFrame(client, server, i_control(0, 0), bytes(range(256))[: 0x7E - 10])
    raw = encode_frame(long)
    assert raw[2] == 0x7E  # the length byte is a flag value
    assert _read_all([raw]) == [long]


def test_reader_resyncs_after_garbage_and_damage() -> None:
    server = HdlcAddress.server(1, 17)
    client = HdlcAddress.client(16)
    good = [
        encode_frame(HdlcFrame(client, server, i_control(n % 8, 1), bytes([n]) * (n + 5))) for n in range(4)
    ]
    damaged = bytearray(good[1])
    damaged[-5] ^= 0xFF  # FCS will not match
    stream = (
        b"\x00\xff\x7e\x7e"  # noise and idle flags
        + good[0]
        + b"\x7e\xa0\x50\x21"  # a false start announcing 80 bytes, bad HCS follows
        + b"\x02\x23\x10\x00\x00"
        + bytes(damaged)
        + b"garbage \x7e\xa8"
        + good[2][:-1]  # shares its closing flag with the next frame's opening one
        + good[3]
    )
    for step in (1, 2, 3, 7, len(stream)):
        reader = HdlcFrameReader()
        frames, errors = drain_hdlc([stream[i : i + step] for i in range(0, len(stream), step)], reader)
        assert frames == [decode_frame(good[0]), decode_frame(good[2]), decode_frame(good[3])], step
        assert errors == 1
        assert reader.discarded_bytes > 0
        assert not reader.in_frame


def test_reader_drops_a_false_start_without_waiting_for_its_length() -> None:
    # Noise that looks like the start of a 2000-byte frame must not hold back the real frame.
    real = encode_frame(HdlcFrame(HdlcAddress.client(16), HdlcAddress.server(1, 17), u_control(FrameKind.UA)))
    reader = HdlcFrameReader()
    reader.receive_data(b"\x7e\xa7\xd0\x21\x02\x23\x10\x55\x55\x01\x02" + real)
    assert reader.next_frame() == decode_frame(real)


def test_reader_bounds_a_partial_frame_and_clear() -> None:
    reader = HdlcFrameReader(max_frame_length=64)
    frame = encode_frame(
        HdlcFrame(HdlcAddress.client(16), HdlcAddress.server(1), i_control(0, 0), b"x" * 100)
    )
    reader.receive_data(frame)
    assert reader.next_frame() is None  # announced more than the bound: dropped as garbage
    assert reader.buffered_bytes <= 1
    reader.receive_data(frame[:20])
    assert reader.in_frame
    reader.clear()
    assert not reader.in_frame
    with pytest.raises(LocalProtocolError):
        HdlcFrameReader(max_frame_length=5000)


def test_decode_frame_errors() -> None:
    good = encode_frame(HdlcFrame(HdlcAddress.server(1, 17), HdlcAddress.client(16), i_control(0, 0), b"abc"))
    for bad, why in [
        (good[:-1], "flags"),
        (b"\x7e" + bytes([0xB0]) + good[2:], "type"),
        (good[:5] + good[6:], "length"),
        (good[:-3] + bytes([good[-3] ^ 1]) + good[-2:], "FCS"),
    ]:
        with pytest.raises(RemoteProtocolError):
            decode_frame(bad)
        assert why
    # A frame with a correct FCS but a wrong HCS (built by hand).
    body = bytearray(good[1:-3])
    body[7] ^= 0x01  # HCS low byte
    raw = b"\x7e" + bytes(body) + crc16_x25(body).to_bytes(2, "little") + b"\x7e"
    with pytest.raises(RemoteProtocolError, match="HCS"):
        decode_frame(raw)
    # Three-byte address (no end bit until the third byte): not an HDLC address.
    body = bytearray(b"\xa0\x09\x02\x04\x07\x21\x93")
    raw = b"\x7e" + bytes(body) + crc16_x25(body).to_bytes(2, "little") + b"\x7e"
    with pytest.raises(RemoteProtocolError, match="address"):
        decode_frame(raw)


def test_addresses() -> None:
    assert HdlcAddress.client(16).encode() == b"\x21"
    assert HdlcAddress.client(1).encode() == b"\x03"
    assert HdlcAddress.server(1).encode() == b"\x03"
    assert HdlcAddress.server(1, 17).encode() == b"\x02\x23"
    assert HdlcAddress.server(1, 17, 4).encode() == b"\x00\x02\x00\x23"
    assert HdlcAddress.server(1, 0x3FFF) == HdlcAddress(1, 0x3FFF, 4)
    four = HdlcAddress.server(0x1234 & 0x3FFF, 0x2ABC & 0x3FFF, 4)
    assert decode_address(four.encode()) == four
    assert decode_address(b"\x02\x23").same_station(decode_address(b"\x00\x02\x00\x23"))
    assert str(HdlcAddress.server(1, 17)) == "1/17"
    for bad in (
        lambda: HdlcAddress.client(128),
        lambda: HdlcAddress.server(1, 200, 2),
        lambda: HdlcAddress(1, None, 3),
    ):
        with pytest.raises(LocalProtocolError):
            bad().checked()
    with pytest.raises(RemoteProtocolError):
        decode_address(b"\x02\x04\x07")
    with pytest.raises(RemoteProtocolError):
        decode_address(b"\x02")


def test_control_bytes() -> None:
    assert u_control(FrameKind.SNRM) == 0x93
    assert u_control(FrameKind.UA) == 0x73
    assert u_control(FrameKind.DISC) == 0x53
    assert u_control(FrameKind.DM) == 0x1F
    assert u_control(FrameKind.FRMR) == 0x97
    assert u_control(FrameKind.UI, poll=False) == 0x03
    assert i_control(0, 0) == 0x10
    assert i_control(1, 5) == 0xB2
    assert rr_control(1) == 0x31
    assert rnr_control(7, poll=False) == 0xE5
    kinds = {control_kind(c) for c in range(256)}
    assert FrameKind.UNKNOWN in kinds
    assert control_kind(0x09) is FrameKind.UNKNOWN  # REJ: not used by DLMS
    with pytest.raises(LocalProtocolError):
        i_control(8, 0)
    with pytest.raises(LocalProtocolError):
        u_control(FrameKind.RR)


def test_parameters_encode_decode_negotiate() -> None:
    assert encode_parameters(HdlcParameters()).hex() == "818012050180060180070400000001080400000001"
    big = HdlcParameters(max_info_tx=512, max_info_rx=1024, window_tx=1, window_rx=7)
    assert decode_parameters(encode_parameters(big)) == big
    assert decode_parameters(b"") == HdlcParameters()
    # Unknown parameters and groups are skipped; absent ones keep the default.
    info = bytes.fromhex("8180 06 0601FA 0901FF") + bytes.fromhex("F0 02 AABB")
    assert decode_parameters(info) == HdlcParameters(max_info_rx=250)
    server = HdlcParameters(max_info_tx=200, max_info_rx=100, window_tx=1, window_rx=1)
    agreed = negotiate(HdlcParameters(max_info_tx=500, max_info_rx=500, window_tx=7, window_rx=3), server)
    assert agreed == HdlcParameters(max_info_tx=100, max_info_rx=200, window_tx=1, window_rx=1)
    # A server offering more than proposed gets the proposal.
    assert negotiate(HdlcParameters(), HdlcParameters(1000, 1000, 7, 7)) == HdlcParameters()
    for bad in (
        "82",
        "8180",
        "81 80 05 05 02 00",
        "81 80 03 05 00 00",
        "81 80 06 05 05 0000000080",
        "81800307010A",
    ):
        with pytest.raises(RemoteProtocolError):
            decode_parameters(bytes.fromhex(bad))
    with pytest.raises(LocalProtocolError):
        HdlcParameters(window_tx=8).checked()


def test_frmr_text() -> None:
    assert "invalid N(R)" in describe_frmr(b"\x10\x00\x08")
    assert "too long" in describe_frmr(b"\x10\x00\x04")
    assert describe_frmr(b"") == "frame reject"


def test_describe_and_encode_limits() -> None:
    frame = HdlcFrame(HdlcAddress.client(16), HdlcAddress.server(1), i_control(1, 2), b"ab", segmented=True)
    assert frame.describe() == "I N(S)=1 N(R)=2 P/F seg 2 bytes"
    with pytest.raises(LocalProtocolError):
        encode_frame(HdlcFrame(HdlcAddress.client(16), HdlcAddress.server(1), 0x10, b"x" * 2040))
    with pytest.raises(LocalProtocolError):
        encode_frame(HdlcFrame(HdlcAddress.client(16), HdlcAddress.server(1), 0x100))
