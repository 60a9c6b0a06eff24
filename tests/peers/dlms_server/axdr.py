"""A-XDR data (IEC 62056-6-2 / Green Book) and BER lengths: the value encoding of every COSEM attribute."""

from __future__ import annotations

import struct
from dataclasses import dataclass

NULL = 0x00
ARRAY = 0x01
STRUCTURE = 0x02
BOOLEAN = 0x03
BIT_STRING = 0x04
DOUBLE_LONG = 0x05
DOUBLE_LONG_UNSIGNED = 0x06
OCTET_STRING = 0x09
VISIBLE_STRING = 0x0A
UTF8_STRING = 0x0C
BCD = 0x0D
INTEGER = 0x0F
LONG = 0x10
UNSIGNED = 0x11
LONG_UNSIGNED = 0x12
COMPACT_ARRAY = 0x13
LONG64 = 0x14
LONG64_UNSIGNED = 0x15
ENUM = 0x16
FLOAT32 = 0x17
FLOAT64 = 0x18
DATE_TIME = 0x19
DATE = 0x1A
TIME = 0x1B

# tag -> (struct format, signed) for the fixed-size integers
_INTS: dict[int, tuple[str, bool]] = {
    DOUBLE_LONG: (">i", True),
    DOUBLE_LONG_UNSIGNED: (">I", False),
    INTEGER: (">b", True),
    LONG: (">h", True),
    UNSIGNED: (">B", False),
    LONG_UNSIGNED: (">H", False),
    LONG64: (">q", True),
    LONG64_UNSIGNED: (">Q", False),
    ENUM: (">B", False),
    BCD: (">b", True),
}
_FIXED_OCTETS = {DATE_TIME: 12, DATE: 5, TIME: 4}
MAX_DEPTH = 16
MAX_ITEMS = 100_000


class DecodeError(ValueError):
    """Bytes that are not valid A-XDR / BER (truncated, unknown tag, absurd length)."""


@dataclass(frozen=True)
class Data:
    """One A-XDR value: its tag and a Python value (int, bool, bytes, str, float, list[Data] or None)."""

    tag: int
    value: object = None

    @property
    def items(self) -> list[Data]:
        """The members of an array or structure."""
        if self.tag not in (ARRAY, STRUCTURE) or not isinstance(self.value, list):
            raise DecodeError(f"expected an array or structure, got tag {self.tag}")
        return self.value

    @property
    def as_int(self) -> int:
        """The value of an integer type (bool and enum included)."""
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise DecodeError(f"expected an integer, got tag {self.tag}")
        return self.value

    @property
    def as_bytes(self) -> bytes:
        """The value of an octet string (or a fixed date-time/date/time)."""
        if not isinstance(self.value, bytes):
            raise DecodeError(f"expected an octet string, got tag {self.tag}")
        return self.value


def null() -> Data:
    """null-data."""
    return Data(NULL, None)


def struct_(*items: Data) -> Data:
    """A structure of ``items``."""
    return Data(STRUCTURE, list(items))


def array(items: list[Data]) -> Data:
    """An array of ``items``."""
    return Data(ARRAY, list(items))


def octets(value: bytes) -> Data:
    """An octet string."""
    return Data(OCTET_STRING, bytes(value))


def u8(value: int) -> Data:
    """unsigned (0..255)."""
    return Data(UNSIGNED, value)


def u16(value: int) -> Data:
    """long-unsigned."""
    return Data(LONG_UNSIGNED, value)


def u32(value: int) -> Data:
    """double-long-unsigned."""
    return Data(DOUBLE_LONG_UNSIGNED, value)


def i8(value: int) -> Data:
    """integer (-128..127)."""
    return Data(INTEGER, value)


def i16(value: int) -> Data:
    """long."""
    return Data(LONG, value)


def enum(value: int) -> Data:
    """enum."""
    return Data(ENUM, value)


def boolean(value: bool) -> Data:
    """boolean."""
    return Data(BOOLEAN, value)


def encode_length(length: int) -> bytes:
    """BER definite length: one byte below 128, else 0x8N and N big-endian bytes."""
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def decode_length(data: bytes, pos: int) -> tuple[int, int]:
    """(length, position after it); at most 4 length bytes."""
    if pos >= len(data):
        raise DecodeError("truncated length")
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    count = first & 0x7F
    if count == 0 or count > 4 or pos + 1 + count > len(data):
        raise DecodeError(f"bad BER length form 0x{first:02X}")
    return int.from_bytes(data[pos + 1 : pos + 1 + count], "big"), pos + 1 + count


