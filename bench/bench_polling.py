"""Polling efficiency: wall time to read every meter of a line / the time the protocol itself needs.

Setup (everything real except the meters): ``dcud sim meters`` in its own process paces its answers at
the simulated baud rate with the standard's minimum reaction times; this process runs the real line
services, the real polling service and the real SQLite outbox under the supervisor, as ``dcud run``
does. Both lines are polled in parallel, as on a site: an M-Bus line (default 250 heat meters, 2400 Bd)
and an RS485 line of IEC 62056-21 mode C meters (default 32, sign-on at 300 Bd, readout at 9600 Bd).

The protocol time of a line is computed from what actually went over the wire for every reading:
M-Bus: SND_NKE (5) + E5 (1) + per telegram REQ_UD2 (5) + RSP_UD, 11 bits per character, plus the
minimum reaction time of 11 bit times before each slave answer. IEC: request, identification and
option select at 300 Bd, the data message at the negotiated rate, 10 bits per character, plus three
minimum reaction times (200 ms, or 20 ms for a fast meter): meter before its identification, master
before its option select, meter before its data. Elapsed time runs from the scheduled slot to the end of
the last readout of the pass. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcud.config.model import LineConfig, MeterConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SystemClock
from dcud.runtime.supervisor import Supervisor, SupervisorOptions
from dcud.service.line import LineRegistry, LineService, LineServiceConfig
from dcud.service.outbox import Outbox, OutboxLimits, OverflowPolicy
from dcud.service.poll_schedule import first_slot_s
from dcud.service.polling import PollingConfig, PollingService

INTERVAL_S = 3600
"""Longer than a pass: the measurement is one pass over every meter."""
FIRST_SLOT_IN_S = 2.0


def sims_toml(mbus_meters: int, iec_meters: int) -> str:
    out = ["[[line]]", 'name = "mbus"', 'protocol = "mbus"', 'link = "mbus.tty"', ""]
    for i in range(1, mbus_meters + 1):
        out += ["[[line.meter]]", f'address = "{i}"', 'kind = "heat"', f"base = {10000 + i}", ""]
    out += ["[[line]]", 'name = "iec"', 'protocol = "iec62056-21"', 'link = "iec.tty"', ""]
    for i in range(1, iec_meters + 1):
        out += ["[[line.meter]]", f'address = "{70000000 + i}"', 'baud_char = "5"', f"base = {500 + i}", ""]
    return "\n".join(out)


def mbus_protocol_s(payload: dict[str, Any], baud: int) -> float:
    frames = [base64.b64decode(f) for f in payload["frames"]]
    chars = 5 + 1 + sum(5 + len(f) for f in frames)
    answers = 1 + len(frames)
    return (chars + answers) * 11 / baud


def iec_protocol_s(payload: dict[str, Any]) -> float:
    ident = payload["ident"]
    request = len(f"/?{payload['address']}!\r\n")
    at_300 = request + len(ident) + 2 + 6
    raw = payload["raw"].encode("latin-1")
    tr_min = 0.02 if ident[3].islower() else 0.2
    return at_300 * 10 / 300 + len(raw) * 10 / payload["baud"] + 3 * tr_min


class ShiftedClock(SystemClock):
    """The real clock with its wall time moved by ``offset_s`` (monotonic time and sleeps unchanged)."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s


