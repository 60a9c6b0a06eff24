"""CANopen drives end to end: dcud's drive service here, the CiA 402 simulator in another process.

The two processes share a CAN bus made of a socat pty pair carrying ``slcan`` (or python-can's
``serial`` framing): dcud opens one end, ``python -m dcud sim drive`` the other. The simulator is
steered through its stdin (fault injection, killing its heartbeat, rebooting, raw garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcud.config.model import CanConfig, DriveConfig, TpdoConfig
from dcud.runtime.bus import EventBus
from dcud.service.commands import CommandRouter
from dcud.service.drive_commands import register_drive_commands
from dcud.service.drives import CanDrivesConfig, CanDriveService
from dcud.sim.peers import Mosquitto

from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.drives import simulator
from helpers.meters import Events, FakeOutbox, SocatPair, supervised, wait_until
from helpers.notify import NotifySocket


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[SocatPair]:
    pair = SocatPair(tmp_path / "can-dcu", tmp_path / "can-sim")
    pair.start()
    try:
        yield pair
    finally:
        pair.kill()


class Harness:
    """dcud's CAN drive service with an in-memory event sink, outbox and command router."""

    def __init__(self, channel: Path, drives: tuple[DriveConfig, ...], interface: str = "slcan") -> None:
        options: dict[str, str | int | float | bool] = {"sleep_after_open": 0} if interface == "slcan" else {}
        self.can = CanConfig(name="can0", interface=interface, channel=str(channel), options=options)
        self.bus = EventBus()
        self.events = Events()
        self.outbox = FakeOutbox()
        self.router = CommandRouter()
        registry = register_drive_commands(self.router)
        self.service = CanDriveService(
            CanDrivesConfig(self.can, drives), self.bus, self.events, self.outbox.put, registry
        )

    def state(self, drive: str = "axis-1") -> dict[str, Any]:
        return dict(self.bus.states.get(f"drive/{drive}", {}))

    async def command(self, verb: str, **args: Any) -> dict[str, Any]:
        payload = json.dumps({"drive": "axis-1", **args}).encode()
        return await self.router.dispatch(f"drive/{verb}", payload)

    def events_of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events.items if e["type"] == event_type]


def drive(name: str = "axis-1", node_id: int = 1, **extra: Any) -> DriveConfig:
    defaults: dict[str, Any] = {
        "commands": True,
        "state_interval_s": 0.1,
        "poll_interval_s": 0.2,
        # drive/write allow-list: listing the controlword does not make it writable (checked below).
        "writable": ["60FF", "1008:00", "6041", "6040"],
    }
    return DriveConfig(name=name, bus="can0", protocol="canopen", node_id=node_id, **{**defaults, **extra})


@contextlib.asynccontextmanager
async def running(harness: Harness) -> AsyncIterator[Harness]:
    async with supervised(harness.service):
        yield harness


def tpdos(h: Harness, name: str = "axis-1") -> int:
    """TPDOs received (the state document only changes, and is published, when a value does)."""
    return h.service.drives[name].counters.get("tpdo", 0)


def operational(h: Harness, name: str = "axis-1") -> bool:
    state = h.state(name)
    return (
        state.get("nmt") == "operational" and state.get("online") is True and state.get("configured") is True
    )


@pytest.mark.parametrize("interface", ["slcan", "serial"])
async def test_boot_up_heartbeat_and_tpdo_state(pty_pair: SocatPair, interface: str) -> None:
    h = Harness(pty_pair.a, (drive(), drive("axis-2", 2, commands=False)), interface)
    # dcud listens first, so it sees the nodes boot.
    async with running(h), simulator(pty_pair.b, "1-2", interface):
        await wait_until(lambda: len(h.events_of("drive_boot_up")) >= 2, 20)
        await wait_until(lambda: operational(h) and operational(h, "axis-2"), 20)
        state = h.state()
        assert state["heartbeat"] == "ok"
        assert state["heartbeat_timeout_s"] == pytest.approx(0.3)  # 100 ms producer + margin
        assert state["cia402"] == "switch_on_disabled"
        assert state["error_code"] == 0
        assert state["error_text"] is None  # 0 is no error: no text (MQTT null, SNMP "")
        # TPDOs (not SDO polls) keep the state current.
        before = tpdos(h)
        await wait_until(lambda: tpdos(h) > before + 5, 10)
        boot = h.events_of("drive_boot_up")[0]
        assert boot["node_id"] in (1, 2) and "booted" in boot["text"]
        can_state = h.bus.states["can/can0"]
        assert can_state["state"] == "active"


