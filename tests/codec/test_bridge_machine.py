"""The transparent session machine (dcud.codec.bridge_session), sans-I/O: bytes and an explicit ``now``.

A small rig plays the I/O layer exactly as dcud/service/bridge_session.py does (the fast paths, the
inline run from a callback, the pump), with a line and a client that only record bytes, so every
deadline is driven by a number instead of a wait.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.bridge_session import (
    ASK_BACKLOG,
    BREAK_DRAIN_S,
    DRAIN,
    EOF_LINGER_MAX_S,
    EOF_LINGER_S,
    FLUSH_INPUT,
    INBOUND_HIGH_BYTES,
    MODEL_SPEEDUP_MAX,
    RESUME_CLIENT,
    WAITER_POLL_S,
    YIELD_LEASE,
    BridgeAction,
    BridgeMachine,
    EndSession,
    MeterFlow,
    SessionLimits,
    SwitchLine,
    WriteClient,
    WriteLine,
    bits_per_char,
)
from dcud.codec.iec62056 import encode_break, encode_command, encode_identification, tx_time_s
from dcud.codec.rfc2217 import (
    COM_PORT_OPTION,
    DO,
    FLOWCONTROL_RESUME,
    FLOWCONTROL_SUSPEND,
    IAC,
    PURGE_DATA,
    SB,
    SE,
    SET_BAUDRATE,
    SET_PARITY,
    WILL,
)

REQUEST = b"/?!\r\n"
IDENT_C = encode_identification("DCU", "5", "SIM62056")  # mode C, up to 9600 Bd
IDENT_B = encode_identification("DCU", "C", "SIM62056")  # mode B: switches to 2400 Bd after it
PROGRAMMING = b"\x06051\r\n"  # option select: 9600 Bd, programming mode


@dataclass
class Rig:
    """The I/O layer of one session with a recording line and client (see the module docstring)."""

    limits: SessionLimits = field(default_factory=SessionLimits)
    baud: int = 300
    framing: str = "7E1"
    now: float = 1000.0
    counts: bool = True
    driver_backlog: int = 0
    """What the port answers to ASK_BACKLOG."""
    line: bytearray = field(default_factory=bytearray)
    client: bytearray = field(default_factory=bytearray)
    settings: list[tuple[int, str]] = field(default_factory=list)
    drains: int = 0
    flushes: int = 0
    asks: int = 0
    client_paused: bool = False
    meter_paused: bool = False
    ended: EndSession | None = None
    yielded: int = 0

    def __post_init__(self) -> None:
        self.m = BridgeMachine(self.baud, self.framing, self.limits, self.now)
        self.line_baud, self.line_framing = self.baud, self.framing

    # -- what the glue does ------------------------------------------------------------------------

    def grant(self, waited_s: float = 0.0) -> None:
        self.line_baud, self.line_framing = self.m.lease_settings()
        self.m.lease_granted(self.line_baud, self.line_framing, self.now, waited_s, counts=self.counts)

    def release(self, *, yielded: bool = False) -> None:
        self.m.lease_ended(yielded=yielded)

    def from_client(self, data: bytes) -> None:
        m = self.m
        if m.fast and m.backlog_bytes + len(data) <= m.queue_limit_bytes:
            self.line += data
            m.client_wrote(data, 0, self.now)
            return
        if m.client_data(data, self.now):
            self.client_paused = True
        if m.can_run_inline:
            while (action := m.next_action(self.now, sync_only=True)) is not None:
                self.do(action)

    def from_meter(self, data: bytes) -> None:
        m = self.m
        if m.meter_fast:
            self.client += data
            m.meter_wrote(len(data), self.now)
            return
        for piece in m.meter_data(data, self.now):
            self.client += piece

    def do(self, action: BridgeAction) -> None:
        m = self.m
        if isinstance(action, WriteLine):
            self.line += action.data
            m.line_wrote(0)
        elif action is ASK_BACKLOG:
            self.asks += 1
            m.backlog_is(self.driver_backlog)
        elif isinstance(action, WriteClient):
            self.client += action.data
        elif action is RESUME_CLIENT:
            self.client_paused = False
        elif isinstance(action, MeterFlow):
            self.meter_paused = action.paused
        elif action is FLUSH_INPUT:
            self.flushes += 1
        elif action is DRAIN:
            self.drains += 1
            self.driver_backlog = 0
            m.drained(self.now)
        elif isinstance(action, SwitchLine):
            self.line_baud, self.line_framing = action.baud, action.framing
            self.settings.append((action.baud, action.framing))
            m.line_is(action.baud, action.framing, self.now)
        elif isinstance(action, EndSession):
            self.ended = action
        else:
            raise AssertionError(f"unexpected action {action!r}")

    def pump(self) -> None:
        """What the pump task does until it would wait."""
        while self.ended is None and (action := self.m.next_action(self.now)) is not None:
            self.do(action)

    def timer(self, waiting: int = 0, *, at: float | None = None) -> BridgeAction | None:
        """Move the clock to the machine's deadline (or ``at``) and run the timer there."""
        deadline = self.m.get_timer()
        assert deadline is not None
        self.now = max(self.now, deadline if at is None else at)
        outcome = self.m.handle_timer(self.now, waiting)
        if outcome is YIELD_LEASE:
            self.yielded += 1
        elif isinstance(outcome, EndSession):
            self.ended = outcome
        self.pump()
        return outcome


