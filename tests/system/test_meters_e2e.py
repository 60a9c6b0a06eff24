"""End to end as processes: ``dcud run`` polls the simulators on ptys and readings arrive on a real
Mosquitto with the right values; a meter goes silent and comes back (meter_silent once); ``dcud read
--via-mqtt`` goes through the daemon's lease."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dcud.sim.peers import Mosquitto
from dcud.sim.serial_sim import SimMeterSpec, iec_expected_values, mbus_expected_values

from helpers import REPO
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.meters import simulator_process, write_control
from helpers.mqtt import Subscriber

PREFIX = "dcu/dcu-test"

SIMS = """\
control = "control.json"
[[line]]
name = "mbus"
protocol = "mbus"
link = "mbus.tty"
[[line.meter]]
address = "1"
kind = "heat"
base = 4321
[[line.meter]]
address = "2"
kind = "water"
base = 999
[[line]]
name = "iec"
protocol = "iec62056-21"
link = "iec.tty"
[[line.meter]]
address = "12345678"
base = 20411.5
fast_reaction = true
"""

METERS = """
[[line]]
name = "mbus-1"
device = "{d}/mbus.tty"
kind = "mbus"
[[line]]
name = "rs485-1"
device = "{d}/iec.tty"
kind = "rs485"
[[meter]]
name = "heat-1"
line = "mbus-1"
protocol = "mbus"
address = "1"
interval_s = 10
retries = 0
timeout_s = 0.3
[[meter]]
name = "water-2"
line = "mbus-1"
protocol = "mbus"
address = "2"
interval_s = 10
[[meter]]
name = "flat-12"
line = "rs485-1"
protocol = "iec62056-21"
address = "12345678"
interval_s = 10
"""


@pytest.fixture
def simulators(tmp_path: Path) -> Iterator[Path]:
    with simulator_process(tmp_path, SIMS):
        yield tmp_path


class Watcher(Subscriber):
    """Everything the daemon publishes, by topic."""

    def __init__(self, port: int) -> None:
        super().__init__(port, [f"{PREFIX}/#"], PREFIX, name="e2e-watcher", skip_non_json=True)

    @property
    def retained(self) -> dict[str, Any]:
        """The last payload of each (full) topic."""
        return dict(self.messages)

    def of(self, suffix: str) -> list[Any]:
        return [p for t, p in self.messages if t.endswith(suffix)]

    def events_of(self, kind: str) -> list[Any]:
        return [p for p in self.of("/event") if p.get("type") == kind]


@pytest.mark.slow
async def test_daemon_polls_simulated_meters_into_mqtt(simulators: Path, broker: Mosquitto) -> None:
    site_dir = simulators
    config = write_site(
        site_dir / "site",
        mqtt_url=broker.url,
        toml_extra=METERS.format(d=site_dir),
        wme="datapush_periodic=1\n",
    )
    daemon = start_daemon(config)
    try:
        async with Watcher(broker.port) as watcher:
            await watcher.wait(
                lambda: all(watcher.of(f"/meter/{m}/reading") for m in ("heat-1", "water-2", "flat-12")),
                "a reading of every meter",
                60,
            )
            heat = watcher.of("/meter/heat-1/reading")[0]
            expected = mbus_expected_values(SimMeterSpec("1", kind="heat", base=4321))
            got = [(v["value"], v["unit"]) for v in heat["values"][: len(expected)]]
            assert got == [pytest.approx(e) for e in expected]
            assert heat["meter"] == "heat-1" and heat["seq"] >= 1 and heat["ts"].endswith("Z")
            flat = watcher.of("/meter/flat-12/reading")[0]
            spec = SimMeterSpec("12345678", base=20411.5, fast_reaction=True)
            assert {v["id"]: v["value"] for v in flat["values"]} == iec_expected_values(spec)
            assert flat["raw"].startswith("\x02") and flat["ident"].startswith("/SIm5")
            assert watcher.retained[f"{PREFIX}/line/mbus-1/state"]["state"] == "open"
            assert watcher.retained[f"{PREFIX}/meter/heat-1/state"]["quality"] == "ok"

            # The MQTT read command goes through the daemon's lease on the line.
            via = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "dcud",
                    "read",
                    "-c",
                    str(config),
                    "--meter",
                    "water-2",
                    "--via-mqtt",
                ],
                capture_output=True,
                cwd=REPO,
                timeout=60,
                check=False,
            )
            assert via.returncode == 0, via.stderr
            assert json.loads(via.stdout)["trigger"] == "command"

            # heat-1 stops answering: failing, meter_silent exactly once over several cycles.
            write_control(site_dir / "control.json", ["1"])
            await watcher.wait(lambda: watcher.events_of("meter_silent"), "meter_silent", 40)
            await watcher.wait(
                lambda: watcher.retained[f"{PREFIX}/meter/heat-1/state"]["counters"]["failed"] >= 2,
                "a second failed cycle",
                40,
            )
            assert len(watcher.events_of("meter_silent")) == 1
            assert watcher.retained[f"{PREFIX}/meter/heat-1/state"]["quality"] == "failing"
            readings_while_silent = len(watcher.of("/meter/heat-1/reading"))
            write_control(site_dir / "control.json", [])
            await watcher.wait(lambda: watcher.events_of("meter_back"), "meter_back", 40)
            await watcher.wait(
                lambda: len(watcher.of("/meter/heat-1/reading")) > readings_while_silent,
                "a new reading",
                30,
            )
            assert len(watcher.events_of("meter_silent")) == 1
            seqs = [r["seq"] for r in watcher.of("/meter/heat-1/reading")]
            assert len(seqs) == len(set(seqs))
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon_log(config)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
