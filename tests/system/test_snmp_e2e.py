"""SNMP against the running daemon (``python -m dcud run``): Net-SNMP's snmpwalk, snmpbulkwalk and
snmpget (v2c and v3 SHA + AES-128) read what MQTT shows, refusals are counted, hostile datagrams
cause no restart; and the alarms the daemon raises (drive fault and heartbeat, meter error and back,
outbox corrupt, configuration changed, firmware staged) reach snmptrapd as acknowledged INFORMs,
with a stopped manager retried within the bound, then counted as failed.

Real peers: Mosquitto, snmptrapd, the CiA 402 drive simulator (``dcud sim drive``) on a socat pty
pair carrying slcan, the M-Bus meter simulator on another pty pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcud.sim.alarm_peers import SnmpTrapd
from dcud.sim.peers import Mosquitto, free_port
from dcud.sim.serial_sim import SimConfig, SimLineSpec, SimMeterSpec

from helpers import alarm
from helpers.alarm import AUTH_KEY, PRIV_KEY, USER, is_trap, snmp_params, trap_receiver
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.drives import simulator as drive_simulator
from helpers.meters import SocatPair, simulators
from helpers.mqtt import Subscriber
from helpers.notify import NotifySocket
from helpers.snmp import COMMUNITY, hostile_datagrams

pytestmark = pytest.mark.slow

PREFIX = "dcu/dcu-test"
V3 = ("-v3", "-u", USER, "-l", "authPriv", "-a", "SHA", "-A", AUTH_KEY, "-x", "AES", "-X", PRIV_KEY)

SITE = """
[snmp]
agent_listen = "127.0.0.1:{agent_port}"
agent_community = "{community}"
agent_max_requests_per_s = 1000
{snmp_extra}

[transparent]
listen = "loopback"

[config_port]
listen = "loopback"
plain_writes = true

[[line]]
name = "mbus-1"
device = "{mbus_link}"
kind = "mbus"
transparent = "primary"

[[meter]]
name = "heat-1"
line = "mbus-1"
protocol = "mbus"
address = "1"
interval_s = 10
retries = 0
timeout_s = 0.5

[[can]]
name = "can0"
interface = "slcan"
channel = "{can_link}"
options = {{ sleep_after_open = 0 }}

