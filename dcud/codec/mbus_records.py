"""M-Bus data records (EN 13757-3), sans-I/O: the decoded record and telegram, and the record decoder.

:class:`MbusRecord` and :class:`MbusTelegram` are what a readout publishes. :func:`decode_records` walks
a sequence of variable data records (DIF, DIFE chain, VIF with plain-text unit and VIFE chain, data of
fixed size or LVAR), scales each value by its VIF (:mod:`dcud.codec.mbus_tables`) and applies the VIFE
corrections; the primitive decoders (BCD, date types G, F, I, J) are here too. Separate from the telegram
decoder (:mod:`dcud.codec.mbus_app`, the CI field and its header) because the record walk is shared
by every variable-data CI (long, short or no header) and is where a hostile telegram does its work.
See :mod:`dcud.codec.mbus_app` for the value conventions (units, dates, invalid values).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from dcud.codec.mbus import encode_manufacturer
from dcud.codec.mbus_tables import (
    _BITS,
    _DATE,
    _DATETIME,
    _MANUFACTURER,
    FUNCTIONS,
    MAX_DIFE,
    MAX_VIFE,
    _implausible,
    _lookup_vif,
)
from dcud.errors import RemoteProtocolError

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


def decode_records(data: bytes, msb_first: bool = False) -> tuple[list[MbusRecord], bool]:
    """Decode a sequence of variable data records; returns ``(records, more_records_follow)``."""
    return _decode_records(bytes(data), 0, msb_first)


__all__ = [
    "MbusRecord",
    "MbusTelegram",
    "decode_bcd",
    "decode_date_g",
    "decode_datetime_f",
    "decode_datetime_i",
    "decode_records",
    "decode_time_j",
]
