"""The WM-E parameter-file parser: syntax, every kind of issue, line numbers, secrets, round trips."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.config.wme import (
    CATALOGUE,
    ParameterSet,
    load_parameter_file,
    parse_parameter_text,
    render_parameter_file,
)
from dcud.errors import ConfigError, ConfigIssue

GOOD = """\
# WM-E parameters of dcu-0001
ntp_address = pool.ntp.org
ntp_interval=900

   # an indented comment
tm_server_port=9100
eventpush_sms_text=Input #2 changed = alarm
com_apn_pass=p#ss=word
datapush_host=ftp://meter:top%40secret@192.0.2.10:21/push
snrp_restart_time=02:30
snmp_trap=1
datapush_prefix=
"""


def parse(text: str, path: str = "wme.conf") -> tuple[ParameterSet, list[ConfigIssue]]:
    return parse_parameter_text(text, path)


def test_good_file() -> None:
    ps, issues = parse(GOOD)
    assert issues == []
    assert ps.get("ntp_address") == "pool.ntp.org"
    assert ps.get_int("ntp_interval") == 900
    assert ps.get_int("tm_server_port") == 9100
    assert ps.get_str("eventpush_sms_text") == "Input #2 changed = alarm"
    assert ps.get_str("com_apn_pass") == "p#ss=word"
    assert ps.get("snrp_restart_time") == datetime.time(2, 30)
    assert ps.get_bool("snmp_trap") is True
    assert ps.lines["ntp_interval"] == 3
    assert ps.lines["tm_server_port"] == 6
    # empty value: unset, default kept
    assert not ps.is_set("datapush_prefix")
    assert ps.get_opt_str("datapush_prefix") is None
    # defaults for the rest
    assert not ps.is_set("fw_server_port")
    assert ps.get_int("fw_server_port") == 9001
    assert ps.get_int("tm2.baud") == 2400
    assert ps.get_opt_int("ntp_port") is None


def test_crlf_bom_and_whitespace() -> None:
    ps, issues = parse("\ufeffntp_interval\t=\t120 \r\n  ntp_timeout =5\r\n")
    assert issues == []
    assert ps.get("ntp_interval") == 120
    assert ps.raw["ntp_interval"] == "120"
    assert ps.get("ntp_timeout") == 5


ALL_ERRORS = """\
# header
ntp_adress=192.0.2.1
this line has no equals sign
=orphan value
ntp_interval=60
ntp_interval=120
lastimei=356938035643809
snmp_trap=yes
com_apn_pass=\x01bad
ei_client_top_keepalive=forever
zzzz_qqqq=1
ntp_port=70000
lasticc=
ntp_interval=ten
"""


def test_every_error_reported_with_its_line() -> None:
    ps, issues = parse(ALL_ERRORS)
    got = [(i.line, i.key, i.message) for i in issues]
    assert got == [
        (2, "ntp_adress", 'unknown parameter, did you mean "ntp_address"?'),
        (3, "", 'expected name=value (no "=" on this line)'),
        (4, "", 'missing parameter name before "="'),
        (6, "ntp_interval", "set twice, first on line 5"),
        (7, "lastimei", "read-only status value, cannot be set"),
        (8, "snmp_trap", 'expected 0 or 1, got "yes"'),
        (
            9,
            "com_apn_pass",
            "expected text of 1..64 printable characters (control characters are not allowed); "
            "value not shown",
        ),
        (10, "ei_client_top_keepalive", 'expected minutes 0..1440, got "forever"'),
        (11, "zzzz_qqqq", "unknown parameter"),
        (12, "ntp_port", 'expected port 0..65535, got "70000"'),
        (14, "ntp_interval", "set twice, first on line 5"),
    ]
    # the first assignment of a duplicate is the one kept
    assert ps.get("ntp_interval") == 60
    assert str(issues[-1]) == "wme.conf:14: ntp_interval: set twice, first on line 5"


def test_issue_format_from_design() -> None:
    text = "".join(f"# line {n}\n" for n in range(1, 14)) + "ntp_interval=ten\n"
    _, issues = parse(text)
    assert [str(i) for i in issues] == ['wme.conf:14: ntp_interval: expected seconds 1..86400, got "ten"']


def test_read_only_empty_is_fine() -> None:
    ps, issues = parse("lastimei=\n")
    assert issues == []
    assert not ps.is_set("lastimei")


def test_secrets_never_in_issues() -> None:
    text = (
        "com_apn_pass=" + "S3CRET" * 20 + "\n"
        "datapush_host=http://u:S3CRET@host/\n"
        "fw_server_key=S3CRET\n"
        "com.sim_pin_code=S3CRET\n"
        "snmp_auth_key=S3CRET\n"
        "com_apn_passs=S3CRET\n"
        "S3CRET\n"
        "pdfoff_auth_pass=S3CRET\n"
    )
    _, issues = parse(text)
    assert len(issues) == 8
    for issue in issues:
        assert "S3CRET" not in str(issue)


def test_masked() -> None:
    ps, _ = parse(GOOD)
    masked = ps.masked()
    assert set(masked) == set(CATALOGUE)
    assert masked["com_apn_pass"] == "***"
    assert masked["datapush_host"] == "ftp://meter:***@192.0.2.10:21/push"
    assert masked["ntp_interval"] == "900"
    assert masked["snrp_restart_time"] == "02:30"
    assert masked["snmp_trap"] == "1"
    assert masked["fw_server_key"] == ""
    assert "top%40secret" not in repr(masked)


def test_cross_checks() -> None:
    _, issues = parse("tm_server_port=9001\n")
    assert [str(i) for i in issues] == [
        "wme.conf:1: tm_server_port: port 9001 is also used by fw_server_port"
    ]
    _, issues = parse("tm2.port=7000\nfw_server_port=7000\n")
    assert [(i.line, i.key) for i in issues] == [(2, "fw_server_port")]
    _, issues = parse("fw_server_encrypt=1\n")
    assert [(i.line, i.key, i.message) for i in issues] == [
        (1, "fw_server_encrypt", "encryption needs fw_server_key")
    ]
    _, issues = parse("fw_server_encrypt=1\nfw_server_key=" + "ab" * 32 + "\n")
    assert issues == []
    _, issues = parse("snmp_priv_algo=1\n")
    assert {i.message for i in issues} == {
        "a privacy algorithm needs snmp_priv_key",
        "privacy needs an authentication algorithm",
    }
    _, issues = parse("ei_client_auth_mode=E\nei_client_type=hes\n")
    assert [i.message for i in issues] == ["authentication E needs ei_client_pass"]


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "wme.conf"
    with pytest.raises(ConfigError) as info:
        load_parameter_file(path)
    assert len(info.value.issues) == 1
    assert info.value.line == 0
    assert str(info.value) == f"{path}: file not found"


def test_load_non_utf8_reports_all(tmp_path: Path) -> None:
    path = tmp_path / "wme.conf"
    path.write_bytes(b"ntp_interval=60\neventpush_sms_text=\xe9t\xe9\nntp_timeout=x\n")
    with pytest.raises(ConfigError) as info:
        load_parameter_file(path)
    got = [(i.line, i.key, i.message) for i in info.value.issues]
    assert got == [
        (2, "", "not valid UTF-8 (byte 0xE9 at column 20), line ignored"),
        (3, "ntp_timeout", 'expected seconds 1..600, got "x"'),
    ]
    assert (
        str(info.value).splitlines()[0] == f"{path}:2: not valid UTF-8 (byte 0xE9 at column 20), line ignored"
    )


def test_load_good_file(tmp_path: Path) -> None:
    path = tmp_path / "wme.conf"
    path.write_text(GOOD, encoding="utf-8")
    ps = load_parameter_file(path)
    assert ps.path == str(path)
    assert ps.get("ntp_interval") == 900


def test_render_round_trip() -> None:
    ps, _ = parse(GOOD)
    text = render_parameter_file(ps)
    assert text.splitlines()[0] == "eventpush_sms_text=Input #2 changed = alarm"  # catalogue order
    again, issues = parse(text)
    assert issues == []
    assert again.raw == ps.raw
    assert again.changed(ps) == set()
    assert render_parameter_file(ParameterSet.defaults()) == ""


def test_changed_and_with_updates() -> None:
    ps, _ = parse(GOOD)
    new, issues = ps.with_updates({"ntp_interval": "60", "ntp_address": "", "tm2.baud": " 9600 "})
    assert issues == []
    assert new.changed(ps) == {"ntp_interval", "ntp_address", "tm2.baud"}
    assert new.get("ntp_interval") == 60
    assert not new.is_set("ntp_address")
    assert new.get("tm2.baud") == 9600
    assert new.lines["tm2.baud"] == 0
    assert ps.get("ntp_interval") == 900  # the original is unchanged
    # the same value written differently is no change
    same, _ = ps.with_updates({"ntp_interval": "0900"})
    assert same.changed(ps) == set()

    bad, issues = ps.with_updates(
        {"ntp_interval": "x", "lastimei": "1", "nope": "1", "ntp_timeout": "7", "tm_server_port": "9001"}
    )
    assert [(i.line, i.key) for i in issues] == [
        (0, "ntp_interval"),
        (0, "lastimei"),
        (0, "nope"),
        (0, "tm_server_port"),
    ]
    assert bad.get("ntp_interval") == 900
    assert bad.get("ntp_timeout") == 7


def test_getters() -> None:
    ps = ParameterSet.defaults("x")
    with pytest.raises(KeyError):
        ps.get("nope")
    with pytest.raises(KeyError):
        ps.is_set("nope")
    with pytest.raises(TypeError):
        ps.get_int("ntp_address")  # unset, no default
    with pytest.raises(TypeError):
        ps.get_str("ntp_interval")
    with pytest.raises(TypeError):
        ps.get_int("snmp_trap")  # bool is not an int here
    assert ps.get_bool("snmp_trap") is False  # checkbox without default
    assert ps.get_float("ntp_interval") == 600.0
    assert ps.get_opt_int("ntp_interval") == 600


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        ParameterSet("x", {"nope": "1"})
    with pytest.raises(ValueError, match="read-only"):
        ParameterSet("x", {"lastimei": "1"})
    with pytest.raises(ValueError, match="expected seconds"):
        ParameterSet("x", {"ntp_interval": "ten"})
    ps = ParameterSet("x", {"ntp_interval": "5"}, {"ntp_interval": 3})
    assert ps.get("ntp_interval") == 5
    assert ps.lines["ntp_interval"] == 3


NAMES = st.sampled_from(list(CATALOGUE))
LINE = st.one_of(
    st.builds(lambda n, v: f"{n}={v}", NAMES, st.text(max_size=30)),
    st.builds(lambda n, v: f"{n} = {v}", NAMES, st.from_regex(r"[0-9:.,+\-A-Fa-f]{0,16}", fullmatch=True)),
    st.text(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text: str) -> None:
    ps, issues = parse_parameter_text(text, "fuzz.conf")
    n_lines = text.count("\n") + 1
    for issue in issues:
        assert 0 <= issue.line <= n_lines
        str(issue)
    ps.masked()


@settings(max_examples=300, deadline=None)
@given(st.lists(LINE, max_size=20))
def test_plausible_files_never_raise_and_round_trip(lines: list[str]) -> None:
    text = "\n".join(lines)
    ps, issues = parse_parameter_text(text, "fuzz.conf")
    assert [i.line for i in issues] == sorted(i.line for i in issues)
    again, again_issues = parse_parameter_text(render_parameter_file(ps), "fuzz.conf")
    assert again.raw == ps.raw
    assert again.changed(ps) == set()
    # a re-rendered set can only carry cross-parameter issues, never syntax or value ones
    assert all(
        i.message.startswith(("port ", "encryption", "a ", "an ", "privacy", "auth")) for i in again_issues
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_load_raises_only_config_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "wme.conf"
    path.write_bytes(data)
    try:
        load_parameter_file(path)
    except ConfigError as exc:
        assert exc.issues
