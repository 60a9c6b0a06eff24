"""The server (meter) side of an IEC 62056-46 HDLC link, sans-I/O: the counterpart of ``HdlcLink``.

:class:`HdlcServerLink` is the secondary station in normal response mode. It takes the bytes a line
delivered and hands back line actions (``Send``) and link events (``LinkUp``, ``ApduIn``, ``LinkDown``
of :mod:`dcud.codec.dlms.transport`); the application answers each ``ApduIn`` with
:meth:`HdlcServerLink.send_apdu`. Time comes in as ``now`` and goes out as :meth:`next_deadline`
(inactivity and the silence that drops a partial frame); a secondary never retransmits on its own,
the primary polls it.

- **Addressing**: frames to our logical device (upper HDLC address) and physical address (lower),
  in the 2- or 4-byte form, or the 1-byte form (upper only) when ``accept_one_byte_address``; from a
  client SAP in ``client_saps`` (None: any). Anything else is ignored and counted (a meter on a
  multidrop line hears every other meter's traffic). Replies use the address form the client used.
- **SNRM**: the client's proposal (seen from the client) against our limits ``parameters`` (seen
  from us): we transmit ``min(our max_info_tx, its max_info_rx)`` and so on for each pair; the UA
  carries the agreed values, seen from us. A connection in place is dropped (``LinkDown(None)``) and
  a new one starts (``LinkUp``); sequence numbers restart at 0. A client other than the connected one
  gets DM for anything but SNRM.
- **Requests**: I frames with N(S) = V(R); the segmentation bit on all but the last; RR(V(R)) after a
  segment that carries the poll bit. The last segment completes the request: ``E6 E6 00`` is removed
  and the APDU comes out as ``ApduIn``. A repeat of the last request frame (the client lost our
  answer) makes us send that answer again; a frame out of sequence is dropped and, if it polls, RR(V(R))
  asks for the right one. An information field beyond the agreed ``max_info_rx`` gets FRMR (Y); an
  unknown control FRMR (W); an N(R) naming frames never sent FRMR (Z).
- **Responses**: ``E6 E7 00`` + APDU cut into I frames of the agreed ``max_info_tx``, a window at a
  time, the final bit on the last frame of each window; the client's RR acknowledges them (an RR that
  acknowledges part of a window makes us resend from there, go-back-N) and asks for the next window.
  RR when nothing is pending is answered RR(V(R)).
- **DISC**: UA and ``LinkDown(None)``; DM when not connected. Frames that poll a disconnected server
  get DM.
- **Inactivity**: with ``inactivity_timeout_s`` the connection is forgotten after that long without a
  frame of ours (``LinkDown(PeerTimeout)``), as meters do; the next frame gets DM.

Damaged frames (HCS/FCS) are dropped and counted; bytes stop being a partial frame after
``partial_frame_timeout_s`` of silence. Nothing here raises on hostile input: every frame is either
served, answered with DM/FRMR or ignored.
"""

from __future__ import annotations

from collections.abc import Collection
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
    encode_frame,
    encode_parameters,
    i_control,
    rr_control,
    u_control,
)
from dcud.codec.dlms.transport import ApduIn, LinkDown, LinkUp
from dcud.errors import LocalProtocolError, PeerTimeout, RemoteProtocolError

DEFAULT_MAX_REQUEST_BYTES = 65535 + len(LLC_REQUEST)
"""The largest request the xDLMS layer can announce, plus the LLC header."""
DEFAULT_PARTIAL_FRAME_TIMEOUT_S = 1.0

FRMR_W = 0x01
"""Invalid or unimplemented control field."""
FRMR_X = 0x02
"""Information field not permitted."""
FRMR_Y = 0x04
"""Information field too long."""
FRMR_Z = 0x08
"""Invalid N(R)."""


@dataclass(slots=True)
class HdlcServerStats:
    """Counters of one server link (for the simulator's status and tests)."""

    bytes_rx: int = 0
    bytes_tx: int = 0
    frames_rx: int = 0
    frames_tx: int = 0
    foreign_frames: int = 0
    damaged_frames: int = 0
    sequence_errors: int = 0
    repeats: int = 0
    frame_rejects: int = 0
    disconnected_frames: int = 0
    requests: int = 0
    inactivity_timeouts: int = 0


