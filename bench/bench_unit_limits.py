"""Footprint for the systemd limits (MemoryMax=, TasksMax=): peak RSS and peak thread count of ``dcud run``.

Three scenarios, each ``python -m dcud run`` as a process as systemd starts it (NOTIFY_SOCKET, a real
Mosquitto), sampled every 0.2 s from ``/proc/<pid>/status`` (VmRSS, VmHWM, Threads):

- ``example_idle``: the example parameter file (config/wme.conf) with no lines, idle;
- ``demo``: ``dcud demo`` (IEC and M-Bus meters, drives, FTP push, transparent ports, all simulated);
  the daemon it starts is sampled;
- ``meters_load``: 1,000 M-Bus meters on four simulated lines polled every 60 s, while clients hammer
  the config port (``GET /config``) and MQTT (``cmd/ping``, ``cmd/param/get``) from several threads.

systemd's ``MemoryMax=`` counts the unit's cgroup: the process's memory plus the page cache of the files
it writes (the outbox database and its WAL). The kernel reclaims clean cache before it kills anything, so
the limit is set from the peak RSS with headroom (docs/systemd.md). ``state_bytes`` reports how large the
state directory grew. Prints one JSON line per scenario and a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import bench_footprint_meters as meters_bench

from dcud.sim.peers import free_port, start_mosquitto

REPO = Path(__file__).resolve().parent.parent
SAMPLE_S = 0.2


class Sampler:
    """Samples VmRSS, VmHWM and Threads of one pid in a background thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_kib = 0
        self.hwm_kib = 0
        self.threads = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                rows = Path(f"/proc/{self.pid}/status").read_text().splitlines()
            except OSError:
                return
            fields = {k: v.split()[0] for k, _, v in (r.partition(":") for r in rows) if v.split()}
            self.rss_kib = max(self.rss_kib, int(fields.get("VmRSS", 0)))
            self.hwm_kib = max(self.hwm_kib, int(fields.get("VmHWM", 0)))
            self.threads = max(self.threads, int(fields.get("Threads", 0)))
            self.samples += 1

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        return {
            "peak_rss_mb": round(max(self.rss_kib, self.hwm_kib) / 1024, 1),
            "peak_threads": self.threads,
            "samples": self.samples,
        }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _start_daemon(workdir: Path, config: Path) -> tuple[subprocess.Popen[bytes], socket.socket]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify.sock"))
    notify.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": str(workdir / "notify.sock"), "PYTHONUNBUFFERED": "1"}
    with (workdir / "dcud.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcud", "run", "-c", str(config)], stdout=log, stderr=log, env=env
        )
    while b"READY=1" not in notify.recv(4096):
        pass
    return proc, notify


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def example_idle(workdir: Path, broker_url: str, duration_s: float) -> dict[str, object]:
    workdir.mkdir(parents=True)
    (workdir / "wme.conf").write_text((REPO / "config" / "wme.conf").read_text())
    config = workdir / "dcud.toml"
    config.write_text(
        f'device_id = "bench"\nparameters = "wme.conf"\nstate_dir = "{workdir / "state"}"\n'
        f'log_level = "warning"\n[mqtt]\nurl = "{broker_url}"\n'
    )
    proc, notify = _start_daemon(workdir, config)
    try:
        sampler = Sampler(proc.pid)
        time.sleep(duration_s)
        return {"scenario": "example_idle", **sampler.stop(), "state_bytes": _dir_bytes(workdir / "state")}
    finally:
        _stop(proc)
        notify.close()


