"""Footprint: resident memory of ``dcud run`` with 1,000 configured meters (target < 60 MB).

``python -m dcud run`` is started as a process exactly as systemd would, with four simulated M-Bus lines
of 250 meters each (``dcud sim meters`` in another process), a real Mosquitto for the MQTT uplink and
the meters polled every 60 s. The daemon's VmRSS is sampled while it polls; the result reports the peak
(VmHWM) next to a baseline run of the same installation without any line or meter. Prints one JSON line.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parent.parent
LINES = 4


def _sims(workdir: Path, meters: int) -> str:
    out = []
    per_line = meters // LINES
    for line in range(LINES):
        out += ["[[line]]", f'name = "m{line}"', 'protocol = "mbus"', f'link = "mbus{line}.tty"', ""]
        for i in range(1, per_line + 1):
            out += ["[[line.meter]]", f'address = "{i}"', 'kind = "heat"', ""]
    return "\n".join(out)


def _site(workdir: Path, meters: int, mqtt_url: str) -> str:
    out = [
        'device_id = "dcu-bench"',
        'parameters = "wme.conf"',
        f'state_dir = "{workdir / "state"}"',
        'log_level = "warning"',
        "",
        "[mqtt]",
        f'url = "{mqtt_url}"',
        "",
    ]
    per_line = meters // LINES
    for line in range(LINES if meters else 0):
        out += [
            "[[line]]",
            f'name = "mbus-{line}"',
            f'device = "{workdir / f"mbus{line}.tty"}"',
            'kind = "mbus"',
            "",
        ]
    for line in range(LINES if meters else 0):
        for i in range(1, per_line + 1):
            out += [
                "[[meter]]",
                f'name = "meter-{line}-{i}"',
                f'line = "mbus-{line}"',
                'protocol = "mbus"',
                f'address = "{i}"',
                "interval_s = 60",
                "",
            ]
    return "\n".join(out)


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def run_daemon(workdir: Path, meters: int, mqtt_url: str, duration_s: float) -> dict[str, float]:
    """Start the daemon, wait for READY=1, sample its RSS for ``duration_s``, stop it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "dcud.toml"
    config.write_text(_site(workdir, meters, mqtt_url))
    (workdir / "wme.conf").write_text("datapush_periodic=1\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify.sock"))
    notify.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(workdir / "notify.sock"), "PYTHONUNBUFFERED": "1"}
    log = (workdir / "dcud.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(config)], stdout=log, stderr=log, env=env
    )
    started = time.monotonic()
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        ready_s = time.monotonic() - started
        peak = 0
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            peak = max(peak, _status(proc.pid)["VmRSS"])
            time.sleep(0.5)
        final = _status(proc.pid)
        seq_file = workdir / "state" / "reading-seq.json"
        read = len(json.loads(seq_file.read_text())) if seq_file.exists() else 0
        return {
            "meters_read": read,
            "rss_mb": round(final["VmRSS"] / 1024, 1),
            "rss_peak_mb": round(max(peak, final["VmHWM"]) / 1024, 1),
            "ready_s": round(ready_s, 2),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        notify.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument(
        "--duration", type=float, default=100.0, help="seconds to sample (a 60 s slot plus most of a pass)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcud-footprint-") as tmp:
        workdir = Path(tmp)
        broker = start_mosquitto(workdir / "mosquitto")
        (workdir / "sims.toml").write_text(_sims(workdir, args.meters))
        sim = subprocess.Popen(
            [sys.executable, "-m", "dcud", "sim", "meters", "--config", str(workdir / "sims.toml")],
            stdout=subprocess.PIPE,
        )
        try:
            assert sim.stdout is not None
            for _ in range(LINES + 1):
                if json.loads(sim.stdout.readline()).get("ready"):
                    break
            baseline = run_daemon(workdir / "baseline", 0, broker.url, min(10.0, args.duration))
            loaded = run_daemon(workdir, args.meters, broker.url, args.duration)
        finally:
            sim.terminate()
            sim.wait(timeout=10)
            broker.stop()
    print(
        json.dumps(
            {
                "bench": "footprint_meters",
                "meters": args.meters,
                "lines": LINES,
                "target_mb": 60,
                "baseline_rss_mb": baseline["rss_mb"],
                "rss_mb": loaded["rss_mb"],
                "rss_peak_mb": loaded["rss_peak_mb"],
                "per_meter_kb": round(
                    (loaded["rss_peak_mb"] - baseline["rss_mb"]) * 1024 / max(1, args.meters), 1
                ),
                "meters_read": loaded["meters_read"],
                "ready_s": loaded["ready_s"],
                "sampled_s": args.duration,
            }
        )
    )


if __name__ == "__main__":
    main()
