"""M-Bus link layer (EN 13757-2, FT1.2 of IEC 60870-5-1/-2), sans-I/O.

Frames: single character ``E5``, short ``10 C A CS 16``, control ``68 03 03 68 C A CI CS 16`` and long
``68 L L 68 C A CI data CS 16``. :class:`MbusLinkParser` cuts frames out of a byte stream and
resynchronises after garbage (noise, collisions, a half frame); the ``encode_*`` functions build the
master requests used by :mod:`dcud.codec.mbus_session`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dcud.errors import LocalProtocolError, RemoteProtocolError

ACK = 0xE5
"""The single-character acknowledge."""
START_SHORT = 0x10
START_LONG = 0x68
STOP = 0x16

C_SND_NKE = 0x40
"""Link reset (master to slave)."""
C_SND_UD = 0x53
"""Send user data, FCB 0 (master to slave)."""
C_REQ_UD1 = 0x5A
"""Request class-1 data, FCB 0."""
C_REQ_UD2 = 0x5B
"""Request class-2 data, FCB 0."""
C_RSP_UD = 0x08
"""Slave data reply (ACD/DFC clear)."""
C_MASK_PRM = 0x40
"""Direction bit: 1 = master to slave."""
C_MASK_FCB = 0x20
"""Frame count bit (master to slave) / ACD (slave to master)."""
C_MASK_FCV = 0x10
"""Frame count valid (master to slave) / DFC (slave to master)."""
C_MASK_FUNCTION = 0x0F

ADDRESS_UNCONFIGURED = 0
ADDRESS_MAX_SLAVE = 250
ADDRESS_NETWORK = 253
"""Network layer: the slave selected by secondary address."""
ADDRESS_BROADCAST_REPLY = 254
"""Broadcast, every slave replies (point-to-point and tests only)."""
ADDRESS_BROADCAST = 255
"""Broadcast, nobody replies."""

CI_APPLICATION_RESET = 0x50
CI_DATA_SEND = 0x51
CI_SELECT = 0x52
CI_SELECT_MSB = 0x56
CI_SET_BAUD_BASE = 0xB8

BAUD_RATES: tuple[int, ...] = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400)
"""CI B8..BF in order."""

MAX_LONG_FRAME_BYTES = 261
"""``68 L L 68`` + 255 bytes + ``CS 16``."""

_DEFAULT_MAX_GARBAGE_KEPT_BYTES = 256


class FrameKind(enum.Enum):
    """The four FT1.2 frame formats used by M-Bus."""

    ACK = "ack"
    SHORT = "short"
    CONTROL = "control"
    LONG = "long"


@dataclass(frozen=True, slots=True)
class MbusFrame:
    """One link-layer frame; ``ci`` is None for ACK and short frames, ``data`` excludes C, A, CI."""

    kind: FrameKind
    control: int = 0
    address: int = 0
    ci: int | None = None
    data: bytes = b""

    @property
    def fcb(self) -> bool:
        """Frame count bit (meaningful on master requests with FCV set)."""
        return bool(self.control & C_MASK_FCB)

    @property
    def fcv(self) -> bool:
        """Frame count valid bit (master requests)."""
        return bool(self.control & C_MASK_FCV)

    @property
    def from_master(self) -> bool:
        """True when the PRM bit says master to slave (False for ACK)."""
        return self.kind is not FrameKind.ACK and bool(self.control & C_MASK_PRM)

    @property
    def function(self) -> int:
        """The C-field function code (bits 3..0)."""
        return self.control & C_MASK_FUNCTION

    @property
    def is_rsp_ud(self) -> bool:
        """A slave's RSP_UD (long or control frame, PRM clear, function 8)."""
        return (
            self.kind in (FrameKind.LONG, FrameKind.CONTROL)
            and not self.control & C_MASK_PRM
            and self.function == (C_RSP_UD & C_MASK_FUNCTION)
        )

    def encode(self) -> bytes:
        """Serialise the frame with its checksum."""
        if self.kind is FrameKind.ACK:
            return bytes([ACK])
        if self.kind is FrameKind.SHORT:
            return encode_short(self.control, self.address)
        if self.ci is None:
            raise LocalProtocolError("long/control frame needs a CI field")
        if self.kind is FrameKind.CONTROL and self.data:
            raise LocalProtocolError("control frame carries no data")
        return encode_long(self.control, self.address, self.ci, self.data)


