"""Real uplink peers started on loopback for the demo, the tests and the benchmarks.

Each peer is a real program (Mosquitto today; snmptrapd, an FTP and an NTP server as features need
them) started on 127.0.0.1 with a free port and a private working directory, and stopped for sure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dcud.errors import DcudError

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


class PeerMissing(DcudError):
    """A peer program is not installed; the message says how to install it."""


def find_program(name: str, package: str) -> str:
    """Absolute path of ``name`` (also looking in sbin), or PeerMissing naming the Debian package."""
    found = shutil.which(name, path=_SEARCH_PATH)
    if found is None:
        how = "apt-get install" if os.geteuid() == 0 else "sudo apt-get install"  # no sudo on a bare Debian
        raise PeerMissing(f"{name} is not installed: run `{how} {package}`")
    return found


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_tcp(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.05)


@dataclass
class Mosquitto:
    """A Mosquitto broker on 127.0.0.1:port."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:port``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Terminate the broker and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_mosquitto(
    workdir: Path, port: int | None = None, extra_conf: str = "", *, persistence: bool = False
) -> Mosquitto:
    """Start Mosquitto with anonymous access on 127.0.0.1 only; ready when this returns.

    With ``persistence`` the broker keeps sessions and queued QoS 1 messages in ``workdir`` across a
    restart on the same port (a broker outage test needs the subscriber's session to survive).
    """
    binary = find_program("mosquitto", "mosquitto")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        + (f"persistence true\npersistence_location {workdir}/\n" if persistence else "persistence false\n")
        + "max_queued_messages 100000\n"
        "log_dest stderr\n"
        "log_type error\n" + extra_conf
    )
    log = (workdir / "mosquitto.log").open("ab")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log, start_new_session=True)
    log.close()
    try:
        wait_for_tcp(port)
    except TimeoutError:
        process.kill()
        raise
    return Mosquitto(process, port, workdir)
