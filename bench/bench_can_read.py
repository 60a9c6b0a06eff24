"""CPU per received CAN frame on the SocketCAN read path: python-can's read against dcud's raw read.

This machine has no AF_CAN, so both readers take the same 16-byte ``struct can_frame`` datagrams from an
AF_UNIX datagram socket pair with ``SO_TIMESTAMPNS`` on, which is what python-can asks of a SocketCAN
socket: the kernel hands both readers the same bytes and, to python-can, the timestamp it asks for.

- ``python_can``: what dcud did per frame before (python-can's SocketCAN ``_recv_internal``: ``select``
  then ``capture_message``: ``recvmsg`` with the timestamp, ``can.Message``), then the port's checks
  and the copy of the data (``CanPort._on_message``);
- ``raw``: dcud's read now (``_GuardedBus.drain`` on the raw socket: ``recv`` with ``MSG_DONTWAIT``,
  one ``struct`` unpack, no ``can.Message``; one clock reading per drain).

Both hand each frame to the same do-nothing ``on_frame``; frames come in bursts of ``BENCH_BURST`` (8:
one TPDO per drive of the drives benchmark) and every burst is drained at once, so the figures are the
read cost per frame without the event loop's wake-up. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import struct
import time
from typing import Any

from can.interfaces.socketcan.constants import SO_TIMESTAMPNS
from can.interfaces.socketcan.socketcan import capture_message

from dcud.transport.can import CanPort, CanSettings, _GuardedBus

FRAMES = int(os.environ.get("BENCH_FRAMES", "200000"))
BURST = int(os.environ.get("BENCH_BURST", "8"))
FRAME = struct.pack("=IB3x8s", 0x181, 6, bytes.fromhex("3702e8030000") + b"\0\0")


class _Bus:
    channel_info = "bench"
    _filters = None


def measure(name: str, port: CanPort, reader: socket.socket, writer: socket.socket) -> float:
    loop = asyncio.new_event_loop()
    guard = _GuardedBus(_Bus(), port, loop, False, raw_socket=reader)  # type: ignore[arg-type]

    def read_python_can() -> None:
        on_message = port._on_message
        while select.select([reader], [], [], 0)[0]:
            msg = capture_message(reader)
            if msg is not None:
                on_message(msg, time.monotonic())

    read = guard.drain if name == "raw" else read_python_can
    spent = 0.0
    for _ in range(FRAMES // BURST):
        for _ in range(BURST):
            writer.send(FRAME)
        started = time.process_time()
        read()
        spent += time.process_time() - started
    loop.close()
    return 1e6 * spent / (FRAMES // BURST * BURST)


def main() -> None:
    results: dict[str, Any] = {}
    for name in ("python_can", "raw", "python_can", "raw"):
        writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        reader.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        received = 0

        def on_frame(_can_id: int, _data: bytes, _now: float) -> None:
            nonlocal received
            received += 1

        port = CanPort(CanSettings("bench", "socketcan", "bench"), on_frame)
        us = measure(name, port, reader, writer)
        assert received == FRAMES // BURST * BURST, (name, received)
        results.setdefault(name, []).append(round(us, 2))
        writer.close()
        reader.close()
    print(json.dumps({"bench": "can_read", "frames": FRAMES, "burst": BURST, "us_per_frame": results}))


if __name__ == "__main__":
    main()
