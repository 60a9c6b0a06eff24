"""``[[meter]] protocol = "dlms"`` in dcud.toml: defaults, every rule with file:line: key, no secret shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcud.config.dlms import DlmsConfigError, client_system_title, meter_keys, parse_host, parse_object
from dcud.config.loader import load_config
from dcud.config.model import DlmsConfig
from dcud.errors import ConfigError
from dcud.service.dlms_settings import DlmsMeterSettings

EK = "000102030405060708090A0B0C0D0E0F"
AK = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"
LINES = """
[[line]]
name = "rs485-1"
device = "/dev/ttyS1"
baud = 9600
framing = "8N1"

[[line]]
name = "mbus-1"
device = "/dev/ttyUSB0"
kind = "mbus"
"""


def write(tmp_path: Path, toml: str) -> Path:
    (tmp_path / "wme.conf").write_text("")
    path = tmp_path / "dcud.toml"
    path.write_text(f'device_id = "dcu-7"\nstate_dir = "state"\n{LINES}{toml}')
    return path


def issues_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(i) for i in info.value.issues]


def test_a_hdlc_and_a_tcp_meter_with_their_defaults(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text(f'block_cipher_key = "{EK}"\nauthentication_key = "{AK}"\n')
    path = write(
        tmp_path,
        """
[[meter]]
name = "em-1"
protocol = "dlms"
line = "rs485-1"
address = "17"

[[meter]]
name = "em-7"
protocol = "dlms"
host = "10.1.2.7"
interval_s = 900
[meter.dlms]
client = 1
auth = "hls-gmac"
security = "authenticated-encrypted"
key_file = "keys.toml"
objects = ["1.0.1.8.0.255", "1-0:2.8.0*255", "3/1.0.32.7.0.255/2"]
profile = "1.0.99.1.0.255"
event_logs = ["0.0.99.98.0.255"]
clock_sync = "set"
max_drift_s = 5
""",
    )
    config = load_config(path)
    hdlc, tcp = config.toml.meter
    assert hdlc.dlms is None  # every default
    settings = DlmsMeterSettings.from_config(hdlc, tmp_path, config.device_id)
    assert (settings.line, settings.physical_address, settings.host) == ("rs485-1", 17, "")
    assert (settings.dlms.client, settings.dlms.logical_device, settings.dlms.auth) == (16, 1, "none")
    assert (settings.dlms.profile_backfill_s, settings.dlms.clock_sync, settings.keys) == (
        86400,
        "report",
        None,
    )
    settings = DlmsMeterSettings.from_config(tcp, tmp_path, config.device_id)
    assert (settings.host, settings.port, settings.line) == ("10.1.2.7", 4059, "")
    assert settings.keys is not None and settings.keys.block_cipher_key == bytes.fromhex(EK)
    assert [str(o.obis) for o in settings.objects] == ["1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255"]
    assert str(settings.objects[2].ref) == "3/1.0.32.7.0.255/2" and settings.objects[0].ref is None
    assert str(settings.profile) == "1.0.99.1.0.255"
    # dcud's system title: stable per device, starting with DCU
    assert settings.system_title == client_system_title(DlmsConfig(), "dcu-7")
    assert settings.system_title[:3] == b"DCU" and len(settings.system_title) == 8
    assert client_system_title(DlmsConfig(), "dcu-8") != settings.system_title


def test_every_rule_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[meter]]
name = "both"
protocol = "dlms"
line = "rs485-1"
host = "10.0.0.1:4059"

[[meter]]
name = "neither"
protocol = "dlms"

[[meter]]
name = "on-mbus"
protocol = "dlms"
line = "mbus-1"

[[meter]]
name = "bad-address"
protocol = "dlms"
line = "rs485-1"
address = "99999"

[[meter]]
name = "bad-host"
protocol = "dlms"
host = "2001:db8::7:4059"

[[meter]]
name = "tcp-mode-e"
protocol = "dlms"
host = "10.0.0.2:4059"
address = "17"
[meter.dlms]
mode_e = true

[[meter]]
name = "lls"
protocol = "dlms"
line = "rs485-1"
[meter.dlms]
auth = "lls"
objects = ["1-0:1.8.0", "3/1.0.1.8.0.255", "1.0.1.8.0.255"]
profile = "99.1.0"

[[meter]]
name = "hls"
protocol = "dlms"
line = "rs485-1"
[meter.dlms]
auth = "hls-gmac"
block_cipher_key = "000102030405060708090A0B0C0D0E0F"

[[meter]]
name = "keys-unused"
protocol = "dlms"
line = "rs485-1"
[meter.dlms]
authentication_key = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"

[[meter]]
name = "iec"
protocol = "iec62056-21"
host = "10.0.0.3"
[meter.dlms]
client = 1

[[meter]]
name = "no-line"
protocol = "mbus"
address = "5"
""",
    )
    issues = issues_of(path)
    text = "\n".join(issues)

    def has(key: str, words: str) -> None:
        found = [i for i in issues if f": {key}: " in i and words in i]
        assert found, f"no {key!r} issue with {words!r} in:\n{text}"
        assert all(i.startswith(f"{path}:") and int(i.split(":")[1]) > 0 for i in found), found

    has("meter[both].line", "exactly one of line")
    has("meter[neither]", "exactly one of line")
    has("meter[on-mbus].protocol", "M-Bus line")
    has("meter[bad-address].address", "0..16383")
    has("meter[bad-host].host", "brackets")
    has("meter[tcp-mode-e].address", "no HDLC address")
    has("meter[tcp-mode-e].dlms.mode_e", "not on TCP")
    has("meter[lls].dlms.password", "needs the password")
    has("meter[lls].dlms.objects", "listed twice")
    has("meter[lls].dlms.objects", "not class/obis/attribute")
    has("meter[lls].dlms.profile", "not an OBIS code")
    has("meter[hls].dlms.authentication_key", "auth = hls-gmac needs it")
    has("meter[keys-unused].dlms.security", "keys are given")
    has("meter[iec].host", 'only a protocol = "dlms" meter')
    has("meter[iec].dlms", "needs protocol")
    has("meter[no-line].line", "required")
    # The line of an issue is the key's own line.
    lines = path.read_text().splitlines()
    issue = next(i for i in issues if ": meter[bad-address].address: " in i)
    assert lines[int(issue.split(":")[1]) - 1] == 'address = "99999"'


