"""Every alarm reaches the manager: each event type of DCUD-MIB as a trap at Net-SNMP's snmptrapd, and
INFORMs: acknowledged by snmptrapd, retried within their bound against a manager that never answers,
then counted as failed. (The events raised by the running daemon are in tests/system/test_snmp_e2e.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from dcud.runtime.bus import EventBus
from dcud.service import snmp_mib
from dcud.sim.alarm_peers import SnmpTrapd

from helpers.alarm import COMMUNITY, DEVICE_ID, is_trap, running_service, snmp_params, trap_receiver
from helpers.daemon import write_site

SUBJECTS = {"drive": "axis-1", "meter": "flat-12", "line": "rs485-1", "input": "door", "name": "fw-2.1.bin"}


def event_for(event_type: str) -> dict[str, Any]:
    """An event payload as Runtime.event hands it to listeners, with the subject field its service sets."""
    if event_type.startswith("drive_"):
        fields: dict[str, Any] = {"drive": SUBJECTS["drive"]}
    elif event_type.startswith("meter_"):
        fields = {"meter": SUBJECTS["meter"], "line": SUBJECTS["line"]}
    elif event_type.startswith("line_"):
        fields = {"line": SUBJECTS["line"]}
    elif event_type == "input_change":
        fields = {"input": SUBJECTS["input"], "level": 1}
    elif event_type == "firmware_staged":
        fields = {"name": SUBJECTS["name"], "sha256": "00" * 32}
    else:
        fields = {}
    return {
        "type": event_type,
        "ts": "2026-12-07T20:00:00Z",
        "text": f"test {event_type}",
        "uid": f"dcu-test-1-{event_type}",
        **fields,
    }


def subject_of(event: dict[str, Any]) -> str:
    """The dcudEventSubject DCUD-MIB promises: the meter (not its line), the drive, the input..."""
    for key in ("meter", "drive", "input", "line", "name"):
        if key in event:
            return str(event[key])
    return ""


@pytest.fixture
def trapd(tmp_path: Path) -> Iterator[SnmpTrapd]:
    receiver = trap_receiver(tmp_path / "trapd")
    try:
        yield receiver
    finally:
        receiver.stop()


def test_every_alarm_has_a_notification() -> None:
    """The alarms of issue 16 (and the clearing events next to them) all have a trap."""
    wanted = {
        "drive_fault",
        "drive_fault_cleared",
        "drive_heartbeat_lost",
        "drive_heartbeat_restored",
        "drive_offline",
        "drive_online",
        "meter_error",
        "meter_back",
        "meter_silent",
        "outbox_corrupt",
        "config_changed",
        "firmware_staged",
        "input_change",
        "outbox_high_water",
        "outbox_high_water_cleared",
        "outbox_full",
        "outbox_full_cleared",
    }
    assert wanted <= set(snmp_mib.TRAPS)
    arcs = [t.arc for t in snmp_mib.TRAPS.values()]
    assert sorted(arcs) == list(range(1, len(arcs) + 1))  # no arc reused or skipped
    assert {"power_loss"} == snmp_mib.LAST_GASP_EVENTS


async def test_snmptrapd_receives_every_trap_type(tmp_path: Path, trapd: SnmpTrapd) -> None:
    """SNMPv3 (SHA + AES-128): one trap per event type, named by DCUD-MIB, carrying the event."""
    config = write_site(tmp_path / "site", wme=snmp_params(trapd))
    async with running_service(config, tmp_path / "site" / "state") as emit:
        for event_type in snmp_mib.TRAPS:
            emit(event_for(event_type))
        for event_type, trap in snmp_mib.TRAPS.items():
            got = await asyncio.to_thread(trapd.wait_for, is_trap(trap.name))
            expected = event_for(event_type)
            assert got.security == "TRAP2, SNMP v3, user dcud, context ", got
            assert got.value("dcudEventType.0") == event_type
            assert got.value("dcudEventId.0") == expected["uid"]
            assert got.value("dcudDeviceId.0") == DEVICE_ID
            assert got.value("dcudEventSubject.0") == subject_of(expected), (event_type, got)
    assert len(trapd.traps()) == len(snmp_mib.TRAPS)


def inform_toml(timeout_s: float = 2.0, retries: int = 2) -> str:
    return f"\n[snmp]\ninform = true\ninform_timeout_s = {timeout_s}\ninform_retries = {retries}\n"


@pytest.mark.parametrize("version", [2, 3], ids=["v2c", "v3-SHA-AES"])
async def test_informs_are_acknowledged_and_the_last_gasp_stays_a_trap(
    tmp_path: Path, trapd: SnmpTrapd, version: int
) -> None:
    user = COMMUNITY if version == 2 else "dcud"
    config = write_site(
        tmp_path / "site", toml_extra=inform_toml(), wme=snmp_params(trapd, version=version, user=user)
    )
    bus = EventBus()
    async with running_service(config, tmp_path / "site" / "state", bus) as emit:
        emit(event_for("drive_fault"))
        emit(event_for("meter_error"))
        emit({"type": "power_loss", "ts": "2026-12-07T20:00:01Z", "text": "Power loss", "uid": "u-pl"})
        fault = await asyncio.to_thread(trapd.wait_for, is_trap("dcudDriveFault"))
        meter = await asyncio.to_thread(trapd.wait_for, is_trap("dcudMeterError"))
        gasp = await asyncio.to_thread(trapd.wait_for, is_trap("dcudPowerLoss"))
        for _ in range(500):  # the acknowledgements arrive after snmptrapd logged the INFORMs
            if bus.states["snmp"]["informs_acked"] == 2:
                break
            await asyncio.sleep(0.01)
        state = dict(bus.states["snmp"])
    security = "SNMP v2c, community noc-watch" if version == 2 else "SNMP v3, user dcud, context "
    assert fault.security == f"INFORM, {security}", fault
    assert meter.security == f"INFORM, {security}", meter
    assert gasp.security == f"TRAP2, {security}", gasp  # the last gasp never waits for an answer
    assert fault.value("dcudEventId.0") == "dcu-test-1-drive_fault"
    assert state["inform"] is True
    assert (state["informs_sent"], state["informs_acked"], state["informs_failed"]) == (2, 2, 0), state
    assert state["informs_pending"] == 0 and state["sent"] == 3 and state["failed"] == 0


class SilentManager:
    """A UDP socket on the manager's port that receives and never answers (a hung manager)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.datagrams: list[bytes] = []

    def drain(self) -> list[bytes]:
        for _ in range(1000):
            try:
                self.datagrams.append(self.sock.recv(65535))
            except BlockingIOError:
                break
        return self.datagrams

    def close(self) -> None:
        self.sock.close()


