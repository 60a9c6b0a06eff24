"""A feature's modules are imported only where dcud.toml/wme.conf configure the feature (issue 17).

``dcud run`` starts as a process (NOTIFY_SOCKET, exactly as systemd runs it) under a probe: a thread
blocked on stdin that prints ``sys.modules`` when asked. After ``READY=1`` (every service started, so
what a service imports when it starts is counted too) the test asks, then stops the daemon.

- the minimal configuration (no MQTT, no line, the config port off) imports none of the features;
- each feature configured alone imports its own modules (so the absence above is not vacuous) and
  none of the other features' modules.

The RSS each feature adds is measured by bench/bench_footprint.py (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dcud.sim.peers import free_port

from helpers import REPO
from helpers.daemon import daemon_log, write_site
from helpers.notify import NotifySocket
from helpers.pty import PtyPeer

pytestmark = pytest.mark.slow

PROBE = r"""
import json, sys, threading
def _answer():
    for _ in sys.stdin:
        sys.stdout.write(json.dumps(sorted(sys.modules)) + "\n")
        sys.stdout.flush()
threading.Thread(target=_answer, daemon=True).start()
from dcud.__main__ import main
sys.exit(main(sys.argv[1:]))
"""

MQTT = {"aiomqtt", "paho", "dcud.service.mqtt"}
SNMP = {"pysnmp", "pyasn1", "dcud.service.snmp", "dcud.service.snmp_mib"}
AGENT = {"dcud.service.snmp_agent"}
CONFIG_PORT = {"h11", "dcud.service.config_port", "dcud.service.firmware"}
SERIAL = {"serial", "serial_asyncio", "dcud.transport.serial"}
METERS = {"dcud.service.polling", "dcud.codec.iec62056", "dcud.codec.mbus"}
CAN = {"can", "dcud.transport.can", "dcud.codec.canopen", "dcud.service.drives"}
MODBUS = {"dcud.service.drive_modbus", "dcud.codec.modbus_rtu"}
FTP = {"aioftp", "dcud.service.ftp_push"}
INPUTS = {"dcud.service.inputs"}
OUTPUTS = {"dcud.service.outputs"}
BRIDGE = {"dcud.service.bridge", "dcud.service.ei_client", "dcud.codec.iec_sniffer"}
CRYPTO = {"cryptography"}
"""Envelopes, TLS certificate banks, SNMPv3 (through pysnmp), DLMS ciphering."""
DLMS = {"dcud.codec.dlms", "dcud.service.dlms_meter", "dcud.service.dlms_state"}
NEVER = {"dcud.sim", "dcud.demo", "dcud.cli_meters", "dcud.cli_decode_dlms", "pymodbus", "canopen"}
"""Simulators, CLI tools and libraries only the simulators use: never in the daemon."""

FEATURES = [
    MQTT,
    SNMP,
    AGENT,
    CONFIG_PORT,
    SERIAL,
    METERS,
    CAN,
    MODBUS,
    FTP,
    INPUTS,
    OUTPUTS,
    BRIDGE,
    CRYPTO,
    DLMS,
]
EVERY_FEATURE = set().union(*FEATURES)

MINIMAL_TOML = "\n[config_port]\nenabled = false\n"


def imported(modules: set[str], name: str) -> bool:
    """Whether ``name`` or a submodule of it is in ``modules``."""
    return name in modules or any(m.startswith(name + ".") for m in modules)


def daemon_modules(config: Path, notify: NotifySocket) -> set[str]:
    """``sys.modules`` of ``dcud run -c config`` once it has sent READY=1."""
    with (config.parent / "dcud.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, "run", "-c", str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
            text=True,
        )
    try:
        notify.wait_for("READY=1", timeout_s=60)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("modules\n")
        proc.stdin.flush()
        return set(json.loads(proc.stdout.readline()))
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=30) == 0, daemon_log(config)
        finally:
            proc.kill()


@dataclass
class Feature:
    """A configuration of one feature and what it must (and must not) import."""

    toml: Callable[[Path], str] = lambda _tmp: ""
    wme: Callable[[], str] = lambda: ""
    imports: set[str] = field(default_factory=set)
    also: set[str] = field(default_factory=set)
    """Modules of another group this feature may import (shared code), beyond ``imports``."""
    config_port: bool = False
    """Leave the config port on (its default) instead of turning it off as the minimal site does."""


@contextlib.contextmanager
def ptys(count: int) -> Iterator[list[PtyPeer]]:
    peers = [PtyPeer() for _ in range(count)]
    try:
        yield peers
    finally:
        for peer in peers:
            peer.close()


def line_toml(path: str, transparent: str = "") -> str:
    extra = f'transparent = "{transparent}"\n' if transparent else ""
    return f'\n[[line]]\nname = "rs485-1"\ndevice = "{path}"\nkind = "rs485"\n{extra}'


FEATURE_CASES: dict[str, Callable[[list[PtyPeer]], Feature]] = {
    "mqtt": lambda _p: Feature(
        toml=lambda _t: f'\n[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n',  # nobody there: it retries
        imports=MQTT,
    ),
    "snmp_traps": lambda _p: Feature(
        wme=lambda: (
            f"snmp_trap=1\nsnmp_manager_ip=127.0.0.1\nsnmp_manager_port={free_port()}\n"
            "snmp_version=2\nsnmp_user=test-community\n"
        ),
        imports=SNMP,
        also=CRYPTO,  # pysnmp imports it for SNMPv3 privacy, also when v2c is configured
    ),
    "snmp_agent": lambda _p: Feature(
        toml=lambda _t: f'\n[snmp]\nagent_listen = "127.0.0.1:{free_port()}"\nagent_community = "test"\n',
        imports=AGENT | {"pysnmp"},
        also=SNMP | CRYPTO,
    ),
    "config_port": lambda _p: Feature(
        wme=lambda: f"fw_server_port={free_port()}\n", imports=CONFIG_PORT, config_port=True
    ),
    "meters": lambda p: Feature(
        toml=lambda _t: (
            line_toml(p[0].path)
            + '\n[[meter]]\nname = "flat-1"\nline = "rs485-1"\nprotocol = "iec62056-21"\naddress = "1"\n'
        ),
        imports=SERIAL | METERS,
    ),
    "dlms_meter": lambda p: Feature(
        toml=lambda _t: (
            line_toml(p[0].path)
            + '\n[[meter]]\nname = "em-1"\nline = "rs485-1"\nprotocol = "dlms"\naddress = "17"\n'
            '[meter.dlms]\nobjects = ["1.0.1.8.0.255"]\n'
        ),
        imports={"dcud.codec.dlms", "dcud.service.dlms_meter"} | SERIAL,  # no security: no cryptography
        also=METERS | DLMS,
    ),
    "can_drives": lambda _p: Feature(
        toml=lambda t: (
            f'\n[[can]]\nname = "can0"\ninterface = "virtual"\nchannel = "{t.name}"\n'
            '\n[[drive]]\nname = "axis-1"\nbus = "can0"\nprotocol = "canopen"\nnode_id = 1\n'
        ),
        imports=CAN,
        also={"serial"},  # python-can's slcan interface uses pyserial
    ),
    "modbus_drive": lambda p: Feature(
        toml=lambda _t: (
            line_toml(p[0].path)
            + '\n[[drive]]\nname = "conveyor"\nbus = "rs485-1"\nprotocol = "modbus-rtu"\nnode_id = 1\n'
            "[drive.registers]\nstatus = 0\ncontrol = 1\n"
        ),
        imports=MODBUS | SERIAL,
        also=METERS,  # a line brings the meter poller (line scans, cmd/read)
    ),
    "ftp_push": lambda _p: Feature(
        wme=lambda: f"datapush_host=ftp://user:pw@127.0.0.1:{free_port()}/push\ndatapush_periodic=15\n",
        imports=FTP,
    ),
    "inputs": lambda _p: Feature(
        toml=lambda t: f'\n[[input]]\nname = "door"\nsource = "file"\npath = "{t / "door"}"\n',
        imports=INPUTS,
    ),
    "relay": lambda _p: Feature(
        toml=lambda t: f'\n[relay]\nsource = "file"\npath = "{t / "relay"}"\n',
        imports=OUTPUTS,
    ),
    "leds": lambda _p: Feature(toml=lambda t: f'\n[leds]\nroot = "{t / "leds"}"\n', imports=OUTPUTS),
    "transparent_port": lambda p: Feature(
        toml=lambda _t: line_toml(p[0].path, "primary"),
        wme=lambda: f"tm_server_port={free_port()}\n",
        imports=BRIDGE | SERIAL | CRYPTO,  # TLS is on by default (tm.tls_enable=1): a certificate bank
        also=METERS,
    ),
}


def test_minimal_daemon_imports_no_feature(tmp_path: Path, notify_socket: NotifySocket) -> None:
    config = write_site(tmp_path / "site", toml_extra=MINIMAL_TOML, wme="")
    modules = daemon_modules(config, notify_socket)
    assert imported(modules, "dcud.service.ntp") and imported(
        modules, "dcud.service.outbox"
    )  # the probe works
    assert sorted(name for name in EVERY_FEATURE | NEVER if imported(modules, name)) == []


@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_a_feature_imports_its_modules_and_no_other_features(
    name: str, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    with ptys(1) as peers:
        feature = FEATURE_CASES[name](peers)
        site = tmp_path / "site"
        site.mkdir()
        (site / "door").write_text("0\n")
        (site / "relay").write_text("0\n")
        base = "" if feature.config_port else MINIMAL_TOML
        config = write_site(site, toml_extra=base + feature.toml(site), wme=feature.wme())
        modules = daemon_modules(config, notify_socket)
    missing = sorted(m for m in feature.imports if not imported(modules, m))
    assert missing == [], f"{name} is configured but does not import {missing}"
    foreign = EVERY_FEATURE - feature.imports - feature.also
    assert sorted(m for m in foreign | NEVER if imported(modules, m)) == []


@pytest.mark.parametrize("ciphered", [False, True])
def test_the_dlms_codec_imports_cryptography_only_to_cipher(ciphered: bool) -> None:
    """A DLMS meter without security costs the codec, not cryptography (about 9 MB, docs/benchmarks.md)."""
    script = (
        "import sys\n"
        "from dcud.codec.dlms import client, cosem, hdlc_link, security, wrapper\n"
        "keys = security.Keys(bytes(16), bytes(16))\n"
        + (
            "security.gmac(security_control=0x10, system_title=bytes(8), invocation_counter=1, keys=keys, "
            "challenge=b'x')\n"
            if ciphered
            else ""
        )
        + "print('cryptography' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == str(ciphered)
