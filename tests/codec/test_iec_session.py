"""IEC 62056-21 readout session with an explicit clock, alone and against the sans-I/O meter model."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest

from dcud.codec.iec62056 import (
    BccMode,
    DataSet,
    HdlcModeRequiredError,
    encode_data_message,
    encode_error_message,
    encode_option_select,
    encode_request,
    tx_time_s,
)
from dcud.codec.iec_session import (
    Action,
    Done,
    Drain,
    Failed,
    Flush,
    IecReadout,
    IecReadoutResult,
    Send,
    SetBaud,
    capped_baud_char,
)
from dcud.errors import LocalProtocolError, NegativeResponse, PeerTimeout, RemoteProtocolError
from dcud.sim.iec_meter import IecMeter

DATA = [
    DataSet("0.0.0", [("12345678", None)]),
    DataSet("1.8.0", [("0012345.678", "kWh")]),
    DataSet("1.6.0", [("02.345", "kW"), ("24-03-12 08:15", None)]),
    DataSet("32.7.0", [("230.2", "V")]),
    DataSet("F.F", [("00000000", None)]),
]
ACK_9600 = encode_option_select("5")


def data_frame(bcc_mode: BccMode = "xor") -> bytes:
    return encode_data_message(DATA, bcc_mode)


def corrupt(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


def failed(actions: list[Action]) -> BaseException:
    assert len(actions) == 1 and isinstance(actions[0], Failed), actions
    return actions[0].error


def done(actions: list[Action]) -> IecReadoutResult:
    assert len(actions) == 1 and isinstance(actions[0], Done), actions
    return actions[0].result


def signed_on(session: IecReadout, ident: bytes, t: float = 1.0) -> None:
    session.start(0.0)
    assert session.receive_data(ident, t) == []


# -- mode C by hand --------------------------------------------------------------------------------


def test_mode_c_exact_order() -> None:
    s = IecReadout("12345678")
    assert s.start(0.0) == [SetBaud(300), Flush(), Send(b"/?12345678!\r\n")]
    # Reaction deadline counts the request's own line time at 300 Bd.
    assert s.next_deadline() == pytest.approx(tx_time_s(len(b"/?12345678!\r\n"), 300) + 1.5)
    assert s.receive_data(b"/LGZ5ZMD", 0.8) == []
    assert s.receive_data(b"3104100\r\n", 0.9) == []
    assert s.state == "wait_ack_delay"
    assert s.next_deadline() == pytest.approx(0.9 + 0.2)
    assert s.handle_timer(1.0) == []  # too early: nothing
    assert s.handle_timer(1.1) == [Send(b"\x06050\r\n"), Drain(), SetBaud(9600)]
    assert s.baud == 9600
    assert s.next_deadline() == pytest.approx(1.1 + tx_time_s(6, 300) + 1.5)
    frame = data_frame()
    assert s.receive_data(frame[:10], 1.5) == []
    result = done(s.receive_data(frame[10:], 1.6))
    assert result.ident.manufacturer == "LGZ"
    assert result.raw == frame
    assert result.datasets == DATA
    assert (result.bcc_ok, result.baud, result.naks) == (True, 9600, 0)
    assert s.next_deadline() is None
    assert s.receive_data(b"more", 2.0) == []
    assert s.handle_timer(10.0) == []
    assert result.to_values()[1] == {
        "id": "1.8.0",
        "value": 12345.678,
        "unit": "kWh",
        "raw": "0012345.678*kWh",
    }
    assert result.to_values()[2]["value"] == 2.345
    assert result.to_values()[3]["value"] == "24-03-12 08:15"


def test_reaction_20ms_vs_200ms() -> None:
    fast = IecReadout()
    signed_on(fast, b"/ISk5MT174\r\n", t=1.0)
    assert fast.next_deadline() == pytest.approx(1.02)
    slow = IecReadout()
    signed_on(slow, b"/ISK5MT174\r\n", t=1.0)
    assert slow.next_deadline() == pytest.approx(1.2)


@pytest.mark.parametrize(
    ("max_baud", "z", "baud"),
    [
        (None, "5", 9600),
        (19200, "5", 9600),
        (4800, "4", 4800),
        (5000, "4", 4800),
        (2400, "3", 2400),
        (100, "0", 300),
    ],
)
def test_baud_cap(max_baud: int | None, z: str, baud: int) -> None:
    s = IecReadout("1", max_baud=max_baud)
    signed_on(s, b"/ABC5X\r\n")
    assert s.handle_timer(1.2) == [Send(encode_option_select(z)), Drain(), SetBaud(baud)]
    assert done(s.receive_data(data_frame(), 2.0)).baud == baud


def test_capped_baud_char() -> None:
    assert capped_baud_char("6", None) == "6"
    assert capped_baud_char("3", 19200) == "3"
    assert capped_baud_char("6", 9600) == "5"


def test_initial_baud_configurable() -> None:
    s = IecReadout("1", initial_baud=9600)
    assert s.start(0.0)[0] == SetBaud(9600)
    assert s.next_deadline() == pytest.approx(tx_time_s(6, 9600) + 1.5)


def test_nak_repeat_then_success() -> None:
    s = IecReadout("1", max_naks=2)
    signed_on(s, b"/ABC5X\r\n")
    s.handle_timer(1.2)
    assert s.receive_data(corrupt(data_frame()), 2.0) == []
    assert s.state == "wait_nak_delay"
    assert s.next_deadline() == pytest.approx(2.2)  # tr_min before answering, like the ACK
    assert s.handle_timer(2.2) == [Send(b"\x15")]
    assert s.receive_data(corrupt(data_frame()), 3.0) == []
    assert s.handle_timer(3.2) == [Send(b"\x15")]
    result = done(s.receive_data(data_frame(), 4.0))
    assert result.naks == 2 and result.bcc_ok


def test_nak_budget_exhausted() -> None:
    s = IecReadout("1", max_naks=1)
    signed_on(s, b"/ABC5X\r\n")
    s.handle_timer(1.2)
    assert s.receive_data(corrupt(data_frame()), 2.0) == []
    assert s.handle_timer(2.2) == [Send(b"\x15")]
    err = failed(s.receive_data(corrupt(data_frame()), 3.0))
    assert isinstance(err, RemoteProtocolError)
    assert "BCC" in str(err)
    assert err.frame == corrupt(data_frame())
    assert s.next_deadline() is None


def test_no_naks_allowed() -> None:
    s = IecReadout("1", max_naks=0)
    signed_on(s, b"/ABC5X\r\n")
    s.handle_timer(1.2)
    assert isinstance(failed(s.receive_data(corrupt(data_frame()), 2.0)), RemoteProtocolError)


def test_reaction_timeout_no_ident() -> None:
    s = IecReadout("1")
    s.start(0.0)
    deadline = s.next_deadline()
    assert deadline is not None
    assert s.handle_timer(deadline - 0.01) == []
    err = failed(s.handle_timer(deadline))
    assert isinstance(err, PeerTimeout) and isinstance(err, TimeoutError)
    assert "identification" in str(err)


def test_reaction_timeout_no_data() -> None:
    s = IecReadout("1", reaction_timeout_s=3.0)
    signed_on(s, b"/ABC5X\r\n")
    s.handle_timer(1.2)
    deadline = s.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(1.2 + tx_time_s(6, 300) + 3.0)
    err = failed(s.handle_timer(deadline + 0.5))
    assert isinstance(err, PeerTimeout) and "data message" in str(err)


def test_inter_character_timeout() -> None:
    s = IecReadout("1", inter_char_timeout_s=1.5)
    s.start(0.0)
    assert s.receive_data(b"/ABC5", 0.5) == []
    assert s.next_deadline() == pytest.approx(2.0)
    assert s.receive_data(b"XY", 1.0) == []
    assert s.next_deadline() == pytest.approx(2.5)
    err = failed(s.handle_timer(2.5))
    assert isinstance(err, PeerTimeout) and "inter-character" in str(err)


def test_inter_character_timeout_in_data() -> None:
    s = IecReadout("1", inter_char_timeout_s=0.5)
    signed_on(s, b"/ABC5X\r\n")
    s.handle_timer(1.2)
    s.receive_data(data_frame()[:20], 1.7)
    assert s.next_deadline() == pytest.approx(2.2)
    assert isinstance(failed(s.handle_timer(2.2)), PeerTimeout)


def test_mode_a_stays_at_initial_baud() -> None:
    s = IecReadout("1")
    s.start(0.0)
    assert s.receive_data(b"/ABC-METER\r\n", 1.0) == []
    assert s.state == "wait_data"
    assert s.next_deadline() == pytest.approx(2.5)
    result = done(s.receive_data(data_frame(), 1.4))
    assert result.baud == 300


def test_mode_a_ident_and_data_in_one_chunk() -> None:
    s = IecReadout("1")
    s.start(0.0)
    result = done(s.receive_data(b"/ABC-METER\r\n" + data_frame(), 1.0))
    assert result.ident.mode == "A"


def test_mode_b_switches_without_ack() -> None:
    s = IecReadout("1", max_baud=2400)
    s.start(0.0)
    assert s.receive_data(b"/ABCEMETER\r\n", 1.0) == [SetBaud(9600)]
    assert s.next_deadline() == pytest.approx(2.5)
    result = done(s.receive_data(data_frame(), 1.5))
    assert (result.ident.mode, result.baud) == ("B", 9600)


def test_mode_e_refused() -> None:
    s = IecReadout("1")
    s.start(0.0)
    err = failed(s.receive_data(b"/LGZ5\\2ZMF100AC\r\n", 1.0))
    assert isinstance(err, HdlcModeRequiredError)
    assert "mode E/HDLC" in str(err)
    assert err.ident.escapes == ("2",)


def test_error_message_is_negative_response() -> None:
    s = IecReadout("1")
    signed_on(s, b"/ABC5X\r\n")
    s.handle_timer(1.2)
    err = failed(s.receive_data(encode_error_message("ER01"), 2.0))
    assert isinstance(err, NegativeResponse)
    assert (err.code, err.text) == (1, "ER01")


def test_vendor_error_text_is_negative_response() -> None:
    s = IecReadout("1")
    signed_on(s, b"/ABC5X\r\n")
    s.handle_timer(1.2)
    err = failed(s.receive_data(encode_error_message("ACCESS DENIED"), 2.0))
    assert isinstance(err, NegativeResponse) and err.text == "ACCESS DENIED"


@pytest.mark.parametrize("bcc_mode", ["xor", "sum7"])
def test_kamstrup_sum7_only_when_configured(bcc_mode: BccMode) -> None:
    frame = data_frame("sum7")
    assert frame[-1] != data_frame("xor")[-1]  # 1 in 128 data blocks has equal sums: not this one
    s = IecReadout("1", bcc_mode=bcc_mode, max_naks=0)
    s.start(0.0)
    actions = s.receive_data(b"/KAM MC66\r\n" + frame, 1.0)
    if bcc_mode == "sum7":
        assert done(actions).bcc_ok
    else:
        assert isinstance(failed(actions), RemoteProtocolError)


def test_no_bcc_mode() -> None:
    s = IecReadout("1", bcc_mode="none")
    s.start(0.0)
    result = done(s.receive_data(b"/ABC-X\r\n" + data_frame("none"), 1.0))
    assert not result.bcc_ok
    assert result.datasets == DATA


def test_echo_and_noise_are_ignored() -> None:
    s = IecReadout("1")
    s.start(0.0)
    assert s.receive_data(b"/?1!\r\n\x00/ABC5X\r\n", 0.5) == []  # our echoed request, a glitch
    actions = s.handle_timer(0.7)
    assert actions[0] == Send(ACK_9600)
    assert s.receive_data(ACK_9600, 0.8) == []  # echo of the option select
    assert done(s.receive_data(data_frame(), 1.2)).ident.manufacturer == "ABC"
    assert s.discarded_bytes > 0


def test_meter_skips_option_select() -> None:
    """The meter starts its data at 300 Bd before our ACK is due: do not talk over it."""
    s = IecReadout("1")
    signed_on(s, b"/ISk5X\r\n", t=1.0)
    assert s.receive_data(data_frame()[:5], 1.01) == []
    assert s.handle_timer(1.02) == []
    assert s.baud == 300
    assert done(s.receive_data(data_frame()[5:], 1.2)).baud == 300


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (data_frame(), RemoteProtocolError),  # data before identification
        (b"\x01P0\x02(1234)\x03" + bytes([0x01 ^ 0x01]), RemoteProtocolError),
        (b"/AB\xff5\r\n", RemoteProtocolError),
    ],
)
def test_protocol_errors_before_ident(first: bytes, kind: type[Exception]) -> None:
    s = IecReadout("1")
    s.start(0.0)
    assert isinstance(failed(s.receive_data(first, 0.5)), kind)


def test_second_identification_is_an_error() -> None:
    s = IecReadout("1")
    signed_on(s, b"/ABC-X\r\n")
    assert isinstance(failed(s.receive_data(b"/ABC-X\r\n", 1.5)), RemoteProtocolError)


def test_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        IecReadout("12-34")
    with pytest.raises(LocalProtocolError):
        IecReadout("1", initial_baud=0)
    with pytest.raises(LocalProtocolError):
        IecReadout("1", max_naks=-1)
    with pytest.raises(LocalProtocolError):
        IecReadout("1", reaction_timeout_s=0)
    with pytest.raises(LocalProtocolError):
        IecReadout("1", bcc_mode="crc")  # type: ignore[arg-type]
    s = IecReadout("1")
    s.start(0.0)
    with pytest.raises(LocalProtocolError):
        s.start(1.0)
    assert IecReadout("1").receive_data(b"/ABC5\r\n", 0.0) == []  # not started: ignored


# -- session against the meter model ---------------------------------------------------------------


@dataclass
class Wire:
    """A master session and meter models on one half-duplex line, driven by a fake clock.

    The wire plays the I/O layer: it carries out Send/SetBaud in order and tracks each port's rate.
    Bytes sent at one rate and received at another arrive as garbage (00 bytes), like on a real UART.
    """

    session: IecReadout
    meters: list[IecMeter]
    now: float = 0.0
    garbled: int = 0
    sent: list[tuple[float, str, bytes]] = field(default_factory=list)
    master_baud: int = 300
    meter_baud: list[int] = field(default_factory=list)
    _queue: list[tuple[float, int, int, int, bytes]] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.meter_baud = [m.initial_baud for m in self.meters]

    def _transmit(self, source: int, baud: int, data: bytes) -> None:
        # Bytes trickle in as the UART receives them: 8-byte chunks at their arrival times.
        targets = [i for i in range(len(self.meters)) if i != source] if source >= 0 else []
        targets += [-1] if source >= 0 else list(range(len(self.meters)))
        for start in range(0, len(data), 8):
            chunk = data[start : start + 8]
            arrive = self.now + tx_time_s(start + len(chunk), baud)
            for target in targets:
                self._seq += 1
                heapq.heappush(self._queue, (arrive, self._seq, target, baud, chunk))

    def _master_actions(self, actions: list[Action]) -> Action | None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append((self.now, "master", action.data))
                self._transmit(-1, self.master_baud, action.data)
            elif isinstance(action, SetBaud):
                self.master_baud = action.baud
            elif isinstance(action, Done | Failed):
                return action
        return None

    def _meter_actions(self, index: int, actions: list[Send | Drain | SetBaud]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append((self.now, f"meter{index}", action.data))
                self._transmit(index, self.meter_baud[index], action.data)
            elif isinstance(action, SetBaud):
                self.meter_baud[index] = action.baud

    def run(self, max_steps: int = 10_000) -> Action:
        outcome = self._master_actions(self.session.start(self.now))
        for _ in range(max_steps):
            if outcome is not None:
                return outcome
            times = [q[0] for q in self._queue[:1]]
            times += [d for d in [self.session.next_deadline()] if d is not None]
            times += [d for m in self.meters if (d := m.next_deadline()) is not None]
            assert times, "deadlock: nothing scheduled"
            self.now = max(self.now, min(times))
            assert self.now < 600, "simulated time ran away"
            while self._queue and self._queue[0][0] <= self.now:
                _, _, target, baud, data = heapq.heappop(self._queue)
                rx_baud = self.master_baud if target < 0 else self.meter_baud[target]
                if baud != rx_baud:
                    self.garbled += 1
                    data = b"\x00" * len(data)
                if target < 0:
                    outcome = outcome or self._master_actions(self.session.receive_data(data, self.now))
                else:
                    self._meter_actions(target, self.meters[target].receive_data(data, self.now))
            for i, meter in enumerate(self.meters):
                d = meter.next_deadline()
                if d is not None and d <= self.now:
                    self._meter_actions(i, meter.handle_timer(self.now))
            d = self.session.next_deadline()
            if outcome is None and d is not None and d <= self.now:
                outcome = self._master_actions(self.session.handle_timer(self.now))
        raise AssertionError("session did not finish")


def readout(session: IecReadout, *meters: IecMeter) -> tuple[Action, Wire]:
    wire = Wire(session, list(meters))
    return wire.run(), wire


def test_sim_mode_c_readout() -> None:
    meter = IecMeter("12345678", manufacturer="ISk", baud_char="5", ident="MT174", datasets=DATA)
    outcome, wire = readout(IecReadout("12345678"), meter)
    result = done([outcome])
    assert result.datasets == DATA and result.baud == 9600
    assert [(who, data[:1]) for _, who, data in wire.sent] == [
        ("master", b"/"),
        ("meter0", b"/"),
        ("master", b"\x06"),
        ("meter0", b"\x02"),
    ]
    # ACK went out tr_min (20 ms for "ISk") after the identification arrived.
    ident_sent, ack_sent = wire.sent[1][0], wire.sent[2][0]
    assert ack_sent - ident_sent == pytest.approx(tx_time_s(len(wire.sent[1][2]), 300) + 0.02)
    assert wire.garbled == 0
    assert meter.baud == 9600
    # The meter returns to 300 Bd by itself once idle.
    deadline = meter.next_deadline()
    assert deadline is not None
    assert meter.handle_timer(deadline) == [SetBaud(300)]


def test_sim_leading_zeros_and_other_meters() -> None:
    ours = IecMeter("0000123", baud_char="4", datasets=DATA)
    other = IecMeter("124", baud_char="4", datasets=[DataSet("1.8.0", [("9", "kWh")])])
    outcome, _ = readout(IecReadout("123"), other, ours)
    assert done([outcome]).datasets == DATA
    assert other.readouts == 0 and ours.readouts == 1
    assert other.state == "idle"


def test_sim_general_request() -> None:
    outcome, _ = readout(IecReadout(""), IecMeter("999", datasets=DATA))
    assert done([outcome]).datasets == DATA


def test_sim_wrong_address_times_out() -> None:
    outcome, _ = readout(IecReadout("1"), IecMeter("2", datasets=DATA))
    assert isinstance(failed([outcome]), PeerTimeout)


@pytest.mark.parametrize(("max_baud", "expected"), [(None, 19200), (9600, 9600), (1200, 1200)])
def test_sim_baud_cap(max_baud: int | None, expected: int) -> None:
    meter = IecMeter("1", baud_char="6", datasets=DATA)
    outcome, wire = readout(IecReadout("1", max_baud=max_baud), meter)
    assert done([outcome]).baud == expected
    assert wire.garbled == 0


def test_sim_strict_meter_rejects_lower_baud() -> None:
    """A meter that insists on its own Z stays at 300 Bd: the capped master hears garbage."""
    meter = IecMeter("1", baud_char="6", datasets=DATA, accept_lower_baud=False)
    outcome, wire = readout(IecReadout("1", max_baud=9600), meter)
    assert isinstance(failed([outcome]), PeerTimeout)
    assert wire.garbled >= 1


def test_sim_values_change_over_time() -> None:
    def energy(now: float) -> list[DataSet]:
        return [DataSet("1.8.0", [(f"{1000 + now:011.3f}", "kWh")])]

    meter = IecMeter("7", datasets=energy)
    first = done([readout(IecReadout("7"), meter)[0]])
    wire = Wire(IecReadout("7"), [meter], now=100.0)
    second = done([wire.run()])
    v1, v2 = first.to_values()[0]["value"], second.to_values()[0]["value"]
    assert isinstance(v1, float) and isinstance(v2, float) and v2 > v1 + 90


def test_sim_nak_repeat() -> None:
    meter = IecMeter("1", datasets=DATA, bad_bcc_count=2)
    outcome, wire = readout(IecReadout("1", max_naks=3), meter)
    result = done([outcome])
    assert result.naks == 2 and meter.naks_received == 2
    assert [d for _, who, d in wire.sent if who == "master"][-2:] == [b"\x15", b"\x15"]


def test_sim_nak_budget_exhausted() -> None:
    meter = IecMeter("1", datasets=DATA, bad_bcc_count=5)
    outcome, _ = readout(IecReadout("1", max_naks=2), meter)
    assert isinstance(failed([outcome]), RemoteProtocolError)
    assert meter.readouts == 3


def test_sim_mode_a() -> None:
    meter = IecMeter("1", baud_char="-", datasets=DATA)
    outcome, wire = readout(IecReadout("1"), meter)
    result = done([outcome])
    assert (result.ident.mode, result.baud) == ("A", 300)
    assert not any(d.startswith(b"\x06") for _, _, d in wire.sent)


def test_sim_mode_b() -> None:
    meter = IecMeter("1", baud_char="E", datasets=DATA)
    outcome, wire = readout(IecReadout("1"), meter)
    result = done([outcome])
    assert (result.ident.mode, result.baud) == ("B", 9600)
    assert wire.garbled == 0
    assert not any(d.startswith(b"\x06") for _, _, d in wire.sent)


def test_sim_mode_e_refused() -> None:
    meter = IecMeter("1", baud_char="5", escapes=["2"], datasets=DATA)
    outcome, _ = readout(IecReadout("1"), meter)
    assert isinstance(failed([outcome]), HdlcModeRequiredError)


def test_sim_error_message() -> None:
    meter = IecMeter("1", datasets=DATA, error_text="ER07")
    err = failed([readout(IecReadout("1"), meter)[0]])
    assert isinstance(err, NegativeResponse) and err.code == 7


@pytest.mark.parametrize(("bcc_mode", "ok"), [("sum7", True), ("xor", False)])
def test_sim_kamstrup_sum7(bcc_mode: BccMode, ok: bool) -> None:
    meter = IecMeter("5678", manufacturer="KAM", baud_char=" ", ident="MC66", datasets=DATA, bcc_mode="sum7")
    outcome = readout(IecReadout("5678", bcc_mode=bcc_mode, max_naks=1), meter)[0]
    if ok:
        assert done([outcome]).bcc_ok
    else:
        assert isinstance(failed([outcome]), RemoteProtocolError)


def test_sim_option_window_fallback() -> None:
    """No option select within tt: the meter sends its data at 300 Bd by itself."""
    meter = IecMeter("1", datasets=DATA, option_window_s=1.8)
    actions = meter.receive_data(encode_request("1"), 0.0)
    assert actions == []
    assert meter.next_deadline() == pytest.approx(0.2)
    (send,) = meter.handle_timer(0.2)
    assert isinstance(send, Send) and send.data.startswith(b"/DCU5")
    deadline = meter.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(0.2 + tx_time_s(len(send.data), 300) + 1.8)
    (data,) = meter.handle_timer(deadline)
    assert data == Send(data_frame())
    assert meter.baud == 300


def test_sim_meter_ignores_the_hdlc_option() -> None:
    # Programming mode (Y=1) is modelled: tests/service/test_bridge_iec_break.py; mode E/HDLC (Y=2) is not.
    meter = IecMeter("1", datasets=DATA)
    meter.receive_data(encode_request("1"), 0.0)
    meter.handle_timer(0.2)
    assert meter.receive_data(encode_option_select("5", mode_control="2"), 0.8) == []
    assert meter.state == "idle" and meter.ignored_options == 1
    assert meter.next_deadline() is None


def test_sim_meter_ignores_garbage() -> None:
    meter = IecMeter("1", datasets=DATA)
    assert meter.receive_data(b"\x00\xff/garbage\r\n\x06x", 0.0) == []
    assert meter.state == "idle"


def test_sim_two_readouts_in_a_row() -> None:
    meter = IecMeter("1", datasets=DATA)
    first, wire = readout(IecReadout("1"), meter)
    assert isinstance(first, Done)
    # Let the meter fall back to idle, then read again on the same wire clock.
    for _ in range(5):
        d = meter.next_deadline()
        if d is None:
            break
        meter.handle_timer(d)
    assert meter.state == "idle" and meter.baud == 300
    again = Wire(IecReadout("1"), [meter], now=wire.now + 5)
    assert isinstance(again.run(), Done)
    assert meter.readouts == 2
