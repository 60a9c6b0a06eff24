"""``python -m dcud run`` as a process: a minimal site to run it on, starting it, its log.

Parallel tests share the machine's ports: every port a test daemon listens on is a free one picked for
it. :func:`write_site` names a free ``fw_server_port`` (the config port listens by default, on 9001), and
:func:`start_daemon` refuses a site that would listen on a default port (9000, 9001, 9002).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from dcud.config.loader import load_config
from dcud.errors import ConfigError
from dcud.sim.peers import free_port

from helpers import REPO
from helpers.notify import NotifySocket

_FW_PORT = re.compile(r"^\s*fw_server_port\s*=", re.MULTILINE)


def write_site(
    directory: Path,
    *,
    mqtt_url: str | None = None,
    toml_extra: str = "",
    wme: str = "ntp_interval=600\n",
    device_id: str = "dcu-test",
) -> Path:
    """Write a minimal dcud.toml + wme.conf into ``directory``; returns the dcud.toml path.

    Unless ``wme`` names ``fw_server_port``, a free one is added, so that the daemon's config port never
    binds the default 9001 that another test (or a DCU on this machine) may hold.
    """
    directory.mkdir(parents=True, exist_ok=True)
    mqtt = f'\n[mqtt]\nurl = "{mqtt_url}"\nstatus_interval_s = 2\nreconnect_max_s = 2\n' if mqtt_url else ""
    config = directory / "dcud.toml"
    config.write_text(
        f'device_id = "{device_id}"\nparameters = "wme.conf"\nstate_dir = "{directory / "state"}"\n'
        f"grace_s = 3\n{toml_extra}{mqtt}"
    )
    if not _FW_PORT.search(wme):
        separator = "" if not wme or wme.endswith("\n") else "\n"
        wme += f"{separator}fw_server_port={free_port()}\n"
    (directory / "wme.conf").write_text(wme)
    return config


def default_ports(config: Path) -> list[str]:
    """The listening parameters a site leaves at their fixed defaults ([] when it cannot be loaded)."""
    try:
        loaded = load_config(config)
    except ConfigError:
        return []  # the daemon refuses it before it listens anywhere
    params = loaded.params
    unset = []
    if loaded.toml.config_port.enabled and not params.is_set("fw_server_port"):
        unset.append("fw_server_port (9001)")
    roles = {line.transparent for line in loaded.toml.line}
    if "primary" in roles and not params.is_set("tm_server_port"):
        unset.append("tm_server_port (9000)")
    if "secondary" in roles and not params.is_set("tm2.port"):
        unset.append("tm2.port (9002)")
    return unset


def start_daemon(config: Path, notify: NotifySocket | None = None, **env: str) -> subprocess.Popen[bytes]:
    """``python -m dcud run -c config`` as a process, logs to config's directory.

    A site that would listen on a fixed default port is an error of the test (it would collide with a
    test running in parallel): name a free port (:func:`dcud.sim.peers.free_port`) for each.
    """
    fixed = default_ports(config)
    assert not fixed, f"{config} listens on default ports, give each a free one: {', '.join(fixed)}"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if notify is not None:
        environment["NOTIFY_SOCKET"] = str(notify.path)
    log = (config.parent / "dcud.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(config)],
        stdout=log,
        stderr=log,
        env=environment,
        cwd=REPO,
    )
    log.close()
    return proc


def run_dcud(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m dcud <args>`` to its end (bounded by ``timeout_s``), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "dcud", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO,
    )


def stop_daemon(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM to a daemon still running, SIGKILL if not ended within ``timeout_s``; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def daemon_log(config: Path) -> str:
    """What the daemon of ``config`` logged so far ("" before it started)."""
    path = config.parent / "dcud.log"
    return path.read_text(errors="replace") if path.exists() else ""
