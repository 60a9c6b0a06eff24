"""Pure date math for the WM-E calendar: DST rules from ``calendar_dst_begin``/``_end`` and a tzinfo.

No I/O and no clock here: everything takes its instants as arguments (``dcud.config.timekeeping``
does the I/O: IANA zones, "now").

How the hexadecimal DST dates are read
    The seed (WM-E8S parameter description) says only "in hexadecimal format": 16 hex digits, 8 octets,
    without a layout. dcud reads them as the first 8 octets of a DLMS/COSEM ``date-time``, the format of
    the ``daylight_savings_begin``/``_end`` attributes of the COSEM Clock object (IEC 62056-6-2), which is
    where a meter-side device takes this from::

        octet   0-1        2       3              4             5      6       7
                year       month   day of month   day of week   hour   minute  second
                FFFF=any   1..12   1..31,         1..7 = Mon..  0..23  0..59   0..59, FF = 0
                                   FE = last,     Sun, FF = any
                                   FD = 2nd last

    - With a day of week, the day is that weekday **on or after** the day of month (``03 19 07`` = the
      first Sunday on or after 25 March); with day ``FE`` it is the **last** such weekday of the month,
      with ``FD`` the second last.
    - The time is the local wall-clock time *before* the switch: standard time for the begin, summer
      time for the end (EU: begin ``FFFF03FE07020000`` = last Sunday of March 02:00 CET, end
      ``FFFF0AFE07030000`` = last Sunday of October 03:00 CEST).
    - A year other than ``FFFF`` limits the rule to that year (no DST in other years).
    - The WM-E factory defaults ``FFFFF07D3000003C`` and ``FFFFF07D30000078`` do not decode in this
      layout (month ``F0``; the text is garbled in the seed). dcud reads exactly these two values as
      **the EU rule** (the two lines above), the WM-E's home market; any other undecodable value is a
      configuration error.

    The summer-time offset is ``calendar_timezone + calendar_dst_deviation`` (minutes east of UTC).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

SEED_DEFAULT_BEGIN: Final = "FFFFF07D3000003C"
SEED_DEFAULT_END: Final = "FFFFF07D30000078"
EU_BEGIN_HEX: Final = "FFFF03FE07020000"
EU_END_HEX: Final = "FFFF0AFE07030000"

LAST_DAY: Final = 0xFE
SECOND_LAST_DAY: Final = 0xFD
ANY: Final = 0xFF
ANY_YEAR: Final = 0xFFFF

UTC: Final = dt.UTC


@dataclass(frozen=True, slots=True)
class DstPoint:
    """A yearly switch instant in COSEM terms (see module doc)."""

    year: int
    month: int
    day: int
    weekday: int
    hour: int
    minute: int
    second: int

    def date_in(self, year: int) -> dt.date | None:
        """The date of this point in ``year`` (None when the rule is for another year)."""
        if self.year not in (ANY_YEAR, year):
            return None
        first_next = dt.date(year + (self.month == 12), self.month % 12 + 1, 1)
        last = (first_next - dt.timedelta(days=1)).day
        if self.day == LAST_DAY:
            day = last
        elif self.day == SECOND_LAST_DAY:
            day = last - 1
        else:
            day = min(self.day, last)
        base = dt.date(year, self.month, day)
        if self.weekday == ANY:
            return base
        if self.day in (LAST_DAY, SECOND_LAST_DAY):
            back = (base.isoweekday() - self.weekday) % 7
            found = base - dt.timedelta(days=back)
            return found - dt.timedelta(days=7) if self.day == SECOND_LAST_DAY else found
        return base + dt.timedelta(days=(self.weekday - base.isoweekday()) % 7)

    @property
    def wall_time(self) -> dt.time:
        """Local wall-clock time of the switch."""
        return dt.time(self.hour, self.minute, self.second)


def decode_dst_point(hex_text: str) -> DstPoint:
    """Decode 16 hex digits (module doc); ``ValueError`` naming the bad octet."""
    text = hex_text.strip().upper()
    if text == SEED_DEFAULT_BEGIN:
        text = EU_BEGIN_HEX
    elif text == SEED_DEFAULT_END:
        text = EU_END_HEX
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError("expected 16 hex digits") from None
    if len(raw) != 8:
        raise ValueError("expected 16 hex digits")
    year = int.from_bytes(raw[0:2], "big")
    month, day, weekday, hour, minute, second = raw[2:8]
    if year != ANY_YEAR and not 1970 <= year <= 2200:
        raise ValueError(f"year {year} (octets 0-1) is neither FFFF nor 1970..2200")
    if not 1 <= month <= 12:
        raise ValueError(f"month {month:02X} (octet 2) is not 01..0C")
    if not (1 <= day <= 31 or day in (LAST_DAY, SECOND_LAST_DAY)):
        raise ValueError(f"day {day:02X} (octet 3) is not 01..1F, FE or FD")
    if not (1 <= weekday <= 7 or weekday == ANY):
        raise ValueError(f"day of week {weekday:02X} (octet 4) is not 01..07 or FF")
    if hour > 23:
        raise ValueError(f"hour {hour:02X} (octet 5) is not 00..17")
    if minute > 59:
        raise ValueError(f"minute {minute:02X} (octet 6) is not 00..3B")
    if second == ANY:
        second = 0
    elif second > 59:
        raise ValueError(f"second {second:02X} (octet 7) is not 00..3B or FF")
    return DstPoint(year, month, day, weekday, hour, minute, second)


class WmeZone(dt.tzinfo):
    """A fixed standard offset plus an optional yearly DST rule: the WM-E ``calendar_*`` parameters.

    Implements PEP 495: an ambiguous wall time (the repeated hour at the end of DST) maps to summer
    time with ``fold=0`` and to standard time with ``fold=1``; a wall time in the spring gap is read
    with the offset before the switch, so it lands after the gap.
    """

    def __init__(
        self,
        std_offset_s: int,
        dst_delta_s: int = 0,
        begin: DstPoint | None = None,
        end: DstPoint | None = None,
    ) -> None:
        self.std = dt.timedelta(seconds=std_offset_s)
        self.delta = dt.timedelta(seconds=dst_delta_s)
        self.begin = begin
        self.end = end

    @property
    def has_dst(self) -> bool:
        """Whether a DST rule is in force."""
        return self.begin is not None and self.end is not None and bool(self.delta)

    def __repr__(self) -> str:
        return f"WmeZone(std={self.std}, delta={self.delta}, begin={self.begin}, end={self.end})"

    def _switches_utc(self, year: int) -> tuple[dt.datetime, dt.datetime] | None:
        """DST begin and end of ``year`` as naive UTC datetimes."""
        if not self.has_dst:
            return None
        assert self.begin is not None and self.end is not None
        begin_date = self.begin.date_in(year)
        end_date = self.end.date_in(year)
        if begin_date is None or end_date is None:
            return None
        begin = dt.datetime.combine(begin_date, self.begin.wall_time) - self.std
        end = dt.datetime.combine(end_date, self.end.wall_time) - self.std - self.delta
        return begin, end

    def is_dst_utc(self, utc_naive: dt.datetime) -> bool:
        """Whether summer time is in force at a UTC instant (naive UTC datetime)."""
        switches = self._switches_utc(utc_naive.year)
        if switches is None:
            return False
        begin, end = switches
        if begin < end:
            return begin <= utc_naive < end
        return utc_naive >= begin or utc_naive < end  # southern hemisphere: DST spans the new year

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        """Offset for a local wall time (``fold`` chooses in the repeated hour)."""
        if when is None or not self.has_dst:
            return self.std
        wall = when.replace(tzinfo=None)
        as_dst = self.is_dst_utc(wall - self.std - self.delta)
        as_std = not self.is_dst_utc(wall - self.std)
        if as_dst and as_std:  # repeated hour
            return self.std if when.fold else self.std + self.delta
        if as_dst:
            return self.std + self.delta
        if as_std:
            return self.std
        return self.std + self.delta if when.fold else self.std  # gap: PEP 495

    def dst(self, when: dt.datetime | None) -> dt.timedelta:
        """The DST part of :meth:`utcoffset`."""
        return self.utcoffset(when) - self.std

    def tzname(self, when: dt.datetime | None) -> str:
        """``UTC+01:00``-style name of the offset in force."""
        offset = self.utcoffset(when)
        total = int(offset.total_seconds())
        sign = "+" if total >= 0 else "-"
        hours, rest = divmod(abs(total), 3600)
        return f"UTC{sign}{hours:02d}:{rest // 60:02d}"

    def fromutc(self, when: dt.datetime) -> dt.datetime:
        """UTC (tzinfo=self, as datetime passes it) -> local wall time, with ``fold`` set."""
        utc_naive = when.replace(tzinfo=None)
        if self.has_dst and self.is_dst_utc(utc_naive):
            return (utc_naive + self.std + self.delta).replace(tzinfo=self, fold=0)
        local = (utc_naive + self.std).replace(tzinfo=self)
        # In the repeated hour the standard-time reading is the second occurrence.
        if self.has_dst and self.is_dst_utc(utc_naive - self.delta):
            local = local.replace(fold=1)
        return local


def next_daily(
    now_utc: dt.datetime, at: dt.time, zone: dt.tzinfo, after: dt.datetime | None = None
) -> dt.datetime:
    """The first instant strictly after ``after`` (default ``now_utc``) whose local time is ``at``.

    In the spring gap the time does not exist: the instant right after the gap is used (PEP 495 fold=0
    semantics). In the repeated autumn hour the first occurrence is used. Returns an aware UTC datetime.
    """
    floor = after or now_utc
    local_today = now_utc.astimezone(zone).date()
    for days in range(-1, 4):
        day = local_today + dt.timedelta(days=days)
        candidate = dt.datetime.combine(day, at, tzinfo=zone).astimezone(UTC)
        if candidate > floor:
            return candidate
    raise AssertionError("unreachable: a daily time occurs within four days")
