"""The client side of an IEC 62056-46 HDLC link: an :class:`~dcud.codec.dlms.transport.ApduTransport`.

:class:`HdlcLink` is sans-I/O: it turns APDUs into I frames and frames back into APDUs, and hands out
line actions (``Send``, and for mode E the sign-on's ``SetBaud``/``SetFraming``/``Drain``/``Flush``)
plus the link events ``LinkUp``, ``ApduIn`` and ``LinkDown``. Time comes in as ``now``; the response
deadline goes out through :meth:`HdlcLink.next_deadline`.

The client is the primary station in normal response mode:

- ``open``: SNRM carrying the proposed parameters (none when they are the defaults, 128 bytes and
  window 1), UA from the server with its own; the agreed values are the smaller of each pair
  (:func:`~dcud.codec.dlms.hdlc.negotiate`). With ``mode_e`` the IEC 62056-21 sign-on runs first.
- ``send_apdu``: LLC header ``E6 E6 00`` and the APDU, cut into I frames of the agreed size, at most a
  window of them at a time, the poll bit on the last of each window; the server acknowledges a window
  with RR, and answers the last frame with its response.
- the response: I frames from the server, the segmentation bit on all but the last; after every frame
  carrying the final bit (the last of the server's window) the client sends RR at once to ask for the
  next. The reassembled APDU loses its LLC header ``E6 E7 00`` and comes out as ``ApduIn``.
- sequence numbers: an I frame whose N(S) is not the expected one (a repeat after a lost RR, or one
  behind a lost frame) is dropped and the server is polled with RR(V(R)) to resend from there; an N(R)
  that acknowledges frames never sent is a RemoteProtocolError. Both are bounded (``max_retries``).
- timeouts: no answer within ``response_timeout_s`` after our frame has left (its line time at ``baud``
  is added) or after the last byte of a frame in progress: the unacknowledged I frames are sent again
  (or RR when everything was acknowledged), at most ``max_retries`` times, then
  ``LinkDown(PeerTimeout)``.
- DM (the server is disconnected) and FRMR (it rejected a frame) end the link with a
  RemoteProtocolError that says which; garbage and damaged frames are dropped and counted (the
  timeout recovers).
- ``close``: DISC, ``LinkDown(None)`` on UA or DM, or after ``disc_retries`` unanswered repeats.

Frames that are not from the configured server to our client address are ignored: on RS485 the
adapter may echo our own frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.actions import Send
from dcud.codec.dlms.hdlc import (
    LLC_REQUEST,
    LLC_RESPONSE,
    FrameKind,
    HdlcAddress,
    HdlcFrame,
    HdlcFrameReader,
    HdlcParameters,
    decode_parameters,
    describe_frmr,
    encode_frame,
    encode_parameters,
    i_control,
    negotiate,
    rr_control,
    u_control,
)
from dcud.codec.dlms.mode_e import ModeESettings, ModeESignOn
from dcud.codec.dlms.transport import ApduIn, LinkDown, LinkUp
from dcud.codec.iec62056 import tx_time_s
from dcud.errors import DcudError, LocalProtocolError, PeerTimeout, RemoteProtocolError

DEFAULT_RESPONSE_TIMEOUT_S = 5.0
"""Meters answer within tens of milliseconds, but a selective-access profile read may take seconds."""
DEFAULT_MAX_RETRIES = 3
DEFAULT_MAX_APDU_BYTES = 65535 + len(LLC_RESPONSE)
"""The largest APDU the xDLMS layer can announce (max receive PDU size is 16 bits)."""
MAX_BUSY_POLLS = 50
"""RR polls answered with RR/RNR (server busy) before the link gives up."""

_IDLE = "idle"
_SIGN_ON = "sign_on"
_CONNECTING = "connecting"
_READY = "ready"
_EXCHANGE = "exchange"
_DISCONNECTING = "disconnecting"
_DOWN = "down"


@dataclass(slots=True)
class HdlcLinkStats:
    """Counters of one link (for traces, benchmarks and the meter state)."""

    bytes_tx: int = 0
    bytes_rx: int = 0
    frames_tx: int = 0
    frames_rx: int = 0
    retransmissions: int = 0
    sequence_errors: int = 0
    ignored_frames: int = 0
    damaged_frames: int = 0


class HdlcLink:
    """Client side of an HDLC link to one server (see the module docstring).

    ``client_sap`` (16: public client), ``logical_device`` (the upper HDLC address, 1: management) and
    ``physical_address`` (the lower one; None for a one-byte server address) with ``address_size``
    (1, 2 or 4 bytes; None: the smallest that fits) address the meter. ``parameters`` is the SNRM
    proposal, seen from the client. ``baud`` is the line rate, used to add the line time of our own
    frames to the response deadline (None: not added); mode E sets it from the sign-on.
    """

    def __init__(
        self,
        *,
        client_sap: int = 16,
        logical_device: int = 1,
        physical_address: int | None = None,
        address_size: int | None = None,
        parameters: HdlcParameters | None = None,
        response_timeout_s: float = DEFAULT_RESPONSE_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        disc_retries: int = 1,
        baud: int | None = None,
        mode_e: ModeESettings | bool = False,
        max_apdu_bytes: int = DEFAULT_MAX_APDU_BYTES,
    ) -> None:
        if response_timeout_s <= 0:
            raise LocalProtocolError("response_timeout_s must be positive")
        if max_retries < 0 or disc_retries < 0:
            raise LocalProtocolError("retry counts must be >= 0")
        if baud is not None and baud <= 0:
            raise LocalProtocolError("baud must be positive")
        if max_apdu_bytes < 1:
            raise LocalProtocolError("max_apdu_bytes must be positive")
        self.client = HdlcAddress.client(client_sap)
        self.server = HdlcAddress.server(logical_device, physical_address, address_size)
        self.proposed = (parameters or HdlcParameters()).checked()
        self.parameters = HdlcParameters()
        """The agreed parameters (seen from the client), valid once the link is up."""
        self.response_timeout_s = response_timeout_s
        self.max_retries = max_retries
        self.disc_retries = disc_retries
        self.baud = baud
        self.max_apdu_bytes = max_apdu_bytes
        self._sign_on: ModeESignOn | None = None
        if mode_e:
            self._sign_on = ModeESignOn(mode_e if isinstance(mode_e, ModeESettings) else None)
        self.stats = HdlcLinkStats()
        self._reader = HdlcFrameReader()
        self._state = _IDLE
        self._deadline: float | None = None
        self._retries = 0
        self._busy_polls = 0
        self._seq_errors = 0
        self._vs = 0
        self._vr = 0
        # The APDU being sent: its segments, the first unacknowledged one, the next one to send and
        # the N(S) of segment 0 (sequence numbers are modulo 8).
        self._tx_segments: list[bytes] = []
        self._tx_base = 0
        self._tx_next = 0
        self._tx_ns0 = 0
        self._rx_parts: list[bytes] = []
        self._rx_bytes = 0

    # -- ApduTransport ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Current state name (idle, sign_on, connecting, ready, exchange, disconnecting, down)."""
        return self._state

    @property
    def is_up(self) -> bool:
        """Whether APDUs may be exchanged (ready or in an exchange)."""
        return self._state in (_READY, _EXCHANGE)

    def open(self, now: float) -> list[object]:
        """Start the link: the mode E sign-on (if configured), then SNRM."""
        if self._state != _IDLE:
            raise LocalProtocolError(f"HDLC link already opened (state {self._state})")
        if self._sign_on is not None:
            self._state = _SIGN_ON
            return self._sign_on.start(now)
        return self._send_snrm(now)

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        """Send one APDU, segmented to the agreed information field length and window."""
        if self._state != _READY:
            raise LocalProtocolError(f"cannot send an APDU in HDLC link state {self._state}")
        data = LLC_REQUEST + apdu
        size = self.parameters.max_info_tx
        self._tx_segments = [data[i : i + size] for i in range(0, len(data), size)]
        self._tx_base = 0
        self._tx_next = 0
        self._tx_ns0 = self._vs
        self._rx_parts = []
        self._rx_bytes = 0
        self._retries = 0
        self._busy_polls = 0
        self._seq_errors = 0
        self._state = _EXCHANGE
        return self._send_window(now)

    def receive_data(self, data: bytes, now: float) -> list[object]:
        """Feed bytes from the line, split anywhere."""
        if not data:
            return []
        self.stats.bytes_rx += len(data)
        if self._state in (_IDLE, _DOWN):
            return []
        if self._state == _SIGN_ON:
            assert self._sign_on is not None
            try:
                return self._sign_on.receive_data(data, now)
            except (PeerTimeout, RemoteProtocolError) as exc:
                return self._down(exc, disc=False)
        reader = self._reader
        reader.receive_data(data)
        out: list[object] = []
        while self._state not in (_DOWN, _IDLE):
            try:
                frame = reader.next_frame()
            except RemoteProtocolError:
                self.stats.damaged_frames += 1
                continue
            if frame is None:
                break
            self.stats.frames_rx += 1
            if not (frame.destination.same_station(self.client) and frame.source.same_station(self.server)):
                self.stats.ignored_frames += 1
                continue
            out += self._on_frame(frame, now)
        if self._deadline is not None and reader.in_frame:
            # A frame is arriving: give it the time it needs, measured from its last byte.
            self._deadline = max(self._deadline, now + self.response_timeout_s)
        return out

    def handle_timer(self, now: float) -> list[object]:
        """Retransmit after a response timeout, or end the link when the retries are spent."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        if self._state == _SIGN_ON:
            return self._sign_on_timer(now)
        self._reader.clear()
        if self._state == _DISCONNECTING:
            if self._retries >= self.disc_retries:
                return self._finish(None)
            self._retries += 1
            self.stats.retransmissions += 1
            return self._send_disc(now)
        if self._retries >= self.max_retries:
            what = "UA for SNRM" if self._state == _CONNECTING else "response"
            return self._down(
                PeerTimeout(
                    f"no {what} from HDLC server {self.server} within {self.response_timeout_s} s"
                    f" ({self._retries + 1} tries)"
                ),
                disc=self._state != _CONNECTING,
            )
        self._retries += 1
        self.stats.retransmissions += 1
        if self._state == _CONNECTING:
            return self._send_snrm(now)
        if self._state == _EXCHANGE:
            if self._tx_base < len(self._tx_segments):
                self._tx_next = self._tx_base
                return self._send_window(now)
            return self._send_rr(now)
        self._deadline = None
        return []

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is due; None while nothing is awaited."""
        if self._state == _SIGN_ON:
            assert self._sign_on is not None
            return self._sign_on.next_deadline()
        return self._deadline

    def close(self, now: float) -> list[object]:
        """DISC, then ``LinkDown(None)`` on UA/DM or after the repeats; at once when not connected."""
        if self._state in (_DOWN, _DISCONNECTING):
            return []
        if self._state in (_IDLE, _SIGN_ON):
            return self._finish(None)
        self._retries = 0
        self._state = _DISCONNECTING
        return self._send_disc(now)

    # -- frames out -----------------------------------------------------------------------------

    def _send(self, frame: HdlcFrame) -> Send:
        data = encode_frame(frame)
        self.stats.bytes_tx += len(data)
        self.stats.frames_tx += 1
        return Send(data)

    def _arm(self, now: float, sent: list[Send]) -> None:
        line_s = tx_time_s(sum(len(s.data) for s in sent), self.baud) if self.baud else 0.0
        self._deadline = now + line_s + self.response_timeout_s

    def _send_snrm(self, now: float) -> list[object]:
        self._state = _CONNECTING
        info = b"" if self.proposed.is_default else encode_parameters(self.proposed)
        sent = [self._send(HdlcFrame(self.server, self.client, u_control(FrameKind.SNRM), info))]
        self._arm(now, sent)
        return list(sent)

    def _send_disc(self, now: float) -> list[object]:
        sent = [self._send(HdlcFrame(self.server, self.client, u_control(FrameKind.DISC)))]
        self._arm(now, sent)
        return list(sent)

    def _send_rr(self, now: float) -> list[object]:
        sent = [self._send(HdlcFrame(self.server, self.client, rr_control(self._vr)))]
        self._arm(now, sent)
        return list(sent)

    def _send_window(self, now: float) -> list[object]:
        """Send segments from ``_tx_next`` up to the window, poll bit on the last one."""
        segments = self._tx_segments
        end = min(len(segments), self._tx_base + self.parameters.window_tx)
        sent: list[Send] = []
        for index in range(self._tx_next, end):
            control = i_control((self._tx_ns0 + index) % 8, self._vr, poll=index == end - 1)
            frame = HdlcFrame(self.server, self.client, control, segments[index], index < len(segments) - 1)
            sent.append(self._send(frame))
        self._tx_next = end
        self._vs = (self._tx_ns0 + end) % 8
        self._arm(now, sent)
        return list(sent)

    # -- frames in ------------------------------------------------------------------------------

    def _on_frame(self, frame: HdlcFrame, now: float) -> list[object]:
        kind = frame.kind
        if kind is FrameKind.DM:
            if self._state == _DISCONNECTING:
                return self._finish(None)
            what = "refused the connection" if self._state == _CONNECTING else "is disconnected"
            return self._down(
                RemoteProtocolError(f"HDLC server {self.server} {what} (DM)", encode_frame(frame)), disc=False
            )
        if kind is FrameKind.FRMR:
            if self._state == _DISCONNECTING:
                return self._finish(None)
            return self._down(
                RemoteProtocolError(
                    f"HDLC server {self.server}: {describe_frmr(frame.info)}", encode_frame(frame)
                ),
                disc=True,
            )
        if self._state == _CONNECTING:
            if kind is FrameKind.UA:
                return self._on_connected(frame)
            self.stats.ignored_frames += 1
            return []
        if self._state == _DISCONNECTING:
            if kind is FrameKind.UA:
                return self._finish(None)
            self.stats.ignored_frames += 1
            return []
        if self._state == _EXCHANGE:
            if kind is FrameKind.I:
                return self._on_i_frame(frame, now)
            if kind in (FrameKind.RR, FrameKind.RNR):
                return self._on_rr(frame, now)
        # Late duplicates (a second UA, a repeated response in READY), UI frames and unknown controls.
        self.stats.ignored_frames += 1
        return []

    def _on_connected(self, frame: HdlcFrame) -> list[object]:
        try:
            reply = decode_parameters(frame.info)
        except RemoteProtocolError as exc:
            return self._down(exc, disc=True)
        self.parameters = negotiate(self.proposed, reply)
        self._vs = 0
        self._vr = 0
        self._retries = 0
        self._deadline = None
        self._state = _READY
        return [LinkUp()]

    def _acknowledge(self, nr: int, frame: HdlcFrame) -> None:
        """Advance ``_tx_base`` to N(R); RemoteProtocolError when N(R) names frames never sent."""
        acked = (nr - self._tx_ns0 - self._tx_base) % 8
        if acked > self._tx_next - self._tx_base:
            raise RemoteProtocolError(
                f"HDLC server acknowledged N(R)={nr}, beyond the frames sent (V(S)={self._vs})",
                encode_frame(frame),
            )
        self._tx_base += acked

    def _on_rr(self, frame: HdlcFrame, now: float) -> list[object]:
        try:
            self._acknowledge(frame.nr, frame)
        except RemoteProtocolError as exc:
            return self._down(exc, disc=True)
        if not frame.poll_final:
            return []
        if self._tx_base < self._tx_next:
            # The server answered our poll without having received every frame: send them again.
            self._retries += 1
            self.stats.retransmissions += 1
            if self._retries > self.max_retries:
                return self._down(
                    RemoteProtocolError(
                        f"HDLC server {self.server} keeps losing frames ({self._retries} repeats)",
                        encode_frame(frame),
                    ),
                    disc=True,
                )
            self._tx_next = self._tx_base
            return self._send_window(now)
        if self._tx_next < len(self._tx_segments):
            self._retries = 0
            return self._send_window(now)
        # Everything acknowledged, no response yet (RR) or the server is busy (RNR): poll again, at
        # once after RR, after the response timeout after RNR.
        self._busy_polls += 1
        if self._busy_polls > MAX_BUSY_POLLS:
            return self._down(
                PeerTimeout(f"HDLC server {self.server} stayed busy for {MAX_BUSY_POLLS} polls"), disc=True
            )
        if frame.kind is FrameKind.RNR:
            self._deadline = now + self.response_timeout_s
            return []
        return self._send_rr(now)

    def _on_i_frame(self, frame: HdlcFrame, now: float) -> list[object]:
        if frame.ns != self._vr:
            # A repeat (our RR was lost) or a frame behind a lost one: drop it; after the server's
            # final bit, poll it to resend from V(R).
            self.stats.sequence_errors += 1
            self._seq_errors += 1
            if self._seq_errors > self.max_retries:
                return self._down(
                    RemoteProtocolError(
                        f"HDLC sequence error: N(S)={frame.ns}, expected {self._vr}"
                        f" ({self._seq_errors} times in a row)",
                        encode_frame(frame),
                    ),
                    disc=True,
                )
            return self._send_rr(now) if frame.poll_final else []
        try:
            self._acknowledge(frame.nr, frame)
            if self._tx_base < len(self._tx_segments):
                raise RemoteProtocolError(
                    f"HDLC server sent data (N(R)={frame.nr}) before acknowledging the whole request",
                    encode_frame(frame),
                )
            if self._rx_bytes + len(frame.info) > self.max_apdu_bytes:
                raise RemoteProtocolError(
                    f"HDLC response longer than {self.max_apdu_bytes} bytes", encode_frame(frame)
                )
        except RemoteProtocolError as exc:
            return self._down(exc, disc=True)
        self._vr = (self._vr + 1) % 8
        self._seq_errors = 0
        self._retries = 0
        self._busy_polls = 0
        self._rx_parts.append(frame.info)
        self._rx_bytes += len(frame.info)
        if frame.segmented:
            if frame.poll_final:
                return self._send_rr(now)
            self._deadline = now + self.response_timeout_s
            return []
        data = b"".join(self._rx_parts)
        self._rx_parts = []
        self._rx_bytes = 0
        if not data.startswith(LLC_RESPONSE):
            return self._down(
                RemoteProtocolError(
                    f"HDLC response without the LLC header E6 E7 00 (starts {data[:3].hex(' ')})", data[:64]
                ),
                disc=True,
            )
        self._state = _READY
        self._deadline = None
        return [ApduIn(data[len(LLC_RESPONSE) :])]

    # -- mode E, ending -------------------------------------------------------------------------

    def _sign_on_timer(self, now: float) -> list[object]:
        sign_on = self._sign_on
        assert sign_on is not None
        try:
            actions = sign_on.handle_timer(now)
        except (PeerTimeout, RemoteProtocolError) as exc:
            return self._down(exc, disc=False)
        if not sign_on.done:
            return actions
        self.baud = sign_on.baud
        self._reader.clear()
        return actions + self._send_snrm(now)

    def _finish(self, error: DcudError | None) -> list[object]:
        self._state = _DOWN
        self._deadline = None
        return [LinkDown(error)]

    def _down(self, error: DcudError, *, disc: bool) -> list[object]:
        """End the link with ``error``; a best-effort DISC (not awaited) resets a server in NRM."""
        out: list[object] = []
        if disc:
            out.append(self._send(HdlcFrame(self.server, self.client, u_control(FrameKind.DISC))))
        return out + self._finish(error)
