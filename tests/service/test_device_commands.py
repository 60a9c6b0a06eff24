"""``cmd/restart`` and ``cmd/reboot`` (issue 16): authorisation like ``param/set``, the reply before
the stop, exit 75, a reboot stand-in called exactly once, logind through busctl.

Never reboots this machine: the daemon tests use ``reboot = "command"`` with a stand-in script that
records its call, or ``reboot = "logind"`` on a private D-Bus (checked to be the one busctl talks
to before the daemon starts); the logind unit tests use a fake ``busctl`` script.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import LoadedConfig, load_config
from dcud.errors import ConfigError
from dcud.service.commands import CommandRouter, envelope_context
from dcud.service.crypto_envelope import EnvelopeKeys, seal
from dcud.service.device_commands import (
    CommandReboot,
    LogindReboot,
    RebootFailedError,
    RebootMethod,
    RebootRefusedError,
    register_device_commands,
)
from dcud.service.remote_config import EnvelopeSealing
from dcud.sim.peers import Mosquitto

from helpers.commands import Commander
from helpers.daemon import daemon_log, start_daemon, stop_daemon, write_site
from helpers.notify import NotifySocket

KEY = "5a" * 32
KEYS = EnvelopeKeys.from_parameter(KEY)
_ids = itertools.count(1)


class StandIn:
    """A reboot method that records calls instead of rebooting."""

    name = "stand-in"

    def __init__(self, answer: str = "yes", fail: bool = False) -> None:
        self.answer = answer
        self.fail = fail
        self.checks = 0
        self.reboots = 0

    async def check(self) -> str:
        self.checks += 1
        if self.answer != "yes":
            raise RebootRefusedError(f"stand-in says {self.answer}")
        return "yes"

    async def reboot(self) -> None:
        self.reboots += 1
        if self.fail:
            raise RebootFailedError("stand-in failed")


class _Current:
    def __init__(self, config: LoadedConfig) -> None:
        self.current = config


class Harness:
    def __init__(
        self, tmp_path: Path, *, wme: str = "", toml: str = "", stand_in: StandIn | None = None
    ) -> None:
        self.config = load_config(
            write_site(tmp_path / "site", wme=wme or "ntp_interval=600\n", toml_extra=toml)
        )
        self.router = CommandRouter()
        self.router.set_sealing(EnvelopeSealing(_Current(self.config)))  # type: ignore[arg-type]
        self.restarts: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.stand_in = stand_in or StandIn()
        self.log: list[str] = []

        async def event(event_type: str, text: str, **_fields: Any) -> None:
            self.events.append((event_type, text))

        def method(_config: LoadedConfig) -> RebootMethod:
            return self.stand_in

        def restart(reason: str) -> None:
            self.log.append("restart")
            self.restarts.append(reason)

        register_device_commands(self.router, lambda: self.config, restart, event, reboot_method=method)

    async def send(
        self, verb: str, request: dict[str, Any] | None = None, *, fail_send: bool = False
    ) -> dict[str, Any]:
        """Serve one request like the MQTT service; the reply is "published" to self.log."""
        body = {"id": next(_ids), **(request or {})}
        replies: list[dict[str, Any]] = []

        async def send(reply: bytes) -> None:
            if fail_send:
                raise ConnectionError("broker gone")
            self.log.append("reply")
            replies.append(json.loads(reply))

        await self.router.serve(verb, json.dumps(body).encode(), send)
        return replies[0]

    def sealed(self, verb: str, inner: dict[str, Any]) -> dict[str, Any]:
        envelope = seal(KEYS, json.dumps(inner).encode(), envelope_context(verb), device_id="dcu-test")
        return {"envelope": base64.b64encode(envelope).decode()}


PLAIN = "\n[remote]\nplain_param_set = true\n"


# -- authorisation and order (the router and the handlers, no process) ---------------------------


async def test_plain_restart_is_refused_by_default_and_nothing_happens(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    reply = await h.send("restart")
    assert not reply["ok"] and reply["error"]["type"] == "NotAuthorizedError"
    assert "plain_param_set" in reply["error"]["message"]
    assert h.restarts == []


async def test_plain_restart_with_the_opt_in_replies_first_then_restarts(tmp_path: Path) -> None:
    h = Harness(tmp_path, toml=PLAIN)
    reply = await h.send("restart", {"who": "hes-7"})
    assert reply["ok"] and reply["result"] == {"restart": "after this reply", "exit_code": 75, "who": "hes-7"}
    assert h.log == ["reply", "restart"]  # the reply is out before the stop begins
    assert h.restarts == ["restart requested by hes-7 via mqtt cmd/restart"]


async def test_a_reply_that_is_not_delivered_starts_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path, toml=PLAIN)
    with pytest.raises(ConnectionError):
        await h.send("restart", fail_send=True)
    assert h.restarts == []


async def test_with_a_key_plain_is_refused_even_with_the_opt_in_and_an_envelope_works(tmp_path: Path) -> None:
    h = Harness(tmp_path, wme=f"fw_server_key={KEY}\nemp_reboot=1\n", toml=PLAIN)
    for verb in ("restart", "reboot"):
        reply = await h.send(verb)
        assert not reply["ok"] and reply["error"]["type"] == "NotAuthorizedError", reply
        assert reply["error"]["field"] == "$.envelope"
    assert h.restarts == [] and h.stand_in.reboots == 0
    # An envelope sealed for another verb does not open here.
    reply = await h.send("restart", h.sealed("reboot", {}))
    assert not reply["ok"] and reply["error"]["type"] == "EnvelopeAuthError", reply
    reply = await h.send("restart", h.sealed("restart", {"who": "hes"}))
    assert reply["ok"], reply
    assert h.restarts == ["restart requested by hes via mqtt cmd/restart"]
    reply = await h.send("reboot", h.sealed("reboot", {}))
    assert reply["ok"] and reply["result"]["method"] == "stand-in", reply
    assert h.stand_in.reboots == 1


async def test_reboot_needs_emp_reboot_and_a_permitted_method(tmp_path: Path) -> None:
    h = Harness(tmp_path, toml=PLAIN)  # emp_reboot defaults to 0
    reply = await h.send("reboot")
    assert not reply["ok"] and reply["error"]["type"] == "RebootRefusedError"
    assert "emp_reboot=0" in reply["error"]["message"]
    assert h.stand_in.checks == 0
    refused = Harness(tmp_path / "b", wme="emp_reboot=1\n", toml=PLAIN, stand_in=StandIn("challenge"))
    reply = await refused.send("reboot")
    assert not reply["ok"] and reply["error"]["type"] == "RebootRefusedError"
    assert reply["error"]["message"] == "stand-in says challenge"
    assert refused.stand_in.reboots == 0


async def test_reboot_stand_in_runs_exactly_once_after_the_reply_even_if_repeated(tmp_path: Path) -> None:
    h = Harness(tmp_path, wme="emp_reboot=1\n", toml=PLAIN)
    body = json.dumps({"id": "r-1", "who": "noc"}).encode()
    replies: list[bytes] = []

    async def send(reply: bytes) -> None:
        assert h.stand_in.reboots == len(replies)  # never before the (first) reply
        replies.append(reply)

    await h.router.serve("reboot", body, send)
    await h.router.serve("reboot", body, send)  # a repeat (the head-end missed the reply)
    assert replies[0] == replies[1]
    assert json.loads(replies[0])["result"] == {
        "reboot": "after this reply",
        "method": "stand-in",
        "check": "yes",
        "who": "noc",
    }
    assert h.stand_in.reboots == 1


async def test_a_reboot_that_fails_after_its_reply_raises_an_event(tmp_path: Path) -> None:
    h = Harness(tmp_path, wme="emp_reboot=1\n", toml=PLAIN, stand_in=StandIn(fail=True))
    reply = await h.send("reboot", {"who": "noc"})
    assert reply["ok"]
    assert h.events == [("reboot_failed", "reboot requested by noc failed: stand-in failed")]


def test_reboot_command_needs_an_absolute_program(tmp_path: Path) -> None:
    site = write_site(tmp_path / "s", toml_extra='\n[remote]\nreboot = "command"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    assert "remote.reboot_command" in str(caught.value)
    site = write_site(
        tmp_path / "t", toml_extra='\n[remote]\nreboot = "command"\nreboot_command = ["reboot"]\n'
    )
    with pytest.raises(ConfigError):
        load_config(site)


# -- the methods -----------------------------------------------------------------------------------


def fake_busctl(
    tmp_path: Path, can_reboot: str, reboot_status: int = 0, hang: bool = False
) -> tuple[Path, Path]:
    """A ``busctl`` stand-in: records its arguments, answers CanReboot like busctl does."""
    calls = tmp_path / "busctl-calls"
    script = tmp_path / "busctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{calls}"\n'
        'case "$*" in\n'
        f"  *CanReboot*) {'exec sleep 30' if hang else ''}\n"
        f"    echo 's \"{can_reboot}\"' ;;\n"
        f'  *Reboot*) echo "Call failed: Access denied" >&2; exit {reboot_status} ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    return script, calls


async def test_logind_method_asks_canreboot_then_calls_reboot_false(tmp_path: Path) -> None:
    busctl, calls = fake_busctl(tmp_path, "yes")
    method = LogindReboot(10.0, busctl=str(busctl))
    assert await method.check() == "yes"
    await method.reboot()
    manager = "org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager"
    assert calls.read_text().splitlines() == [
        f"call --system --timeout=9 {manager} CanReboot",
        f"call --system --timeout=9 {manager} Reboot b false",
    ]


@pytest.mark.parametrize("answer", ["challenge", "no", "na"])
async def test_logind_method_refuses_anything_but_yes(tmp_path: Path, answer: str) -> None:
    busctl, calls = fake_busctl(tmp_path, answer)
    with pytest.raises(RebootRefusedError, match=f"CanReboot answered '{answer}'"):
        await LogindReboot(10.0, busctl=str(busctl)).check()
    assert "Reboot b false" not in calls.read_text()


async def test_logind_method_failures_are_typed(tmp_path: Path) -> None:
    busctl, _calls = fake_busctl(tmp_path, "yes", reboot_status=1)
    with pytest.raises(RebootFailedError, match="Access denied"):
        await LogindReboot(10.0, busctl=str(busctl)).reboot()
    with pytest.raises(RebootRefusedError, match="cannot run"):
        await LogindReboot(10.0, busctl=str(tmp_path / "missing")).check()
    (tmp_path / "hung").mkdir()
    hung, _ = fake_busctl(tmp_path / "hung", "yes", hang=True)
    with pytest.raises(RebootRefusedError, match="did not finish within 1 s"):
        await LogindReboot(1.0, busctl=str(hung)).check()


async def test_command_method(tmp_path: Path) -> None:
    with pytest.raises(RebootRefusedError, match="not an executable"):
        await CommandReboot([str(tmp_path / "nothing")], 5.0).check()
    script = tmp_path / "fails"
    script.write_text("#!/bin/sh\necho no way >&2\nexit 3\n")
    script.chmod(0o755)
    method = CommandReboot([str(script)], 5.0)
    assert await method.check() == "executable"
    with pytest.raises(RebootFailedError, match="exited with status 3: no way"):
        await method.reboot()


# -- the daemon through a real broker --------------------------------------------------------------


def _stand_in_script(tmp_path: Path) -> tuple[Path, Path]:
    calls = tmp_path / "reboot-calls"
    script = tmp_path / "reboot-stand-in"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    script.chmod(0o755)
    return script, calls


@pytest.mark.slow
def test_daemon_restart_and_reboot_without_key(
    tmp_path: Path, broker: Mosquitto, commander: Commander, notify_socket: NotifySocket
) -> None:
    script, calls = _stand_in_script(tmp_path)
    # Default dcud.toml: plain state-changing commands are refused, the daemon keeps running.
    config = write_site(tmp_path / "off", mqtt_url=broker.url, wme="emp_reboot=1\n")
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        commander.wait_serving()
        for verb in ("restart", "reboot"):
            reply = commander.request(verb)
            assert not reply["ok"] and reply["error"]["type"] == "NotAuthorizedError", reply
        assert commander.request("ping")["ok"] and proc.poll() is None
    finally:
        stop_daemon(proc)
    assert proc.returncode == 0

    # With the opt-in: the reboot stand-in runs once; reboot = "none" style refusals are clean.
    toml = f'[remote]\nplain_param_set = true\nreboot = "command"\nreboot_command = ["{script}", "now"]\n'
    config = write_site(tmp_path / "on", mqtt_url=broker.url, wme="emp_reboot=1\n", toml_extra=toml)
    proc = start_daemon(config, notify_socket)
    try:
        commander.wait_serving()
        reply = commander.request("reboot", {"who": "noc"})
        assert reply["ok"] and reply["result"]["method"] == "command", reply
        _wait(lambda: calls.exists() and calls.read_text() == "now\n", "the stand-in was not called")
        assert commander.request("param/set", {"set": {"emp_reboot": "0"}})["ok"]
        reply = commander.request("reboot")
        assert not reply["ok"] and reply["error"]["type"] == "RebootRefusedError", reply
        assert calls.read_text() == "now\n"  # exactly once
        # restart: the reply arrives, then the process stops cleanly with 75.
        reply = commander.request("restart", {"who": "hes"})
        assert reply["ok"] and reply["result"]["exit_code"] == 75, reply
        assert proc.wait(timeout=30) == 75, daemon_log(config)[-3000:]
    finally:
        stop_daemon(proc)
    log = daemon_log(config)
    assert "restarting on request" in log and "internal" not in log


@pytest.mark.slow
def test_daemon_restart_with_a_key_needs_an_envelope(
    tmp_path: Path, broker: Mosquitto, commander: Commander, notify_socket: NotifySocket
) -> None:
    config = write_site(
        tmp_path / "site", mqtt_url=broker.url, wme=f"fw_server_key={KEY}\n", toml_extra=PLAIN
    )
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        commander.wait_serving()
        reply = commander.request("restart")
        assert not reply["ok"] and reply["error"]["type"] == "NotAuthorizedError", reply
        assert proc.poll() is None
        envelope = seal(KEYS, b'{"who": "hes"}', envelope_context("restart"), device_id="dcu-test")
        reply = commander.request("restart", {"envelope": base64.b64encode(envelope).decode()})
        assert reply["ok"], reply
        assert proc.wait(timeout=30) == 75, daemon_log(config)[-3000:]
    finally:
        stop_daemon(proc)


def _wait(condition: Any, message: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


@pytest.fixture
def private_system_bus(tmp_path: Path) -> Iterator[str]:
    """A dbus-daemon of our own; yields its address after checking that busctl --system uses it."""
    daemon = shutil.which("dbus-daemon")
    assert daemon, "dbus-daemon missing (scripts/test.sh installs it)"
    config = tmp_path / "bus.conf"
    config.write_text(
        "<!DOCTYPE busconfig PUBLIC '-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN'\n"
        " 'http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd'>\n"
        f"<busconfig><type>system</type><listen>unix:path={tmp_path}/bus.sock</listen>"
        "<auth>EXTERNAL</auth><policy context='default'><allow send_destination='*' eavesdrop='true'/>"
        "<allow eavesdrop='true'/><allow own='*'/></policy></busconfig>\n"
    )
    proc = subprocess.Popen(
        [daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # "Failed to set fd limit" as non-root: harmless
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:"), address
        # Safety: busctl --system must reach this bus (never the machine's logind): the bus driver's
        # process there is our dbus-daemon.
        driver_pid = subprocess.run(
            [
                "busctl",
                "call",
                "--system",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetConnectionUnixProcessID",
                "s",
                "org.freedesktop.DBus",
            ],
            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address},
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        assert driver_pid == f"u {proc.pid}", (driver_pid, proc.pid)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_daemon_logind_reboot_without_logind_is_refused_cleanly(
    tmp_path: Path,
    broker: Mosquitto,
    commander: Commander,
    notify_socket: NotifySocket,
    private_system_bus: str,
) -> None:
    config = write_site(tmp_path / "site", mqtt_url=broker.url, wme="emp_reboot=1\n", toml_extra=PLAIN)
    proc = start_daemon(config, notify_socket, DBUS_SYSTEM_BUS_ADDRESS=private_system_bus)
    try:
        notify_socket.wait_for("READY=1")
        commander.wait_serving()
        reply = commander.request("reboot")
        assert not reply["ok"] and reply["error"]["type"] == "RebootRefusedError", reply
        assert "logind not reachable" in reply["error"]["message"]
        assert "org.freedesktop.login1" in reply["error"]["message"]
        assert commander.request("ping")["ok"] and proc.poll() is None
    finally:
        stop_daemon(proc)
    assert proc.returncode == 0


def test_restart_and_reboot_are_state_changing() -> None:
    router = CommandRouter()
    register_device_commands(router, lambda: None, lambda _r: None)  # type: ignore[arg-type,return-value]
    assert router.is_state_changing("restart") and router.is_state_changing("reboot")
    assert asyncio.iscoroutinefunction(router.serve)
