"""sd_notify(3) written directly: a datagram to ``$NOTIFY_SOCKET``, a no-op without it.

No dependency is needed for a single sendto(); abstract socket names (``@...``) are supported.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends state lines to systemd (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``...)."""

    def __init__(self, socket_path: str | None = None) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "") if socket_path is None else socket_path
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if path:
            self._address = "\0" + path[1:] if path.startswith("@") else path
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram with the given ``KEY=value`` lines; False when not sent.

        A failed send is not an error for the daemon: systemd may be restarting, and a missed
        WATCHDOG ping is exactly what the watchdog is there to notice.
        """
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """The ping interval systemd expects (half of ``WATCHDOG_USEC``), or None when no watchdog is set.

    ``WATCHDOG_PID`` names the process the watchdog is meant for; another process ignores it.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2
