"""M-Bus application-layer encoders (EN 13757-3), sans-I/O: records and headers from raw values.

:func:`encode_record` builds DIF, DIFE chain, VIF (with VIFEs) and data from an unscaled value;
:func:`encode_data` the data field alone (integers, REAL32, BCD, LVAR, dates by field size);
:func:`encode_variable_header` the 12-byte CI 72 header; :func:`encode_manufacturer_data` the
manufacturer-specific tail. The decoder never needs them: they serve the slave simulator, the tests
and the master's SND_UD data, so they live apart from it.
"""

from __future__ import annotations

import re
import struct

from dcud.codec.mbus import encode_manufacturer
from dcud.codec.mbus_records import _DATA_SIZES
from dcud.codec.mbus_tables import FUNCTIONS, MAX_DIFE
from dcud.errors import LocalProtocolError

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


__all__ = [
    "DataField",
    "encode_data",
    "encode_manufacturer_data",
    "encode_record",
    "encode_variable_header",
]
