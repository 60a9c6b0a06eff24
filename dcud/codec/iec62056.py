"""IEC 62056-21 (ex IEC 61107) messages and the DSMR P1 telegram, sans-I/O.

Encoders build the master's messages (request, option select, programming commands) and, for the
simulator, the meter's (identification, data message, error message). Parsers take complete frames;
:class:`IecReceiver` cuts frames out of an arbitrarily chunked byte stream. Everything follows
``protocols.md`` section 1: 7-bit ASCII, BCC = XOR of the bytes after SOH/STX up to and including
ETX/EOT (or, per meter, the Kamstrup 7-bit arithmetic sum, or no BCC at all).

Errors: :class:`~dcud.errors.RemoteProtocolError` for garbage from the peer (:class:`BccError` for a
check byte mismatch, so a session can ask for a repeat), :class:`~dcud.errors.NegativeResponse` for an
error message ``(ERxx)``, :class:`~dcud.errors.LocalProtocolError` when asked to encode something illegal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from dcud.codec.crc import crc16_reflected_8005
from dcud.errors import DcudError, LocalProtocolError, NegativeResponse, RemoteProtocolError

SOH = 0x01
STX = 0x02
ETX = 0x03
EOT = 0x04
ACK = 0x06
NAK = 0x15
CR = 0x0D
LF = 0x0A

BccMode = Literal["xor", "sum7", "none"]
"""How the block check character is formed: standard XOR, Kamstrup 7-bit sum, or not sent at all."""
BCC_MODES: tuple[BccMode, ...] = ("xor", "sum7", "none")

ReceiverSide = Literal["master", "meter", "p1"]
"""Which messages an :class:`IecReceiver` expects: the meter's, the master's, or DSMR P1 telegrams."""

Mode = Literal["A", "B", "C", "D", "E"]

MODE_C_BAUD: dict[str, int] = {
    "0": 300,
    "1": 600,
    "2": 1200,
    "3": 2400,
    "4": 4800,
    "5": 9600,
    "6": 19200,
}
"""Baud character -> rate for modes C and E (selected with the option-select message)."""

MODE_B_BAUD: dict[str, int] = {"A": 600, "B": 1200, "C": 2400, "D": 4800, "E": 9600, "F": 19200}
"""Baud character -> rate for mode B (the meter switches by itself after its identification)."""

MODE_D_BAUD = 2400
INITIAL_BAUD = 300
BITS_PER_CHAR = 10
"""7E1 and 8N1 both put 10 bits on the wire per character."""

REACTION_MIN_S = 0.2
REACTION_MIN_FAST_S = 0.02
REACTION_MAX_S = 1.5
INTER_CHAR_MAX_S = 1.5

MAX_ADDRESS_CHARS = 32
MAX_IDENT_LINE_BYTES = 128
"""An identification line longer than this is garbage (the standard allows 16 ident characters)."""
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

_ADDRESS_RE = re.compile(r"[0-9A-Za-z ]*")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SPACE_UNIT_RE = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s+([A-Za-z%][A-Za-z0-9%/^.]*)")
_ERROR_RE = re.compile(r"\(\s*(ER[0-9A-Za-z]*)\s*\)\s*")
_BAD_CTRL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_END_RE = re.compile(b"[\x03\x04]")
_HEX_RE = re.compile(r"[0-9A-Fa-f]{1,4}")


def char_time_s(baud: int) -> float:
    """Seconds one character takes on the wire at ``baud`` (10 bits: 7E1 or 8N1)."""
    return BITS_PER_CHAR / baud


def tx_time_s(size_bytes: int, baud: int) -> float:
    """Seconds ``size_bytes`` characters take on the wire at ``baud``."""
    return size_bytes * BITS_PER_CHAR / baud


# ---------------------------------------------------------------------------------------------------
# Check characters


def _xor_fold(data: bytes) -> int:
    if len(data) < 64:
        acc = 0
        for byte in data:
            acc ^= byte
        return acc
    # XOR of all bytes by folding one big integer in halves: log2(n) C-speed steps, not n Python steps.
    size = 1 << (len(data) - 1).bit_length()
    value = int.from_bytes(data, "little")
    while size > 1:
        size //= 2
        value = (value >> (size * 8)) ^ (value & ((1 << (size * 8)) - 1))
    return value


def compute_bcc(data: bytes, mode: BccMode = "xor") -> int:
    """Block check character over ``data`` (already cut to after SOH/STX .. ETX/EOT inclusive).

    ``xor`` is the standard; ``sum7`` is the Kamstrup quirk (arithmetic sum & 7F). ``none`` has no BCC.
    """
    if mode == "xor":
        return _xor_fold(data)
    if mode == "sum7":
        return sum(data) & 0x7F
    raise LocalProtocolError(f"no BCC in bcc mode {mode!r}")


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (poly 8005 reflected = A001, init 0, no final XOR), as DSMR P1 uses over ``/``..``!``."""
    return crc16_reflected_8005(data, 0)