def leased(**kwargs: object) -> Rig:
    rig = Rig(**kwargs)  # type: ignore[arg-type]
    rig.grant()
    return rig


def port_request(command: int, value: bytes) -> bytes:
    return bytes([IAC, SB, COM_PORT_OPTION, command]) + value + bytes([IAC, SE])


# -- the hot paths -------------------------------------------------------------------------------------


def test_client_and_meter_bytes_pass_on_the_fast_paths_and_are_counted() -> None:
    rig = leased(baud=9600)
    assert rig.m.fast and rig.m.meter_fast
    rig.from_client(b"\x00\xff" * 10)
    rig.from_meter(b"answer")
    assert bytes(rig.line) == b"\x00\xff" * 10 and bytes(rig.client) == b"answer"
    assert (rig.m.bytes_c2m, rig.m.bytes_m2c) == (20, 6)
    assert rig.asks == 0 and rig.m.fast


def test_nothing_goes_to_the_line_without_a_lease() -> None:
    rig = Rig(baud=9600)
    assert not rig.m.fast
    rig.from_client(b"early")
    assert rig.line == b"" and list(rig.m.ops)
    rig.grant()
    rig.pump()
    assert bytes(rig.line) == b"early" and rig.m.fast


def test_the_line_model_drains_at_the_wire_rate_and_asks_the_driver_only_when_full() -> None:
    rig = leased(baud=9600, framing="8N1")  # 960 characters per second, queue limit 240 bytes
    assert rig.m.queue_limit_bytes == 240
    rig.from_client(b"x" * 200)
    assert rig.asks == 0
    rig.now += 0.1  # 96 bytes left the wire
    rig.from_client(b"y" * 100)  # 104 + 100 fits
    assert rig.asks == 0 and len(rig.line) == 300
    rig.driver_backlog = 200  # the driver agrees: the UART is really full
    rig.from_client(b"z" * 100)
    assert rig.asks == 1 and len(rig.line) == 300  # the pump must drain first
    rig.pump()
    assert rig.drains == 1 and bytes(rig.line).endswith(b"z" * 100)


def test_a_device_without_a_wire_speeds_the_model_up_to_its_cap() -> None:
    """A pty reports an empty queue while the model says full: the model learns (x4 per answer)."""
    rig = leased(baud=9600, framing="8N1")
    nominal = rig.m.cps
    for _ in range(40):
        rig.from_client(b"x" * 200)
    assert rig.drains == 0 and len(rig.line) == 8000  # never waited: the driver said empty each time
    assert rig.m.cps == nominal * MODEL_SPEEDUP_MAX
    rig.m.line_is(9600, "8N1", rig.now)  # a rate change starts from the nominal rate again
    assert rig.m.cps == nominal


