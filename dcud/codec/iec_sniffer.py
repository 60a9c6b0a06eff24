"""IEC 62056-21 awareness for transparent sessions, sans-I/O: when must the UART change speed?

A transparent session passes a head-end client's bytes to a meter line untouched. When that client runs
an IEC 62056-21 sign-on through the port, the meter changes its speed in the middle of the exchange, and
the DCU's UART must follow or the rest of the session is garbage. :class:`IecSniffer` watches both
directions and tells the I/O layer *where* in the byte stream the line must switch:

- ``from_client(data, now)`` / ``from_meter(data, now)`` return the same bytes, in order, as
  :class:`Forward` pieces, with :class:`SwitchLine` markers between them: "drain what was written so far,
  then run the line at ``baud``/``framing``". Concatenating the ``Forward`` pieces always gives back the
  input exactly (transparency never depends on the sniffer understanding anything);
- ``next_deadline()`` / ``handle_timer(now)`` bring the line back to the session's initial speed when
  the meter has gone back by itself (a readout is over, the meter timed out).

What is recognised (protocols.md section 1):

========================  =========================================================================
exchange                  what the sniffer does
========================  =========================================================================
mode C / E sign-on        client ``/?addr!CRLF`` -> meter ``/XXXZ ident CRLF`` -> client
                          ``ACK V Z Y CRLF``: after the option select has been written (drained),
                          switch to the Z rate (``Y = 2``, HDLC: also to 8N1). A Z above the meter's
                          own rate, or no option select within ``option_window_s``, means the meter
                          stays at the initial speed: no switch.
mode B sign-on            ident with ``A``..``F``: switch right after the identification line.
mode A / D                no switch.
readout (``Y = 0``)       data message ``STX .. ETX BCC`` (BCC checked and counted); a NAK asks for a
                          repeat at the data rate; after ``after_readout_s`` without NAK, or a new
                          ``/`` sign-on from the client, back to the initial speed.
programming (``Y = 1``,   client frames are tracked; after a break ``SOH B0 ETX BCC`` (or the meter's
``6``..``9``)             answer to ``B1``) or ``programming_idle_s`` of silence, back to initial.
HDLC (``Y = 2``)          client ``DISC`` answered by the meter's ``UA`` or ``DM``, or
                          ``hdlc_idle_s`` of silence: back to initial speed and framing.
========================  =========================================================================

Anything else (DLMS wrapper traffic, M-Bus frames, garbage) matches none of these exchanges and passes
without a switch: a false sign-on would need an exact request line from the client *and* a valid
identification line from the meter in the right order. The sniffer never raises on input; it has no
error path at all, because a transparent port must carry whatever the peers send.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from dcud.codec.iec62056 import (
    ACK,
    MAX_IDENT_LINE_BYTES,
    MODE_B_BAUD,
    MODE_C_BAUD,
    NAK,
    REACTION_MAX_S,
    SOH,
    STX,
    compute_bcc,
    parse_identification,
    parse_option_select,
    tx_time_s,
)
from dcud.errors import DcudError

__all__ = [
    "CLIENT_SHORTCUT",
    "Forward",
    "IecSniffer",
    "SnifferAction",
    "SnifferState",
    "SnifferStats",
    "SnifferTimings",
    "SwitchLine",
]

EOT = 0x04
HDLC_FLAG = 0x7E
_REQUEST_RE = re.compile(rb"/\?[0-9A-Za-z ]{0,32}!\r\n")
_PREFIX_RE = re.compile(rb"/(?:\?[0-9A-Za-z ]{0,32}(?:!\r?)?)?")
"""What a request split across chunks can end with: its start, up to (not including) the final LF."""
_SHORTCUT_STOP_RE = re.compile(rb"/(?:\?|\Z)")
"""A ``/?`` anywhere or a ``/`` at the end: the chunk may start a request (a regex: ``in`` is 2x slower)."""
CLIENT_SHORTCUT = _SHORTCUT_STOP_RE.search
"""``CLIENT_SHORTCUT(data) is None`` while :attr:`IecSniffer.resting`: ``data`` changes nothing (the
bridge's per-chunk test, one C call: see :meth:`IecSniffer.client_passes`)."""
_MAX_REQUEST_BYTES = 37
"""``/?`` + 32 address characters + ``!CRLF``."""
_END_RE = re.compile(rb"[\x03\x04]")
_HDLC_DISC = 0x43
_HDLC_UA = 0x63
_HDLC_DM = 0x0F
_HDLC_POLL_BIT = 0x10


@dataclass(frozen=True, slots=True)
class Forward:
    """Bytes to pass on unchanged."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SwitchLine:
    """Drain what was written so far, then run the line at ``baud`` and ``framing``."""

    baud: int
    framing: str
    reason: str


SnifferAction = Forward | SwitchLine


class SnifferState(enum.StrEnum):
    """Where the sniffer believes the client/meter exchange is."""

    IDLE = "idle"
    WAIT_IDENT = "wait_ident"
    WAIT_OPTION = "wait_option"
    READOUT = "readout"
    AFTER_READOUT = "after_readout"
    PROGRAMMING = "programming"
    BREAK_WAIT = "break_wait"
    HDLC = "hdlc"


_IDLE = SnifferState.IDLE
_SWITCHED = frozenset(
    {
        SnifferState.READOUT,
        SnifferState.AFTER_READOUT,
        SnifferState.PROGRAMMING,
        SnifferState.BREAK_WAIT,
        SnifferState.HDLC,
    }
)


@dataclass(frozen=True, slots=True)
class SnifferTimings:
    """How long each state lasts without traffic before the meter is taken to have given up (seconds).

    ``ident_timeout_s`` is added to the wire time of a maximal identification line at the current rate.
    """

    ident_timeout_s: float = REACTION_MAX_S + 0.5
    option_window_s: float = 2.2
    """The meter's tt: an option select later than this is not taken any more (1.5 < tt <= 2.2 s)."""
    readout_idle_s: float = 3.0
    after_readout_s: float = 1.5
    programming_idle_s: float = 120.0
    """The meter drops back to sign-on after 60..120 s without a command."""
    hdlc_idle_s: float = 120.0


@dataclass(slots=True)
class SnifferStats:
    """What the sniffer saw, for the session's audit record."""

    signons: int = 0
    switches: int = 0
    readouts: int = 0
    bcc_errors: int = 0


@dataclass(slots=True)
class _Hdlc:
    """Header tracker of one direction of IEC 62056-46 HDLC frames (no byte stuffing: length-counted)."""

    remaining: int = -1
    """-1: between frames (waiting for a flag or a format byte); else bytes left in this frame."""
    header: bytearray = field(default_factory=bytearray)
    control: int | None = None

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """Track frames; returns ``(end_index, control)`` for every frame completed in ``data``."""
        done: list[tuple[int, int]] = []
        i = 0
        n = len(data)
        while i < n:
            if self.remaining < 0:
                byte = data[i]
                if byte == HDLC_FLAG:
                    self.header.clear()
                    i += 1
                    continue
                self.header.append(byte)
                if len(self.header) == 2:
                    first, second = self.header
                    if first & 0xF0 != 0xA0:
                        self.header.clear()  # not a frame format field: wait for the next flag
                    else:
                        self.remaining = ((first & 0x07) << 8 | second) - 2
                        self.control = None
                        if self.remaining <= 0:
                            self.remaining = -1
                            self.header.clear()
                i += 1
                continue
            take = min(self.remaining, n - i)
            if self.control is None:
                for byte in data[i : i + take]:
                    self.header.append(byte)
                    control = _hdlc_control(self.header)
                    if control is not None:
                        self.control = control
                        break
                    if len(self.header) > 12:
                        self.control = -1
                        break
            self.remaining -= take
            i += take
            if self.remaining == 0:
                done.append((i, self.control if self.control is not None else -1))
                self.remaining = -1
                self.header.clear()
        return done


def _hdlc_control(header: bytearray) -> int | None:
    """The control byte after format (2 bytes), destination and source addresses, once known."""
    pos = 2
    for _ in range(2):  # destination, then source address: bytes up to one with the low bit set
        while True:
            if pos >= len(header):
                return None
            last = header[pos] & 0x01
            pos += 1
            if last:
                break
    if pos >= len(header):
        return None
    return header[pos]


class IecSniffer:
    """Follows IEC 62056-21 sign-ons through a transparent session (see the module docstring).

    ``initial_baud``/``initial_framing`` are the session's resting settings (``tm.baud`` and the line's
    framing); the sniffer assumes the line runs at them after construction and after :meth:`reset`.
    """

    def __init__(
        self,
        initial_baud: int,
        initial_framing: str = "7E1",
        timings: SnifferTimings | None = None,
    ) -> None:
        self.initial_baud = initial_baud
        self.initial_framing = initial_framing
        self.timings = timings or SnifferTimings()
        self.stats = SnifferStats()
        self.baud = initial_baud
        self.framing = initial_framing
        self.state = SnifferState.IDLE
        self._deadline: float | None = None
        self._tail = b""
        self._ident_buf = bytearray()
        self._ident_rate = 0
        self._option = bytearray()
        self._rx_phase = 0  # readout data message: 0 wait STX, 1 in block, 2 expect BCC
        self._rx_bcc = 0
        self._prog_phase = 0  # programming client frame: 0 outside, 1 inside, 2 expect BCC
        self._prog_head = bytearray()
        self._hdlc_client = _Hdlc()
        self._hdlc_meter = _Hdlc()
        self._disc_pending = False

    # -- public API ----------------------------------------------------------------------------

    def reset(self) -> None:
        """The line is back at the initial settings (a new lease): forget every exchange in progress."""
        self.baud = self.initial_baud
        self.framing = self.initial_framing
        self._to_idle()

    @property
    def programming(self) -> bool:
        """True while the meter is in programming mode (it may hold a password session open).

        Whoever ends the exchange early (a bridge session that ends, or hands the line over) must send
        the break ``SOH B0 ETX BCC`` at the current rate, or the next master inherits the session.
        """
        return self.state is SnifferState.PROGRAMMING or self.state is SnifferState.BREAK_WAIT

    @property
    def client_frame_open(self) -> bool:
        """True when the client's last programming frame stopped before its BCC (it ended mid-frame).

        The meter then takes the next bytes as the rest of that frame: a break sent now is swallowed
        by it (and fails the BCC), so a second break is needed.
        """
        return self.state is SnifferState.PROGRAMMING and self._prog_phase != 0

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must run (absolute, same clock as ``now``), or None."""
        return self._deadline

    def handle_timer(self, now: float) -> list[SnifferAction]:
        """The meter has timed out: back to the initial settings if the line was switched."""
        if self._deadline is None or now < self._deadline:
            return []
        out: list[SnifferAction] = []
        if self.state in _SWITCHED:
            self._back_to_initial(out, f"meter timeout in {self.state}")
        self._to_idle()
        return out

    @property
    def resting(self) -> bool:
        """Idle with nothing held over from the last client chunk: client bytes in which
        :data:`CLIENT_SHORTCUT` finds nothing pass unchanged and leave the state as it is."""
        return self.state is _IDLE and not self._tail

    def client_passes(self, data: bytes) -> bool:
        """True when ``data`` from the client changes nothing here and goes to the meter as it is.

        The bridge's per-chunk shortcut (no action list built): idle, no request start held over
        from the previous chunk, no ``/?`` in ``data`` and no ``/`` at its end that the next chunk
        could continue. :meth:`from_client` would return ``[Forward(data)]`` and keep the same state.
        (Meter bytes in the idle state are always just forwarded: ``state is SnifferState.IDLE`` is
        that shortcut.)
        """
        return self.state is _IDLE and not self._tail and _SHORTCUT_STOP_RE.search(data) is None

    def from_client(self, data: bytes, now: float) -> list[SnifferAction]:
        """Client -> meter bytes; the Forward pieces concatenate to ``data``."""
        out: list[SnifferAction] = []
        start = 0
        i = 0
        n = len(data)
        while i < n:
            state = self.state
            if state in _SWITCHED:
                self._deadline_from_traffic(now)
            if state in (SnifferState.IDLE, SnifferState.WAIT_IDENT):
                end = self._find_request(data, i)
                if end < 0:
                    break
                i = end
                self._signed_on(now)
                continue
            if state is SnifferState.WAIT_OPTION:
                i, start = self._client_option(data, i, now, out, start)
                continue
            if state in (SnifferState.READOUT, SnifferState.AFTER_READOUT):
                j = i
                while j < n and data[j] not in (NAK, 0x2F):
                    j += 1
                if j == n:
                    break
                if data[j] == NAK:
                    self.state = SnifferState.READOUT
                    self._rx_phase = 0
                    self._deadline = now + self.timings.readout_idle_s
                    i = j + 1
                    continue
                start = self._flush_then_back(out, data, start, j, "new sign-on")
                i = j
                continue
            if state is SnifferState.PROGRAMMING:
                i, start = self._client_programming(data, i, now, out, start)
                continue
            if state is SnifferState.BREAK_WAIT:
                break
            if state is SnifferState.HDLC:
                for _end, control in self._hdlc_client.feed(data[i:]):
                    if control >= 0 and control & ~_HDLC_POLL_BIT & 0xFF == _HDLC_DISC:
                        self._disc_pending = True
                break
        if start < n:
            out.append(Forward(data[start:] if start else data))
        self._remember_tail(data)
        return out

    def from_meter(self, data: bytes, now: float) -> list[SnifferAction]:
        """Meter -> client bytes; the Forward pieces concatenate to ``data``."""
        out: list[SnifferAction] = []
        state = self.state
        if state in _SWITCHED:
            self._deadline_from_traffic(now)
        split = -1
        if state is SnifferState.WAIT_IDENT:
            split = self._meter_ident(data, now)
        elif state is SnifferState.WAIT_OPTION:
            self._to_idle()  # the meter went ahead without an option select (tt expired): no switch
        elif state is SnifferState.READOUT:
            self._meter_readout(data, now)
        elif state is SnifferState.BREAK_WAIT:
            out.append(Forward(data))
            self._back_to_initial(out, "break acknowledged")
            self._to_idle()
            return out
        elif state is SnifferState.HDLC and self._disc_pending:
            for end, control in self._hdlc_meter.feed(data):
                base = control & ~_HDLC_POLL_BIT & 0xFF if control >= 0 else -1
                if base in (_HDLC_UA, _HDLC_DM):
                    if end:
                        out.append(Forward(data[:end]))
                    self._back_to_initial(out, "HDLC disconnected")
                    self._to_idle()
                    if end < len(data):
                        out.append(Forward(data[end:]))
                    return out
        elif state is SnifferState.HDLC:
            self._hdlc_meter.feed(data)
        if split >= 0:
            # Mode B: the meter switched right after its identification line.
            if split:
                out.append(Forward(data[:split]))
            out.append(SwitchLine(self.baud, self.framing, "mode B identification"))
            if split < len(data):
                out.append(Forward(data[split:]))
                self._meter_readout(data[split:], now)
            return out
        out.append(Forward(data))
        return out

    # -- client side helpers -------------------------------------------------------------------

    def _find_request(self, data: bytes, i: int) -> int:
        """End index (in ``data``) of the first complete sign-on request ending at or after ``i``."""
        tail = self._tail if i == 0 else b""
        buf = tail + data[i:] if tail else data[i:]
        match = _REQUEST_RE.search(buf)
        if match is None:
            return -1
        return i + match.end() - len(tail)

    def _remember_tail(self, data: bytes) -> None:
        """Keep the end of the client stream that may be the start of a request split across chunks."""
        if self.state not in (SnifferState.IDLE, SnifferState.WAIT_IDENT):
            self._tail = b""
            return
        joined = self._tail + data if len(data) < _MAX_REQUEST_BYTES else data
        window = joined[-_MAX_REQUEST_BYTES:]
        slash = window.rfind(b"/")
        # Only what can still grow into a request is kept: binary traffic (DLMS) is full of "/"
        # bytes, and a tail kept for each would take every next chunk off the bridge's shortcut.
        self._tail = window[slash:] if slash >= 0 and _PREFIX_RE.fullmatch(window, slash) else b""

    def _signed_on(self, now: float) -> None:
        self.state = SnifferState.WAIT_IDENT
        self.stats.signons += 1
        self._ident_buf.clear()
        self._tail = b""
        self._deadline = now + self.timings.ident_timeout_s + tx_time_s(MAX_IDENT_LINE_BYTES, self.baud)

    def _client_option(
        self, data: bytes, i: int, now: float, out: list[SnifferAction], start: int
    ) -> tuple[int, int]:
        """Collect the option select; on success insert the switch after it. Returns (next, start)."""
        need = 6 - len(self._option)
        piece = data[i : i + need]
        if not self._option and piece[:1] != bytes([ACK]):
            self._to_idle()  # something else than an option select: the meter stays where it is
            return i, start
        self._option += piece
        i += len(piece)
        if len(self._option) < 6:
            return i, start
        frame = bytes(self._option)
        self._option.clear()
        try:
            option = parse_option_select(frame)
        except DcudError:
            self._to_idle()
            return i, start
        rate = option.baud
        if rate is None or rate > self._ident_rate:
            self._to_idle()  # the meter refuses and reads out at the initial speed
            return i, start
        framing = "8N1" if option.mode_control == "2" else self.framing
        if option.mode_control == "0":
            self.state = SnifferState.READOUT
            self._rx_phase = 0
            self._deadline = now + self.timings.readout_idle_s
        elif option.mode_control == "2":
            self.state = SnifferState.HDLC
            self._hdlc_client = _Hdlc()
            self._hdlc_meter = _Hdlc()
            self._disc_pending = False
            self._deadline = now + self.timings.hdlc_idle_s
        else:
            self.state = SnifferState.PROGRAMMING
            self._prog_phase = 0
            self._prog_head.clear()
            self._deadline = now + self.timings.programming_idle_s
        if rate != self.baud or framing != self.framing:
            if i > start:
                out.append(Forward(data[start:i]))
            self.baud = rate
            self.framing = framing
            self.stats.switches += 1
            out.append(SwitchLine(rate, framing, f"option select {frame[1:4].decode('ascii')}"))
            return i, i
        return i, start

    def _client_programming(
        self, data: bytes, i: int, now: float, out: list[SnifferAction], start: int
    ) -> tuple[int, int]:
        n = len(data)
        while i < n:
            byte = data[i]
            phase = self._prog_phase
            if phase == 0:
                if byte in (SOH, STX):
                    self._prog_phase = 1
                    self._prog_head = bytearray([byte])
                elif byte == 0x2F:
                    start = self._flush_then_back(out, data, start, i, "new sign-on")
                    return i, start
                i += 1
            elif phase == 1:
                match = _END_RE.search(data, i)
                stop = match.start() if match else n
                if len(self._prog_head) < 3:
                    self._prog_head += data[i : min(stop, i + 3 - len(self._prog_head))]
                if match is None:
                    return n, start
                self._prog_phase = 2
                i = stop + 1
            else:
                self._prog_phase = 0
                i += 1
                head = bytes(self._prog_head)
                if head == b"\x01B0":
                    if i > start:
                        out.append(Forward(data[start:i]))
                    self._back_to_initial(out, "break")
                    self._to_idle()
                    return i, i
                if head == b"\x01B1":
                    self.state = SnifferState.BREAK_WAIT
                    self._deadline = now + REACTION_MAX_S
                    return n, start
        return i, start

    def _flush_then_back(self, out: list[SnifferAction], data: bytes, start: int, at: int, why: str) -> int:
        """Forward ``data[start:at]``, go back to initial settings (before ``at``); returns new start."""
        if at > start:
            out.append(Forward(data[start:at]))
        self._back_to_initial(out, why)
        self._to_idle()
        return at

    # -- meter side helpers --------------------------------------------------------------------

    def _meter_ident(self, data: bytes, now: float) -> int:
        """Collect the identification line; returns the index in ``data`` just after it, else -1."""
        buf = self._ident_buf
        offset = len(buf)  # index in buf where data starts
        buf += data
        while True:
            slash = buf.find(b"/")
            if slash < 0:
                offset -= len(buf)
                buf.clear()
                return -1
            if slash:
                del buf[:slash]
                offset -= slash
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > 2 * MAX_IDENT_LINE_BYTES:
                    self._to_idle()
                return -1
            line = bytes(buf[: eol + 2])
            del buf[: eol + 2]
            offset -= eol + 2
            if line.startswith(b"/?"):
                continue  # our own request echoed by a half-duplex converter
            try:
                ident = parse_identification(line)
            except DcudError:
                self._to_idle()
                return -1
            end_in_data = -offset
            self._ident_buf.clear()
            if ident.mode in ("C", "E"):
                self.state = SnifferState.WAIT_OPTION
                self._ident_rate = MODE_C_BAUD[ident.baud_char]
                self._option.clear()
                self._deadline = now + self.timings.option_window_s
                return -1
            if ident.mode == "B":
                rate = MODE_B_BAUD[ident.baud_char]
                self.state = SnifferState.READOUT
                self._rx_phase = 0
                self._deadline = now + self.timings.readout_idle_s
                if rate != self.baud:
                    self.baud = rate
                    self.stats.switches += 1
                    return max(0, min(end_in_data, len(data)))
                return -1
            self._to_idle()  # mode A/D: the readout comes at the initial speed
            return -1

    def _meter_readout(self, data: bytes, now: float) -> None:
        """Follow ``STX block ETX BCC``; a complete message opens the NAK window."""
        i = 0
        n = len(data)
        while i < n:
            if self._rx_phase == 0:
                stx = data.find(b"\x02", i)
                if stx < 0:
                    return
                self._rx_phase = 1
                self._rx_bcc = 0
                i = stx + 1
            elif self._rx_phase == 1:
                match = _END_RE.search(data, i)
                stop = match.end() if match else n
                if stop > i:
                    self._rx_bcc ^= compute_bcc(data[i:stop])
                if match is None:
                    return
                i = stop
                self._rx_phase = 2
            else:
                bcc = data[i]
                i += 1
                self._rx_phase = 0
                self.stats.readouts += 1
                if bcc != self._rx_bcc:
                    self.stats.bcc_errors += 1
                self.state = SnifferState.AFTER_READOUT
                self._deadline = now + self.timings.after_readout_s
                return

    # -- state helpers -------------------------------------------------------------------------

    def _deadline_from_traffic(self, now: float) -> None:
        state = self.state
        if state is SnifferState.READOUT:
            self._deadline = now + self.timings.readout_idle_s
        elif state is SnifferState.PROGRAMMING:
            self._deadline = now + self.timings.programming_idle_s
        elif state is SnifferState.HDLC:
            self._deadline = now + self.timings.hdlc_idle_s

    def _back_to_initial(self, out: list[SnifferAction], why: str) -> None:
        if self.baud != self.initial_baud or self.framing != self.initial_framing:
            self.baud = self.initial_baud
            self.framing = self.initial_framing
            self.stats.switches += 1
            out.append(SwitchLine(self.initial_baud, self.initial_framing, f"back to initial: {why}"))

    def _to_idle(self) -> None:
        self.state = SnifferState.IDLE
        self._deadline = None
        self._tail = b""
        self._ident_buf.clear()
        self._option.clear()
        self._rx_phase = 0
        self._prog_phase = 0
        self._disc_pending = False
