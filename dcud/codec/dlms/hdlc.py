"""HDLC frames of IEC 62056-46 (ISO/IEC 13239 frame format type 3), sans-I/O.

Frame layout (the flags are not counted in the length)::

    7E | format (2) | destination address | source address | control | [HCS (2) | information] | FCS (2) | 7E

- format: ``1010 S LLLLLLLLLLL``: type 3 (top nibble ``A``), the segmentation bit ``S``, an 11-bit
  frame length;
- addresses: 7 bits per byte, shifted left; the last byte has its lowest bit set. The client address
  is one byte (``(SAP << 1) | 1``); the server address is 1, 2 or 4 bytes holding the upper HDLC
  address (logical device) and, in the 2- and 4-byte forms, the lower one (physical address);
- control: I ``RRR P SSS 0``, RR ``RRR P 0001``, RNR ``RRR P 0101``, unnumbered frames ``xxx P xx11``
  (SNRM 83, UA 63, DISC 43, DM 0F, FRMR 87, UI 03; with the poll/final bit: 93, 73, 53, 1F, 97, 13);
- HCS and FCS: CRC-16/X.25 (:func:`dcud.codec.crc.crc16_x25`), low byte first; the HCS covers format,
  addresses and control and is present only when there is an information field.

DLMS does no byte stuffing: a 0x7E may occur anywhere inside a frame (in a length, a check sequence or
the data). :class:`HdlcFrameReader` therefore cuts frames by their length, and uses the HCS to reject
a false start early instead of waiting for a length that garbage announced.

Errors: :class:`~dcud.errors.RemoteProtocolError` for a damaged or malformed frame from the peer,
:class:`~dcud.errors.LocalProtocolError` when asked to encode something illegal.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dcud.codec.crc import crc16_x25
from dcud.errors import LocalProtocolError, RemoteProtocolError

FLAG = 0x7E
FORMAT_TYPE_3 = 0xA000
SEGMENTATION_BIT = 0x0800
LENGTH_MASK = 0x07FF
MAX_FRAME_LENGTH = LENGTH_MASK
"""Largest frame length the 11-bit field can hold (flags excluded)."""
MIN_FRAME_LENGTH = 7
"""format (2) + destination (1) + source (1) + control (1) + FCS (2)."""

POLL_FINAL = 0x10

LLC_REQUEST = b"\xe6\xe6\x00"
"""LLC header in front of an APDU from the client (destination and source LSAP E6, quality 00)."""
LLC_RESPONSE = b"\xe6\xe7\x00"
"""LLC header in front of an APDU from the server (source LSAP E7)."""

DEFAULT_MAX_INFO_BYTES = 128
DEFAULT_WINDOW = 1
MAX_WINDOW = 7
MAX_INFO_FIELD_BYTES = MAX_FRAME_LENGTH - (2 + 4 + 4 + 1 + 2 + 2)
"""The largest information field that fits a frame with 4-byte addresses on both sides."""

ALL_STATION_ADDRESS = 0x7F
"""Broadcast upper/lower HDLC address in the one-byte form (0x3FFF in the two-byte halves)."""


class FrameKind(enum.Enum):
    """What a control byte means (REJ and the other ISO 13239 frames are not used by DLMS)."""

    I = "I"  # noqa: E741 (the standard's name)
    RR = "RR"
    RNR = "RNR"
    SNRM = "SNRM"
    UA = "UA"
    DISC = "DISC"
    DM = "DM"
    FRMR = "FRMR"
    UI = "UI"
    UNKNOWN = "unknown"


_UNNUMBERED = {
    0x83: FrameKind.SNRM,
    0x63: FrameKind.UA,
    0x43: FrameKind.DISC,
    0x0F: FrameKind.DM,
    0x87: FrameKind.FRMR,
    0x03: FrameKind.UI,
}
_UNNUMBERED_CODE = {kind: code for code, kind in _UNNUMBERED.items()}


def control_kind(control: int) -> FrameKind:
    """The frame kind of a control byte."""
    if control & 0x01 == 0:
        return FrameKind.I
    if control & 0x03 == 0x01:
        supervisory = control & 0x0F
        if supervisory == 0x01:
            return FrameKind.RR
        if supervisory == 0x05:
            return FrameKind.RNR
        return FrameKind.UNKNOWN
    return _UNNUMBERED.get(control & ~POLL_FINAL & 0xFF, FrameKind.UNKNOWN)


def i_control(ns: int, nr: int, poll: bool = True) -> int:
    """Control byte of an I frame with send sequence ``ns`` and receive sequence ``nr`` (0..7)."""
    _check_seq(ns)
    _check_seq(nr)
    return (nr << 5) | (POLL_FINAL if poll else 0) | (ns << 1)


def rr_control(nr: int, poll: bool = True) -> int:
    """Control byte of a receive-ready frame acknowledging up to ``nr - 1``."""
    _check_seq(nr)
    return (nr << 5) | (POLL_FINAL if poll else 0) | 0x01


def rnr_control(nr: int, poll: bool = True) -> int:
    """Control byte of a receive-not-ready frame."""
    _check_seq(nr)
    return (nr << 5) | (POLL_FINAL if poll else 0) | 0x05


def u_control(kind: FrameKind, poll: bool = True) -> int:
    """Control byte of an unnumbered frame (SNRM, UA, DISC, DM, FRMR, UI)."""
    code = _UNNUMBERED_CODE.get(kind)
    if code is None:
        raise LocalProtocolError(f"{kind.value} is not an unnumbered frame")
    return code | (POLL_FINAL if poll else 0)


def _check_seq(value: int) -> None:
    if not 0 <= value <= 7:
        raise LocalProtocolError(f"HDLC sequence numbers are 0..7, got {value}")


# ---------------------------------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True, slots=True)
class HdlcAddress:
    """An HDLC address: ``upper`` (client SAP, or the server's logical device) and, for a server
    address in the 2- or 4-byte form, ``lower`` (the physical address). ``size_bytes`` is the encoded
    size (1, 2 or 4); decoded addresses keep the size they came in.
    """

    upper: int
    lower: int | None = None
    size_bytes: int = 1

    @classmethod
    def client(cls, sap: int) -> HdlcAddress:
        """A client address (one byte, SAP 0..127; 16 is the public client)."""
        return cls(sap, None, 1).checked()

    @classmethod
    def server(
        cls, logical_device: int, physical: int | None = None, size_bytes: int | None = None
    ) -> HdlcAddress:
        """A server address; ``size_bytes`` None picks the smallest form that holds both halves."""
        if size_bytes is None:
            if physical is None:
                size_bytes = 1
            elif logical_device <= 0x7F and physical <= 0x7F:
                size_bytes = 2
            else:
                size_bytes = 4
        return cls(logical_device, physical, size_bytes).checked()

    def checked(self) -> HdlcAddress:
        """This address, or LocalProtocolError when it cannot be encoded in ``size_bytes``."""
        limit = {1: 0x7F, 2: 0x7F, 4: 0x3FFF}.get(self.size_bytes)
        if limit is None:
            raise LocalProtocolError(f"HDLC addresses are 1, 2 or 4 bytes, not {self.size_bytes}")
        if self.size_bytes == 1 and self.lower is not None:
            raise LocalProtocolError("a one-byte HDLC address has no lower (physical) part")
        if self.size_bytes > 1 and self.lower is None:
            raise LocalProtocolError(f"a {self.size_bytes}-byte HDLC address needs a lower (physical) part")
        for part in (self.upper, self.lower):
            if part is not None and not 0 <= part <= limit:
                raise LocalProtocolError(
                    f"HDLC address part {part} out of range 0..{limit} ({self.size_bytes} bytes)"
                )
        return self

    def encode(self) -> bytes:
        """The address field bytes (the last one with its lowest bit set)."""
        if self.size_bytes == 1:
            return bytes([(self.upper << 1) | 1])
        lower = self.lower if self.lower is not None else 0
        if self.size_bytes == 2:
            return bytes([self.upper << 1, (lower << 1) | 1])
        return bytes(
            [(self.upper >> 7) << 1, (self.upper & 0x7F) << 1, (lower >> 7) << 1, ((lower & 0x7F) << 1) | 1]
        )

    def same_station(self, other: HdlcAddress) -> bool:
        """Whether both name the same station, whatever size each was encoded in."""
        return self.upper == other.upper and (self.lower or 0) == (other.lower or 0)

    def __str__(self) -> str:
        return str(self.upper) if self.lower is None else f"{self.upper}/{self.lower}"


def _address_size(data: bytes | bytearray, start: int) -> int:
    """Size of the address field at ``start``: 1..4 when its end bit was found, 0 when more bytes are
    needed, -1 when it is not a valid address field (no end bit within 4 bytes, or 3 bytes)."""
    for i in range(4):
        if start + i >= len(data):
            return 0
        if data[start + i] & 1:
            return -1 if i == 2 else i + 1
    return -1


def decode_address(field: bytes | bytearray) -> HdlcAddress:
    """Decode a complete 1-, 2- or 4-byte address field."""
    size = len(field)
    if size == 0 or not field[-1] & 1 or any(b & 1 for b in field[:-1]):
        raise RemoteProtocolError("HDLC address field without a proper end bit", bytes(field))
    if size == 1:
        return HdlcAddress(field[0] >> 1, None, 1)
    if size == 2:
        return HdlcAddress(field[0] >> 1, field[1] >> 1, 2)
    if size == 4:
        upper = ((field[0] >> 1) << 7) | (field[1] >> 1)
        lower = ((field[2] >> 1) << 7) | (field[3] >> 1)
        return HdlcAddress(upper, lower, 4)
    raise RemoteProtocolError(f"HDLC address field of {size} bytes (1, 2 or 4 expected)", bytes(field))


# ---------------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True, slots=True)
class HdlcFrame:
    """One HDLC frame: addresses, control byte, information field and the segmentation bit."""

    destination: HdlcAddress
    source: HdlcAddress
    control: int
    info: bytes = b""
    segmented: bool = False

    @property
    def kind(self) -> FrameKind:
        """What the control byte means."""
        return control_kind(self.control)

    @property
    def poll_final(self) -> bool:
        """The poll (command) or final (response) bit."""
        return bool(self.control & POLL_FINAL)

    @property
    def ns(self) -> int:
        """Send sequence number N(S) of an I frame."""
        return (self.control >> 1) & 0x07

    @property
    def nr(self) -> int:
        """Receive sequence number N(R) of an I, RR or RNR frame."""
        return (self.control >> 5) & 0x07

    def describe(self) -> str:
        """Short text for errors and traces, e.g. ``I N(S)=1 N(R)=2 P/F seg 128 bytes``."""
        kind = self.kind
        text = kind.value if kind is not FrameKind.UNKNOWN else f"control 0x{self.control:02X}"
        if kind is FrameKind.I:
            text += f" N(S)={self.ns} N(R)={self.nr}"
        elif kind in (FrameKind.RR, FrameKind.RNR):
            text += f" N(R)={self.nr}"
        if self.poll_final:
            text += " P/F"
        if self.segmented:
            text += " seg"
        if self.info:
            text += f" {len(self.info)} bytes"
        return text


def encode_frame(frame: HdlcFrame) -> bytes:
    """The frame with flags, HCS (when there is information) and FCS."""
    if not 0 <= frame.control <= 0xFF:
        raise LocalProtocolError(f"control byte out of range: {frame.control}")
    header_tail = (
        frame.destination.checked().encode() + frame.source.checked().encode() + bytes([frame.control])
    )
    info = frame.info
    length = 2 + len(header_tail) + (2 + len(info) if info else 0) + 2
    if length > MAX_FRAME_LENGTH:
        raise LocalProtocolError(f"HDLC frame of {length} bytes exceeds the 11-bit length field")
    fmt = FORMAT_TYPE_3 | (SEGMENTATION_BIT if frame.segmented else 0) | length
    body = bytearray(fmt.to_bytes(2, "big"))
    body += header_tail
    if info:
        body += crc16_x25(body).to_bytes(2, "little")
        body += info
    body += crc16_x25(body).to_bytes(2, "little")
    return bytes([FLAG]) + bytes(body) + bytes([FLAG])


def _header_size(data: bytes | bytearray, start: int) -> int:
    """Bytes of format + addresses + control from ``start`` (at the format field): >0 size, 0 need
    more, -1 invalid addresses."""
    dest = _address_size(data, start + 2)
    if dest <= 0:
        return dest
    src = _address_size(data, start + 2 + dest)
    if src <= 0:
        return src
    return 2 + dest + src + 1


def decode_frame(data: bytes | bytearray) -> HdlcFrame:
    """Decode one complete frame, flags included."""
    raw = bytes(data)
    if len(raw) < MIN_FRAME_LENGTH + 2 or raw[0] != FLAG or raw[-1] != FLAG:
        raise RemoteProtocolError("HDLC frame must be enclosed in 7E flags and hold at least 7 bytes", raw)
    fmt = int.from_bytes(raw[1:3], "big")
    if fmt & 0xF000 != FORMAT_TYPE_3:
        raise RemoteProtocolError(f"HDLC frame format type 0x{fmt >> 12:X} (type 3, 0xA, expected)", raw)
    length = fmt & LENGTH_MASK
    if length != len(raw) - 2:
        raise RemoteProtocolError(f"HDLC length field says {length} bytes, frame has {len(raw) - 2}", raw)
    return _decode_body(raw, 1, length, fmt & SEGMENTATION_BIT != 0)


def _decode_body(raw: bytes, start: int, length: int, segmented: bool) -> HdlcFrame:
    """Decode the frame body of ``length`` bytes at ``raw[start]`` (the format field)."""
    body = raw[start : start + length]
    if crc16_x25(body[:-2]) != int.from_bytes(body[-2:], "little"):
        raise RemoteProtocolError("HDLC frame check sequence (FCS) mismatch", raw)
    header = _header_size(body, 0)
    if header < 0 or header == 0:
        raise RemoteProtocolError("HDLC frame with an invalid address field", raw)
    rest = length - header - 2
    if rest == 0:
        info = b""
    elif rest >= 2:
        if crc16_x25(body[:header]) != int.from_bytes(body[header : header + 2], "little"):
            raise RemoteProtocolError("HDLC header check sequence (HCS) mismatch", raw)
        info = body[header + 2 : -2]
    else:
        raise RemoteProtocolError("HDLC frame too short for a header check sequence", raw)
    dest_size = _address_size(body, 2)
    destination = decode_address(body[2 : 2 + dest_size])
    source = decode_address(body[2 + dest_size : header - 1])
    return HdlcFrame(destination, source, body[header - 1], info, segmented)


class HdlcFrameReader:
    """Cuts HDLC frames out of a byte stream split anywhere; resynchronises after garbage.

    Frames are found by their length field (DLMS does no byte stuffing, so 0x7E may occur inside a
    frame). A candidate start is a flag followed by a type-3 format field; once its header is complete
    the HCS is checked (frames with information), so garbage announcing a long frame is dropped at once
    rather than after the bytes it announced. Two frames may share one flag. Bytes that belong to no
    frame are counted in :attr:`discarded_bytes`.

    :meth:`next_frame` returns a frame, None when more bytes are needed, or raises
    :class:`~dcud.errors.RemoteProtocolError` for a frame that was damaged on the line (FCS mismatch,
    malformed content); the reader then goes on after its opening flag. ``max_frame_length`` bounds
    what a length field may announce (at most 2047, the field's limit).
    """

    def __init__(self, max_frame_length: int = MAX_FRAME_LENGTH) -> None:
        if not MIN_FRAME_LENGTH <= max_frame_length <= MAX_FRAME_LENGTH:
            raise LocalProtocolError(f"max_frame_length must be {MIN_FRAME_LENGTH}..{MAX_FRAME_LENGTH}")
        self.max_frame_length = max_frame_length
        self._buf = bytearray()
        self.discarded_bytes = 0
        self.bad_frames = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes read from the line."""
        self._buf += data

    @property
    def in_frame(self) -> bool:
        """Whether a frame has started and is not complete (bytes beyond a lone flag are buffered)."""
        return len(self._buf) > 1

    @property
    def buffered_bytes(self) -> int:
        """Bytes held, waiting for the rest of a frame (at most ``max_frame_length + 2``)."""
        return len(self._buf)

    def clear(self) -> None:
        """Drop a partial frame (after a timeout: its rest will not come)."""
        self.discarded_bytes += len(self._buf)
        self._buf.clear()

    def _drop(self, count: int) -> None:
        self.discarded_bytes += count
        del self._buf[:count]

    def next_frame(self) -> HdlcFrame | None:
        """The next complete frame, or None when more bytes are needed (see the class docstring)."""
        buf = self._buf
        while True:
            start = buf.find(FLAG)
            if start < 0:
                self._drop(len(buf))
                return None
            if start:
                self._drop(start)
            # A run of flags: the last one may open the frame (shared or idle flags).
            while len(buf) >= 2 and buf[1] == FLAG:
                del buf[0]
            if len(buf) < 3:
                return None
            fmt = (buf[1] << 8) | buf[2]
            length = fmt & LENGTH_MASK
            if fmt & 0xF000 != FORMAT_TYPE_3 or not MIN_FRAME_LENGTH <= length <= self.max_frame_length:
                self._drop(1)
                continue
            header = _header_size(buf, 1)
            if header < 0 or (header > 0 and header + 2 > length):
                self._drop(1)
                continue
            if header == 0:
                return None
            has_info = length > header + 2
            if has_info and len(buf) >= 1 + header + 2:
                hcs = buf[1 + header] | (buf[2 + header] << 8)
                if crc16_x25(memoryview(buf)[1 : 1 + header]) != hcs:
                    self.bad_frames += 1
                    self._drop(1)
                    continue
            if len(buf) < length + 2:
                return None
            if buf[length + 1] != FLAG:
                self._drop(1)
                continue
            raw = bytes(buf[: length + 2])
            try:
                frame = _decode_body(raw, 1, length, fmt & SEGMENTATION_BIT != 0)
            except RemoteProtocolError:
                self.bad_frames += 1
                self._drop(1)
                raise
            # Keep the closing flag: it may open the next frame.
            del buf[: length + 1]
            return frame


# ---------------------------------------------------------------------------------------------------
# Parameter negotiation (SNRM / UA information field, IEC 62056-46 6.4.4.4.3.2)

_FORMAT_ID = 0x81
_GROUP_ID = 0x80
_PARAM_MAX_INFO_TX = 0x05
_PARAM_MAX_INFO_RX = 0x06
_PARAM_WINDOW_TX = 0x07
_PARAM_WINDOW_RX = 0x08


@dataclass(frozen=True, slots=True)
class HdlcParameters:
    """HDLC link parameters, seen from the station that sends them: maximum information field length
    it will transmit / can receive (bytes) and its transmit / receive window size (frames)."""

    max_info_tx: int = DEFAULT_MAX_INFO_BYTES
    max_info_rx: int = DEFAULT_MAX_INFO_BYTES
    window_tx: int = DEFAULT_WINDOW
    window_rx: int = DEFAULT_WINDOW

    def checked(self) -> HdlcParameters:
        """These parameters, or LocalProtocolError when one is out of range."""
        for name in ("max_info_tx", "max_info_rx"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_INFO_FIELD_BYTES:
                raise LocalProtocolError(f"HDLC {name} must be 1..{MAX_INFO_FIELD_BYTES}, got {value}")
        for name in ("window_tx", "window_rx"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_WINDOW:
                raise LocalProtocolError(f"HDLC {name} must be 1..{MAX_WINDOW}, got {value}")
        return self

    @property
    def is_default(self) -> bool:
        """Whether these are the defaults (128 bytes, window 1), which an SNRM need not carry."""
        return self == HdlcParameters()


def _param_value(value: int, size: int | None = None) -> bytes:
    if size is None:
        size = 1 if value <= 0xFF else 2
    return bytes([size]) + value.to_bytes(size, "big")


def encode_parameters(params: HdlcParameters) -> bytes:
    """The SNRM/UA information field for ``params`` (lengths in 1 or 2 bytes, windows in 4, as the
    Green Book's examples)."""
    params.checked()
    group = (
        bytes([_PARAM_MAX_INFO_TX])
        + _param_value(params.max_info_tx)
        + bytes([_PARAM_MAX_INFO_RX])
        + _param_value(params.max_info_rx)
        + bytes([_PARAM_WINDOW_TX])
        + _param_value(params.window_tx, 4)
        + bytes([_PARAM_WINDOW_RX])
        + _param_value(params.window_rx, 4)
    )
    return bytes([_FORMAT_ID, _GROUP_ID, len(group)]) + group


def decode_parameters(info: bytes) -> HdlcParameters:
    """Parse an SNRM/UA information field; absent parameters keep their defaults.

    Parameters of other groups or with other identifiers are skipped. Values are checked: a maximum
    information field length of 0 or beyond what a frame can carry, or a window outside 1..7, raise
    :class:`~dcud.errors.RemoteProtocolError`.
    """
    if not info:
        return HdlcParameters()
    if len(info) < 3 or info[0] != _FORMAT_ID:
        raise RemoteProtocolError("HDLC parameter field does not start with format identifier 81", info)
    values = {
        _PARAM_MAX_INFO_TX: DEFAULT_MAX_INFO_BYTES,
        _PARAM_MAX_INFO_RX: DEFAULT_MAX_INFO_BYTES,
        _PARAM_WINDOW_TX: DEFAULT_WINDOW,
        _PARAM_WINDOW_RX: DEFAULT_WINDOW,
    }
    pos = 1
    while pos < len(info):
        if pos + 2 > len(info):
            raise RemoteProtocolError("HDLC parameter group header truncated", info)
        group_id, group_len = info[pos], info[pos + 1]
        end = pos + 2 + group_len
        if end > len(info):
            raise RemoteProtocolError("HDLC parameter group longer than the information field", info)
        if group_id == _GROUP_ID:
            p = pos + 2
            while p < end:
                if p + 2 > end:
                    raise RemoteProtocolError("HDLC parameter truncated", info)
                pid, plen = info[p], info[p + 1]
                if p + 2 + plen > end:
                    raise RemoteProtocolError(f"HDLC parameter {pid:#04x} longer than its group", info)
                if pid in values:
                    if not 1 <= plen <= 4:
                        raise RemoteProtocolError(f"HDLC parameter {pid:#04x} of {plen} bytes", info)
                    values[pid] = int.from_bytes(info[p + 2 : p + 2 + plen], "big")
                p += 2 + plen
        pos = end
    params = HdlcParameters(
        max_info_tx=values[_PARAM_MAX_INFO_TX],
        max_info_rx=values[_PARAM_MAX_INFO_RX],
        window_tx=values[_PARAM_WINDOW_TX],
        window_rx=values[_PARAM_WINDOW_RX],
    )
    try:
        return params.checked()
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"HDLC parameters out of range: {exc}", info) from None


def negotiate(proposed: HdlcParameters, reply: HdlcParameters) -> HdlcParameters:
    """What the client may use, from its SNRM proposal and the server's UA reply.

    Both are seen from their sender, so the client's transmit limits are the server's receive ones and
    vice versa; a server that answers with more than was proposed gets the proposal (never more).
    The result is seen from the client.
    """
    return HdlcParameters(
        max_info_tx=min(proposed.max_info_tx, reply.max_info_rx),
        max_info_rx=min(proposed.max_info_rx, reply.max_info_tx),
        window_tx=min(proposed.window_tx, reply.window_rx),
        window_rx=min(proposed.window_rx, reply.window_tx),
    )


# ---------------------------------------------------------------------------------------------------
# FRMR


def describe_frmr(info: bytes) -> str:
    """Human text for an FRMR information field (rejected control, V(S)/V(R), W X Y Z reasons)."""
    if len(info) < 3:
        return "frame reject"
    reasons = []
    flags = info[2]
    if flags & 0x01:
        reasons.append("invalid or unimplemented control field (W)")
    if flags & 0x02:
        reasons.append("information field not permitted (X)")
    if flags & 0x04:
        reasons.append("information field too long (Y)")
    if flags & 0x08:
        reasons.append("invalid N(R) (Z)")
    vs = (info[1] >> 1) & 0x07
    vr = (info[1] >> 5) & 0x07
    why = ", ".join(reasons) or "no reason given"
    return f"frame reject of control 0x{info[0]:02X} (server V(S)={vs} V(R)={vr}): {why}"
