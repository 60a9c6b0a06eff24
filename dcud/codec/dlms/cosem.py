"""The COSEM interface classes a DCU reads (Blue Book 4.3-4.5), on top of :mod:`dcud.codec.dlms.axdr`.

- Register (3), Extended register (4), Demand register (5): the value (attribute 2) and scaler_unit
  (attribute 3, a structure {integer scaler, enum unit}); :func:`scaled` gives ``value x 10^scaler`` and the
  plain unit symbol dcud's other meter protocols publish (``Wh``, ``W``, ``var``, ``V``, ``A``, ``Hz``,
  ``m3``, ``degC``...).
- Clock (8): attribute 2, a date-time (most meters send it as a 12-byte octet-string).
- Profile generic (7): capture_objects (attribute 3), capture_period (4), buffer (2) read with selective
  access by range (:func:`range_descriptor`) or by entry (:func:`entry_descriptor`), entries_in_use (7);
  :func:`profile_rows` turns a buffer into rows with their capture time (filling the times a compressed
  buffer leaves null).
- Association LN (15): object_list (attribute 2) as :class:`ObjectListEntry` (class, OBIS, version,
  attribute and method access).

Values that do not have the shape the class defines raise :class:`~dcud.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from dcud.codec.dlms.axdr import (
    Array,
    Boolean,
    CosemDateTime,
    Data,
    DoubleLongUnsigned,
    Enum,
    Integer,
    LongUnsigned,
    Null,
    OctetString,
    Structure,
    Unsigned,
    array_of,
    date_time_of,
    number,
    structure_of,
)
from dcud.codec.dlms.obis import AttributeRef, Obis, ObisError
from dcud.codec.dlms.selective_access import AccessSelection
from dcud.errors import RemoteProtocolError

CLASS_DATA = 1
CLASS_REGISTER = 3
CLASS_EXTENDED_REGISTER = 4
CLASS_DEMAND_REGISTER = 5
CLASS_REGISTER_ACTIVATION = 6
CLASS_PROFILE_GENERIC = 7
CLASS_CLOCK = 8
CLASS_ASSOCIATION_SN = 12
CLASS_ASSOCIATION_LN = 15
CLASS_SECURITY_SETUP = 64
CLASS_DISCONNECT_CONTROL = 70

CLASS_NAMES: dict[int, str] = {
    CLASS_DATA: "Data",
    CLASS_REGISTER: "Register",
    CLASS_EXTENDED_REGISTER: "Extended register",
    CLASS_DEMAND_REGISTER: "Demand register",
    CLASS_REGISTER_ACTIVATION: "Register activation",
    CLASS_PROFILE_GENERIC: "Profile generic",
    CLASS_CLOCK: "Clock",
    9: "Script table",
    10: "Schedule",
    11: "Special days table",
    CLASS_ASSOCIATION_SN: "Association SN",
    CLASS_ASSOCIATION_LN: "Association LN",
    17: "SAP assignment",
    18: "Image transfer",
    20: "Activity calendar",
    21: "Register monitor",
    22: "Single action schedule",
    23: "IEC HDLC setup",
    26: "Utility tables",
    29: "Auto connect",
    40: "Push setup",
    41: "TCP-UDP setup",
    42: "IPv4 setup",
    45: "GPRS modem setup",
    47: "GSM diagnostic",
    CLASS_SECURITY_SETUP: "Security setup",
    CLASS_DISCONNECT_CONTROL: "Disconnect control",
    71: "Limiter",
    72: "M-Bus client",
}
"""Interface class names of the Blue Book, for listings (``dcud dlms objects``)."""

CLOCK_OBIS = Obis(0, 0, 1, 0, 0, 255)
ASSOCIATION_LN_OBIS = Obis(0, 0, 40, 0, 0, 255)
"""The current association (the one the client is talking over)."""
CLOCK_TIME = AttributeRef(CLASS_CLOCK, CLOCK_OBIS, 2)

REGISTER_VALUE = 2
REGISTER_SCALER_UNIT = 3
PROFILE_BUFFER = 2
PROFILE_CAPTURE_OBJECTS = 3
PROFILE_CAPTURE_PERIOD = 4
PROFILE_ENTRIES_IN_USE = 7
ASSOCIATION_OBJECT_LIST = 2
ASSOCIATION_REPLY_TO_HLS = 1
"""Association LN method 1: reply_to_HLS_authentication."""

SELECTOR_RANGE = 1
SELECTOR_ENTRY = 2

# Blue Book 4.3.2 unit enumeration, mapped to the plain symbols dcud publishes (None: no unit).
UNITS: dict[int, str | None] = {
    1: "a",
    2: "mo",
    3: "wk",
    4: "d",
    5: "h",
    6: "min",
    7: "s",
    8: "deg",
    9: "degC",
    10: "currency",
    11: "m",
    12: "m/s",
    13: "m3",
    14: "m3",
    15: "m3/h",
    16: "m3/h",
    17: "m3/d",
    18: "m3/d",
    19: "l",
    20: "kg",
    21: "N",
    22: "Nm",
    23: "Pa",
    24: "bar",
    25: "J",
    26: "J/h",
    27: "W",
    28: "VA",
    29: "var",
    30: "Wh",
    31: "VAh",
    32: "varh",
    33: "A",
    34: "C",
    35: "V",
    36: "V/m",
    37: "F",
    38: "ohm",
    39: "ohm m2/m",
    40: "Wb",
    41: "T",
    42: "A/m",
    43: "H",
    44: "Hz",
    45: "1/Wh",
    46: "1/varh",
    47: "1/VAh",
    48: "V2h",
    49: "A2h",
    50: "kg/s",
    51: "S",
    52: "K",
    53: "1/V2h",
    54: "1/A2h",
    55: "1/m3",
    56: "%",
    57: "Ah",
    60: "Wh/m3",
    61: "J/m3",
    62: "mol%",
    63: "g/m3",
    64: "Pa s",
    65: "J/kg",
    66: "g/cm2",
    67: "atm",
    70: "dBm",
    71: "dBuV",
    72: "dB",
    253: None,
    254: None,
    255: None,
}
"""Unit enum to symbol. Corrected volumes (14, 16, 18) share the plain volume symbols; 255 is 'count'."""


def unit_symbol(unit: int) -> str | None:
    """The symbol of a unit enum value; None for 'count', 'other' and unknown values."""
    return UNITS.get(unit)


# ---------------------------------------------------------------------------------------------------
# Register


@dataclass(frozen=True, slots=True)
class ScalerUnit:
    """Register attribute 3: ``value x 10^scaler`` is in ``unit``."""

    scaler: int
    unit: int

    @property
    def symbol(self) -> str | None:
        """The unit's plain symbol."""
        return unit_symbol(self.unit)

    def to_data(self) -> Structure:
        """The attribute value (for a simulator)."""
        return Structure((Integer(self.scaler), Enum(self.unit)))