async def test_cia402_transitions_by_command(pty_pair: SocatPair) -> None:
    async with simulator(pty_pair.b), running(Harness(pty_pair.a, (drive(),))) as h:
        await wait_until(lambda: operational(h), 20)
        reply = await h.command("enable")
        assert reply["ok"], reply
        assert reply["result"]["state"]["cia402"] == "operation_enabled"
        # The axis moves: position from TPDOs grows.
        start = h.state()["position"]
        await wait_until(lambda: (h.state()["position"] or 0) > (start or 0) + 10, 10)
        reply = await h.command("quick_stop")
        assert reply["ok"] and reply["result"]["state"]["cia402"] == "quick_stop_active", reply
        reply = await h.command("enable")  # from quick stop active: via switch on disabled
        assert reply["ok"] and reply["result"]["state"]["cia402"] == "operation_enabled", reply
        reply = await h.command("disable")
        assert reply["ok"] and reply["result"]["state"]["cia402"] == "switch_on_disabled", reply
        # Wrong state: refused with the reason, nothing written.
        reply = await h.command("quick_stop")
        assert not reply["ok"]
        assert reply["error"]["type"] == "DriveStateError"
        assert "energised" in reply["error"]["message"]
        reply = await h.command("fault_reset")
        assert not reply["ok"] and "not in fault" in reply["error"]["message"]
        state = await h.command("state")
        assert state["result"]["cia402"] == "switch_on_disabled"


async def test_fault_injection_gives_event_and_refused_command(pty_pair: SocatPair) -> None:
    async with simulator(pty_pair.b) as sim, running(Harness(pty_pair.a, (drive(),))) as h:
        await wait_until(lambda: operational(h), 20)
        assert (await h.command("enable"))["ok"]
        await sim.control("fault 1 0x3210")
        await wait_until(lambda: h.state().get("cia402") == "fault", 10)
        faults = h.events_of("drive_fault")
        assert len(faults) == 1, faults
        assert faults[0]["code"] == 0x3210
        assert "DC-link over-voltage" in faults[0]["text"]
        state = h.state()
        assert state["error_code"] == 0x3210 and state["error_text"] == "DC-link over-voltage"
        assert state["last_emcy"]["code"] == 0x3210
        reply = await h.command("enable")
        assert not reply["ok"]
        assert reply["error"] == {
            "type": "DriveStateError",
            "message": "drive axis-1: enable refused: the drive is in fault; send fault_reset first",
        }
        reply = await h.command("fault_reset")
        assert reply["ok"] and reply["result"]["state"]["cia402"] == "switch_on_disabled", reply
        await wait_until(lambda: bool(h.events_of("drive_fault_cleared")), 10)
        assert (await h.command("enable"))["ok"]


async def test_heartbeat_loss_and_recovery(pty_pair: SocatPair) -> None:
    async with simulator(pty_pair.b) as sim, running(Harness(pty_pair.a, (drive(),))) as h:
        await wait_until(lambda: operational(h), 20)
        await sim.control("kill 1")
        await wait_until(lambda: bool(h.events_of("drive_heartbeat_lost")), 10)
        state = h.state()
        assert state["heartbeat"] == "lost" and state["online"] is False and state["nmt"] == "unknown"
        reply = await h.command("enable")
        assert not reply["ok"] and "offline" in reply["error"]["message"], reply
        # The cable comes back: heartbeat resumes in the same NMT state.
        await sim.control("revive 1")
        await wait_until(lambda: operational(h), 10)
        assert h.events_of("drive_heartbeat_restored")
        # A power cycle: boot-up, dcud configures and starts the node again, TPDOs flow.
        await sim.control("kill 1")
        await wait_until(lambda: len(h.events_of("drive_heartbeat_lost")) == 2, 10)
        boots = len(h.events_of("drive_boot_up"))
        await sim.control("reboot 1")
        await wait_until(lambda: len(h.events_of("drive_boot_up")) == boots + 1, 10)
        await wait_until(lambda: operational(h), 10)
        before = tpdos(h)
        await wait_until(lambda: tpdos(h) > before, 10)
        assert (await h.command("enable"))["ok"]


