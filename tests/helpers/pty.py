"""A bare pty pair for serial port tests that need no socat."""

from __future__ import annotations

import os
import tty

from dcud.transport.serial import SerialPort

from helpers.meters import wait_until


class PtyPeer:
    """The master side of a pty whose slave a port opens; nothing is read unless asked."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.received = bytearray()
        self.closed = False

    def drain(self) -> bytes:
        """Read what the port wrote so far (bounded)."""
        for _ in range(1000):
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self.received += chunk
        return bytes(self.received)

    def send(self, data: bytes) -> None:
        """Bytes for the port to receive."""
        os.write(self.master, data)

    def hang_up(self) -> None:
        """Close the master: the port's reads fail (EIO), like an unplugged adapter."""
        if not self.closed:
            os.close(self.master)
            self.closed = True

    def close(self) -> None:
        """Close both ends."""
        self.hang_up()
        os.close(self.slave)


async def released(port: SerialPort, timeout_s: float = 5.0) -> None:
    """Wait (bounded) until the transport of a closed ``port`` has let go of its tty.

    ``SerialPort.close`` aborts the transport, which drops the tty on a later loop turn (its own
    ``connection_lost``); closing the pty's other end or ending the loop before that leaves it pending.
    """
    transport = port._transport
    if transport is not None:
        await wait_until(lambda: transport.serial is None, timeout_s, step_s=0.001)
