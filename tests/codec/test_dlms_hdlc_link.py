"""HdlcLink, the client side of the HDLC link, against hand-written server frames (explicit clock)."""

from __future__ import annotations

import asyncio

import pytest

from dcud.codec.actions import Done, Drain, Failed, Flush, Send, SetBaud, SetFraming
from dcud.codec.dlms.hdlc import (
    LLC_REQUEST,
    LLC_RESPONSE,
    FrameKind,
    HdlcAddress,
    HdlcFrame,
    HdlcParameters,
    decode_frame,
    encode_frame,
    encode_parameters,
    i_control,
    rnr_control,
    rr_control,
    u_control,
)
from dcud.codec.dlms.hdlc_link import MAX_BUSY_POLLS, HdlcLink
from dcud.codec.dlms.mode_e import ModeESettings
from dcud.codec.dlms.transport import ApduIn, ApduTransport, LinkDown, LinkUp
from dcud.codec.iec62056 import DataSet, encode_data_message, encode_identification, encode_option_select
from dcud.errors import LocalProtocolError, PeerTimeout, RemoteProtocolError
from dcud.service.session_runner import run_session

CLIENT = HdlcAddress.client(16)
SERVER = HdlcAddress.server(1, 17)


def srv(control: int, info: bytes = b"", segmented: bool = False) -> bytes:
    """A frame from the server to the client."""
    return encode_frame(HdlcFrame(CLIENT, SERVER, control, info, segmented))


def ua(params: HdlcParameters | None = None) -> bytes:
    return srv(u_control(FrameKind.UA), encode_parameters(params) if params else b"")


def frames(actions: list[object]) -> list[HdlcFrame]:
    """The frames the link sent."""
    out = []
    for action in actions:
        if isinstance(action, Send):
            frame = decode_frame(action.data)
            assert frame.destination == SERVER and frame.source == CLIENT
            out.append(frame)
    return out


def events(actions: list[object]) -> list[object]:
    return [a for a in actions if isinstance(a, LinkUp | ApduIn | LinkDown)]


def kinds(actions: list[object]) -> list[str]:
    return [f.describe() for f in frames(actions)]


def feed(link: HdlcLink, data: bytes, now: float, cut: int | None = None) -> list[object]:
    """Feed ``data`` in two chunks split at ``cut`` (whole when None or beyond the end)."""
    if cut is None or not 0 < cut < len(data):
        return link.receive_data(data, now)
    return link.receive_data(data[:cut], now) + link.receive_data(data[cut:], now)


def connected(link: HdlcLink, params: HdlcParameters | None = None) -> None:
    out = link.open(0.0)
    assert kinds(out) == ["SNRM P/F"] or kinds(out)[0].startswith("SNRM")
    assert events(link.receive_data(ua(params), 0.1)) == [LinkUp()]


def test_hdlc_link_is_an_apdu_transport() -> None:
    link: ApduTransport = HdlcLink()
    assert link.next_deadline() is None


def test_open_sends_the_dlms_ua_example_snrm() -> None:
    link = HdlcLink(physical_address=17, address_size=4)
    out = link.open(0.0)
    assert out == [Send(bytes.fromhex("7EA00A00020023219318717E"))]
    assert link.next_deadline() == pytest.approx(5.0)
    # The UA of the same example: defaults agreed.
    reply = bytes.fromhex("7EA023210002002373F6C58180140502008006020080070400000001080400000001CE6A7E")
    assert link.receive_data(reply, 0.2) == [LinkUp()]
    assert link.parameters == HdlcParameters()
    assert link.next_deadline() is None


