"""Local time for schedules and file names; timestamps on the wire stay UTC.

Which zone is in force (first match wins):

1. ``timezone = "Europe/Budapest"`` in dcud.toml: an IANA zone (tzdata), the modern alternative: it
   knows every past and future rule change, so the WM-E calendar parameters are then ignored.
2. The WM-E calendar: standard offset ``calendar_timezone`` (minutes east of UTC, default 60), or
   ``ntp_timezone`` (``+1:00`` form) when only that one is set in the file; summer time when
   ``calendar_dst_enabled=1``, from ``calendar_dst_begin`` to ``calendar_dst_end``, adding
   ``calendar_dst_deviation`` minutes. The hex date format is documented in :mod:`dcud.config.tzrules`.

Everything that prints a local time (file names, schedule logs) goes through :class:`LocalClock`;
MQTT payloads, SNMP varbinds and outbox stamps use UTC (RFC 3339 with ``Z``).
"""

from __future__ import annotations

import datetime as dt
import time
import zoneinfo
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dcud.config.tzrules import UTC, WmeZone, decode_dst_point, next_daily
from dcud.config.wme import HexDate, ParameterSet
from dcud.errors import ConfigIssue

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig


@dataclass(frozen=True)
class TimeSettings:
    """What decides local time (a slice any service can carry; comparable for reloads)."""

    iana: str | None
    std_offset_s: int
    dst_enabled: bool
    dst_delta_s: int
    dst_begin: str
    dst_end: str

    @classmethod
    def from_params(cls, params: ParameterSet, iana: str = "") -> TimeSettings:
        """From the WM-E parameters and the dcud.toml ``timezone``."""
        if params.is_set("ntp_timezone") and not params.is_set("calendar_timezone"):
            std = params.get_int("ntp_timezone")
        else:
            std = params.get_int("calendar_timezone")
        begin = params.get("calendar_dst_begin")
        end = params.get("calendar_dst_end")
        return cls(
            iana=iana or None,
            std_offset_s=std,
            dst_enabled=params.get_bool("calendar_dst_enabled"),
            dst_delta_s=params.get_int("calendar_dst_deviation"),
            dst_begin=begin.raw if isinstance(begin, HexDate) else "",
            dst_end=end.raw if isinstance(end, HexDate) else "",
        )

    @classmethod
    def from_config(cls, config: LoadedConfig) -> TimeSettings:
        """From a loaded configuration."""
        return cls.from_params(config.params, config.toml.timezone)

    def zone(self) -> dt.tzinfo:
        """The tzinfo in force (module doc)."""
        if self.iana:
            return zoneinfo.ZoneInfo(self.iana)
        if self.dst_enabled and self.dst_delta_s and self.dst_begin and self.dst_end:
            return WmeZone(
                self.std_offset_s,
                self.dst_delta_s,
                decode_dst_point(self.dst_begin),
                decode_dst_point(self.dst_end),
            )
        return WmeZone(self.std_offset_s)

    def describe(self) -> str:
        """One line for logs and status: which source decides local time."""
        if self.iana:
            return f"IANA {self.iana}"
        hours = self.std_offset_s / 3600
        if self.dst_enabled and self.dst_delta_s:
            dst = f"DST +{self.dst_delta_s // 60} min {self.dst_begin}..{self.dst_end}"
            return f"WM-E calendar UTC{hours:+g} h, {dst}"
        return f"WM-E calendar UTC{hours:+g} h, no DST"


def check_time_params(params: ParameterSet) -> list[ConfigIssue]:
    """Configuration issues of the calendar parameters (undecodable DST dates while DST is on)."""
    issues: list[ConfigIssue] = []
    if not params.get_bool("calendar_dst_enabled"):
        return issues
    for name in ("calendar_dst_begin", "calendar_dst_end"):
        value = params.get(name)
        if not isinstance(value, HexDate):
            continue
        try:
            decode_dst_point(value.raw)
        except ValueError as exc:
            issues.append(ConfigIssue(params.path, params.lines.get(name, 0), name, f"DST date: {exc}"))
    return issues


class LocalClock:
    """Local time according to :class:`TimeSettings`; "now" comes from ``time.time()``."""

    def __init__(self, settings: TimeSettings) -> None:
        self.settings = settings
        self.zone = settings.zone()

    def local(self, unix_s: float | None = None) -> dt.datetime:
        """An instant (default now) as an aware local datetime."""
        stamp = time.time() if unix_s is None else unix_s
        return dt.datetime.fromtimestamp(stamp, tz=UTC).astimezone(self.zone)

    def file_stamp(self, unix_s: float | None = None, fmt: str = "%Y%m%d_%H%M%S") -> str:
        """Local time formatted for a file name (``WM115_20261121_150000.csv``)."""
        return self.local(unix_s).strftime(fmt)

    def next_daily_s(self, at: dt.time, now_s: float | None = None, after_s: float | None = None) -> float:
        """Unix time of the next local ``at`` strictly after ``after_s`` (default now)."""
        now = dt.datetime.fromtimestamp(time.time() if now_s is None else now_s, tz=UTC)
        after = dt.datetime.fromtimestamp(after_s, tz=UTC) if after_s is not None else None
        return next_daily(now, at, self.zone, after).timestamp()
