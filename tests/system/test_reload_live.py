"""Live reload: SIGHUP and remote changes restart only the services whose configuration changed.

The daemon runs on the demo's simulated lines (an IEC 62056-21 meter line and an M-Bus line on ptys).
Three reloads in a row (an NTP change by SIGHUP, an NTP change through the config port, a meter added
to the M-Bus line by SIGHUP) must each restart exactly the services concerned, each framed by
``RELOADING=1`` ... ``READY=1``, while long-lived sessions on untouched services stay connected: a
transparent session on the IEC line keeps talking to its meter, and a half-sent request on the config
port is answered after all three reloads.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dcud.codec.iec62056 import encode_option_select, encode_request, parse_data_message
from dcud.sim.demo_site import site_toml, start_simulators, stop_process
from dcud.sim.peers import free_port, wait_for_tcp

from helpers.bridge import TR_MIN_S
from helpers.config_port import curl, wait_count
from helpers.daemon import daemon_log, start_daemon, stop_daemon, write_site
from helpers.notify import NotifySocket

pytestmark = pytest.mark.slow

ADDED_METER = """
[[meter]]
name = "extra-9"
line = "mbus-1"
protocol = "mbus"
address = "9"
interval_s = 60
"""


@dataclass
class Site:
    config: Path
    proc: subprocess.Popen[bytes]
    notify: NotifySocket
    config_port: int
    tm_port: int


@contextlib.contextmanager
def running_site(tmp_path: Path) -> Iterator[Site]:
    work = tmp_path / "site"
    work.mkdir()
    sims = start_simulators(work)
    config_port, tm_port, tm2_port = free_port(), free_port(), free_port()
    lines = site_toml(work).replace('kind = "rs485"\n', 'kind = "rs485"\ntransparent = "primary"\n', 1)
    config = write_site(
        work,
        wme=(
            f"ntp_interval=600\nfw_server_port={config_port}\ntm_server_port={tm_port}\ntm2.port={tm2_port}\n"
            "tm.tls_enable=0\n"  # plain TCP on loopback, so that the test talks to the meter directly
        ),
        toml_extra='[config_port]\nlisten = "loopback"\nheader_timeout_s = 120\nplain_writes = true\n'
        + lines,
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_daemon(config, notify)
    try:
        notify.wait_for("READY=1", 60)
        wait_for_tcp(config_port, 20)
        yield Site(config, proc, notify, config_port, tm_port)
    finally:
        stop_daemon(proc)
        notify.close()
        stop_process(sims)
    assert proc.returncode == 0, daemon_log(config)


def restarted_after(site: Site, reloads: int) -> list[str]:
    """The services the ``reloads``-th reload restarted, from its STATUS line (bounded wait)."""
    wait_count(site.notify, "RELOADING=1", reloads, 30)
    deadline = time.monotonic() + 30
    while True:
        statuses = [
            line
            for m in site.notify.messages
            for line in m.splitlines()
            if line.startswith("STATUS=reloaded")
        ]
        if len(statuses) >= reloads:
            names = statuses[reloads - 1].partition("restarted: ")[2]
            return [] if names == "none" else names.split(", ")
        if time.monotonic() > deadline:
            raise AssertionError(f"no reload status; got {site.notify.messages}")
        wait_count(site.notify, "READY=1", 1 + reloads, 30)


def read_until(sock: socket.socket, marker: bytes, extra: int = 0, timeout_s: float = 20) -> bytes:
    """Bytes up to ``marker`` plus ``extra`` more; AssertionError if the session closes or stalls."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while True:
        at = data.find(marker)
        if at >= 0 and len(data) >= at + len(marker) + extra:
            return data
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} within {timeout_s} s; got {data!r}"
        sock.settimeout(remaining)
        with contextlib.suppress(TimeoutError):
            chunk = sock.recv(4096)
            assert chunk, "transparent session closed"
            data += chunk


def readout(sock: socket.socket) -> bytes:
    """A whole IEC 62056-21 mode C readout through the transparent port (baud switch to 9600 included);
    returns the data message."""
    sock.sendall(encode_request("12345678"))
    ident = read_until(sock, b"\r\n")
    assert ident.startswith(b"/"), ident
    time.sleep(TR_MIN_S)  # IEC 62056-21 tr: the reaction time a master leaves before its option select
    sock.sendall(encode_option_select("5"))
    data = read_until(sock, b"\x03", extra=1)
    message = data[data.index(b"\x02") :]
    assert parse_data_message(message).bcc_ok
    return message


def test_reloads_restart_only_what_changed_and_sessions_survive(tmp_path: Path) -> None:
    with running_site(tmp_path) as site:
        # A long-lived session on the transparent port (IEC line) ...
        wait_for_tcp(site.tm_port, 20)
        bridge = socket.create_connection(("127.0.0.1", site.tm_port), timeout=20)
        first = readout(bridge)
        # ... and a request half sent to the config port.
        pending = socket.create_connection(("127.0.0.1", site.config_port), timeout=20)
        pending.sendall(b"GET /config HTTP/1.1\r\n")

        # 1. NTP change in the installer's file, SIGHUP.
        wme = site.config.parent / "wme.conf"
        wme.write_text(wme.read_text().replace("ntp_interval=600", "ntp_interval=500"))
        site.proc.send_signal(signal.SIGHUP)
        assert restarted_after(site, 1) == ["ntp"]

        # 2. NTP change through the config port (the same apply path).
        code, body = curl(
            "-X",
            "PATCH",
            "--data-binary",
            "@-",
            f"http://127.0.0.1:{site.config_port}/config",
            data=b"ntp_interval=400\n",
        )
        assert code == 200, body
        assert json.loads(body)["restarted"] == ["ntp"]
        assert restarted_after(site, 2) == ["ntp"]

        # 3. A meter added to the M-Bus line, SIGHUP: only the poller restarts.
        site.config.write_text(site.config.read_text() + ADDED_METER)
        site.proc.send_signal(signal.SIGHUP)
        assert restarted_after(site, 3) == ["polling"]

        # The same TCP session, still connected, reads the meter again.
        assert readout(bridge)[:20] == first[:20]
        pending.sendall(b"Host: dcu\r\n\r\n")
        answer = pending.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and b"ntp_interval=400" in answer
        pending.close()
        bridge.close()
        log = daemon_log(site.config)
        assert not re.search(r'"service": "bridge\.tm".*"event": "(stopping|started)"', log)