def _script(link: HdlcLink, cut: int | None) -> list[object]:
    """SNRM/UA; a 20-byte request; a response over three I frames with RR between; DISC/UA."""
    got: list[object] = []
    out = link.open(0.0)
    assert kinds(out) == ["SNRM P/F 21 bytes"]
    got += feed(link, ua(HdlcParameters(max_info_tx=64, max_info_rx=64)), 0.1, cut)
    assert got == [LinkUp()]
    assert link.parameters == HdlcParameters(max_info_tx=64, max_info_rx=64)
    request = bytes(range(20))
    out = link.send_apdu(request, 0.2)
    sent = frames(out)
    assert [f.describe() for f in sent] == ["I N(S)=0 N(R)=0 P/F 23 bytes"]
    assert sent[0].info == LLC_REQUEST + request
    response = LLC_RESPONSE + bytes((i * 7) % 256 for i in range(150)) + b"\x7e\x7e"
    parts = [response[:64], response[64:128], response[128:]]
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        frame = srv(i_control(n, 1), part, segmented=not last)
        out = feed(link, frame, 0.3 + n / 10, cut)
        if not last:
            assert kinds(out) == [f"RR N(R)={n + 1} P/F"], n
            assert events(out) == []
        else:
            assert out == [ApduIn(response[len(LLC_RESPONSE) :])]
            got += out
    assert link.next_deadline() is None
    out = link.close(1.0)
    assert kinds(out) == ["DISC P/F"]
    got += feed(link, srv(u_control(FrameKind.UA)), 1.1, cut)
    assert got[-1] == LinkDown(None)
    assert link.next_deadline() is None
    return got


def test_scripted_exchange_split_at_every_byte_boundary() -> None:
    proposal = HdlcParameters(max_info_tx=64, max_info_rx=64)
    longest = len(srv(i_control(0, 1), b"x" * 64, True))
    results = set()
    for cut in [None, *range(1, longest + 1)]:
        link = HdlcLink(physical_address=17, parameters=proposal)
        got = _script(link, cut)
        results.add(repr(got))
        assert link.stats.damaged_frames == 0 and link.stats.retransmissions == 0
    assert len(results) == 1


def test_scripted_exchange_byte_by_byte() -> None:
    link = HdlcLink(physical_address=17, parameters=HdlcParameters(max_info_tx=64, max_info_rx=64))
    link.open(0.0)
    for b in ua(HdlcParameters(64, 64)):
        link.receive_data(bytes([b]), 0.1)
    assert link.is_up
    link.send_apdu(b"\xc0\x01\xc1", 0.2)
    out: list[object] = []
    for b in srv(i_control(0, 1), LLC_RESPONSE + b"\xc4\x01\xc1\x00\x06\x00\x00\x00\x2a"):
        out += link.receive_data(bytes([b]), 0.3)
    assert out == [ApduIn(b"\xc4\x01\xc1\x00\x06\x00\x00\x00\x2a")]


def test_segmented_request_window_one_waits_for_rr() -> None:
    link = HdlcLink(physical_address=17)
    connected(link)
    apdu = bytes(i % 251 for i in range(300))
    sent = frames(link.send_apdu(apdu, 1.0))
    assert [f.describe() for f in sent] == ["I N(S)=0 N(R)=0 P/F seg 128 bytes"]
    sent += frames(link.receive_data(srv(rr_control(1)), 1.1))
    assert sent[-1].describe() == "I N(S)=1 N(R)=0 P/F seg 128 bytes"
    sent += frames(link.receive_data(srv(rr_control(2)), 1.2))
    assert sent[-1].describe() == "I N(S)=2 N(R)=0 P/F 47 bytes"
    assert b"".join(f.info for f in sent) == LLC_REQUEST + apdu
    out = link.receive_data(srv(i_control(0, 3), LLC_RESPONSE + b"ok"), 1.3)
    assert out == [ApduIn(b"ok")]
    # Next request continues the numbering.
    assert kinds(link.send_apdu(b"a", 2.0)) == ["I N(S)=3 N(R)=1 P/F 4 bytes"]


def test_segmented_request_window_three_and_go_back() -> None:
    link = HdlcLink(physical_address=17, parameters=HdlcParameters(window_tx=3, window_rx=3))
    connected(link, HdlcParameters(window_tx=3, window_rx=3))
    assert link.parameters.window_tx == 3
    out = link.send_apdu(bytes(128 * 5 - 3), 1.0)  # 5 segments
    assert kinds(out) == [
        "I N(S)=0 N(R)=0 seg 128 bytes",
        "I N(S)=1 N(R)=0 seg 128 bytes",
        "I N(S)=2 N(R)=0 P/F seg 128 bytes",
    ]
    # The server lost frame 2: its RR acknowledges 0 and 1 only; the link goes back to 2.
    out = link.receive_data(srv(rr_control(2)), 1.1)
    assert kinds(out) == [
        "I N(S)=2 N(R)=0 seg 128 bytes",
        "I N(S)=3 N(R)=0 seg 128 bytes",
        "I N(S)=4 N(R)=0 P/F 128 bytes",
    ]
    assert link.stats.retransmissions == 1
    out = link.receive_data(srv(i_control(0, 5), LLC_RESPONSE + b"done"), 1.2)
    assert out == [ApduIn(b"done")]