def decode_scaler_unit(value: Data) -> ScalerUnit:
    """Register attribute 3 from its Data; RemoteProtocolError if it is not {integer, enum}."""
    scaler, unit = structure_of(value, 2, "scaler_unit")
    # The Blue Book says {integer, enum}; a few meters send other integer widths, which mean the same.
    raw_scaler = number(scaler)
    if (
        not isinstance(unit, Enum | Unsigned)
        or isinstance(raw_scaler, float)
        or not -128 <= raw_scaler <= 127
    ):
        raise RemoteProtocolError(f"scaler_unit is not {{integer, enum}}: {scaler.NAME}, {unit.NAME}")
    return ScalerUnit(raw_scaler, unit.value)


def scaled(value: Data, scaler_unit: ScalerUnit | None) -> tuple[int | float, str | None]:
    """A register value scaled (``int`` while the scaler is not negative, as the M-Bus decoder does)."""
    raw = number(value)
    if scaler_unit is None:
        return raw, None
    scaler = scaler_unit.scaler
    if isinstance(raw, float):
        result: int | float = raw * (10.0**scaler)
    elif scaler >= 0:
        result = raw * 10**scaler
    else:
        # Round to the scaler's decimals: 12345 x 10^-3 is 12.345, not 12.345000000000001.
        result = round(raw * 10.0**scaler, -scaler)
    return result, scaler_unit.symbol


# ---------------------------------------------------------------------------------------------------
# Clock


def clock_time(value: Data) -> CosemDateTime:
    """Clock attribute 2 (date-time or 12-byte octet-string)."""
    return date_time_of(value)


def clock_value(time: datetime, clock_status: int = 0x00) -> OctetString:
    """Clock attribute 2 to write: the 12-byte octet-string form every meter accepts.

    An aware ``time`` carries its offset (deviation); a naive one is sent without (deviation 0x8000).
    """
    return OctetString(CosemDateTime.from_datetime(time, clock_status).to_bytes())


# ---------------------------------------------------------------------------------------------------
# Profile generic