async def test_an_unanswered_inform_is_retried_within_its_bound_then_counted_failed(
    tmp_path: Path, trapd: SnmpTrapd
) -> None:
    """snmptrapd stopped: dcud sends the INFORM 1 + inform_retries times, then gives up, counts it
    and logs it once; nothing more is sent for it."""
    retries = 2
    config = write_site(
        tmp_path / "site",
        toml_extra=inform_toml(timeout_s=0.3, retries=retries),
        wme=snmp_params(trapd, version=2, user=COMMUNITY),
    )
    port = trapd.port
    trapd.stop()
    manager = SilentManager(port)
    bus = EventBus()
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_service(config, tmp_path / "site" / "state", bus) as emit:
                emit(event_for("drive_heartbeat_lost"))
                for _ in range(1000):  # bounded: 1000 x 10 ms, far beyond 3 x 0.3 s
                    if bus.states["snmp"]["informs_failed"]:
                        break
                    await asyncio.sleep(0.01)
                state = dict(bus.states["snmp"])
                sent_when_failed = len(manager.drain())
                # A stray late resend of the first INFORM would come within a timeout or two of its
                # failure. The marker that this window has passed: a second INFORM, emitted now, has
                # itself gone through all its 1 + retries timeouts and been counted failed.
                emit(event_for("meter_error"))
                for _ in range(1000):  # bounded: 1000 x 10 ms, far beyond 3 x 0.3 s
                    if bus.states["snmp"]["informs_failed"] >= 2:
                        break
                    await asyncio.sleep(0.01)
                later = dict(bus.states["snmp"])
                after_failure = manager.drain()[sent_when_failed:]
    finally:
        manager.close()
    assert (state["informs_sent"], state["informs_acked"], state["informs_failed"]) == (1, 0, 1), state
    assert state["informs_pending"] == 0
    assert sent_when_failed == 1 + retries
    assert (later["informs_sent"], later["informs_failed"], later["informs_pending"]) == (2, 2, 0), later
    # SNMPv2c carries the event id in clear: everything sent after the first failure is the second one's.
    assert len(after_failure) == 1 + retries
    assert all(b"dcu-test-1-meter_error" in d for d in after_failure), after_failure
    assert not any(b"dcu-test-1-drive_heartbeat_lost" in d for d in after_failure), after_failure
    failures = [entry for entry in logs if entry["event"] == "INFORM not acknowledged after its retries"]
    # Logged once per failed INFORM (the second one is the marker above).
    assert [entry["uid"] for entry in failures] == [
        "dcu-test-1-drive_heartbeat_lost",
        "dcu-test-1-meter_error",
    ], logs


