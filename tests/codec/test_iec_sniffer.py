"""The IEC 62056-21 sniffer of transparent sessions: where the line switches, and nothing else changes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.iec62056 import DataSet, encode_break, encode_data_message, encode_identification
from dcud.codec.iec_sniffer import Forward, IecSniffer, SnifferState, SwitchLine

from helpers import TESTS

VECTORS = TESTS / "vectors" / "dcud-iec"
CAPTURES = sorted(p.stem for p in VECTORS.glob("*.json"))

REQUEST = b"/?12345678!\r\n"
IDENT_C = encode_identification("DCU", "5", "SIM62056")
OPTION_9600 = b"\x06050\r\n"
DATA = encode_data_message([DataSet("1.8.0", [("0001234.567", "kWh")]), DataSet("F.F", [("00", None)])])

Step = tuple[str, bytes]
"""("c", bytes) client -> meter, ("m", bytes) meter -> client, ("t", b"") timer at the next deadline."""


def run(sniffer: IecSniffer, steps: list[Step], split: int = 0) -> list[tuple[str, object]]:
    """Feed the steps (each chunk cut at ``split`` when inside it); return merged forwards and switches."""
    now = 100.0
    out: list[tuple[str, object]] = []
    for direction, data in steps:
        now += 0.05
        if direction == "t":
            deadline = sniffer.next_deadline()
            assert deadline is not None, "expected a pending deadline"
            now = max(now, deadline)
            actions = sniffer.handle_timer(now)
        else:
            pieces = [data[:split], data[split:]] if 0 < split < len(data) else [data]
            actions = []
            for piece in pieces:
                fn = sniffer.from_client if direction == "c" else sniffer.from_meter
                actions += fn(piece, now)
        for action in actions:
            if isinstance(action, Forward):
                assert action.data, "empty Forward"
                if out and out[-1][0] == direction and isinstance(out[-1][1], bytes):
                    out[-1] = (direction, out[-1][1] + action.data)
                else:
                    out.append((direction, action.data))
            else:
                assert isinstance(action, SwitchLine)
                out.append(("switch", (action.baud, action.framing)))
    return out


def test_mode_c_readout_switches_after_the_option_select_and_back_after_the_readout() -> None:
    sniffer = IecSniffer(300, "7E1")
    out = run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("c", OPTION_9600), ("m", DATA), ("t", b"")])
    assert out == [
        ("c", REQUEST),
        ("m", IDENT_C),
        ("c", OPTION_9600),
        ("switch", (9600, "7E1")),
        ("m", DATA),
        ("switch", (300, "7E1")),
    ]
    assert sniffer.state is SnifferState.IDLE
    assert (sniffer.stats.signons, sniffer.stats.readouts, sniffer.stats.bcc_errors) == (1, 1, 0)


def test_option_select_split_anywhere_still_switches_right_after_it() -> None:
    for split in range(1, len(OPTION_9600)):
        sniffer = IecSniffer(300)
        out = run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("c", OPTION_9600 + b"more")], split=split)
        assert out[-3:] == [("c", OPTION_9600), ("switch", (9600, "7E1")), ("c", b"more")], split


def test_request_split_across_chunks_is_found() -> None:
    for split in range(1, len(REQUEST)):
        sniffer = IecSniffer(300)
        run(sniffer, [("c", b"junk" + REQUEST)], split=split + 4)
        assert sniffer.state is SnifferState.WAIT_IDENT, split


def test_a_request_after_binary_slashes_is_still_found_at_every_split() -> None:
    """DLMS traffic is full of "/" bytes: none may hide a sign-on that starts right after one."""
    stream = b"\x00/\x7e/?\x01/" + REQUEST
    for split in range(1, len(stream)):
        sniffer = IecSniffer(300)
        run(sniffer, [("c", stream)], split=split)
        assert sniffer.state is SnifferState.WAIT_IDENT, split


def test_no_switch_when_the_initial_rate_is_already_the_agreed_one() -> None:
    sniffer = IecSniffer(9600)
    out = run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("c", OPTION_9600), ("m", DATA), ("t", b"")])
    assert not [o for o in out if o[0] == "switch"]
    assert sniffer.stats.readouts == 1


def test_a_rate_above_the_meters_own_is_refused_by_the_meter_so_no_switch() -> None:
    sniffer = IecSniffer(300)
    out = run(sniffer, [("c", REQUEST), ("m", encode_identification("DCU", "4", "X")), ("c", b"\x06050\r\n")])
    assert not [o for o in out if o[0] == "switch"]
    assert sniffer.state is SnifferState.IDLE


def test_lower_rate_than_offered_is_followed() -> None:
    sniffer = IecSniffer(300)
    out = run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("c", b"\x06030\r\n")])
    assert out[-1] == ("switch", (2400, "7E1"))


def test_no_option_select_within_the_window_means_no_switch() -> None:
    sniffer = IecSniffer(300)
    out = run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("t", b""), ("c", OPTION_9600)])
    assert not [o for o in out if o[0] == "switch"]


def test_meter_reading_out_at_the_initial_rate_after_tt_cancels_the_sign_on() -> None:
    sniffer = IecSniffer(300)
    run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("m", DATA)])
    assert sniffer.state is SnifferState.IDLE


def test_nak_after_a_readout_keeps_the_data_rate_and_a_new_sign_on_goes_back_first() -> None:
    sniffer = IecSniffer(300)
    out = run(
        sniffer,
        [("c", REQUEST), ("m", IDENT_C), ("c", OPTION_9600), ("m", DATA), ("c", b"\x15"), ("m", DATA)],
    )
    assert out[-3:] == [("m", DATA), ("c", b"\x15"), ("m", DATA)]
    assert sniffer.stats.readouts == 2
    out = run(sniffer, [("c", b"\x15" + REQUEST)])
    assert out == [("c", b"\x15"), ("switch", (300, "7E1")), ("c", REQUEST)]
    assert sniffer.state is SnifferState.WAIT_IDENT


def test_bad_bcc_is_counted_and_changes_nothing_else() -> None:
    sniffer = IecSniffer(300)
    bad = DATA[:-1] + bytes([DATA[-1] ^ 1])
    out = run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("c", OPTION_9600), ("m", bad)])
    assert out[-1] == ("m", bad)
    assert sniffer.stats.bcc_errors == 1


def test_mode_b_switches_right_after_the_identification() -> None:
    sniffer = IecSniffer(300)
    ident = encode_identification("DCU", "E", "B-METER")
    for split in range(len(ident) + len(DATA)):
        sniffer = IecSniffer(300)
        out = run(sniffer, [("c", REQUEST), ("m", ident + DATA)], split=split)
        assert out[1:] == [("m", ident), ("switch", (9600, "7E1")), ("m", DATA)], split


def test_echo_of_our_own_request_is_skipped() -> None:
    sniffer = IecSniffer(300)
    out = run(sniffer, [("c", REQUEST), ("m", REQUEST + IDENT_C), ("c", OPTION_9600)])
    assert out[-1] == ("switch", (9600, "7E1"))


def test_programming_mode_goes_back_after_break() -> None:
    sniffer = IecSniffer(300)
    command = b"\x01P1\x02(00000000)\x03a"
    brk = encode_break()
    out = run(
        sniffer,
        [
            ("c", REQUEST),
            ("m", IDENT_C),
            ("c", b"\x06051\r\n"),
            ("m", b"\x01P0\x02(1234567)\x03\x00"),
            ("c", command),
            ("m", b"\x06"),
            ("c", brk + b"x"),
        ],
    )
    assert out[3] == ("switch", (9600, "7E1"))
    assert out[-3:] == [("c", brk), ("switch", (300, "7E1")), ("c", b"x")]
    assert sniffer.state is SnifferState.IDLE


def test_programming_mode_times_out_back_to_initial() -> None:
    sniffer = IecSniffer(300)
    out = run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("c", b"\x06051\r\n"), ("t", b"")])
    assert out[-1] == ("switch", (300, "7E1"))


def _hdlc(control: int) -> bytes:
    # 7E A0 len dst(1 byte, 0x03) src(1 byte, 0x21) control HCS(2) 7E; lengths counted without flags.
    body = bytes([0x03, 0x21, control, 0xAA, 0xBB])
    return bytes([0x7E, 0xA0, len(body) + 2]) + body + b"\x7e"


def test_mode_e_hdlc_switches_framing_and_comes_back_after_disc_ua() -> None:
    sniffer = IecSniffer(300, "7E1")
    ident = encode_identification("DCU", "5", "HDLC", escapes=["2"])
    snrm = _hdlc(0x93)
    out = run(
        sniffer,
        [
            ("c", REQUEST),
            ("m", ident),
            ("c", b"\x06252\r\n"),
            ("c", snrm),
            ("m", _hdlc(0x73)),
            ("c", _hdlc(0x53)),
            ("m", _hdlc(0x73) + b"tail"),
        ],
    )
    assert out[3] == ("switch", (9600, "8N1"))
    ua = _hdlc(0x73)
    assert out[-3:] == [("m", ua[:-1]), ("switch", (300, "7E1")), ("m", ua[-1:] + b"tail")]


def test_hdlc_payload_with_flag_bytes_does_not_confuse_the_tracker() -> None:
    sniffer = IecSniffer(300, "7E1")
    ident = encode_identification("DCU", "5", "HDLC", escapes=["2"])
    body = bytes([0x03, 0x21, 0x10, 0x7E, 0x53, 0x7E, 0x43, 0x00])  # I-frame whose payload holds 7E 53
    frame = bytes([0x7E, 0xA0, len(body) + 2]) + body + b"\x7e"
    out = run(
        sniffer, [("c", REQUEST), ("m", ident), ("c", b"\x06252\r\n"), ("c", frame), ("m", _hdlc(0x73))]
    )
    assert sniffer.state is SnifferState.HDLC
    assert out[-1] == ("m", _hdlc(0x73))


def test_hdlc_idle_times_out_back_to_initial_framing() -> None:
    sniffer = IecSniffer(300, "7E1")
    ident = encode_identification("DCU", "5", "HDLC", escapes=["2"])
    out = run(sniffer, [("c", REQUEST), ("m", ident), ("c", b"\x06252\r\n"), ("t", b"")])
    assert out[-1] == ("switch", (300, "7E1"))


def test_reset_forgets_everything() -> None:
    sniffer = IecSniffer(300)
    run(sniffer, [("c", REQUEST), ("m", IDENT_C), ("c", OPTION_9600)])
    assert sniffer.baud == 9600
    sniffer.reset()
    assert (sniffer.baud, sniffer.state, sniffer.next_deadline()) == (300, SnifferState.IDLE, None)


def test_dlms_wrapper_and_mbus_traffic_never_switch() -> None:
    sniffer = IecSniffer(9600, "8N1")
    wrapper = bytes.fromhex("0001 0010 0001 001f 601da109060760857410101a203020100a305a10302010e0") * 20
    mbus = bytes.fromhex("105b0560166808086853fd52785634121b16")
    out = run(sniffer, [("c", wrapper), ("m", wrapper[::-1]), ("c", mbus), ("m", b"\xe5")])
    assert not [o for o in out if o[0] == "switch"]


@pytest.mark.parametrize("name", CAPTURES)
def test_vectors_every_split(name: str) -> None:
    """Every readout vector, the meter's bytes cut at every boundary: same switches, BCC verdict."""
    meta = json.loads((VECTORS / f"{name}.json").read_text())
    stream = (VECTORS / f"{name}.bin").read_bytes()
    ident_end = stream.index(b"\r\n") + 2
    ident, message = stream[:ident_end], stream[ident_end:]
    option = meta["option_select"].encode("latin-1") if meta["option_select"] else b""
    expected_switch = meta["ident"]["mode"] == "C" and meta["ident"]["baud"] != 300
    for split in range(len(message) + 1):
        sniffer = IecSniffer(300)
        steps: list[Step] = [("c", meta["request"].encode()), ("m", ident)]
        if option:
            steps.append(("c", option))
        steps.append(("m", message))
        out = run(sniffer, steps, split=split)
        switches = [o for o in out if o[0] == "switch"]
        if expected_switch:
            assert switches == [("switch", (meta["ident"]["baud"], "7E1"))], (name, split)
            assert sniffer.stats.readouts == 1
            assert sniffer.stats.bcc_errors == (1 if meta["bcc_mode"] == "sum7" else 0)
        else:
            assert switches == []