@dataclass(frozen=True, slots=True)
class CaptureObject:
    """One column of a profile: the attribute captured (and the element of it, 0 = all)."""

    class_id: int
    obis: Obis
    attribute: int
    data_index: int = 0

    @property
    def ref(self) -> AttributeRef:
        """As an attribute reference."""
        return AttributeRef(self.class_id, self.obis, self.attribute)

    def to_data(self) -> Structure:
        """The capture object definition {class, logical name, attribute, data index}."""
        return Structure(
            (
                LongUnsigned(self.class_id),
                OctetString(self.obis.to_bytes()),
                Integer(self.attribute),
                LongUnsigned(self.data_index),
            )
        )

    def __str__(self) -> str:
        return f"{self.class_id}/{self.obis}/{self.attribute}"


def decode_capture_objects(value: Data) -> list[CaptureObject]:
    """Profile generic attribute 3 (an array of capture object definitions)."""
    out: list[CaptureObject] = []
    for item in array_of(value, "capture_objects"):
        class_id, name, attribute, data_index = structure_of(item, 4, "capture object")
        out.append(
            CaptureObject(int(number(class_id)), _obis(name), int(number(attribute)), int(number(data_index)))
        )
    return out


def _obis(value: Data) -> Obis:
    if not isinstance(value, OctetString):
        raise RemoteProtocolError(f"logical name is {value.NAME}, not an octet-string")
    try:
        return Obis.from_bytes(value.value)
    except ObisError as exc:
        raise RemoteProtocolError(f"logical name: {exc}", value.value) from None


def range_descriptor(
    start: datetime,
    end: datetime,
    *,
    restricting: CaptureObject | None = None,
    columns: Sequence[CaptureObject] = (),
    clock_status: int = 0xFF,
) -> AccessSelection:
    """Selective access by range (selector 1): rows whose ``restricting`` column (default the clock's
    time) lies from ``start`` to ``end`` inclusive; ``columns`` empty means every column.

    Aware datetimes are sent with their offset as deviation, naive ones without; the clock status of
    the bounds is 'not specified' (0xFF) unless given.
    """
    restricting = restricting or CaptureObject(CLASS_CLOCK, CLOCK_OBIS, 2, 0)
    parameters = Structure(
        (
            restricting.to_data(),
            OctetString(CosemDateTime.from_datetime(start, clock_status).to_bytes()),
            OctetString(CosemDateTime.from_datetime(end, clock_status).to_bytes()),
            Array(tuple(c.to_data() for c in columns)),
        )
    )
    return AccessSelection(SELECTOR_RANGE, parameters)


def entry_descriptor(
    from_entry: int, to_entry: int = 0, from_column: int = 1, to_column: int = 0
) -> AccessSelection:
    """Selective access by entry (selector 2): rows ``from_entry``..``to_entry`` (1-based, 0 = to the last),
    columns ``from_column``..``to_column`` (0 = to the last)."""
    parameters = Structure(
        (
            DoubleLongUnsigned(from_entry),
            DoubleLongUnsigned(to_entry),
            LongUnsigned(from_column),
            LongUnsigned(to_column),
        )
    )
    return AccessSelection(SELECTOR_ENTRY, parameters)


@dataclass(frozen=True, slots=True)
class ProfileRow:
    """One buffer entry: its capture time (None when the row has no clock column) and its values."""

    time: CosemDateTime | None
    values: tuple[Data, ...]


def profile_rows(
    buffer: Data, capture_objects: Sequence[CaptureObject], capture_period_s: int = 0
) -> list[ProfileRow]:
    """The rows of a profile buffer (attribute 2), each with its capture time.

    The time comes from the clock column (the first capture object that is the clock's attribute 2).
    A compressed buffer sends that column as null-data after the first row: the time is then the last
    row's plus ``capture_period_s`` (RemoteProtocolError when that is 0 or no earlier time is known).
    """
    clock_column = next(
        (i for i, c in enumerate(capture_objects) if c.class_id == CLASS_CLOCK and c.attribute == 2),
        None,
    )
    rows: list[ProfileRow] = []
    previous: datetime | None = None
    for item in array_of(buffer, "profile buffer"):
        values = structure_of(item, None, "profile row")
        if capture_objects and len(values) != len(capture_objects):
            raise RemoteProtocolError(
                f"profile row of {len(values)} values for {len(capture_objects)} columns"
            )
        time: CosemDateTime | None = None
        if clock_column is not None:
            cell = values[clock_column]
            if isinstance(cell, Null):
                if previous is None or capture_period_s <= 0:
                    raise RemoteProtocolError("profile row without a time and no period to derive it")
                previous = previous + timedelta(seconds=capture_period_s)
                time = CosemDateTime.from_datetime(previous)
            else:
                time = date_time_of(cell)
                previous = time.to_datetime()
        rows.append(ProfileRow(time, values))
    return rows