class BccError(RemoteProtocolError):
    """The block check character does not match: the frame was damaged on the line (NAK may help)."""

    def __init__(self, message: str, frame: bytes, expected: int, received: int) -> None:
        super().__init__(message, frame)
        self.expected = expected
        self.received = received


class HdlcModeRequiredError(DcudError):
    """The meter announced mode E (``\\2``): it speaks DLMS over HDLC, not an IEC 62056-21 readout
    (``dcud.codec.dlms.hdlc_link.HdlcLink`` with ``mode_e`` signs on and reads it)."""

    def __init__(self, ident: Identification) -> None:
        super().__init__(
            f"meter {ident.manufacturer}{ident.ident} announces mode E/HDLC (DLMS):"
            ' read it as protocol = "dlms" with mode_e = true'
        )
        self.ident = ident


# ---------------------------------------------------------------------------------------------------
# Addresses


def validate_address(address: str) -> str:
    """Return ``address`` if it is a legal device address (<= 32 of ``0-9 A-Z a-z space``), else raise."""
    if len(address) > MAX_ADDRESS_CHARS or not _ADDRESS_RE.fullmatch(address):
        raise LocalProtocolError(f"illegal IEC 62056-21 device address {address!r}")
    return address


def normalize_address(address: str) -> str:
    """Address with leading zeros dropped; an all-zero address becomes ``"0"`` and ``""`` stays ``""``."""
    stripped = address.lstrip("0")
    if not stripped and address:
        return "0"
    return stripped


def address_matches(requested: str, own: str) -> bool:
    """Whether a request for ``requested`` must be answered by a meter whose address is ``own``.

    The general request (empty address) matches every meter; leading zeros are ignored on both sides.
    """
    return requested == "" or normalize_address(requested) == normalize_address(own)


# ---------------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class DataSet:
    """One data set ``address(value*unit)(value*unit)...``: ``values`` holds ``(value, unit or None)``."""

    address: str
    values: list[tuple[str, str | None]]


@dataclass(frozen=True)
class Request:
    """Sign-on request ``/?address!CRLF`` (``address`` empty for the general request)."""

    address: str


@dataclass(frozen=True)
class Identification:
    """Identification message ``/XXXZ[\\W...]ident CRLF``.

    ``mode`` and ``baud`` follow from the baud character ``baud_char``: digits are mode C (mode E when a
    ``\\2`` escape is present), ``A``..``F`` mode B, anything else mode A at 300 Bd; a pushed
    identification is mode D. ``fast_reaction`` is set when the third manufacturer letter is lower case
    (20 ms minimum reaction time instead of 200 ms).
    """

    manufacturer: str
    baud_char: str
    ident: str
    escapes: tuple[str, ...]
    mode: Mode
    baud: int
    fast_reaction: bool
    raw: bytes

    @property
    def reaction_min_s(self) -> float:
        """Minimum time the master must wait before answering this meter (tr_min)."""
        return REACTION_MIN_FAST_S if self.fast_reaction else REACTION_MIN_S


@dataclass(frozen=True)
class OptionSelect:
    """Acknowledgement/option select ``ACK V Z Y CRLF``."""

    protocol_control: str
    baud_char: str
    mode_control: str

    @property
    def baud(self) -> int | None:
        """Rate the master asks for, or None for a character that names no mode C rate."""
        return MODE_C_BAUD.get(self.baud_char)


@dataclass(frozen=True)
class Ack:
    """Single ACK (06): positive acknowledgement in programming mode."""


@dataclass(frozen=True)
class Nak:
    """Single NAK (15): repeat request / protocol error."""


@dataclass(frozen=True)
class DataMessage:
    """``STX block ETX BCC`` from the meter.

    ``readout`` is true when the block ended with ``! CRLF`` (a data readout) and false for a
    programming-mode data message; ``partial`` when it ended with EOT. ``bcc_ok`` is true when a BCC was
    present and verified (a mismatch raises :class:`BccError`), false when the meter sends none.
    ``raw`` is the whole frame, STX to BCC, as received.
    """

    block: str
    datasets: list[DataSet]
    raw: bytes
    bcc_ok: bool
    readout: bool
    partial: bool