@dataclass(frozen=True, slots=True)
class Garbage:
    """Bytes the parser skipped while resynchronising (noise, collision, broken frame).

    ``size_bytes`` counts every skipped byte; ``head`` keeps at most the first 256 for diagnostics.
    """

    size_bytes: int
    head: bytes


LinkEvent = MbusFrame | Garbage
"""What :meth:`MbusLinkParser.next_event` hands out."""


def checksum(data: bytes) -> int:
    """Arithmetic sum modulo 256 (FT1.2 CS)."""
    return sum(data) & 0xFF


def _check_byte(value: int, name: str) -> None:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"{name} out of range: {value}")


def encode_short(control: int, address: int) -> bytes:
    """Short frame ``10 C A CS 16``."""
    _check_byte(control, "C field")
    _check_byte(address, "address")
    return bytes([START_SHORT, control, address, (control + address) & 0xFF, STOP])


def encode_long(control: int, address: int, ci: int, data: bytes = b"") -> bytes:
    """Long frame (control frame when ``data`` is empty) ``68 L L 68 C A CI data CS 16``."""
    _check_byte(control, "C field")
    _check_byte(address, "address")
    _check_byte(ci, "CI field")
    length = 3 + len(data)
    if length > 255:
        raise LocalProtocolError(f"user data too long: {len(data)} bytes (max 252)")
    body = bytes([control, address, ci]) + bytes(data)
    return bytes([START_LONG, length, length, START_LONG]) + body + bytes([checksum(body), STOP])


def _fcb_bits(fcb: bool) -> int:
    return C_MASK_FCB if fcb else 0


def encode_snd_nke(address: int) -> bytes:
    """SND_NKE (link reset) to ``address``; ``10 40 A CS 16``."""
    return encode_short(C_SND_NKE, address)


def encode_req_ud2(address: int, fcb: bool = False) -> bytes:
    """REQ_UD2 (class-2 data request) with FCV set and the given FCB: ``10 5B/7B A CS 16``."""
    return encode_short(C_REQ_UD2 | _fcb_bits(fcb), address)


def encode_req_ud1(address: int, fcb: bool = False) -> bytes:
    """REQ_UD1 (class-1 / alarm data request): ``10 5A/7A A CS 16``."""
    return encode_short(C_REQ_UD1 | _fcb_bits(fcb), address)


def encode_snd_ud(address: int, ci: int, data: bytes = b"", fcb: bool = False) -> bytes:
    """SND_UD (send user data) with FCV set and the given FCB: ``68 L L 68 53/73 A CI data CS 16``."""
    return encode_long(C_SND_UD | _fcb_bits(fcb), address, ci, data)


def encode_application_reset(address: int, subcode: int | None = None, fcb: bool = False) -> bytes:
    """SND_UD with CI 50 (application reset), optionally with the one-byte subcode."""
    return encode_snd_ud(address, CI_APPLICATION_RESET, b"" if subcode is None else bytes([subcode]), fcb)


def encode_set_address(address: int, new_address: int, fcb: bool = False) -> bytes:
    """Set the primary address: SND_UD CI 51, record ``01 7A new`` (DIF int8, VIF bus address)."""
    if not 0 <= new_address <= ADDRESS_MAX_SLAVE:
        raise LocalProtocolError(f"primary address must be 0..250, not {new_address}")
    return encode_snd_ud(address, CI_DATA_SEND, bytes([0x01, 0x7A, new_address]), fcb)


def encode_set_baud(address: int, baud: int, fcb: bool = False) -> bytes:
    """Switch the slave's baud rate: control frame with CI B8..BF (the slave ACKs at the old rate)."""
    try:
        ci = CI_SET_BAUD_BASE + BAUD_RATES.index(baud)
    except ValueError:
        raise LocalProtocolError(f"unsupported M-Bus baud rate {baud}") from None
    return encode_snd_ud(address, ci, b"", fcb)


def encode_manufacturer(code: str) -> int:
    """Pack three letters A..Z into the 16-bit manufacturer field (``ACW`` -> 0x0477)."""
    if len(code) != 3 or not all("A" <= c <= "Z" for c in code.upper()):
        raise LocalProtocolError(f"manufacturer must be three letters A-Z, not {code!r}")
    c1, c2, c3 = (ord(c) - 64 for c in code.upper())
    return (c1 << 10) | (c2 << 5) | c3


def decode_manufacturer(value: int) -> str:
    """Unpack the 16-bit manufacturer field into three letters (bit 15 ignored)."""
    return "".join(chr(((value >> shift) & 0x1F) + 64) for shift in (10, 5, 0))


