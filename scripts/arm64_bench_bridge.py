"""bench/bench_bridge.py's latency trials under qemu-user, with ser2net only where it can open a tty.

Run by scripts/arm64_bench.sh inside the arm64 chroot (cwd: the copied checkout). qemu-user 7.2
(Debian 12) does not translate the ``TCGETS2`` ioctl (termios2), which ser2net's gensio issues when it
opens a serial device: the client gets ``Device open failure: OS error`` and the connection closes
(seen with ``QEMU_STRACE=1``: ``ioctl(fd, 0x802c542a) = -1 ENOSYS``). So this checks ser2net once
with one frame and leaves it out of the trials when it fails, saying so in a ``bridge_note`` line;
dcud, socat and the bare relay run as in bench_bridge.py (same trials, same blocks, same frames) and
print its ``bridge_latency`` lines. The ratios are made by scripts/arm64_bench_ratios.py. The idle
sessions part of bench_bridge.py is not run here (RSS under qemu includes the emulator's own).
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_bridge as bench


def ser2net_opens_a_tty() -> str:
    """Empty when ser2net echoes one frame through a pty; else what it said."""
    with tempfile.TemporaryDirectory(prefix="arm64-ser2net-") as tmp, contextlib.ExitStack() as stack:
        tty_path = stack.enter_context(bench.echo_device())
        port = bench.free_port()
        proc = bench.start_ser2net(Path(tmp), [(port, tty_path)])
        stack.callback(bench.stop, proc)
        bench.wait_port_quiet(port, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"ping\n")
            answer = b""
            with contextlib.suppress(OSError):
                while len(answer) < 5:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
        return "" if answer.startswith(b"ping\n") else answer.decode("ascii", "replace").strip() or "no echo"


def main() -> None:
    """The trials, then one ``bridge_latency`` line per bridge and frame size."""
    failure = ser2net_opens_a_tty()
    if failure:
        bench.STARTERS.pop("ser2net")
        note = {"bench": "bridge_note", "ser2net": f"left out: {failure} (qemu-user has no TCGETS2)"}
        print(json.dumps(note), flush=True)
    tallies: dict[int, dict[str, bench.Tally]] = {}
    rng = random.Random(62056)  # the same block orders as bench_bridge.py
    for _ in range(bench.TRIALS):
        bench.trial(tallies, rng)
    for size in bench.SIZES:
        for name, tally in tallies[size].items():
            line = {"bench": "bridge_latency", "bridge": name, "frame_bytes": size, **tally.summary()}
            print(json.dumps({**line, "trial_p50_us": tally.trial_p50_us}), flush=True)


if __name__ == "__main__":
    main()
