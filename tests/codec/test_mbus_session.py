"""M-Bus master sessions against the slave model, on an explicit clock (no real time, no sleeps)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pytest

from dcud.codec.mbus import (
    ACK,
    decode_frame,
    encode_long,
    encode_req_ud2,
    encode_select,
    encode_set_address,
    encode_snd_nke,
)
from dcud.codec.mbus_app import DataField
from dcud.codec.mbus_session import (
    Action,
    Done,
    Failed,
    Flush,
    MbusCommand,
    MbusCommandResult,
    MbusReadout,
    MbusReadoutResult,
    MbusScan,
    MbusScanResult,
    Send,
    SetBaud,
    default_response_timeout_s,
)
from dcud.errors import LocalProtocolError, NegativeResponse, PeerTimeout, RemoteProtocolError
from dcud.sim.mbus_slave import (
    MbusBusModel,
    MbusSlave,
    SlaveRecord,
    bytes_time_s,
    merge_replies,
)

Session = MbusReadout | MbusScan | MbusCommand


@dataclass
class Line:
    """A simulated serial line with a driver loop: runs a session against the bus model.

    ``drop``/``garble`` hold the numbers (0-based) of requests whose answer is lost or corrupted;
    ``echo`` makes the line echo each request (some level converters do); replies arrive in
    ``chunk``-byte pieces at their wire time.
    """

    bus: MbusBusModel
    drop: set[int] = field(default_factory=set)
    garble: set[int] = field(default_factory=set)
    echo: bool = False
    chunk: int = 64
    reply_delay_s: float = 0.02
    sent: list[bytes] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    timers: int = 0

    def run(self, session: Session, now: float = 100.0, max_steps: int = 200_000) -> tuple[Action, float]:
        inbox: deque[tuple[float, bytes]] = deque()
        actions = session.start(now)
        for _ in range(max_steps):
            for action in actions:
                if isinstance(action, Done | Failed):
                    assert session.done and session.next_deadline() is None
                    return action, now
                if isinstance(action, Flush):
                    while inbox and inbox[0][0] <= now:
                        inbox.popleft()
                elif isinstance(action, SetBaud):
                    self.bus.baud = action.baud
                elif isinstance(action, Send):
                    self._schedule(action.data, now, inbox)
            deadline = session.next_deadline()
            next_data = inbox[0][0] if inbox else None
            if deadline is not None and (next_data is None or deadline < next_data):
                now = max(now, deadline)
                self.timers += 1
                actions = session.handle_timer(now)
            elif next_data is not None:
                at, data = inbox.popleft()
                now = max(now, at)
                actions = session.receive_data(data, now)
            else:
                raise AssertionError("session waits for nothing")
        raise AssertionError("session did not finish")

    def _schedule(self, request: bytes, now: float, inbox: deque[tuple[float, bytes]]) -> None:
        number = len(self.sent)
        self.sent.append(request)
        self.sent_at.append(now)
        baud = self.bus.baud
        end_of_request = now + bytes_time_s(len(request), baud)
        stream = request if self.echo else b""
        reply = self.bus.request(request)
        if number in self.drop:
            reply = b""
        if number in self.garble and reply:
            reply = reply[:-2] + bytes([reply[-2] ^ 0x5A]) + reply[-1:]
        if self.echo:
            inbox.append((end_of_request, stream))
        start = end_of_request + self.reply_delay_s
        for i in range(0, len(reply), self.chunk):
            piece = reply[i : i + self.chunk]
            inbox.append((start + bytes_time_s(i + len(piece), baud), piece))


def meter(address: int = 5, ident: str = "12345678", telegrams: int = 1, **kwargs: object) -> MbusSlave:
    records: list[list[SlaveRecord | bytes]] = [
        [SlaveRecord(1000 * (n + 1), 0x13), SlaveRecord(n, 0x06, DataField.BCD8)] for n in range(telegrams)
    ]
    return MbusSlave(primary_address=address, ident=ident, manufacturer="ACW", telegrams=records, **kwargs)  # type: ignore[arg-type]


def fcbs(frames: list[bytes]) -> list[bool]:
    return [decode_frame(f).fcb for f in frames if f[0] == 0x10 and f[1] & 0x0F == 0x0B]


def done(action: Action) -> object:
    assert isinstance(action, Done), action
    return action.result


# ---------------------------------------------------------------------------------------------------
# Readout


def test_primary_readout_with_snd_nke() -> None:
    line = Line(MbusBusModel([meter()]))
    action, _ = line.run(MbusReadout(5))
    result = done(action)
    assert isinstance(result, MbusReadoutResult)
    assert line.sent == [encode_snd_nke(5), encode_req_ud2(5, fcb=True)]
    assert [t.id for t in result.telegrams] == ["12345678"]
    assert result.to_values()[0] == {
        "id": "0",
        "value": 1.0,
        "unit": "m3",
        "quantity": "volume",
        "storage": 0,
        "tariff": 0,
        "subunit": 0,
        "function": "instantaneous",
    }
    assert result.next_fcb is False and result.retries == 0


def test_multi_telegram_toggles_fcb() -> None:
    slave = meter(telegrams=3)
    line = Line(MbusBusModel([slave]))
    result = done(line.run(MbusReadout(5))[0])
    assert isinstance(result, MbusReadoutResult)
    assert fcbs(line.sent) == [True, False, True]
    assert [t.more_records_follow for t in result.telegrams] == [True, True, False]
    assert [t.access_number for t in result.telegrams] == [1, 2, 3]
    # Merged view: 1F markers dropped, indices run on across telegrams.
    assert [(r.id, r.quantity, r.value) for r in result.records] == [
        ("0", "volume", 1.0),
        ("1", "energy", 0),
        ("2", "volume", 2.0),
        ("3", "energy", 1000),
        ("4", "volume", 3.0),
        ("5", "energy", 2000),
    ]
    assert result.next_fcb is False
    assert len(result.frames) == 3


def test_max_telegrams_bounds_a_readout() -> None:
    line = Line(MbusBusModel([meter(telegrams=5)]))
    result = done(line.run(MbusReadout(5, max_telegrams=2))[0])
    assert isinstance(result, MbusReadoutResult) and len(result.telegrams) == 2


def test_without_snd_nke_the_caller_fcb_is_used() -> None:
    line = Line(MbusBusModel([meter()]))
    result = done(line.run(MbusReadout(5, send_nke=False, fcb=False))[0])
    assert line.sent == [encode_req_ud2(5, fcb=False)]
    assert isinstance(result, MbusReadoutResult) and result.next_fcb is True


def test_retry_on_timeout_keeps_fcb_and_slave_repeats() -> None:
    slave = meter(telegrams=3)
    line = Line(MbusBusModel([slave]), drop={2})  # the answer to the 2nd REQ_UD2 is lost
    result = done(line.run(MbusReadout(5))[0])
    assert isinstance(result, MbusReadoutResult)
    assert fcbs(line.sent) == [True, False, False, True]  # repeat with the same FCB
    # The slave had moved to telegram 2; the repeated FCB made it resend that one, not skip ahead.
    assert [t.access_number for t in result.telegrams] == [1, 2, 3]
    assert [t.records[0].value for t in result.telegrams] == [1.0, 2.0, 3.0]
    assert result.retries == 1


def test_retry_on_garbage_keeps_fcb() -> None:
    line = Line(MbusBusModel([meter()]), garble={1})
    result = done(line.run(MbusReadout(5))[0])
    assert isinstance(result, MbusReadoutResult)
    assert line.sent[1:] == [encode_req_ud2(5, fcb=True)] * 2
    assert result.retries == 1


def test_retries_exhausted_timeout_and_garbage() -> None:
    line = Line(MbusBusModel([meter()]), drop={1, 2, 3})
    action, _ = line.run(MbusReadout(5, retries=2))
    assert isinstance(action, Failed) and isinstance(action.error, PeerTimeout)
    assert len(line.sent) == 4
    line = Line(MbusBusModel([meter()]), garble={1, 2})
    action, _ = line.run(MbusReadout(5, retries=1))
    assert isinstance(action, Failed) and isinstance(action.error, RemoteProtocolError)
    line = Line(MbusBusModel([meter()]), drop={1})
    action, _ = line.run(MbusReadout(5, retries=0))
    assert isinstance(action, Failed) and len(line.sent) == 2


def test_silent_slave_on_snd_nke_is_not_fatal() -> None:
    line = Line(MbusBusModel([meter(answer_nke=False)]))
    assert isinstance(done(line.run(MbusReadout(5))[0]), MbusReadoutResult)


def test_negative_response_is_not_retried() -> None:
    class ErrorSlave(MbusSlave):
        def handle_frame(self, frame):  # type: ignore[no-untyped-def]
            reply = super().handle_frame(frame)
            if reply and reply[0] == 0x68:
                return encode_long(0x08, self.primary_address, 0x70, b"\x08")
            return reply

    line = Line(MbusBusModel([ErrorSlave(primary_address=5)]))
    action, _ = line.run(MbusReadout(5))
    assert isinstance(action, Failed) and isinstance(action.error, NegativeResponse)
    assert action.error.code == 8 and len(line.sent) == 2


def test_answer_from_another_address_is_not_taken() -> None:
    class WrongAddress(MbusSlave):
        def telegram_bytes(self, index: int, access_number: int) -> bytes:
            frame = MbusSlave(primary_address=7).telegram_bytes(index, access_number)
            return frame

    line = Line(MbusBusModel([WrongAddress(primary_address=6)]))
    action, _ = line.run(MbusReadout(6, retries=1))
    assert isinstance(action, Failed) and isinstance(action.error, RemoteProtocolError)
    assert len(line.sent) == 3


def test_secondary_readout_selects_then_reads_253() -> None:
    slave = meter(address=0, ident="87654321")
    line = Line(MbusBusModel([meter(address=0, ident="12345678"), slave]))
    result = done(line.run(MbusReadout(secondary="87654321"))[0])
    assert isinstance(result, MbusReadoutResult)
    assert line.sent == [
        encode_snd_nke(0xFD),
        encode_select("87654321FFFFFFFF"),
        encode_req_ud2(0xFD, fcb=True),
    ]
    assert result.telegrams[0].id == "87654321"
    assert slave.selected


def test_secondary_readout_with_full_mask_and_no_match() -> None:
    line = Line(MbusBusModel([meter(address=0)]))
    action, _ = line.run(MbusReadout(secondary="1234567804770107", send_nke=False))
    assert isinstance(done(action), MbusReadoutResult)
    line = Line(MbusBusModel([meter(address=0)]))
    action, _ = line.run(MbusReadout(secondary="1234567804770108", retries=1))
    assert isinstance(action, Failed) and isinstance(action.error, PeerTimeout)
    assert "1234567804770108" in str(action.error)
    assert len(line.sent) == 3  # NKE, select, select again


def test_byte_by_byte_delivery_and_echo() -> None:
    for kwargs in ({"chunk": 1}, {"echo": True}, {"chunk": 3, "echo": True}):
        line = Line(MbusBusModel([meter(telegrams=2)]), **kwargs)
        result = done(line.run(MbusReadout(5))[0])
        assert isinstance(result, MbusReadoutResult) and len(result.telegrams) == 2
        assert line.timers == 0  # no timeout fired: every answer was taken as soon as complete


def test_slow_line_long_frame_outlasts_the_response_timeout() -> None:
    # 60 records at 300 Bd: the frame takes far longer than the response timeout; the deadline moves
    # with the arriving bytes.
    records: list[SlaveRecord | bytes] = [SlaveRecord(i, 0x13) for i in range(40)]
    slave = MbusSlave(primary_address=1, telegrams=[records], baud=300)
    line = Line(MbusBusModel([slave], baud=300), chunk=1)
    action, end = line.run(MbusReadout(1, baud=300, send_nke=False))
    result = done(action)
    assert isinstance(result, MbusReadoutResult) and len(result.records) == 40
    frame_s = bytes_time_s(len(result.frames[0]), 300)
    assert frame_s > default_response_timeout_s(300)
    assert end - line.sent_at[0] > frame_s


# ---------------------------------------------------------------------------------------------------
# Deadlines and API contract


def test_deadlines_are_handed_back() -> None:
    session = MbusReadout(5, send_nke=False, baud=2400)
    actions = session.start(10.0)
    assert actions == [Flush(), Send(encode_req_ud2(5, fcb=True))]
    timeout = default_response_timeout_s(2400)
    assert timeout == pytest.approx(330 / 2400 + 0.05 + 0.1)
    first = session.next_deadline()
    assert first == pytest.approx(10.0 + 5 * 11 / 2400 + timeout)
    assert session.handle_timer(10.01) == []  # early: nothing happens
    assert session.next_deadline() == first
    # Half a frame arrives: the deadline moves to "idle for one response timeout".
    assert session.receive_data(b"\x68\x16\x16\x68", 10.2) == []
    assert session.next_deadline() == pytest.approx(10.2 + timeout)
    # At the deadline the half frame is garbage: the same request again.
    actions = session.handle_timer(10.2 + timeout)
    assert actions == [Flush(), Send(encode_req_ud2(5, fcb=True))]
    assert session.retries_used == 1


def test_custom_timeout_and_validation() -> None:
    session = MbusReadout(5, send_nke=False, response_timeout_s=1.5, baud=9600)
    session.start(0.0)
    assert session.next_deadline() == pytest.approx(5 * 11 / 9600 + 1.5)
    with pytest.raises(LocalProtocolError):
        session.start(0.0)
    for bad in (
        {"address": 5, "secondary": "12345678"},
        {},
        {"address": 251},
        {"address": 5, "baud": 1234},
        {"address": 5, "retries": -1},
        {"address": 5, "response_timeout_s": 0},
        {"address": 5, "max_telegrams": 0},
        {"secondary": "123"},
    ):
        with pytest.raises(LocalProtocolError):
            MbusReadout(**bad)


def test_after_done_nothing_happens() -> None:
    line = Line(MbusBusModel([meter()]))
    session = MbusReadout(5)
    line.run(session)
    assert session.receive_data(b"\xe5", 1e6) == []
    assert session.handle_timer(1e6) == []
    assert session.next_deadline() is None


# ---------------------------------------------------------------------------------------------------
# Commands


def test_set_baud_command_switches_the_line() -> None:
    slave = meter(address=1)
    bus = MbusBusModel([slave])
    line = Line(bus)
    action, now = line.run(MbusCommand.set_baud(1, 9600))
    assert isinstance(action, Done) and isinstance(action.result, MbusCommandResult)
    assert bus.baud == 9600 and slave.baud == 9600
    result = done(Line(bus).run(MbusReadout(1, baud=9600), now)[0])
    assert isinstance(result, MbusReadoutResult)


def test_set_address_command_and_broadcast() -> None:
    slave = meter(address=0)
    bus = MbusBusModel([slave])
    action, _ = Line(bus).run(MbusCommand(encode_set_address(0, 17)))
    assert isinstance(action, Done) and slave.primary_address == 17
    action, _ = Line(bus).run(MbusCommand(encode_snd_nke(0xFF), expect_ack=False))
    assert isinstance(action, Done)
    action, _ = Line(bus).run(MbusCommand(encode_snd_nke(3), retries=1))
    assert isinstance(action, Failed) and isinstance(action.error, PeerTimeout)


# ---------------------------------------------------------------------------------------------------
# Scans


def test_primary_scan_finds_slaves() -> None:
    bus = MbusBusModel([meter(address=1, ident="00000001"), meter(address=7, ident="00000007")])
    line = Line(bus)
    result = done(line.run(MbusScan.primary(0, 10))[0])
    assert isinstance(result, MbusScanResult)
    assert [(h.address, h.secondary_address) for h in result.found] == [
        (1, "0000000104770107"),
        (7, "0000000704770107"),
    ]
    assert result.collisions == [] and result.probes == 11 and result.complete


def test_primary_scan_snd_nke_and_collision() -> None:
    bus = MbusBusModel(
        [
            meter(address=3, ident="00000003"),
            meter(address=4, ident="00000004", reply_delay_bits=11),
            meter(address=4, ident="00000044", reply_delay_bits=16),
        ]
    )
    result = done(Line(bus).run(MbusScan.primary(2, 5, retries=1))[0])
    assert isinstance(result, MbusScanResult)
    assert [h.address for h in result.found] == [3]
    assert result.collisions == ["4"]  # two meters on address 4 garble each other
    result = done(Line(bus).run(MbusScan.primary(2, 5, method="snd_nke"))[0])
    assert isinstance(result, MbusScanResult)
    assert [h.address for h in result.found] == [3]
    assert result.collisions == ["4"]


def test_primary_scan_budget() -> None:
    result = done(Line(MbusBusModel([meter(address=1)])).run(MbusScan.primary(max_probes=3))[0])
    assert isinstance(result, MbusScanResult)
    assert result.probes == 3 and not result.complete


def _scan_bus() -> list[MbusSlave]:
    return [
        MbusSlave(ident="12345678", manufacturer="ACW", reply_delay_bits=11),
        MbusSlave(ident="12345699", manufacturer="KAM", reply_delay_bits=19),
        MbusSlave(ident="12345001", manufacturer="ELS", reply_delay_bits=27),
        MbusSlave(ident="87654321", manufacturer="SEN", reply_delay_bits=14),
    ]


def test_secondary_scan_resolves_collisions() -> None:
    slaves = _scan_bus()
    line = Line(MbusBusModel(slaves))
    scan = MbusScan.secondary()
    result = done(line.run(scan)[0])
    assert isinstance(result, MbusScanResult)
    assert sorted(h.secondary_address for h in result.found) == sorted(s.secondary_address for s in slaves)
    assert result.collisions == [] and result.unreadable == [] and result.complete
    masks = [decode_frame(f).data[:4][::-1].hex().upper() for f in line.sent if f[0] == 0x68]
    # Level 0 probes 0..9; "1" collides (three meters start with 1), so digits 2.. are searched under 1...
    assert masks[:3] == ["0FFFFFFF", "1FFFFFFF", "10FFFFFF"]
    assert "123450FF" in masks and "1234569F" in masks and "8FFFFFFF" in masks
    assert result.probes == len(masks)
    assert scan.progress == masks[-1] + "FFFFFFFF"


def test_secondary_scan_with_fixed_digits_and_duplicates() -> None:
    twins = [
        MbusSlave(ident="55500001", manufacturer="ACW", reply_delay_bits=11),
        MbusSlave(ident="55500001", manufacturer="KAM", reply_delay_bits=23),
        MbusSlave(ident="55500002", manufacturer="KAM", reply_delay_bits=13),
        MbusSlave(ident="66600001", manufacturer="KAM", reply_delay_bits=13),
    ]
    line = Line(MbusBusModel(twins))
    result = done(line.run(MbusScan.secondary("555FFFFF"))[0])
    assert isinstance(result, MbusScanResult)
    assert [h.secondary_address[:8] for h in result.found] == ["55500002"]
    assert result.collisions == ["55500001FFFFFFFF"]  # same ID twice: cannot be split by ID digits
    masks = [decode_frame(f).data[:4][::-1].hex().upper() for f in line.sent if f[0] == 0x68]
    assert all(m.startswith("555") for m in masks)


def test_secondary_scan_exact_mask_and_budget() -> None:
    slaves = _scan_bus()
    result = done(Line(MbusBusModel(slaves)).run(MbusScan.secondary("87654321", send_nke=False))[0])
    assert isinstance(result, MbusScanResult)
    assert [h.secondary_address[:8] for h in result.found] == ["87654321"] and result.probes == 1
    result = done(Line(MbusBusModel(slaves)).run(MbusScan.secondary(max_probes=5))[0])
    assert isinstance(result, MbusScanResult)
    assert result.probes == 5 and not result.complete


def test_secondary_scan_descends_when_aligned_acks_hide_a_collision() -> None:
    # Two slaves answer the select with perfectly aligned E5s (one clean E5 on the wire); only their
    # RSP_UDs collide. The scan must search deeper (as libmbus does), not give up on "unreadable".
    twins = [
        MbusSlave(ident="12345671", manufacturer="ACW", reply_delay_bits=11),
        MbusSlave(ident="12345672", manufacturer="KAM", reply_delay_bits=11),
    ]
    result = done(Line(MbusBusModel(twins)).run(MbusScan.secondary(retries=0))[0])
    assert isinstance(result, MbusScanResult)
    assert sorted(h.secondary_address[:8] for h in result.found) == ["12345671", "12345672"]
    assert result.unreadable == [] and result.collisions == []


def test_secondary_scan_unreadable_slave() -> None:
    slave = MbusSlave(ident="12345678")
    line = Line(MbusBusModel([slave]))
    line.drop = set(range(3, 20))  # NKE, probe 0, probe 1 (E5) answered; REQ_UD2 answers lost
    result = done(line.run(MbusScan.secondary(retries=1))[0])
    assert isinstance(result, MbusScanResult)
    assert result.found == [] and result.unreadable == ["1FFFFFFFFFFFFFFF"]


# ---------------------------------------------------------------------------------------------------
# Slave model and collision merging


def test_merge_replies_models_the_wired_and() -> None:
    ack = bytes([ACK])
    assert merge_replies([]) == b""
    assert merge_replies([(11, ack)]) == ack
    assert merge_replies([(11, ack), (11, ack)]) == ack  # perfectly aligned: invisible to the master
    merged = merge_replies([(11, ack), (16, ack)])
    assert merged != ack
    frame = MbusSlave(primary_address=1).telegram_bytes(0, 1)
    other = MbusSlave(primary_address=1, ident="99999999").telegram_bytes(0, 1)
    garbled = merge_replies([(11, frame), (14, other)])
    with pytest.raises(RemoteProtocolError):
        decode_frame(garbled)


def test_slave_fcb_selection_and_addressing() -> None:
    slave = MbusSlave(primary_address=3, ident="12345678", telegrams=[[SlaveRecord(1, 0x13)], []])
    first = slave.receive_data(encode_req_ud2(3, fcb=True))
    assert slave.receive_data(encode_req_ud2(3, fcb=True)) == first  # repeat
    second = slave.receive_data(encode_req_ud2(3, fcb=False))
    assert second != first
    assert slave.receive_data(encode_snd_nke(3)) == b"\xe5"
    assert slave.receive_data(encode_req_ud2(3, fcb=False)) != second  # after reset: telegram 0 again
    assert slave.receive_data(encode_req_ud2(4)) == b""
    assert slave.receive_data(encode_select("1234FFFFFFFFFFFF")) == b"\xe5" and slave.selected
    assert slave.receive_data(encode_req_ud2(0xFD))[:1] == b"\x68"
    assert slave.receive_data(encode_select("1235FFFFFFFFFFFF")) == b"" and not slave.selected
    assert slave.receive_data(encode_select("12345678FFFF01FF")) == b"\xe5"
    assert slave.receive_data(encode_snd_nke(0xFD)) == b"\xe5" and not slave.selected
    assert slave.receive_data(encode_select("12345678FFFF02FF")) == b""
    assert slave.receive_data(encode_snd_nke(0xFF)) == b""
    assert slave.receive_data(encode_snd_nke(0xFE)) == b"\xe5"
    assert slave.receive_data(b"\x00\x01" + encode_snd_nke(3)) == b"\xe5"  # garbage first: resync