@dataclass(frozen=True)
class CommandMessage:
    """Programming command ``SOH C D [STX data] ETX BCC`` (``command`` is ``C D``, e.g. ``"P0"``)."""

    command: str
    data: str
    raw: bytes
    bcc_ok: bool
    partial: bool


@dataclass(frozen=True)
class P1Telegram:
    """Pushed mode D / DSMR P1 telegram ``/ident CRLF CRLF data ! [CRC] CRLF``.

    ``crc`` is None when the telegram carries none (DSMR < 4); when present it has been verified.
    """

    ident: Identification
    block: str
    datasets: list[DataSet]
    crc: int | None
    raw: bytes


Message: TypeAlias = (
    Request | Identification | OptionSelect | Ack | Nak | DataMessage | CommandMessage | P1Telegram
)


# ---------------------------------------------------------------------------------------------------
# Encoders


def encode_request(address: str = "") -> bytes:
    """Sign-on request ``/?address!CRLF``; an empty address is the general request (one meter only!)."""
    return b"/?" + validate_address(address).encode("ascii") + b"!\r\n"


def encode_identification(
    manufacturer: str, baud_char: str, ident: str, escapes: Iterable[str] = ()
) -> bytes:
    """Identification line the meter sends (simulator side)."""
    if len(manufacturer) != 3 or not all(_is_printable(c) and c not in "/!" for c in manufacturer):
        raise LocalProtocolError(f"manufacturer id must be 3 printable characters, got {manufacturer!r}")
    if len(baud_char) != 1 or not _is_printable(baud_char, space=True) or baud_char in "/!":
        raise LocalProtocolError(f"illegal baud character {baud_char!r}")
    esc = "".join("\\" + e for e in escapes)
    for ch in esc + ident:
        if not _is_printable(ch, space=True):
            raise LocalProtocolError(f"illegal character in identification {ident!r}")
    return ("/" + manufacturer + baud_char + esc + ident + "\r\n").encode("ascii")


def encode_option_select(baud_char: str, mode_control: str = "0", protocol_control: str = "0") -> bytes:
    """Option select ``ACK V Z Y CRLF`` (readout: ``Y = 0``; programming: ``1``; HDLC: ``V = Y = 2``)."""
    if protocol_control not in ("0", "1", "2"):
        raise LocalProtocolError(f"protocol control character must be 0, 1 or 2, got {protocol_control!r}")
    if baud_char not in MODE_C_BAUD:
        raise LocalProtocolError(f"baud character must be 0..6, got {baud_char!r}")
    if mode_control not in ("0", "1", "2", "6", "7", "8", "9"):
        raise LocalProtocolError(f"mode control character must be 0, 1, 2 or 6..9, got {mode_control!r}")
    return bytes([ACK]) + (protocol_control + baud_char + mode_control).encode("ascii") + b"\r\n"


def _is_printable(ch: str, *, space: bool = False) -> bool:
    return ("\x20" if space else "\x21") <= ch <= "\x7e"


def encode_datasets(datasets: Iterable[DataSet]) -> str:
    """Data block text, one data set per CRLF-terminated line (values and units validated)."""
    out: list[str] = []
    for ds in datasets:
        addr = ds.address
        if not addr or any(c in "()/!" or not _is_printable(c) for c in addr):
            raise LocalProtocolError(f"illegal data set address {addr!r}")
        if not ds.values:
            raise LocalProtocolError(f"data set {addr!r} has no value")
        parts = [addr]
        for value, unit in ds.values:
            if any(c in "()*/!" or not _is_printable(c, space=True) for c in value):
                raise LocalProtocolError(f"illegal value {value!r} for {addr!r}")
            if unit is None:
                parts.append(f"({value})")
            else:
                if not unit or any(c in "()!*" or not _is_printable(c) for c in unit):
                    raise LocalProtocolError(f"illegal unit {unit!r} for {addr!r}")
                parts.append(f"({value}*{unit})")
        out.append("".join(parts) + "\r\n")
    return "".join(out)


def _frame(start: int, body: bytes, end: int, bcc_mode: BccMode) -> bytes:
    covered = body + bytes([end])
    if bcc_mode == "none":
        return bytes([start]) + covered
    return bytes([start]) + covered + bytes([compute_bcc(covered, bcc_mode)])


def encode_data_message(datasets: Iterable[DataSet], bcc_mode: BccMode = "xor") -> bytes:
    """Readout data message ``STX block ! CRLF ETX BCC`` (simulator side)."""
    body = (encode_datasets(datasets) + "!\r\n").encode("ascii")
    return _frame(STX, body, ETX, bcc_mode)