async def test_sdo_read_write_and_aborts(pty_pair: SocatPair) -> None:
    async with simulator(pty_pair.b), running(Harness(pty_pair.a, (drive(),))) as h:
        await wait_until(lambda: operational(h), 20)
        reply = await h.command("read", index="0x1008")  # segmented upload (16 bytes)
        assert reply["ok"] and reply["result"]["value"] == "dcud CiA 402 sim", reply
        reply = await h.command("read", index=0x1018, subindex=4)
        assert reply["result"]["value"] == 1001
        reply = await h.command("write", index="0x60FF", value=-250, type="i32")
        assert reply["ok"], reply
        assert (await h.command("read", index="0x60FF"))["result"]["value"] == -250
        reply = await h.command("write", index="0x1008", value="a much longer device name", type="str")
        assert not reply["ok"]  # const object: the drive aborts the segmented download
        assert reply["error"]["type"] == "SdoAbort"
        reply = await h.command("read", index="0x2000")
        assert reply["error"]["type"] == "SdoAbort"
        assert "object does not exist in the object dictionary" in reply["error"]["message"]
        assert "0x6020000" in reply["error"]["message"]
        reply = await h.command("write", index="0x6041", value=1, type="u16")
        assert "attempt to write a read only object" in reply["error"]["message"]
        reply = await h.command("write", index="0x6040", value=15)
        assert reply["error"]["type"] == "DriveStateError" and "drive/enable" in reply["error"]["message"]
        # Not in [[drive]] writable: refused before any SDO, nothing written.
        reply = await h.command("write", index="0x6060", value=1, type="i8")
        assert reply["error"]["type"] == "DriveWriteRefusedError" and reply["error"]["field"] == "$.index"
        reply = await h.command("write", index="0x1008", subindex=1, value="x", type="str")
        assert reply["error"]["type"] == "DriveWriteRefusedError", reply
        for bad in ({"index": "zz"}, {"index": 70000}, {"index": "0x6041", "type": "u128"}, {}):
            reply = await h.command("read", **bad)
            assert not reply["ok"] and reply["error"]["type"] in ("CommandError", "BadRequestError"), (
                bad,
                reply,
            )
        assert h.service.drives["axis-1"].counters.get("sdo_aborts", 0) >= 3


async def test_commands_off_unknown_drive_and_missing_node(pty_pair: SocatPair) -> None:
    drives = (drive(), drive("axis-9", 9, commands=False, timeout_s=0.2))
    async with simulator(pty_pair.b), running(Harness(pty_pair.a, drives)) as h:
        await wait_until(lambda: operational(h), 20)
        reply = await h.router.dispatch("drive/enable", json.dumps({"drive": "axis-9"}).encode())
        assert reply["error"]["type"] == "DriveUnavailableError"
        assert "commands = true" in reply["error"]["message"]
        reply = await h.router.dispatch("drive/enable", json.dumps({"drive": "nope"}).encode())
        assert reply["error"]["type"] == "DriveUnavailableError" and "axis-1" in reply["error"]["message"]
        # Node 9 is not on the bus: SDO probes time out, typed, and it shows as offline.
        await wait_until(lambda: "no SDO answer" in (h.state("axis-9").get("last_error") or ""), 10)
        assert h.state("axis-9")["online"] is False
        reply = await h.router.dispatch("drive/state", json.dumps({"drive": "axis-9"}).encode())
        assert reply["ok"] and reply["result"]["nmt"] == "unknown"


async def test_bad_input_on_the_bus_never_crashes(pty_pair: SocatPair) -> None:
    async with simulator(pty_pair.b) as sim, running(Harness(pty_pair.a, (drive(),))) as h:
        await wait_until(lambda: operational(h), 20)
        for garbage in (
            "74 5A 5A 5A 38 0D",  # slcan "tZZZ8": identifier not hex
            "74 31 38 31 38 7A 7A 0D",  # "t1818zz": bad data
            "74 31 0D",  # "t1": truncated
            "FF FE 00 80 0D",  # noise
        ):
            await sim.control(f"raw {garbage}")
        await sim.control("frame 0x18A 01 02 03")  # a TPDO from node 10, which nobody configured
        await sim.control("frame 0x70A 05")  # heartbeat of node 10
        await sim.control("frame 0x081 01")  # EMCY of node 1, too short
        await sim.control("frame 0x701 42")  # heartbeat with no NMT state
        await sim.control("frame 0x181 01")  # TPDO1 of node 1, shorter than its mapping
        await sim.control("frame 0x581 43 00 10 00 92 01 02 00")  # an SDO answer nobody asked for
        await wait_until(lambda: h.service.port is not None and h.service.port.stats.malformed >= 3, 10)
        await wait_until(lambda: h.service.counters.get("foreign_frames", 0) >= 2, 10)
        counters = h.service.drives["axis-1"].counters
        await wait_until(lambda: counters.get("malformed", 0) >= 3, 10)
        # The stray SDO answer was sent last: wait for it too (the counters above may be met before).
        await wait_until(lambda: counters.get("sdo_stray", 0) >= 1, 10)
        # Still fully working.
        reply = await h.command("enable")
        assert reply["ok"], reply
        assert operational(h)
        assert not h.events_of("drive_fault")