def test_response_window_rr_only_after_the_final_bit() -> None:
    link = HdlcLink(physical_address=17, parameters=HdlcParameters(window_rx=2))
    connected(link, HdlcParameters(window_tx=2))
    link.send_apdu(b"q", 1.0)
    payload = LLC_RESPONSE + bytes(range(200))
    first = srv(i_control(0, 1, poll=False), payload[:100], segmented=True)
    second = srv(i_control(1, 1, poll=True), payload[100:150], segmented=True)
    third = srv(i_control(2, 1), payload[150:])
    assert link.receive_data(first, 1.1) == []
    assert kinds(link.receive_data(second, 1.2)) == ["RR N(R)=2 P/F"]
    assert link.receive_data(third, 1.3) == [ApduIn(payload[3:])]


def test_lost_segment_is_requested_again() -> None:
    link = HdlcLink(physical_address=17, parameters=HdlcParameters(window_rx=2))
    connected(link, HdlcParameters(window_tx=2))
    link.send_apdu(b"q", 1.0)
    payload = LLC_RESPONSE + bytes(range(200))
    # Frame N(S)=0 is lost; N(S)=1 with the final bit arrives: dropped, RR(0) asks for 0 again.
    out = link.receive_data(srv(i_control(1, 1), payload[100:150], segmented=True), 1.1)
    assert kinds(out) == ["RR N(R)=0 P/F"]
    assert link.stats.sequence_errors == 1
    link.receive_data(srv(i_control(0, 1, poll=False), payload[:100], segmented=True), 1.2)
    assert kinds(link.receive_data(srv(i_control(1, 1), payload[100:150], segmented=True), 1.3)) == [
        "RR N(R)=2 P/F"
    ]
    assert link.receive_data(srv(i_control(2, 1), payload[150:]), 1.4) == [ApduIn(payload[3:])]


def test_repeated_segment_after_lost_rr_is_dropped_and_rr_repeated() -> None:
    link = HdlcLink(physical_address=17)
    connected(link)
    link.send_apdu(b"q", 1.0)
    seg0 = srv(i_control(0, 1), LLC_RESPONSE + b"a" * 50, segmented=True)
    assert kinds(link.receive_data(seg0, 1.1)) == ["RR N(R)=1 P/F"]
    # Our RR got lost; the server sends segment 0 again.
    assert kinds(link.receive_data(seg0, 1.2)) == ["RR N(R)=1 P/F"]
    assert link.receive_data(srv(i_control(1, 1), b"b"), 1.3) == [ApduIn(b"a" * 50 + b"b")]


def test_sequence_errors_are_bounded() -> None:
    link = HdlcLink(physical_address=17, max_retries=2)
    connected(link)
    link.send_apdu(b"q", 1.0)
    wrong = srv(i_control(5, 1), LLC_RESPONSE + b"x")
    assert kinds(link.receive_data(wrong, 1.1)) == ["RR N(R)=0 P/F"]
    assert kinds(link.receive_data(wrong, 1.2)) == ["RR N(R)=0 P/F"]
    out = link.receive_data(wrong, 1.3)
    assert kinds(out) == ["DISC P/F"]
    (down,) = events(out)
    assert isinstance(down, LinkDown) and isinstance(down.error, RemoteProtocolError)
    assert "N(S)=5, expected 0" in str(down.error)
    assert link.state == "down"
    assert link.receive_data(wrong, 1.4) == [] and link.handle_timer(100.0) == []