# ---------------------------------------------------------------------------------------------------
# Association LN


@dataclass(frozen=True, slots=True)
class AttributeAccess:
    """One attribute in an object list: its id, access mode (0 none, 1 read, 2 write, 3 read-write...)
    and the selective access selectors it supports."""

    attribute: int
    access_mode: int
    selectors: tuple[int, ...] = ()

    @property
    def readable(self) -> bool:
        """Whether GET is allowed (modes 1, 3, and the authenticated variants 5, 7)."""
        return bool(self.access_mode & 0x01)

    @property
    def writable(self) -> bool:
        """Whether SET is allowed (modes 2, 3, 6, 7)."""
        return bool(self.access_mode & 0x02)


@dataclass(frozen=True, slots=True)
class MethodAccess:
    """One method in an object list: its id and access mode (0 none, 1 access, 2 authenticated)."""

    method: int
    access_mode: int


@dataclass(frozen=True, slots=True)
class ObjectListEntry:
    """One object the association exposes: interface class, version, logical name, access rights."""

    class_id: int
    version: int
    obis: Obis
    attributes: tuple[AttributeAccess, ...]
    methods: tuple[MethodAccess, ...]

    @property
    def class_name(self) -> str:
        """The interface class name."""
        return CLASS_NAMES.get(self.class_id, f"class {self.class_id}")

    def to_json(self) -> dict[str, object]:
        """For ``dcud dlms objects`` and logs."""
        return {
            "class_id": self.class_id,
            "class": self.class_name,
            "version": self.version,
            "obis": str(self.obis),
            "attributes": [
                {"id": a.attribute, "access": a.access_mode, "selectors": list(a.selectors)}
                for a in self.attributes
            ],
            "methods": [{"id": m.method, "access": m.access_mode} for m in self.methods],
        }


def decode_object_list(value: Data) -> list[ObjectListEntry]:
    """Association LN attribute 2: every object the current association may reach."""
    out: list[ObjectListEntry] = []
    for item in array_of(value, "object_list"):
        class_id, version, name, rights = structure_of(item, 4, "object_list element")
        attributes: list[AttributeAccess] = []
        methods: list[MethodAccess] = []
        rights_items = structure_of(rights, None, "access rights")
        if len(rights_items) not in (1, 2):
            raise RemoteProtocolError(f"access rights of {len(rights_items)} parts")
        for attribute in array_of(rights_items[0], "attribute access"):
            attribute_id, mode, selectors = structure_of(attribute, 3, "attribute access item")
            chosen: tuple[int, ...] = ()
            if not isinstance(selectors, Null):
                chosen = tuple(int(number(s)) for s in array_of(selectors, "access selectors"))
            attributes.append(AttributeAccess(int(number(attribute_id)), int(number(mode)), chosen))
        if len(rights_items) == 2:
            for method in array_of(rights_items[1], "method access"):
                method_id, mode = structure_of(method, 2, "method access item")
                # Version 0 of the class sends a boolean, later versions an enum.
                access = int(mode.value) if isinstance(mode, Boolean) else int(number(mode))
                methods.append(MethodAccess(int(number(method_id)), access))
        out.append(
            ObjectListEntry(
                int(number(class_id)), int(number(version)), _obis(name), tuple(attributes), tuple(methods)
            )
        )
    return out


def find_object(objects: Sequence[ObjectListEntry], obis: Obis) -> ObjectListEntry | None:
    """The entry for ``obis``, or None when the association does not list it."""
    return next((o for o in objects if o.obis == obis), None)


__all__ = [
    "ASSOCIATION_LN_OBIS",
    "CLASS_ASSOCIATION_LN",
    "CLASS_CLOCK",
    "CLASS_DATA",
    "CLASS_DEMAND_REGISTER",
    "CLASS_EXTENDED_REGISTER",
    "CLASS_NAMES",
    "CLASS_PROFILE_GENERIC",
    "CLASS_REGISTER",
    "CLOCK_OBIS",
    "CLOCK_TIME",
    "UNITS",
    "AttributeAccess",
    "CaptureObject",
    "MethodAccess",
    "ObjectListEntry",
    "ProfileRow",
    "ScalerUnit",
    "clock_time",
    "clock_value",
    "decode_capture_objects",
    "decode_object_list",
    "decode_scaler_unit",
    "entry_descriptor",
    "find_object",
    "profile_rows",
    "range_descriptor",
    "scaled",
    "unit_symbol",
]