def encode_error_message(text: str, bcc_mode: BccMode = "xor") -> bytes:
    """Error message ``STX (text) ETX BCC`` (simulator side; vendors use ``ERxx``)."""
    if len(text) > 32 or any(c in "()" or not _is_printable(c, space=True) for c in text):
        raise LocalProtocolError(f"illegal error text {text!r}")
    return _frame(STX, f"({text})".encode("ascii"), ETX, bcc_mode)


def encode_command(
    command: str, data: str = "", *, partial: bool = False, bcc_mode: BccMode = "xor"
) -> bytes:
    """Programming command ``SOH C D STX data ETX BCC`` (``SOH C D ETX BCC`` when ``data`` is empty).

    ``partial`` ends the block with EOT instead of ETX.
    """
    if len(command) != 2 or command[0] not in "PWREB" or not command[1].isdigit():
        raise LocalProtocolError(f"illegal command {command!r}")
    if any(not _is_printable(c, space=True) for c in data):
        raise LocalProtocolError("illegal character in command data")
    body = command.encode("ascii")
    if data:
        body += bytes([STX]) + data.encode("ascii")
    return _frame(SOH, body, EOT if partial else ETX, bcc_mode)


def encode_password(password: str, level: int = 1) -> bytes:
    """Password command ``P1`` (plain) or ``P2`` (result of the vendor algorithm on the P0 seed)."""
    if level not in (1, 2):
        raise LocalProtocolError(f"password level must be 1 or 2, got {level}")
    if any(c in "()" for c in password):
        raise LocalProtocolError("password must not contain parentheses")
    return encode_command(f"P{level}", f"({password})")


def encode_read(address: str, count: int | None = None) -> bytes:
    """Read command ``R1 address(n)`` (``address()`` when ``count`` is None)."""
    _check_prog_address(address)
    if count is not None and not 0 <= count <= 9999:
        raise LocalProtocolError(f"illegal read count {count}")
    return encode_command("R1", f"{address}({'' if count is None else count})")


def encode_write(address: str, value: str) -> bytes:
    """Write command ``W1 address(value)``; expect ACK, NAK or an error message."""
    _check_prog_address(address)
    if any(c in "()" for c in value):
        raise LocalProtocolError(f"illegal value {value!r}")
    return encode_command("W1", f"{address}({value})")


def encode_break() -> bytes:
    """Break ``SOH B0 ETX BCC`` (BCC ``q``): always end programming mode with it."""
    return encode_command("B0")


def _check_prog_address(address: str) -> None:
    if not address or len(address) > 16 or any(c in "()/!" or not _is_printable(c) for c in address):
        raise LocalProtocolError(f"illegal register address {address!r}")


def encode_p1_telegram(
    manufacturer: str,
    baud_char: str,
    ident: str,
    datasets: Iterable[DataSet],
    *,
    escapes: Iterable[str] = (),
    with_crc: bool = True,
) -> bytes:
    """DSMR P1 / mode D telegram with an optional CRC-16/ARC line (simulator and tests)."""
    head = encode_identification(manufacturer, baud_char, ident, escapes)
    body = head + b"\r\n" + encode_datasets(datasets).encode("ascii") + b"!"
    crc = f"{crc16_arc(body):04X}".encode("ascii") if with_crc else b""
    return body + crc + b"\r\n"


# ---------------------------------------------------------------------------------------------------
# Parsers


def _ascii(data: bytes, what: str) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"non-ASCII byte in {what}", data) from None


def parse_request(line: bytes) -> Request:
    """Parse ``/?address!CRLF`` (address validated as the standard allows)."""
    if not (line.startswith(b"/?") and line.endswith(b"!\r\n")):
        raise RemoteProtocolError("not a request message", line)
    address = _ascii(line[2:-3], "request")
    if len(address) > MAX_ADDRESS_CHARS or not _ADDRESS_RE.fullmatch(address):
        raise RemoteProtocolError("illegal address in request", line)
    return Request(address)