def test_invalid_nr_is_a_protocol_error() -> None:
    link = HdlcLink(physical_address=17)
    connected(link)
    link.send_apdu(b"q", 1.0)
    out = link.receive_data(srv(i_control(0, 4), LLC_RESPONSE + b"x"), 1.1)
    assert kinds(out) == ["DISC P/F"]
    (down,) = events(out)
    assert isinstance(down, LinkDown) and "N(R)=4" in str(down.error)


def test_response_before_whole_request_is_a_protocol_error() -> None:
    link = HdlcLink(physical_address=17)
    connected(link)
    link.send_apdu(bytes(300), 1.0)
    (down,) = events(link.receive_data(srv(i_control(0, 1), LLC_RESPONSE + b"x"), 1.1))
    assert isinstance(down, LinkDown) and "before acknowledging the whole request" in str(down.error)


def test_missing_llc_and_oversized_response() -> None:
    link = HdlcLink(physical_address=17)
    connected(link)
    link.send_apdu(b"q", 1.0)
    (down,) = events(link.receive_data(srv(i_control(0, 1), b"\xc4\x01"), 1.1))
    assert isinstance(down, LinkDown) and "LLC" in str(down.error)
    link = HdlcLink(physical_address=17, max_apdu_bytes=100)
    connected(link)
    link.send_apdu(b"q", 1.0)
    assert kinds(link.receive_data(srv(i_control(0, 1), bytes(90), True), 1.1)) == ["RR N(R)=1 P/F"]
    (down,) = events(link.receive_data(srv(i_control(1, 1), bytes(20), True), 1.2))
    assert isinstance(down, LinkDown) and "longer than 100 bytes" in str(down.error)


def test_snrm_retransmitted_then_peer_timeout() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0, max_retries=2)
    first = link.open(0.0)
    assert link.handle_timer(0.5) == []  # not due yet
    now = 1.0
    for _ in range(2):
        assert link.next_deadline() == pytest.approx(now)
        assert link.handle_timer(now) == first  # the same SNRM again
        now += 1.0
    (down,) = link.handle_timer(now)
    assert isinstance(down, LinkDown) and isinstance(down.error, PeerTimeout)
    assert "UA for SNRM" in str(down.error) and "3 tries" in str(down.error)
    assert link.next_deadline() is None


def test_deadline_adds_the_line_time_of_our_frames() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0, baud=9600)
    out = link.open(10.0)
    size = len(frames(out)) and len(out[0].data)  # type: ignore[attr-defined]
    assert link.next_deadline() == pytest.approx(10.0 + size * 10 / 9600 + 1.0)


def test_request_retransmitted_on_timeout_then_answered() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0)
    connected(link)
    first = link.send_apdu(b"q", 1.0)
    assert link.handle_timer(2.0) == first  # the same I frame (same N(S)) again
    assert link.receive_data(srv(i_control(0, 1), LLC_RESPONSE + b"r"), 2.1) == [ApduIn(b"r")]
    # The server's first answer arrives late: a duplicate, ignored.
    assert link.receive_data(srv(i_control(0, 1), LLC_RESPONSE + b"r"), 2.2) == []
    assert link.stats.retransmissions == 1


def test_rr_resent_when_a_segment_does_not_come() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0, max_retries=1)
    connected(link)
    link.send_apdu(b"q", 1.0)
    rr = link.receive_data(srv(i_control(0, 1), LLC_RESPONSE + b"a", True), 1.1)
    assert kinds(rr) == ["RR N(R)=1 P/F"]
    assert link.handle_timer(2.1) == rr
    out = link.handle_timer(3.1)
    assert kinds(out) == ["DISC P/F"]
    (down,) = events(out)
    assert isinstance(down, LinkDown) and isinstance(down.error, PeerTimeout)


def test_a_frame_in_progress_extends_the_deadline() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0)
    connected(link)
    link.send_apdu(b"q", 1.0)
    frame = srv(i_control(0, 1), LLC_RESPONSE + bytes(100))
    assert link.receive_data(frame[:50], 1.9) == []
    assert link.next_deadline() == pytest.approx(2.9)
    assert link.receive_data(frame[50:], 2.8) == [ApduIn(bytes(100))]