[[drive]]
name = "axis-1"
bus = "can0"
protocol = "canopen"
node_id = 1
state_interval_s = 0.2
"""


class Retained(Subscriber):
    """Every retained state and event dcud publishes, as a background MQTT subscriber sees them."""

    def __init__(self, port: int) -> None:
        super().__init__(
            port, [f"{PREFIX}/#"], PREFIX, name="snmp-e2e", skip_non_json=True, wait_timeout_s=30.0
        )


def net_snmp(
    tool: str, *args: str, timeout_s: float = 2.0, retries: int = 2
) -> subprocess.CompletedProcess[str]:
    """A Net-SNMP command with DCUD-MIB loaded; -OQUt: ``name = value``, no units, raw time ticks."""
    return alarm.net_snmp(tool, *args, timeout_s=timeout_s, retries=retries, options=("-OQUt",))


def parse(output: str) -> dict[str, str]:
    values = {}
    for line in output.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            values[name.strip().removeprefix("DCUD-MIB::")] = value.strip().strip('"')
    return values


def text(value: Any) -> str:
    return "" if value is None else str(value)


def expected_from_mqtt(states: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What an SNMP walk must show, written out field by field from the retained MQTT documents."""
    status = states["status"]
    enum = {None: "unknown", True: "synced", False: "unsynced"}
    want = {
        "dcudDevId.0": status["device_id"],
        "dcudDevVersion.0": status["version"],
        "dcudDevPower.0": status["power"]["state"],
        "dcudDevClockSynced.0": enum[status["clock"].get("synced")],
        "dcudDevOutboxMaxBytes.0": str(status["outbox"]["max_bytes"]),
        "dcudDevOutboxDepth.0": str(status["outbox"]["depth"]),
        "dcudDevOutboxDropped.0": str(sum(status["outbox"]["dropped"].values())),
        "dcudDevUplinkState.0": "unknown",
    }
    line = states["line/mbus-1"]
    key = '"mbus-1"'
    want |= {
        f"dcudLineState.{key}": line["state"],
        f"dcudLineDevice.{key}": line["device"],
        f"dcudLineKind.{key}": line["kind"],
        f"dcudLineBytesRx.{key}": str(line["bytes_rx"]),
        f"dcudLineBytesTx.{key}": str(line["bytes_tx"]),
        f"dcudLineErrors.{key}": str(line["errors"]),
        f"dcudLineSince.{key}": line["since"],
    }
    meter = states["meter/heat-1"]
    key = '"heat-1"'
    want |= {
        f"dcudMeterLine.{key}": meter["line"],
        f"dcudMeterProtocol.{key}": meter["protocol"],
        f"dcudMeterQuality.{key}": meter["quality"],
        f"dcudMeterStatus.{key}": meter["status"],
        f"dcudMeterLastSuccess.{key}": text(meter["last_success"]),
        f"dcudMeterConsecutiveFailures.{key}": str(meter["consecutive_failures"]),
        f"dcudMeterReads.{key}": str(meter["counters"]["reads"]),
        f"dcudMeterReadsOk.{key}": str(meter["counters"]["ok"]),
        f"dcudMeterReadsFailed.{key}": str(meter["counters"]["failed"]),
    }
    drive = states["drive/axis-1"]
    key = '"axis-1"'
    want |= {
        f"dcudDriveProtocol.{key}": drive["protocol"],
        f"dcudDriveIsOnline.{key}": "true" if drive["online"] else "false",
        f"dcudDriveNmt.{key}": drive["nmt"],
        f"dcudDriveCia402.{key}": text(drive["cia402"]),
        f"dcudDriveErrorCode.{key}": str(drive["error_code"] or 0),
        f"dcudDriveHeartbeat.{key}": drive["heartbeat"],
    }
    push = states["push/event"]
    want |= {'dcudPushTarget."event"': push["target"], 'dcudPushBacklog."event"': str(push["backlog"])}
    port = states["bridge/tm"]
    key = '"tm"'
    want |= {
        f"dcudPortTcpPort.{key}": str(port["tcp_port"]),
        f"dcudPortLine.{key}": port["line"],
        f"dcudPortState.{key}": port["state"],
        f"dcudPortTls.{key}": "true" if port["tls"] else "false",
        f"dcudPortSessions.{key}": str(port["sessions"]),
    }
    return want


async def snmp_equals_mqtt(retained: Retained, tool: str, *args: str) -> dict[str, str]:
    """Walk with ``tool`` until every value equals the retained MQTT state published for it.

    The daemon keeps working meanwhile (a readout changes byte counters, the status goes out every
    2 s): a difference is retried after the next MQTT message, at most 8 times.
    """
    mismatches: dict[str, tuple[str | None, str]] = {}
    for _ in range(8):
        before = json.dumps(retained.states, sort_keys=True)
        result = await asyncio.to_thread(net_snmp, tool, *args)
        assert result.returncode == 0, result.stderr
        walked = parse(result.stdout)
        if json.dumps(retained.states, sort_keys=True) == before:  # no MQTT update during the walk
            want = expected_from_mqtt(retained.states)
            mismatches = {k: (walked.get(k), v) for k, v in want.items() if walked.get(k) != v}
            if not mismatches:
                return walked
        await retained.next_change()
    raise AssertionError(f"SNMP differs from MQTT: {mismatches}")


class UdpSink:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def pty_pairs(tmp_path: Path) -> Iterator[tuple[SocatPair, SocatPair]]:
    mbus = SocatPair(tmp_path / "mbus-dcu", tmp_path / "mbus-sim")
    can = SocatPair(tmp_path / "can-dcu", tmp_path / "can-sim")
    mbus.start()
    can.start()
    try:
        yield mbus, can
    finally:
        mbus.kill()
        can.kill()