def _bcd_id_bytes(ident: str) -> bytes:
    """8 hex/BCD digits (MSD first, ``F`` wildcards allowed) -> 4 bytes LSB first."""
    if len(ident) != 8:
        raise LocalProtocolError(f"identification must have 8 digits, not {ident!r}")
    try:
        raw = bytes.fromhex(ident)
    except ValueError:
        raise LocalProtocolError(f"identification must be hex/BCD digits, not {ident!r}") from None
    return raw[::-1]


def secondary_address_bytes(mask: str) -> bytes:
    """A 16-hex-digit secondary address mask ``IIIIIIIIMMMMVVDD`` -> the 8 bytes of a select.

    ID digits MSD first as printed (``F`` = wildcard digit), manufacturer as 4 hex digits (``FFFF`` =
    any), version and medium as 2 hex digits (``FF`` = any).
    """
    if len(mask) != 16:
        raise LocalProtocolError(f"secondary address mask must have 16 hex digits, not {mask!r}")
    try:
        man = int(mask[8:12], 16)
        ver = int(mask[12:14], 16)
        med = int(mask[14:16], 16)
    except ValueError:
        raise LocalProtocolError(f"secondary address mask must be hex, not {mask!r}") from None
    return _bcd_id_bytes(mask[:8]) + bytes([man & 0xFF, man >> 8, ver, med])


def secondary_address_mask(
    ident: str = "FFFFFFFF",
    manufacturer: str | int | None = None,
    version: int | None = None,
    medium: int | None = None,
) -> str:
    """Build a 16-hex-digit mask; None means wildcard, ``manufacturer`` as letters or packed int."""
    _bcd_id_bytes(ident)
    if manufacturer is None:
        man = 0xFFFF
    elif isinstance(manufacturer, str):
        man = encode_manufacturer(manufacturer)
    else:
        man = manufacturer
    ver = 0xFF if version is None else version
    med = 0xFF if medium is None else medium
    if not (0 <= man <= 0xFFFF and 0 <= ver <= 0xFF and 0 <= med <= 0xFF):
        raise LocalProtocolError("manufacturer/version/medium out of range")
    return f"{ident.upper()}{man:04X}{ver:02X}{med:02X}"


def encode_select(mask: str, fcb: bool = False) -> bytes:
    """Secondary-address selection: SND_UD to 253 with CI 52 and the 8 mask bytes (wildcards F)."""
    return encode_snd_ud(ADDRESS_NETWORK, CI_SELECT, secondary_address_bytes(mask), fcb)


def encode_set_secondary(
    address: int, ident: str, manufacturer: str | int, *, version: int, medium: int, fcb: bool = False
) -> bytes:
    """Change a slave's full secondary address: SND_UD CI 51, record DIF 07 VIF 79 + 8 header bytes."""
    mask = secondary_address_mask(ident, manufacturer, version, medium)
    return encode_snd_ud(address, CI_DATA_SEND, bytes([0x07, 0x79]) + secondary_address_bytes(mask), fcb)


def decode_frame(data: bytes) -> MbusFrame:
    """Decode exactly one frame; anything else (short, long, trailing bytes) is RemoteProtocolError."""
    raw = bytes(data)
    if not raw:
        raise RemoteProtocolError("empty frame", raw)
    frame, used = _try_frame(raw)
    if frame is None:
        if used == 0:
            raise RemoteProtocolError(f"incomplete frame ({len(raw)} bytes)", raw)
        raise RemoteProtocolError(_describe_bad(raw), raw)
    if used != len(raw):
        raise RemoteProtocolError(f"{len(raw) - used} bytes after the frame", raw)
    return frame


def _describe_bad(raw: bytes) -> str:
    first = raw[0]
    if first == START_SHORT:
        if raw[4] != STOP:
            return "short frame without stop byte 16"
        return "short frame checksum mismatch"
    if first == START_LONG:
        # Same order and bounds as _try_frame: a header shorter than 4 bytes is refused early there
        # (found by tests/fuzz: b"\x68\xe5\x10" used to raise IndexError here).
        if len(raw) >= 2 and raw[1] < 3:
            return f"long frame length {raw[1]} below 3"
        if len(raw) >= 3 and raw[1] != raw[2]:
            return "long frame length fields differ"
        if len(raw) >= 4 and raw[3] != START_LONG:
            return "long frame without second start byte 68"
        end = raw[1] + 6
        if raw[end - 1] != STOP:
            return "long frame without stop byte 16"
        return "long frame checksum mismatch"
    return f"no frame starts with byte {first:02X}"


