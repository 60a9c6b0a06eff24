"""M-Bus application layer (EN 13757-3), sans-I/O: RSP_UD user data to typed records, and back.

Decodes CI 72 (variable data, 12-byte header), 76 (the same, multi-byte values MSB first), 7A (4-byte
short header), 78 (no header), 73/77 (legacy fixed data structure), 71 (alarm status) and 70 (application
error, raised as :class:`~dcud.errors.NegativeResponse`). Every malformed input raises
:class:`~dcud.errors.RemoteProtocolError`; nothing else escapes.

Values are scaled to the base unit named by the VIF (``Wh``, ``J``, ``m3``, ``kg``, ``s``, ``W``, ``J/h``,
``m3/h``, ``kg/h``, ``degC``, ``K``, ``bar``, ``V``, ``A``...): ``value = raw x 10^exponent`` (times are
converted to seconds). Integers stay ``int`` when the exponent is not negative, otherwise ``float``.
Dates (types G, F, I, J) become ISO 8601 strings in the meter's local time; a date the meter flags
invalid, or one that names no real day (``00.00.00``), becomes ``""``. A BCD field holding non-decimal
digits (meters use them as error markers) keeps its digits as a hex string. Manufacturer-specific data
(DIF 0F/1F) is kept raw as hex.

A value that is physically impossible for its quantity (:data:`PHYSICAL_RANGES`: a reception level
outside -174..+27 dBm, a temperature below absolute zero, a relative humidity outside 0..100 %) is
never published as a number: the record keeps its place, ``value`` becomes ``""`` and ``invalid``
says why (the raw bytes stay in ``raw_data`` and in the JSON ``raw``). The rest of the telegram is
decoded as usual, so one bad record does not cost the meter's good ones.

The reception level (VIF FD 71, "reception level of a partner device") is plain dBm in the record's
data type, as jMbus, exmbus and MBusParser read it; EN 13757-3 defines no conversion (the
``2 x raw - 130`` some decoders apply has no source in the standard).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from dcud.codec.mbus import MbusFrame, decode_manufacturer, encode_manufacturer
from dcud.errors import LocalProtocolError, NegativeResponse, RemoteProtocolError

CI_ERROR = 0x70
CI_ALARM = 0x71
CI_VARIABLE = 0x72
CI_FIXED = 0x73
CI_VARIABLE_MSB = 0x76
CI_FIXED_MSB = 0x77
CI_VARIABLE_NO_HEADER = 0x78
CI_VARIABLE_SHORT = 0x7A

MAX_DIFE = 10
"""EN 13757-3: at most 10 DIF extensions per record."""
MAX_VIFE = 10
"""EN 13757-3: at most 10 VIF extensions per record."""

FUNCTIONS: tuple[str, ...] = ("instantaneous", "maximum", "minimum", "error")
"""DIF bits 5-4 in order."""

APPLICATION_ERRORS: dict[int, str] = {
    0x00: "unspecified error",
    0x01: "unimplemented CI field",
    0x02: "buffer too long, truncated",
    0x03: "too many records",
    0x04: "premature end of record",
    0x05: "more than 10 DIFEs",
    0x06: "more than 10 VIFEs",
    0x07: "reserved",
    0x08: "application busy",
    0x09: "too many readouts",
}
"""CI 70 error codes (EN 13757-3) and their text."""

MEDIUM_NAMES: dict[int, str] = {
    0x00: "other",
    0x01: "oil",
    0x02: "electricity",
    0x03: "gas",
    0x04: "heat (outlet)",
    0x05: "steam",
    0x06: "warm water",
    0x07: "water",
    0x08: "heat cost allocator",
    0x09: "compressed air",
    0x0A: "cooling (outlet)",
    0x0B: "cooling (inlet)",
    0x0C: "heat (inlet)",
    0x0D: "heat/cooling",
    0x0E: "bus/system",
    0x0F: "unknown",
    0x10: "irrigation water",
    0x11: "water logger",
    0x12: "gas logger",
    0x13: "gas converter",
    0x14: "calorific value",
    0x15: "hot water",
    0x16: "cold water",
    0x17: "dual water",
    0x18: "pressure",
    0x19: "A/D converter",
    0x1A: "smoke detector",
    0x1B: "room sensor",
    0x1C: "gas detector",
    0x1D: "carbon monoxide alarm",
    0x1E: "heat alarm",
    0x1F: "sensor",
    0x20: "breaker (electricity)",
    0x21: "valve (gas or water)",
    0x25: "customer unit (display)",
    0x28: "waste water",
    0x29: "garbage",
    0x2A: "carbon dioxide",
    0x30: "service unit",
    0x31: "communication controller",
    0x32: "unidirectional repeater",
    0x33: "bidirectional repeater",
    0x36: "radio converter (system side)",
    0x37: "radio converter (meter side)",
    0x38: "wired adapter",
}
"""Medium / device type codes of the variable data header (EN 13757-3, OMS)."""

FIXED_MEDIUM_NAMES: dict[int, str] = {
    0x0: "other",
    0x1: "oil",
    0x2: "electricity",
    0x3: "gas",
    0x4: "heat",
    0x5: "steam",
    0x6: "hot water",
    0x7: "water",
    0x8: "heat cost allocator",
    0xA: "gas (mode 2)",
    0xB: "heat (mode 2)",
    0xC: "hot water (mode 2)",
    0xD: "water (mode 2)",
    0xE: "heat cost allocator (mode 2)",
}
"""The 4-bit medium of the legacy fixed data structure (CI 73/77)."""


def medium_name(code: int) -> str:
    """Name of a variable-data medium code (``reserved`` for unassigned codes)."""
    return MEDIUM_NAMES.get(code, "reserved")


# ---------------------------------------------------------------------------------------------------
# VIF tables

_NUMBER = 0
_DATE = 1  # type G when 2 bytes, otherwise like _DATETIME
_DATETIME = 2  # type F (4 bytes), I (6 bytes), J (3 bytes, time only)
_BITS = 3  # bit field / identifier: unsigned
_MANUFACTURER = 4


@dataclass(frozen=True, slots=True)
class _Vif:
    quantity: str
    unit: str
    exp: int = 0
    factor: int = 1
    kind: int = _NUMBER


_TIME_FACTORS = (1, 60, 3600, 86400)


def _primary_table() -> dict[int, _Vif]:
    t: dict[int, _Vif] = {}
    for n in range(8):
        t[0x00 | n] = _Vif("energy", "Wh", n - 3)
        t[0x08 | n] = _Vif("energy", "J", n)
        t[0x10 | n] = _Vif("volume", "m3", n - 6)
        t[0x18 | n] = _Vif("mass", "kg", n - 3)
        t[0x28 | n] = _Vif("power", "W", n - 3)
        t[0x30 | n] = _Vif("power", "J/h", n)
        t[0x38 | n] = _Vif("volume_flow", "m3/h", n - 6)
        t[0x40 | n] = _Vif("volume_flow", "m3/min", n - 7)
        t[0x48 | n] = _Vif("volume_flow", "m3/s", n - 9)
        t[0x50 | n] = _Vif("mass_flow", "kg/h", n - 3)
    for n in range(4):
        t[0x20 | n] = _Vif("on_time", "s", 0, _TIME_FACTORS[n])
        t[0x24 | n] = _Vif("operating_time", "s", 0, _TIME_FACTORS[n])
        t[0x58 | n] = _Vif("flow_temperature", "degC", n - 3)
        t[0x5C | n] = _Vif("return_temperature", "degC", n - 3)
        t[0x60 | n] = _Vif("temperature_difference", "K", n - 3)
        t[0x64 | n] = _Vif("external_temperature", "degC", n - 3)
        t[0x68 | n] = _Vif("pressure", "bar", n - 3)
        t[0x70 | n] = _Vif("averaging_duration", "s", 0, _TIME_FACTORS[n])
        t[0x74 | n] = _Vif("actuality_duration", "s", 0, _TIME_FACTORS[n])
    t[0x6C] = _Vif("date", "", kind=_DATE)
    t[0x6D] = _Vif("datetime", "", kind=_DATETIME)
    t[0x6E] = _Vif("hca", "")
    t[0x6F] = _Vif("reserved", "")
    t[0x78] = _Vif("fabrication_number", "", kind=_BITS)
    t[0x79] = _Vif("enhanced_identification", "", kind=_BITS)
    t[0x7A] = _Vif("bus_address", "", kind=_BITS)
    t[0x7B] = _Vif("reserved", "")
    t[0x7C] = _Vif("plain_text_unit", "")
    t[0x7D] = _Vif("reserved", "")
    t[0x7E] = _Vif("any", "")
    t[0x7F] = _Vif("manufacturer_specific", "", kind=_MANUFACTURER)
    return t


def _fd_table() -> dict[int, _Vif]:
    t: dict[int, _Vif] = {}
    for n in range(4):
        t[0x00 | n] = _Vif("credit", "", n - 3)
        t[0x04 | n] = _Vif("debit", "", n - 3)
        t[0x24 | n] = _Vif("storage_interval", "s", 0, _TIME_FACTORS[n])
        t[0x2C | n] = _Vif("duration_since_last_readout", "s", 0, _TIME_FACTORS[n])
        t[0x34 | n] = _Vif("tariff_period", "s", 0, _TIME_FACTORS[n])
    names = {
        0x08: "access_number",
        0x09: "medium",
        0x0A: "manufacturer",
        0x0B: "parameter_set_id",
        0x0C: "model_version",
        0x0D: "hardware_version",
        0x0E: "firmware_version",
        0x0F: "software_version",
        0x10: "customer_location",
        0x11: "customer",
        0x12: "access_code_user",
        0x13: "access_code_operator",
        0x14: "access_code_system_operator",
        0x15: "access_code_developer",
        0x16: "password",
        0x1E: "retry",
        0x1F: "remote_control",
        0x20: "first_storage_number",
        0x21: "last_storage_number",
        0x22: "storage_block_size",
        0x3A: "dimensionless",
        0x60: "reset_counter",
        0x61: "cumulation_counter",
        0x62: "control_signal",
        0x63: "day_of_week",
        0x64: "week_number",
        0x65: "day_change_time_point",
        0x66: "parameter_activation_state",
        0x67: "special_supplier_information",
        0x72: "daylight_saving",
        0x73: "listening_window_management",
        0x75: "meter_stop_count",
        0x76: "manufacturer_data_container",
    }
    for code, name in names.items():
        t[code] = _Vif(name, "")
    for code, name in {
        0x17: "error_flags",
        0x18: "error_mask",
        0x1A: "digital_output",
        0x1B: "digital_input",
    }.items():
        t[code] = _Vif(name, "", kind=_BITS)
    t[0x1C] = _Vif("baud_rate", "Bd")
    t[0x1D] = _Vif("response_delay_time", "bit")
    t[0x28] = _Vif("storage_interval", "month")
    t[0x29] = _Vif("storage_interval", "year")
    t[0x30] = _Vif("tariff_start", "", kind=_DATETIME)
    for n in range(1, 4):
        t[0x30 | n] = _Vif("tariff_duration", "s", 0, _TIME_FACTORS[n])
    t[0x38] = _Vif("tariff_period", "month")
    t[0x39] = _Vif("tariff_period", "year")
    for n in range(16):
        t[0x40 | n] = _Vif("voltage", "V", n - 9)
        t[0x50 | n] = _Vif("current", "A", n - 12)
    for n, unit in enumerate(("h", "d", "month", "year")):
        factor = (3600, 86400, 1, 1)[n]
        t[0x68 | n] = _Vif("duration_since_last_cumulation", "s" if factor > 1 else unit, 0, factor)
        t[0x6C | n] = _Vif("battery_operating_time", "s" if factor > 1 else unit, 0, factor)
    t[0x70] = _Vif("battery_change_datetime", "", kind=_DATETIME)
    t[0x71] = _Vif("reception_level", "dBm")
    t[0x74] = _Vif("remaining_battery_lifetime", "s", 0, 86400)
    for code in range(0x80):
        t.setdefault(code, _Vif("reserved", ""))
    return t


def _fb_table() -> dict[int, _Vif]:
    t: dict[int, _Vif] = {}
    for n in range(2):
        t[0x00 | n] = _Vif("energy", "Wh", n + 5)
        t[0x08 | n] = _Vif("energy", "J", n + 8)
        t[0x10 | n] = _Vif("volume", "m3", n + 2)
        t[0x18 | n] = _Vif("mass", "kg", n + 5)
        t[0x1A | n] = _Vif("relative_humidity", "%", n - 1)
        t[0x28 | n] = _Vif("power", "W", n + 5)
        t[0x30 | n] = _Vif("power", "J/h", n + 8)
    t[0x21] = _Vif("volume", "ft3", -1)
    t[0x22] = _Vif("volume", "USgal", -1)
    t[0x23] = _Vif("volume", "USgal", 0)
    t[0x24] = _Vif("volume_flow", "USgal/min", -3)
    t[0x25] = _Vif("volume_flow", "USgal/min", 0)
    t[0x26] = _Vif("volume_flow", "USgal/h", 0)
    for n in range(4):
        t[0x58 | n] = _Vif("flow_temperature", "degF", n - 3)
        t[0x5C | n] = _Vif("return_temperature", "degF", n - 3)
        t[0x60 | n] = _Vif("temperature_difference", "degF", n - 3)
        t[0x64 | n] = _Vif("external_temperature", "degF", n - 3)
        t[0x70 | n] = _Vif("temperature_limit", "degF", n - 3)
        t[0x74 | n] = _Vif("temperature_limit", "degC", n - 3)
    for n in range(8):
        t[0x78 | n] = _Vif("cumulative_max_power", "W", n - 3)
    for code in range(0x80):
        t.setdefault(code, _Vif("reserved", ""))
    return t


_PRIMARY = _primary_table()
_FD = _fd_table()
_FB = _fb_table()

# ---------------------------------------------------------------------------------------------------
# Physical plausibility

_ABSOLUTE_ZERO_DEGC = -273.15
_ABSOLUTE_ZERO_DEGF = -459.67

PHYSICAL_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    # A receiver cannot measure below the thermal noise floor (-174 dBm in 1 Hz), nor receive more than
    # the strongest transmitter metering radio may use (EN 13757-4 N mode, 169 MHz: 500 mW = +27 dBm).
    ("reception_level", "dBm"): (-174.0, 27.0),
    ("relative_humidity", "%"): (0.0, 100.0),
    **{
        (quantity, unit): (zero, math.inf)
        for quantity in ("flow_temperature", "return_temperature", "external_temperature", "temperature")
        for unit, zero in (("degC", _ABSOLUTE_ZERO_DEGC), ("degF", _ABSOLUTE_ZERO_DEGF))
    },
}
"""(quantity, unit) -> the closed range a scaled value must lie in; outside it the record is invalid.

