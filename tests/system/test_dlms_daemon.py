"""DLMS/COSEM meters through the real daemon (``python -m dcud run``, Mosquitto, chronyd) and the command
line, against the independent test peer (tests/peers): HDLC on a socat pty pair and the TCP wrapper,
LLS and HLS-GMAC with ciphering, the clock set once NTP is synchronised, a refused password that leaves
the daemon running, backfill after an outage, and a kill -9 in the middle of a profile read that loses
and duplicates nothing."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dcud.sim.alarm_peers import start_chronyd
from dcud.sim.peers import Mosquitto

from helpers.commands import Commander
from helpers.daemon import daemon_log, run_dcud, start_daemon, write_site
from peers.dlms_fixture import GREEN_BOOK_AUTHENTICATION_KEY as AK
from peers.dlms_fixture import GREEN_BOOK_BLOCK_CIPHER_KEY as EK
from peers.dlms_fixture import DlmsPeer

pytestmark = pytest.mark.slow

PREFIX = "dcu/dcu-test"
NOW = "2024-06-01T12:00:00Z"
PROFILE = "1.0.99.1.0.255"
Start = Callable[..., DlmsPeer]


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Watcher:
    """Every message under ``<p>/#`` (paho in its own thread), with bounded waits on a condition."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.retained: dict[str, Any] = {}
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{PREFIX}/#", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            return
        with self._cond:
            self.messages.append((message.topic, payload))
            self.retained[message.topic] = payload
            self._cond.notify_all()

    def of(self, suffix: str) -> list[Any]:
        with self._cond:
            return [p for t, p in self.messages if t.endswith(suffix)]

    def events(self, kind: str) -> list[Any]:
        return [p for p in self.of("/event") if p.get("type") == kind]

    def state(self, meter: str) -> dict[str, Any]:
        with self._cond:
            return dict(self.retained.get(f"{PREFIX}/meter/{meter}/state") or {})

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def profile_readings(watcher: Watcher, meter: str) -> list[dict[str, Any]]:
    return [p for p in watcher.of(f"/meter/{meter}/reading") if "profile" in p]


def stop(daemon: subprocess.Popen[bytes], config: Path) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon_log(config)[-4000:]


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_dcud(*args, "-c", str(config), timeout_s=120)


def hdlc_meter(peer: DlmsPeer, name: str) -> str:
    """dcud.toml: the line ``dlms-1`` on the peer's HDLC pty and the first lines of meter ``name`` on it."""
    return f"""[[line]]
name = "dlms-1"
device = "{peer.device}"
baud = 9600
framing = "8N1"

[[meter]]
name = "{name}"
protocol = "dlms"
line = "dlms-1"
address = "{peer.physical_address}"
"""


@pytest.fixture
def chronyd(tmp_path: Path) -> Iterator[int]:
    server = start_chronyd(tmp_path / "chrony")
    try:
        yield server.port
    finally:
        server.stop()