def test_busy_server_is_polled_and_bounded() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0)
    connected(link)
    link.send_apdu(b"q", 1.0)
    # Everything acknowledged, no data yet: poll again at once.
    assert kinds(link.receive_data(srv(rr_control(1)), 1.1)) == ["RR N(R)=0 P/F"]
    # RNR: wait for the response timeout, then poll.
    assert link.receive_data(srv(rnr_control(1)), 1.2) == []
    assert kinds(link.handle_timer(2.2)) == ["RR N(R)=0 P/F"]
    assert link.receive_data(srv(i_control(0, 1), LLC_RESPONSE + b"z"), 2.3) == [ApduIn(b"z")]
    link.send_apdu(b"q", 3.0)
    out: list[object] = []
    for n in range(MAX_BUSY_POLLS + 1):
        out = link.receive_data(srv(rr_control(2)), 3.0 + n / 100)
    (down,) = events(out)
    assert isinstance(down, LinkDown) and "busy" in str(down.error)


def test_dm_and_frmr_end_the_link_with_a_clear_error() -> None:
    link = HdlcLink(physical_address=17)
    link.open(0.0)
    (down,) = link.receive_data(srv(u_control(FrameKind.DM)), 0.1)
    assert isinstance(down, LinkDown) and "refused the connection (DM)" in str(down.error)
    link = HdlcLink(physical_address=17)
    connected(link)
    link.send_apdu(b"q", 1.0)
    out = link.receive_data(srv(u_control(FrameKind.FRMR), b"\x10\x00\x01"), 1.1)
    assert kinds(out) == ["DISC P/F"]
    assert "invalid or unimplemented control field" in str(events(out)[0].error)  # type: ignore[attr-defined]
    link = HdlcLink(physical_address=17)
    connected(link)
    link.send_apdu(b"q", 1.0)
    (down,) = link.receive_data(srv(u_control(FrameKind.DM)), 1.1)
    assert "is disconnected (DM)" in str(down.error)  # type: ignore[attr-defined]


def test_echo_and_foreign_frames_are_ignored() -> None:
    link = HdlcLink(physical_address=17)
    snrm = link.open(0.0)
    echo = snrm[0].data  # type: ignore[attr-defined]
    other = encode_frame(HdlcFrame(CLIENT, HdlcAddress.server(1, 18), u_control(FrameKind.UA)))
    ui = srv(u_control(FrameKind.UI), b"push")
    assert link.receive_data(echo + other + ui + b"\x00noise", 0.1) == []
    assert link.stats.ignored_frames == 3
    assert link.receive_data(ua(), 0.2) == [LinkUp()]
    # A second UA (answer to a repeated SNRM) while up: ignored.
    assert link.receive_data(ua(), 0.3) == []


def test_damaged_frame_is_dropped_and_the_timeout_recovers() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0)
    connected(link)
    req = link.send_apdu(b"q", 1.0)
    good = srv(i_control(0, 1), LLC_RESPONSE + b"data")
    bad = bytearray(good)
    bad[-4] ^= 0x55
    assert link.receive_data(bytes(bad), 1.1) == []
    assert link.stats.damaged_frames == 1
    assert link.handle_timer(2.1) == req
    assert link.receive_data(good, 2.2) == [ApduIn(b"data")]


def test_close_variants() -> None:
    link = HdlcLink(physical_address=17, response_timeout_s=1.0, disc_retries=1)
    assert link.close(0.0) == [LinkDown(None)]  # never opened
    assert link.close(0.1) == []
    link = HdlcLink(physical_address=17, response_timeout_s=1.0, disc_retries=1)
    connected(link)
    disc = link.close(1.0)
    assert kinds(disc) == ["DISC P/F"]
    assert link.close(1.1) == []
    assert link.handle_timer(2.0) == disc
    assert link.handle_timer(3.0) == [LinkDown(None)]
    link = HdlcLink(physical_address=17)
    connected(link)
    link.close(1.0)
    assert link.receive_data(srv(u_control(FrameKind.DM)), 1.1) == [LinkDown(None)]
    link = HdlcLink(physical_address=17)
    link.open(0.0)
    assert kinds(link.close(0.5)) == ["DISC P/F"]  # while connecting
    assert link.receive_data(ua(), 0.6) == [LinkDown(None)]