def parse_identification(line: bytes, *, pushed: bool = False) -> Identification:
    """Parse ``/XXXZ[\\W...]ident CRLF``; ``pushed`` marks an unsolicited (mode D / P1) identification."""
    if not (line.startswith(b"/") and line.endswith(b"\r\n")) or len(line) < 7:
        raise RemoteProtocolError("not an identification message", line)
    text = _ascii(line[1:-2], "identification")
    if "\r" in text or "\n" in text:
        raise RemoteProtocolError("line break inside identification", line)
    manufacturer, baud_char, rest = text[:3], text[3], text[4:]
    if not all(_is_printable(c) and c not in "/!?" for c in manufacturer):
        raise RemoteProtocolError("illegal manufacturer id", line)
    if not _is_printable(baud_char, space=True) or baud_char in "/!":
        raise RemoteProtocolError("illegal baud character", line)
    escapes: list[str] = []
    while len(rest) >= 2 and rest[0] == "\\":
        escapes.append(rest[1])
        rest = rest[2:]
    mode: Mode
    if pushed:
        mode = "D"
        baud = MODE_D_BAUD if baud_char == "3" else MODE_C_BAUD.get(baud_char, INITIAL_BAUD)
    elif baud_char in MODE_C_BAUD:
        mode = "E" if "2" in escapes else "C"
        baud = MODE_C_BAUD[baud_char]
    elif baud_char in MODE_B_BAUD:
        mode = "B"
        baud = MODE_B_BAUD[baud_char]
    else:
        mode = "A"
        baud = INITIAL_BAUD
    return Identification(
        manufacturer=manufacturer,
        baud_char=baud_char,
        ident=rest,
        escapes=tuple(escapes),
        mode=mode,
        baud=baud,
        fast_reaction=manufacturer[2].islower(),
        raw=bytes(line),
    )


def parse_option_select(frame: bytes) -> OptionSelect:
    """Parse ``ACK V Z Y CRLF``."""
    if len(frame) != 6 or frame[0] != ACK or frame[4:] != b"\r\n":
        raise RemoteProtocolError("not an option select message", frame)
    if not all(0x30 <= b <= 0x39 for b in frame[1:4]):
        raise RemoteProtocolError("illegal option select characters", frame)
    v, z, y = (chr(b) for b in frame[1:4])
    return OptionSelect(protocol_control=v, baud_char=z, mode_control=y)


def _split_frame(frame: bytes, start: int, bcc_mode: BccMode, what: str) -> tuple[int, bool]:
    """Check start byte, end byte and BCC of ``frame``; return (index of ETX/EOT, bcc_ok)."""
    if not frame or frame[0] != start:
        raise RemoteProtocolError(f"{what} does not start with {start:02X}", frame)
    m = _END_RE.search(frame, 1)
    if m is None:
        raise RemoteProtocolError(f"{what} has no ETX/EOT", frame)
    end = m.start()
    if bcc_mode == "none":
        if len(frame) != end + 1:
            raise RemoteProtocolError(f"{what}: bytes after ETX", frame)
        return end, False
    if len(frame) != end + 2:
        raise RemoteProtocolError(f"{what}: expected exactly one BCC byte after ETX", frame)
    expected = compute_bcc(frame[1 : end + 1], bcc_mode)
    if frame[end + 1] != expected:
        raise BccError(
            f"{what}: BCC mismatch (got {frame[end + 1]:02X}, computed {expected:02X} {bcc_mode})",
            frame,
            expected,
            frame[end + 1],
        )
    return end, True


def _error_code(text: str) -> int:
    digits = text[2:]
    if digits.isdigit():
        return int(digits)
    try:
        return int(digits, 16)
    except ValueError:
        return 0


def parse_data_message(frame: bytes, bcc_mode: BccMode = "xor") -> DataMessage:
    """Parse ``STX block [! CRLF] ETX|EOT BCC``; ``(ERxx)`` raises :class:`NegativeResponse`."""
    end, bcc_ok = _split_frame(frame, STX, bcc_mode, "data message")
    text = _ascii(frame[1:end], "data message")
    readout = False
    block = text
    if text.endswith("!\r\n"):
        readout, block = True, text[:-3]
    elif text.endswith(("!\n", "!")):
        readout, block = True, text[: text.rindex("!")]
    else:
        err = _ERROR_RE.fullmatch(text)
        if err is not None:
            raise NegativeResponse(_error_code(err.group(1)), err.group(1))
    try:
        datasets = parse_datasets(block)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(str(exc), frame) from None
    return DataMessage(
        block=block,
        datasets=datasets,
        raw=bytes(frame),
        bcc_ok=bcc_ok,
        readout=readout,
        partial=frame[end] == EOT,
    )


def parse_command_message(frame: bytes, bcc_mode: BccMode = "xor") -> CommandMessage:
    """Parse ``SOH C D [STX data] ETX|EOT BCC``."""
    end, bcc_ok = _split_frame(frame, SOH, bcc_mode, "command message")
    body = frame[1:end]
    if len(body) < 2:
        raise RemoteProtocolError("command message too short", frame)
    command = _ascii(body[:2], "command")
    if command[0] not in "PWREB" or not command[1].isdigit():
        raise RemoteProtocolError(f"unknown command {command!r}", frame)
    rest = body[2:]
    if rest:
        if rest[0] != STX:
            raise RemoteProtocolError("command data does not start with STX", frame)
        rest = rest[1:]
    data = _ascii(rest, "command data")
    if _BAD_CTRL_RE.search(data) or "\r" in data or "\n" in data:
        raise RemoteProtocolError("control character in command data", frame)
    return CommandMessage(
        command=command, data=data, raw=bytes(frame), bcc_ok=bcc_ok, partial=frame[end] == EOT
    )