_chunks = st.lists(st.tuples(st.sampled_from("cmt"), st.binary(max_size=64)), max_size=40)
_protocolish = st.lists(
    st.tuples(
        st.sampled_from("cm"),
        st.sampled_from([REQUEST, IDENT_C, OPTION_9600, DATA, b"\x15", encode_break(), b"\x06252\r\n"]),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_chunks, _protocolish), st.integers(min_value=0, max_value=70))
def test_random_streams_pass_through_unchanged(steps: list[tuple[str, bytes]], split: int) -> None:
    """Whatever the peers send: every byte comes out once, in order, and nothing raises."""
    sniffer = IecSniffer(300, "7E1")
    now = 0.0
    sent = {"c": bytearray(), "m": bytearray()}
    got = {"c": bytearray(), "m": bytearray()}
    for direction, data in steps:
        now += 0.3
        if direction == "t":
            actions = sniffer.handle_timer(now + 200)
        else:
            sent[direction] += data
            fn = sniffer.from_client if direction == "c" else sniffer.from_meter
            actions = fn(data[:split], now) + fn(data[split:], now) if split < len(data) else fn(data, now)
        for action in actions:
            if isinstance(action, Forward):
                got["c" if direction == "t" else direction] += action.data
            else:
                assert action.baud in (300, 600, 1200, 2400, 4800, 9600, 19200)
        assert direction != "t" or not [a for a in actions if isinstance(a, Forward)]
    assert got == sent