def test_field_errors_come_first_with_their_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[meter]]
name = "m"
protocol = "dlms"
line = "rs485-1"
[meter.dlms]
clock_sync = "sometimes"
passwrd = "x"
client = 200
profile_backfill_s = -1
""",
    )
    issues = issues_of(path)
    assert [i.split(": ")[1] for i in issues] == [
        "meter[m].dlms.passwrd",
        "meter[m].dlms.client",
        "meter[m].dlms.profile_backfill_s",
        "meter[m].dlms.clock_sync",
    ]
    assert 'did you mean "password"' in issues[0] and "<= 127" in issues[1]
    lines = path.read_text().splitlines()
    assert lines[int(issues[3].split(":")[1]) - 1] == 'clock_sync = "sometimes"'


def test_secrets_are_never_shown(tmp_path: Path) -> None:
    password = "s3cr3t-pw-4711"
    path = write(
        tmp_path,
        f"""
[[meter]]
name = "lls"
protocol = "dlms"
line = "rs485-1"
[meter.dlms]
auth = "lls"
password = "{password}"
block_cipher_key = "{EK}"

[[meter]]
name = "bad-key"
protocol = "dlms"
line = "rs485-1"
[meter.dlms]
security = "encrypted"
block_cipher_key = "{AK[:30]}zz"
authentication_key = "{AK}"
""",
    )
    issues = "\n".join(issues_of(path))
    assert password not in issues and AK[:30] not in issues and EK not in issues
    assert "meter[bad-key].dlms.block_cipher_key" in issues and "value not shown (secret)" in issues
    dlms = DlmsConfig(auth="lls", password=password, block_cipher_key=EK, authentication_key=AK)
    shown = repr(dlms)
    assert password not in shown and EK not in shown and AK not in shown and "password='***'" not in shown
    assert "password=***" in shown and "auth='lls'" in shown


def test_key_file_problems_are_reported_without_the_keys(tmp_path: Path) -> None:
    (tmp_path / "short.json").write_text(f'{{"block_cipher_key": "{EK}", "authentication_key": "{AK[:8]}"}}')
    (tmp_path / "garbage.toml").write_text(f"block_cipher_key = {EK}\n")
    toml = "".join(
        f"""
[[meter]]
name = "m-{n}"
protocol = "dlms"
host = "127.0.0.1"
[meter.dlms]
security = "authenticated"
key_file = "{f}"
"""
        for n, f in enumerate(("short.json", "garbage.toml", "missing.toml"))
    )
    issues = issues_of(write(tmp_path, toml))
    assert len(issues) == 3, issues
    assert "authentication_key must be 32 hex digits" in issues[0]
    assert "neither TOML nor JSON" in issues[1] and EK not in issues[1]
    assert "cannot read key file" in issues[2] and "meter[m-2].dlms.key_file" in issues[2]
    with pytest.raises(DlmsConfigError):
        meter_keys(DlmsConfig(security="encrypted", key_file="short.json"), tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.7:4059", ("10.1.2.7", 4059)),
        ("10.1.2.7", ("10.1.2.7", 4059)),
        ("[::1]:5000", ("::1", 5000)),
        ("[2001:db8::7]", ("2001:db8::7", 4059)),
        ("meter-7.site.example:4060", ("meter-7.site.example", 4060)),
    ],
)
def test_host_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_host(text) == expected


@pytest.mark.parametrize(
    "text", ["", ":4059", "10.1.2.7:0", "10.1.2.7:70000", "[::1", "[nope]:1", "a b:1", "::1"]
)
def test_bad_hosts(text: str) -> None:
    with pytest.raises(DlmsConfigError):
        parse_host(text)


def test_object_forms() -> None:
    assert parse_object("1-0:1.8.0").obis == parse_object("1.0.1.8.0.255").obis
    spec = parse_object("5/1.0.1.4.0.255/3")
    assert spec.ref is not None and (spec.ref.class_id, spec.ref.index) == (5, 3)
    for bad in ("1.0.1.8", "3/1.0.1.8.0.255", "x/1.0.1.8.0.255/2", "1.0.1.8.0.256"):
        with pytest.raises(DlmsConfigError):
            parse_object(bad)
