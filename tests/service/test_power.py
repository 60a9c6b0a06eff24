"""Power monitor and last gasp: debounce (explicit clock), GPIO uAPI layout, and the whole sequence
against real peers (snmptrapd, Mosquitto, a UDP receiver) with ``python -m dcud run``."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dcud.service import levels, power
from dcud.service.outbox import Outbox, OutboxLimits
from dcud.sim.alarm_peers import SnmpTrapd
from dcud.sim.peers import Mosquitto

from helpers.alarm import (
    COMMUNITY,
    EventSubscriber,
    UdpSink,
    is_trap,
    power_toml,
    set_power,
    snmp_params,
    trap_receiver,
)
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.notify import NotifySocket

# -- debounce (pure, dcud.service.levels, shared with the digital inputs) --------------------------


def test_debounce_accepts_a_level_stable_for_the_debounce_time() -> None:
    d = levels.Debouncer(0.05, initial=True)
    assert d.update(False, 10.00) is None
    assert d.deadline() == pytest.approx(10.05)
    assert d.update(False, 10.03) is None
    assert d.update(False, 10.05) is False
    assert d.accepted is False
    assert d.deadline() is None


def test_debounce_ignores_flapping_faster_than_the_debounce_time() -> None:
    d = levels.Debouncer(0.05, initial=True)
    now = 0.0
    for i in range(200):
        now += 0.01
        assert d.update(i % 2 == 0, now) is None  # alternates every 10 ms
    assert d.accepted is True
    assert d.update(True, now + 1) is None


def test_debounce_restarts_the_timer_when_the_candidate_changes() -> None:
    d = levels.Debouncer(0.1, initial=True)
    assert d.update(False, 0.0) is None
    assert d.update(True, 0.05) is None  # back: candidate dropped
    assert d.update(False, 0.08) is None
    assert d.update(False, 0.17) is None  # 0.09 s since the new candidate
    assert d.update(False, 0.19) is False


def test_debounce_zero_accepts_at_once_and_unknown_initial_is_taken_silently() -> None:
    d = levels.Debouncer(0.0, initial=None)
    assert d.update(True, 0.0) is None
    assert d.accepted is True
    assert d.update(False, 0.001) is False


# -- GPIO character device layout ------------------------------------------------------------------


def test_gpio_v2_uapi_layout_matches_the_kernel_header() -> None:
    # sizeof(struct gpio_v2_line_request) == 592, _IOWR(0xB4, 0x07, ...) == 0xC250B407 (linux/gpio.h).
    request = levels.gpio_line_request(17, "dcud-power", edges=True)
    assert len(request) == 592
    assert levels.GPIO_V2_GET_LINE_IOCTL == 0xC250B407
    assert levels.GPIO_V2_LINE_GET_VALUES_IOCTL == 0xC010B40E
    assert int.from_bytes(request[0:4], "little") == 17  # offsets[0]
    assert request[256:266] == b"dcud-power"  # consumer
    flags = int.from_bytes(request[288:296], "little")  # config.flags
    assert flags == (1 << 2) | (1 << 4) | (1 << 5)  # INPUT | EDGE_RISING | EDGE_FALLING
    assert int.from_bytes(request[560:564], "little") == 1  # num_lines


def test_file_source_reads_sysfs_style_values(tmp_path: Path) -> None:
    path = tmp_path / "online"
    source = levels.FileSource(str(path))
    assert source.read() is None  # missing
    for text, expected in (("1\n", True), ("0\n", False), ("2", True), ("junk", None)):
        path.write_text(text)
        assert source.read() is expected
    path.write_text("1\n")
    assert levels.FileSource(str(path), active_low=True).read() is False


# -- the whole sequence, real peers ----------------------------------------------------------------


def _site(
    tmp_path: Path,
    trapd_port_params: str,
    power_file: Path,
    mqtt_url: str | None,
    push_port: int | None,
    **kw: float,
) -> Path:
    wme = trapd_port_params + (f"eventpush_addr=127.0.0.1:{push_port}\n" if push_port else "")
    toml = power_toml(power_file, **kw)
    return write_site(tmp_path / "site", mqtt_url=mqtt_url, toml_extra=toml, wme=wme)


PowerPeers = tuple[SnmpTrapd, UdpSink, Path]


@pytest.fixture
def power_peers(tmp_path: Path) -> Iterator[PowerPeers]:
    """snmptrapd, a UDP event push sink and the power file (power present): the peers of a power test."""
    trapd = trap_receiver(tmp_path / "trapd")
    sink = UdpSink()
    try:
        power_file = tmp_path / "online"
        set_power(power_file, True)
        yield trapd, sink, power_file
    finally:
        trapd.stop()
        sink.close()


@pytest.mark.slow
async def test_power_loss_and_return_reach_snmp_mqtt_and_udp(
    tmp_path: Path, broker: Mosquitto, notify_socket: NotifySocket, power_peers: PowerPeers
) -> None:
    trapd, sink, power_file = power_peers
    config = _site(tmp_path, snmp_params(trapd), power_file, broker.url, sink.port)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        async with EventSubscriber(broker.port) as sub:
            state = await sub.wait_state("power", lambda s: s["state"] == "ok")
            assert state["source"] == "file"
            set_power(power_file, False)
            trap = await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerLoss"))
            event = await sub.wait_event("power_loss")
            datagram = await asyncio.to_thread(sink.receive)
            assert trap.security.startswith("TRAP2, SNMP v3, user dcud")
            names = [name for name, _ in trap.varbinds]
            assert names == [
                "SNMPv2-MIB::sysUpTime.0",
                "SNMPv2-MIB::snmpTrapOID.0",
                "DCUD-MIB::dcudDeviceId.0",
                "DCUD-MIB::dcudEventType.0",
                "DCUD-MIB::dcudEventTime.0",
                "DCUD-MIB::dcudEventText.0",
                "DCUD-MIB::dcudEventSubject.0",
                "DCUD-MIB::dcudEventId.0",
            ]
            assert trap.value("dcudDeviceId.0") == "dcu-test"
            assert trap.value("dcudEventType.0") == "power_loss"
            assert trap.value("dcudEventText.0") == "Power loss"
            assert trap.value("dcudEventTime.0") == event["ts"]
            assert (trap.value("dcudEventId.0") or "").startswith(
                "dcu-test-"
            )  # the outbox uid: committed first
            assert event["text"] == "Power loss"
            assert datagram.decode().startswith("dcu-test: Power loss ")
            await sub.wait_state("power", lambda s: s["state"] == "lost")

            set_power(power_file, True)
            trap = await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerReturn"))
            await sub.wait_event("power_return")
            datagram = await asyncio.to_thread(sink.receive)
            assert datagram.decode().startswith("dcu-test: Power return ")
            assert trap.value("dcudEventText.0") == "Power return"
            await sub.wait_state("power", lambda s: s["state"] == "ok")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
        assert (config.parent / "state" / power.MARKER_FILE).exists()
    finally:
        proc.kill()


@pytest.mark.slow
async def test_power_loss_event_is_in_the_outbox_with_the_uid_the_trap_carries(
    tmp_path: Path, notify_socket: NotifySocket, power_peers: PowerPeers
) -> None:
    # No MQTT: no consumer holds or deletes items, so the committed event is still there after the stop.
    trapd, _sink, power_file = power_peers
    # No event push either: its outbox consumer would deliver and delete the event too.
    config = _site(tmp_path, snmp_params(trapd, version=2, user=COMMUNITY), power_file, None, None)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        set_power(power_file, False)
        trap = await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerLoss"))
        assert trap.security == f"TRAP2, SNMP v2c, community {COMMUNITY}"  # snmp_user is the community
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
    finally:
        proc.kill()
    outbox = Outbox(
        config.parent / "state" / "outbox.sqlite", OutboxLimits(), consumers=["check"], device_id="dcu-test"
    )
    await outbox.open()
    try:
        items = await outbox.take("check", 100)
    finally:
        await outbox.close()
    events = [(item.uid, json.loads(item.payload)) for item in items if item.kind == "event"]
    losses = [(uid, payload) for uid, payload in events if payload["type"] == "power_loss"]
    assert len(losses) == 1
    assert losses[0][0] == trap.value("dcudEventId.0")
    assert losses[0][1]["text"] == "Power loss"


@pytest.mark.slow
async def test_flapping_power_input_is_debounced(
    tmp_path: Path, notify_socket: NotifySocket, power_peers: PowerPeers
) -> None:
    trapd, sink, power_file = power_peers
    # Debounce 0.5 s, input flapping every 10 ms for 0.6 s: never stable long enough.
    config = _site(tmp_path, snmp_params(trapd), power_file, None, sink.port, poll_s=0.005, debounce_s=0.5)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        for i in range(60):
            set_power(power_file, i % 2 == 1)
            await asyncio.sleep(0.01)
        set_power(power_file, True)
        # A real loss afterwards, then the power back: the return trap is the marker that every trap
        # before it has arrived (one sender, in order, over loopback), so the two must be the only
        # power traps snmptrapd ever saw: the flapping produced none.
        set_power(power_file, False)
        await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerLoss"))
        set_power(power_file, True)
        await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerReturn"))
        power_traps = [t for t in trapd.traps() if "Power" in (t.value("snmpTrapOID.0") or "")]
        assert [t.value("snmpTrapOID.0") for t in power_traps] == [
            "DCUD-MIB::dcudPowerLoss",
            "DCUD-MIB::dcudPowerReturn",
        ]
    finally:
        proc.kill()


@pytest.mark.slow
async def test_power_loss_not_survived_is_reported_at_the_next_start(
    tmp_path: Path, notify_socket: NotifySocket, power_peers: PowerPeers
) -> None:
    trapd, sink, power_file = power_peers
    config = _site(tmp_path, snmp_params(trapd), power_file, None, sink.port)
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        set_power(power_file, False)
        lost = await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerLoss"))
        await asyncio.to_thread(sink.receive)
        proc.kill()  # the hold-up energy ran out: no clean shutdown
        proc.wait(timeout=10)
        assert not (config.parent / "state" / power.MARKER_FILE).exists()
        set_power(power_file, True)  # power is back when the DCU boots again
        notify_socket.messages.clear()
        proc = start_daemon(config, notify_socket)
        notify_socket.wait_for("READY=1")
        unsurvived = await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerLossUnsurvived"))
        lost_at = (lost.value("dcudEventTime.0") or "").rstrip("Z")  # whole seconds; the text has ms
        assert f"power was lost at {lost_at}." in (unsurvived.value("dcudEventText.0") or "")
        back = await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerReturn"))
        assert trapd.traps().index(unsurvived) < trapd.traps().index(back)
        # A clean stop and start afterwards reports nothing more.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
        before = len(trapd.traps())
        notify_socket.messages.clear()
        proc = start_daemon(config, notify_socket)
        notify_socket.wait_for("READY=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
        assert len(trapd.traps()) == before
    finally:
        proc.kill()


def test_power_ok_reads_the_bus_state() -> None:
    from dcud.runtime.bus import EventBus

    bus = EventBus()
    assert power.power_ok(bus)
    bus.set_state("power", {"state": "lost"})
    assert not power.power_ok(bus)
    bus.set_state("power", {"state": "ok"})
    assert power.power_ok(bus)