@contextlib.contextmanager
def daemon(config: Path, notify: NotifySocket) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_daemon(config, notify)
    try:
        try:
            notify.wait_for("READY=1", timeout_s=60)
        except AssertionError:
            raise AssertionError(daemon_log(config)) from None
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_daemon_agent_serves_what_mqtt_shows_and_survives_hostile_input(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket
) -> None:
    agent_port = free_port(socket.SOCK_DGRAM)
    sink = UdpSink()
    wme = (
        snmp_params_without_traps()
        + f"tm_server_port={free_port()}\ntm.tls_enable=0\nfw_server_port={free_port()}\n"
        + f"eventpush_addr=127.0.0.1:{sink.port}\neventpush_sms_notify=1\nntp_interval=600\n"
    )
    with pty_pairs(tmp_path) as (mbus, can):
        toml = SITE.format(
            agent_port=agent_port, community=COMMUNITY, snmp_extra="", mbus_link=mbus.a, can_link=can.a
        )
        config = write_site(tmp_path / "site", mqtt_url=broker.url, toml_extra=toml, wme=wme)
        meter = SimConfig(
            [SimLineSpec("m", "mbus", [SimMeterSpec("1", kind="heat", base=4321)], device=str(mbus.b))]
        )
        async with simulators(meter), drive_simulator(can.b):
            with daemon(config, notify_socket) as proc:
                async with Retained(broker.port) as retained:
                    await retained.wait(
                        what="a read meter, an operational drive, the push and port rows",
                        condition=lambda: (
                            retained.states.get("meter/heat-1", {}).get("quality") == "ok"
                            and retained.states.get("drive/axis-1", {}).get("nmt") == "operational"
                            and {"push/event", "bridge/tm", "line/mbus-1", "status"} <= set(retained.states)
                        ),
                        timeout_s=60,
                    )
                    target = f"127.0.0.1:{agent_port}"
                    walked = await snmp_equals_mqtt(
                        retained, "snmpwalk", "-v2c", "-c", COMMUNITY, target, "DCUD-MIB::dcudMIB"
                    )
                    bulk = await snmp_equals_mqtt(
                        retained, "snmpbulkwalk", *V3, "-Cr20", target, "DCUD-MIB::dcudMIB"
                    )
                    assert set(bulk) == set(walked)  # the same objects and rows either way
                    got = await asyncio.to_thread(
                        net_snmp,
                        "snmpget",
                        *V3,
                        target,
                        "SNMPv2-MIB::sysUpTime.0",
                        'dcudMeterQuality."heat-1"',
                        'dcudDriveNmt."axis-1"',
                        "dcudDevId.0",
                    )
                    assert got.returncode == 0, got.stderr
                    values = parse(got.stdout)
                    assert values['dcudMeterQuality."heat-1"'] == retained.states["meter/heat-1"]["quality"]
                    assert values['dcudDriveNmt."axis-1"'] == "operational"
                    assert values["dcudDevId.0"] == "dcu-test"

                    # Refused: a wrong community (no answer) and an unknown user (a report), counted.
                    wrong = await asyncio.to_thread(
                        net_snmp,
                        "snmpget",
                        "-v2c",
                        "-c",
                        "public",
                        target,
                        "dcudDevId.0",
                        timeout_s=0.3,
                        retries=0,
                    )
                    assert "Timeout" in wrong.stderr
                    stranger = await asyncio.to_thread(
                        net_snmp, "snmpget", *V3[:2], "nobody", *V3[3:], target, "dcudDevId.0"
                    )
                    assert "Unknown user name" in stranger.stderr
                    await retained.wait(
                        what="the refusals counted in <p>/snmp/agent/state",
                        condition=lambda: retained.states.get("snmp/agent", {}).get("refused") == 2,
                    )
                    agent_state = retained.states["snmp/agent"]
                    assert agent_state["bad_community_names"] == 1 and agent_state["unknown_user_names"] == 1
                    assert agent_state["v2c"] is True and agent_state["v3"] == "authPriv"
                    assert COMMUNITY not in json.dumps(retained.states)

                    # Hostile datagrams: the agent keeps answering, nothing restarts.
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                        for datagram in hostile_datagrams():
                            sock.sendto(datagram, ("127.0.0.1", agent_port))
                    after = await asyncio.to_thread(
                        net_snmp, "snmpget", "-v2c", "-c", COMMUNITY, target, "dcudDevId.0"
                    )
                    assert parse(after.stdout) == {"dcudDevId.0": "dcu-test"}, after.stderr
                    await retained.wait(
                        what="the hostile batch counted",
                        condition=lambda: (
                            retained.states["snmp/agent"].get("datagrams", 0) >= len(hostile_datagrams())
                        ),
                    )
                    assert retained.states["snmp/agent"]["errors"] == 0
                assert proc.poll() is None
            assert proc.returncode == 0, daemon_log(config)
    sink.close()
    log = daemon_log(config)
    assert "service failed" not in log, log
    assert COMMUNITY not in log


