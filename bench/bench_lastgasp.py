"""Last-gasp latency: from the power file changing to the trap at snmptrapd and the event at an MQTT client.

Runs ``python -m dcud run`` against real peers on loopback (Mosquitto, Net-SNMP snmptrapd with an SNMPv3
SHA + AES-128 user, a UDP event push receiver), then for each cycle writes ``0`` to the power file and
waits for the dcudPowerLoss trap, the ``power_loss`` MQTT event and the UDP push, then writes ``1`` and
waits for the return. Latency is measured from just before the file write. It includes detection (the
file is polled every ``poll_interval_s``, the level must be stable for ``debounce_s``; defaults), the
outbox commit (fsync), the trap and the MQTT round trip through the broker. snmptrapd's log is tailed
every millisecond, so trap times are up to ~1 ms late.

Prints one JSON line. Usage: python bench/bench_lastgasp.py [--cycles 50] [--poll-s 0.02] [--debounce-s 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dcud.service import snmp_mib  # noqa: E402
from dcud.sim.alarm_peers import SnmpUser, start_snmptrapd, stop_process  # noqa: E402
from dcud.sim.peers import start_mosquitto  # noqa: E402

DEVICE = "bench"
AUTH_KEY = "auth-pass-123"
PRIV_KEY = "priv-pass-456"


class Stamps:
    """Arrival times (monotonic) of matching items, appended by reader threads."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cond = threading.Condition()

    def add(self) -> None:
        with self.cond:
            self.times.append(time.monotonic())
            self.cond.notify_all()

    def wait_count(self, n: int, timeout_s: float = 10.0) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.times) >= n, timeout_s):
                raise TimeoutError(f"only {len(self.times)} of {n} arrived")
            return self.times[n - 1]


def tail_traps(path: Path, losses: Stamps, returns: Stamps, stop: threading.Event) -> None:
    offset = 0
    pending = b""
    while not stop.is_set():
        try:
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"TRAP|"):
                    if b"dcudPowerLoss\t" in line:
                        losses.add()
                    elif b"dcudPowerReturn\t" in line:
                        returns.add()
        else:
            time.sleep(0.001)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--poll-s", type=float, default=0.02)
    parser.add_argument("--debounce-s", type=float, default=0.05)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dcud-bench-lastgasp-"))
    broker = start_mosquitto(work / "mosquitto")
    engine_id = snmp_mib.default_engine_id(DEVICE)
    trapd = start_snmptrapd(
        work / "trapd",
        users=(SnmpUser("dcud", engine_id, "SHA", AUTH_KEY, "AES", PRIV_KEY),),
        mib_dirs=(ROOT / "tests" / "mibs", ROOT / "mibs"),
        mibs=("DCUD-MIB", "SNMPv2-MIB"),
    )
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    power_file = work / "online"
    power_file.write_text("1\n")
    site = work / "site"
    site.mkdir()
    (site / "dcud.toml").write_text(
        f'device_id = "{DEVICE}"\nparameters = "wme.conf"\nstate_dir = "{site / "state"}"\n'
        'log_level = "warning"\n'
        f'\n[power]\nsource = "file"\npath = "{power_file}"\n'
        f"poll_interval_s = {args.poll_s}\ndebounce_s = {args.debounce_s}\n"
        f'\n[mqtt]\nurl = "{broker.url}"\n'
    )
    (site / "wme.conf").write_text(
        "snmp_trap=1\nsnmp_manager_ip=127.0.0.1\n"
        f"snmp_manager_port={trapd.port}\nsnmp_version=3\nsnmp_user=dcud\n"
        f"snmp_auth_algo=2\nsnmp_auth_key={AUTH_KEY}\nsnmp_priv_algo=3\nsnmp_priv_key={PRIV_KEY}\n"
        f"eventpush_addr=127.0.0.1:{udp.getsockname()[1]}\n"
    )
    trap_loss, trap_return, mqtt_loss, mqtt_return, push = Stamps(), Stamps(), Stamps(), Stamps(), Stamps()
    stop = threading.Event()
    tail = threading.Thread(
        target=tail_traps, args=(trapd.log_path, trap_loss, trap_return, stop), daemon=True
    )
    tail.start()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        kind = json.loads(message.payload).get("type")
        if kind == "power_loss":
            mqtt_loss.add()
        elif kind == "power_return":
            mqtt_return.add()

    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub")
    subscriber.on_message = on_message
    subscriber.connect("127.0.0.1", broker.port)
    subscriber.subscribe(f"dcu/{DEVICE}/event", qos=1)
    subscriber.loop_start()

    def udp_reader() -> None:
        udp.settimeout(0.2)
        while not stop.is_set():
            try:
                udp.recv(2048)
            except TimeoutError:
                continue
            push.add()

    threading.Thread(target=udp_reader, daemon=True).start()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(site / "dcud.toml")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(work / "dcud.log").open("ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    to_trap: list[float] = []
    to_mqtt: list[float] = []
    to_push: list[float] = []
    try:
        time.sleep(3.0)  # services up, MQTT connected (the first cycle waits for the outcome anyway)
        for cycle in range(1, args.cycles + 1):
            t0 = time.monotonic()
            power_file.write_text("0\n")
            to_trap.append(trap_loss.wait_count(cycle) - t0)
            to_mqtt.append(mqtt_loss.wait_count(cycle) - t0)
            to_push.append(push.wait_count(2 * cycle - 1) - t0)
            power_file.write_text("1\n")
            trap_return.wait_count(cycle)
            mqtt_return.wait_count(cycle)
            push.wait_count(2 * cycle)
            time.sleep(0.05)
    finally:
        stop.set()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        subscriber.loop_stop()
        subscriber.disconnect()
        stop_process(trapd.process)
        broker.stop()
        udp.close()

    def ms(values: list[float], q: str) -> float:
        value = statistics.median(values) if q == "p50" else max(values)
        return round(value * 1000, 1)

    print(
        json.dumps(
            {
                "bench": "lastgasp",
                "cycles": args.cycles,
                "poll_interval_s": args.poll_s,
                "debounce_s": args.debounce_s,
                "snmp": "v3 SHA+AES128",
                "trap_p50_ms": ms(to_trap, "p50"),
                "trap_max_ms": ms(to_trap, "max"),
                "mqtt_p50_ms": ms(to_mqtt, "p50"),
                "mqtt_max_ms": ms(to_mqtt, "max"),
                "udp_push_p50_ms": ms(to_push, "p50"),
                "udp_push_max_ms": ms(to_push, "max"),
                "target_p50_ms": 100,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
