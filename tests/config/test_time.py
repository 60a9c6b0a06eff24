"""Time zone and DST: the WM-E hex DST dates, the calendar zone against tzdata, schedules, precedence."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.config import tzrules
from dcud.config.loader import load_config
from dcud.config.timekeeping import LocalClock, TimeSettings
from dcud.errors import ConfigError
from dcud.runtime.timefmt import rfc3339

from helpers.daemon import write_site

UTC = dt.UTC
EU = tzrules.WmeZone(
    3600, 3600, tzrules.decode_dst_point(tzrules.EU_BEGIN_HEX), tzrules.decode_dst_point(tzrules.EU_END_HEX)
)


def test_seed_defaults_read_as_the_eu_rule() -> None:
    assert tzrules.decode_dst_point(tzrules.SEED_DEFAULT_BEGIN) == tzrules.decode_dst_point(
        "FFFF03FE07020000"
    )
    assert tzrules.decode_dst_point(tzrules.SEED_DEFAULT_END) == tzrules.decode_dst_point("FFFF0AFE07030000")


@pytest.mark.parametrize(
    ("hex_text", "year", "expected"),
    [
        ("FFFF03FE07020000", 2026, dt.date(2026, 3, 29)),  # last Sunday of March
        ("FFFF0AFE07030000", 2026, dt.date(2026, 10, 25)),  # last Sunday of October
        ("FFFF03FE07020000", 2027, dt.date(2027, 3, 28)),
        ("FFFF031907020000", 2026, dt.date(2026, 3, 29)),  # first Sunday on or after 25 March
        ("FFFF030807020000", 2026, dt.date(2026, 3, 8)),  # US: second Sunday of March (on/after 8th)
        ("FFFF0B0107020000", 2026, dt.date(2026, 11, 1)),  # US: first Sunday of November
        ("FFFF0AFD07030000", 2026, dt.date(2026, 10, 18)),  # second-last Sunday
        ("FFFF02FEFF000000", 2028, dt.date(2028, 2, 29)),  # last day of February, leap year
        ("07EA0A1AFF0300FF", 2026, dt.date(2026, 10, 26)),  # a fixed date in 2026 only
        ("07EA0A1AFF0300FF", 2027, None),
    ],
)
def test_dst_point_dates(hex_text: str, year: int, expected: dt.date | None) -> None:
    assert tzrules.decode_dst_point(hex_text).date_in(year) == expected


@pytest.mark.parametrize(
    ("hex_text", "message"),
    [
        ("FFFF0DFE07020000", "month 0D"),
        ("FFFF03FC07020000", "day FC"),
        ("FFFF03FE08020000", "day of week 08"),
        ("FFFF03FE07180000", "hour 18"),
        ("FFFF03FE07023C00", "minute 3C"),
        ("FFFFF07D3000003D", "month F0"),  # not the seed default: an error
        ("12", "16 hex digits"),
    ],
)
def test_bad_dst_points_are_named(hex_text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tzrules.decode_dst_point(hex_text)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=int(dt.datetime(2000, 1, 1, tzinfo=UTC).timestamp()), max_value=2**32))
def test_eu_calendar_zone_agrees_with_tzdata(unix_s: int) -> None:
    instant = dt.datetime.fromtimestamp(unix_s, tz=UTC)
    ours = instant.astimezone(EU)
    theirs = instant.astimezone(zoneinfo.ZoneInfo("Europe/Budapest"))
    assert ours.replace(tzinfo=None) == theirs.replace(tzinfo=None)
    assert ours.fold == theirs.fold
    assert ours.utcoffset() == theirs.utcoffset()
    assert ours.astimezone(UTC) == instant  # round trip, also in the repeated hour


def test_southern_hemisphere_rule() -> None:
    # A zone at UTC+10 with DST from the first Sunday of October to the first Sunday of April.
    zone = tzrules.WmeZone(
        36000,
        3600,
        tzrules.decode_dst_point("FFFF0A0107020000"),
        tzrules.decode_dst_point("FFFF040107030000"),
    )
    sydney = zoneinfo.ZoneInfo("Australia/Sydney")
    for month in range(1, 13):
        instant = dt.datetime(2026, month, 15, 3, tzinfo=UTC)
        assert instant.astimezone(zone).utcoffset() == instant.astimezone(sydney).utcoffset(), month


def test_daily_time_in_the_spring_gap_and_the_autumn_fold() -> None:
    at = dt.time(2, 30)
    spring = tzrules.next_daily(dt.datetime(2026, 3, 28, 12, tzinfo=UTC), at, EU)
    assert spring == dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 02:30 does not exist: 03:30 CEST
    autumn = tzrules.next_daily(dt.datetime(2026, 10, 24, 12, tzinfo=UTC), at, EU)
    assert autumn == dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # first 02:30 (CEST)
    after = tzrules.next_daily(dt.datetime(2026, 10, 24, 12, tzinfo=UTC), at, EU, after=autumn)
    assert after == dt.datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # not the repeated 02:30 of the same day


def test_settings_precedence(tmp_path: Path) -> None:
    def settings_of(wme: str, toml: str = "") -> TimeSettings:
        return TimeSettings.from_config(
            load_config(write_site(tmp_path / str(abs(hash(wme + toml))), wme=wme, toml_extra=toml))
        )

    default = settings_of("")
    assert (default.iana, default.std_offset_s, default.dst_enabled, default.dst_delta_s) == (
        None,
        3600,
        True,
        3600,
    )
    assert default.zone().utcoffset(dt.datetime(2026, 7, 1)) == dt.timedelta(hours=2)
    assert settings_of("ntp_timezone=+2:00\n").std_offset_s == 7200  # only ntp_timezone set
    assert settings_of("ntp_timezone=+2:00\ncalendar_timezone=-300\n").std_offset_s == -18000
    iana = settings_of("calendar_timezone=-300\n", '\ntimezone = "America/New_York"\n')
    assert iana.iana == "America/New_York"
    assert isinstance(iana.zone(), zoneinfo.ZoneInfo)
    no_dst = settings_of("calendar_dst_enabled=0\ncalendar_timezone=330\n")
    assert no_dst.zone().utcoffset(dt.datetime(2026, 7, 1)) == dt.timedelta(minutes=330)
    assert "no DST" in no_dst.describe()


def test_undecodable_dst_date_is_a_config_error_with_file_and_line(tmp_path: Path) -> None:
    config = write_site(tmp_path / "site", wme="ntp_interval=600\ncalendar_dst_begin=FFFF0DFE07020000\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    text = str(info.value)
    assert "wme.conf:2: calendar_dst_begin: DST date: month 0D" in text
    # With DST off the value is not used, so it is not an error.
    write_site(tmp_path / "site", wme="calendar_dst_enabled=0\ncalendar_dst_begin=FFFF0DFE07020000\n")
    load_config(config)


def test_local_clock_for_file_names_and_utc_on_the_wire() -> None:
    clock = LocalClock(
        TimeSettings(None, 3600, True, 3600, tzrules.SEED_DEFAULT_BEGIN, tzrules.SEED_DEFAULT_END)
    )
    summer = dt.datetime(2026, 7, 1, 10, 0, tzinfo=UTC).timestamp()
    assert clock.file_stamp(summer) == "20260701_120000"
    assert rfc3339(summer) == "2026-07-01T10:00:00Z"
    winter = dt.datetime(2026, 1, 1, 10, 0, tzinfo=UTC).timestamp()
    assert clock.file_stamp(winter, "%H%M") == "1100"
    due = clock.next_daily_s(dt.time(3, 0), now_s=winter)
    assert due == dt.datetime(2026, 1, 2, 2, 0, tzinfo=UTC).timestamp()