def test_one_empty_answer_takes_the_model_to_its_cap_and_a_partial_one_by_four() -> None:
    """A driver that says "empty" while the model says full has no wire at this rate (a pty): the model
    goes to its cap at once, so a fast echo never fills it again; "half empty" only speeds it up x4."""
    rig = leased(baud=9600, framing="8N1")  # queue limit 240 bytes
    nominal = rig.m.cps
    rig.from_client(b"x" * 240)
    rig.driver_backlog = 100  # the UART sent more than the model thinks, but is not empty
    rig.from_client(b"y" * 10)
    assert rig.asks == 1 and rig.m.cps == nominal * 4 and len(rig.line) == 250
    rig.driver_backlog = 0
    rig.from_client(b"z" * 200)
    assert rig.asks == 2 and rig.m.cps == nominal * MODEL_SPEEDUP_MAX and len(rig.line) == 450
    for _ in range(1000):  # 200 bytes every 10 us (20 MB/s): the model is never full again
        rig.now += 10e-6
        rig.from_client(b"v" * 200)
    assert rig.asks == 2 and rig.drains == 0 and len(rig.line) == 450 + 200_000


def test_without_a_driver_count_the_pump_drains_when_the_model_is_full() -> None:
    rig = leased(baud=9600, framing="8N1", counts=False)
    rig.from_client(b"x" * 240)
    rig.from_client(b"y" * 10)
    assert rig.asks == 0 and len(rig.line) == 240
    rig.pump()
    assert rig.drains == 1 and bytes(rig.line) == b"x" * 240 + b"y" * 10


def test_a_big_queued_chunk_goes_out_in_pieces_of_the_queue_limit() -> None:
    rig = Rig(baud=9600, framing="8N1", counts=False)
    rig.from_client(bytes(range(256)) * 4)
    rig.grant()
    rig.pump()
    assert bytes(rig.line) == bytes(range(256)) * 4 and rig.drains == 4  # 240-byte pieces


def test_the_client_queue_is_bounded_and_reading_resumes_when_it_drains() -> None:
    rig = Rig(baud=9600)
    chunk = b"q" * 16384
    for _ in range(4):
        rig.from_client(chunk)
    assert not rig.client_paused and rig.m.queued_bytes == INBOUND_HIGH_BYTES
    rig.from_client(chunk)
    assert rig.client_paused and rig.m.reading_paused
    rig.grant()
    rig.pump()
    assert not rig.client_paused and len(rig.line) == 5 * len(chunk)


# -- deadlines -----------------------------------------------------------------------------------------


def test_idle_timeout_ends_the_session_and_traffic_moves_it() -> None:
    rig = leased(limits=SessionLimits(idle_timeout_s=300.0, lease_idle_s=30.0))
    start = rig.now
    rig.now += 200.0
    rig.from_client(b"x")
    for _ in range(400):  # lease-idle polls (nobody waits) until the idle timeout
        if rig.ended is not None:
            break
        rig.timer()
    assert rig.ended == EndSession("idle_timeout") and rig.now == pytest.approx(start + 500.0)
    assert rig.m.get_timer() is None  # an ended session has nothing due


def test_idle_timeout_zero_never_ends() -> None:
    rig = leased(limits=SessionLimits(idle_timeout_s=0.0, lease_max_s=0.0))
    for _ in range(50):
        rig.timer()
    assert rig.ended is None and rig.m.get_timer() == pytest.approx(rig.now + WAITER_POLL_S)


def test_without_the_line_the_idle_timeout_is_the_only_deadline() -> None:
    rig = Rig(limits=SessionLimits(idle_timeout_s=60.0))
    assert rig.m.get_timer() == pytest.approx(rig.now + 60.0)
    rig.now += 59.0
    assert rig.m.handle_timer(rig.now) is None
    rig.now += 1.0
    assert rig.m.handle_timer(rig.now) == EndSession("idle_timeout")


def test_lease_idle_yields_only_when_readouts_wait() -> None:
    rig = leased(limits=SessionLimits(lease_idle_s=30.0))
    rig.from_client(b"x")
    assert rig.m.get_timer() == pytest.approx(rig.now + 30.0)
    assert rig.timer(waiting=0) is None  # nobody waits: keep the line, look again each second
    assert rig.m.get_timer() == pytest.approx(rig.now + WAITER_POLL_S)
    assert rig.timer(waiting=1) is YIELD_LEASE
    rig.release(yielded=True)
    assert rig.m.yields == 1 and not rig.m.fast


def test_lease_idle_waits_for_the_queue_to_empty() -> None:
    rig = leased(limits=SessionLimits(lease_idle_s=30.0), counts=False, baud=9600)
    rig.now += 31.0
    rig.m.client_data(b"x" * 100, rig.now - 31.0)  # queued, not yet written
    assert rig.m.handle_timer(rig.now, 3) is None