Only bounds set by physics (or by the radio regulations every M-Bus radio obeys) are listed, never
"unusual" values: a meter may legitimately report a negative energy or a 150 degC flow temperature.
Temperature differences and limits are not bounded (a difference can be negative; a limit is a setting).
"""


def _implausible(quantity: str, unit: str, value: int | float | str) -> str:
    """Why ``value`` cannot be a real ``quantity`` in ``unit`` (``""``: it can)."""
    bounds = PHYSICAL_RANGES.get((quantity, unit))
    if bounds is None or isinstance(value, str):
        return ""
    low, high = bounds
    if math.isnan(value):
        return f"{quantity} is not a number"
    if low <= value <= high:
        return ""
    allowed = f">= {low:g} {unit}" if math.isinf(high) else f"{low:g}..{high:+g} {unit}"
    return f"{quantity} {value:g} {unit} is physically impossible (allowed: {allowed})"


# Fixed data structure (CI 73/77) unit codes: (quantity, unit, exponent).
_FIXED_UNITS: dict[int, tuple[str, str, int]] = {}
for _i in range(9):
    _FIXED_UNITS[0x02 + _i] = ("energy", "Wh", _i)
    _FIXED_UNITS[0x0B + _i] = ("energy", "J", _i + 3)
    _FIXED_UNITS[0x14 + _i] = ("power", "W", _i)
    _FIXED_UNITS[0x1D + _i] = ("power", "J/h", _i + 3)
    _FIXED_UNITS[0x26 + _i] = ("volume", "m3", _i - 6)
    _FIXED_UNITS[0x2F + _i] = ("volume_flow", "m3/h", _i - 6)
_FIXED_UNITS[0x00] = ("time", "", 0)
_FIXED_UNITS[0x01] = ("date", "", 0)
_FIXED_UNITS[0x38] = ("temperature", "degC", -3)
_FIXED_UNITS[0x39] = ("hca", "", 0)
_FIXED_UNITS[0x3F] = ("dimensionless", "", 0)
_FIXED_SAME_BUT_HISTORIC = 0x3E

# ---------------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True, slots=True)
class MbusRecord:
    """One decoded data record; ``value`` is scaled to ``unit`` (see the module docstring)."""

    index: int
    value: int | float | str
    unit: str
    quantity: str
    storage: int = 0
    tariff: int = 0
    subunit: int = 0
    function: str = "instantaneous"
    raw_dif: str = ""
    raw_vif: str = ""
    raw_data: str = ""
    invalid: str = ""
    """Why ``value`` was refused (physically impossible, see :data:`PHYSICAL_RANGES`); ``""``: valid."""

    @property
    def id(self) -> str:
        """The record index as a string (the ``values[].id`` of MQTT readings)."""
        return str(self.index)

    def to_json(self) -> dict[str, object]:
        """The MQTT ``values[]`` entry; a refused value adds ``invalid`` (the reason) and ``raw`` (hex)."""
        entry: dict[str, object] = {
            "id": self.id,
            "value": self.value,
            "unit": self.unit,
            "quantity": self.quantity,
            "storage": self.storage,
            "tariff": self.tariff,
            "subunit": self.subunit,
            "function": self.function,
        }
        if self.invalid:
            entry["invalid"] = self.invalid
            entry["raw"] = self.raw_data
        return entry


@dataclass(frozen=True, slots=True)
class MbusTelegram:
    """One decoded RSP_UD. Header fields a CI does not carry are None (or "" for strings)."""

    ci: int
    address: int = 0
    id: str = ""
    manufacturer: str = ""
    version: int | None = None
    medium: int | None = None
    medium_name: str = ""
    access_number: int | None = None
    status: int | None = None
    signature: int | None = None
    records: list[MbusRecord] = field(default_factory=list)
    more_records_follow: bool = False

    @property
    def secondary_address(self) -> str:
        """16 hex digits ``IIIIIIIIMMMMVVDD`` as used for selection (empty without a long header)."""
        if len(self.id) != 8 or self.version is None or self.medium is None:
            return ""
        return f"{self.id}{encode_manufacturer(self.manufacturer):04X}{self.version:02X}{self.medium:02X}"

    def to_json(self) -> dict[str, object]:
        """Header and records as a JSON-ready dict."""
        return {
            "address": self.address,
            "ci": self.ci,
            "id": self.id,
            "manufacturer": self.manufacturer,
            "version": self.version,
            "medium": self.medium,
            "medium_name": self.medium_name,
            "access_number": self.access_number,
            "status": self.status,
            "signature": self.signature,
            "more_records_follow": self.more_records_follow,
            "records": [r.to_json() for r in self.records],
        }


# ---------------------------------------------------------------------------------------------------
# Primitive decoders


def _bcd_digits(data: bytes) -> str:
    """BCD bytes in transmission order (LSB first) -> digit string MSD first (hex digits kept)."""
    return data[::-1].hex().upper()


def decode_bcd(data: bytes) -> int | str:
    """Decode BCD (LSB byte first). ``F`` as most significant digit means negative; any other
    non-decimal digit makes the field an error marker, returned as its hex digit string."""
    digits = _bcd_digits(data)
    if not digits:  # a zero-length field (LVAR C0h/D0h): found by tests/fuzz
        return 0
    if digits.isdigit():
        return int(digits)
    if digits[0] == "F" and digits[1:].isdigit():
        return -int(digits[1:]) if len(digits) > 1 else 0
    return digits


def _int_le(data: bytes, signed: bool) -> int:
    return int.from_bytes(data, "little", signed=signed)


def _iso_date(year: int, month: int, day: int) -> str:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return ""
    return f"{year:04d}-{month:02d}-{day:02d}"


def _year(yy: int, hundred: int) -> int:
    if hundred:
        return 1900 + 100 * hundred + yy
    # No century information: libmbus's rule, 0..80 -> 20xx, 81..99 -> 19xx.
    return 2000 + yy if yy <= 80 else 1900 + yy


def decode_date_g(b: bytes) -> str:
    """Type G (2 bytes): date as ``YYYY-MM-DD``; ``""`` when no real day is named."""
    day = b[0] & 0x1F
    month = b[1] & 0x0F
    yy = ((b[0] & 0xE0) >> 5) | ((b[1] & 0xF0) >> 1)
    return _iso_date(_year(yy, 0), month, day)


def decode_datetime_f(b: bytes) -> str:
    """Type F (4 bytes): ``YYYY-MM-DDTHH:MM:00``; ``""`` when flagged invalid or no real day."""
    if b[0] & 0x80:
        return ""
    minute = b[0] & 0x3F
    hour = b[1] & 0x1F
    date = _iso_date(
        _year(((b[2] & 0xE0) >> 5) | ((b[3] & 0xF0) >> 1), (b[1] & 0x60) >> 5), b[3] & 0x0F, b[2] & 0x1F
    )
    if not date or hour > 23 or minute > 59:
        return ""
    return f"{date}T{hour:02d}:{minute:02d}:00"


def decode_datetime_i(b: bytes) -> str:
    """Type I (6 bytes): ``YYYY-MM-DDTHH:MM:SS``; ``""`` when flagged invalid or no real day."""
    if b[1] & 0x80:
        return ""
    second = b[0] & 0x3F
    minute = b[1] & 0x3F
    hour = b[2] & 0x1F
    date = _iso_date(_year(((b[3] & 0xE0) >> 5) | ((b[4] & 0xF0) >> 1), 0), b[4] & 0x0F, b[3] & 0x1F)
    if not date or hour > 23 or minute > 59 or second > 59:
        return ""
    return f"{date}T{hour:02d}:{minute:02d}:{second:02d}"


def decode_time_j(b: bytes) -> str:
    """Type J (3 bytes): time of day ``HH:MM:SS``."""
    second, minute, hour = b[0] & 0x3F, b[1] & 0x3F, b[2] & 0x1F
    if hour > 23 or minute > 59 or second > 59:
        return ""
    return f"{hour:02d}:{minute:02d}:{second:02d}"


def _decode_time_point(body: bytes, code: int, quantity: str) -> tuple[str, str]:
    """Date/time by data field size: 2 bytes type G, 3 type J, 4 type F, 6 type I."""
    generic = quantity in ("date", "datetime")
    if code == 0x02:
        return decode_date_g(body), "date" if generic else quantity
    if code == 0x03:
        return decode_time_j(body), "time" if generic else quantity
    if code == 0x04:
        return decode_datetime_f(body), "datetime" if generic else quantity
    return decode_datetime_i(body), "datetime" if generic else quantity


_POW10: list[int] = [10**i for i in range(64)]


def _scale(raw: int | float, exp: int, factor: int) -> int | float:
    if factor != 1:
        raw = raw * factor
    if exp == 0:
        return raw
    if exp > 0:
        return raw * _POW10[exp]
    # Division by an exact power of ten gives the closest float (54321/1000 == 54.321).
    return raw / _POW10[-exp]


# ---------------------------------------------------------------------------------------------------
# Record decoding

_DATA_SIZES = (0, 1, 2, 3, 4, 4, 6, 8, 0, 1, 2, 3, 4, -1, 6, 0)


def _need(data: bytes, pos: int, count: int, what: str) -> None:
    if pos + count > len(data):
        raise RemoteProtocolError(f"premature end of data in {what} at byte {pos}", data)


def _decode_lvar(payload: bytes, lvar: int, msb_first: bool) -> int | str:
    body = payload[::-1] if msb_first else payload
    if lvar <= 0xBF:
        # ASCII, transmitted last character first.
        return body[::-1].decode("latin-1")
    if lvar <= 0xCF:
        value = decode_bcd(body)
        return value
    if lvar <= 0xDF:
        value = decode_bcd(body)
        return -value if isinstance(value, int) else "-" + value
    # Binary: an integer when it fits in 64 bits, else hex digits MSB first.
    if len(body) <= 8:
        return _int_le(body, signed=False)
    return body[::-1].hex().upper()


def _lvar_size(lvar: int, data: bytes, pos: int) -> int:
    if lvar <= 0xBF:
        return lvar
    if lvar <= 0xCF:
        return lvar - 0xC0
    if lvar <= 0xDF:
        return lvar - 0xD0
    if lvar <= 0xEF:
        return lvar - 0xE0
    if lvar <= 0xFA:
        return 4 * (lvar - 0xEC)
    raise RemoteProtocolError(f"reserved LVAR {lvar:02X} at byte {pos}", data)


def _decode_records(data: bytes, start: int, msb_first: bool) -> tuple[list[MbusRecord], bool]:
    records: list[MbusRecord] = []
    more = False
    n = len(data)
    pos = start
    while pos < n:
        rec_start = pos
        dif = data[pos]
        pos += 1
        if dif == 0x2F:  # idle filler
            continue
        if dif & 0x0F == 0x0F:
            if dif in (0x0F, 0x1F):
                rest = data[pos:]
                more = dif == 0x1F
                records.append(
                    MbusRecord(
                        index=len(records),
                        value=rest.hex().upper(),
                        unit="",
                        quantity="more_records_follow" if more else "manufacturer_specific",
                        raw_dif=f"{dif:02X}",
                        raw_data=rest.hex().upper(),
                    )
                )
                break
            raise RemoteProtocolError(f"reserved or master-only DIF {dif:02X} at byte {rec_start}", data)
        # DIFE chain
        storage = (dif >> 6) & 1
        tariff = 0
        subunit = 0
        ext = dif & 0x80
        dife_count = 0
        while ext:
            if pos >= n:
                raise RemoteProtocolError(f"premature end of data in DIFE at byte {pos}", data)
            if dife_count == MAX_DIFE:
                raise RemoteProtocolError(f"more than {MAX_DIFE} DIFEs at byte {pos}", data)
            dife = data[pos]
            pos += 1
            storage |= (dife & 0x0F) << (1 + 4 * dife_count)
            tariff |= ((dife >> 4) & 0x03) << (2 * dife_count)
            subunit |= ((dife >> 6) & 0x01) << dife_count
            dife_count += 1
            ext = dife & 0x80
        dif_end = pos
        # VIF, optional plain-text unit, VIFE chain
        if pos >= n:
            raise RemoteProtocolError(f"premature end of data in VIF at byte {pos}", data)
        vif = data[pos]
        pos += 1
        plain_unit: str | None = None
        if vif & 0x7F == 0x7C:
            if pos >= n:
                raise RemoteProtocolError(f"premature end of data in plain-text VIF at byte {pos}", data)
            text_len = data[pos]
            pos += 1
            _need(data, pos, text_len, "plain-text VIF")
            plain_unit = data[pos : pos + text_len][::-1].decode("latin-1")
            pos += text_len
        vifes: list[int] = []
        ext = vif & 0x80
        while ext:
            if pos >= n:
                raise RemoteProtocolError(f"premature end of data in VIFE at byte {pos}", data)
            if len(vifes) == MAX_VIFE:
                raise RemoteProtocolError(f"more than {MAX_VIFE} VIFEs at byte {pos}", data)
            vife = data[pos]
            pos += 1
            vifes.append(vife)
            ext = vife & 0x80
        vif_end = pos
        # Data
        code = dif & 0x0F
        size = _DATA_SIZES[code]
        lvar = -1
        if size < 0:
            if pos >= n:
                raise RemoteProtocolError(f"premature end of data in LVAR at byte {pos}", data)
            lvar = data[pos]
            pos += 1
            size = _lvar_size(lvar, data, pos - 1)
        _need(data, pos, size, "record data")
        payload = data[pos : pos + size]
        pos += size
        records.append(
            _make_record(
                len(records),
                dif,
                vif,
                vifes=vifes,
                plain_unit=plain_unit,
                code=code,
                lvar=lvar,
                payload=payload,
                msb_first=msb_first,
                storage=storage,
                tariff=tariff,
                subunit=subunit,
                raw_dif=data[rec_start:dif_end],
                raw_vif=data[dif_end:vif_end],
            )
        )
    return records, more


def _lookup_vif(vif: int, vifes: Sequence[int], plain_unit: str | None) -> tuple[_Vif, int]:
    """The VIF description and the index of the first combinable VIFE."""
    if vif in (0xFD, 0xFB):
        if not vifes:
            raise RemoteProtocolError(f"VIF {vif:02X} without its extension code")
        table = _FD if vif == 0xFD else _FB
        return table[vifes[0] & 0x7F], 1
    if plain_unit is not None:
        return _Vif("plain_text_unit", plain_unit), 0
    return _PRIMARY[vif & 0x7F], 0


def _make_record(
    index: int,
    dif: int,
    vif: int,
    *,
    vifes: list[int],
    plain_unit: str | None,
    code: int,
    lvar: int,
    payload: bytes,
    msb_first: bool,
    storage: int,
    tariff: int,
    subunit: int,
    raw_dif: bytes,
    raw_vif: bytes,
) -> MbusRecord:
    try:
        info, first_combinable = _lookup_vif(vif, vifes, plain_unit)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(str(exc), raw_dif + raw_vif + payload) from None
    exp = info.exp
    factor = info.factor
    if info.kind != _MANUFACTURER:
        # Combinable VIFEs: corrections apply; after FF the rest is manufacturer specific.
        for vife in vifes[first_combinable:]:
            c = vife & 0x7F
            if c == 0x7F:
                break
            if 0x70 <= c <= 0x77:
                exp += (c & 0x07) - 6
            elif c == 0x7D:
                exp += 3
    value: int | float | str
    quantity = info.quantity
    unit = info.unit
    if code in (0x00, 0x08):
        value = ""
    elif lvar >= 0:
        decoded = _decode_lvar(payload, lvar, msb_first)
        value = _scale(decoded, exp, factor) if isinstance(decoded, int) and lvar > 0xBF else decoded
    else:
        body = payload[::-1] if msb_first else payload
        if info.kind in (_DATE, _DATETIME) and code in (0x02, 0x03, 0x04, 0x06):
            value, quantity = _decode_time_point(body, code, quantity)
        elif code == 0x05:
            value = _scale(struct.unpack("<f", body)[0], exp, factor)
        elif code >= 0x09:
            bcd = decode_bcd(body)
            value = bcd if isinstance(bcd, str) else _scale(bcd, exp, factor)
        else:
            raw = _int_le(body, signed=info.kind != _BITS)
            value = _scale(raw, exp, factor)
    invalid = _implausible(quantity, unit, value)
    if invalid:
        value = ""
    return MbusRecord(
        index=index,
        value=value,
        unit=unit,
        quantity=quantity,
        storage=storage,
        tariff=tariff,
        subunit=subunit,
        function=FUNCTIONS[(dif >> 4) & 0x03],
        raw_dif=raw_dif.hex().upper(),
        raw_vif=raw_vif.hex().upper(),
        raw_data=payload.hex().upper(),
        invalid=invalid,
    )


# ---------------------------------------------------------------------------------------------------
# Telegram decoding


def decode_records(data: bytes, msb_first: bool = False) -> tuple[list[MbusRecord], bool]:
    """Decode a sequence of variable data records; returns ``(records, more_records_follow)``."""
    return _decode_records(bytes(data), 0, msb_first)


def _decode_fixed(ci: int, data: bytes, address: int) -> MbusTelegram:
    if len(data) != 16:
        raise RemoteProtocolError(f"fixed data structure must have 16 bytes, not {len(data)}", data)
    msb = ci == CI_FIXED_MSB

    def field4(chunk: bytes) -> bytes:
        return chunk[::-1] if msb else chunk

    ident = _bcd_digits(field4(data[0:4]))
    access, status = data[4], data[5]
    mu0, mu1 = data[6], data[7]
    medium = ((mu0 & 0xC0) >> 6) | ((mu1 & 0xC0) >> 4)
    unit1, unit2 = mu0 & 0x3F, mu1 & 0x3F
    binary = bool(status & 0x80)
    stored = 1 if status & 0x40 else 0
    records = []
    for idx, (code, chunk) in enumerate(((unit1, data[8:12]), (unit2, data[12:16]))):
        unit_code, storage = code, stored
        if code == _FIXED_SAME_BUT_HISTORIC and idx == 1:
            unit_code, storage = unit1, 1
        counter = field4(chunk)
        raw: int | str = _int_le(counter, signed=False) if binary else decode_bcd(counter)
        quantity, unit, exp = _FIXED_UNITS.get(unit_code, ("reserved", "", 0))
        value = raw if isinstance(raw, str) else _scale(raw, exp, 1)
        invalid = _implausible(quantity, unit, value)
        records.append(
            MbusRecord(
                index=idx,
                value="" if invalid else value,
                unit=unit,
                quantity=quantity,
                storage=storage,
                raw_data=chunk.hex().upper(),
                invalid=invalid,
            )
        )
    return MbusTelegram(
        ci=ci,
        address=address,
        id=ident,
        medium=medium,
        medium_name=FIXED_MEDIUM_NAMES.get(medium, "reserved"),
        access_number=access,
        status=status,
        records=records,
    )


def decode_user_data(ci: int, data: bytes, address: int = 0) -> MbusTelegram:
    """Decode the application layer of a slave reply (CI field and the bytes after it).

    Raises NegativeResponse for CI 70 and RemoteProtocolError for anything malformed or unsupported.
    """
    data = bytes(data)
    if ci == CI_ERROR:
        code = data[0] if data else 0
        raise NegativeResponse(code, APPLICATION_ERRORS.get(code, f"unknown application error {code:02X}"))
    if ci in (CI_VARIABLE, CI_VARIABLE_MSB):
        if len(data) < 12:
            raise RemoteProtocolError(f"variable data header too short: {len(data)} of 12 bytes", data)
        msb = ci == CI_VARIABLE_MSB

        def hdr(chunk: bytes) -> bytes:
            return chunk[::-1] if msb else chunk

        man = _int_le(hdr(data[4:6]), signed=False)
        medium = data[7]
        records, more = _decode_records(data, 12, msb)
        return MbusTelegram(
            ci=ci,
            address=address,
            id=_bcd_digits(hdr(data[0:4])),
            manufacturer=decode_manufacturer(man),
            version=data[6],
            medium=medium,
            medium_name=medium_name(medium),
            access_number=data[8],
            status=data[9],
            signature=_int_le(hdr(data[10:12]), signed=False),
            records=records,
            more_records_follow=more,
        )
    if ci == CI_VARIABLE_SHORT:
        if len(data) < 4:
            raise RemoteProtocolError(f"short header too short: {len(data)} of 4 bytes", data)
        records, more = _decode_records(data, 4, False)
        return MbusTelegram(
            ci=ci,
            address=address,
            access_number=data[0],
            status=data[1],
            signature=_int_le(data[2:4], signed=False),
            records=records,
            more_records_follow=more,
        )
    if ci == CI_VARIABLE_NO_HEADER:
        records, more = _decode_records(data, 0, False)
        return MbusTelegram(ci=ci, address=address, records=records, more_records_follow=more)
    if ci in (CI_FIXED, CI_FIXED_MSB):
        return _decode_fixed(ci, data, address)
    if ci == CI_ALARM:
        value = _int_le(data, signed=False) if data else 0
        rec = MbusRecord(index=0, value=value, unit="", quantity="alarm_status", raw_data=data.hex().upper())
        return MbusTelegram(ci=ci, address=address, records=[rec])
    raise RemoteProtocolError(f"unsupported CI field {ci:02X} in slave reply", data)


def decode_telegram(frame: MbusFrame) -> MbusTelegram:
    """Decode the user data of an RSP_UD frame (see :func:`decode_user_data`)."""
    if frame.ci is None or not frame.is_rsp_ud:
        raise RemoteProtocolError(
            f"not an RSP_UD frame (C={frame.control:02X})", frame.encode() if frame.ci else b""
        )
    return decode_user_data(frame.ci, frame.data, frame.address)


# ---------------------------------------------------------------------------------------------------
# Encoders (slave simulator, tests, master SND_UD data)


class DataField:
    """DIF data field codes (bits 3-0)."""

    NONE = 0x0
    INT8 = 0x1
    INT16 = 0x2
    INT24 = 0x3
    INT32 = 0x4
    REAL32 = 0x5
    INT48 = 0x6
    INT64 = 0x7
    SELECTION = 0x8
    BCD2 = 0x9
    BCD4 = 0xA
    BCD6 = 0xB
    BCD8 = 0xC
    VARIABLE = 0xD
    BCD12 = 0xE


_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2}))?)?$")


def _encode_date(value: str, size: int) -> bytes:
    m = _ISO_DATE.match(value)
    if m is None:
        raise LocalProtocolError(f"not an ISO date: {value!r}")
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    hour, minute, second = int(m[4] or 0), int(m[5] or 0), int(m[6] or 0)
    if not 2000 <= year <= 2080 and not 1981 <= year <= 1999:
        raise LocalProtocolError(f"year {year} cannot be encoded without century bits")
    yy = year % 100
    dm = bytes([day | ((yy & 0x07) << 5), month | ((yy & 0x78) << 1)])
    if size == 2:
        return dm
    if size == 4:
        return bytes([minute, hour]) + dm
    if size == 6:
        return bytes([second, minute, hour]) + dm + b"\x00"
    raise LocalProtocolError(f"no date type with {size} bytes")


def _encode_bcd(value: int | str, size: int) -> bytes:
    digits_n = 2 * size
    if isinstance(value, str):
        digits = value.upper()
    elif value < 0:
        digits = "F" + f"{-value:0{digits_n - 1}d}"
    else:
        digits = f"{value:0{digits_n}d}"
    if len(digits) != digits_n:
        raise LocalProtocolError(f"{value!r} does not fit {digits_n} BCD digits")
    try:
        return bytes.fromhex(digits)[::-1]
    except ValueError:
        raise LocalProtocolError(f"{value!r} is not BCD") from None


def encode_data(value: int | float | str | bytes | None, data_field: int, date_kind: bool = False) -> bytes:
    """Encode a raw (unscaled) value for a DIF data field, LSB first.

    ``date_kind``: the VIF names a date/time, so an ISO string becomes type G/F/I by field size.
    """
    code = data_field & 0x0F
    if code in (DataField.NONE, DataField.SELECTION):
        return b""
    if code == DataField.VARIABLE:
        if isinstance(value, str):
            raw = value.encode("latin-1")
            if len(raw) > 0xBF:
                raise LocalProtocolError("LVAR string longer than 191 bytes")
            return bytes([len(raw)]) + raw[::-1]
        if isinstance(value, bytes):
            if len(value) > 15:
                raise LocalProtocolError("binary LVAR longer than 15 bytes")
            return bytes([0xE0 + len(value)]) + value
        raise LocalProtocolError(f"LVAR needs str or bytes, not {type(value).__name__}")
    size = _DATA_SIZES[code]
    if date_kind and isinstance(value, str) and code in (DataField.INT16, DataField.INT32, DataField.INT48):
        return _encode_date(value, size)
    if code == DataField.REAL32:
        if not isinstance(value, int | float):
            raise LocalProtocolError("REAL32 needs a number")
        return struct.pack("<f", float(value))
    if code >= DataField.BCD2:
        if not isinstance(value, int | str):
            raise LocalProtocolError("BCD needs an int or a digit string")
        return _encode_bcd(value, size)
    if not isinstance(value, int):
        raise LocalProtocolError(f"integer data field needs an int, not {type(value).__name__}")
    try:
        return value.to_bytes(size, "little", signed=value < 0)
    except OverflowError:
        raise LocalProtocolError(f"{value} does not fit {size} bytes") from None


_FUNCTION_CODES = {name: i for i, name in enumerate(FUNCTIONS)}


def encode_record(
    value: int | float | str | bytes | None,
    *,
    vif: int | bytes,
    data_field: int,
    storage: int = 0,
    tariff: int = 0,
    subunit: int = 0,
    function: str = "instantaneous",
) -> bytes:
    """Encode one data record: DIF [DIFE...] VIF [VIFE...] data. ``value`` is raw (unscaled).

    ``vif`` is one VIF byte, or the VIF with its VIFEs (and plain-text unit) as bytes. Dates are ISO
    strings when the VIF is 6C/6D (or FD 30/70).
    """
    if function not in _FUNCTION_CODES:
        raise LocalProtocolError(f"unknown function {function!r}")
    if storage < 0 or tariff < 0 or subunit < 0:
        raise LocalProtocolError("storage, tariff and subunit must not be negative")
    vib = bytes([vif]) if isinstance(vif, int) else bytes(vif)
    if not vib:
        raise LocalProtocolError("empty VIF")
    dif = (data_field & 0x0F) | (_FUNCTION_CODES[function] << 4) | ((storage & 1) << 6)
    difes = bytearray()
    st, ta, su = storage >> 1, tariff, subunit
    while st or ta or su:
        difes.append((st & 0x0F) | ((ta & 0x03) << 4) | ((su & 0x01) << 6))
        st, ta, su = st >> 4, ta >> 2, su >> 1
    if len(difes) > MAX_DIFE:
        raise LocalProtocolError("storage/tariff/subunit need more than 10 DIFEs")
    if difes:
        dif |= 0x80
        for i in range(len(difes) - 1):
            difes[i] |= 0x80
    date_kind = vib[0] in (0x6C, 0x6D, 0xEC, 0xED) or (
        vib[0] == 0xFD and len(vib) > 1 and vib[1] & 0x7F in (0x30, 0x70)
    )
    return bytes([dif]) + bytes(difes) + vib + encode_data(value, data_field, date_kind)


def encode_manufacturer_data(data: bytes, more_records_follow: bool = False) -> bytes:
    """Manufacturer-specific block to the end of the telegram: DIF 0F (or 1F: more telegrams follow)."""
    return bytes([0x1F if more_records_follow else 0x0F]) + bytes(data)


def encode_variable_header(
    ident: str,
    *,
    manufacturer: str,
    version: int,
    medium: int,
    access_number: int,
    status: int = 0,
    signature: int = 0,
) -> bytes:
    """The 12-byte CI 72 header: ID (BCD, LSB first), manufacturer, version, medium, ACC, STS, SIG."""
    if len(ident) != 8:
        raise LocalProtocolError(f"identification must have 8 digits, not {ident!r}")
    for name, val in (
        ("version", version),
        ("medium", medium),
        ("access_number", access_number),
        ("status", status),
    ):
        if not 0 <= val <= 0xFF:
            raise LocalProtocolError(f"{name} out of range: {val}")
    if not 0 <= signature <= 0xFFFF:
        raise LocalProtocolError(f"signature out of range: {signature}")
    try:
        id_bytes = bytes.fromhex(ident)[::-1]
    except ValueError:
        raise LocalProtocolError(f"identification must be digits, not {ident!r}") from None
    man = encode_manufacturer(manufacturer)
    return (
        id_bytes
        + man.to_bytes(2, "little")
        + bytes([version, medium, access_number, status])
        + signature.to_bytes(2, "little")
    )
