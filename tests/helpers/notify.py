"""sd_notify on both sides: a socket that collects a daemon's datagrams, a notifier that records lines."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from dcud.runtime.sdnotify import Notifier


class NotifySocket:
    """A test NOTIFY_SOCKET: collects the datagrams a daemon sends (the ``notify_socket`` fixture)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout_s: float = 20.0) -> list[str]:
        """Wait until a datagram contains ``line``; returns every message so far."""
        deadline = time.monotonic() + timeout_s
        while not any(line in m.splitlines() for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line!r} within {timeout_s} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.messages

    def close(self) -> None:
        """Close the socket (the fixture does)."""
        self.sock.close()


class RecordingNotifier(Notifier):
    """An sd_notify stand-in that records every line instead of sending it."""

    def __init__(self) -> None:
        super().__init__("")
        self.sent: list[str] = []

    def notify(self, *lines: str) -> bool:
        """Record ``lines``; always "sent"."""
        self.sent.extend(lines)
        return True