def test_local_errors() -> None:
    link = HdlcLink()
    with pytest.raises(LocalProtocolError):
        link.send_apdu(b"x", 0.0)
    link.open(0.0)
    with pytest.raises(LocalProtocolError):
        link.open(0.0)
    for bad in (
        lambda: HdlcLink(response_timeout_s=0),
        lambda: HdlcLink(max_retries=-1),
        lambda: HdlcLink(baud=0),
        lambda: HdlcLink(client_sap=200),
        lambda: HdlcLink(physical_address=17, address_size=1),
        lambda: HdlcLink(parameters=HdlcParameters(max_info_tx=0)),
        lambda: HdlcLink(mode_e=ModeESettings(address="bad!")),
    ):
        with pytest.raises(LocalProtocolError):
            bad()


def test_ua_with_bad_parameters_ends_the_link() -> None:
    link = HdlcLink(physical_address=17)
    link.open(0.0)
    out = link.receive_data(srv(u_control(FrameKind.UA), bytes.fromhex("818003070109")), 0.1)
    assert kinds(out) == ["DISC P/F"]
    assert isinstance(events(out)[0], LinkDown)


# -- mode E ------------------------------------------------------------------------------------------

IDENT = encode_identification("LGZ", "5", "ZMD3104100.B32", escapes=["2"])


def _mode_e_link(**kw: object) -> HdlcLink:
    return HdlcLink(physical_address=17, mode_e=ModeESettings(address="12345678", **kw))  # type: ignore[arg-type]


def test_mode_e_sign_on_then_hdlc() -> None:
    for cut in [None, *range(1, len(IDENT))]:
        link = _mode_e_link()
        out = link.open(0.0)
        assert out == [SetFraming("7E1"), SetBaud(300), Flush(), Send(b"/?12345678!\r\n")]
        assert link.state == "sign_on"
        # Echo of our request first (RS485 without echo suppression), then the identification.
        assert feed(link, b"/?12345678!\r\n" + IDENT, 0.6, cut) == []
        assert link.next_deadline() == pytest.approx(0.8)  # tr_min 200 ms
        assert link.handle_timer(0.7) == []
        out = link.handle_timer(0.8)
        ack = encode_option_select("5", mode_control="2", protocol_control="2")
        assert ack == b"\x06252\r\n"
        assert out == [Send(ack), Drain(), SetBaud(9600), SetFraming("8N1")]
        # SNRM once the option select crossed the line (6 chars at 300 Bd) and the meter switched.
        assert link.next_deadline() == pytest.approx(0.8 + 0.2 + 0.2)
        out = link.handle_timer(1.2)
        assert kinds(out) == ["SNRM P/F"]
        assert link.baud == 9600
        assert feed(link, ua(), 1.3, cut) == [LinkUp()]


def test_mode_e_respects_max_baud_and_fast_meters() -> None:
    link = _mode_e_link(max_baud=4800)
    link.open(0.0)
    link.receive_data(encode_identification("ABc", "6", "X", escapes=["2"]), 0.5)
    assert link.next_deadline() == pytest.approx(0.52)  # lower-case third letter: 20 ms
    out = link.handle_timer(0.52)
    assert out[0] == Send(b"\x06242\r\n") and SetBaud(4800) in out


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        (encode_identification("LGZ", "5", "ZMD"), RemoteProtocolError, "does not offer mode E"),
        (
            encode_data_message([DataSet("1.8.0", [("1", "kWh")])]),
            RemoteProtocolError,
            "expected an identification",
        ),
        (b"", PeerTimeout, "no identification"),
        (b"/LGZ5\\2ZM", PeerTimeout, "identification incomplete"),
    ],
)
def test_mode_e_failures(reply: bytes, error: type[Exception], text: str) -> None:
    link = _mode_e_link()
    link.open(0.0)
    out = link.receive_data(reply, 0.5)
    if not out:
        deadline = link.next_deadline()
        assert deadline is not None
        out = link.handle_timer(deadline)
    (down,) = out
    assert isinstance(down, LinkDown) and isinstance(down.error, error)
    assert text in str(down.error)
    assert not frames(out)  # nothing to disconnect in IEC mode


