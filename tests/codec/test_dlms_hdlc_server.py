"""HdlcServerLink, the meter side of the HDLC link: published frames, dcud's client link against it
(every negotiated size and window, frames lost either way, fed split at every byte boundary), the
refusals (DM, FRMR), inactivity, and random input that must never raise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.actions import Send
from dcud.codec.dlms.hdlc import (
    LLC_REQUEST,
    LLC_RESPONSE,
    FrameKind,
    HdlcAddress,
    HdlcFrame,
    HdlcParameters,
    decode_frame,
    decode_parameters,
    encode_frame,
    i_control,
    rr_control,
    u_control,
)
from dcud.codec.dlms.hdlc_link import HdlcLink
from dcud.codec.dlms.hdlc_server import HdlcServerLink
from dcud.codec.dlms.transport import ApduIn, LinkDown, LinkUp
from dcud.errors import LocalProtocolError, PeerTimeout

from helpers import TESTS

VECTORS = TESTS / "vectors" / "dlms" / "hdlc"
CLIENT = HdlcAddress.client(16)
SERVER = HdlcAddress.server(1, 17)


def vector(name: str) -> bytes:
    for path in VECTORS.glob("*.json"):
        for frame in json.loads(path.read_text()).get("frames", []):
            if frame["name"] == name:
                return bytes.fromhex(frame["hex"])
    raise KeyError(name)


def cli(control: int, info: bytes = b"", segmented: bool = False, server: HdlcAddress = SERVER) -> bytes:
    """A frame from the client to the server."""
    return encode_frame(HdlcFrame(server, CLIENT, control, info, segmented))


def sent(out: list[object]) -> list[HdlcFrame]:
    return [decode_frame(a.data) for a in out if isinstance(a, Send)]


def events(out: list[object]) -> list[object]:
    return [a for a in out if not isinstance(a, Send)]


def feed_split(server: HdlcServerLink, data: bytes, cut: int | None, now: float = 0.0) -> list[object]:
    if cut is None or not 0 < cut < len(data):
        return server.receive_data(data, now)
    return server.receive_data(data[:cut], now) + server.receive_data(data[cut:], now)


# --- published frames ---


@pytest.mark.parametrize("cut", [None, *range(1, 12)])
def test_green_book_snrm_gets_a_ua_with_the_parameters(cut: int | None) -> None:
    server = HdlcServerLink(physical_address=17)
    out = feed_split(server, vector("snrm_no_parameters"), cut)
    (ua,) = sent(out)
    assert ua.kind is FrameKind.UA and ua.poll_final
    assert ua.destination == CLIENT and ua.source == HdlcAddress(1, 17, 4), "the address form the client used"
    assert decode_parameters(ua.info) == HdlcParameters(128, 128, 1, 1)
    assert events(out) == [LinkUp()] and server.connected and server.client_sap == 16


def test_green_book_aarq_frame_with_a_7e_in_its_hcs_at_every_byte_boundary() -> None:
    frame = vector("i_frame_aarq_hcs_contains_7e")
    aarq = bytes.fromhex("601DA109060760857405080101BE10040E01000000065F1F040000301DFFFF")
    for cut in range(len(frame) + 1):
        server = HdlcServerLink(physical_address=17)
        server.receive_data(vector("snrm_no_parameters"), 0.0)
        out = feed_split(server, frame, cut)
        assert events(out) == [ApduIn(aarq)], cut
        assert server.awaiting_response
        (response,) = sent(server.send_apdu(b"\x61\x00", 0.0))
        assert response.kind is FrameKind.I and (response.ns, response.nr) == (0, 1)
        assert response.info == LLC_RESPONSE + b"\x61\x00" and not response.segmented


def test_two_byte_address_of_dlms_cosem() -> None:
    server = HdlcServerLink(physical_address=17)
    (ua,) = sent(server.receive_data(vector("snrm_two_byte_server_address"), 0.0))
    assert ua.kind is FrameKind.UA and ua.source == HdlcAddress(1, 17, 2)


# --- dcud's client link against the server link ---


class Wire:
    """Client and server links joined in memory, on an explicit clock; ``drop`` loses frames."""

    def __init__(
        self,
        client: HdlcLink,
        server: HdlcServerLink,
        answer: Callable[[bytes], bytes] = lambda apdu: apdu[::-1],
        drop: Callable[[str, HdlcFrame, int], bool] = lambda who, frame, n: False,
        byte_by_byte: bool = False,
    ) -> None:
        self.client = client
        self.server = server
        self.answer = answer
        self.drop = drop
        self.byte_by_byte = byte_by_byte
        self.now = 0.0
        self.client_events: list[object] = []
        self.counts = {"client": 0, "server": 0}

    def _deliver(self, data: bytes, to_server: bool) -> list[object]:
        target = self.server if to_server else self.client
        if not self.byte_by_byte:
            return target.receive_data(data, self.now)
        out: list[object] = []
        for i in range(len(data)):
            out += target.receive_data(data[i : i + 1], self.now)
        return out

    def run(self, items: list[object], limit: int = 10_000) -> None:
        queue: list[tuple[str, object]] = [("client", i) for i in items]
        for _ in range(limit):
            if not queue:
                deadline = self.client.next_deadline()
                if deadline is None:
                    return
                self.now = max(self.now, deadline)
                queue += [("client", i) for i in self.client.handle_timer(self.now)]
                continue
            who, item = queue.pop(0)
            if not isinstance(item, Send):
                if who == "client":
                    self.client_events.append(item)
                continue
            frame = decode_frame(item.data)
            self.counts[who] += 1
            if self.drop(who, frame, self.counts[who]):
                continue
            self.now += 0.001
            if who == "client":
                for out in self._deliver(item.data, to_server=True):
                    if isinstance(out, ApduIn):
                        queue += [
                            ("server", o) for o in self.server.send_apdu(self.answer(out.apdu), self.now)
                        ]
                    else:
                        queue.append(("server", out))
            else:
                queue += [("client", o) for o in self._deliver(item.data, to_server=False)]
        raise AssertionError("the exchange did not settle")

    def exchange(self, apdu: bytes) -> bytes:
        before = len(self.client_events)
        self.run(self.client.send_apdu(apdu, self.now))
        got = [e for e in self.client_events[before:] if isinstance(e, ApduIn)]
        assert len(got) == 1, self.client_events[before:]
        return got[0].apdu


@pytest.mark.parametrize(
    ("proposal", "limits", "agreed"),
    [
        (HdlcParameters(), HdlcParameters(), HdlcParameters()),
        (HdlcParameters(512, 512, 7, 7), HdlcParameters(200, 100, 3, 2), HdlcParameters(200, 100, 3, 2)),
        (HdlcParameters(64, 1000, 1, 4), HdlcParameters(500, 500, 7, 7), HdlcParameters(500, 64, 4, 1)),
        (
            HdlcParameters(2030, 2030, 7, 7),
            HdlcParameters(2030, 2030, 7, 7),
            HdlcParameters(2030, 2030, 7, 7),
        ),
    ],
)
@pytest.mark.parametrize("size", [1, 124, 125, 300, 5000])
def test_client_and_server_agree_on_sizes_windows_and_segments(
    proposal: HdlcParameters, limits: HdlcParameters, agreed: HdlcParameters, size: int
) -> None:
    client = HdlcLink(physical_address=17, parameters=proposal)
    server = HdlcServerLink(physical_address=17, parameters=limits)
    wire = Wire(client, server)
    wire.run(client.open(0.0))
    assert LinkUp() in wire.client_events and server.connected
    assert server.parameters == agreed, "seen from the server: its transmit is the client's receive"
    # each side's view of the agreement mirrors the other's
    assert client.parameters.max_info_tx == server.parameters.max_info_rx
    assert client.parameters.max_info_rx == server.parameters.max_info_tx
    assert (client.parameters.window_tx, client.parameters.window_rx) == (
        server.parameters.window_rx,
        server.parameters.window_tx,
    )
    request = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert wire.exchange(request) == request[::-1]
    assert wire.exchange(b"\xc0\x01") == b"\x01\xc0", "sequence numbers go on"
    wire.run(client.close(wire.now))
    assert wire.client_events[-1] == LinkDown(None) and not server.connected
    assert client.stats.retransmissions == 0 and server.stats.sequence_errors == 0


def test_fed_one_byte_at_a_time() -> None:
    client = HdlcLink(physical_address=17, parameters=HdlcParameters(128, 128, 3, 3))
    server = HdlcServerLink(physical_address=17, parameters=HdlcParameters(128, 128, 3, 3))
    wire = Wire(client, server, byte_by_byte=True)
    wire.run(client.open(0.0))
    assert wire.exchange(bytes(1000)) == bytes(1000)


@pytest.mark.parametrize(
    ("who", "nth", "what"),
    [
        ("server", 2, "the answer to a one-frame request"),
        ("server", 3, "the second segment of the answer"),
        ("server", 5, "the last segment of the answer"),
        ("client", 2, "the request"),
        ("client", 3, "the client's RR for the next segment"),
    ],
)
def test_a_lost_frame_is_recovered(who: str, nth: int, what: str) -> None:
    client = HdlcLink(physical_address=17, response_timeout_s=1.0)
    server = HdlcServerLink(physical_address=17)
    lost: list[HdlcFrame] = []

    def drop(side: str, frame: HdlcFrame, n: int) -> bool:
        if side == who and n == nth and not lost:
            lost.append(frame)
            return True
        return False

    wire = Wire(client, server, answer=lambda apdu: bytes(500), drop=drop)
    wire.run(client.open(0.0))
    assert wire.exchange(b"\xc0\x01\x00") == bytes(500), what
    assert lost, "a frame was lost"
    assert client.stats.retransmissions >= 1
    assert wire.exchange(b"\xc0\x02") == bytes(500), "and the link goes on"


def test_a_lost_rr_during_a_segmented_request() -> None:
    client = HdlcLink(physical_address=17, response_timeout_s=1.0)
    server = HdlcServerLink(physical_address=17)
    lost: list[HdlcFrame] = []

    def drop(side: str, frame: HdlcFrame, n: int) -> bool:
        if side == "server" and frame.kind is FrameKind.RR and not lost:
            lost.append(frame)
            return True
        return False

    wire = Wire(client, server, drop=drop)
    wire.run(client.open(0.0))
    assert wire.exchange(bytes(range(200))) == bytes(range(200))[::-1]
    assert lost and server.stats.repeats >= 1


# --- refusals ---


def connected_server(**kwargs: object) -> HdlcServerLink:
    server = HdlcServerLink(physical_address=17, **kwargs)  # type: ignore[arg-type]
    assert events(server.receive_data(cli(u_control(FrameKind.SNRM)), 0.0)) == [LinkUp()]
    return server


def test_disconnected_server_answers_dm() -> None:
    server = HdlcServerLink(physical_address=17)
    for control in (i_control(0, 0), rr_control(0), u_control(FrameKind.DISC)):
        info = LLC_REQUEST + b"\xc0" if control & 1 == 0 else b""
        (dm,) = sent(server.receive_data(cli(control, info), 0.0))
        assert dm.kind is FrameKind.DM
    assert server.receive_data(cli(rr_control(0, poll=False)), 0.0) == [], "no poll, no answer"


def test_disc_gets_ua_and_ends_the_link() -> None:
    server = connected_server()
    out = server.receive_data(cli(u_control(FrameKind.DISC)), 0.0)
    assert [f.kind for f in sent(out)] == [FrameKind.UA] and events(out) == [LinkDown(None)]


def test_snrm_while_connected_starts_over() -> None:
    server = connected_server()
    server.receive_data(cli(i_control(0, 0), LLC_REQUEST + b"\xc0\x01"), 0.0)
    out = server.receive_data(cli(u_control(FrameKind.SNRM)), 0.0)
    assert events(out) == [LinkDown(None), LinkUp()]
    assert events(server.receive_data(cli(i_control(0, 0), LLC_REQUEST + b"\xc0\x02"), 0.0)) == [
        ApduIn(b"\xc0\x02")
    ]


def test_frames_for_others_are_ignored() -> None:
    server = HdlcServerLink(physical_address=17, client_saps=[16, 1], accept_one_byte_address=False)
    other_meter = HdlcAddress.server(1, 18)
    assert server.receive_data(cli(u_control(FrameKind.SNRM), server=other_meter), 0.0) == []
    stranger = encode_frame(HdlcFrame(SERVER, HdlcAddress.client(99), u_control(FrameKind.SNRM)))
    assert server.receive_data(stranger, 0.0) == []
    one_byte = cli(u_control(FrameKind.SNRM), server=HdlcAddress.server(1))
    assert server.receive_data(one_byte, 0.0) == []
    assert server.stats.foreign_frames == 3
    (ua,) = sent(HdlcServerLink(physical_address=17).receive_data(one_byte, 0.0))
    assert ua.source == HdlcAddress(1, None, 1), "a point-to-point meter takes the one-byte form"
    (ua,) = sent(server.receive_data(cli(u_control(FrameKind.SNRM), server=HdlcAddress(1, 17, 4)), 0.0))
    assert ua.source.size_bytes == 4


def test_frame_rejects() -> None:
    server = connected_server()
    (frmr,) = sent(server.receive_data(cli(i_control(0, 0), LLC_REQUEST + bytes(200)), 0.0))
    assert frmr.kind is FrameKind.FRMR and frmr.info[2] == 0x04, "information field too long (Y)"
    server.receive_data(cli(i_control(0, 0), LLC_REQUEST + b"\xc0\x01"), 0.0)
    server.send_apdu(bytes(300), 0.0)  # three segments; the first is out
    (frmr,) = sent(server.receive_data(cli(rr_control(5)), 0.0))
    assert frmr.kind is FrameKind.FRMR and frmr.info[2] == 0x08, "N(R) of frames never sent (Z)"
    (frmr,) = sent(server.receive_data(cli(u_control(FrameKind.UA)), 0.0))
    assert frmr.info[2] == 0x01, "a UA from the client: invalid control (W)"


def test_out_of_sequence_request_is_dropped_and_polled_for() -> None:
    server = connected_server()
    (rr,) = sent(server.receive_data(cli(i_control(3, 0), LLC_REQUEST + b"\xc0"), 0.0))
    assert rr.kind is FrameKind.RR and rr.nr == 0 and server.stats.sequence_errors == 1


def test_rr_with_nothing_to_send_is_answered_rr() -> None:
    server = connected_server()
    (rr,) = sent(server.receive_data(cli(rr_control(0)), 0.0))
    assert rr.kind is FrameKind.RR and rr.nr == 0


def test_inactivity_forgets_the_connection_and_a_partial_frame_is_dropped() -> None:
    server = connected_server(inactivity_timeout_s=30.0, partial_frame_timeout_s=1.0)
    assert server.next_deadline() == 30.0
    request = cli(i_control(0, 0), LLC_REQUEST + b"\xc0\x01")
    server.receive_data(request[:5], 10.0)
    assert server.next_deadline() == 11.0
    assert server.handle_timer(11.0) == [] and server.next_deadline() == 30.0
    assert server.receive_data(request[5:], 12.0) == [], "the rest of a dropped frame is garbage"
    out = server.handle_timer(30.0)
    assert len(out) == 1 and isinstance(out[0], LinkDown) and isinstance(out[0].error, PeerTimeout)
    assert not server.connected and server.stats.inactivity_timeouts == 1
    (dm,) = sent(server.receive_data(request, 31.0))
    assert dm.kind is FrameKind.DM


def test_bad_settings_and_answering_without_a_connection() -> None:
    with pytest.raises(LocalProtocolError):
        HdlcServerLink(inactivity_timeout_s=0)
    with pytest.raises(LocalProtocolError):
        HdlcServerLink(physical_address=0x4000)
    with pytest.raises(LocalProtocolError):
        HdlcServerLink().send_apdu(b"\x01", 0.0)


# --- hostile input ---


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=20))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    server = HdlcServerLink(physical_address=17, inactivity_timeout_s=5.0)
    now = 0.0
    for chunk in chunks:
        now += 0.5
        for item in server.receive_data(chunk, now):
            assert isinstance(item, Send | LinkUp | LinkDown | ApduIn)
        deadline = server.next_deadline()
        if deadline is not None and deadline <= now:
            server.handle_timer(now)


frames_to_us = st.builds(
    lambda control, info, segmented, size: encode_frame(
        HdlcFrame(HdlcAddress.server(1, 17, size), CLIENT, control, info, segmented)
    ),
    st.integers(0, 255),
    st.binary(max_size=300),
    st.booleans(),
    st.sampled_from([2, 4]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames_to_us, max_size=40), st.data())
def test_random_frame_sequences_never_raise(frames: list[bytes], data: st.DataObject) -> None:
    server = HdlcServerLink(physical_address=17)
    server.receive_data(cli(u_control(FrameKind.SNRM)), 0.0)
    for frame in frames:
        for item in server.receive_data(frame, 0.0):
            if isinstance(item, ApduIn):
                size = data.draw(st.integers(0, 600))
                for answer in server.send_apdu(bytes(size), 0.0):
                    assert isinstance(answer, Send)
            else:
                assert isinstance(item, Send | LinkUp | LinkDown)
                if isinstance(item, Send):
                    decode_frame(item.data)  # every frame the server sends is well formed


def test_the_server_link_is_sans_io() -> None:
    import ast

    import dcud.codec.dlms.hdlc_server as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m.split(".")[0] for m in imported} & {"asyncio", "socket", "time", "logging", "threading"}
    assert not [
        m for m in imported if m.startswith(("dcud.service", "dcud.transport", "dcud.runtime", "dcud.sim"))
    ]