async def test_configured_tpdo_mapping(pty_pair: SocatPair) -> None:
    tpdo = (
        TpdoConfig(number=1, objects=["6041", "6064:00"]),
        TpdoConfig(number=2, objects=["606C", "603F", "6061/8"]),
    )
    async with simulator(pty_pair.b), running(Harness(pty_pair.a, (drive(tpdo=list(tpdo)),))) as h:
        await wait_until(lambda: operational(h), 20)
        assert (await h.command("enable"))["ok"]
        await wait_until(lambda: (h.state()["velocity"] or 0) > 0, 10)
        assert h.state()["mode"] == 3


# -- the whole daemon: dcud run + Mosquitto + the simulator ------------------------------------------------

PREFIX = "dcu/dcu-test"

SITE_TOML = """
[[can]]
name = "can0"
interface = "slcan"
channel = "{channel}"
options = {{ sleep_after_open = 0 }}

[[drive]]
name = "axis-1"
bus = "can0"
protocol = "canopen"
node_id = 1
commands = true
state_interval_s = 0.2
history_interval_s = 1
"""


@pytest.mark.slow
async def test_daemon_publishes_state_events_and_serves_commands(
    tmp_path: Path, pty_pair: SocatPair, broker: Mosquitto, notify_socket: NotifySocket
) -> None:
    import aiomqtt

    config = write_site(
        tmp_path / "site", mqtt_url=broker.url, toml_extra=SITE_TOML.format(channel=pty_pair.a)
    )
    proc = start_daemon(config, notify_socket)
    try:
        await asyncio.to_thread(notify_socket.wait_for, "READY=1")
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="drive-test") as client:
            await client.subscribe(f"{PREFIX}/#", qos=1)
            seen: dict[str, list[dict[str, Any]]] = {}

            async def collect(until: Any, timeout_s: float = 20) -> None:
                async with asyncio.timeout(timeout_s):
                    async for message in client.messages:
                        if isinstance(message.payload, bytes) and message.payload[:1] == b"{":
                            seen.setdefault(message.topic.value, []).append(json.loads(message.payload))
                        if until():
                            return

            def state() -> dict[str, Any]:
                states = seen.get(f"{PREFIX}/drive/axis-1/state", [])
                return states[-1] if states else {}

            def events(kind: str) -> list[dict[str, Any]]:
                return [e for e in seen.get(f"{PREFIX}/event", []) if e.get("type") == kind]

            async with simulator(pty_pair.b):
                await collect(lambda: state().get("nmt") == "operational" and state().get("configured"))
                await collect(lambda: bool(events("drive_boot_up")))
                await client.publish(
                    f"{PREFIX}/cmd/drive/enable", json.dumps({"id": 1, "drive": "axis-1"}), qos=1
                )
                await collect(lambda: bool(seen.get(f"{PREFIX}/cmd/drive/enable/reply")))
                reply = seen[f"{PREFIX}/cmd/drive/enable/reply"][-1]
                assert reply["ok"] and reply["id"] == 1, reply
                assert reply["result"]["state"]["cia402"] == "operation_enabled"
                await collect(lambda: state().get("cia402") == "operation_enabled")
                await collect(lambda: bool(seen.get(f"{PREFIX}/drive/axis-1/history")))
                history = seen[f"{PREFIX}/drive/axis-1/history"][-1]
                assert history["drive"] == "axis-1" and {v["id"] for v in history["values"]} >= {"position"}
                await client.publish(
                    f"{PREFIX}/cmd/drive/fault_reset", json.dumps({"drive": "axis-1"}), qos=1
                )
                await collect(lambda: bool(seen.get(f"{PREFIX}/cmd/drive/fault_reset/reply")))
                refused = seen[f"{PREFIX}/cmd/drive/fault_reset/reply"][-1]
                assert refused["ok"] is False and refused["error"]["type"] == "DriveStateError"
                can_state = seen.get(f"{PREFIX}/can/can0/state", [{}])[-1]
                assert can_state.get("state") == "active"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, daemon_log(config)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# -- configuration and the demo ------------------------------------------------------------------------