def test_the_ei_client_yields_when_idle_even_without_waiters() -> None:
    rig = leased(limits=SessionLimits(lease_idle_s=30.0, release_when_idle=True, lazy_lease=True))
    assert rig.timer(waiting=0) is YIELD_LEASE


def test_lease_max_ends_a_session_that_never_pauses_while_readouts_wait() -> None:
    rig = leased(limits=SessionLimits(lease_max_s=900.0, lease_idle_s=30.0, idle_timeout_s=0.0))
    start = rig.now
    for _ in range(95):  # a byte every 10 s: never idle
        rig.now += 10.0
        rig.from_client(b"x")
        if rig.m.get_timer() <= rig.now:  # type: ignore[operator]
            rig.timer(waiting=0)
    assert rig.ended is None  # 950 s held, but nobody waited
    outcome = rig.timer(waiting=2, at=rig.now)
    assert outcome == EndSession("lease_max", f"held the line {rig.now - start:.0f} s while 2 waited")


def test_lease_max_zero_is_never() -> None:
    rig = leased(limits=SessionLimits(lease_max_s=0.0, lease_idle_s=30.0, idle_timeout_s=0.0))
    for _ in range(2000):
        rig.now += 1.0
        rig.from_client(b"x")
        rig.m.handle_timer(rig.now, 5)
    assert rig.ended is None


def _programming(rig: Rig) -> None:
    """Sign on in mode C, select programming at 9600 Bd: the line switches."""
    rig.from_client(REQUEST)
    rig.from_meter(IDENT_C)
    rig.from_client(PROGRAMMING)
    rig.pump()
    assert rig.settings[-1] == (9600, "7E1") and rig.m.sniffer is not None and rig.m.sniffer.programming


def test_iec_inactivity_takes_the_line_back_to_the_initial_rate() -> None:
    rig = leased(limits=SessionLimits(iec_inactivity_s=120.0, lease_idle_s=1000.0, idle_timeout_s=0.0))
    _programming(rig)
    assert not rig.m.fast and not rig.m.meter_fast  # the sniffer sees every byte now
    rig.now += 100.0
    rig.from_client(encode_command("R1", "1.8.0()"))  # traffic moves the deadline
    assert rig.m.get_timer() == pytest.approx(rig.now + 120.0)
    rig.timer()
    assert rig.settings[-1] == (300, "7E1") and rig.m.fast and rig.m.meter_fast
    assert rig.m.break_needed() is None  # the meter gave up by itself


def test_a_programming_session_left_open_needs_the_break_at_the_programming_rate() -> None:
    rig = leased()
    _programming(rig)
    send = rig.m.break_needed()
    assert send is not None and send.data == encode_break()
    assert send.timeout_s == pytest.approx(tx_time_s(len(encode_break()), 9600) + BREAK_DRAIN_S)
    rig.m.break_sent()
    assert rig.m.breaks_sent == 1 and rig.m.break_needed() is None


def test_two_breaks_when_the_client_stopped_inside_a_frame() -> None:
    rig = leased()
    _programming(rig)
    rig.from_client(encode_command("W1", "1.8.0(1)")[:-3])
    send = rig.m.break_needed()
    assert send is not None and send.data == encode_break() * 2


def test_mode_b_switches_after_the_identification_line() -> None:
    rig = leased()
    rig.from_client(REQUEST)
    rig.from_meter(IDENT_B + b"\x02")
    assert bytes(rig.client) == IDENT_B + b"\x02"
    rig.pump()
    assert rig.settings == [(2400, "7E1")]


def test_eof_lingers_for_the_meters_answer_then_ends() -> None:
    rig = leased(limits=SessionLimits(idle_timeout_s=0.0))
    rig.from_client(REQUEST)
    start = rig.now
    assert rig.m.client_done("client_closed", "", linger=True, now=rig.now) is None
    assert rig.m.get_timer() == pytest.approx(start + EOF_LINGER_S)
    rig.now += 1.0
    rig.from_meter(IDENT_C)  # the meter answers: the quiet starts again
    rig.timer()
    assert rig.ended == EndSession("client_closed") and rig.now == pytest.approx(start + 1.0 + EOF_LINGER_S)