def _split_value(inner: str) -> tuple[str, str | None]:
    star = inner.find("*")
    if star >= 0:
        value = inner[:star].strip()
        unit = inner[star + 1 :].strip()
        return value, unit or None
    value = inner.strip()
    if " " in value:
        # Some meters write "(0000000 kWh)": a number, a space and the unit instead of "*".
        m = _SPACE_UNIT_RE.fullmatch(value)
        if m is not None:
            return m.group(1), m.group(2)
    return value, None


def parse_datasets(block: str) -> list[DataSet]:
    """Parse a data block into data sets (protocols.md section 1).

    Several data sets may share a line and one address may carry several values; a value group with
    no address continues the previous data set when it is on the same line and starts a new data set
    with the previous address when it begins a line (profiles, DSMR 2/3 gas readings); the first group
    without any address gets ``""``. The unit is optional; spaces around values are dropped.
    """
    if _BAD_CTRL_RE.search(block):
        raise RemoteProtocolError("control character in data block", block.encode("ascii", "replace"))
    result: list[DataSet] = []
    current: list[tuple[str, str | None]] | None = None
    last_address = ""
    pos = 0
    n = len(block)
    find = block.find
    while pos < n:
        open_at = find("(", pos)
        if open_at < 0:
            if block[pos:].strip():
                raise RemoteProtocolError(
                    f"text without value after last data set: {block[pos : pos + 20]!r}",
                    block.encode("ascii", "replace"),
                )
            break
        gap = block[pos:open_at]
        close_at = find(")", open_at + 1)
        if close_at < 0:
            raise RemoteProtocolError("unterminated value", block.encode("ascii", "replace"))
        inner = block[open_at + 1 : close_at]
        if "(" in inner or "\r" in inner or "\n" in inner:
            raise RemoteProtocolError(f"malformed value {inner[:20]!r}", block.encode("ascii", "replace"))
        address = gap.strip()
        if address:
            if ")" in address or "\r" in address or "\n" in address or "/" in address or "!" in address:
                raise RemoteProtocolError(
                    f"malformed address {address[:20]!r}", block.encode("ascii", "replace")
                )
            current = []
            result.append(DataSet(address, current))
            last_address = address
        elif current is None or "\n" in gap:
            current = []
            result.append(DataSet(last_address, current))
        current.append(_split_value(inner))
        pos = close_at + 1
    return result


def parse_p1_telegram(data: bytes) -> P1Telegram:
    """Parse a DSMR P1 / mode D telegram; verifies the CRC-16/ARC (1..4 hex digits) when one is sent.

    Bytes after the CRC line (EasyMeter Q3D sends some) are not part of the telegram and are ignored.
    """
    if not data.startswith(b"/"):
        raise RemoteProtocolError("P1 telegram does not start with '/'", data)
    eol = data.find(b"\n")
    if eol < 0:
        raise RemoteProtocolError("P1 telegram without identification line", data)
    ident = parse_identification(data[: eol + 1], pushed=True)
    bang = data.find(b"!", eol)
    if bang < 0:
        raise RemoteProtocolError("P1 telegram without '!'", data)
    crc_end = data.find(b"\n", bang)
    if crc_end < 0:
        raise RemoteProtocolError("P1 telegram without line end after '!'", data)
    crc_text = _ascii(data[bang + 1 : crc_end], "P1 CRC").strip()
    crc: int | None = None
    if crc_text:
        if not _HEX_RE.fullmatch(crc_text):
            raise RemoteProtocolError(f"P1 CRC is not 1..4 hex digits: {crc_text[:8]!r}", data)
        crc = int(crc_text, 16)
        computed = crc16_arc(data[: bang + 1])
        if crc != computed:
            raise RemoteProtocolError(f"P1 CRC mismatch (got {crc:04X}, computed {computed:04X})", data)
    block = _ascii(data[eol + 1 : bang], "P1 data")
    raw = bytes(data[: crc_end + 1])
    try:
        datasets = parse_datasets(block)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(str(exc), raw) from None
    return P1Telegram(ident=ident, block=block, datasets=datasets, crc=crc, raw=raw)


