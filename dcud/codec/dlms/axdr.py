"""A-XDR data of DLMS/COSEM (IEC 62056-6-2 / Blue Book 4.1.5), sans-I/O: bytes to typed values and back.

Every COSEM attribute value, method parameter and return value is one ``Data``: a tag byte followed by its
contents (big-endian fixed-size integers and floats, BER-style lengths before strings and element counts).
:func:`decode_data` turns bytes into the small tagged union below (one frozen class per type, so a caller
matches on the class rather than on a bare tuple) and :func:`encode_data` turns it back into the same
bytes. Decoding is bounded: nesting depth, the total number of elements and every length are checked
against what the input can hold, and anything malformed raises
:class:`~dcud.errors.RemoteProtocolError`; nothing else escapes. Building a value that cannot be encoded
(an ``Unsigned`` of 300) raises :class:`~dcud.errors.LocalProtocolError`.

The data types, their encoder and their decoder stay together: a compact array's type description is
checked against the decoder's table of element types. Two parts live in modules of their own and are
re-exported here: the byte :class:`Reader` and :func:`encode_length` (:mod:`.reader`, shared with the
APDU decoders) and the 12-byte COSEM date-time :class:`CosemDateTime` with its date and time
(:mod:`.cosem_datetime`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from dcud.codec.dlms.cosem_datetime import (
    CLOCK_STATUS_DST,
    CLOCK_STATUS_NOT_SPECIFIED,
    DEVIATION_NOT_SPECIFIED,
    NOT_SPECIFIED,
    YEAR_NOT_SPECIFIED,
    CosemDate,
    CosemDateTime,
    CosemTime,
    _byte_field,
    utc_datetime,
)
from dcud.codec.dlms.reader import Reader, encode_length
from dcud.errors import LocalProtocolError, RemoteProtocolError

MAX_DEPTH = 16
"""Nesting of arrays and structures; real objects nest at most 5 deep (object list, profile buffers)."""
MAX_ELEMENTS = 250_000
"""Data items in one decoded value (a year of 15-minute rows with a few columns); beyond that the memory
of the Python objects, not the wire, is the limit."""


# ---------------------------------------------------------------------------------------------------
# The data types


class _Base:
    """Common base of the Data classes: the A-XDR tag."""

    __slots__ = ()
    TAG: ClassVar[int]
    NAME: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Null(_Base):
    """null-data (tag 0): no value (also the 'same as before' marker in compressed profile buffers)."""

    TAG: ClassVar[int] = 0
    NAME: ClassVar[str] = "null-data"


@dataclass(frozen=True, slots=True)
class DontCare(_Base):
    """dont-care (tag 255): matches anything in a selective-access filter."""

    TAG: ClassVar[int] = 255
    NAME: ClassVar[str] = "dont-care"


@dataclass(frozen=True, slots=True)
class Array(_Base):
    """array (tag 1): items of one type."""

    items: tuple[Data, ...] = ()
    TAG: ClassVar[int] = 1
    NAME: ClassVar[str] = "array"


@dataclass(frozen=True, slots=True)
class Structure(_Base):
    """structure (tag 2): items of any types, by position."""

    items: tuple[Data, ...] = ()
    TAG: ClassVar[int] = 2
    NAME: ClassVar[str] = "structure"


@dataclass(frozen=True, slots=True)
class Boolean(_Base):
    """boolean (tag 3): one byte, 0 false, anything else true (sent as 1)."""

    value: bool
    TAG: ClassVar[int] = 3
    NAME: ClassVar[str] = "boolean"


@dataclass(frozen=True, slots=True)
class BitString(_Base):
    """bit-string (tag 4): ``length_bits`` bits, the first one the most significant bit of ``data[0]``."""

    data: bytes
    length_bits: int
    TAG: ClassVar[int] = 4
    NAME: ClassVar[str] = "bit-string"

    def __post_init__(self) -> None:
        if self.length_bits < 0 or len(self.data) != (self.length_bits + 7) // 8:
            raise LocalProtocolError(
                f"bit-string of {self.length_bits} bits needs {(self.length_bits + 7) // 8} bytes"
            )

    @property
    def bits(self) -> str:
        """The bits as a string of '0' and '1'."""
        return "".join(f"{b:08b}" for b in self.data)[: self.length_bits]

    @classmethod
    def from_bits(cls, bits: str) -> BitString:
        """From a string of '0' and '1'."""
        if any(c not in "01" for c in bits):
            raise LocalProtocolError("a bit string holds only 0 and 1")
        padded = bits + "0" * (-len(bits) % 8)
        return cls(bytes(int(padded[i : i + 8], 2) for i in range(0, len(padded), 8)), len(bits))


class _Integer(_Base):
    """Fixed-size integers: ``SIZE`` bytes, ``SIGNED`` or not."""

    __slots__ = ()
    SIZE: ClassVar[int]
    SIGNED: ClassVar[bool]
    value: int

    def __post_init__(self) -> None:
        # Runs for every subclass (the dataclass __init__ of each calls it): the range of SIZE/SIGNED.
        bits = self.SIZE * 8
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if self.SIGNED else (0, (1 << bits) - 1)
        if isinstance(self.value, bool) or not isinstance(self.value, int) or not low <= self.value <= high:
            raise LocalProtocolError(f"{self.NAME} holds {low}..{high}, not {self.value!r}")


@dataclass(frozen=True, slots=True)
class DoubleLong(_Integer):
    """double-long (tag 5): signed 32 bits."""

    value: int
    TAG: ClassVar[int] = 5
    NAME: ClassVar[str] = "double-long"
    SIZE: ClassVar[int] = 4
    SIGNED: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class DoubleLongUnsigned(_Integer):
    """double-long-unsigned (tag 6): unsigned 32 bits."""

    value: int
    TAG: ClassVar[int] = 6
    NAME: ClassVar[str] = "double-long-unsigned"
    SIZE: ClassVar[int] = 4
    SIGNED: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class OctetString(_Base):
    """octet-string (tag 9): bytes (logical names, serial numbers, date-times on many meters)."""

    value: bytes
    TAG: ClassVar[int] = 9
    NAME: ClassVar[str] = "octet-string"


@dataclass(frozen=True, slots=True)
class VisibleString(_Base):
    """visible-string (tag 10): text; decoded as Latin-1 so any byte round-trips."""

    value: str
    TAG: ClassVar[int] = 10
    NAME: ClassVar[str] = "visible-string"

    def __post_init__(self) -> None:
        try:
            self.value.encode("latin-1")
        except UnicodeEncodeError:
            raise LocalProtocolError("a visible-string holds Latin-1 characters only") from None


@dataclass(frozen=True, slots=True)
class Utf8String(_Base):
    """utf8-string (tag 12)."""

    value: str
    TAG: ClassVar[int] = 12
    NAME: ClassVar[str] = "utf8-string"


@dataclass(frozen=True, slots=True)
class Bcd(_Base):
    """bcd (tag 13): one byte as sent (two BCD digits, or a meter's marker)."""

    value: int
    TAG: ClassVar[int] = 13
    NAME: ClassVar[str] = "bcd"

    def __post_init__(self) -> None:
        _byte_field("bcd", self.value)


@dataclass(frozen=True, slots=True)
class Integer(_Integer):
    """integer (tag 15): signed 8 bits (scalers)."""

    value: int
    TAG: ClassVar[int] = 15
    NAME: ClassVar[str] = "integer"
    SIZE: ClassVar[int] = 1
    SIGNED: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Long(_Integer):
    """long (tag 16): signed 16 bits."""

    value: int
    TAG: ClassVar[int] = 16
    NAME: ClassVar[str] = "long"
    SIZE: ClassVar[int] = 2
    SIGNED: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Unsigned(_Integer):
    """unsigned (tag 17): unsigned 8 bits."""

    value: int
    TAG: ClassVar[int] = 17
    NAME: ClassVar[str] = "unsigned"
    SIZE: ClassVar[int] = 1
    SIGNED: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class LongUnsigned(_Integer):
    """long-unsigned (tag 18): unsigned 16 bits (class ids, data indexes)."""

    value: int
    TAG: ClassVar[int] = 18
    NAME: ClassVar[str] = "long-unsigned"
    SIZE: ClassVar[int] = 2
    SIGNED: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Long64(_Integer):
    """long64 (tag 20): signed 64 bits."""

    value: int
    TAG: ClassVar[int] = 20
    NAME: ClassVar[str] = "long64"
    SIZE: ClassVar[int] = 8
    SIGNED: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Long64Unsigned(_Integer):
    """long64-unsigned (tag 21): unsigned 64 bits."""

    value: int
    TAG: ClassVar[int] = 21
    NAME: ClassVar[str] = "long64-unsigned"
    SIZE: ClassVar[int] = 8
    SIGNED: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Enum(_Integer):
    """enum (tag 22): unsigned 8 bits whose meaning the attribute defines (units, access modes)."""

    value: int
    TAG: ClassVar[int] = 22
    NAME: ClassVar[str] = "enum"
    SIZE: ClassVar[int] = 1
    SIGNED: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Float32(_Base):
    """float32 (tag 23): IEEE 754 single precision, big-endian."""

    value: float
    TAG: ClassVar[int] = 23
    NAME: ClassVar[str] = "float32"


@dataclass(frozen=True, slots=True)
class Float64(_Base):
    """float64 (tag 24): IEEE 754 double precision, big-endian."""

    value: float
    TAG: ClassVar[int] = 24
    NAME: ClassVar[str] = "float64"


@dataclass(frozen=True, slots=True)
class DateTime(_Base):
    """date-time (tag 25): the 12-byte COSEM date-time without a length byte."""

    value: CosemDateTime
    TAG: ClassVar[int] = 25
    NAME: ClassVar[str] = "date-time"


@dataclass(frozen=True, slots=True)
class Date(_Base):
    """date (tag 26): the 5-byte COSEM date."""

    value: CosemDate
    TAG: ClassVar[int] = 26
    NAME: ClassVar[str] = "date"


@dataclass(frozen=True, slots=True)
class Time(_Base):
    """time (tag 27): the 4-byte COSEM time."""

    value: CosemTime
    TAG: ClassVar[int] = 27
    NAME: ClassVar[str] = "time"


# A compact array's element type (Blue Book 4.1.5, TypeDescription).


@dataclass(frozen=True, slots=True)
class TypeDesc:
    """The type of the elements of a compact array: a tag, and for arrays/structures their inner types.

    ``count`` is the fixed element count of an inner array; ``members`` the element types of a
    structure, or the one element type of an array.
    """

    tag: int
    members: tuple[TypeDesc, ...] = ()
    count: int = 0

    def encode(self) -> bytes:
        """The TypeDescription bytes."""
        if self.tag == Array.TAG:
            if len(self.members) != 1:
                raise LocalProtocolError("an array type description has one element type")
            return bytes([self.tag]) + self.count.to_bytes(2, "big") + self.members[0].encode()
        if self.tag == Structure.TAG:
            return (
                bytes([self.tag])
                + encode_length(len(self.members))
                + b"".join(m.encode() for m in self.members)
            )
        if self.tag not in _UNTAGGED_CODECS:
            raise LocalProtocolError(f"type {self.tag} cannot describe a compact array element")
        return bytes([self.tag])

    @classmethod
    def of(cls, value: Data) -> TypeDesc:
        """The description of ``value``'s type (an array takes its first element's type)."""
        if isinstance(value, Array):
            if not value.items:
                raise LocalProtocolError("the element type of an empty array is unknown")
            return cls(Array.TAG, (cls.of(value.items[0]),), len(value.items))
        if isinstance(value, Structure):
            return cls(Structure.TAG, tuple(cls.of(i) for i in value.items))
        return cls(value.TAG)


@dataclass(frozen=True, slots=True)
class CompactArray(_Base):
    """compact-array (tag 19): elements of one described type, sent without per-element tags."""

    description: TypeDesc
    items: tuple[Data, ...] = ()
    TAG: ClassVar[int] = 19
    NAME: ClassVar[str] = "compact-array"


Data = (
    Null
    | Array
    | Structure
    | Boolean
    | BitString
    | DoubleLong
    | DoubleLongUnsigned
    | OctetString
    | VisibleString
    | Utf8String
    | Bcd
    | Integer
    | Long
    | Unsigned
    | LongUnsigned
    | CompactArray
    | Long64
    | Long64Unsigned
    | Enum
    | Float32
    | Float64
    | DateTime
    | Date
    | Time
    | DontCare
)
"""One A-XDR value."""

INTEGER_TYPES: dict[int, type[_Integer]] = {
    cls.TAG: cls
    for cls in (
        DoubleLong,
        DoubleLongUnsigned,
        Integer,
        Long,
        Unsigned,
        LongUnsigned,
        Long64,
        Long64Unsigned,
        Enum,
    )
}

TYPE_NAMES: dict[int, str] = {
    cls.TAG: cls.NAME
    for cls in (
        Null,
        Array,
        Structure,
        Boolean,
        BitString,
        DoubleLong,
        DoubleLongUnsigned,
        OctetString,
        VisibleString,
        Utf8String,
        Bcd,
        Integer,
        Long,
        Unsigned,
        LongUnsigned,
        CompactArray,
        Long64,
        Long64Unsigned,
        Enum,
        Float32,
        Float64,
        DateTime,
        Date,
        Time,
        DontCare,
    )
}
"""Tag to the type's name in the Blue Book."""


# ---------------------------------------------------------------------------------------------------
# Encoding


def encode_data(value: Data) -> bytes:
    """The A-XDR bytes of ``value``, tag included."""
    out = bytearray()
    _encode(value, out, tagged=True)
    return bytes(out)


def _encode(value: Data, out: bytearray, *, tagged: bool) -> None:
    if tagged:
        out.append(value.TAG)
    if isinstance(value, Null | DontCare):
        return
    if isinstance(value, Array | Structure):
        if tagged:
            out += encode_length(len(value.items))
        for item in value.items:
            _encode(item, out, tagged=tagged)
        return
    if isinstance(value, _Integer):
        out += value.value.to_bytes(value.SIZE, "big", signed=value.SIGNED)
        return
    if isinstance(value, CompactArray):
        if not tagged:
            raise LocalProtocolError("a compact array cannot nest in a compact array")
        out += value.description.encode()
        content = bytearray()
        for item in value.items:
            _encode_described(item, value.description, content)
        out += encode_length(len(content)) + content
        return
    _encode_scalar(value, out)


def _encode_scalar(value: Data, out: bytearray) -> None:
    if isinstance(value, Boolean):
        out.append(1 if value.value else 0)
    elif isinstance(value, BitString):
        out += encode_length(value.length_bits) + value.data
    elif isinstance(value, OctetString):
        out += encode_length(len(value.value)) + value.value
    elif isinstance(value, VisibleString):
        raw = value.value.encode("latin-1")
        out += encode_length(len(raw)) + raw
    elif isinstance(value, Utf8String):
        raw = value.value.encode("utf-8")
        out += encode_length(len(raw)) + raw
    elif isinstance(value, Bcd):
        out.append(value.value)
    elif isinstance(value, Float32):
        try:
            out += struct.pack(">f", value.value)
        except (OverflowError, struct.error):
            raise LocalProtocolError(f"float32 cannot hold {value.value!r}") from None
    elif isinstance(value, Float64):
        out += struct.pack(">d", value.value)
    elif isinstance(value, DateTime | Date | Time):
        out += value.value.to_bytes()
    else:  # pragma: no cover - the union is exhaustive
        raise LocalProtocolError(f"cannot encode {value!r}")


def _encode_described(value: Data, desc: TypeDesc, out: bytearray) -> None:
    if desc.tag != value.TAG:
        raise LocalProtocolError(f"compact array element {value.NAME} does not match type {desc.tag}")
    if isinstance(value, Array):
        if len(value.items) != desc.count:
            raise LocalProtocolError(
                f"compact array inner array has {len(value.items)} items, not {desc.count}"
            )
        for item in value.items:
            _encode_described(item, desc.members[0], out)
    elif isinstance(value, Structure):
        if len(value.items) != len(desc.members):
            raise LocalProtocolError("compact array structure does not match its description")
        for item, member in zip(value.items, desc.members, strict=True):
            _encode_described(item, member, out)
    else:
        _encode(value, out, tagged=False)


# ---------------------------------------------------------------------------------------------------
# Decoding


_ReadFn = Callable[[Reader], "Data"]


@dataclass(slots=True)
class _Budget:
    elements_left: int
    max_depth: int

    def spend(self, reader: Reader, count: int = 1) -> None:
        self.elements_left -= count
        if self.elements_left < 0:
            raise reader.error("too many data elements")


def decode_data(
    data: bytes, *, max_elements: int = MAX_ELEMENTS, max_depth: int = MAX_DEPTH, what: str = "A-XDR data"
) -> Data:
    """Decode exactly one value that fills ``data``."""
    reader = Reader(data, what=what)
    value = read_data(reader, max_elements=max_elements, max_depth=max_depth)
    reader.expect_end()
    return value


def read_data(reader: Reader, *, max_elements: int = MAX_ELEMENTS, max_depth: int = MAX_DEPTH) -> Data:
    """Decode one value at the reader's position (for APDUs that carry Data among other fields)."""
    return _read(reader, _Budget(max_elements, max_depth), 0)


def _read(reader: Reader, budget: _Budget, depth: int) -> Data:
    budget.spend(reader)
    tag = reader.u8()
    if tag in (Array.TAG, Structure.TAG):
        if depth >= budget.max_depth:
            raise reader.error("data nested too deeply")
        count = reader.counted()
        items = tuple(_read(reader, budget, depth + 1) for _ in range(count))
        return Array(items) if tag == Array.TAG else Structure(items)
    if tag == CompactArray.TAG:
        if depth >= budget.max_depth:
            raise reader.error("data nested too deeply")
        return _read_compact(reader, budget, depth)
    return _read_untagged(reader, tag)


def _read_untagged(reader: Reader, tag: int) -> Data:
    codec = _UNTAGGED_CODECS.get(tag)
    if codec is None:
        raise reader.error(f"unknown data type tag {tag}")
    return codec(reader)


def _read_int(cls: type[_Integer]) -> _ReadFn:
    def read(reader: Reader) -> Data:
        value = int.from_bytes(reader.take(cls.SIZE), "big", signed=cls.SIGNED)
        return cls(value)  # type: ignore[call-arg,return-value]

    return read


def _read_bitstring(reader: Reader) -> Data:
    bits = reader.length()
    return BitString(reader.take((bits + 7) // 8), bits)


def _read_octets(reader: Reader) -> Data:
    return OctetString(reader.take(reader.length()))


def _read_visible(reader: Reader) -> Data:
    return VisibleString(reader.take(reader.length()).decode("latin-1"))


def _read_utf8(reader: Reader) -> Data:
    start = reader.pos
    raw = reader.take(reader.length())
    try:
        return Utf8String(raw.decode("utf-8"))
    except UnicodeDecodeError:
        reader.pos = start
        raise reader.error("utf8-string is not UTF-8") from None


def _read_datetime(reader: Reader) -> Data:
    return DateTime(CosemDateTime.from_bytes(reader.take(CosemDateTime.SIZE)))


_UNTAGGED_CODECS: dict[int, _ReadFn] = {
    Null.TAG: lambda r: Null(),
    DontCare.TAG: lambda r: DontCare(),
    Boolean.TAG: lambda r: Boolean(r.u8() != 0),
    BitString.TAG: _read_bitstring,
    OctetString.TAG: _read_octets,
    VisibleString.TAG: _read_visible,
    Utf8String.TAG: _read_utf8,
    Bcd.TAG: lambda r: Bcd(r.u8()),
    Float32.TAG: lambda r: Float32(struct.unpack(">f", r.take(4))[0]),
    Float64.TAG: lambda r: Float64(struct.unpack(">d", r.take(8))[0]),
    DateTime.TAG: _read_datetime,
    Date.TAG: lambda r: Date(CosemDate.from_bytes(r.take(CosemDate.SIZE))),
    Time.TAG: lambda r: Time(CosemTime.from_bytes(r.take(CosemTime.SIZE))),
    **{tag: _read_int(cls) for tag, cls in INTEGER_TYPES.items()},
}


def _read_type_desc(reader: Reader, depth: int, max_depth: int) -> TypeDesc:
    if depth >= max_depth:
        raise reader.error("compact array type nested too deeply")
    tag = reader.u8()
    if tag == Array.TAG:
        count = reader.u16()
        return TypeDesc(tag, (_read_type_desc(reader, depth + 1, max_depth),), count)
    if tag == Structure.TAG:
        size = reader.counted()
        return TypeDesc(tag, tuple(_read_type_desc(reader, depth + 1, max_depth) for _ in range(size)))
    if tag not in _UNTAGGED_CODECS:
        raise reader.error(f"compact array element type {tag} unknown")
    return TypeDesc(tag)


def _fixed_size(desc: TypeDesc) -> int | None:
    """Bytes one element of ``desc`` takes, None when it varies (strings); 0 means nothing on the wire."""
    sizes = {Null.TAG: 0, DontCare.TAG: 0, Boolean.TAG: 1, Bcd.TAG: 1, Float32.TAG: 4, Float64.TAG: 8}
    sizes |= {DateTime.TAG: 12, Date.TAG: 5, Time.TAG: 4}
    sizes |= {tag: cls.SIZE for tag, cls in INTEGER_TYPES.items()}
    if desc.tag == Array.TAG:
        inner = _fixed_size(desc.members[0])
        return None if inner is None else inner * desc.count
    if desc.tag == Structure.TAG:
        total = 0
        for member in desc.members:
            size = _fixed_size(member)
            if size is None:
                return None
            total += size
        return total
    return sizes.get(desc.tag)


def _read_compact(reader: Reader, budget: _Budget, depth: int) -> Data:
    desc = _read_type_desc(reader, depth, budget.max_depth)
    if _fixed_size(desc) == 0:
        raise reader.error("compact array of elements that take no bytes")
    content = Reader(reader.take(reader.length()), what=reader.what)
    items: list[Data] = []
    while not content.at_end():
        items.append(_read_described(content, desc, budget, depth + 1))
    return CompactArray(desc, tuple(items))


def _read_described(reader: Reader, desc: TypeDesc, budget: _Budget, depth: int) -> Data:
    budget.spend(reader)
    if depth > budget.max_depth:
        raise reader.error("data nested too deeply")
    if desc.tag == Array.TAG:
        return Array(
            tuple(_read_described(reader, desc.members[0], budget, depth + 1) for _ in range(desc.count))
        )
    if desc.tag == Structure.TAG:
        return Structure(tuple(_read_described(reader, m, budget, depth + 1) for m in desc.members))
    return _read_untagged(reader, desc.tag)


# ---------------------------------------------------------------------------------------------------
# Helpers for callers


def to_json(value: Data) -> object:
    """A JSON-ready Python value: numbers, text, hex for bytes, ISO 8601 for complete date-times, lists."""
    if isinstance(value, Array | Structure | CompactArray):
        return [to_json(item) for item in value.items]
    if isinstance(value, Null | DontCare):
        return None
    if isinstance(value, _Integer):
        return value.value
    if isinstance(value, Float32 | Float64):
        return value.value if math.isfinite(value.value) else None
    if isinstance(value, Boolean):
        return value.value
    if isinstance(value, OctetString):
        return value.value.hex()
    if isinstance(value, VisibleString | Utf8String):
        return value.value
    if isinstance(value, BitString):
        return value.bits
    if isinstance(value, Bcd):
        return f"{value.value:02X}"
    if isinstance(value, DateTime):
        try:
            return value.value.to_datetime().isoformat()
        except RemoteProtocolError:
            return str(value.value)
    if isinstance(value, Date | Time):
        return value.value.to_bytes().hex()
    return None  # pragma: no cover - the union is exhaustive


def number(value: Data) -> int | float:
    """The numeric value of an integer or float Data; RemoteProtocolError for anything else."""
    if isinstance(value, _Integer):
        return value.value
    if isinstance(value, Float32 | Float64):
        return value.value
    raise RemoteProtocolError(f"expected a number, got {value.NAME}")


def date_time_of(value: Data) -> CosemDateTime:
    """The COSEM date-time in a date-time or a 12-byte octet-string (how most clocks send it)."""
    if isinstance(value, DateTime):
        return value.value
    if isinstance(value, OctetString) and len(value.value) == CosemDateTime.SIZE:
        return CosemDateTime.from_bytes(value.value)
    raise RemoteProtocolError(f"expected a date-time, got {value.NAME}")


def structure_of(value: Data, size: int | None = None, what: str = "value") -> tuple[Data, ...]:
    """The items of a structure (of ``size`` items when given); RemoteProtocolError otherwise."""
    if not isinstance(value, Structure):
        raise RemoteProtocolError(f"{what}: expected a structure, got {value.NAME}")
    if size is not None and len(value.items) != size:
        raise RemoteProtocolError(f"{what}: expected a structure of {size}, got {len(value.items)}")
    return value.items


def array_of(value: Data, what: str = "value") -> tuple[Data, ...]:
    """The items of an array or compact array; RemoteProtocolError otherwise."""
    if not isinstance(value, Array | CompactArray):
        raise RemoteProtocolError(f"{what}: expected an array, got {value.NAME}")
    return value.items


def make_array(items: Iterable[Data]) -> Array:
    """An Array of ``items``."""
    return Array(tuple(items))


def make_structure(*items: Data) -> Structure:
    """A Structure of ``items``."""
    return Structure(tuple(items))


__all__ = [
    "CLOCK_STATUS_DST",
    "CLOCK_STATUS_NOT_SPECIFIED",
    "DEVIATION_NOT_SPECIFIED",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "NOT_SPECIFIED",
    "TYPE_NAMES",
    "YEAR_NOT_SPECIFIED",
    "Array",
    "Bcd",
    "BitString",
    "Boolean",
    "CompactArray",
    "CosemDate",
    "CosemDateTime",
    "CosemTime",
    "Data",
    "Date",
    "DateTime",
    "DontCare",
    "DoubleLong",
    "DoubleLongUnsigned",
    "Enum",
    "Float32",
    "Float64",
    "Integer",
    "Long",
    "Long64",
    "Long64Unsigned",
    "LongUnsigned",
    "Null",
    "OctetString",
    "Reader",
    "Structure",
    "Time",
    "TypeDesc",
    "Unsigned",
    "Utf8String",
    "VisibleString",
    "array_of",
    "date_time_of",
    "decode_data",
    "encode_data",
    "encode_length",
    "make_array",
    "make_structure",
    "number",
    "read_data",
    "structure_of",
    "to_json",
    "utc_datetime",
]
