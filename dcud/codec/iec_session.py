"""Sans-I/O IEC 62056-21 data readout session (modes A, B and C), h11/aioquic style.

The session never touches a port or a clock. The I/O layer calls :meth:`IecReadout.start`,
:meth:`IecReadout.receive_data` with every chunk read from the line, and :meth:`IecReadout.handle_timer`
once :meth:`IecReadout.next_deadline` has passed; each returns a list of actions to carry out in order:

- :class:`SetBaud` -- reconfigure the port (still 7E1);
- :class:`Flush` -- drop whatever sits in the input buffer;
- :class:`Send` -- write bytes;
- :class:`Drain` -- wait until the UART has put every written byte on the wire (tcdrain);
- :class:`Done` / :class:`Failed` -- the session is over.

Mode C: sign-on at ``initial_baud``, identification, wait tr_min (20 or 200 ms), ``ACK 0 Z 0``, Drain,
SetBaud(Z, capped by ``max_baud``), data message, BCC check, NAK for a repeat up to ``max_naks`` times.
Mode A stays at the initial rate; mode B switches by itself after its identification; mode E (``\\2``)
fails with :class:`~dcud.codec.iec62056.HdlcModeRequiredError` (DLMS over HDLC: see
:mod:`dcud.codec.dlms.mode_e`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.actions import Done, Drain, Failed, Flush, Send, SetBaud
from dcud.codec.iec62056 import (
    DEFAULT_MAX_MESSAGE_BYTES,
    INTER_CHAR_MAX_S,
    MODE_C_BAUD,
    NAK,
    REACTION_MAX_S,
    Ack,
    BccError,
    BccMode,
    CommandMessage,
    DataMessage,
    DataSet,
    HdlcModeRequiredError,
    Identification,
    IecReceiver,
    Message,
    Nak,
    OptionSelect,
    P1Telegram,
    Request,
    dataset_values,
    encode_option_select,
    encode_request,
    tx_time_s,
)
from dcud.errors import DcudError, LocalProtocolError, NegativeResponse, PeerTimeout, RemoteProtocolError


@dataclass(frozen=True)
class IecReadoutResult:
    """Outcome of one readout.

    ``raw`` is the data message exactly as received (STX .. BCC), for the FTP push; ``bcc_ok`` is true
    when the BCC was checked and matched, false for meters configured with ``bcc_mode="none"``.
    ``baud`` is the rate the data message came at, ``naks`` how many repeats were requested.
    """

    ident: Identification
    raw: bytes
    datasets: list[DataSet]
    bcc_ok: bool
    baud: int = 300
    naks: int = 0

    def to_values(self) -> list[dict[str, str | float | None]]:
        """``{"id", "value", "unit", "raw"}`` per value: float values when numeric, SI-style units."""
        return dataset_values(self.datasets)


Action = Send | Drain | SetBaud | Flush | Done[IecReadoutResult] | Failed

_IDLE = "idle"
_WAIT_IDENT = "wait_ident"
_WAIT_ACK_DELAY = "wait_ack_delay"
_WAIT_DATA = "wait_data"
_WAIT_NAK_DELAY = "wait_nak_delay"
_DONE = "done"
_FAILED = "failed"


def capped_baud_char(baud_char: str, max_baud: int | None) -> str:
    """Highest mode C baud character not above ``baud_char`` nor ``max_baud`` (``"0"`` at least)."""
    if max_baud is None:
        return baud_char
    limit = min(MODE_C_BAUD[baud_char], max_baud)
    best = "0"
    for ch, rate in MODE_C_BAUD.items():
        if rate <= limit:
            best = max(best, ch)
    return best


class IecReadout:
    """One IEC 62056-21 data readout of the meter at ``address`` (see the module docstring).

    ``bcc_mode`` is per meter: ``"xor"`` (standard), ``"sum7"`` (Kamstrup MULTICAL 66) or ``"none"``.
    Timeouts: ``reaction_timeout_s`` from the end of our message (its line time is added) to the first
    byte of the answer, ``inter_char_timeout_s`` between bytes of one answer.
    """

    def __init__(
        self,
        address: str = "",
        initial_baud: int = 300,
        max_baud: int | None = None,
        bcc_mode: BccMode = "xor",
        max_naks: int = 3,
        *,
        reaction_timeout_s: float = REACTION_MAX_S,
        inter_char_timeout_s: float = INTER_CHAR_MAX_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if initial_baud <= 0 or (max_baud is not None and max_baud <= 0):
            raise LocalProtocolError("baud rates must be positive")
        if max_naks < 0:
            raise LocalProtocolError("max_naks must be >= 0")
        if reaction_timeout_s <= 0 or inter_char_timeout_s <= 0:
            raise LocalProtocolError("timeouts must be positive")
        self.address = address
        self.initial_baud = initial_baud
        self.max_baud = max_baud
        self.bcc_mode: BccMode = bcc_mode
        self.max_naks = max_naks
        self.reaction_timeout_s = reaction_timeout_s
        self.inter_char_timeout_s = inter_char_timeout_s
        self._request = encode_request(address)
        self._receiver = IecReceiver(side="master", bcc_mode=bcc_mode, max_message_bytes=max_message_bytes)
        self._state = _IDLE
        self._deadline: float | None = None
        self._last_rx_s = 0.0
        self._baud = initial_baud
        self._ident: Identification | None = None
        self._naks = 0

    @property
    def state(self) -> str:
        """Current state name (for status reports and tests)."""
        return self._state

    @property
    def baud(self) -> int:
        """Rate the session expects the line to run at now."""
        return self._baud

    @property
    def discarded_bytes(self) -> int:
        """Bytes received outside any message (line noise, echoes of our own messages)."""
        return self._receiver.discarded_bytes

    def start(self, now: float) -> list[Action]:
        """Begin: set the sign-on rate, flush stale input, send the request."""
        if self._state != _IDLE:
            raise LocalProtocolError("readout already started")
        self._state = _WAIT_IDENT
        self._deadline = now + tx_time_s(len(self._request), self._baud) + self.reaction_timeout_s
        return [SetBaud(self._baud), Flush(), Send(self._request)]

    def next_deadline(self) -> float | None:
        """Absolute time at which :meth:`handle_timer` must be called, or None when nothing is pending."""
        if self._state in (_IDLE, _DONE, _FAILED):
            return None
        if self._state in (_WAIT_IDENT, _WAIT_DATA) and self._receiver.in_message:
            return self._last_rx_s + self.inter_char_timeout_s
        return self._deadline

    def receive_data(self, data: bytes, now: float) -> list[Action]:
        """Feed bytes read from the line at time ``now``."""
        if self._state in (_IDLE, _DONE, _FAILED) or not data:
            return []
        self._last_rx_s = now
        self._receiver.receive_data(data)
        actions: list[Action] = []
        while self._state not in (_DONE, _FAILED):
            try:
                msg = self._receiver.next_message()
            except BccError as exc:
                actions += self._on_bad_bcc(exc, now)
                continue
            except (RemoteProtocolError, NegativeResponse) as exc:
                actions += self._fail(exc)
                break
            if msg is None:
                break
            actions += self._on_message(msg, now)
        return actions

    def handle_timer(self, now: float) -> list[Action]:
        """Act on an expired deadline (send the delayed ACK/NAK, or time out)."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        state = self._state
        if state == _WAIT_ACK_DELAY:
            return self._send_option_select(now)
        if state == _WAIT_NAK_DELAY:
            self._state = _WAIT_DATA
            self._deadline = now + tx_time_s(1, self._baud) + self.reaction_timeout_s
            return [Send(bytes([NAK]))]
        if self._receiver.in_message:
            return self._fail(PeerTimeout(f"inter-character timeout ({self.inter_char_timeout_s} s)"))
        what = "identification" if state == _WAIT_IDENT else "data message"
        return self._fail(
            PeerTimeout(f"no {what} from meter {self.address!r} within {self.reaction_timeout_s} s")
        )

    # -- internals ------------------------------------------------------------------------------------

    def _fail(self, error: DcudError) -> list[Action]:
        self._state = _FAILED
        self._deadline = None
        return [Failed(error)]

    def _on_message(self, msg: Message, now: float) -> list[Action]:
        if isinstance(msg, Request | OptionSelect | Ack | Nak):
            # Echo of our own transmission (RS485 adapters without echo suppression) or a stray
            # control byte: no meter sends these during a readout.
            return []
        if isinstance(msg, Identification):
            if self._state != _WAIT_IDENT:
                return self._fail(RemoteProtocolError("unexpected identification", msg.raw))
            return self._on_identification(msg, now)
        if isinstance(msg, DataMessage):
            if self._state == _WAIT_IDENT:
                return self._fail(RemoteProtocolError("data message before identification", msg.raw))
            return self._on_data(msg)
        assert isinstance(msg, CommandMessage | P1Telegram)
        return self._fail(RemoteProtocolError(f"unexpected {type(msg).__name__}", msg.raw))

    def _on_identification(self, ident: Identification, now: float) -> list[Action]:
        self._ident = ident
        if ident.mode == "E":
            return self._fail(HdlcModeRequiredError(ident))
        if ident.mode == "C":
            self._state = _WAIT_ACK_DELAY
            self._deadline = now + ident.reaction_min_s
            return []
        self._state = _WAIT_DATA
        self._deadline = now + self.reaction_timeout_s
        if ident.mode == "B":
            # The meter switches by itself; max_baud cannot be negotiated in mode B.
            self._baud = ident.baud
            return [SetBaud(ident.baud)]
        return []

    def _send_option_select(self, now: float) -> list[Action]:
        assert self._ident is not None
        self._state = _WAIT_DATA
        if self._receiver.in_message:
            # The meter started its data message without waiting for the option select (mode A
            # fallback): answering now would collide on the half-duplex line.
            self._deadline = now + self.reaction_timeout_s
            return []
        baud_char = capped_baud_char(self._ident.baud_char, self.max_baud)
        ack = encode_option_select(baud_char)
        self._deadline = now + tx_time_s(len(ack), self._baud) + self.reaction_timeout_s
        self._baud = MODE_C_BAUD[baud_char]
        return [Send(ack), Drain(), SetBaud(self._baud)]

    def _on_bad_bcc(self, exc: BccError, now: float) -> list[Action]:
        if self._state not in (_WAIT_DATA, _WAIT_ACK_DELAY, _WAIT_NAK_DELAY) or self._ident is None:
            return self._fail(exc)
        if self._naks >= self.max_naks:
            return self._fail(
                RemoteProtocolError(f"BCC error after {self._naks} repeat request(s): {exc}", exc.frame)
            )
        self._naks += 1
        self._state = _WAIT_NAK_DELAY
        self._deadline = now + self._ident.reaction_min_s
        return []

    def _on_data(self, msg: DataMessage) -> list[Action]:
        assert self._ident is not None
        if not msg.readout and len(msg.datasets) == 1:
            only = msg.datasets[0]
            if only.address == "" and len(only.values) == 1 and only.values[0][1] is None:
                # "(text)" alone instead of a readout: a vendor error message without the ERxx form.
                return self._fail(NegativeResponse(0, only.values[0][0]))
        self._state = _DONE
        self._deadline = None
        result = IecReadoutResult(
            ident=self._ident,
            raw=msg.raw,
            datasets=msg.datasets,
            bcc_ok=msg.bcc_ok,
            baud=self._baud,
            naks=self._naks,
        )
        return [Done(result)]
