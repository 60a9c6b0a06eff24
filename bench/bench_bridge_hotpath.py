"""Where a transparent session's CPU goes per chunk: the warm cost of each function on the hot path.

The real code of dcud's fast paths (``BridgeSession.data_received`` with ``SerialPort.write_direct`` and
``BridgeMachine.client_wrote``; ``_Transport._read_ready`` with ``BridgeSession._on_line_data``), timed
call by call against what the bare relay of ``bench_bridge.py --relay`` does in their place (one
``os.write``; ``transport.write(os.read(...))``). The line is /dev/null and a pipe, the client transport
a C no-op, so the figures are Python's part only, cache-warm (a tight loop): in the real bench the same
calls run between other processes and cost two to five times as much (docs/bridge.md, "Where the time
goes"). Random frames without a sign-on (the sniffer at rest), like the bench's.

Run: ``python bench/bench_bridge_hotpath.py``; one JSON line per frame size, nanoseconds per chunk
(the best of 7 repeats).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
import timeit
import types
from collections.abc import Callable
from typing import cast

from dcud.codec.iec_sniffer import CLIENT_SHORTCUT
from dcud.service.bridge_config import SessionPolicy
from dcud.service.bridge_session import BridgeSession
from dcud.service.line import Line
from dcud.transport.serial import SerialPort, _Transport

SIZES = (64, 1024)


class _NullTransport:
    """The client's socket transport: C callables that do nothing (uvloop's are C too)."""

    write = collections.deque[bytes](maxlen=0).append
    is_closing = int

    def set_write_buffer_limits(self, high: int) -> None:
        pass


def _per_call_ns(fn: Callable[[bytes], object], frames: list[bytes], number: int = 2000) -> float:
    runs = timeit.repeat(lambda: [fn(f) for f in frames], number=number, repeat=7)
    return min(runs) / (number * len(frames)) * 1e9


async def measure() -> list[dict[str, object]]:
    devnull = os.open("/dev/null", os.O_WRONLY)
    port = SerialPort("/dev/null", 115200)
    # An open port without a tty: write_direct's common case, straight to /dev/null.
    port._serial = types.SimpleNamespace(fd=devnull)
    port._fd = devnull
    port._transport = types.SimpleNamespace(_closing=False, _write_buffer=collections.deque())
    port._closed = asyncio.get_running_loop().create_future()
    line = cast(Line, types.SimpleNamespace(name="bench"))
    session = BridgeSession(
        sid="tm#1",
        port_name="tm",
        peer="bench",
        line=line,
        baud=115200,
        framing="8N1",
        policy=SessionPolicy(),
    )
    session.attach(_NullTransport())  # type: ignore[arg-type]
    session._line_write = port.write_direct
    machine = session.machine
    machine.lease_granted(115200, "8N1", time.monotonic(), 0.0, counts=True)
    machine.cps = machine.cps_max = 1e12  # a line that never fills: the fast path only
    read_end, write_end = os.pipe()
    reader = types.SimpleNamespace(_serial=types.SimpleNamespace(fd=read_end), port=port)
    port._receiver = session._on_line_data
    null_write = _NullTransport.write
    rng = random.Random(62056)
    pool = bytes(range(256)) * 8
    results = []
    for size in SIZES:
        starts = (rng.randrange(0, len(pool) - size) for _ in range(400))
        frames = [f for f in (pool[s : s + size] for s in starts) if CLIENT_SHORTCUT(f) is None][:64]

        def read_ready(data: bytes) -> None:
            os.write(write_end, data)
            _Transport._read_ready(reader)  # type: ignore[arg-type]

        def relay_read(data: bytes) -> None:
            os.write(write_end, data)
            null_write(os.read(read_end, 65536))

        ns = {
            "relay_client_os_write": _per_call_ns(lambda d: os.write(devnull, d), frames),
            "relay_meter_transport_write": _per_call_ns(null_write, frames),
            "data_received": _per_call_ns(session.data_received, frames),
            "write_direct": _per_call_ns(port.write_direct, frames),
            "client_wrote": _per_call_ns(lambda d: machine.client_wrote(d, 0, 1.0), frames),
            "sniffer_test": _per_call_ns(CLIENT_SHORTCUT, frames),
            "monotonic": _per_call_ns(lambda d: time.monotonic(), frames),
            "on_line_data": _per_call_ns(session._on_line_data, frames),
            "read_ready_and_on_line_data_with_pipe": _per_call_ns(read_ready, frames, 500),
            "relay_reader_with_pipe": _per_call_ns(relay_read, frames, 500),
        }
        extra = (
            ns["data_received"]
            - ns["relay_client_os_write"]
            + ns["read_ready_and_on_line_data_with_pipe"]
            - ns["relay_reader_with_pipe"]
        )
        results.append(
            {
                "bench": "bridge_hotpath_ns",
                "frame_bytes": size,
                **{k: round(v) for k, v in ns.items()},
                "extra_over_relay_per_round_trip_ns": round(extra),
            }
        )
    assert machine.fast and machine.bytes_c2m > 0 and machine.bytes_m2c > 0
    return results


def main() -> None:
    for line in asyncio.run(measure()):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
