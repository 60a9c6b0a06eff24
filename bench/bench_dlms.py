"""DLMS/COSEM benchmarks (docs/dlms.md, "Benchmarks"): one JSON line each.

``profile``  The readout of a 48-hour, 15-minute load profile (192 rows, by range, in GET blocks) over HDLC
             at 9600 Bd, as the polling service does it (association, clock, profile, release, DISC;
             rows committed to a real outbox), against the independent test peer on a socat pty pair.
             The peer paces the pty like a wire (10 bits a byte at 9600 Bd, both ways), so the time can
             be compared with the wire time of the bytes exchanged: (bytes sent + bytes received) x 10 /
             9600 (HDLC is half duplex: request and answer never overlap). Target: at most 1.10x. The
             first readout of a process also reads the profile's capture objects and scalers (cold);
             later ones do not (warm).
``cpu``      CPU time of the benchmark process per profile row over the warm readouts (the whole
             readout: HDLC, APDUs, A-XDR, rows, JSON, the outbox commit in its writer thread, the
             state file), and of the event loop's thread alone (the protocol work).
``footprint`` Resident memory of ``python -m dcud run`` with 100 DLMS meters configured (TCP wrapper, one
             peer, registers, profile and event log, polled every 60 s, sampled until every meter was
             read), next to the same installation without meters and with 10 meters: the difference
             between 10 and 100 is the cost of a meter, the rest the code DLMS brings in.

    python bench/bench_dlms.py [profile|cpu|footprint|all]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dcud.config.model import DlmsConfig, LineConfig, MeterConfig  # noqa: E402
from dcud.service.dlms_meter import DlmsReadouts  # noqa: E402
from dcud.service.line import LineRegistry  # noqa: E402
from dcud.service.outbox import Outbox, OutboxLimits  # noqa: E402
from dcud.sim.peers import start_mosquitto  # noqa: E402
from dcud.transport.serial import SerialPort  # noqa: E402

from peers.dlms_fixture import start_dlms_peer  # noqa: E402  (the test peer, as tests/peers/README.md says)

BAUD = 9600
ROWS = 192
PERIOD_S = 900
NOW = "2024-06-01T12:00:00Z"
WARM_READS = 3


async def _profile_reads(workdir: Path) -> dict[str, Any]:
    with start_dlms_peer(
        workdir / "peer",
        "hdlc",
        hdlc={"baud": BAUD},
        clock={"start": NOW},
        profile={"start": "2024-05-01T00:00:00Z"},
    ) as peer:
        assert peer.device is not None
        line_cfg = LineConfig(name="dlms", device=peer.device, baud=BAUD, framing="8N1")
        meter = MeterConfig(
            name="em-1",
            line="dlms",
            protocol="dlms",
            address=str(peer.physical_address),
            dlms=DlmsConfig(profile="1.0.99.1.0.255", profile_backfill_s=ROWS * PERIOD_S - PERIOD_S),
        )
        registry = LineRegistry()
        line = registry.attach(line_cfg)
        port = SerialPort(peer.device, BAUD, "8N1")
        await port.open()
        line.attach(port)
        outbox = Outbox(workdir / "outbox.sqlite", OutboxLimits(), ["bench"], "dcu-bench")
        await outbox.open()
        seq = iter(range(1, 10**9))
        readouts = DlmsReadouts(
            [meter],
            [line_cfg],
            registry=registry,
            outbox=outbox,
            state_dir=workdir / "state",
            base_dir=workdir,
            device_id="dcu-bench",
            next_seq=lambda _m: next(seq),
            dcu_synced=lambda: None,
        )
        runs: list[dict[str, float]] = []
        try:
            for index in range(1 + WARM_READS):
                if index:
                    await asyncio.to_thread(peer.advance_clock, ROWS * PERIOD_S)
                tx0, rx0 = port.counters.bytes_tx, port.counters.bytes_rx
                cpu0, loop0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
                reading = await readouts.read(meter, "poll", "bench", lease_timeout_s=10, trigger="bench")
                elapsed = time.perf_counter() - t0
                cpu = time.process_time() - cpu0
                loop_cpu = time.thread_time() - loop0
                rows = reading.state["dlms"]["profile"]["last_read"]["committed"]
                assert rows == ROWS, reading.state
                wire_bytes = port.counters.bytes_tx - tx0 + port.counters.bytes_rx - rx0
                wire_s = wire_bytes * 10 / BAUD
                runs.append(
                    {
                        "elapsed_s": elapsed,
                        "wire_s": wire_s,
                        "bytes": wire_bytes,
                        "ratio": elapsed / wire_s,
                        "cpu_s": cpu,
                        "loop_cpu_s": loop_cpu,
                    }
                )
        finally:
            line.detach("closed")
            await outbox.close()
    cold, warm = runs[0], runs[1:]
    return {"cold": cold, "warm": warm}


def bench_profile(runs: dict[str, Any]) -> dict[str, Any]:
    """The ``profile`` line."""
    cold, warm = runs["cold"], runs["warm"]
    ratio = statistics.median(r["ratio"] for r in warm)
    best = min(warm, key=lambda r: r["ratio"])
    return {
        "bench": "dlms_profile_hdlc",
        "rows": ROWS,
        "baud": BAUD,
        "hdlc_info_field_bytes": 128,
        "elapsed_s": round(statistics.median(r["elapsed_s"] for r in warm), 3),
        "wire_s": round(best["wire_s"], 3),
        "bytes": int(best["bytes"]),
        "ratio_to_wire": round(ratio, 3),
        "target_ratio": 1.10,
        "cold_elapsed_s": round(cold["elapsed_s"], 3),
        "cold_ratio_to_wire": round(cold["ratio"], 3),
        "runs": len(warm),
    }


def bench_cpu(runs: dict[str, Any]) -> dict[str, Any]:
    """The ``cpu`` line."""
    warm = runs["warm"]
    per_row_us = statistics.median(r["cpu_s"] for r in warm) / ROWS * 1e6
    return {
        "bench": "dlms_profile_cpu",
        "rows": ROWS,
        "cpu_per_row_us": round(per_row_us, 1),
        "cpu_per_readout_ms": round(statistics.median(r["cpu_s"] for r in warm) * 1000, 1),
        "event_loop_cpu_per_row_us": round(statistics.median(r["loop_cpu_s"] for r in warm) / ROWS * 1e6, 1),
        "cold_cpu_ms": round(runs["cold"]["cpu_s"] * 1000, 1),
        "machine": os.uname().machine,
    }


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _site(workdir: Path, meters: int, port: int, mqtt_url: str) -> str:
    out = [
        'device_id = "dcu-bench"',
        f'state_dir = "{workdir / "state"}"',
        'log_level = "warning"',
        "",
        "[mqtt]",
        f'url = "{mqtt_url}"',
        "",
    ]
    for i in range(meters):
        out += [
            "[[meter]]",
            f'name = "em-{i}"',
            'protocol = "dlms"',
            f'host = "127.0.0.1:{port}"',
            "interval_s = 60",
            "[meter.dlms]",
            'objects = ["1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255"]',
            'profile = "1.0.99.1.0.255"',
            "profile_backfill_s = 86400",
            'event_logs = ["0.0.99.98.0.255"]',
            "",
        ]
    return "\n".join(out)


def _run_daemon(workdir: Path, meters: int, port: int, mqtt_url: str, duration_s: float) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "dcud.toml"
    config.write_text(_site(workdir, meters, port, mqtt_url))
    (workdir / "wme.conf").write_text("datapush_periodic=60\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify.sock"))
    notify.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(workdir / "notify.sock"), "PYTHONUNBUFFERED": "1"}
    log = (workdir / "dcud.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(config)], stdout=log, stderr=log, env=env, cwd=REPO
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        peak = 0
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            peak = max(peak, _status(proc.pid)["VmRSS"])
            time.sleep(0.5)
        final = _status(proc.pid)
        state = workdir / "state" / "dlms"
        read = len(list(state.glob("em-*.json"))) if state.exists() else 0
        return {
            "meters_read": read,
            "rss_mb": round(final["VmRSS"] / 1024, 1),
            "rss_peak_mb": round(max(peak, final["VmHWM"]) / 1024, 1),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        notify.close()


def bench_footprint(workdir: Path, meters: int, duration_s: float) -> dict[str, Any]:
    """The ``footprint`` line."""
    broker = start_mosquitto(workdir / "mosquitto")
    try:
        with start_dlms_peer(workdir / "peer-fp", "tcp", clock={"start": NOW}) as peer:
            assert peer.tcp_port is not None
            baseline = _run_daemon(workdir / "baseline", 0, peer.tcp_port, broker.url, min(10.0, duration_s))
            few = max(1, meters // 10)
            small = _run_daemon(workdir / "few", few, peer.tcp_port, broker.url, duration_s)
            loaded = _run_daemon(workdir / "loaded", meters, peer.tcp_port, broker.url, duration_s)
    finally:
        broker.stop()
    return {
        "bench": "dlms_footprint",
        "meters": meters,
        "transport": "tcp",
        "baseline_rss_mb": baseline["rss_mb"],
        "rss_mb": loaded["rss_mb"],
        "rss_peak_mb": loaded["rss_peak_mb"],
        "meters_read": loaded["meters_read"],
        f"rss_peak_mb_{few}_meters": small["rss_peak_mb"],
        "per_meter_kb": round(
            (loaded["rss_peak_mb"] - small["rss_peak_mb"]) * 1024 / max(1, meters - few), 1
        ),
        "sampled_s": duration_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["profile", "cpu", "footprint", "all"])
    parser.add_argument("--meters", type=int, default=100)
    parser.add_argument("--duration", type=float, default=75.0, help="footprint: seconds to sample")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcud-bench-dlms-") as tmp:
        workdir = Path(tmp)
        if args.which in ("profile", "cpu", "all"):
            runs = asyncio.run(_profile_reads(workdir))
            if args.which in ("profile", "all"):
                print(json.dumps(bench_profile(runs)), flush=True)
            if args.which in ("cpu", "all"):
                print(json.dumps(bench_cpu(runs)), flush=True)
        if args.which in ("footprint", "all"):
            print(json.dumps(bench_footprint(workdir, args.meters, args.duration)), flush=True)


if __name__ == "__main__":
    main()