def snmp_params_without_traps() -> str:
    """The v3 USM user (SHA + AES-128) for the agent, with traps off."""
    return (
        f"snmp_user={USER}\nsnmp_version=3\nsnmp_auth_algo=2\nsnmp_auth_key={AUTH_KEY}\n"
        f"snmp_priv_algo=3\nsnmp_priv_key={PRIV_KEY}\n"
    )


class GarbageMeter:
    """The far end of a pty pair answering every request with bytes that are no M-Bus frame."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        self.requests = 0
        asyncio.get_running_loop().add_reader(self.fd, self._on_request)

    def _on_request(self) -> None:
        with contextlib.suppress(BlockingIOError):
            if os.read(self.fd, 4096):
                self.requests += 1
                os.write(self.fd, b"\x68\x33\x77\x68\x99\xaa\x16")  # a long-frame start with junk

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


def put_firmware(port: int, body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "PUT",
            "/firmware",
            body,
            {"X-Firmware-SHA256": hashlib.sha256(body).hexdigest(), "X-Firmware-Name": "dcu-fw-2.1.bin"},
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class SilentManager:
    """Binds the manager's port once snmptrapd is gone: receives, never answers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.count = 0

    def drain(self) -> int:
        for _ in range(1000):
            try:
                self.sock.recv(65535)
            except BlockingIOError:
                break
            self.count += 1
        return self.count


@contextlib.asynccontextmanager
async def snmptrapd(tmp_path: Path) -> AsyncIterator[SnmpTrapd]:
    receiver = trap_receiver(tmp_path / "trapd")
    try:
        yield receiver
    finally:
        receiver.stop()


