"""The WM-E catalogue against the seed table: every row, its default, group, support and typing."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from dcud.config.wme import (
    CATALOGUE,
    DatedTime,
    HexDate,
    Kind,
    ParameterSet,
    Support,
    key_bytes,
    parse_parameter_text,
    suggest,
)

from helpers import TESTS

SEED = Path(os.environ.get("DCUD_SEEDS_DIR", TESTS / "vectors" / "seeds")) / "000_c032507ce4234a0b.txt"
"""The WM-E8S parameter table as given (a copy of ``../shared/seeds``, kept here so that a clone alone,
as CI checks it out, carries the spec its catalogue is tested against)."""
NAME_RE = re.compile(r"[a-z][a-z0-9_.]*")

# Seed defaults that cannot be what the text says: seed text -> the default dcud records.
INTERPRETED_DEFAULTS = {
    "eventpush_sms_notify": ("Last GsmP", "1"),
    "datapush_table_mask": ("T1", "1"),
    "snrp_connect_start": ("FFFFFFFFF00000", "FFFFFFFF000000"),
    "emeter_date_format": ("YYMMDD (Read Ohv)", "YYMMDD"),
    "tm2.baud": ("2418", "2400"),
    "dm.verify": ("0", "2"),
}


@dataclass(frozen=True)
class SeedRow:
    name: str
    group: str
    term: str
    default: str | None
    unit: str


def seed_rows() -> list[SeedRow]:
    """Parameter rows of the seed table, groups carried forward.

    Some extracted rows lost their group column; they are told apart by their second cell, which is
    then a term (mixed case) rather than empty or an upper-case group label.
    """
    rows: list[SeedRow] = []
    group = ""
    for line in SEED.read_text(encoding="utf-8").splitlines():
        cells = line.split("\t")
        if len(cells) < 5 or not NAME_RE.fullmatch(cells[0]):
            continue
        if cells[1] == "" or cells[1].isupper():
            group = cells[1] or group
            term, default, unit = cells[2], cells[3], cells[4]
        else:
            term, default, unit = cells[1], cells[2], cells[3]
        rows.append(SeedRow(cells[0], group, term.strip(), None if default == "-" else default, unit))
    return rows


ROWS = seed_rows()


def test_seed_is_read() -> None:
    assert len(ROWS) > 100
    assert ROWS[0].name == "ei_client_type"
    assert ROWS[-1].name == "ntp.timeout"


def test_every_seed_row_is_in_the_catalogue_in_order() -> None:
    assert [r.name for r in ROWS] == list(CATALOGUE)


def test_two_spellings_are_two_parameters() -> None:
    pairs = [("ntp_address", "ntp.address"), ("ntp_port", "ntp.port"), ("ntp_interval", "ntp.interval")]
    pairs.append(("ntp_timeout", "ntp.timeout"))
    for a, b in pairs:
        assert a in CATALOGUE and b in CATALOGUE
        assert CATALOGUE[a] is not CATALOGUE[b]
    # they have their own defaults
    assert CATALOGUE["ntp_interval"].default == "600"
    assert CATALOGUE["ntp.interval"].default == "30"
    # tm_server_port and tm2.port are the primary and the secondary transparent port, both present
    assert {"tm_server_port", "tm2.port"} <= set(CATALOGUE)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_seed_facts(row: SeedRow) -> None:
    p = CATALOGUE[row.name]
    assert p.group == row.group
    assert p.term == row.term
    assert p.seed_unit == row.unit.strip()
    if row.name in INTERPRETED_DEFAULTS:
        seed_text, chosen = INTERPRETED_DEFAULTS[row.name]
        assert row.default == seed_text
        assert p.default == chosen
        assert seed_text in p.note, "the interpretation is documented next to the parameter"
    else:
        assert p.default == row.default
    assert p.description and p.description == p.description.strip()


def test_groups_carried_forward() -> None:
    assert CATALOGUE["ei_client_pass"].group == "AMM (EC)"
    assert CATALOGUE["com.dns_fpoata_par"].group == "WATCHDOG (FOTA)"
    assert CATALOGUE["calendar_timezone"].group == "CALENDAR"
    assert CATALOGUE["tm.baud"].group == "TRANSP / NTA"
    assert CATALOGUE["rs485.mode"].group == "RS485"
    assert CATALOGUE["ntp.timeout"].group == "NETWORK PROTOCOLS"


def test_every_default_converts_and_displays_back() -> None:
    for p in CATALOGUE.values():
        if p.default is None:
            continue
        value = p.convert(p.default)
        if value is not None and not p.secret:
            assert p.display(value) == p.default, p.name


def test_allowed_values_convert() -> None:
    for p in CATALOGUE.values():
        if p.allowed and p.kind is not Kind.URL:
            for a in p.allowed:
                p.convert(a)


def test_each_support_level_has_members() -> None:
    by_level = {s: [p.name for p in CATALOGUE.values() if p.support is s] for s in Support}
    assert all(by_level.values())
    assert {r.name for r in ROWS if r.unit == "READ ONLY"} == set(by_level[Support.READ_ONLY])
    assert "lastimei" in by_level[Support.READ_ONLY]
    assert "com_apn_name" in by_level[Support.ACCEPTED]
    assert "ntp_interval" in by_level[Support.APPLIED]


APPLIED_PREFIXES = (
    "datapush_",
    "eventpush_",
    "ntp_",
    "ntp.",
    "snmp_",
    "tm_",
    "tm.",
    "tm2.",
    "fw_server_",
    "rs485.",
    "dcd.",
    "ei_client_",
    "dm.",
    "calendar_",
    "com_ping_",
    "snrp_restart_time",
    "snrp_bis_timeout",
    "emp_reboot",
    "led",
    "em_relay",
)


def test_applied_areas_are_applied_or_explained() -> None:
    for p in CATALOGUE.values():
        if p.name.startswith(APPLIED_PREFIXES):
            assert p.support is Support.APPLIED or p.note, p.name
        elif p.support is Support.APPLIED:
            pytest.fail(f"{p.name} is applied but outside the applied areas")


def test_not_used_rows_say_so() -> None:
    for p in CATALOGUE.values():
        if re.search(r"\*\s*not (used|in use|implemented)", p.description, re.IGNORECASE):
            assert re.search(r"not (used|in use|implemented)", p.note, re.IGNORECASE), p.name


def test_secrets() -> None:
    secret = {p.name for p in CATALOGUE.values() if p.secret}
    assert secret == {
        "ei_client_pass",
        "datapush_host",
        "snmp_auth_key",
        "snmp_priv_key",
        "snmp_user",
        "com_apn_pass",
        "pdfoff_auth_pass",
        "fw_server_key",
        "com_dis_apn_pass",
        "com.dns_fpoata_par",
        "com.password",
        "com.sim_pin_code",
    }
    for p in CATALOGUE.values():
        if p.kind in (Kind.PASSWORD, Kind.KEY, Kind.PIN, Kind.URL):
            assert p.secret, p.name


def test_units() -> None:
    for p in CATALOGUE.values():
        if p.kind in (Kind.SECONDS, Kind.MINUTES, Kind.HOURS, Kind.MILLISECONDS, Kind.SECONDS_LIST):
            assert p.unit == "s", p.name
    assert CATALOGUE["ei_client_top_keepalive"].seed_unit == "minutes"
    assert CATALOGUE["datapush_timeout"].seed_unit == "milliseconds"


def test_unit_conversion() -> None:
    ps, issues = parse_parameter_text(
        "ei_client_top_keepalive=10\ndatapush_timeout=15000\nsnrp_bis_timeout=2\ncom_ping_timeout=250\n", "w"
    )
    assert issues == []
    assert ps.get("ei_client_top_keepalive") == 600
    assert isinstance(ps.get("ei_client_top_keepalive"), int)
    assert ps.get("datapush_timeout") == 15.0
    assert isinstance(ps.get("datapush_timeout"), float)
    assert ps.get("snrp_bis_timeout") == 7200
    assert ps.get_float("com_ping_timeout") == 0.25
    defaults = ParameterSet.defaults()
    assert defaults.get("calendar_timezone") == 3600
    assert defaults.get("datapush_periodic") == 300
    assert defaults.get("com_ping_timeout") == 15.0
    masked = ps.masked()
    assert masked["ei_client_top_keepalive"] == "10"
    assert masked["datapush_timeout"] == "15000"
    assert masked["com_ping_timeout"] == "250"


CONVERT_OK: list[tuple[str, str, object]] = [
    ("ntp_interval", "600", 600),
    ("ntp_port", "123", 123),
    ("ntp_address", "pool.ntp.org", "pool.ntp.org"),
    ("ntp_address", "192.0.2.1", "192.0.2.1"),
    ("ntp.address", "2001:db8::0:1", "2001:db8::1"),
    ("snmp_manager_ip", "0", None),
    ("com_ping_host", "10.0.0.1", "10.0.0.1"),
    ("snmp_trap", "1", True),
    ("snmp_trap", "0", False),
    ("tm.baud", "57600", 57600),
    ("ei_client_auth_mode", "e", "E"),
    ("eventpush_sms_notify", "3", 3),
    ("datapush_table_mask", "33", 33),
    ("datapush_periodic", "15", 900),
    ("eventpush_addr", "+36201234567", "+36201234567"),
    ("eventpush_addr", "192.0.2.9", "192.0.2.9"),
    ("eventpush_addr", "hes.example.net", "hes.example.net"),
    ("datapush_host", "ftp://user:pa%23ss@192.0.2.1:21/up", "ftp://user:pa%23ss@192.0.2.1:21/up"),
    ("datapush_host", "mqtts://u:p@192.0.2.1:8883/utility", "mqtts://u:p@192.0.2.1:8883/utility"),
    ("snrp_restart_time", "03:30", datetime.time(3, 30)),
    ("snrp_restart_time", "3:05", datetime.time(3, 5)),
    ("calendar_dst_begin", "ffff03fe07020000", HexDate("FFFF03FE07020000")),
    ("snrp_connect_start", "FFFFFFFF123000", DatedTime("FFFFFFFF", datetime.time(12, 30))),
    ("snrp_connect_start", "FFFFFFFFF00000", DatedTime("FFFFFFFF", datetime.time(0, 0))),
    ("ntp_timezone", "+1:30", 5400),
    ("ntp_timezone", "UTC-5:00", -18000),
    ("ntp_timezone", "+5:45", 20700),
    ("com_retry_delay", "15, 30,3600", (15, 30, 3600)),
    ("com.sim_pin_code", "1234", "1234"),
    ("fw_server_key", "0123456789abcdef" * 4, "0123456789abcdef" * 4),
    ("fw_server_key", "A" * 32, "A" * 32),
    ("com_apn_name", "internet.example", "internet.example"),
    ("datapush_iec_address", "12345678", "12345678"),
    ("datapush_prefix", "WM115", "WM115"),
    ("com.at_wmbms", "1,0x80,3", "1,0x80,3"),
    ("com.sim_at_cops", '1,2,"21601"', '1,2,"21601"'),
    ("emeter_date_format", "YYYY-MM-DD", "YYYY-MM-DD"),
    ("eventpush_sms_text", "Input # changed = yes", "Input # changed = yes"),
    ("calendar_timezone", "-300", -18000),
    ("led5", "30", 30),
]


@pytest.mark.parametrize(("name", "raw", "expected"), CONVERT_OK)
def test_convert_ok(name: str, raw: str, expected: object) -> None:
    value = CATALOGUE[name].convert(raw)
    assert value == expected
    assert type(value) is type(expected)


CONVERT_BAD: list[tuple[str, str]] = [
    ("ntp_interval", "ten"),
    ("ntp_interval", "0"),
    ("ntp_interval", "86401"),
    ("ntp_interval", "1.5"),
    ("ntp_port", "65536"),
    ("tm_server_port", "0"),
    ("ntp_address", "1.2.3"),
    ("ntp_address", "bad_host!"),
    ("com_ping_host", "example.com"),
    ("snmp_trap", "yes"),
    ("tm.baud", "56100"),
    ("ei_client_auth_mode", "X"),
    ("eventpush_sms_notify", "16"),
    ("datapush_periodic", "7"),
    ("eventpush_addr", "12"),
    ("datapush_host", "http://example.com/"),
    ("datapush_host", "ftp://"),
    ("datapush_host", "udp://192.0.2.1:5000"),
    ("datapush_host", "ftp://user:pa#ss@host/"),
    ("datapush_host", "ftp://host:99999/"),
    ("snrp_restart_time", "24:00"),
    ("snrp_restart_time", "0330"),
    ("calendar_dst_begin", "FFFF"),
    ("snrp_connect_start", "FFFFFFFF240000"),
    ("ntp_timezone", "+1:20"),
    ("ntp_timezone", "+15:00"),
    ("com_retry_delay", "15,,30"),
    ("com_retry_delay", ",".join(["1"] * 33)),
    ("com.sim_pin_code", "12a4"),
    ("fw_server_key", "short"),
    ("snmp_auth_key", "1234567"),
    ("com_apn_name", "-bad"),
    ("datapush_iec_address", "12/34"),
    ("datapush_prefix", "a/b"),
    ("com.at_wmbms", "a,b"),
    ("com.sim_at_cops", "9"),
    ("emeter_date_format", "YYMM"),
    ("eventpush_sms_text", "x" * 161),
    ("eventpush_sms_text", "bell\x07"),
    ("calendar_timezone", "900"),
    ("ei_client_port", ""),
]


@pytest.mark.parametrize(("name", "raw"), CONVERT_BAD)
def test_convert_bad(name: str, raw: str) -> None:
    p = CATALOGUE[name]
    with pytest.raises(ValueError, match=r"^expected ") as info:
        p.convert(raw)
    if p.secret:
        assert "value not shown" in str(info.value)
        if raw and raw not in p.expected():
            assert raw not in str(info.value)


def test_error_message_form() -> None:
    with pytest.raises(ValueError) as info:
        CATALOGUE["ntp_interval"].convert("ten")
    assert str(info.value) == 'expected seconds 1..86400, got "ten"'
    with pytest.raises(ValueError) as info:
        CATALOGUE["ei_client_top_keepalive"].convert("9999")
    assert str(info.value) == 'expected minutes 0..1440, got "9999"'


def test_secret_values_never_in_messages() -> None:
    for p in CATALOGUE.values():
        if not p.secret:
            continue
        for raw in ("hunter2-secret", "ftp://u:hunter2-secret@", "hunter2 secret#", "hunter2\x00secret"):
            try:
                p.convert(raw)
            except ValueError as exc:
                assert "hunter2" not in str(exc), p.name


def test_display_masks_secrets() -> None:
    url = CATALOGUE["datapush_host"]
    assert url.display("ftp://user:s3cret@host:21/dir") == "ftp://user:***@host:21/dir"
    assert url.display("ftp://host/dir") == "ftp://host/dir"
    assert CATALOGUE["com_apn_pass"].display("s3cret") == "***"
    assert CATALOGUE["com_apn_pass"].display(None) == ""
    assert CATALOGUE["snrp_restart_time"].display(datetime.time(4, 5)) == "04:05"
    assert CATALOGUE["ntp_timezone"].display(-5400) == "-1:30"


def test_key_bytes() -> None:
    assert key_bytes("00" * 32) == bytes(32)
    assert key_bytes("k" * 32) == b"k" * 32
    with pytest.raises(ValueError):
        key_bytes("k" * 31)


def test_suggest() -> None:
    assert suggest("ntp_adress") == "ntp_address"
    assert suggest("NTP_ADDRESS") == "ntp_address"
    assert suggest("tm_server_prot") == "tm_server_port"
    assert suggest("datapush_intervall") == "datapush_interval"
    assert suggest("completely_unrelated_thing") is None
    assert suggest("") is None
    assert suggest("ntp_address") is None