def encode(value: Data) -> bytes:
    """The A-XDR encoding of ``value``, tag included."""
    out = bytearray()
    _encode_into(out, value)
    return bytes(out)


def _encode_into(out: bytearray, value: Data) -> None:
    tag = value.tag
    out.append(tag)
    if tag == NULL:
        return
    if tag in (ARRAY, STRUCTURE):
        out += encode_length(len(value.items))
        for item in value.items:
            _encode_into(out, item)
        return
    if tag == BOOLEAN:
        out.append(0x01 if value.value else 0x00)
        return
    if tag in _INTS:
        fmt, _ = _INTS[tag]
        out += struct.pack(fmt, value.as_int)
        return
    if tag in (OCTET_STRING, VISIBLE_STRING, UTF8_STRING):
        raw = value.value.encode() if isinstance(value.value, str) else value.as_bytes
        out += encode_length(len(raw)) + raw
        return
    if tag in _FIXED_OCTETS:
        raw = value.as_bytes
        if len(raw) != _FIXED_OCTETS[tag]:
            raise ValueError(f"tag {tag} needs {_FIXED_OCTETS[tag]} bytes")
        out += raw
        return
    if tag == FLOAT32 and isinstance(value.value, float):
        out += struct.pack(">f", value.value)
        return
    if tag == FLOAT64 and isinstance(value.value, float):
        out += struct.pack(">d", value.value)
        return
    if tag == BIT_STRING and isinstance(value.value, tuple):
        bits, raw = value.value
        out += encode_length(bits) + raw
        return
    raise ValueError(f"cannot encode tag {tag} with {value.value!r}")


def decode(data: bytes, pos: int = 0, depth: int = 0) -> tuple[Data, int]:
    """Decode one value at ``pos``; returns it and the position after it. Raises :class:`DecodeError`."""
    if depth > MAX_DEPTH:
        raise DecodeError("nesting too deep")
    if pos >= len(data):
        raise DecodeError("truncated: no tag")
    tag = data[pos]
    pos += 1
    if tag == NULL:
        return Data(NULL, None), pos
    if tag in (ARRAY, STRUCTURE):
        count, pos = decode_length(data, pos)
        if count > MAX_ITEMS or count > len(data) - pos:
            raise DecodeError(f"{count} items cannot fit")
        items = []
        for _ in range(count):
            item, pos = decode(data, pos, depth + 1)
            items.append(item)
        return Data(tag, items), pos
    if tag == BOOLEAN:
        _need(data, pos, 1)
        return Data(tag, data[pos] != 0), pos + 1
    if tag in _INTS:
        fmt, _ = _INTS[tag]
        size = struct.calcsize(fmt)
        _need(data, pos, size)
        return Data(tag, struct.unpack_from(fmt, data, pos)[0]), pos + size
    if tag in (OCTET_STRING, VISIBLE_STRING, UTF8_STRING):
        length, pos = decode_length(data, pos)
        _need(data, pos, length)
        raw = bytes(data[pos : pos + length])
        if tag == OCTET_STRING:
            return Data(tag, raw), pos + length
        try:
            return Data(tag, raw.decode("utf-8" if tag == UTF8_STRING else "ascii")), pos + length
        except UnicodeDecodeError as exc:
            raise DecodeError("bad string") from exc
    if tag in _FIXED_OCTETS:
        size = _FIXED_OCTETS[tag]
        _need(data, pos, size)
        return Data(tag, bytes(data[pos : pos + size])), pos + size
    if tag == FLOAT32:
        _need(data, pos, 4)
        return Data(tag, struct.unpack_from(">f", data, pos)[0]), pos + 4
    if tag == FLOAT64:
        _need(data, pos, 8)
        return Data(tag, struct.unpack_from(">d", data, pos)[0]), pos + 8
    if tag == BIT_STRING:
        bits, pos = decode_length(data, pos)
        size = (bits + 7) // 8
        _need(data, pos, size)
        return Data(tag, (bits, bytes(data[pos : pos + size]))), pos + size
    raise DecodeError(f"unknown or unsupported data tag 0x{tag:02X}")


def decode_all(data: bytes) -> Data:
    """Decode exactly one value filling ``data``."""
    value, end = decode(data)
    if end != len(data):
        raise DecodeError(f"{len(data) - end} bytes after the value")
    return value


def _need(data: bytes, pos: int, size: int) -> None:
    if pos + size > len(data):
        raise DecodeError("truncated value")