def test_eof_linger_is_bounded_by_its_maximum() -> None:
    rig = leased(limits=SessionLimits(idle_timeout_s=0.0, lease_idle_s=1000.0))
    start = rig.now
    rig.m.client_done("client_closed", "", linger=True, now=rig.now)
    for _ in range(100):  # a chatty meter never lets the line go quiet
        rig.now += 1.0
        rig.from_meter(b"x")
        if rig.m.get_timer() <= rig.now:  # type: ignore[operator]
            rig.timer()
        if rig.ended is not None:
            break
    assert rig.ended == EndSession("client_closed") and rig.now == pytest.approx(start + EOF_LINGER_MAX_S)


def test_a_reset_ends_at_once_unless_bytes_are_queued() -> None:
    rig = leased(baud=9600, framing="8N1", counts=False)
    rig.from_client(b"x" * 240)
    rig.from_client(b"tail")
    assert rig.m.client_done("client_reset", "ECONNRESET", linger=False, now=rig.now) is None
    rig.pump()  # the queued tail still goes out, then the session ends
    assert bytes(rig.line).endswith(b"tail") and rig.ended == EndSession("client_reset", "ECONNRESET")


def test_the_first_end_reason_wins() -> None:
    rig = leased()
    assert rig.m.end("taken_over", "by 10.0.0.1") == EndSession("taken_over", "by 10.0.0.1")
    assert rig.m.end("stopping") == EndSession("taken_over", "by 10.0.0.1")
    assert rig.m.handle_timer(rig.now + 1e6) is None


# -- RFC 2217 ------------------------------------------------------------------------------------------


def rfc2217_rig() -> Rig:
    return leased(limits=SessionLimits(rfc2217=True), baud=300)


def test_rfc2217_negotiation_is_answered_in_order_and_data_unescaped() -> None:
    rig = rfc2217_rig()
    assert not rig.m.fast and not rig.m.meter_fast  # Telnet: every chunk is decoded
    rig.from_client(bytes([IAC, WILL, 1]) + b"ab" + bytes([IAC, IAC]) + bytes([IAC, DO, 5]))
    assert bytes(rig.client) == bytes([IAC, 254, 1, IAC, 252, 5])  # DONT ECHO, WONT 5
    assert bytes(rig.line) == b"ab\xff"
    rig.from_meter(b"\xff\x01")
    assert bytes(rig.client).endswith(b"\xff\xff\x01")  # IAC doubled to the client


def test_rfc2217_set_baudrate_switches_drained_and_answers_with_the_rate_in_force() -> None:
    rig = rfc2217_rig()
    rig.from_client(b"before" + port_request(SET_BAUDRATE, struct.pack("!I", 4800)) + b"after")
    assert bytes(rig.line) == b"before"  # the switch waits for the pump (drain first)
    rig.pump()
    assert rig.settings == [(4800, "7E1")] and bytes(rig.line) == b"beforeafter"
    assert rig.client.endswith(
        bytes([IAC, SB, COM_PORT_OPTION, 101]) + struct.pack("!I", 4800) + bytes([IAC, SE])
    )
    assert rig.m.client_line == (4800, "7E1") and rig.m.lease_settings() == (4800, "7E1")
    rig.client.clear()
    rig.from_client(port_request(SET_PARITY, b"\x01"))  # none
    rig.pump()
    assert rig.settings[-1] == (4800, "7N1")
    assert rig.client == bytes([IAC, SB, COM_PORT_OPTION, 103, 1, IAC, SE])


def test_rfc2217_flow_control_and_purge() -> None:
    rig = rfc2217_rig()
    rig.from_client(port_request(FLOWCONTROL_SUSPEND, b""))
    assert rig.meter_paused and rig.m.suspended
    rig.from_client(port_request(FLOWCONTROL_RESUME, b""))
    assert not rig.meter_paused
    rig.from_client(port_request(PURGE_DATA, b"\x01"))
    assert rig.flushes == 1 and rig.client.endswith(bytes([IAC, SB, COM_PORT_OPTION, 112, 1, IAC, SE]))


def test_a_client_set_rate_turns_the_sniffer_and_the_break_off() -> None:
    rig = rfc2217_rig()
    rig.from_client(port_request(SET_BAUDRATE, struct.pack("!I", 9600)))
    rig.pump()
    rig.from_client(REQUEST)
    rig.from_meter(IDENT_B)
    rig.pump()
    assert rig.settings == [(9600, "7E1")]  # no mode B switch: the client drives the line
    assert rig.m.break_needed() is None


