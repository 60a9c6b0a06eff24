"""Polling: aligned readings with the right values, meter_silent once and back, deferral behind a
bridge, a line that vanishes and comes back, cmd/read and cmd/scan, sequence numbers, IEC retries within
one lease, an overloaded line.

The simulators and the line services run in real time; the polling service runs on a ManualClock that
the tests move on slot by slot (the rules of the schedule itself: tests/service/test_poll_schedule.py)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dcud.codec.iec62056 import IecReceiver
from dcud.codec.mbus import decode_frame
from dcud.config.model import LineConfig, MeterConfig
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import SYSTEM_CLOCK, ManualClock
from dcud.runtime.timefmt import rfc3339, rfc3339_ms
from dcud.service.commands import CommandRouter
from dcud.service.line import LineRegistry, LineService, LineServiceConfig
from dcud.service.meter_read import IEC_RETRY_PAUSE_S
from dcud.service.polling import PollingConfig, PollingService, SeqStore, first_slot_s
from dcud.sim.serial_sim import (
    SimConfig,
    SimHandle,
    SimLineSpec,
    SimMeterSpec,
    iec_expected_values,
    mbus_expected_values,
)

from helpers.meters import Events, FakeOutbox, SocatPair, simulators, supervised, wait_until

INTERVAL_S = 2


@dataclass
class Site:
    sims: SimHandle
    polling: PollingService
    outbox: FakeOutbox
    events: Events
    bus: EventBus
    registry: LineRegistry
    commands: CommandRouter


@asynccontextmanager
async def site(
    tmp_path: Path,
    sim_lines: list[SimLineSpec],
    meters: list[MeterConfig],
    devices: dict[str, str] | None = None,
    clock_state: dict[str, object] | None = None,
    clock: ManualClock | None = None,
) -> AsyncIterator[Site]:
    """Simulators in-process, real line services and polling under the supervisor, fake outbox;
    polling on ``clock`` when given (the lines on the real one)."""
    async with simulators(SimConfig(sim_lines)) as sims:
        paths = devices or sims.paths()
        lines = tuple(
            LineConfig(
                name=spec.name,
                device=paths[spec.name],
                kind="mbus" if spec.protocol == "mbus" else "rs485",
                reopen_max_s=1,
            )
            for spec in sim_lines
        )
        bus = EventBus()
        if clock_state is not None:
            bus.set_state("clock", clock_state)
        registry = LineRegistry()
        outbox = FakeOutbox()
        events = Events()
        commands = CommandRouter()
        polling = PollingService(
            PollingConfig(meters=tuple(meters), lines=lines, state_dir=str(tmp_path), lease_timeout_s=1.0),
            registry,
            bus,
            outbox,
            commands=commands,
            event=events,
            clock=clock or SYSTEM_CLOCK,
        )
        services = [LineService(LineServiceConfig(line), registry, bus, events) for line in lines]
        async with supervised(*services, polling):
            yield Site(sims, polling, outbox, events, bus, registry, commands)


def mbus_meter(name: str, address: str, line: str = "mbus", **kw: object) -> MeterConfig:
    return MeterConfig(name=name, line=line, protocol="mbus", address=address, interval_s=INTERVAL_S, **kw)  # type: ignore[arg-type]


def iec_meter(
    name: str, address: str, line: str = "iec", *, retries: int = 2, timeout_s: float | None = None
) -> MeterConfig:
    return MeterConfig(
        name=name,
        line=line,
        protocol="iec62056-21",
        address=address,
        interval_s=INTERVAL_S,
        retries=retries,
        timeout_s=timeout_s,
    )


async def drive_until(
    clock: ManualClock, condition: Callable[[], bool], step_s: float, *, parked: int = 1, steps: int = 40
) -> None:
    """Whenever the polling workers (``parked`` of them) wait on the clock, move it on by ``step_s``,
    until ``condition`` holds; readouts and lease waits in between take their real time (bounded)."""
    for _ in range(steps):
        await wait_until(lambda: condition() or clock.sleepers() >= parked, 30)
        if condition():
            return
        clock.advance(step_s)
    raise AssertionError(f"condition not met within {steps} steps of {step_s} s")


async def to_first_slot(clock: ManualClock, interval_s: int, *, parked: int = 1) -> float:
    """Move the clock to the first slot once the workers wait for it; returns the slot."""
    slot = first_slot_s(clock.time(), interval_s)
    await clock.wait_for_sleepers(parked)
    clock.advance(slot - clock.time())
    return slot


async def test_readings_are_aligned_and_carry_the_meters_values(tmp_path: Path) -> None:
    heat = SimMeterSpec("5", kind="heat", base=4321)
    flat = SimMeterSpec("12345678", base=20411.5, fast_reaction=True)
    lines = [SimLineSpec("mbus", "mbus", [heat]), SimLineSpec("iec", "iec62056-21", [flat])]
    meters = [mbus_meter("heat-5", "5"), iec_meter("flat-12", "12345678")]
    clock = ManualClock()
    async with site(tmp_path, lines, meters, clock_state={"synced": False}, clock=clock) as s:
        assert s.bus.states["meter/heat-5"]["status"] == "pending"
        slot = await to_first_slot(clock, INTERVAL_S, parked=2)  # one worker per line
        await wait_until(
            lambda: len(s.outbox.readings("heat-5")) == 1 and len(s.outbox.readings("flat-12")) == 1
        )
        await clock.wait_for_sleepers(2)
        clock.advance(INTERVAL_S)
        await wait_until(
            lambda: len(s.outbox.readings("heat-5")) == 2 and len(s.outbox.readings("flat-12")) == 2
        )
        state = s.bus.states["meter/heat-5"]
        assert s.bus.states["line/mbus"]["state"] == "open"
    first, second = s.outbox.readings("heat-5")[:2]
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["meter"] == "heat-5" and first["ts"].endswith("Z") and first["trigger"] == "schedule"
    assert first["clock_synced"] is False
    assert (first["slot"], second["slot"]) == (rfc3339(slot), rfc3339(slot + INTERVAL_S))
    assert first["ts"] == rfc3339_ms(slot)  # stamped on the service's clock
    for reading in (first, second):
        slot_text = reading["slot"]
        epoch = int(slot_text[17:19])  # seconds field of the aligned slot
        assert epoch % INTERVAL_S == 0
    expected = mbus_expected_values(heat)
    assert [(v["value"], v["unit"]) for v in first["values"][: len(expected)]] == [
        pytest.approx(e) for e in expected
    ]
    assert first["device"]["id"] == "10000005"
    frame = decode_frame(base64.b64decode(first["frames"][0]))
    assert frame.is_rsp_ud and frame.address == 5

    iec = s.outbox.readings("flat-12")[0]
    assert {v["id"]: v["value"] for v in iec["values"]} == iec_expected_values(flat)
    receiver = IecReceiver(side="master")
    receiver.receive_data(iec["raw"].encode("latin-1"))  # the raw readout, exactly as received
    assert receiver.next_message() is not None
    assert iec["baud"] == 9600 and iec["bcc_ok"] is True

    assert state["quality"] == "ok" and state["counters"]["ok"] == 2 and state["last_error"] is None
    assert state["next_due"] == rfc3339(slot + 2 * INTERVAL_S)
    assert state["counters"]["missed"] == 0


async def test_a_silent_meter_is_failing_once_and_comes_back(tmp_path: Path) -> None:
    lines = [SimLineSpec("mbus", "mbus", [SimMeterSpec("3"), SimMeterSpec("4")])]
    meters = [mbus_meter("m3", "3", retries=0, timeout_s=0.2), mbus_meter("m4", "4")]
    clock = ManualClock()
    async with site(tmp_path, lines, meters, clock=clock) as s:
        await drive_until(clock, lambda: len(s.outbox.readings("m3")) >= 1, INTERVAL_S)
        s.sims.runners[0].model.set_silent({"3"})
        await drive_until(clock, lambda: "meter_silent" in s.events.types(), INTERVAL_S)
        before = len(s.outbox.readings("m3"))
        health = s.polling.meters["m3"]
        failed_at_silence = health.failed
        await drive_until(clock, lambda: health.failed >= failed_at_silence + 2, INTERVAL_S)  # more cycles
        assert s.events.types().count("meter_silent") == 1  # raised once, not once per cycle
        assert len(s.outbox.readings("m3")) == before  # the last value is never re-sent as new
        state = s.bus.states["meter/m3"]
        assert state["quality"] == "failing" and state["last_error"]["type"] == "PeerTimeout"
        assert s.bus.states["meter/m4"]["quality"] == "ok"  # its neighbour is unaffected

        s.sims.runners[0].model.set_silent(set())
        await drive_until(clock, lambda: "meter_back" in s.events.types(), INTERVAL_S)
        await drive_until(clock, lambda: len(s.outbox.readings("m3")) > before, INTERVAL_S)
        assert s.bus.states["meter/m3"]["quality"] == "ok"
        assert health.missed == 0  # one pass per slot: nothing was late
    seqs = [r["seq"] for r in s.outbox.readings("m3")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    silent = [e for e in s.events.items if e["type"] == "meter_silent"]
    assert silent[0]["meter"] == "m3" and silent[0]["line"] == "mbus"


async def test_polls_behind_a_bridge_are_deferred_not_failed(tmp_path: Path) -> None:
    lines = [SimLineSpec("mbus", "mbus", [SimMeterSpec("7")])]
    clock = ManualClock()
    async with site(tmp_path, lines, [mbus_meter("m7", "7")], clock=clock) as s:
        await drive_until(clock, lambda: len(s.outbox.readings("m7")) >= 1, INTERVAL_S)
        health = s.polling.meters["m7"]
        line = s.registry["mbus"]
        async with line.lease("tcp:127.0.0.1:40000", "bridge"):
            await clock.wait_for_sleepers(1)
            clock.advance(INTERVAL_S)  # the next slot comes while the bridge holds the line
            # The clock stands still from here: the poll waits for its lease (1 s, real) again and again.
            await wait_until(lambda: s.bus.states["meter/m7"]["status"] == "deferred", 20)
            count = len(s.outbox.readings("m7"))
            held_slot = health.next_due_s
            assert s.bus.states["line/mbus"]["lease"]["kind"] == "bridge"
        await wait_until(lambda: len(s.outbox.readings("m7")) > count, 20)
        assert s.outbox.readings("m7")[-1]["slot"] == rfc3339(held_slot)  # the held slot, read late
        assert health.failed == 0 and health.deferred >= 1
        assert "meter_silent" not in s.events.types()


async def test_line_vanishes_and_comes_back_polling_resumes(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path / "dev", tmp_path / "far")
    pair.start()
    try:
        lines = [SimLineSpec("mbus", "mbus", [SimMeterSpec("8")], device=str(tmp_path / "far"))]
        clock = ManualClock()
        async with site(
            tmp_path, lines, [mbus_meter("m8", "8")], devices={"mbus": str(tmp_path / "dev")}, clock=clock
        ) as s:
            await drive_until(clock, lambda: len(s.outbox.readings("m8")) >= 1, INTERVAL_S)
            pair.kill()
            await wait_until(lambda: "line_down" in s.events.types(), 20)
            await drive_until(clock, lambda: s.bus.states["meter/m8"]["status"] == "line_down", 1.0)
            count = len(s.outbox.readings("m8"))
            pair.start()
            await wait_until(lambda: "line_up" in s.events.types(), 20)
            await drive_until(clock, lambda: len(s.outbox.readings("m8")) > count, 1.0)
            assert "meter_silent" not in s.events.types()  # the line's fault, not the meter's
            assert s.events.types().count("line_down") == 1
    finally:
        pair.kill()


async def test_cmd_read_and_cmd_scan(tmp_path: Path) -> None:
    lines = [SimLineSpec("mbus", "mbus", [SimMeterSpec("1", kind="water"), SimMeterSpec("2")])]
    meters = [
        MeterConfig(name="w1", line="mbus", protocol="mbus", address="1", interval_s=3600),
        MeterConfig(name="w2", line="mbus", protocol="mbus", address="10000002", interval_s=3600),
    ]
    async with site(tmp_path, lines, meters) as s:
        reply = await s.commands.dispatch("read", json.dumps({"meter": "w2", "id": 7}).encode())
        assert reply["ok"] and reply["id"] == 7
        assert reply["result"]["meter"] == "w2" and reply["result"]["trigger"] == "command"
        await wait_until(lambda: len(s.outbox.readings("w2")) == 1, 10)  # committed like any reading
        bad = await s.commands.dispatch("read", b'{"meter": "nope"}')
        assert not bad["ok"]
        started = await s.commands.dispatch(
            "scan", b'{"line": "mbus", "mode": "primary", "first": 0, "last": 3}'
        )
        assert started["ok"] and started["result"]["state"] == "line/mbus/scan"
        await wait_until(lambda: s.bus.states.get("line/mbus/scan", {}).get("state") == "done", 30)
        found = s.bus.states["line/mbus/scan"]["found"]
        assert [f["primary"] for f in found] == [1, 2]


def test_sequence_numbers_survive_restarts_without_repeating(tmp_path: Path) -> None:
    path = tmp_path / "seq.json"
    store = SeqStore(path)
    used = [store.next("a") for _ in range(5)]
    assert used == [1, 2, 3, 4, 5]
    again = SeqStore(path)  # a crash loses the in-memory counter, never the reservation
    assert again.next("a") > 5
    assert again.next("b") == 1


def test_slots_are_aligned_to_the_wall_clock() -> None:
    assert first_slot_s(1000.0, 900) == 1800.0
    assert first_slot_s(1800.0, 900) == 2700.0
    assert math.isclose(first_slot_s(59.9, 15), 60.0)


async def test_an_overloaded_line_reads_every_meter_late_rather_than_starving_some(tmp_path: Path) -> None:
    # Eight meters every second; the clock moves on a second with every reading, so a pass takes 8 slots.
    specs = [SimMeterSpec(str(a)) for a in range(1, 9)]
    meters = [
        MeterConfig(name=f"m{a}", line="mbus", protocol="mbus", address=str(a), interval_s=1)
        for a in range(1, 9)
    ]
    clock = ManualClock()
    async with site(tmp_path, [SimLineSpec("mbus", "mbus", specs)], meters, clock=clock) as s:
        await to_first_slot(clock, 1)
        for count in range(1, 17):
            await wait_until(lambda: len(s.outbox.readings()) >= count, 30)  # noqa: B023
            clock.advance(1)
        missed = sum(h.missed for h in s.polling.meters.values())
    assert missed > 0
    first_two_passes = [r["meter"] for r in s.outbox.readings()[:16]]
    assert sorted(first_two_passes) == sorted(f"m{a}" for a in range(1, 9) for _ in range(2))
    for a in range(1, 9):
        slots = [r["slot"] for r in s.outbox.readings(f"m{a}")]
        assert len(slots) == len(set(slots))  # one reading per slot at most


async def test_iec_retries_pause_on_the_clock_within_one_lease(tmp_path: Path) -> None:
    flat = SimMeterSpec("12345678", fast_reaction=True, silent=True)
    meter = iec_meter("flat-12", "12345678", retries=2, timeout_s=0.3)
    clock = ManualClock()
    async with site(tmp_path, [SimLineSpec("iec", "iec62056-21", [flat])], [meter], clock=clock) as s:
        health = s.polling.meters["flat-12"]
        await to_first_slot(clock, INTERVAL_S)
        for retry in (1, 2):
            # The sign-on failed; the retry waits on the clock, still holding the line.
            await wait_until(lambda: health.retries == retry and clock.sleepers() == 1, 30)  # noqa: B023
            assert clock.next_deadline_s() == clock.monotonic() + IEC_RETRY_PAUSE_S
            assert s.bus.states["line/iec"]["lease"]["owner"] == "poll:flat-12"
            assert health.failed == 0
            clock.advance(IEC_RETRY_PAUSE_S)
        await wait_until(lambda: health.failed == 1, 30)
        assert "meter_silent" in s.events.types() and health.retries == 2 and health.reads == 1
        assert s.bus.states["meter/flat-12"]["next_due"] == rfc3339(health.next_due_s)
