"""A short end-to-end run of dcud on this machine (used by scripts/arm64_check.sh inside the arm64 chroot).

Starts Mosquitto and the demo's simulated meters (M-Bus and IEC 62056-21 on ptys), runs
``python -m dcud run`` as a process with a notify socket, and checks: READY=1, a reading from an M-Bus
and from an IEC meter on MQTT, a curl upload on the config port (200) and a bad one (422, nothing
changed), a SIGHUP reload (RELOADING=1 then READY=1), and a clean stop on SIGTERM (exit 0).
Prints one JSON line; exits 1 when a check fails. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt

from dcud.sim.demo_site import site_toml, start_simulators, stop_process
from dcud.sim.peers import free_port, start_mosquitto

DEVICE_ID = "dcu-e2e"


class Notify:
    """Collects sd_notify datagrams."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[str] = []

    def wait_for(self, line: str, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(line in m.splitlines() for m in self.messages) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{line} x{count} not seen within {timeout_s} s: {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue


async def wait_readings(url_port: int, timeout_s: float) -> dict[str, int]:
    readings: dict[str, int] = {}
    async with aiomqtt.Client("127.0.0.1", url_port, identifier="e2e-watch") as client:
        await client.subscribe(f"dcu/{DEVICE_ID}/meter/+/reading", qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                meter = message.topic.value.split("/")[3]
                readings[meter] = readings.get(meter, 0) + 1
                if any(m.startswith(("heat", "water", "power")) for m in readings) and any(
                    m.startswith("flat") for m in readings
                ):
                    return readings
    return readings


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "60", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/dcud-e2e")
    parser.add_argument("--timeout", type=float, default=180.0, help="bound of each wait, seconds")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version()}
    try:
        import uvloop  # noqa: F401

        result["loop"] = "uvloop"
    except ImportError:
        result["loop"] = "asyncio"
    broker = start_mosquitto(work / "mosquitto")
    sims = start_simulators(work)
    port = free_port()
    (work / "dcud.toml").write_text(
        f'device_id = "{DEVICE_ID}"\nparameters = "wme.conf"\nstate_dir = "{work / "state"}"\n'
        f'grace_s = 5\n[mqtt]\nurl = "{broker.url}"\n'
        '[config_port]\nlisten = "loopback"\nplain_writes = true\n' + site_toml(work)
    )
    (work / "wme.conf").write_text(f"ntp_interval=600\nfw_server_port={port}\n")
    notify = Notify(work / "notify.sock")
    log = (work / "dcud.log").open("ab")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(work / "dcud.toml")],
        stdout=log,
        stderr=log,
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path), "PYTHONUNBUFFERED": "1"},
    )
    ok = False
    try:
        notify.wait_for("READY=1", 1, args.timeout)
        result["ready_s"] = round(time.monotonic() - started, 1)
        result["readings"] = asyncio.run(wait_readings(broker.port, args.timeout))
        code, body = curl(
            "-X", "PATCH", "--data-binary", "ntp_interval=300\n", f"http://127.0.0.1:{port}/config"
        )
        result["put_good"] = code
        assert code == 200 and json.loads(body)["changed"]["ntp_interval"]["new"] == "300", body
        code, body = curl(
            "-X", "PATCH", "--data-binary", "ntp_interval=ten\n", f"http://127.0.0.1:{port}/config"
        )
        result["put_bad"] = code
        assert code == 422, body
        code, body = curl(f"http://127.0.0.1:{port}/config")
        assert code == 200 and "ntp_interval=300" in body, body
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", 2, args.timeout)  # one from the upload, one from SIGHUP
        notify.wait_for("READY=1", 3, args.timeout)
        result["reload"] = "ok"
        proc.send_signal(signal.SIGTERM)
        result["exit"] = proc.wait(timeout=args.timeout)
        ok = result["exit"] == 0 and len(result["readings"]) >= 2
    except (AssertionError, TimeoutError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        result["error"] = repr(exc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        stop_process(sims)
        broker.stop()
    result["ok"] = ok
    print(json.dumps(result))
    if not ok:
        sys.stderr.write((work / "dcud.log").read_text(errors="replace")[-4000:])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
