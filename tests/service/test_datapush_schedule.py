"""Data push policy: schedule alignment, retries and rest as a pure state machine with an explicit clock,
and the service driving it against a real outbox (fake uploader, virtual clock: no real waiting)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import zoneinfo
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import load_config
from dcud.errors import ConfigError
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service.datapush import (
    DataPushService,
    DataPushServiceConfig,
    Phase,
    PushError,
    PushMachine,
    PushSchedule,
    RetryPolicy,
    next_boundary_s,
    parse_push_target,
)
from dcud.service.outbox import Outbox, OutboxItem, OutboxLimits
from dcud.sim.readings import iec_reading, reading_bytes

UTC = dt.UTC
BUDAPEST = zoneinfo.ZoneInfo("Europe/Budapest")


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


# ------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize(
    ("now", "period_s", "zone", "expected"),
    [
        ("2026-03-10T10:07:13+00:00", 300, UTC, "2026-03-10T10:10:00+00:00"),
        ("2026-03-10T10:10:00+00:00", 300, UTC, "2026-03-10T10:15:00+00:00"),  # strictly after
        ("2026-03-10T10:07:13+00:00", 900, BUDAPEST, "2026-03-10T10:15:00+00:00"),
        ("2026-03-10T10:07:13+00:00", 86400, BUDAPEST, "2026-03-10T23:00:00+00:00"),  # local midnight CET
        ("2026-07-10T10:07:13+00:00", 86400, BUDAPEST, "2026-07-10T22:00:00+00:00"),  # CEST
        ("2026-03-10T10:07:13+00:00", 3600, zoneinfo.ZoneInfo("Asia/Kolkata"), "2026-03-10T10:30:00+00:00"),
        ("2026-03-10T10:07:13+00:00", 1800, zoneinfo.ZoneInfo("Asia/Kathmandu"), "2026-03-10T10:15:00+00:00"),
        # spring forward in Budapest: 02:00 local does not exist; 01:00 UTC is 03:00 CEST
        ("2026-03-29T00:30:00+00:00", 3600, BUDAPEST, "2026-03-29T01:00:00+00:00"),
        # fall back: the hours keep coming once per real hour
        ("2026-10-25T00:10:00+00:00", 3600, BUDAPEST, "2026-10-25T01:00:00+00:00"),
        ("2026-03-10T10:07:13.2+00:00", 0.5, UTC, "2026-03-10T10:07:13.5+00:00"),  # test override
    ],
)
def test_next_boundary(now: str, period_s: float, zone: dt.tzinfo, expected: str) -> None:
    assert next_boundary_s(ts(now), period_s, zone) == pytest.approx(ts(expected))


def test_boundaries_are_strictly_increasing_across_dst_days() -> None:
    start = ts("2026-10-24T20:00:00+00:00")
    now, seen = start, []
    for _ in range(200):  # 50 hours of 15-minute cycles over the autumn switch
        now = next_boundary_s(now, 900, BUDAPEST)
        seen.append(now)
    assert all(b > a for a, b in itertools.pairwise(seen))
    assert all(b - a <= 3600 for a, b in itertools.pairwise(seen))
    local = [dt.datetime.fromtimestamp(s, BUDAPEST) for s in seen]
    assert all(t.minute % 15 == 0 and t.second == 0 for t in local)


def test_table_schedule_takes_the_earliest_period() -> None:
    schedule = PushSchedule((900.0, 300.0, 3600.0), UTC)
    assert schedule.next_cycle_s(ts("2026-03-10T10:07:00+00:00")) == ts("2026-03-10T10:10:00+00:00")
    assert schedule.next_cycle_s(ts("2026-03-10T10:10:00+00:00")) == ts("2026-03-10T10:15:00+00:00")


# ------------------------------------------------------------------------------------- state machine


def drive(machine: PushMachine, outcomes: Sequence[bool], now: float) -> list[tuple[float, int]]:
    """Feed attempt outcomes; returns (time, attempt number) of every attempt, jumping to each wake-up."""
    attempts = []
    for ok in outcomes:
        now = max(now, machine.wake_at)
        assert machine.poll(now)
        number = machine.begin(now)
        attempts.append((now, number))
        if ok:
            machine.succeeded(now, more=False)
        else:
            machine.failed(now, "down")
    return attempts


def test_retries_follow_the_parameters_then_rest_then_start_again() -> None:
    policy = RetryPolicy(timeout_s=15, retry_delay_s=60, max_retries=3, rest_s=86400)
    start = ts("2026-03-10T10:07:00+00:00")
    machine = PushMachine(policy, PushSchedule((300.0,)).next_cycle_s, start)
    assert machine.phase is Phase.WAITING and machine.wake_at == ts("2026-03-10T10:10:00+00:00")
    assert not machine.poll(machine.wake_at - 1)
    t0 = machine.wake_at
    attempts = drive(machine, [False] * 9, start)
    # round 1: 1 + 3 retries, 60 s apart; rest 86400 s; round 2 the same; then the first of round 3
    expected_round = [(0, 1), (60, 2), (120, 3), (180, 4)]
    round2 = 180 + 86400
    expected = [
        *[(t0 + d, n) for d, n in expected_round],
        *[(t0 + round2 + d, n) for d, n in expected_round],
        (t0 + 2 * round2, 1),
    ]
    assert attempts == expected
    assert machine.rests == 2 and machine.failures_total == 9
    assert machine.phase is Phase.RETRY_WAIT


def test_success_resets_the_round_and_waits_for_the_next_cycle() -> None:
    policy = RetryPolicy(retry_delay_s=10, max_retries=2, rest_s=1000)
    machine = PushMachine(policy, PushSchedule((300.0,)).next_cycle_s, 0.0)
    attempts = drive(machine, [False, True], 0.0)
    assert attempts == [(300.0, 1), (310.0, 2)]
    assert machine.phase is Phase.WAITING and machine.wake_at == 600.0
    assert drive(machine, [False, False, False], 600.0) == [(600.0, 1), (610.0, 2), (620.0, 3)]
    assert machine.phase is Phase.RESTING and machine.wake_at == 1620.0


def test_full_batches_chain_at_once() -> None:
    machine = PushMachine(RetryPolicy(), PushSchedule((60.0,)).next_cycle_s, 0.0)
    assert machine.poll(60.0)
    machine.begin(60.0)
    machine.succeeded(60.5, more=True)
    assert machine.poll(60.5) and machine.phase is Phase.DUE
    machine.begin(60.5)
    machine.succeeded(61.0, more=False)
    assert machine.phase is Phase.WAITING and machine.wake_at == 120.0


def test_zero_retries_rest_right_after_the_first_failure() -> None:
    machine = PushMachine(RetryPolicy(max_retries=0, rest_s=500), PushSchedule((60.0,)).next_cycle_s, 0.0)
    assert drive(machine, [False, False], 0.0) == [(60.0, 1), (560.0, 1)]


def test_clock_step_back_does_not_stretch_a_retry() -> None:
    machine = PushMachine(RetryPolicy(retry_delay_s=60), PushSchedule((300.0,)).next_cycle_s, 1000.0)
    drive(machine, [False], 1000.0)
    assert machine.phase is Phase.RETRY_WAIT and machine.wake_at == 1260.0
    assert not machine.poll(1210.0)
    assert not machine.poll(610.0)  # NTP stepped the clock back by 600 s
    assert machine.wake_at == 660.0
    assert machine.poll(660.0)


def test_outcome_outside_an_attempt_is_a_bug() -> None:
    machine = PushMachine(RetryPolicy(), PushSchedule((60.0,)).next_cycle_s, 0.0)
    with pytest.raises(RuntimeError):
        machine.succeeded(1.0, more=False)
    with pytest.raises(RuntimeError):
        machine.begin(1.0)


# ----------------------------------------------------------------------------------------- target/config


def test_parse_push_target() -> None:
    target = parse_push_target("ftps://meter:pa%40ss@192.0.2.10/up/dir/")
    assert (target.scheme, target.host, target.port, target.username, target.password, target.path) == (
        "ftps",
        "192.0.2.10",
        21,
        "meter",
        "pa@ss",
        "/up/dir",
    )
    assert target.kind == "ftp" and target.tls
    assert "pa@ss" not in repr(target) and "pa@ss" not in target.redacted()
    assert parse_push_target("mqtts://h/x").port == 8883
    assert parse_push_target("mqtt://h").kind == "mqtt"
    for bad in ("http://h/", "udp://h:5", "ftp://"):
        with pytest.raises(ValueError):
            parse_push_target(bad)


def write_site(tmp_path: Path, wme: str, toml_extra: str = "") -> Path:
    (tmp_path / "wme.conf").write_text(wme)
    config = tmp_path / "dcud.toml"
    config.write_text(f'device_id = "dcu-1"\nstate_dir = "state"\n{toml_extra}')
    return config


@pytest.mark.parametrize("url", ["http://u:p@h/", "udp://h:5000", "sftp://h/"])
def test_other_schemes_are_a_config_error_naming_the_key(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_site(tmp_path, f"ntp_interval=600\ndatapush_host={url}\n"))
    assert [i.key for i in info.value.issues] == ["datapush_host"]
    assert ":p@" not in str(info.value)


def test_slice_from_parameters(tmp_path: Path) -> None:
    config = load_config(
        write_site(
            tmp_path,
            "datapush_host=ftp://u:p@127.0.0.1:2121/in\ndatapush_periodic=0\ndatapush_timeout=2500\n"
            "datapush_retry_delay=7\ndatapush_max_retries=5\ndatapush_interval=3600\ndatapush_prefix=WM115\n"
            "datapush_table_mask=17\n",
            toml_extra='timezone = "Europe/Budapest"\n'
            '[[line]]\nname = "l1"\ndevice = "/dev/null"\n'
            '[[meter]]\nname = "a"\nline = "l1"\nprotocol = "iec62056-21"\ninterval_s = 300\n'
            '[[meter]]\nname = "b"\nline = "l1"\nprotocol = "iec62056-21"\n',
        )
    )
    slice_ = DataPushServiceConfig.from_config(config)
    assert slice_ is not None
    assert slice_.policy == RetryPolicy(timeout_s=2.5, retry_delay_s=7, max_retries=5, rest_s=3600)
    assert slice_.periods_s == (300.0, 900.0)  # "table": per-meter intervals (900 s without one)
    assert (slice_.prefix, slice_.table_mask, slice_.device_id) == ("WM115", 17, "dcu-1")
    assert slice_.time.iana == "Europe/Budapest"


def test_consumers_follow_the_configuration(tmp_path: Path) -> None:
    from dcud.app import consumers_for

    def consumers(wme: str) -> list[str]:
        site = tmp_path / str(abs(hash(wme)))
        site.mkdir()
        return consumers_for(load_config(write_site(site, wme)))

    assert consumers("ntp_interval=600\n") == []
    assert consumers("datapush_host=ftp://h/\n") == ["ftp"]
    assert consumers("datapush_host=mqtt://h/\neventpush_addr=127.0.0.1:9\n") == ["mqtt-push", "udp-event"]
    assert consumers("eventpush_addr=+36201234567\n") == []  # SMS: no modem, nothing to hold back


# -------------------------------------------------------------------------------- service, virtual time


class VirtualClock:
    """Time that jumps to wherever the service wants to sleep to (never waits for real)."""

    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    async def sleep(self, ctx: ServiceContext, delay_s: float) -> bool:
        self.t += delay_s
        await asyncio.sleep(0)
        return ctx.stopping.is_set()


class FakeUploader:
    consumer = "ftp"

    def __init__(self, fail: int = 0, fail_with: type[Exception] = PushError) -> None:
        self.fail = fail
        self.fail_with = fail_with
        self.batches: list[list[str]] = []
        self.sessions_closed = 0

    async def deliver(self, items: Sequence[OutboxItem], now_s: float) -> dict[str, Any]:
        if self.fail > 0:
            self.fail -= 1
            raise self.fail_with("login refused")
        self.batches.append([item.uid for item in items])
        return {"files": [f"f{len(self.batches)}"]}

    async def close(self) -> None:
        self.sessions_closed += 1


def slice_for(tmp_path: Path, **wme: str) -> DataPushServiceConfig:
    params = {"datapush_host": "ftp://u:p@127.0.0.1:21/", "datapush_periodic": "5", **wme}
    config = load_config(
        write_site(
            tmp_path, "".join(f"{k}={v}\n" for k, v in params.items()), "[datapush]\nbatch_items = 40\n"
        )
    )
    slice_ = DataPushServiceConfig.from_config(config)
    assert slice_ is not None
    return slice_


async def run_until(service: DataPushService, done: Any, limit: int = 10_000) -> None:
    ctx = ServiceContext("datapush", 30.0, lambda: None)
    task = asyncio.create_task(service.run(ctx))
    for _ in range(limit):
        if done():
            break
        await asyncio.sleep(0)
    else:
        raise AssertionError("condition not reached")
    ctx.stopping.set()
    async with asyncio.timeout(10):
        await task


async def test_service_retries_rests_and_catches_up_in_order(tmp_path: Path) -> None:
    slice_ = slice_for(
        tmp_path, datapush_retry_delay="60", datapush_max_retries="2", datapush_interval="3600"
    )
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["ftp"], "dcu-1")
    await outbox.open()
    try:
        items = await outbox.put_many(
            [
                ("reading", "meter/m/reading", reading_bytes(iec_reading("m", n, 1.8e9 + n)))
                for n in range(100)
            ]
        )
        await outbox.put("event", "event", json.dumps({"type": "x"}).encode())  # not for the data push
        uploader = FakeUploader(fail=4)
        clock = VirtualClock(ts("2026-03-10T10:07:00+00:00"))
        bus = EventBus()
        service = DataPushService(slice_, bus, outbox, uploader, clock)
        await run_until(service, lambda: outbox.stats().backlog["ftp"] == 0 and len(uploader.batches) == 3)
        log = list(service.attempt_log)
        t0 = ts("2026-03-10T10:10:00+00:00")
        # 1 + 2 retries 60 s apart, rest 3600 s, then the 4th failure, a retry that works and the catch-up
        assert [(r.started_s - t0, r.number, r.outcome == "ok") for r in log[:7]] == [
            (0, 1, False),
            (60, 2, False),
            (120, 3, False),
            (3720, 1, False),
            (3780, 2, True),
            (3780, 1, True),
            (3780, 1, True),
        ]
        delivered = [uid for batch in uploader.batches for uid in batch]
        assert delivered == [item.uid for item in items]  # complete, ordered, no duplicates
        assert [len(b) for b in uploader.batches] == [40, 40, 20]
        state = bus.states["push/ftp"]
        assert state["backlog"] == 0 and state["pushed_items"] == 100
        assert state["counters"]["rests"] == 1 and state["counters"]["failures"] == 4
        assert state["last_error"]["message"] == "login refused"
        assert "u:p@" not in json.dumps(state)
    finally:
        await outbox.close()


async def test_timeouts_halve_the_batch(tmp_path: Path) -> None:
    slice_ = slice_for(tmp_path, datapush_retry_delay="1", datapush_max_retries="5")
    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), ["ftp"], "dcu-1")
    await outbox.open()
    try:
        await outbox.put_many([("reading", "meter/m/reading", b"{}") for _ in range(50)])
        uploader = FakeUploader(fail=2, fail_with=TimeoutError)
        service = DataPushService(slice_, EventBus(), outbox, uploader, VirtualClock(0.0))
        await run_until(service, lambda: outbox.stats().backlog["ftp"] == 0)
        assert [len(b) for b in uploader.batches][:2] == [10, 20]  # 40 -> 20 -> 10, then doubling again
        assert sum(len(b) for b in uploader.batches) == 50
    finally:
        await outbox.close()


def test_builders_and_the_wme_source_meter(tmp_path: Path) -> None:
    from dcud.app import Shared, build_services
    from dcud.service.commands import CommandRouter
    from dcud.service.polling import PollingService

    config = load_config(
        write_site(
            tmp_path,
            "datapush_host=ftp://u:p@127.0.0.1/\ndatapush_iec_address=12345678\n"
            "datapush_iec_readout_baudrate=4800\ndatapush_periodic=15\neventpush_addr=127.0.0.1\n"
            "dm.push_enable=1\ndm.server=127.0.0.1\ndm.port=7000\n",
            toml_extra='[[line]]\nname = "opto"\ndevice = "/dev/ttyUSB0"\nkind = "rs232"\n',
        )
    )
    outbox = Outbox(tmp_path / "unused.sqlite", OutboxLimits(), ["ftp", "udp-event"], "dcu-1")
    runtime = Shared.create("dcu-1", "dcu/dcu-1", EventBus(), outbox, CommandRouter())
    services = {s.name: s for s in build_services(config, runtime)}
    assert {"datapush", "eventpush", "dm", "polling"} <= set(services)
    polling = services["polling"]
    assert isinstance(polling, PollingService)
    (meter,) = polling.config.meters
    assert (meter.name, meter.line, meter.protocol, meter.address, meter.max_baud) == (
        "iec-1",
        "opto",
        "iec62056-21",
        "12345678",
        4800,
    )
    assert polling.config.interval_for(meter) == 900  # read on the push period
