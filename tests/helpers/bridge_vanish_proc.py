"""Run by test_bridge under ``unshare -rn``: a client vanishes (its packets black-holed, no FIN/RST).

In this private network namespace the loopback is ours: ``ip rule`` sends every packet to or from the
client's port into a blackhole, as if the head-end's cellular link died. Two cases:

- ``idle``: nothing in flight; TCP keepalive (1 s idle, 1 s interval, 2 probes) must find the dead peer;
- ``unacked``: the meter answers after the client vanished; the unacknowledged data must hit
  TCP_USER_TIMEOUT (``unsent_timeout_s``).

Either way the line's lease must be free again within the bound. Prints one JSON line per case.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for the helpers package

from helpers.bridge import PtyDevice, bridge_harness, policy
from helpers.meters import wait_until

BOUND_S = 20.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


TCP = str(socket.IPPROTO_TCP)
"""By number: a minimal Debian has no /etc/protocols (package netbase), and ip cannot resolve "tcp"."""


def blackhole(port: int) -> None:
    ip("rule", "add", "pref", "10", "ipproto", TCP, "dport", str(port), "blackhole")
    ip("rule", "add", "pref", "11", "ipproto", TCP, "sport", str(port), "blackhole")


def clear_blackhole() -> None:
    subprocess.run(["ip", "rule", "del", "pref", "10"], check=False)
    subprocess.run(["ip", "rule", "del", "pref", "11"], check=False)


async def case(tmp: Path, name: str) -> dict[str, object]:
    session_policy = policy(
        keepalive_idle_s=1,
        keepalive_interval_s=1,
        keepalive_count=2,
        unsent_timeout_s=3.0,
        idle_timeout_s=600.0,
        lease_idle_s=600.0,
    )
    (tmp / name).mkdir(parents=True, exist_ok=True)
    async with bridge_harness(tmp / name, policy=session_policy) as h:
        device = PtyDevice(h.pair.b)
        device.start()
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", h.port))
        await loop.sock_sendall(sock, b"hello")
        got = b""
        for _ in range(100):
            got += await asyncio.wait_for(loop.sock_recv(sock, 100), 10)
            if len(got) >= 5:
                break
        assert got == b"hello", got
        await wait_until(lambda: h.line.holder is not None, 5)
        client_port = sock.getsockname()[1]
        blackhole(client_port)
        vanished = time.monotonic()
        if name == "unacked":
            # The meter sends an answer after the client is gone: it can never be acknowledged.
            import os

            os.write(device.fd, b"late answer" * 100)
        freed = True
        try:
            await wait_until(lambda: h.line.holder is None, BOUND_S)
        except AssertionError:
            freed = False
        elapsed = time.monotonic() - vanished
        records = await h.wait_audits(1, BOUND_S) if freed else h.audits()
        device.stop()
        sock.close()
        clear_blackhole()
        return {
            "case": name,
            "freed": freed,
            "elapsed_s": round(elapsed, 2),
            "reason": records[0]["reason"] if records else None,
        }


async def main(tmp: Path) -> None:
    for name in ("idle", "unacked"):
        print(json.dumps(await case(tmp, name)), flush=True)


if __name__ == "__main__":
    ip("link", "set", "lo", "up")
    # Policy rules before the local table, so that a blackhole rule wins over loopback delivery.
    ip("rule", "add", "pref", "100", "lookup", "local")
    ip("rule", "del", "pref", "0")
    asyncio.run(main(Path(sys.argv[1])))
