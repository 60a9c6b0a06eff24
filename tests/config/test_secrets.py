"""Secrets: ``snmp_user`` (the v2c community) is masked on every path that shows parameters, the log
masker looks into nested values, and no trap goes out with a default community.

The end-to-end test runs ``python -m dcud run`` against a real Mosquitto, reads the parameters over MQTT
(``cmd/param/get``) and the config port (``GET /config`` with curl), and receives the traps itself on a
UDP socket (a v2c trap carries its community in clear, which proves what was sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog

from dcud import log as dcud_log
from dcud.config.loader import load_config
from dcud.config.wme import CATALOGUE, ParameterSet, parse_parameter_text
from dcud.service.remote_config import changed_parameters, mask_parameter_text
from dcud.service.snmp import SnmpServiceConfig
from dcud.sim.peers import Mosquitto, free_port, wait_for_tcp

from helpers.alarm import EventSubscriber, UdpSink, power_toml, set_power
from helpers.daemon import daemon_log, run_dcud, start_daemon, write_site
from helpers.notify import NotifySocket

PREFIX = "dcu/dcu-test"
COMMUNITY = "c0mm-Xy7-secret"


# -- the catalogue and the views built on it ----------------------------------------------------------


def _params(text: str) -> ParameterSet:
    params, issues = parse_parameter_text(text, "wme.conf")
    assert not issues, issues
    return params


def test_snmp_user_is_a_secret_parameter_without_default() -> None:
    param = CATALOGUE["snmp_user"]
    assert param.secret and param.default is None
    params = _params(f"snmp_user={COMMUNITY}\n")
    assert params.masked()["snmp_user"] == "***"
    assert params.get("snmp_user") == COMMUNITY  # the service still gets the real value
    text = f"# file\nsnmp_version=2\nsnmp_user={COMMUNITY}\n"
    assert mask_parameter_text(text) == "# file\nsnmp_version=2\nsnmp_user=***\n"
    changed = changed_parameters(_params("snmp_user=old-community\n"), params)
    assert changed == {"snmp_user": {"old": "***", "new": "***"}}


def test_a_bad_snmp_user_is_reported_without_its_value() -> None:
    too_long = "x" * 20 + COMMUNITY  # 35 characters: more than 32
    _, issues = parse_parameter_text(f"snmp_user={too_long}\n", "wme.conf")
    assert [(i.line, i.key) for i in issues] == [(1, "snmp_user")]
    assert too_long not in str(issues[0]) and "value not shown" in str(issues[0])


def test_dcud_params_masks_snmp_user(tmp_path: Path) -> None:
    config = write_site(tmp_path / "site", wme=f"snmp_user={COMMUNITY}\n")
    for extra in ([], ["--json"]):
        result = run_dcud("params", "-c", str(config), *extra)
        assert result.returncode == 0, result.stderr
        assert COMMUNITY not in result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["snmp_user"]["value"] == "***" and rows["snmp_user"]["secret"] is True


# -- no default community ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_no_snmp_user_means_no_traps_and_one_warning(tmp_path: Path, version: int) -> None:
    wme = f"snmp_trap=1\nsnmp_manager_ip=192.0.2.7\nsnmp_version={version}\n"
    config = load_config(write_site(tmp_path / "site", wme=wme))
    with structlog.testing.capture_logs() as logs:
        assert SnmpServiceConfig.from_config(config) is None
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert "snmp_user is not set" in logs[0]["event"] and "public" in logs[0]["event"]
    with_user = load_config(write_site(tmp_path / "b", wme=wme + f"snmp_user={COMMUNITY}\n"))
    slice_ = SnmpServiceConfig.from_config(with_user)
    assert slice_ is not None and slice_.community == slice_.user == COMMUNITY
    assert COMMUNITY not in repr(slice_)


# -- the log masker ---------------------------------------------------------------------------------


def test_masker_looks_into_nested_values_and_knows_secret_names() -> None:
    event = {
        "event": "connecting to mqtts://dcu:br0ker-pw@broker.example:8883/x",
        "community": COMMUNITY,
        "snmp_user": COMMUNITY,
        "changed": {"snmp_user": {"old": "a", "new": COMMUNITY}, "ntp_interval": {"old": "1", "new": "2"}},
        "payload": {"items": [{"auth": {"password": "pw1"}}, ("x", {"fw_server_key": "k" * 64})]},
        "request": {"set": {"ei_client_pass": "pw2", "com.sim_pin_code": "1234"}},
        "headers": [{"Authorization": "Bearer tok"}, {"apiKey": "ak"}, {"block_cipher_key": "00"}],
        "datapush_host": "ftp://user:pw3@10.0.0.9/in",
        "names": {"community", "ntp_interval"},
    }
    original = json.dumps(event, default=sorted)
    out = dcud_log._mask_secrets(None, "info", dict(event))
    rendered = json.dumps(out, default=sorted)
    for secret in (COMMUNITY, "br0ker-pw", "pw1", "pw2", "pw3", "1234", "k" * 64, "Bearer", '"ak"'):
        assert secret not in rendered, secret
    assert out["event"] == "connecting to mqtts://dcu:***@broker.example:8883/x"
    assert out["changed"]["snmp_user"] == "***"
    assert out["changed"]["ntp_interval"] == {"old": "1", "new": "2"}
    assert out["datapush_host"] == "ftp://user:***@10.0.0.9/in"  # a URL parameter: only the password
    assert json.dumps(event, default=sorted) == original  # the caller's objects are not touched


@pytest.mark.parametrize(
    "key", ["ping_ms", "com_ping_host", "key", "keepalive_s", "key_file", "spinning", "bypass", "user_set"]
)
def test_masker_leaves_lookalike_keys_alone(key: str) -> None:
    assert not dcud_log.is_secret_key(key)
    assert dcud_log._mask_secrets(None, "info", {key: "visible"})[key] == "visible"


@pytest.mark.parametrize(
    "key",
    ["community", "snmp_user", "SNMP_USER", "auth_key", "authKey", "API_KEY", "pin", "passphrase", "tokens"],
)
def test_masker_hides_secret_keys(key: str) -> None:
    assert dcud_log.is_secret_key(key)
    assert dcud_log._mask_secrets(None, "info", {key: "hidden"})[key] == "***"
    for harmless in (None, "", True):
        assert dcud_log._mask_secrets(None, "info", {key: harmless})[key] == harmless


def test_masker_survives_hostile_nesting() -> None:
    deep: Any = {"password": "pw"}
    for _ in range(100_000):  # deeper than any recursion limit
        deep = [deep]
    out = dcud_log._mask_secrets(None, "info", {"request": deep})
    depth, node = 0, out["request"]
    while isinstance(node, list):
        node, depth = node[0], depth + 1
    assert node == "<too deep>" and depth < dcud_log.MAX_DEPTH
    json.dumps(out)  # renders


@pytest.fixture
def configured_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for handler in handlers:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()


def test_rendered_log_lines_carry_no_secret(
    configured_logging: None, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    dcud_log.setup_logging("info", json=True)
    logger = structlog.get_logger("dcud.test")
    logger.warning("trap config", community=COMMUNITY, changed={"snmp_user": {"new": COMMUNITY}})
    try:
        raise ValueError("cannot reach mqtt://u:exc-pw@host:1883")
    except ValueError:
        logger.exception("failed")
    logging.getLogger("aiomqtt").warning("reconnecting to %s", "mqtts://u:lib-pw@host")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and json.loads(lines[0])["community"] == "***"
    for secret in (COMMUNITY, "exc-pw"):
        assert secret not in err, secret
    assert "mqtt://u:***@host:1883" in err  # the traceback text is cleaned too
    # Library records (stdlib logging) go through every root handler, pytest's capture among them.
    assert "lib-pw" not in caplog.text and "reconnecting to mqtts://u:***@host" in caplog.text


# -- end to end: the daemon, Mosquitto, curl, a UDP trap sink ------------------------------------------


async def _command(port: int, verb: str, request: dict[str, Any]) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"cmd-{time.monotonic_ns()}") as client:
        await client.subscribe(f"{PREFIX}/cmd/{verb}/reply", qos=1)
        await client.publish(f"{PREFIX}/cmd/{verb}", json.dumps(request), qos=1)
        async with asyncio.timeout(20):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return dict(json.loads(message.payload))
    raise AssertionError("unreachable")


def _curl(url: str) -> tuple[int, str]:
    binary = shutil.which("curl")
    if binary is None:
        pytest.fail("curl is not installed: apt-get install curl")
    out = subprocess.run(
        [binary, "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code or "0"), body


@pytest.mark.slow
@pytest.mark.parametrize("community", [COMMUNITY, None])
async def test_daemon_masks_the_community_and_sends_no_default_one(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket, community: str | None
) -> None:
    sink = UdpSink()  # the "manager": a v2c trap carries its community in clear
    power_file = tmp_path / "online"
    set_power(power_file, True)
    config_port = free_port()
    wme = (
        f"snmp_trap=1\nsnmp_manager_ip=127.0.0.1\nsnmp_manager_port={sink.port}\nsnmp_version=2\n"
        f"fw_server_port={config_port}\n" + (f"snmp_user={community}\n" if community else "")
    )
    toml = power_toml(power_file) + '\n[config_port]\nlisten = "loopback"\n'
    config = write_site(tmp_path / "site", mqtt_url=broker.url, wme=wme, toml_extra=toml)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1", 60)
        await asyncio.to_thread(wait_for_tcp, config_port, 20)
        async with EventSubscriber(broker.port) as sub:
            await sub.wait_state("power", lambda s: s["state"] == "ok")
            set_power(power_file, False)
            await sub.wait_event("power_loss", timeout_s=20)
            # The trap is handed to the kernel synchronously before the event reaches MQTT, and
            # loopback delivers at sendto(): whatever was sent is in the sink's queue by now.
            sink.sock.setblocking(False)
            datagrams = []
            with contextlib.suppress(BlockingIOError):
                for _ in range(10):
                    datagrams.append(sink.sock.recv(4096))
            if community is None:
                assert datagrams == []
                assert "snmp_user is not set" in daemon_log(config)
                assert "snmp" not in sub.states
            else:
                assert len(datagrams) == 1 and community.encode() in datagrams[0]
                state = await sub.wait_state("snmp", lambda s: s["sent"] >= 1)
                assert state["user_set"] is True and community not in json.dumps(state)
        reply = await _command(broker.port, "param/get", {"id": 1, "names": ["snmp_user", "snmp_version"]})
        assert reply["ok"], reply
        assert reply["result"]["values"] == {"snmp_user": "***" if community else "", "snmp_version": "2"}
        code, body = await asyncio.to_thread(_curl, f"http://127.0.0.1:{config_port}/config")
        assert code == 200 and "snmp_version=2" in body
        if community:
            assert "snmp_user=***" in body and community not in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, daemon_log(config)
        if community:
            assert community not in daemon_log(config)
    finally:
        proc.kill()
        proc.wait()
        sink.close()
