"""IEC 62056-21 mode E sign-on: the optical/serial opening that hands a meter over to HDLC, sans-I/O.

At the sign-on rate (300 Bd, 7E1) the client sends the request ``/?address!CRLF``; the meter answers
with its identification, whose ``\\2`` escape announces mode E (binary, HDLC). After the meter's
minimum reaction time the client sends the option select ``ACK 2 Z 2 CRLF`` (protocol control 2, the
baud character Z the meter offered, mode control 2 = binary/HDLC), drains the UART, and switches the
line to the Z rate and to 8N1. From then on both sides speak HDLC (IEC 62056-46) at that rate.

:class:`ModeESignOn` is a sub-session that :class:`dcud.codec.dlms.hdlc_link.HdlcLink` runs inside
``open()`` when built with ``mode_e``; it returns line actions of :mod:`dcud.codec.actions` and raises
the typed errors (PeerTimeout when the meter is silent, RemoteProtocolError when it answers with
something else than a mode E identification).
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.actions import Drain, Flush, Send, SetBaud, SetFraming
from dcud.codec.iec62056 import (
    INTER_CHAR_MAX_S,
    MAX_IDENT_LINE_BYTES,
    MODE_C_BAUD,
    REACTION_MAX_S,
    Identification,
    IecReceiver,
    Request,
    encode_option_select,
    encode_request,
    tx_time_s,
)
from dcud.codec.iec_session import capped_baud_char
from dcud.errors import LocalProtocolError, PeerTimeout, RemoteProtocolError

SIGN_ON_FRAMING = "7E1"
HDLC_FRAMING = "8N1"


@dataclass(frozen=True, slots=True)
class ModeESettings:
    """How to sign on in mode E.

    ``address``: the IEC 62056-21 device address in the request (empty: the general request, one
    meter on the line only). ``initial_baud``: the sign-on rate (300 by the standard). ``max_baud``
    caps the rate the meter offers. ``switch_delay_s``: pause after the line switched, before the
    first HDLC frame, so the meter has switched too (None: the meter's minimum reaction time, 200 ms
    or 20 ms). Timeouts as in IEC 62056-21: ``reaction_timeout_s`` for the identification to start,
    ``inter_char_timeout_s`` between its characters.
    """

    address: str = ""
    initial_baud: int = 300
    max_baud: int | None = None
    switch_delay_s: float | None = None
    reaction_timeout_s: float = REACTION_MAX_S
    inter_char_timeout_s: float = INTER_CHAR_MAX_S

    def checked(self) -> ModeESettings:
        """These settings, or LocalProtocolError when one is illegal."""
        encode_request(self.address)
        if self.initial_baud <= 0 or (self.max_baud is not None and self.max_baud <= 0):
            raise LocalProtocolError("mode E baud rates must be positive")
        if self.reaction_timeout_s <= 0 or self.inter_char_timeout_s <= 0:
            raise LocalProtocolError("mode E timeouts must be positive")
        if self.switch_delay_s is not None and self.switch_delay_s < 0:
            raise LocalProtocolError("mode E switch delay must not be negative")
        return self


_WAIT_IDENT = "wait_ident"
_WAIT_ACK_DELAY = "wait_ack_delay"
_WAIT_SWITCH = "wait_switch"
_DONE = "done"


class ModeESignOn:
    """One mode E sign-on (see the module docstring); :attr:`done` once HDLC may start at :attr:`baud`."""

    def __init__(self, settings: ModeESettings | None = None) -> None:
        self.settings = (settings or ModeESettings()).checked()
        self._request = encode_request(self.settings.address)
        self._receiver = IecReceiver(side="master", max_message_bytes=MAX_IDENT_LINE_BYTES * 4)
        self._state = _WAIT_IDENT
        self._deadline: float | None = None
        self._last_rx_s = 0.0
        self.baud = self.settings.initial_baud
        self.ident: Identification | None = None

    @property
    def done(self) -> bool:
        """Whether the line runs HDLC now (the link may send its SNRM)."""
        return self._state == _DONE

    @property
    def state(self) -> str:
        """Current step (for traces and tests)."""
        return self._state

    def start(self, now: float) -> list[object]:
        """Sign-on rate and framing, flush stale input, send the request."""
        self._deadline = now + tx_time_s(len(self._request), self.baud) + self.settings.reaction_timeout_s
        return [SetFraming(SIGN_ON_FRAMING), SetBaud(self.baud), Flush(), Send(self._request)]

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is due."""
        if self._state == _DONE:
            return None
        if self._state == _WAIT_IDENT and self._receiver.in_message:
            return self._last_rx_s + self.settings.inter_char_timeout_s
        return self._deadline

    def receive_data(self, data: bytes, now: float) -> list[object]:
        """Feed bytes from the line; raises RemoteProtocolError for anything but a mode E ident."""
        if self._state != _WAIT_IDENT or not data:
            # After the identification the meter is silent until our option select; bytes during the
            # switch are line noise from the rate change.
            return []
        self._last_rx_s = now
        self._receiver.receive_data(data)
        while True:
            msg = self._receiver.next_message()
            if msg is None:
                return []
            if isinstance(msg, Request):
                continue  # echo of our own request (RS485 adapter without echo suppression)
            if not isinstance(msg, Identification):
                raise RemoteProtocolError(
                    f"mode E sign-on: expected an identification, got {type(msg).__name__}",
                    getattr(msg, "raw", b""),
                )
            return self._on_identification(msg, now)

    def _on_identification(self, ident: Identification, now: float) -> list[object]:
        if ident.mode != "E":
            raise RemoteProtocolError(
                f"meter {ident.manufacturer}{ident.ident!r} does not offer mode E/HDLC"
                f" (identification mode {ident.mode}, no \\2 escape)",
                ident.raw,
            )
        self.ident = ident
        self._state = _WAIT_ACK_DELAY
        self._deadline = now + ident.reaction_min_s
        return []

    def handle_timer(self, now: float) -> list[object]:
        """Send the delayed option select, finish after the switch delay, or raise PeerTimeout."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        if self._state == _WAIT_ACK_DELAY:
            assert self.ident is not None
            baud_char = capped_baud_char(self.ident.baud_char, self.settings.max_baud)
            ack = encode_option_select(baud_char, mode_control="2", protocol_control="2")
            delay = self.settings.switch_delay_s
            if delay is None:
                delay = self.ident.reaction_min_s
            self._state = _WAIT_SWITCH
            # The actions run after this returns: the option select still has to cross the line.
            self._deadline = now + tx_time_s(len(ack), self.baud) + delay
            self.baud = MODE_C_BAUD[baud_char]
            return [Send(ack), Drain(), SetBaud(self.baud), SetFraming(HDLC_FRAMING)]
        if self._state == _WAIT_SWITCH:
            self._state = _DONE
            self._deadline = None
            return []
        if self._receiver.in_message:
            raise PeerTimeout(
                "mode E sign-on: identification incomplete after"
                f" {self.settings.inter_char_timeout_s} s of silence"
            )
        raise PeerTimeout(
            f"mode E sign-on: no identification from meter {self.settings.address!r}"
            f" within {self.settings.reaction_timeout_s} s"
        )