def test_daemon_reads_dlms_meters_over_hdlc_and_tcp(
    dlms_peer: Start, broker: Mosquitto, chronyd: int, tmp_path: Path
) -> None:
    events = [{"at": "2024-06-01T11:40:00Z", "code": 2}]
    peer = dlms_peer("both", clock={"start": NOW}, events=events, max_pdu_size=256)
    clock_peer = dlms_peer("tcp", clock={"start": "2024-06-01T12:00:00Z", "running": True})
    site = tmp_path / "site"
    site.mkdir()
    (site / "keys.toml").write_text(f'block_cipher_key = "{EK}"\nauthentication_key = "{AK}"\n')
    meters = f"""
{hdlc_meter(peer, "em-h")}interval_s = 10
timeout_s = 1
[meter.dlms]
client = 32
auth = "lls"
password = "12345678"
objects = ["1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255"]
profile = "{PROFILE}"
profile_backfill_s = 7200

[[meter]]
name = "em-t"
protocol = "dlms"
host = "127.0.0.1:{peer.tcp_port}"
interval_s = 10
timeout_s = 2
[meter.dlms]
client = 1
auth = "hls-gmac"
security = "authenticated-encrypted"
key_file = "keys.toml"
objects = ["1.0.1.8.0.255", "3/1.0.32.7.0.255/2"]
event_logs = ["0.0.99.98.0.255"]

[[meter]]
name = "em-bad"
protocol = "dlms"
host = "127.0.0.1:{peer.tcp_port}"
interval_s = 10
retries = 0
[meter.dlms]
client = 32
auth = "lls"
password = "wrong-pw-1"
objects = ["1.0.1.8.0.255"]

[[meter]]
name = "em-clock"
protocol = "dlms"
host = "127.0.0.1:{clock_peer.tcp_port}"
interval_s = 10
[meter.dlms]
client = 32
auth = "lls"
password = "12345678"
clock_sync = "set"
max_drift_s = 10
"""
    wme = f"datapush_periodic=10\nntp.address=127.0.0.1\nntp.port={chronyd}\nntp.interval=1\nntp.timeout=1\n"
    config = write_site(site, mqtt_url=broker.url, toml_extra=meters, wme=wme)
    daemon = start_daemon(config)
    watcher = Watcher(broker.port)
    commander = Commander(broker.port)
    try:
        watcher.wait(
            lambda: (
                len(profile_readings(watcher, "em-h")) >= 9
                and any("values" in r and "profile" not in r for r in watcher.of("/meter/em-h/reading"))
                and watcher.of("/meter/em-t/reading")
                and watcher.events("meter_event")
                and watcher.state("em-bad").get("last_error")
                and watcher.state("em-clock").get("dlms", {}).get("clock", {}).get("action") == "set"
            ),
            "readings, profile rows, a meter event, the refusal and the clock set",
            timeout_s=90,
        )
        # HDLC, LLS: registers scaled, the profile from 2 h before the meter's time, each row once
        register = next(r for r in watcher.of("/meter/em-h/reading") if "profile" not in r)
        values = {v["id"]: (v["value"], v["unit"]) for v in register["values"]}
        assert values["1.0.1.8.0.255"][1] == "Wh" and values["1.0.32.7.0.255"][1] == "V"
        assert (
            register["protocol"] == "dlms" and register["line"] == "dlms-1" and register["meter_clock"] == NOW
        )
        rows = profile_readings(watcher, "em-h")
        assert [r["ts"] for r in rows[:9]] == [iso(ts(NOW) - 7200 + 900 * k) for k in range(9)]
        assert rows[-1]["values"][0]["value"] == values["1.0.1.8.0.255"][0]  # the 12:00 row = the register
        # TCP, HLS-GMAC with ciphering: registers and the event log entry as an event
        tcp = watcher.of("/meter/em-t/reading")[0]
        assert tcp["host"] == f"127.0.0.1:{peer.tcp_port}" and len(tcp["values"]) == 2
        (event,) = watcher.events("meter_event")
        assert (event["meter"], event["ts"], event["code"]) == ("em-t", "2024-06-01T11:40:00Z", 2)
        # A refused password: a clear error in the state, the daemon goes on
        bad = watcher.state("em-bad")
        assert bad["last_error"]["type"] == "AuthenticationFailed", bad
        assert "refused the password" in bad["last_error"]["message"] and bad["quality"] == "failing"
        assert [e["meter"] for e in watcher.events("meter_error")] == ["em-bad"]
        # The clock was set once NTP had a verdict (chronyd), and only once
        clock = watcher.state("em-clock")["dlms"]["clock"]
        assert clock["drift_s"] < -1e7 and clock["sync"] == "set"
        watcher.wait(
            lambda: (watcher.state("em-clock").get("counters") or {}).get("ok", 0) >= 2, "a poll after"
        )
        assert len(clock_peer.requests("clock_set")) == 1
        assert watcher.state("em-clock")["dlms"]["clock"]["action"] == "none"
        assert [e["meter"] for e in watcher.events("meter_clock_set")] == ["em-clock"]
        # Through the daemon's lease: cmd/read; a direct read of a meter the daemon reads is refused
        reply = commander.request("read", {"meter": "em-h"})
        assert reply["ok"] and reply["result"]["trigger"] == "command", reply
        direct = run_cli(config, "read", "--meter", "em-t")
        assert direct.returncode == 1 and "is the daemon running?" in direct.stderr, direct.stderr
        stop(daemon, config)
    finally:
        commander.close()
        watcher.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    log = daemon_log(config)
    assert "wrong-pw-1" not in log and EK not in log and AK not in log
    for meter_peer in (peer, clock_peer):
        assert not meter_peer.requests("internal_error")
        accepted = [a for a in meter_peer.requests("aarq") if a["result"] == "accepted"]
        ended = meter_peer.requests("release") + meter_peer.requests("aborted")
        assert len(ended) == len(accepted)  # every association ended (released, or its link closed)