async def test_daemon_alarms_reach_snmptrapd_as_acknowledged_informs(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket
) -> None:
    retries = 2
    fw_port = free_port()
    async with snmptrapd(tmp_path) as trapd:
        wme = (
            snmp_params(trapd)
            + f"fw_server_port={fw_port}\ntm_server_port={free_port()}\ntm.tls_enable=0\nntp_interval=600\n"
        )
        snmp_extra = f"inform = true\ninform_timeout_s = 0.5\ninform_retries = {retries}\n"
        with pty_pairs(tmp_path) as (mbus, can):
            toml = SITE.format(
                agent_port=free_port(socket.SOCK_DGRAM),
                community=COMMUNITY,
                snmp_extra=snmp_extra,
                mbus_link=mbus.a,
                can_link=can.a,
            )
            config = write_site(tmp_path / "site", mqtt_url=broker.url, toml_extra=toml, wme=wme)
            # A damaged outbox database: dcud moves it aside at start and raises outbox_corrupt before
            # any service runs; the SNMP service still gets it (Runtime.early_events).
            state_dir = tmp_path / "site" / "state"
            state_dir.mkdir(parents=True, exist_ok=True)
            (state_dir / "outbox.sqlite").write_bytes(b"this is not a database" * 100)
            garbage = GarbageMeter(mbus.b)
            async with drive_simulator(can.b) as drive, Retained(broker.port) as retained:
                with daemon(config, notify_socket) as proc:

                    async def inform(name: str, timeout_s: float = 40.0) -> Any:
                        got = await asyncio.to_thread(trapd.wait_for, is_trap(name), timeout_s)
                        assert got.security == "INFORM, SNMP v3, user dcud, context ", got
                        return got

                    corrupt = await inform("dcudOutboxCorrupt")
                    assert "outbox.sqlite.corrupt-" in corrupt.value("dcudEventText.0")

                    await retained.wait(
                        what="an operational drive",
                        condition=lambda: retained.states.get("drive/axis-1", {}).get("nmt") == "operational",
                    )
                    await drive.control("fault 1 0x3210")
                    fault = await inform("dcudDriveFault")
                    assert fault.value("dcudEventSubject.0") == "axis-1"
                    assert "0x3210" in fault.value("dcudEventText.0")
                    await drive.control("kill 1")
                    assert (await inform("dcudDriveHeartbeatLost")).value("dcudEventSubject.0") == "axis-1"
                    await drive.control("revive 1")
                    await inform("dcudDriveHeartbeatBack")

                    meter_error = await inform("dcudMeterError")
                    assert meter_error.value("dcudEventSubject.0") == "heat-1"
                    assert garbage.requests > 0
                    garbage.close()
                    meter = SimConfig(
                        [SimLineSpec("m", "mbus", [SimMeterSpec("1", kind="heat")], device=str(mbus.b))]
                    )
                    async with simulators(meter):
                        assert (await inform("dcudMeterBack")).value("dcudEventSubject.0") == "heat-1"

                    status, body = await asyncio.to_thread(
                        put_firmware, fw_port, b"\x7fELF firmware image" * 64
                    )
                    assert status == 200, body
                    staged = await inform("dcudFirmwareStaged")
                    assert staged.value("dcudEventSubject.0") == "dcu-fw-2.1.bin"

                    wme_path = tmp_path / "site" / "wme.conf"
                    wme_path.write_text(wme_path.read_text().replace("ntp_interval=600", "ntp_interval=900"))
                    proc.send_signal(signal.SIGHUP)
                    changed = await inform("dcudConfigChanged")
                    assert "ntp_interval" in changed.value("dcudEventText.0")

                    def acknowledged() -> bool:
                        snmp = retained.states.get("snmp", {})
                        # the eight alarms above (and any clearing event next to them)
                        sent = snmp.get("informs_sent", 0)
                        return (
                            sent >= 8
                            and snmp.get("informs_pending") == 0
                            and snmp.get("informs_acked") == sent
                        )

                    await retained.wait(what="every INFORM acknowledged", condition=acknowledged)
                    acked = retained.states["snmp"]["informs_acked"]
                    assert retained.states["snmp"]["informs_failed"] == 0

                    # The manager goes away: the next alarm is sent 1 + inform_retries times, then
                    # counted as failed; the event itself is on MQTT as always.
                    port = trapd.port
                    trapd.stop()
                    manager = SilentManager(port)
                    try:
                        wme_path.write_text(
                            wme_path.read_text().replace("ntp_interval=900", "ntp_interval=1200")
                        )
                        proc.send_signal(signal.SIGHUP)
                        await retained.wait(
                            what="the unacknowledged INFORM counted",
                            condition=lambda: (
                                retained.states.get("snmp", {}).get("informs_failed", 0) >= 1
                                and retained.states["snmp"]["informs_pending"] == 0
                            ),
                        )
                        sent = manager.drain()
                    finally:
                        manager.sock.close()
                    failed = retained.states["snmp"]["informs_failed"]
                    assert sent == (1 + retries) * failed  # each one sent 1 + inform_retries times
                    assert retained.states["snmp"]["informs_acked"] == acked
                    assert [e["type"] for e in retained.events].count("config_changed") == 2
                assert proc.returncode == 0, daemon_log(config)
    log = daemon_log(config)
    assert log.count("INFORM not acknowledged after its retries") == failed  # once per INFORM
    assert "service failed" not in log