async def test_informs_beyond_the_pending_bound_go_out_as_traps(tmp_path: Path, trapd: SnmpTrapd) -> None:
    from dcud.service import snmp

    config = write_site(
        tmp_path / "site",
        toml_extra=inform_toml(timeout_s=5.0, retries=0),
        wme=snmp_params(trapd, version=2, user=COMMUNITY),
    )
    port = trapd.port
    trapd.stop()
    manager = SilentManager(port)
    bus = EventBus()
    try:
        async with running_service(config, tmp_path / "site" / "state", bus) as emit:
            for index in range(snmp.MAX_INFORMS_PENDING + 3):
                emit({**event_for("meter_error"), "uid": f"u-{index}"})
            state = dict(bus.states["snmp"])
            for _ in range(500):
                if len(manager.drain()) >= snmp.MAX_INFORMS_PENDING + 3:
                    break
                await asyncio.sleep(0.01)
    finally:
        with contextlib.suppress(OSError):
            manager.close()
    assert state["informs_pending"] == snmp.MAX_INFORMS_PENDING
    assert state["inform_overflow"] == 3
    assert state["sent"] == snmp.MAX_INFORMS_PENDING + 3
    assert len(manager.datagrams) == snmp.MAX_INFORMS_PENDING + 3


async def test_events_before_the_first_listener_reach_it_and_later_gaps_are_not_replayed() -> None:
    """outbox_corrupt is raised before any service runs: the SNMP service gets it when it starts.
    Events while a reload restarts the listener (or while traps are off) are not kept for later."""
    from dataclasses import dataclass

    from dcud.app import Shared
    from dcud.service.commands import CommandRouter

    @dataclass
    class Item:
        uid: str

    class Outbox:
        count = 0

        async def put(self, kind: str, subtopic: str, payload: bytes) -> Item:
            self.count += 1
            return Item(f"u-{self.count}")

    runtime = Shared.create("dcu-test", "dcu/dcu-test", EventBus(), Outbox(), CommandRouter())  # type: ignore[arg-type]
    await runtime.event("outbox_corrupt", "moved aside")
    first: list[Any] = []
    remove = runtime.runtime.add_event_listener(first.append)
    assert [(e["type"], e["uid"]) for e in first] == [("outbox_corrupt", "u-1")]
    await runtime.event("drive_fault", "fault")
    assert [e["type"] for e in first] == ["outbox_corrupt", "drive_fault"]
    remove()
    await runtime.event("meter_error", "while no listener")  # e.g. during a reload
    second: list[Any] = []
    runtime.runtime.add_event_listener(second.append)
    assert second == []