class HdlcServerLink:
    """Server side of an HDLC link for one meter (see the module docstring)."""

    def __init__(
        self,
        *,
        logical_device: int = 1,
        physical_address: int = 17,
        client_saps: Collection[int] | None = None,
        parameters: HdlcParameters | None = None,
        accept_one_byte_address: bool = True,
        inactivity_timeout_s: float | None = None,
        partial_frame_timeout_s: float = DEFAULT_PARTIAL_FRAME_TIMEOUT_S,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        HdlcAddress.server(logical_device, physical_address, 4)  # range check (14 bits each)
        if inactivity_timeout_s is not None and inactivity_timeout_s <= 0:
            raise LocalProtocolError("inactivity_timeout_s must be positive (or None)")
        if partial_frame_timeout_s <= 0:
            raise LocalProtocolError("partial_frame_timeout_s must be positive")
        if max_request_bytes < 1:
            raise LocalProtocolError("max_request_bytes must be positive")
        self.logical_device = logical_device
        self.physical_address = physical_address
        self.client_saps = None if client_saps is None else frozenset(client_saps)
        self.limits = (parameters or HdlcParameters()).checked()
        """What this server can do, seen from it (its transmit and receive limits)."""
        self.accept_one_byte_address = accept_one_byte_address
        self.inactivity_timeout_s = inactivity_timeout_s
        self.partial_frame_timeout_s = partial_frame_timeout_s
        self.max_request_bytes = max_request_bytes
        self.parameters = HdlcParameters()
        """The agreed parameters of the current connection, seen from the server."""
        self.stats = HdlcServerStats()
        self._reader = HdlcFrameReader()
        self._client: HdlcAddress | None = None
        self._own: HdlcAddress | None = None
        self._last_activity_s = 0.0
        self._last_rx_s = 0.0
        self._vs = 0
        self._vr = 0
        self._rx_parts: list[bytes] = []
        self._rx_bytes = 0
        self._last_request_info: bytes | None = None
        self._last_request_ns = -1
        # The response being sent: its segments, the first unacknowledged one, the next to send, the
        # N(S) of segment 0; and the frames of the last transmission (resent when a request repeats).
        self._tx_segments: list[bytes] = []
        self._tx_base = 0
        self._tx_next = 0
        self._tx_ns0 = 0
        self._last_sent: list[bytes] = []
        self._awaiting_response = False

    # -- state ------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a client has a connection (SNRM accepted, no DISC since)."""
        return self._client is not None

    @property
    def client_sap(self) -> int | None:
        """The connected client's SAP (None when disconnected)."""
        return None if self._client is None else self._client.upper

    @property
    def awaiting_response(self) -> bool:
        """Whether a request came out as ``ApduIn`` and :meth:`send_apdu` has not answered it yet."""
        return self._awaiting_response

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is due: inactivity, or the end of a partial frame."""
        deadlines: list[float] = []
        if self._client is not None and self.inactivity_timeout_s is not None:
            deadlines.append(self._last_activity_s + self.inactivity_timeout_s)
        if self._reader.in_frame:
            deadlines.append(self._last_rx_s + self.partial_frame_timeout_s)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[object]:
        """Drop a partial frame after silence; forget the connection after inactivity."""
        out: list[object] = []
        if self._reader.in_frame and now >= self._last_rx_s + self.partial_frame_timeout_s:
            self._reader.clear()
        if (
            self._client is not None
            and self.inactivity_timeout_s is not None
            and now >= self._last_activity_s + self.inactivity_timeout_s
        ):
            self.stats.inactivity_timeouts += 1
            out += self._disconnect(
                PeerTimeout(f"no frame from client {self._client} within {self.inactivity_timeout_s:g} s")
            )
        return out

    def reset(self) -> list[object]:
        """Forget the connection and any partial frame (the line changed hands, e.g. back to mode E)."""
        self._reader.clear()
        return self._disconnect(None) if self._client is not None else []

    # -- bytes in ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[object]:
        """Feed bytes from the line, split anywhere; never raises on what the line brings."""
        if not data:
            return []
        self.stats.bytes_rx += len(data)
        self._last_rx_s = now
        reader = self._reader
        reader.receive_data(data)
        out: list[object] = []
        for _ in range(reader.buffered_bytes + 1):  # every round consumes bytes: this bounds the loop
            try:
                frame = reader.next_frame()
            except RemoteProtocolError:
                self.stats.damaged_frames += 1
                continue
            if frame is None:
                break
            self.stats.frames_rx += 1
            out += self._on_frame(frame, now)
        return out

    def _addressed_to_us(self, frame: HdlcFrame) -> bool:
        dest, src = frame.destination, frame.source
        if src.size_bytes != 1 or (self.client_saps is not None and src.upper not in self.client_saps):
            return False
        if dest.upper != self.logical_device:
            return False
        if dest.size_bytes == 1:
            return self.accept_one_byte_address
        return dest.lower == self.physical_address

    def _on_frame(self, frame: HdlcFrame, now: float) -> list[object]:
        if not self._addressed_to_us(frame):
            self.stats.foreign_frames += 1
            return []
        kind = frame.kind
        if kind is FrameKind.SNRM:
            return self._on_snrm(frame, now)
        if kind is FrameKind.UI:
            return []  # no UI services here
        client = self._client
        if client is None or not frame.source.same_station(client):
            # Not connected (to this client): DISC gets DM, so do frames that poll us.
            self.stats.disconnected_frames += 1
            if kind is FrameKind.DISC or frame.poll_final:
                return [self._send(self._reply(frame, u_control(FrameKind.DM)))]
            return []
        self._last_activity_s = now
        self._own = frame.destination
        if kind is FrameKind.DISC:
            out: list[object] = [self._send(self._reply(frame, u_control(FrameKind.UA)))]
            return out + self._disconnect(None)
        if kind is FrameKind.I:
            return self._on_i_frame(frame)
        if kind in (FrameKind.RR, FrameKind.RNR):
            return self._on_rr(frame)
        # UA, DM, FRMR or an unknown control from a primary: not something a client sends.
        return [self._frame_reject(frame, FRMR_W)]

    # -- connection -------------------------------------------------------------------------------

    def _on_snrm(self, frame: HdlcFrame, now: float) -> list[object]:
        try:
            proposal = decode_parameters(frame.info)
        except RemoteProtocolError:
            self.stats.frame_rejects += 1
            return [self._send(self._reply(frame, u_control(FrameKind.DM)))]
        out: list[object] = []
        if self._client is not None:
            out += self._disconnect(None)
        limits = self.limits
        # The proposal is seen from the client: its transmit is our receive.
        self.parameters = HdlcParameters(
            max_info_tx=min(limits.max_info_tx, proposal.max_info_rx),
            max_info_rx=min(limits.max_info_rx, proposal.max_info_tx),
            window_tx=min(limits.window_tx, proposal.window_rx),
            window_rx=min(limits.window_rx, proposal.window_tx),
        )
        self._client = frame.source
        self._own = frame.destination
        self._last_activity_s = now
        self._vs = self._vr = 0
        self._clear_exchange()
        ua = HdlcFrame(
            frame.source, frame.destination, u_control(FrameKind.UA), encode_parameters(self.parameters)
        )
        out.append(self._send(ua))
        out.append(LinkUp())
        return out

    def _disconnect(self, error: PeerTimeout | None) -> list[object]:
        self._client = None
        self._clear_exchange()
        return [LinkDown(error)]

    def _clear_exchange(self) -> None:
        self._rx_parts = []
        self._rx_bytes = 0
        self._tx_segments = []
        self._tx_base = self._tx_next = 0
        self._last_sent = []
        self._last_request_info = None
        self._last_request_ns = -1
        self._awaiting_response = False

    # -- frames in --------------------------------------------------------------------------------

    def _acknowledge(self, nr: int) -> bool:
        """Advance ``_tx_base`` to N(R); False when N(R) names frames never sent."""
        acked = (nr - self._tx_ns0 - self._tx_base) % 8
        if acked > self._tx_next - self._tx_base:
            return False
        self._tx_base += acked
        return True

    def _on_i_frame(self, frame: HdlcFrame) -> list[object]:
        if len(frame.info) > self.parameters.max_info_rx:
            return [self._frame_reject(frame, FRMR_Y)]
        if frame.ns != self._vr:
            if (
                frame.ns == (self._vr - 1) % 8
                and frame.info == self._last_request_info
                and frame.ns == self._last_request_ns
                and self._last_sent
            ):
                # The client repeats its last frame: our answer got lost. Send it again.
                self.stats.repeats += 1
                return [self._resend(data) for data in self._last_sent]
            self.stats.sequence_errors += 1
            if frame.poll_final:
                return [self._send(self._reply(frame, rr_control(self._vr)))]
            return []
        if self._tx_segments and not self._acknowledge(frame.nr):
            return [self._frame_reject(frame, FRMR_Z)]
        if self._rx_bytes + len(frame.info) > self.max_request_bytes:
            self._rx_parts, self._rx_bytes = [], 0
            return [self._frame_reject(frame, FRMR_Y)]
        # A new request: whatever remained of the previous response is abandoned.
        self._tx_segments = []
        self._tx_base = self._tx_next = 0
        self._vr = (self._vr + 1) % 8
        self._last_request_info = frame.info
        self._last_request_ns = frame.ns
        self._rx_parts.append(frame.info)
        self._rx_bytes += len(frame.info)
        if frame.segmented:
            if frame.poll_final:
                return [self._remember(self._send(self._reply(frame, rr_control(self._vr))))]
            self._last_sent = []
            return []
        data = b"".join(self._rx_parts)
        self._rx_parts, self._rx_bytes = [], 0
        self._last_sent = []
        if not data.startswith(LLC_REQUEST):
            return []  # not a DLMS request (no LLC header): a meter leaves it unanswered
        self.stats.requests += 1
        self._awaiting_response = True
        return [ApduIn(data[len(LLC_REQUEST) :])]

    def _on_rr(self, frame: HdlcFrame) -> list[object]:
        if not self._acknowledge(frame.nr):
            return [self._frame_reject(frame, FRMR_Z)]
        if not frame.poll_final or frame.kind is FrameKind.RNR:
            return []
        if self._tx_base < self._tx_next:
            # The client did not get every frame of our last window: go back to the first it lacks.
            self.stats.repeats += 1
            self._tx_next = self._tx_base
            return self._send_window()
        if self._tx_next < len(self._tx_segments):
            return self._send_window()
        # Nothing to send (or still computing): tell the client so.
        return [self._remember(self._send(self._reply(frame, rr_control(self._vr))))]

    # -- frames out -------------------------------------------------------------------------------

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        """Answer the request that came out as ``ApduIn``: the first window of the response frames."""
        if self._client is None:
            raise LocalProtocolError("no HDLC connection to answer on")
        self._awaiting_response = False
        self._last_activity_s = now
        data = LLC_RESPONSE + apdu
        size = self.parameters.max_info_tx
        self._tx_segments = [data[i : i + size] for i in range(0, len(data), size)]
        self._tx_base = self._tx_next = 0
        self._tx_ns0 = self._vs
        self._last_sent = []
        return self._send_window()

    def _send_window(self) -> list[object]:
        assert self._client is not None and self._own is not None
        segments = self._tx_segments
        end = min(len(segments), self._tx_base + self.parameters.window_tx)
        self._last_sent = []
        out: list[object] = []
        for index in range(self._tx_next, end):
            control = i_control((self._tx_ns0 + index) % 8, self._vr, poll=index == end - 1)
            frame = HdlcFrame(self._client, self._own, control, segments[index], index < len(segments) - 1)
            out.append(self._remember(self._send(frame)))
        self._tx_next = end
        self._vs = (self._tx_ns0 + end) % 8
        return out

    def _reply(self, frame: HdlcFrame, control: int, info: bytes = b"") -> HdlcFrame:
        return HdlcFrame(frame.source, frame.destination, control, info)

    def _frame_reject(self, frame: HdlcFrame, reason: int) -> Send:
        self.stats.frame_rejects += 1
        info = bytes([frame.control, (self._vr << 5) | (self._vs << 1), reason])
        return self._send(self._reply(frame, u_control(FrameKind.FRMR), info))

    def _send(self, frame: HdlcFrame) -> Send:
        data = encode_frame(frame)
        self.stats.bytes_tx += len(data)
        self.stats.frames_tx += 1
        return Send(data)

    def _remember(self, send: Send) -> Send:
        self._last_sent.append(send.data)
        return send

    def _resend(self, data: bytes) -> Send:
        self.stats.bytes_tx += len(data)
        self.stats.frames_tx += 1
        return Send(data)


__all__ = ["HdlcServerLink", "HdlcServerStats"]
