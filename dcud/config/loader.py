"""Loads ``dcud.toml`` and the WM-E parameter file it names; reports every problem at once.

The result is a ``LoadedConfig``: the decoded installation, the typed parameters, and the values
derived from both (device id, topic prefix, state directory) so that services never re-derive them.
A bad file raises ``ConfigError`` with all issues; nothing half-loaded ever reaches a service.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcud.config.model import DcudToml
from dcud.config.toml_decode import LineLocator, decode_table
from dcud.config.wme import ParameterSet, parse_parameter_text
from dcud.errors import ConfigError, ConfigIssue

_IEC_ADDRESS = re.compile(r"^[0-9A-Za-z ]{0,32}$")
_MBUS_SECONDARY = re.compile(r"^[0-9]{8}$")

# Ports dcud listens on: two services may not share one.
LISTEN_PORT_PARAMS = ("tm_server_port", "tm2.port", "fw_server_port")


@dataclass(frozen=True)
class LoadedConfig:
    """A fully validated configuration: the installation file and the WM-E parameters."""

    path: Path
    toml: DcudToml
    params: ParameterSet
    device_id: str
    topic_prefix: str
    state_dir: Path


REMOTE_PARAMETERS = Path("params") / "wme.conf"
"""Where remote configuration keeps the parameter file, under ``state_dir`` (docs/remote-config.md)."""


def remote_parameters_path(state_dir: Path) -> Path:
    """The head-end's copy of the WM-E parameter file; when it exists it is the one in force."""
    return state_dir / REMOTE_PARAMETERS