# ---------------------------------------------------------------------------------------------------
# Values for publishing

_UNITS: dict[str, str] = {
    u.lower(): u
    for u in (
        "Wh", "kWh", "MWh", "GWh", "W", "kW", "MW",
        "varh", "kvarh", "Mvarh", "var", "kvar", "Mvar",
        "VAh", "kVAh", "MVAh", "VA", "kVA", "MVA",
        "V", "kV", "mV", "A", "mA", "kA", "Hz",
        "m3", "m3/h", "L", "L/h", "J", "kJ", "MJ", "GJ", "s", "min", "h", "K", "degC", "bar", "Pa", "%",
    )
}  # fmt: skip
_UNITS.update(
    {
        "m^3": "m3",
        "m**3": "m3",
        "m3/hr": "m3/h",
        "ltr": "L",
        "l/h": "L/h",
        "c": "degC",
        "°c": "degC",
        "cel": "degC",
        "sec": "s",
        "hrs": "h",
    }
)


def normalize_unit(unit: str | None) -> str | None:
    """Map a meter's unit spelling to the SI-style symbol dcud publishes; unknown units pass unchanged."""
    if unit is None:
        return None
    return _UNITS.get(unit.lower(), unit)


# OBIS value groups C that hold identifiers and status words, not quantities: 0 and 96 (general and
# service entries: device address, serial number, firmware...), C and F (manufacturer/error registers).
_IDENTIFIER_GROUPS = frozenset({"0", "96", "C", "F"})


def numeric_value(value: str, unit: str | None = None, address: str = "") -> float | str:
    """The value as a float when it is a plain decimal number (spaces ignored), else the string.

    A unitless whole number stays a string when it has a leading zero (``00012345``) or when its OBIS
    address names an identifier or status register (``0.0.0``, ``96.1.0``, ``C.1.0``, ``F.F``):
    those digits are an id, not a quantity. A value with a unit (``0012345.6*kWh``) is a number.
    """
    compact = value.replace(" ", "")
    if not _NUMBER_RE.fullmatch(compact):
        return value
    if unit is None and compact.isdigit():
        group_c = address.rpartition(":")[2].partition(".")[0]
        if (len(compact) > 1 and compact[0] == "0") or group_c in _IDENTIFIER_GROUPS:
            return value
    return float(compact)


def dataset_values(datasets: Sequence[DataSet]) -> list[dict[str, str | float | None]]:
    """One ``{"id", "value", "unit", "raw"}`` dict per value, as the reading payload carries them."""
    out: list[dict[str, str | float | None]] = []
    for ds in datasets:
        for value, unit in ds.values:
            out.append(
                {
                    "id": ds.address,
                    "value": numeric_value(value, unit, ds.address),
                    "unit": normalize_unit(unit),
                    "raw": value if unit is None else f"{value}*{unit}",
                }
            )
    return out


# ---------------------------------------------------------------------------------------------------
# Incremental receiver

_MASTER_STARTS = frozenset(b"/\x02\x01\x06\x15")
_NOISE_RE = re.compile(b"[^/\x02\x01\x06\x15]+")