def test_bits_per_char() -> None:
    assert (bits_per_char("7E1"), bits_per_char("8N1"), bits_per_char("8E2")) == (10, 10, 12)


# -- properties ---------------------------------------------------------------------------------------

_IEC_BITS = [
    REQUEST,
    IDENT_C,
    IDENT_B,
    PROGRAMMING,
    b"\x06050\r\n",
    encode_break(),
    b"\x15",
    b"\x02",
    b"\x03x",
]
_sizes = st.one_of(st.integers(1, 16), st.integers(17, 300))  # small and larger than a queue limit
_chunks = st.one_of(_sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n)), st.sampled_from(_IEC_BITS))
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("c"), _chunks),
        st.tuples(st.just("m"), _chunks),
        st.tuples(st.just("t"), st.integers(0, 3)),
        st.tuples(st.just("p"), st.just(0)),
        st.tuples(st.just("y"), st.just(0)),
        st.tuples(st.just("w"), st.floats(0.0, 5.0)),
        st.tuples(st.just("b"), st.integers(0, 4000)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=_steps,
    iec=st.booleans(),
    counts=st.booleans(),
    baud=st.sampled_from([300, 9600, 115200]),
    framing=st.sampled_from(["7E1", "8N1"]),
)
def test_random_streams_and_timers_never_raise_and_pass_every_byte_in_order(
    steps: list[tuple[str, object]], iec: bool, counts: bool, baud: int, framing: str
) -> None:
    """Whatever the client and the meter send and whenever timers run, leases come and go: the line
    receives exactly the client's bytes and the client exactly the meter's, in order, untouched."""
    limits = SessionLimits(iec_aware=iec, idle_timeout_s=0.0, lease_idle_s=3.0, lease_max_s=10.0)
    rig = Rig(limits=limits, baud=baud, framing=framing, counts=counts)
    rig.grant()
    sent_c = bytearray()
    sent_m = bytearray()
    holding = True
    for kind, value in steps:
        if kind == "c":
            assert isinstance(value, bytes)
            sent_c += value
            rig.from_client(value)
        elif kind == "m" and holding:  # only a held line has meter bytes for the session
            assert isinstance(value, bytes)
            sent_m += value
            rig.from_meter(value)
        elif kind == "t" and holding:
            outcome = rig.m.handle_timer(rig.now, int(str(value)))
            if outcome is YIELD_LEASE:
                rig.release(yielded=True)
                holding = False
            elif isinstance(outcome, EndSession):
                rig.m.reason = None  # keep the session going: the property is about the bytes
        elif kind == "p" and holding:
            rig.pump()
        elif kind == "y":
            if holding:
                rig.release(yielded=True)
            else:
                rig.grant()
            holding = not holding
        elif kind == "w":
            rig.now += float(str(value))
        elif kind == "b":
            rig.driver_backlog = int(str(value))
        assert rig.m.get_timer() is None or isinstance(rig.m.get_timer(), float)
    if not holding:
        rig.grant()
    rig.driver_backlog = 0
    rig.pump()
    assert bytes(rig.line) == bytes(sent_c)
    assert bytes(rig.client) == bytes(sent_m)
    assert rig.m.bytes_c2m == len(sent_c) and rig.m.bytes_m2c == len(sent_m)
    assert not rig.m.ops and rig.m.queued_bytes == 0


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(_chunks, max_size=30), cut=st.integers(1, 64))
def test_telnet_payload_reaches_the_line_in_order(chunks: list[bytes], cut: int) -> None:
    """RFC 2217 sessions: whatever the client sends split anywhere, the line receives the payload that
    Telnet decoding gives for the whole stream, in order, and nothing raises."""
    from dcud.codec.rfc2217 import ClientData, Rfc2217Server

    stream = b"".join(chunks)
    expected = b"".join(e.data for e in Rfc2217Server().receive(stream) if isinstance(e, ClientData))
    rig = leased(limits=SessionLimits(rfc2217=True, iec_aware=False), baud=115200, framing="8N1")
    for off in range(0, len(stream), cut):
        rig.from_client(stream[off : off + cut])
        rig.pump()
    rig.pump()
    assert bytes(rig.line) == expected