def test_backfill_and_a_kill_9_in_a_profile_read_lose_and_duplicate_nothing(
    dlms_peer: Start, broker: Mosquitto, tmp_path: Path
) -> None:
    # A 9600 Bd line: two days of rows (192) take seconds, so the daemon can be killed in the middle.
    peer = dlms_peer(
        "hdlc", hdlc={"baud": 9600}, clock={"start": NOW}, profile={"start": "2024-05-20T00:00:00Z"}
    )
    meters = f"""
{hdlc_meter(peer, "em-1")}interval_s = 86400
timeout_s = 0.5
retries = 0
[meter.dlms]
profile = "{PROFILE}"
profile_backfill_s = 3600
"""
    config = write_site(tmp_path / "site", mqtt_url=broker.url, toml_extra=meters)
    watcher = Watcher(broker.port)
    commander = Commander(broker.port)
    daemon = start_daemon(config)
    try:
        commander.wait_serving()
        assert commander.request("read", {"meter": "em-1"})["ok"]
        watcher.wait(lambda: len(profile_readings(watcher, "em-1")) >= 5, "the first contact's rows")
        # The meter falls silent for three capture periods: readouts fail, nothing is published.
        peer.silent()
        peer.advance_clock(3 * 900)
        failed = commander.request("read", {"meter": "em-1"})
        assert not failed["ok"] and failed["error"]["type"] == "PeerTimeout", failed
        watcher.wait(
            lambda: (watcher.state("em-1").get("last_error") or {}).get("type") == "PeerTimeout", "the error"
        )
        # Two days pass (the DCU stays down meanwhile, as far as the meter can tell).
        peer.advance_clock(2 * 86400 - 3 * 900)
        peer.speak()
        since = peer.status()["last_seq"]
        commander.publish("read", json.dumps({"meter": "em-1", "id": "killed"}).encode())
        peer.wait_for("get_next", 3, since)  # the profile is coming in blocks...
        daemon.send_signal(signal.SIGKILL)  # ... and the DCU dies
        daemon.wait(timeout=10)
        assert len(profile_readings(watcher, "em-1")) == 5  # nothing of the cut read was committed
        daemon = start_daemon(config)
        commander.wait_serving()
        reply = commander.request("read", {"meter": "em-1"}, timeout_s=60)
        assert reply["ok"], reply
        watcher.wait(lambda: len(profile_readings(watcher, "em-1")) >= 5 + 192, "every missed row", 60)
        stop(daemon, config)
    finally:
        commander.close()
        watcher.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    rows = profile_readings(watcher, "em-1")
    # MQTT is at least once: a message sent again after the kill has the same seq. A row committed twice
    # would have two seqs.
    seqs_by_ts: dict[str, set[int]] = {}
    for row in rows:
        seqs_by_ts.setdefault(row["ts"], set()).add(row["seq"])
    assert all(len(s) == 1 for s in seqs_by_ts.values()), {t: s for t, s in seqs_by_ts.items() if len(s) > 1}
    expected = [iso(ts(NOW) - 3600 + 900 * k) for k in range(5 + 192)]
    assert sorted(seqs_by_ts) == expected  # every row, none missing
    first_seen = list(dict.fromkeys(r["ts"] for r in rows))
    assert first_seen == expected  # in order
    profile_gets = [
        r for r in peer.requests("get", since=since) if r.get("obis") == PROFILE and r.get("attr") == 2
    ]
    assert len(profile_gets) == 2 and profile_gets[0]["from"] == profile_gets[1]["from"]  # the cut read again
    assert profile_gets[1]["from"].startswith("2024-06-01T12:00:01")


def test_dcud_read_and_dlms_objects_from_the_command_line(dlms_peer: Start, tmp_path: Path) -> None:
    peer = dlms_peer("both", clock={"start": NOW})
    meters = f"""
{hdlc_meter(peer, "em-h")}[meter.dlms]
objects = ["1.0.1.8.0.255", "1.0.32.7.0.255"]

[[meter]]
name = "em-t"
protocol = "dlms"
host = "127.0.0.1:{peer.tcp_port}"
[meter.dlms]
client = 1
auth = "hls-gmac"
security = "authenticated-encrypted"
block_cipher_key = "{EK}"
authentication_key = "{AK}"
objects = ["1.0.1.8.0.255"]
profile = "{PROFILE}"
"""
    config = write_site(tmp_path / "site", toml_extra=meters)
    for meter in ("em-h", "em-t"):
        done = run_cli(config, "read", "--meter", meter)
        assert done.returncode == 0, done.stderr
        reading = json.loads(done.stdout)
        assert reading["protocol"] == "dlms" and reading["trigger"] == "cli"
        assert reading["values"][0]["id"] == "1.0.1.8.0.255" and reading["values"][0]["unit"] == "Wh"
        assert reading["clock"]["meter_time"] == NOW
    objects = run_cli(config, "dlms", "objects", "--meter", "em-t")
    assert objects.returncode == 0, objects.stderr
    listed = {o["obis"]: o for o in json.loads(objects.stdout)["objects"]}
    assert listed["0.0.1.0.0.255"]["class_id"] == 8 and listed[PROFILE]["class"] == "Profile generic"
    assert listed["0.0.40.0.0.255"]["methods"] == [{"id": 1, "access": 1}]
    # The command line took no profile row: the daemon's cursor is untouched.
    assert not [r for r in peer.requests("get") if r.get("obis") == PROFILE and r.get("attr") == 2]
    # Each process took fresh invocation counters (the meter refused none) and gave the rest back.
    assert not peer.requests("refused")
    state = json.loads((tmp_path / "site" / "state" / "dlms" / "em-t.json").read_text())
    (counter,) = state["invocation_counters"].values()
    assert counter["reserved"] == counter["next"] < 100
    unknown = run_cli(config, "dlms", "objects", "--meter", "nope")
    assert unknown.returncode == 1 and "no DLMS meter named" in unknown.stderr
