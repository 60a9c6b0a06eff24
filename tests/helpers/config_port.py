"""The config port's test rig: a real ``python -m dcud run`` on a free loopback port (``dcu``), curl as
the client, the envelope keys the site is written with, and waiting on sd_notify lines."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import load_config, remote_parameters_path
from dcud.service.crypto_envelope import (
    KIND_RESPONSE,
    EnvelopeKeys,
    open_envelope,
    parse_header,
    response_context,
    seal,
)
from dcud.sim.peers import free_port, wait_for_tcp

from helpers.daemon import daemon_log, start_daemon, stop_daemon, write_site
from helpers.notify import NotifySocket

__all__ = [
    "CURL",
    "DEVICE",
    "ENCRYPTED",
    "KEY",
    "KEYS",
    "PLAIN_WRITES",
    "Dcu",
    "curl",
    "dcu",
    "open_response",
    "seal_request",
    "start_ready",
    "wait_count",
]

KEY = "7f" * 32
"""The envelope key (fw_server_key) of the encrypted-port tests, hex."""
KEYS = EnvelopeKeys.from_parameter(KEY)
"""The keys derived from ``KEY``, to seal requests and open responses."""
DEVICE = "dcu-test"
"""write_site's device_id: envelopes are sealed for it."""
CURL = shutil.which("curl")
"""The curl program, or None when it is not installed (``dcu`` then fails the test saying so)."""
PLAIN_WRITES = "plain_writes = true\n"
"""The installer's opt-in for writes on a plain port (the plain-upload tests need it)."""
ENCRYPTED = f"fw_server_key={KEY}\nfw_server_encrypt=1\n"
"""wme.conf lines that turn envelope encryption on with ``KEY``."""


@dataclass
class Dcu:
    """A running daemon: its process, config port, site directory and sd_notify socket."""

    proc: subprocess.Popen[bytes]
    port: int
    site: Path
    notify: NotifySocket

    @property
    def url(self) -> str:
        """The config port's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def file_in_force(self) -> str:
        """The text of the parameter file the daemon's configuration reads now."""
        return Path(load_config(self.site).params.path).read_text()

    def remote_file(self) -> Path:
        """Where the daemon keeps the parameter file uploaded over the port."""
        return remote_parameters_path(self.site.parent / "state")


def start_ready(site: Path, notify: NotifySocket, port: int, ready_count: int = 1) -> subprocess.Popen[bytes]:
    """Start the daemon on ``site`` and wait until it sent READY=1 ``ready_count`` times in all and
    ``port`` accepts; on failure kill it and fail with its log."""
    proc = start_daemon(site, notify)
    try:
        wait_count(notify, "READY=1", ready_count, 60)
        wait_for_tcp(port, 20)
    except (AssertionError, TimeoutError):
        proc.kill()
        proc.wait()
        raise AssertionError(daemon_log(site)) from None
    return proc


@contextlib.contextmanager
def dcu(tmp_path: Path, wme: str = "", config_port: str = PLAIN_WRITES) -> Iterator[Dcu]:
    """A running daemon on a free loopback port; plain writes allowed unless ``config_port`` says
    otherwise (pass ``""`` for the default: refused)."""
    if CURL is None:
        pytest.fail("curl is not installed: apt-get install curl")
    port = free_port()
    site = write_site(
        tmp_path / "site",
        wme=f"# installer's file\nntp_interval=600\nfw_server_port={port}\n{wme}",
        toml_extra=f'[config_port]\nlisten = "loopback"\n{config_port}',
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    proc = start_ready(site, notify, port)
    try:
        yield Dcu(proc, port, site, notify)
    finally:
        code = stop_daemon(proc)
        notify.close()
        assert code == 0, daemon_log(site)


def curl(*args: str, data: bytes | None = None) -> tuple[int, bytes]:
    """Run curl with ``args`` (``data`` on its stdin, bounded in time) and return (HTTP status, body);
    the status is 0 when curl got no answer."""
    assert CURL is not None
    out = subprocess.run(
        [CURL, "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", *args],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code or b"0"), body


def wait_count(notify: NotifySocket, line: str, count: int, timeout_s: float) -> None:
    """Wait until ``line`` was received ``count`` times in all."""
    deadline = time.monotonic() + timeout_s
    while sum(line in m.splitlines() for m in notify.messages) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{line!r} x{count} not within {timeout_s} s; got {notify.messages}")
        notify.sock.settimeout(max(0.01, deadline - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            notify.messages.append(notify.sock.recv(4096).decode())


def seal_request(method: str, target: str, plaintext: bytes) -> bytes:
    """An envelope sealed with ``KEYS`` for ``DEVICE`` carrying ``plaintext`` for ``method target``."""
    return seal(KEYS, plaintext, f"{method} {target}".encode(), device_id=DEVICE)


def open_response(status: int, request: bytes, body: bytes) -> Any:
    """The plaintext of the sealed response ``body`` the daemon sent with ``status`` to the sealed
    ``request`` (raises if it does not open: wrong key, device, status or request nonce)."""
    nonce = parse_header(request).nonce
    opened = open_envelope(
        KEYS, body, response_context(status, nonce), device_id=DEVICE, expected_kind=KIND_RESPONSE
    )
    return opened.plaintext