def test_mode_e_close_during_sign_on() -> None:
    link = _mode_e_link()
    link.open(0.0)
    assert link.close(0.1) == [LinkDown(None)]


# -- through the shared session driver -----------------------------------------------------------


class _OneRequest:
    """A minimal session over an ApduTransport: open, one request, close (for the driver test)."""

    def __init__(self, link: HdlcLink, request: bytes) -> None:
        self.link = link
        self.request = request
        self.replies: list[bytes] = []

    def _handle(self, items: list[object], now: float) -> list[object]:
        out: list[object] = []
        for item in items:
            if isinstance(item, LinkUp):
                out += self._handle(self.link.send_apdu(self.request, now), now)
            elif isinstance(item, ApduIn):
                self.replies.append(item.apdu)
                out += self._handle(self.link.close(now), now)
            elif isinstance(item, LinkDown):
                out.append(Failed(item.error) if item.error else Done(self.replies))
            else:
                out.append(item)
        return out

    def start(self, now: float) -> list[object]:
        return self._handle(self.link.open(now), now)

    def receive_data(self, data: bytes, now: float) -> list[object]:
        return self._handle(self.link.receive_data(data, now), now)

    def handle_timer(self, now: float) -> list[object]:
        return self._handle(self.link.handle_timer(now), now)

    def next_deadline(self) -> float | None:
        return self.link.next_deadline()


class _ModeEMeterPort:
    """A fake leased port playing a mode E meter; checks rate and framing of every byte written."""

    def __init__(self) -> None:
        self.baud = 9600
        self.framing = "8N1"
        self.log: list[tuple[str, object]] = []
        self._inbox = bytearray()
        self._arrived = asyncio.Event()

    def _reply(self, data: bytes) -> None:
        self._inbox += data
        self._arrived.set()

    def write(self, data: bytes) -> int:
        self.log.append(("write", (bytes(data), self.baud, self.framing)))
        if data.startswith(b"/?"):
            assert (self.baud, self.framing) == (300, "7E1")
            self._reply(encode_identification("LGz", "5", "ZMD", escapes=["2"]))
        elif data.startswith(b"\x06"):
            assert (self.baud, self.framing, data) == (300, "7E1", b"\x06252\r\n")
        else:
            assert (self.baud, self.framing) == (9600, "8N1")
            frame = decode_frame(data)
            if frame.kind in (FrameKind.SNRM, FrameKind.DISC):
                self._reply(ua())
            elif frame.kind is FrameKind.I:
                self._reply(srv(i_control(0, 1), LLC_RESPONSE + frame.info[3:][::-1]))
        return 0

    async def drain(self) -> None:
        self.log.append(("drain", None))

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        if not self._inbox:
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
            except TimeoutError:
                return b""
        self._arrived.clear()
        data = bytes(self._inbox[:max_bytes])
        del self._inbox[:max_bytes]
        return data

    async def set_baud(self, baud: int) -> None:
        self.log.append(("baud", baud))
        self.baud = baud

    async def set_framing(self, framing: str) -> None:
        self.log.append(("framing", framing))
        self.framing = framing

    def flush_input(self) -> None:
        self.log.append(("flush", None))
        self._inbox.clear()


async def test_session_runner_carries_out_the_mode_e_line_switch() -> None:
    port = _ModeEMeterPort()
    link = HdlcLink(physical_address=17, mode_e=ModeESettings(), response_timeout_s=2.0)
    replies = await asyncio.wait_for(run_session(_OneRequest(link, b"\x01\x02\x03"), port), 10.0)
    assert replies == [b"\x03\x02\x01"]
    steps = [entry[0] if entry[0] != "write" else "write" for entry in port.log]
    assert steps[:4] == ["framing", "baud", "flush", "write"]
    ack = ("write", (b"\x06252\r\n", 300, "7E1"))
    ack_at = port.log.index(ack)
    assert port.log[ack_at + 1 : ack_at + 4] == [("drain", None), ("baud", 9600), ("framing", "8N1")]