class RecordingOutbox:
    """The real outbox, plus a copy of every reading for the measurement."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.readings: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def put(self, kind: str, subtopic: str, payload: bytes) -> Any:
        item = await self.outbox.put(kind, subtopic, payload)
        if kind == "reading":
            self.readings.append(json.loads(payload))
            self.changed.set()
        return item


async def measure(workdir: Path, mbus_meters: int, iec_meters: int, iec_baud: int) -> dict[str, Any]:
    # The only departure from ``dcud run``: the polling service's clock is set 2 s before the next full
    # hour, so the benchmark need not wait for the wall clock.
    now = time.time()
    clock = ShiftedClock(first_slot_s(now, INTERVAL_S) - now - FIRST_SLOT_IN_S)
    lines = (
        LineConfig(name="mbus-1", device=str(workdir / "mbus.tty"), kind="mbus"),
        LineConfig(name="rs485-1", device=str(workdir / "iec.tty"), kind="rs485"),
    )
    meters = [
        MeterConfig(name=f"m{i}", line="mbus-1", protocol="mbus", address=str(i), interval_s=INTERVAL_S)
        for i in range(1, mbus_meters + 1)
    ] + [
        MeterConfig(
            name=f"e{i}",
            line="rs485-1",
            protocol="iec62056-21",
            address=str(70000000 + i),
            interval_s=INTERVAL_S,
        )
        for i in range(1, iec_meters + 1)
    ]
    outbox = Outbox(
        workdir / "outbox.sqlite",
        OutboxLimits(max_bytes=256 * 1024 * 1024, max_age_s=86400.0, policy=OverflowPolicy("drop_oldest")),
        consumers=["bench"],
        device_id="bench",
    )
    await outbox.open()
    recorder = RecordingOutbox(outbox)
    registry = LineRegistry()
    bus = EventBus()
    polling = PollingService(
        PollingConfig(meters=tuple(meters), lines=lines, iec_max_baud=iec_baud, state_dir=str(workdir)),
        registry,
        bus,
        recorder,
        clock=clock,
    )
    services = [LineService(LineServiceConfig(line), registry, bus) for line in lines]
    sup = Supervisor([*services, polling], options=SupervisorOptions(grace_s=5, liveness_s=30))
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.all_ready.wait(), 20)
        slot = min(h.next_due_s for h in polling.meters.values())
        budget_s = (slot - clock.time()) + 30 + mbus_meters * 1.0 + iec_meters * 5.0
        deadline = time.monotonic() + budget_s
        while True:
            first = [r for r in recorder.readings if r.get("slot") == _rfc3339(slot)]
            if len(first) >= mbus_meters + iec_meters:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(first)} readings within {budget_s:.0f} s")
            recorder.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recorder.changed.wait(), 5)
    finally:
        sup.request_stop()
        await asyncio.wait_for(task, 30)
        await outbox.close()

    def summary(line: str, protocol_s: float, readings: list[dict[str, Any]], baud: int) -> dict[str, Any]:
        ends = [_parse(r["ts"]) for r in readings]
        elapsed = max(ends) - slot
        return {
            "meters": len(readings),
            "baud": baud,
            "elapsed_s": round(elapsed, 3),
            "protocol_s": round(protocol_s, 3),
            "ratio": round(elapsed / protocol_s, 4),
            "per_meter_overhead_ms": round((elapsed - protocol_s) / len(readings) * 1000, 2),
            "failed": sum(h.failed for h in polling.meters.values() if h.config.line == line),
        }

    mbus = [r for r in first if r["line"] == "mbus-1"]
    iec = [r for r in first if r["line"] == "rs485-1"]
    result: dict[str, Any] = {}
    if mbus:
        result["mbus"] = summary("mbus-1", sum(mbus_protocol_s(r, 2400) for r in mbus), mbus, 2400)
    if iec:
        result["iec"] = summary("rs485-1", sum(iec_protocol_s(r) for r in iec), iec, iec_baud)
    return result


def _rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _parse(ts: str) -> float:
    import calendar

    base, _, frac = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + (float("0." + frac) if frac else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbus", type=int, default=250, help="M-Bus meters on one 2400 Bd line")
    parser.add_argument("--iec", type=int, default=32, help="IEC 62056-21 meters on one RS485 line")
    parser.add_argument("--iec-baud", type=int, default=9600, help="mode C readout rate")
    args = parser.parse_args()
    from dcud.log import setup_logging

    setup_logging("error")
    with tempfile.TemporaryDirectory(prefix="dcud-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "sims.toml").write_text(sims_toml(args.mbus, args.iec))
        sim = subprocess.Popen(
            [sys.executable, "-m", "dcud", "sim", "meters", "--config", str(workdir / "sims.toml")],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert sim.stdout is not None
            for _ in range(3):
                if json.loads(sim.stdout.readline()).get("ready"):
                    break
            result = asyncio.run(measure(workdir, args.mbus, args.iec, args.iec_baud))
        finally:
            sim.terminate()
            sim.wait(timeout=10)
    print(
        json.dumps(
            {
                "bench": "polling",
                "target_ratio": 1.05,
                "parallel_lines": True,
                "python": sys.version.split()[0],
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