def test_drive_configuration_errors(tmp_path: Path) -> None:
    from dcud.config.loader import load_config
    from dcud.errors import ConfigError

    base = '[[can]]\nname = "can0"\n'
    bad_tpdo = base + (
        '[[drive]]\nname = "a"\nbus = "can0"\nprotocol = "canopen"\nnode_id = 1\n'
        '[[drive.tpdo]]\nnumber = 1\nobjects = ["2000", "6064"]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(write_site(tmp_path / "one", toml_extra=bad_tpdo))
    assert "drive[a].tpdo[0]" in str(info.value) and "no known size" in str(info.value)
    twice = base + "".join(
        f'[[drive]]\nname = "{n}"\nbus = "can0"\nprotocol = "canopen"\nnode_id = 3\n' for n in ("a", "b")
    )
    with pytest.raises(ConfigError) as info:
        load_config(write_site(tmp_path / "two", toml_extra=twice))
    assert 'drive[b].node_id: node 3 on "can0" is also drive "a"' in str(info.value)


async def test_demo_drives_snippet_runs(tmp_path: Path) -> None:
    import tomllib

    from dcud.sim.drive import start_demo_drives

    snippet, cleanup = await start_demo_drives(tmp_path / "demo")
    try:
        data = tomllib.loads(snippet)
        can = CanConfig(**data["can"][0])
        drives = tuple(DriveConfig(**d) for d in data["drive"])
        h = Harness(Path(can.channel), drives)
        async with running(h):
            await wait_until(lambda: operational(h) and operational(h, "axis-2"), 30)
            assert (await h.command("enable"))["ok"]
    finally:
        await cleanup()


async def test_bus_lost_and_reopened(pty_pair: SocatPair) -> None:
    h = Harness(pty_pair.a, (drive(),))
    async with running(h):
        async with simulator(pty_pair.b):
            await wait_until(lambda: operational(h), 20)
        pty_pair.kill()  # the adapter is unplugged: the tty goes away under dcud
        await wait_until(lambda: h.bus.states["can/can0"]["state"] == "closed", 15)
        await wait_until(lambda: h.state()["online"] is False, 15)
        assert h.service.port is not None and h.service.port.stats.failures >= 1
        pty_pair.start()  # plugged in again: dcud reopens the bus (backoff) and sets the drive up again
        async with simulator(pty_pair.b):
            await wait_until(lambda: operational(h), 40)
            assert h.service.port.stats.opens >= 2
            assert (await h.command("enable"))["ok"]


async def test_error_frames_error_passive_and_bus_off_reopen() -> None:
    import can

    from dcud.transport.can import (
        CAN_ERR_BUSOFF,
        CAN_ERR_CRTL,
        CAN_ERR_RESTARTED,
        CanBusState,
        CanPort,
        CanSettings,
    )

    states: list[CanBusState] = []
    port = CanPort(
        CanSettings("v", "virtual", "err-test", reopen_initial_s=0.05, reopen_max_s=0.1),
        lambda *_: None,
        lambda state, _error: states.append(state),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(port.run(stop))
    peer = can.Bus(interface="virtual", channel="err-test")
    try:
        await wait_until(lambda: port.state is CanBusState.ACTIVE, 5)

        def error_frame(error_class: int, data: bytes = b"") -> can.Message:
            return can.Message(
                arbitration_id=error_class, data=data, is_error_frame=True, is_extended_id=True
            )

        peer.send(error_frame(CAN_ERR_CRTL, bytes([0, 0x10])))  # controller: RX error passive
        await wait_until(lambda: port.state is CanBusState.ERROR_PASSIVE, 5)
        peer.send(error_frame(CAN_ERR_RESTARTED))
        await wait_until(lambda: port.state is CanBusState.ACTIVE, 5)
        peer.send(error_frame(CAN_ERR_BUSOFF))
        await wait_until(lambda: port.stats.opens >= 2 and port.state is CanBusState.ACTIVE, 10)
        assert CanBusState.BUS_OFF in states and CanBusState.CLOSED in states
        assert port.stats.error_frames == 3 and port.stats.failures >= 1
        await port.send(0x601, bytes(8))  # works again
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        peer.shutdown()


async def test_state_published_on_change_and_at_a_bounded_rate() -> None:
    from dcud.service.drive_base import DriveBase

    bus = EventBus()
    published: list[dict[str, Any]] = []
    bus.listen(lambda subtopic, payload: published.append(dict(payload)))
    base = DriveBase(drive(state_interval_s=0.5), bus, asyncio.Queue(4), {})
    for position in range(200):  # PDO-rate position changes: first at once, then one trailing message
        base.position = position
        base.changed(False)
    assert len(published) == 1 and published[0]["position"] == 0
    await wait_until(lambda: len(published) == 2, 5)
    assert published[1]["position"] == 199  # the latest value, not a backlog
    base.set_statusword(0x0237)  # a state change goes out at once, whatever the interval
    base.changed(True)
    assert len(published) == 3 and published[2]["cia402"] == "operation_enabled"
    base.stop_publishing()