def load_config(path: Path | str, *, params_text: str | None = None) -> LoadedConfig:
    """Load and validate both files; raise ConfigError listing every issue.

    The parameter file in force is ``<state_dir>/params/wme.conf`` when it exists (written by remote
    configuration, ``/etc/dcud`` being read-only to dcud), else the file ``parameters`` names.
    ``params_text`` validates a candidate content for that file instead of reading it (remote config).
    """
    path = Path(path)
    issues: list[ConfigIssue] = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError.single(str(path), 0, "", f"cannot read: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError.single(str(path), 0, "", f"not UTF-8 text (byte {exc.start})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        raise ConfigError.single(str(path), line, "", f"invalid TOML: {exc}") from exc
    locator = LineLocator(text)
    toml, toml_issues = decode_table(DcudToml, data, "", str(path), locator)
    issues.extend(_name_items(toml_issues, data))

    params_path = path.parent / (toml.parameters if toml else str(data.get("parameters", "wme.conf")))
    if toml is not None and remote_parameters_path(_state_dir(path, toml)).exists():
        params_path = remote_parameters_path(_state_dir(path, toml))
    if params_text is None:
        params = _load_params(params_path, issues)
    else:
        params, param_issues = parse_parameter_text(params_text, str(params_path))
        issues.extend(param_issues)

    if toml is not None:
        issues.extend(_cross_check(toml, str(path), locator))
    if params is not None:
        issues.extend(_check_ports(params))
        from dcud.config.timekeeping import check_time_params

        issues.extend(check_time_params(params))
    if issues:
        raise ConfigError(issues)
    assert toml is not None and params is not None
    device_id = toml.device_id or _hostname_id()
    prefix_template = toml.mqtt.topic_prefix if toml.mqtt else "dcu/{device_id}"
    state_dir = _state_dir(path, toml)
    return LoadedConfig(
        path=path,
        toml=toml,
        params=params,
        device_id=device_id,
        topic_prefix=prefix_template.replace("{device_id}", device_id).rstrip("/"),
        state_dir=state_dir,
    )


def _load_params(params_path: Path, issues: list[ConfigIssue]) -> ParameterSet | None:
    try:
        params_text = params_path.read_bytes()
    except OSError as exc:
        issues.append(ConfigIssue(str(params_path), 0, "", f"cannot read parameter file: {exc.strerror}"))
        return None
    try:
        decoded = params_text.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.append(ConfigIssue(str(params_path), 0, "", f"not UTF-8 text (byte {exc.start})"))
        return None
    params, param_issues = parse_parameter_text(decoded, str(params_path))
    issues.extend(param_issues)
    return params


def _state_dir(path: Path, toml: DcudToml) -> Path:
    state_dir = Path(toml.state_dir)
    return state_dir if state_dir.is_absolute() else path.parent / state_dir


def _toml_error_line(message: str) -> int:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else 0


def _hostname_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "dcu"
    return host[:64]


def _name_items(issues: list[ConfigIssue], data: dict[str, Any]) -> list[ConfigIssue]:
    """Show array items by their ``name`` (``meter[flat-12].address``) rather than by index."""
    out = []
    for item in issues:
        key = item.key
        match = re.match(r"^(line|meter|can|drive|input)\[(\d+)\](.*)$", key)
        if match:
            array = data.get(match.group(1))
            index = int(match.group(2))
            if isinstance(array, list) and index < len(array) and isinstance(array[index], dict):
                name = array[index].get("name")
                if isinstance(name, str) and name:
                    key = f"{match.group(1)}[{name}]{match.group(3)}"
        out.append(ConfigIssue(item.path, item.line, key, item.message))
    return out


def _cross_check(toml: DcudToml, file: str, locator: LineLocator) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []

    def issue(array: str, index: int, name: str, key: str, message: str) -> None:
        line = locator.line_of(f"{array}[{index}].{key}" if key else f"{array}[{index}]")
        shown = f"{array}[{name}].{key}" if key else f"{array}[{name}]"
        issues.append(ConfigIssue(file, line, shown, message))

    named: dict[str, list[str]] = {
        "line": [x.name for x in toml.line],
        "meter": [x.name for x in toml.meter],
        "can": [x.name for x in toml.can],
        "drive": [x.name for x in toml.drive],
        "input": [x.name for x in toml.input],
    }
    for array, names in named.items():
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name in seen:
                issue(array, index, name, "name", f'duplicate {array} name "{name}"')
            seen.add(name)
    lines = {line.name: line for line in toml.line}
    cans = {can.name for can in toml.can}
    bus_names = set(lines) & cans
    for name in sorted(bus_names):
        issues.append(ConfigIssue(file, 0, f"can[{name}].name", "a [[can]] and a [[line]] share this name"))
    devices: dict[str, str] = {}
    roles: dict[str, str] = {}
    for index, line in enumerate(toml.line):
        if line.device in devices:
            issue("line", index, line.name, "device", f'device already used by line "{devices[line.device]}"')
        devices.setdefault(line.device, line.name)
        if line.transparent is not None:
            if line.transparent in roles:
                issue(
                    "line",
                    index,
                    line.name,
                    "transparent",
                    f'"{line.transparent}" is already served by line "{roles[line.transparent]}"',
                )
            roles.setdefault(line.transparent, line.name)
    for index, meter in enumerate(toml.meter):
        if meter.protocol == "dlms" or meter.host or meter.dlms is not None:
            from dcud.config.dlms import check_dlms_meter

            check_dlms_meter(meter, index, lines, Path(file).parent, issue)
            if meter.protocol == "dlms":
                continue
        line_cfg = lines.get(meter.line)
        if not meter.line:
            issue("meter", index, meter.name, "line", "required key is missing")
        elif line_cfg is None:
            issue("meter", index, meter.name, "line", f'no [[line]] named "{meter.line}"')
        elif meter.protocol == "mbus" and line_cfg.kind != "mbus":
            issue(
                "meter",
                index,
                meter.name,
                "protocol",
                f'M-Bus meter on {line_cfg.kind} line "{line_cfg.name}"',
            )
        elif meter.protocol == "iec62056-21" and line_cfg.kind == "mbus":
            issue(
                "meter", index, meter.name, "protocol", f'IEC 62056-21 meter on M-Bus line "{line_cfg.name}"'
            )
        message = _address_problem(meter.protocol, meter.address)
        if message:
            issue("meter", index, meter.name, "address", message)
    drive_addresses: dict[tuple[str, int], str] = {}
    for index, drive in enumerate(toml.drive):
        other = drive_addresses.setdefault((drive.bus, drive.node_id), drive.name)
        if other != drive.name:
            issue(
                "drive",
                index,
                drive.name,
                "node_id",
                f'node {drive.node_id} on "{drive.bus}" is also drive "{other}"',
            )
        if drive.protocol == "canopen":
            if drive.bus not in cans:
                issue("drive", index, drive.name, "bus", f'no [[can]] named "{drive.bus}"')
            elif drive.node_id > 127:
                issue("drive", index, drive.name, "node_id", "CANopen node id must be 1..127")
        elif drive.bus not in lines:
            issue("drive", index, drive.name, "bus", f'no [[line]] named "{drive.bus}"')
        elif lines[drive.bus].kind == "mbus":
            issue("drive", index, drive.name, "bus", "Modbus RTU needs an rs485 or rs232 line, not M-Bus")
    if toml.timezone:
        try:
            zoneinfo.ZoneInfo(toml.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            issues.append(
                ConfigIssue(file, locator.line_of("timezone"), "timezone", "unknown IANA time zone")
            )
    if toml.power.source == "file" and not toml.power.path:
        issues.append(
            ConfigIssue(file, locator.line_of("power"), "power.path", "required when source is file")
        )
    issues.extend(_check_levels(toml, file, locator, issue))
    if toml.config_port.listen not in ("auto", "loopback", "any"):
        try:
            ipaddress.ip_address(toml.config_port.listen)
        except ValueError:
            where = locator.line_of("config_port.listen")
            message = "expected auto, loopback, any or an IP address"
            issues.append(ConfigIssue(file, where, "config_port.listen", message))
    if toml.snmp.agent_listen:
        host, _, port = toml.snmp.agent_listen.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            valid = 1 <= int(port) <= 65535
        except ValueError:
            valid = False
        if not valid:
            where = locator.line_of("snmp.agent_listen")
            message = 'expected "<IPv4>:<port>" or "[<IPv6>]:<port>", port 1..65535'
            issues.append(ConfigIssue(file, where, "snmp.agent_listen", message))
    if toml.remote.reboot == "command" and not (
        toml.remote.reboot_command and Path(toml.remote.reboot_command[0]).is_absolute()
    ):
        where = locator.line_of("remote.reboot_command")
        message = 'reboot = "command" needs reboot_command = ["/absolute/program", "arg"...]'
        issues.append(ConfigIssue(file, where, "remote.reboot_command", message))
    if toml.mqtt is not None:
        from dcud.config.mqtt_url import MqttUrlError, parse_mqtt_url

        try:
            parse_mqtt_url(toml.mqtt.url)
        except MqttUrlError as exc:
            issues.append(ConfigIssue(file, locator.line_of("mqtt.url"), "mqtt.url", str(exc)))
    return issues


def _check_levels(
    toml: DcudToml, file: str, locator: LineLocator, issue: Callable[[str, int, str, str, str], None]
) -> list[ConfigIssue]:
    """``[[input]]`` and ``[relay]``: a file source needs its path; one GPIO line has one user."""
    issues: list[ConfigIssue] = []
    lines_used: dict[tuple[str, int], str] = {}
    if toml.power.source == "gpio":
        lines_used[(toml.power.chip, toml.power.gpio_line)] = "[power]"
    for index, item in enumerate(toml.input):
        if item.source == "file" and not item.path:
            issue("input", index, item.name, "path", "required when source is file")
        elif item.source == "gpio":
            key = (item.chip, item.gpio_line)
            if key in lines_used:
                issue(
                    "input",
                    index,
                    item.name,
                    "gpio_line",
                    f"line {item.gpio_line} of {item.chip} is also {lines_used[key]}",
                )
            lines_used.setdefault(key, f"input {item.name}")
    relay = toml.relay
    if relay.source == "file" and not relay.path:
        issues.append(
            ConfigIssue(file, locator.line_of("relay.path"), "relay.path", "required when source is file")
        )
    elif relay.source == "gpio" and (relay.chip, relay.gpio_line) in lines_used:
        where = locator.line_of("relay.gpio_line")
        message = (
            f"line {relay.gpio_line} of {relay.chip} is also {lines_used[(relay.chip, relay.gpio_line)]}"
        )
        issues.append(ConfigIssue(file, where, "relay.gpio_line", message))
    return issues


def _address_problem(protocol: str, address: str) -> str:
    if protocol == "mbus":
        if address.isdigit() and len(address) <= 3:
            return "" if int(address) <= 250 else "M-Bus primary address must be 0..250"
        if _MBUS_SECONDARY.match(address):
            return ""
        return "expected an M-Bus primary address 0..250 or an 8-digit secondary address"
    if not _IEC_ADDRESS.match(address):
        return "IEC 62056-21 address: up to 32 characters of 0-9, A-Z, a-z and space"
    return ""


def _check_ports(params: ParameterSet) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    seen: dict[int, str] = {}
    for name in LISTEN_PORT_PARAMS:
        port = params.get_opt_int(name)
        if port is None or port == 0:
            continue
        if port in seen:
            issues.append(
                ConfigIssue(params.path, params.lines.get(name, 0), name, f"port {port} is also {seen[port]}")
            )
        seen.setdefault(port, name)
    return issues
