"""Catch-up after an outage: N readings waiting in the outbox, delivered over FTP and over MQTT.

The outbox is filled by a child process (so its memory does not count), then this process runs the real
data push service (schedule, retry policy, uploaders) against a local FTP server (dcud.sim.ftp_server)
and a local Mosquitto, one target after the other, with a clock that does not wait for the cycle
boundary. Peak RSS is sampled every 20 ms during each drain. Prints one JSON line.

Usage: python bench/bench_catchup.py [--items 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service.datapush import DataPushService, DataPushServiceConfig, Uploader
from dcud.service.ftp_push import FtpUploader
from dcud.service.mqtt_push import MqttPusher
from dcud.service.outbox import Outbox, OutboxLimits
from dcud.sim.ftp_server import start_ftp_server
from dcud.sim.peers import start_mosquitto
from dcud.sim.readings import iec_reading, reading_bytes

CONSUMERS = ["ftp", "mqtt-push"]
T0 = 1_780_000_000.0


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_mib()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())


async def prefill(path: Path, items: int) -> None:
    outbox = Outbox(path, OutboxLimits(max_bytes=1024 * 2**20), CONSUMERS, "bench")
    await outbox.open()
    try:
        for start in range(0, items, 5000):
            rows = [
                ("reading", f"meter/m{n % 50}/reading", reading_bytes(iec_reading(f"m{n % 50}", n, T0 + n)))
                for n in range(start, min(items, start + 5000))
            ]
            await outbox.put_many(rows)
    finally:
        await outbox.close()


class NoWaitClock:
    """Cycle boundaries come at once (the catch-up is what is measured, not the schedule)."""

    def __init__(self) -> None:
        self.t = T0

    def now(self) -> float:
        return self.t

    async def sleep(self, ctx: ServiceContext, delay_s: float) -> bool:
        self.t += delay_s
        await asyncio.sleep(0)
        return ctx.stopping.is_set()


def push_slice(site: Path, url: str, batch: int) -> DataPushServiceConfig:
    site.mkdir(parents=True, exist_ok=True)
    (site / "wme.conf").write_text(f"datapush_host={url}\ndatapush_prefix=BENCH\ndatapush_timeout=60000\n")
    (site / "dcud.toml").write_text(
        f'device_id = "bench"\nstate_dir = "{site / "state"}"\n[datapush]\nbatch_items = {batch}\n'
        "mqtt_inflight = 500\n"
    )
    slice_ = DataPushServiceConfig.from_config(load_config(site / "dcud.toml"))
    assert slice_ is not None
    return slice_


async def drain(
    outbox: Outbox, slice_: DataPushServiceConfig, uploader: Uploader, items: int
) -> dict[str, Any]:
    service = DataPushService(slice_, EventBus(), outbox, uploader, NoWaitClock())
    ctx = ServiceContext("datapush", 30.0, lambda: None)
    sampler = RssSampler()
    rss_start = rss_mib()
    sampler.start()
    start = time.perf_counter()
    task = asyncio.create_task(service.run(ctx))
    for _ in range(36_000):  # at most 30 minutes
        if outbox.stats().backlog[uploader.consumer] == 0 or task.done():
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - start
    ctx.stopping.set()
    await task
    sampler.stop.set()
    sampler.join()
    if service.pushed_items != items:
        raise SystemExit(f"{uploader.consumer}: delivered {service.pushed_items} of {items}")
    return {
        "seconds": round(elapsed, 2),
        "items_per_s": round(items / elapsed),
        "rss_start_mib": round(rss_start, 1),
        "rss_peak_mib": round(sampler.peak, 1),
    }


async def run(items: int, batch: int, workdir: Path) -> dict[str, Any]:
    db = workdir / "outbox.sqlite"
    ftp = start_ftp_server(workdir / "ftp")
    broker = start_mosquitto(workdir / "mosquitto")
    try:
        outbox = Outbox(db, OutboxLimits(max_bytes=1024 * 2**20), CONSUMERS, "bench")
        await outbox.open()
        try:
            ftp_slice = push_slice(workdir / "site-ftp", ftp.url("/in"), batch)
            ftp_result = await drain(outbox, ftp_slice, FtpUploader.from_slice(ftp_slice), items)
            files = len(list((ftp.root / "in").glob("*.csv")))
            mqtt_slice = push_slice(workdir / "site-mqtt", f"{broker.url}/bench", batch)
            pusher = MqttPusher.from_slice(mqtt_slice)
            mqtt_result = await drain(outbox, mqtt_slice, pusher, items)
            mqtt_result["messages"] = pusher.published
        finally:
            await outbox.close()
    finally:
        ftp.stop()
        broker.stop()
    peak = max(ftp_result["rss_peak_mib"], mqtt_result["rss_peak_mib"])
    return {
        "bench": "catchup",
        "items": items,
        "batch_items": batch,
        "ftp": {**ftp_result, "file_sets": files},
        "mqtt": mqtt_result,
        "rss_peak_mib": peak,
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": {
            "rss_under_60_mib": peak < 60,
            "mqtt_at_least_3000_per_s": mqtt_result["items_per_s"] >= 3000,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--prefill", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prefill:
        asyncio.run(prefill(Path(args.prefill), args.items))
        return
    with tempfile.TemporaryDirectory(prefix="dcud-bench-catchup-") as tmp:
        workdir = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--prefill",
                str(workdir / "outbox.sqlite"),
                "--items",
                str(args.items),
            ],
            check=True,
        )
        print(json.dumps(asyncio.run(run(args.items, args.batch, workdir))))


if __name__ == "__main__":
    main()
