"""The COSEM date, time and date-time (Blue Book 4.1.6.1), sans-I/O: 5, 4 and 12 bytes to values and back.

The 12-byte COSEM date-time is :class:`CosemDateTime`: fields the meter leaves open are kept as sent
(``0xFF``, year ``0xFFFF``, deviation ``0x8000`` = :data:`NOT_SPECIFIED`...), so a value round-trips
exactly; :meth:`CosemDateTime.to_datetime` turns a complete one into a ``datetime``. Kept apart from the
A-XDR data types (:mod:`.axdr`, whose ``date-time``, ``date`` and ``time`` carry these values) because
the calendar rules (open fields, deviation sign, clock status) are a subject of their own, used by the
clock and profile code of :mod:`.cosem` and by the services, not only by the data codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import ClassVar

from dcud.errors import LocalProtocolError, RemoteProtocolError

NOT_SPECIFIED = 0xFF
"""A date-time byte field the meter leaves open (month, day, weekday, hour, minute, second, hundredths)."""
YEAR_NOT_SPECIFIED = 0xFFFF
DEVIATION_NOT_SPECIFIED = 0x8000
"""Deviation from UTC unknown: the date-time is local time with no offset."""
CLOCK_STATUS_NOT_SPECIFIED = 0xFF
MONTH_DST_END = 0xFD
MONTH_DST_BEGIN = 0xFE
DAY_SECOND_LAST = 0xFD
DAY_LAST = 0xFE

CLOCK_STATUS_INVALID = 0x01
CLOCK_STATUS_DOUBTFUL = 0x02
CLOCK_STATUS_DIFFERENT_BASE = 0x04
CLOCK_STATUS_INVALID_STATUS = 0x08
CLOCK_STATUS_DST = 0x80


def _byte_field(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"date-time {name} {value} is not a byte")


@dataclass(frozen=True, slots=True)
class CosemDate:
    """The 5-byte COSEM date: year (0xFFFF open), month, day, weekday (1 = Monday; 0xFF open)."""

    year: int = YEAR_NOT_SPECIFIED
    month: int = NOT_SPECIFIED
    day: int = NOT_SPECIFIED
    weekday: int = NOT_SPECIFIED

    SIZE: ClassVar[int] = 5

    def __post_init__(self) -> None:
        if not 0 <= self.year <= 0xFFFF:
            raise LocalProtocolError(f"date year {self.year} out of range")
        for name in ("month", "day", "weekday"):
            _byte_field(name, getattr(self, name))

    def to_bytes(self) -> bytes:
        """The five bytes."""
        return self.year.to_bytes(2, "big") + bytes([self.month, self.day, self.weekday])

    @classmethod
    def from_bytes(cls, data: bytes) -> CosemDate:
        """From five bytes (the caller checked the size)."""
        return cls(int.from_bytes(data[0:2], "big"), data[2], data[3], data[4])


@dataclass(frozen=True, slots=True)
class CosemTime:
    """The 4-byte COSEM time: hour, minute, second, hundredths (0xFF open)."""

    hour: int = NOT_SPECIFIED
    minute: int = NOT_SPECIFIED
    second: int = NOT_SPECIFIED
    hundredths: int = NOT_SPECIFIED

    SIZE: ClassVar[int] = 4

    def __post_init__(self) -> None:
        for name in ("hour", "minute", "second", "hundredths"):
            _byte_field(name, getattr(self, name))

    def to_bytes(self) -> bytes:
        """The four bytes."""
        return bytes([self.hour, self.minute, self.second, self.hundredths])

    @classmethod
    def from_bytes(cls, data: bytes) -> CosemTime:
        """From four bytes (the caller checked the size)."""
        return cls(data[0], data[1], data[2], data[3])


@dataclass(frozen=True, slots=True)
class CosemDateTime:
    """The 12-byte COSEM date-time.

    ``deviation`` is in minutes with the COSEM sign: local time = UTC - deviation, so Central European
    Time (UTC+01:00) is -60 (``0xFFC4`` on the wire); ``0x8000`` means unknown. ``clock_status`` is the
    bit set of ``CLOCK_STATUS_*`` (0xFF: not specified).
    """

    date: CosemDate
    time: CosemTime
    deviation: int = DEVIATION_NOT_SPECIFIED
    clock_status: int = CLOCK_STATUS_NOT_SPECIFIED

    SIZE: ClassVar[int] = 12

    def __post_init__(self) -> None:
        # -0x8000 would go on the wire as 0x8000, which means 'not specified'.
        if self.deviation != DEVIATION_NOT_SPECIFIED and not -0x7FFF <= self.deviation <= 0x7FFF:
            raise LocalProtocolError(f"date-time deviation {self.deviation} out of range")
        _byte_field("clock status", self.clock_status)

    def to_bytes(self) -> bytes:
        """The twelve bytes."""
        deviation = self.deviation & 0xFFFF
        return (
            self.date.to_bytes()
            + self.time.to_bytes()
            + deviation.to_bytes(2, "big")
            + bytes([self.clock_status])
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> CosemDateTime:
        """From exactly twelve bytes."""
        if len(data) != cls.SIZE:
            raise RemoteProtocolError(f"a COSEM date-time has 12 bytes, not {len(data)}", data)
        raw_deviation = int.from_bytes(data[9:11], "big")
        deviation = raw_deviation if raw_deviation == DEVIATION_NOT_SPECIFIED else _signed16(raw_deviation)
        return cls(CosemDate.from_bytes(data[0:5]), CosemTime.from_bytes(data[5:9]), deviation, data[11])

    @property
    def deviation_specified(self) -> bool:
        """Whether the offset from UTC is known."""
        return self.deviation != DEVIATION_NOT_SPECIFIED

    def to_datetime(self) -> datetime:
        """A ``datetime``: aware (with the meter's offset) when the deviation is known, else naive.

        Raises RemoteProtocolError when a field it needs is open or out of range (values come from a meter).
        """
        d, t = self.date, self.time
        if YEAR_NOT_SPECIFIED in (d.year,) or NOT_SPECIFIED in (d.month, d.day, t.hour, t.minute):
            raise RemoteProtocolError(f"date-time {self} leaves a field open; it is not a point in time")
        second = 0 if t.second == NOT_SPECIFIED else t.second
        hundredths = 0 if t.hundredths == NOT_SPECIFIED else t.hundredths
        try:
            tz = None
            if self.deviation_specified:
                tz = timezone(timedelta(minutes=-self.deviation))
            return datetime(d.year, d.month, d.day, t.hour, t.minute, second, hundredths * 10_000, tzinfo=tz)
        except (ValueError, OverflowError) as exc:
            raise RemoteProtocolError(f"date-time {self} is not a valid time: {exc}") from None

    @classmethod
    def from_datetime(cls, value: datetime, clock_status: int = 0x00) -> CosemDateTime:
        """From a ``datetime``: an aware one carries its offset as deviation, a naive one none."""
        deviation = DEVIATION_NOT_SPECIFIED
        offset = value.utcoffset()
        if offset is not None:
            deviation = -round(offset.total_seconds() / 60)
        if not 0 <= value.year <= 0xFFFE:
            raise LocalProtocolError(f"year {value.year} cannot be sent")
        return cls(
            CosemDate(value.year, value.month, value.day, value.isoweekday()),
            CosemTime(value.hour, value.minute, value.second, value.microsecond // 10_000),
            deviation,
            clock_status,
        )

    def __str__(self) -> str:
        d, t = self.date, self.time

        def part(v: int, width: int, open_value: int = NOT_SPECIFIED) -> str:
            return "*" * width if v == open_value else f"{v:0{width}d}"

        text = (
            f"{part(d.year, 4, YEAR_NOT_SPECIFIED)}-{part(d.month, 2)}-{part(d.day, 2)}"
            f"T{part(t.hour, 2)}:{part(t.minute, 2)}:{part(t.second, 2)}.{part(t.hundredths, 2)}"
        )
        if self.deviation_specified:
            text += f" dev={self.deviation}"
        if self.clock_status != CLOCK_STATUS_NOT_SPECIFIED:
            text += f" status=0x{self.clock_status:02X}"
        return text


def _signed16(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


def utc_datetime(value: datetime) -> datetime:
    """``value`` in UTC (a naive value is taken as UTC already)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


__all__ = [
    "CLOCK_STATUS_DIFFERENT_BASE",
    "CLOCK_STATUS_DOUBTFUL",
    "CLOCK_STATUS_DST",
    "CLOCK_STATUS_INVALID",
    "CLOCK_STATUS_INVALID_STATUS",
    "CLOCK_STATUS_NOT_SPECIFIED",
    "DAY_LAST",
    "DAY_SECOND_LAST",
    "DEVIATION_NOT_SPECIFIED",
    "MONTH_DST_BEGIN",
    "MONTH_DST_END",
    "NOT_SPECIFIED",
    "YEAR_NOT_SPECIFIED",
    "CosemDate",
    "CosemDateTime",
    "CosemTime",
    "utc_datetime",
]