def _daemon_child(parent: int, timeout_s: float) -> int:
    """The pid of the ``dcud run`` process that ``dcud demo`` (pid ``parent``) started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == parent and b"run" in cmdline and b"dcud" in cmdline:
                return int(entry.name)
        time.sleep(0.1)
    raise TimeoutError("dcud demo started no daemon")


def demo(workdir: Path, duration_s: float) -> dict[str, object]:
    workdir.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "demo", "--duration", str(duration_s + 30), "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sampler = Sampler(_daemon_child(proc.pid, 60))
        time.sleep(duration_s)
        return {"scenario": "demo", **sampler.stop(), "state_bytes": _dir_bytes(workdir)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _hammer(stop: threading.Event, fn: Callable[[], None], counts: list[int]) -> None:
    while not stop.is_set():
        try:
            fn()
            counts[0] += 1
        except Exception:
            counts[1] += 1


async def _mqtt_commands(port: int, stop: threading.Event, counts: list[int]) -> None:
    prefix = "dcu/dcu-bench"
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"bench-{os.getpid()}") as client:
        await client.subscribe(f"{prefix}/cmd/ping/reply", qos=1)
        await client.subscribe(f"{prefix}/cmd/param/get/reply", qos=1)
        n = 0
        while not stop.is_set():
            for verb, body in (("ping", {}), ("param/get", {"names": ["ntp_interval"]})):
                n += 1
                await client.publish(f"{prefix}/cmd/{verb}", json.dumps({"id": n, **body}), qos=1)
            try:
                async with asyncio.timeout(5):
                    got = 0
                    async for _message in client.messages:
                        got += 1
                        if got == 2:
                            break
                counts[0] += 2
            except TimeoutError:
                counts[1] += 1


def meters_load(workdir: Path, broker_url: str, broker_port: int, duration_s: float) -> dict[str, object]:
    workdir.mkdir(parents=True)
    (workdir / "sims.toml").write_text(meters_bench._sims(workdir, 1000))
    sim = subprocess.Popen(
        [sys.executable, "-m", "dcud", "sim", "meters", "--config", str(workdir / "sims.toml")],
        stdout=subprocess.PIPE,
    )
    stop = threading.Event()
    http_counts = [0, 0]
    mqtt_counts = [0, 0]
    try:
        assert sim.stdout is not None
        for _ in range(meters_bench.LINES + 1):
            if json.loads(sim.stdout.readline()).get("ready"):
                break
        port = free_port()
        config = workdir / "dcud.toml"
        config.write_text(
            meters_bench._site(workdir, 1000, broker_url) + '\n[config_port]\nlisten = "loopback"\n'
        )
        (workdir / "wme.conf").write_text(f"datapush_periodic=1\nfw_server_port={port}\n")
        proc, notify = _start_daemon(workdir, config)
        try:
            sampler = Sampler(proc.pid)

            def get_config() -> None:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as answer:
                    answer.read()

            workers = [
                threading.Thread(target=_hammer, args=(stop, get_config, http_counts), daemon=True)
                for _ in range(4)
            ]
            workers.append(
                threading.Thread(
                    target=lambda: asyncio.run(_mqtt_commands(broker_port, stop, mqtt_counts)), daemon=True
                )
            )
            for worker in workers:
                worker.start()
            time.sleep(duration_s)
            stop.set()
            for worker in workers:
                worker.join(30)
            result = sampler.stop()
            seq_file = workdir / "state" / "reading-seq.json"
            read = len(json.loads(seq_file.read_text())) if seq_file.exists() else 0
            return {
                "scenario": "meters_load",
                **result,
                "meters_read": read,
                "http_requests": http_counts[0],
                "http_errors": http_counts[1],
                "mqtt_commands": mqtt_counts[0],
                "mqtt_timeouts": mqtt_counts[1],
                "state_bytes": _dir_bytes(workdir / "state"),
            }
        finally:
            stop.set()
            _stop(proc)
            notify.close()
    finally:
        sim.terminate()
        sim.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle scenario")
    parser.add_argument("--demo", type=float, default=60.0, help="seconds of the demo scenario")
    parser.add_argument("--load", type=float, default=100.0, help="seconds of the 1,000-meter scenario")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="dcud-limits-") as tmp:
        base = Path(tmp)
        broker = start_mosquitto(base / "mosquitto")
        try:
            results.append(example_idle(base / "idle", broker.url, args.idle))
            print(json.dumps(results[-1]), flush=True)
            results.append(demo(base / "demo", args.demo))
            print(json.dumps(results[-1]), flush=True)
            results.append(meters_load(base / "load", broker.url, broker.port, args.load))
            print(json.dumps(results[-1]), flush=True)
        finally:
            broker.stop()
    print(
        json.dumps(
            {
                "bench": "unit_limits",
                "peak_rss_mb": max(float(str(r["peak_rss_mb"])) for r in results),
                "peak_threads": max(int(str(r["peak_threads"])) for r in results),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
