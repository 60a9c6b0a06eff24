"""Sans-I/O IEC 62056-21 meter model for the simulator (modes A, B and C readout).

The model answers sign-on requests addressed to it (leading zeros ignored, the general request too),
sends its identification after its reaction time, then, depending on its baud character:

- mode C/E (``0``..``6``): waits up to ``option_window_s`` (the standard's tt, 1.5 < tt <= 2.2 s) for
  ``ACK 0 Z 0``; switches to the Z rate and sends the data message; without a valid option select it
  falls back to a readout at the sign-on rate, as real meters do;
- mode B (``A``..``F``): switches to its rate by itself right after the identification;
- mode A: sends the data message at the sign-on rate.

After the data message it listens ``idle_timeout_s`` for a NAK (and repeats the message), then goes
back to the sign-on rate. The I/O layer carries out the returned actions (:class:`Send`, :class:`Drain`,
:class:`SetBaud`, from :mod:`dcud.codec.iec_session`) and calls :meth:`IecMeter.handle_timer` at
:meth:`IecMeter.next_deadline`, like the master's session.

Programming mode (option select ``ACK 0 Z 1``): the meter switches to the Z rate and sends the password
operand ``SOH P0 STX (seed) ETX BCC``; then ``P1 (password)`` is answered ACK (right password) or NAK,
``R1 address()`` with the value or an error, ``W1`` with ACK once the password was accepted (NAK before),
``B1`` with ACK and the end of the session, and the break ``B0`` ends the session without an answer.
Like a real meter it ignores sign-on requests while in programming mode and falls back to sign-on only
after ``programming_idle_s`` without a command: a master that leaves without the break leaves the
password session open for whoever talks next. Every command is recorded (:attr:`IecMeter.commands`,
with the rate the meter ran at). Mode E/HDLC is not modelled: such option selects are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from dcud.codec.actions import Drain, Send, SetBaud
from dcud.codec.iec62056 import (
    ACK,
    INITIAL_BAUD,
    MODE_C_BAUD,
    NAK,
    REACTION_MIN_FAST_S,
    REACTION_MIN_S,
    BccMode,
    CommandMessage,
    DataSet,
    IecReceiver,
    Nak,
    OptionSelect,
    Request,
    address_matches,
    encode_command,
    encode_data_message,
    encode_error_message,
    encode_identification,
    parse_identification,
    tx_time_s,
)
from dcud.errors import NegativeResponse, ProtocolError

MeterAction = Send | Drain | SetBaud
DataSource = Sequence[DataSet] | Callable[[float], Sequence[DataSet]]

DEFAULT_OPTION_WINDOW_S = 1.8
DEFAULT_IDLE_TIMEOUT_S = 1.5
DEFAULT_PROGRAMMING_IDLE_S = 120.0
"""Real meters drop back to sign-on after 60..120 s without a programming command."""
DEFAULT_PASSWORD = "00000000"
PASSWORD_SEED = "12345678"

_IDLE = "idle"
_SEND_IDENT = "send_ident"
_WAIT_OPTION = "wait_option"
_SEND_DATA = "send_data"
_AFTER_DATA = "after_data"
_SEND_P0 = "send_p0"
_PROGRAMMING = "programming"


class IecMeter:
    """One simulated meter on a (possibly multidrop) line; see the module docstring.

    ``datasets`` is either a fixed list or a function of ``now`` (values that change over time).
    ``accept_lower_baud`` lets the master pick any rate up to the meter's own (most meters do); when
    false only the meter's own Z is accepted and anything else means a readout at the sign-on rate.
    Fault injection for tests: the first ``bad_bcc_count`` data messages carry a wrong BCC;
    ``error_text`` (e.g. ``"ER01"``) makes the meter answer with an error message instead of data.
    ``password`` is the programming-mode password (``P1``), ``programming_idle_s`` how long the meter
    keeps a programming session without a command.
    """

    def __init__(
        self,
        address: str,
        *,
        manufacturer: str = "DCU",
        baud_char: str = "5",
        ident: str = "SIM62056",
        escapes: Iterable[str] = (),
        datasets: DataSource = (),
        bcc_mode: BccMode = "xor",
        initial_baud: int = INITIAL_BAUD,
        reaction_s: float | None = None,
        option_window_s: float = DEFAULT_OPTION_WINDOW_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        accept_lower_baud: bool = True,
        bad_bcc_count: int = 0,
        error_text: str | None = None,
        password: str = DEFAULT_PASSWORD,
        programming_idle_s: float = DEFAULT_PROGRAMMING_IDLE_S,
    ) -> None:
        self.address = address
        self._ident_line = encode_identification(manufacturer, baud_char, ident, escapes)
        self.identification = parse_identification(self._ident_line)
        self.datasets: DataSource = datasets
        self.bcc_mode: BccMode = bcc_mode
        self.initial_baud = initial_baud
        self.reaction_s = (
            reaction_s
            if reaction_s is not None
            else (REACTION_MIN_FAST_S if self.identification.fast_reaction else REACTION_MIN_S)
        )
        self.option_window_s = option_window_s
        self.idle_timeout_s = idle_timeout_s
        self.accept_lower_baud = accept_lower_baud
        self.bad_bcc_remaining = bad_bcc_count
        self.error_text = error_text
        self.password = password
        self.programming_idle_s = programming_idle_s
        self.readouts = 0
        self.naks_received = 0
        self.ignored_options = 0
        self.commands: list[tuple[str, int]] = []
        """Programming commands received (``"P1"``, ``"B0"``...) with the rate the meter ran at."""
        self.ignored_requests = 0
        """Sign-on requests that came while a programming session was open (a real meter ignores them)."""
        self.programming_timeouts = 0
        self.authorised = False
        """The programming session's password was accepted."""
        self._receiver = IecReceiver(side="meter", bcc_mode=bcc_mode)
        self._state = _IDLE
        self._deadline: float | None = None
        self._baud = initial_baud

    @property
    def state(self) -> str:
        """Current state name."""
        return self._state

    @property
    def baud(self) -> int:
        """Rate the meter's port runs at now."""
        return self._baud

    def next_deadline(self) -> float | None:
        """Absolute time at which :meth:`handle_timer` must be called, or None."""
        return self._deadline

    def receive_data(self, data: bytes, now: float) -> list[MeterAction]:
        """Feed bytes the meter's port received at ``now``."""
        self._receiver.receive_data(data)
        actions: list[MeterAction] = []
        while True:
            try:
                msg = self._receiver.next_message()
            except (ProtocolError, NegativeResponse):
                continue  # a meter ignores what it cannot parse
            if msg is None:
                return actions
            if isinstance(msg, Request):
                actions += self._on_request(msg, now)
            elif isinstance(msg, OptionSelect):
                actions += self._on_option_select(msg, now)
            elif isinstance(msg, CommandMessage):
                actions += self._on_command(msg, now)
            elif isinstance(msg, Nak) and self._state == _AFTER_DATA:
                self.naks_received += 1
                self._state = _SEND_DATA
                self._deadline = now + self.reaction_s

    def handle_timer(self, now: float) -> list[MeterAction]:
        """Act on an expired deadline."""
        if self._deadline is None or now < self._deadline:
            return []
        if self._state == _SEND_IDENT:
            return self._send_ident(now)
        if self._state in (_WAIT_OPTION, _SEND_DATA):
            # WAIT_OPTION expiring is the tt fallback: readout at the current (sign-on) rate.
            return self._send_data(now)
        if self._state == _AFTER_DATA:
            return self._go_idle()
        if self._state == _SEND_P0:
            self._state = _PROGRAMMING
            self._deadline = now + self.programming_idle_s
            return [Send(encode_command("P0", f"({PASSWORD_SEED})", bcc_mode=self.bcc_mode))]
        if self._state == _PROGRAMMING:
            self.programming_timeouts += 1
            return self._go_idle()
        return []

    # -- internals ------------------------------------------------------------------------------------

    def _go_idle(self) -> list[MeterAction]:
        self._state = _IDLE
        self._deadline = None
        self.authorised = False
        if self._baud != self.initial_baud:
            self._baud = self.initial_baud
            return [SetBaud(self.initial_baud)]
        return []

    def _on_request(self, req: Request, now: float) -> list[MeterAction]:
        if self._state in (_SEND_P0, _PROGRAMMING):
            self.ignored_requests += 1
            return []
        if not address_matches(req.address, self.address):
            return []
        actions = self._go_idle()
        self._state = _SEND_IDENT
        self._deadline = now + self.reaction_s
        return actions

    def _on_option_select(self, opt: OptionSelect, now: float) -> list[MeterAction]:
        if self._state != _WAIT_OPTION:
            return []
        if opt.protocol_control != "0" or opt.mode_control not in ("0", "1"):
            self.ignored_options += 1
            self._state = _IDLE
            self._deadline = None
            return []
        own = self.identification.baud_char
        rate = opt.baud
        ok = opt.baud_char == own or (
            self.accept_lower_baud and rate is not None and rate <= MODE_C_BAUD[own]
        )
        self._state = _SEND_DATA if opt.mode_control == "0" else _SEND_P0
        self._deadline = now + self.reaction_s
        if ok and rate is not None and rate != self._baud:
            self._baud = rate
            return [SetBaud(rate)]
        return []

    def _on_command(self, cmd: CommandMessage, now: float) -> list[MeterAction]:
        """A programming command: answered in the programming session, ignored outside it."""
        if self._state != _PROGRAMMING:
            return []
        self.commands.append((cmd.command, self._baud))
        self._deadline = now + self.programming_idle_s
        if not cmd.bcc_ok:
            return [Send(bytes([NAK]))]
        if cmd.command == "B0":
            return self._go_idle()
        if cmd.command == "B1":
            return [Send(bytes([ACK])), *self._go_idle()]
        if cmd.command == "P1":
            self.authorised = cmd.data == f"({self.password})"
            return [Send(bytes([ACK if self.authorised else NAK]))]
        if cmd.command == "W1":
            return [Send(bytes([ACK if self.authorised else NAK]))]
        if cmd.command == "R1":
            if not self.authorised:
                return [Send(encode_error_message("ER05", self.bcc_mode))]
            wanted = cmd.data.split("(", 1)[0]
            for dataset in self._current_datasets(now):
                if dataset.address == wanted:
                    return [Send(encode_data_message([dataset], self.bcc_mode))]
            return [Send(encode_error_message("ER01", self.bcc_mode))]
        return [Send(bytes([NAK]))]

    def _send_ident(self, now: float) -> list[MeterAction]:
        ident = self.identification
        line = self._ident_line
        sent_s = now + tx_time_s(len(line), self._baud)
        actions: list[MeterAction] = [Send(line)]
        if ident.mode in ("C", "E"):
            self._state = _WAIT_OPTION
            self._deadline = sent_s + self.option_window_s
            return actions
        self._state = _SEND_DATA
        self._deadline = sent_s + self.reaction_s
        if ident.mode == "B":
            self._baud = ident.baud
            actions += [Drain(), SetBaud(ident.baud)]
        return actions

    def _current_datasets(self, now: float) -> Sequence[DataSet]:
        source = self.datasets
        return source(now) if callable(source) else source

    def _send_data(self, now: float) -> list[MeterAction]:
        if self.error_text is not None:
            frame = encode_error_message(self.error_text, self.bcc_mode)
        else:
            frame = encode_data_message(self._current_datasets(now), self.bcc_mode)
            if self.bad_bcc_remaining > 0 and self.bcc_mode != "none":
                self.bad_bcc_remaining -= 1
                frame = frame[:-1] + bytes([frame[-1] ^ 0x01])
        self.readouts += 1
        self._state = _AFTER_DATA
        self._deadline = now + tx_time_s(len(frame), self._baud) + self.idle_timeout_s
        return [Send(frame)]