def _try_frame(buf: bytes | bytearray, pos: int = 0) -> tuple[MbusFrame | None, int]:
    """Look for a frame at ``buf[pos]``.

    Returns ``(frame, size)`` for a good frame, ``(None, 0)`` when more bytes are needed to decide and
    ``(None, 1)`` when no frame starts here. The decision never depends on how the bytes were chunked:
    it is taken only once every byte it looks at is present.
    """
    avail = len(buf) - pos
    first = buf[pos]
    if first == ACK:
        return MbusFrame(FrameKind.ACK), 1
    if first == START_SHORT:
        if avail < 5:
            return None, 0
        c, a, cs, stop = buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]
        if stop != STOP or (c + a) & 0xFF != cs:
            return None, 1
        return MbusFrame(FrameKind.SHORT, c, a), 5
    if first == START_LONG:
        if avail >= 2 and buf[pos + 1] < 3:
            return None, 1
        if avail >= 3 and buf[pos + 2] != buf[pos + 1]:
            return None, 1
        if avail >= 4 and buf[pos + 3] != START_LONG:
            return None, 1
        if avail < 4:
            return None, 0
        length = buf[pos + 1]
        total = length + 6
        if avail < total:
            return None, 0
        body = bytes(buf[pos + 4 : pos + 4 + length])
        if buf[pos + total - 1] != STOP or checksum(body) != buf[pos + total - 2]:
            return None, 1
        kind = FrameKind.CONTROL if length == 3 else FrameKind.LONG
        return MbusFrame(kind, body[0], body[1], body[2], body[3:]), total
    return None, 1


class MbusLinkParser:
    """Incremental FT1.2 parser: ``receive_data(bytes)`` then ``next_event()`` until it returns None.

    Bytes that cannot start a frame, and frames that fail their length/checksum/stop checks, are skipped
    one byte at a time (resynchronisation); the skipped bytes come out as one :class:`Garbage` event
    just before the next frame, or at :meth:`flush`. Results do not depend on how the input was split.
    The buffer is bounded: at most one frame (261 bytes) waits for completion at any time. Call
    :meth:`flush` when the answer window closes.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._garbage_size = 0
        self._garbage_head = bytearray()
        self.frames_total = 0
        """Frames handed out since creation."""
        self.garbage_bytes_total = 0
        """Bytes skipped since creation."""

    def receive_data(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    @property
    def pending_bytes(self) -> int:
        """Bytes held: a partial frame not yet decided plus skipped garbage not yet reported."""
        return len(self._buf) + self._garbage_size

    def _skip(self, count: int) -> None:
        room = _DEFAULT_MAX_GARBAGE_KEPT_BYTES - len(self._garbage_head)
        if room > 0:
            self._garbage_head += self._buf[: min(room, count)]
        self._garbage_size += count
        self.garbage_bytes_total += count
        del self._buf[:count]

    def _take_garbage(self) -> Garbage:
        event = Garbage(self._garbage_size, bytes(self._garbage_head))
        self._garbage_size = 0
        self._garbage_head.clear()
        return event

    def next_event(self) -> LinkEvent | None:
        """The next frame (preceded by a Garbage event if bytes were skipped), or None: need data."""
        while self._buf:
            frame, used = _try_frame(self._buf)
            if frame is None and used == 0:
                return None
            if frame is None:
                # Skip to the next byte that could start a frame, in one go.
                nxt = 1
                while nxt < len(self._buf) and self._buf[nxt] not in (ACK, START_SHORT, START_LONG):
                    nxt += 1
                self._skip(nxt)
                continue
            if self._garbage_size:
                return self._take_garbage()
            del self._buf[:used]
            self.frames_total += 1
            return frame
        return None

    def events(self) -> list[LinkEvent]:
        """Drain every event available now."""
        out: list[LinkEvent] = []
        while (event := self.next_event()) is not None:
            out.append(event)
        return out

    def flush(self) -> list[LinkEvent]:
        """End of reception (a timeout): resolve everything held.

        A frame start still waiting for bytes will never complete, so it is skipped like any garbage and
        the bytes after it are searched again (a complete frame may hide behind a false header). Returns
        the remaining events, ending with one Garbage event if anything was skipped.
        """
        out: list[LinkEvent] = []
        while True:
            out += self.events()
            if not self._buf:
                break
            self._skip(1)
        if self._garbage_size:
            out.append(self._take_garbage())
        return out

    def clear(self) -> None:
        """Discard everything held without reporting it."""
        self._buf.clear()
        self._garbage_size = 0
        self._garbage_head.clear()
