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

The parts live in modules of their own and are re-exported here, so ``dcud.codec.mbus_app`` stays the one
import: the code tables (CI fields, VIF/VIFE, plausibility bounds) in :mod:`dcud.codec.mbus_tables`, the
record and telegram types and the record decoder in :mod:`dcud.codec.mbus_records`, the encoders in
:mod:`dcud.codec.mbus_encode`. This module decodes whole telegrams: the CI field and its header.
"""

from __future__ import annotations

from dcud.codec.mbus import MbusFrame, decode_manufacturer
from dcud.codec.mbus_encode import (
    DataField,
    encode_data,
    encode_manufacturer_data,
    encode_record,
    encode_variable_header,
)
from dcud.codec.mbus_records import (
    MbusRecord,
    MbusTelegram,
    _bcd_digits,
    _decode_records,
    _int_le,
    _scale,
    decode_bcd,
    decode_date_g,
    decode_datetime_f,
    decode_datetime_i,
    decode_records,
    decode_time_j,
)
from dcud.codec.mbus_tables import (
    _FIXED_SAME_BUT_HISTORIC,
    _FIXED_UNITS,
    APPLICATION_ERRORS,
    CI_ALARM,
    CI_ERROR,
    CI_FIXED,
    CI_FIXED_MSB,
    CI_VARIABLE,
    CI_VARIABLE_MSB,
    CI_VARIABLE_NO_HEADER,
    CI_VARIABLE_SHORT,
    FIXED_MEDIUM_NAMES,
    FUNCTIONS,
    MAX_DIFE,
    MAX_VIFE,
    MEDIUM_NAMES,
    PHYSICAL_RANGES,
    _implausible,
    medium_name,
)
from dcud.errors import NegativeResponse, RemoteProtocolError

# ---------------------------------------------------------------------------------------------------
# Telegram decoding


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
    "DataField",
    "MbusRecord",
    "MbusTelegram",
    "decode_bcd",
    "decode_date_g",
    "decode_datetime_f",
    "decode_datetime_i",
    "decode_records",
    "decode_telegram",
    "decode_time_j",
    "decode_user_data",
    "encode_data",
    "encode_manufacturer_data",
    "encode_record",
    "encode_variable_header",
    "medium_name",
]