class IecReceiver:
    """Cuts IEC 62056-21 messages (or P1 telegrams) out of a byte stream delivered in any chunks.

    ``side="master"`` decodes what meters send (identification, data and error messages, ACK/NAK;
    an echoed request is also recognised), ``side="meter"`` what masters send (requests, option selects,
    commands, ACK/NAK), ``side="p1"`` DSMR P1 / mode D telegrams. Bytes outside any message (line noise,
    trailing junk) are dropped and counted in :attr:`discarded_bytes`.

    Usage, h11 style: :meth:`receive_data`, then call :meth:`next_message` until it returns None (needs
    more data). A malformed message raises from :meth:`next_message` after being consumed, so the caller
    may keep going. Outcomes do not depend on how the stream was chunked.
    """

    def __init__(
        self,
        *,
        side: ReceiverSide = "master",
        bcc_mode: BccMode = "xor",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if side not in ("master", "meter", "p1"):
            raise LocalProtocolError(f"unknown receiver side {side!r}")
        if bcc_mode not in BCC_MODES:
            raise LocalProtocolError(f"unknown bcc mode {bcc_mode!r}")
        if max_message_bytes < MAX_IDENT_LINE_BYTES:
            raise LocalProtocolError("max_message_bytes too small")
        self.side: ReceiverSide = side
        self.bcc_mode: BccMode = bcc_mode
        self.max_message_bytes = max_message_bytes
        self.discarded_bytes = 0
        self._buf = bytearray()
        self._scan = 0  # where to resume searching for the end of the message at the buffer start

    def receive_data(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    @property
    def in_message(self) -> bool:
        """True while part of a message has been received (for the inter-character timeout)."""
        buf = self._buf
        if not buf:
            return False
        if self.side == "p1":
            return buf[0] == 0x2F
        return buf[0] in _MASTER_STARTS

    def clear(self) -> None:
        """Drop everything buffered (after a Flush on the line)."""
        self._buf.clear()
        self._scan = 0

    def _take(self, size: int) -> bytes:
        frame = bytes(self._buf[:size])
        del self._buf[:size]
        self._scan = 0
        return frame

    def _drop_start(self, message: str) -> RemoteProtocolError:
        # Drop only the start byte and resynchronise on whatever follows it.
        frame = bytes(self._buf[:64])
        del self._buf[:1]
        self.discarded_bytes += 1
        self._scan = 0
        return RemoteProtocolError(message, frame)

    def next_message(self) -> Message | None:
        """Next complete message, or None when more data is needed; raises on a malformed one."""
        buf = self._buf
        while buf:
            first = buf[0]
            if self.side == "p1":
                if first != 0x2F:
                    self._discard_until(b"/")
                    continue
                return self._next_p1()
            if first == 0x2F:
                return self._next_line()
            if first in (STX, SOH):
                return self._next_block(first)
            if first == NAK:
                self._take(1)
                return Nak()
            if first == ACK:
                if self.side == "master":
                    self._take(1)
                    return Ack()
                if len(buf) < 2:
                    return None
                if 0x30 <= buf[1] <= 0x39:
                    if len(buf) < 6:
                        return None
                    if buf[4:6] != b"\r\n":
                        raise self._drop_start("malformed option select")
                    return parse_option_select(self._take(6))
                self._take(1)
                return Ack()
            m = _NOISE_RE.match(buf)
            size = m.end() if m else 1
            del buf[:size]
            self.discarded_bytes += size
            self._scan = 0
        return None

    def _discard_until(self, marker: bytes) -> None:
        at = self._buf.find(marker)
        size = len(self._buf) if at < 0 else at
        del self._buf[:size]
        self.discarded_bytes += size
        self._scan = 0

    def _next_line(self) -> Message | None:
        buf = self._buf
        lf = buf.find(b"\n", max(self._scan, 1))
        if lf < 0:
            if len(buf) > MAX_IDENT_LINE_BYTES:
                raise self._drop_start("identification/request line too long")
            self._scan = len(buf)
            return None
        if lf + 1 > MAX_IDENT_LINE_BYTES:
            raise self._drop_start("identification/request line too long")
        line = self._take(lf + 1)
        if line.startswith(b"/?"):
            return parse_request(line)
        return parse_identification(line)

    def _too_long(self, what: str) -> RemoteProtocolError:
        # Drop exactly the first max_message_bytes + 1 bytes, whatever arrived after them: the same
        # bytes are dropped however the stream was chunked (found by tests/fuzz).
        size = self.max_message_bytes + 1
        del self._buf[:size]
        self.discarded_bytes += size
        self._scan = 0
        return RemoteProtocolError(f"{what} longer than {self.max_message_bytes} bytes")

    def _next_block(self, first: int) -> Message | None:
        buf = self._buf
        m = _END_RE.search(buf, max(self._scan, 1))
        if m is None:
            if len(buf) > self.max_message_bytes:
                raise self._too_long("message")
            self._scan = len(buf)
            return None
        end = m.start()
        if end > self.max_message_bytes:
            raise self._too_long("message")
        size = end + 1 if self.bcc_mode == "none" else end + 2
        if len(buf) < size:
            self._scan = end
            return None
        frame = self._take(size)
        if first == STX:
            return parse_data_message(frame, self.bcc_mode)
        return parse_command_message(frame, self.bcc_mode)

    def _next_p1(self) -> Message | None:
        buf = self._buf
        bang = buf.find(b"!", max(self._scan, 1))
        if bang < 0:
            if len(buf) > self.max_message_bytes:
                raise self._too_long("telegram")
            self._scan = len(buf)
            return None
        if bang > self.max_message_bytes:
            raise self._too_long("telegram")
        self._scan = bang
        lf = buf.find(b"\n", bang)
        # The same bound whether or not the LF has arrived yet (found by tests/fuzz).
        if (lf < 0 and len(buf) - bang > 16) or lf - bang > 16:
            raise self._drop_start("P1 CRC line too long")
        if lf < 0:
            return None
        return parse_p1_telegram(self._take(lf + 1))
