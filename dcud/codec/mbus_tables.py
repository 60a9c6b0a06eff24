"""The code tables of the M-Bus application layer (EN 13757-3), sans-I/O: what the numbers mean.

CI fields, medium and application-error names, the DIF function names, the primary VIF table and the
extension tables behind VIF FD and FB (quantity, unit, decimal exponent, time factor, and whether the value
is a number, a date, a bit field or manufacturer data), their lookup (:func:`_lookup_vif`), the units of
the legacy fixed data structure (CI 73/77), and the physical bounds a decoded value must respect
(:data:`PHYSICAL_RANGES`). Data only, plus the lookups: the record decoder (:mod:`dcud.codec.mbus_records`)
reads it, and a new VIF is one line here, without touching the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dcud.errors import RemoteProtocolError

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


__all__ = [
    "APPLICATION_ERRORS",
    "CI_ALARM",
    "CI_ERROR",
    "CI_FIXED",
    "CI_FIXED_MSB",
    "CI_VARIABLE",
    "CI_VARIABLE_MSB",
    "CI_VARIABLE_NO_HEADER",
    "CI_VARIABLE_SHORT",
    "FIXED_MEDIUM_NAMES",
    "FUNCTIONS",
    "MAX_DIFE",
    "MAX_VIFE",
    "MEDIUM_NAMES",
    "PHYSICAL_RANGES",
    "medium_name",
]
