"""Start-up time to READY=1, idle RSS and idle CPU of `dcud run` with the example installation.

Runs the daemon as a process against a local Mosquitto, exactly as systemd would (NOTIFY_SOCKET),
and prints one JSON line. Bounded: one start, IDLE_S of idle measurement, then SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dcud.sim.peers import start_mosquitto

IDLE_S = float(os.environ.get("BENCH_IDLE_S", "20"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_run(workdir: Path, broker_url: str, idle: bool) -> dict[str, float]:
    site = workdir / "site"
    site.mkdir(exist_ok=True)
    example = Path(__file__).resolve().parent.parent / "config"
    (site / "wme.conf").write_text((example / "wme.conf").read_text())
    (site / "dcud.toml").write_text(
        f'device_id = "bench"\nparameters = "wme.conf"\nstate_dir = "{site / "state"}"\n'
        f'[mqtt]\nurl = "{broker_url}"\n'
    )
    sock_path = workdir / "notify.sock"
    sock_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(site / "dcud.toml")],
        env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready_s = time.monotonic() - started
        result = {"ready_s": ready_s}
        if idle:
            time.sleep(2.0)  # let start-up settle before measuring idle
            cpu0, t0 = cpu_s(proc.pid), time.monotonic()
            time.sleep(IDLE_S)
            cpu1, t1 = cpu_s(proc.pid), time.monotonic()
            result["idle_cpu_pct"] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
            result["idle_rss_mib"] = rss_kib(proc.pid) / 1024
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        sock.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = start_mosquitto(workdir / "broker")
        try:
            runs = [one_run(workdir, broker.url, idle=(i == RUNS - 1)) for i in range(RUNS)]
        finally:
            broker.stop()
    ready = sorted(r["ready_s"] for r in runs)
    last = runs[-1]
    print(
        json.dumps(
            {
                "bench": "footprint",
                "ready_s_median": round(ready[len(ready) // 2], 3),
                "ready_s_max": round(ready[-1], 3),
                "idle_rss_mib": round(last["idle_rss_mib"], 1),
                "idle_cpu_pct": round(last["idle_cpu_pct"], 3),
                "idle_window_s": IDLE_S,
                "runs": RUNS,
            }
        )
    )


if __name__ == "__main__":
    main()
