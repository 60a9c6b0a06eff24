"""``python -m dcud run`` as a process: sd_notify, SIGTERM, SIGHUP reload, bad config."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.notify import NotifySocket

pytestmark = __import__("pytest").mark.slow


def test_ready_then_sigterm_stops_cleanly(tmp_path: Path, notify_socket: NotifySocket) -> None:
    config = write_site(tmp_path / "site")
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
        notify_socket.wait_for("STOPPING=1", timeout_s=2)
    finally:
        proc.kill()


def test_sighup_with_bad_file_keeps_running(tmp_path: Path, notify_socket: NotifySocket) -> None:
    config = write_site(tmp_path / "site")
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        wme = config.parent / "wme.conf"
        good = wme.read_text()  # ntp_interval=600 and the test's own fw_server_port
        wme.write_text(good.replace("ntp_interval=600", "ntp_interval=ten"))
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("STATUS=reload refused: configuration invalid")
        assert proc.poll() is None
        assert "reload refused" in daemon_log(config)
        # A good file afterwards is taken, and only the service whose slice changed restarts.
        wme.write_text(good.replace("ntp_interval=600", "ntp_interval=300"))
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING=1")
        messages = notify_socket.wait_for("STATUS=reloaded; restarted: ntp")
        assert any("STATUS=reloaded" in m for m in messages)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_bad_config_exits_78(tmp_path: Path) -> None:
    config = write_site(tmp_path / "site", wme="ntp_interval=ten\n")
    result = subprocess.run(
        [sys.executable, "-m", "dcud", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78
    assert "wme.conf:1: ntp_interval" in result.stderr


def test_sigint_stops_cleanly(tmp_path: Path, notify_socket: NotifySocket) -> None:
    config = write_site(tmp_path / "site")
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_corrupt_outbox_is_moved_aside(tmp_path: Path, notify_socket: NotifySocket) -> None:
    config = write_site(tmp_path / "site")
    state = config.parent / "state"
    state.mkdir()
    (state / "outbox.sqlite").write_bytes(b"this is not a database" * 100)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        moved = list(state.glob("outbox.sqlite.corrupt-*"))
        assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not a database")
        assert "outbox database unreadable; moved aside" in daemon_log(config)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