_slashy = st.lists(
    st.sampled_from([b"/", b"?", b"!", b"\r", b"\n", b"1", b"A", b" ", b"\x00", b"\x7e", b"/?", REQUEST]),
    max_size=60,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("cm"), st.one_of(_slashy, st.binary(max_size=64))), max_size=30))
def test_client_passes_only_when_from_client_would_just_forward(steps: list[tuple[str, bytes]]) -> None:
    """The bridge's shortcuts are exact: when ``client_passes`` says so, ``from_client`` forwards the chunk
    whole and changes nothing; from the idle state it forwards the chunk whole whatever it holds (the
    bridge writes such chunks before it sniffs them); the stream goes on as without the shortcuts."""
    fast, slow = IecSniffer(300, "7E1"), IecSniffer(300, "7E1")
    now = 0.0
    for direction, data in steps:
        now += 0.01
        if direction == "m":
            assert fast.from_meter(data, now) == slow.from_meter(data, now)
            continue
        passes = fast.client_passes(data)
        before = (slow.state, slow._tail, slow.next_deadline())
        actions = slow.from_client(data, now)
        if before[0] is SnifferState.IDLE:
            assert actions == ([Forward(data)] if data else [])
        if passes:
            assert actions == ([Forward(data)] if data else [])
            assert (slow.state, slow._tail, slow.next_deadline()) == before
        else:
            assert fast.from_client(data, now) == actions
        assert (fast.state, fast._tail) == (slow.state, slow._tail)
