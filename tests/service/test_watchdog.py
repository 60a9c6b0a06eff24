"""Connectivity watchdog (ICMP in a network namespace of our own, TCP fallback) and the daily restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dcud.config.loader import load_config
from dcud.config.timekeeping import LocalClock
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import ManualClock
from dcud.runtime.supervisor import ServiceContext
from dcud.runtime.uplink import UplinkReconnect
from dcud.service import power, watchdog

from helpers import REPO
from helpers.daemon import daemon_log, start_daemon, write_site
from helpers.meters import wait_until
from helpers.netns import run_in_own_netns
from helpers.notify import NotifySocket


class Events:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    async def __call__(self, event_type: str, text: str, **fields: Any) -> None:
        self.items.append({"type": event_type, "text": text, **fields})


def slice_of(tmp_path: Path, wme: str, toml: str = "") -> watchdog.WatchdogServiceConfig:
    cfg = watchdog.WatchdogServiceConfig.from_config(
        load_config(write_site(tmp_path / "site", wme=wme, toml_extra=toml))
    )
    assert cfg is not None
    return cfg


# -- probes ----------------------------------------------------------------------------------------


def test_echo_request_checksum() -> None:
    packet = watchdog.echo_request(0x1234, 1, b"abcd")
    assert packet[0] == 8 and packet[1] == 0
    assert watchdog._checksum(packet) == 0  # a correct checksum sums to zero


async def test_tcp_probe_counts_accepted_and_refused_as_reachable() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await watchdog.tcp_probe("127.0.0.1", port, 2.0)
    finally:
        server.close()
        await server.wait_closed()
    assert await watchdog.tcp_probe("127.0.0.1", port, 2.0)  # refused now: the host answered with RST


def _in_own_netns(script: str, lo_up: bool) -> subprocess.CompletedProcess[str]:
    """Run python ``script`` in a network namespace of our own, where ping sockets are permitted."""
    ping = "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"
    return run_in_own_netns(script, ["{ip} link set lo up", ping] if lo_up else [ping])


PROBE = (
    "import asyncio; from dcud.service.watchdog import icmp_probe; "
    "print(asyncio.run(icmp_probe('127.0.0.1', 1.0)))"
)


@pytest.mark.netns
def test_icmp_probe_in_a_namespace_of_our_own() -> None:
    up = _in_own_netns(PROBE, lo_up=True)
    assert up.stdout.strip() == "True", up.stderr
    down = _in_own_netns(PROBE, lo_up=False)  # loopback down: no route, the probe fails
    assert down.stdout.strip() == "False", down.stderr


async def test_auto_probe_falls_back_to_tcp_when_icmp_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(host: str, timeout_s: float, seq: int = 1) -> bool:
        raise watchdog.IcmpNotPermitted(13, "Permission denied")

    monkeypatch.setattr(watchdog, "icmp_probe", refused)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = slice_of(
        tmp_path, "com_ping_host=127.0.0.1\ncom_ping_timeout=1000\n", f"\n[watchdog]\ntcp_port = {port}\n"
    )
    service = watchdog.WatchdogService(cfg, EventBus(), Events(), lambda reason: None)
    try:
        assert await service.check(ServiceContext("watchdog", 30.0, lambda: None))
    finally:
        server.close()
        await server.wait_closed()
    assert service.probe_kind == "tcp"


async def test_repeated_failure_raises_one_event_and_reconnects_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[bool] = [False] * 6 + [True]
    calls: list[str] = []

    async def probe(host: str, port: int, timeout_s: float) -> bool:
        calls.append(host)
        return answers.pop(0)

    monkeypatch.setattr(watchdog, "tcp_probe", probe)
    cfg = slice_of(
        tmp_path, "com_ping_host=127.0.0.1\ncom_ping_max_retries=3\n", '\n[watchdog]\nprobe = "tcp"\n'
    )
    bus = EventBus()
    events = Events()
    reconnect = UplinkReconnect()
    service = watchdog.WatchdogService(cfg, bus, events, lambda reason: None, reconnect)
    ctx = ServiceContext("watchdog", 30.0, lambda: None)
    assert not await service.check(ctx)  # 3 probes fail
    assert not await service.check(ctx)  # 3 more
    assert await service.check(ctx)  # the 7th answers
    assert len(calls) == 7
    assert [e["type"] for e in events.items] == ["uplink_unreachable"]
    assert events.items[0]["host"] == "127.0.0.1"
    assert reconnect.epoch == 2
    assert bus.states["uplink"]["reachable"] is True and bus.states["uplink"]["failed_checks"] == 2


async def test_uplink_unreachable_for_snrp_bis_timeout_restarts_once_reachable_resets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # snrp_bis_timeout (hours): the WM-E "module reset" after a long outage is a restart of dcud (75).
    answers: list[bool] = []

    async def probe(host: str, port: int, timeout_s: float) -> bool:
        return answers.pop(0)

    monkeypatch.setattr(watchdog, "tcp_probe", probe)
    cfg = slice_of(
        tmp_path,
        "com_ping_host=127.0.0.1\ncom_ping_max_retries=1\nsnrp_bis_timeout=2\n",
        '\n[watchdog]\nprobe = "tcp"\nrestart_min_uptime_s = 0\n',
    )
    assert cfg.unreachable_restart_s == 7200
    clock = ManualClock(wall_s=1_000_000.0)
    requests: list[str] = []
    service = watchdog.WatchdogService(
        cfg, EventBus(), Events(), requests.append, UplinkReconnect(), clock=clock
    )
    ctx = ServiceContext("watchdog", 30.0, lambda: None)
    answers.extend([False, False, True, False, False])
    assert not await service.check(ctx)  # the outage starts
    clock.advance(7199)
    assert not await service.check(ctx)  # one second short
    assert requests == []
    clock.advance(2)
    assert await service.check(ctx)  # reachable again: the outage is over
    clock.advance(7200)
    assert not await service.check(ctx)  # a new outage starts from here
    assert requests == []
    clock.advance(7200)
    assert not await service.check(ctx)
    assert requests == ["uplink unreachable for 2 h (snrp_bis_timeout)"]
    # 0 = never.
    never = slice_of(
        tmp_path / "b", "com_ping_host=127.0.0.1\nsnrp_bis_timeout=0\n", '\n[watchdog]\nprobe = "tcp"\n'
    )
    assert never.unreachable_restart_s == 0


async def test_reconnect_signal_wakes_waiters() -> None:
    signal_ = UplinkReconnect()
    waiter = asyncio.create_task(signal_.wait_newer(signal_.epoch))
    await asyncio.sleep(0)
    signal_.request("watchdog")
    assert await asyncio.wait_for(waiter, 5) == "watchdog"


# -- daily restart ---------------------------------------------------------------------------------


def test_restart_time_with_shift_and_minimum_uptime(tmp_path: Path) -> None:
    cfg = slice_of(tmp_path, "snrp_restart_time=03:00\nsnrp_restart_time_shift=30\n", '\ntimezone = "UTC"\n')
    assert cfg.restart_shift_s == 1800
    clock = LocalClock(cfg.time)
    now = dt.datetime(2026, 11, 21, 2, 55, tzinfo=dt.UTC).timestamp()
    started_long_ago = now - 86400
    due = watchdog.restart_due_s(cfg, clock, now, started_long_ago, 600.0)
    assert due == dt.datetime(2026, 11, 21, 3, 10, tzinfo=dt.UTC).timestamp()
    # Just started (minimum uptime 600 s not reached by 03:00 + 0 s): tomorrow.
    due = watchdog.restart_due_s(cfg, clock, now, now, 0.0)
    assert due == dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC).timestamp()
    # Restarted at 03:10 by the shift: the next one is tomorrow, never the same day again.
    after = dt.datetime(2026, 11, 21, 3, 10, 5, tzinfo=dt.UTC).timestamp()
    due = watchdog.restart_due_s(cfg, clock, after, after - 3600, 500.0)
    assert due == dt.datetime(2026, 11, 22, 3, 0, tzinfo=dt.UTC).timestamp() + 500


async def test_daily_restart_is_requested_at_the_time_and_waits_for_power(tmp_path: Path) -> None:
    cfg = slice_of(
        tmp_path,
        "snrp_restart_time=03:00\n",
        '\ntimezone = "UTC"\n\n[watchdog]\nrestart_min_uptime_s = 0\n',
    )
    clock = ManualClock(wall_s=dt.datetime(2026, 11, 21, 2, 59, 59, tzinfo=dt.UTC).timestamp())
    requests: list[str] = []
    bus = EventBus()
    bus.set_state("power", {"state": "lost"})
    service = watchdog.WatchdogService(cfg, bus, Events(), requests.append, clock=clock, rng=random.Random(1))
    ctx = ServiceContext("watchdog", 30.0, lambda: None, clock)
    task = asyncio.create_task(service._restarter(ctx))
    await clock.wait_for_sleepers(1)
    assert service.restart_at_s == dt.datetime(2026, 11, 21, 3, 0, tzinfo=dt.UTC).timestamp()
    clock.advance(2)  # 03:00:01, power lost: it looks, waits and parks again
    await clock.wait_for_sleepers(1)
    assert requests == [] and not task.done()
    bus.set_state("power", {"state": "ok"})
    clock.advance(1)
    await asyncio.wait_for(task, 10)
    assert requests and "daily restart" in requests[0]
    assert power.power_ok(bus)


@pytest.mark.slow
def test_daily_restart_exits_75_cleanly(tmp_path: Path, notify_socket: NotifySocket) -> None:
    # The next full minute, in UTC; the daemon must be up before it (else: the one after).
    now = dt.datetime.now(dt.UTC)
    at = (now + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
    if (at - now).total_seconds() < 8:
        at += dt.timedelta(minutes=1)
    power_file = tmp_path / "online"
    power_file.write_text("1\n")
    config = write_site(
        tmp_path / "site",
        wme=f"snrp_restart_time={at:%H:%M}\n",
        toml_extra=(
            '\ntimezone = "UTC"\n\n[watchdog]\nrestart_min_uptime_s = 0\n'
            f'\n[power]\nsource = "file"\npath = "{power_file}"\n'
        ),
    )
    proc = start_daemon(config, notify_socket)
    try:
        notify_socket.wait_for("READY=1")
        code = proc.wait(timeout=(at - dt.datetime.now(dt.UTC)).total_seconds() + 30)
        assert code == 75, daemon_log(config)
        assert "daily restart" in daemon_log(config)
        assert (config.parent / "state" / power.MARKER_FILE).exists()  # a clean stop
        notify_socket.wait_for("STOPPING=1", timeout_s=2)
    finally:
        proc.kill()
    assert time.time() >= at.timestamp()


def test_systemd_unit_restarts_on_75() -> None:
    unit = (REPO / "systemd" / "dcud.service").read_text()
    assert "RestartForceExitStatus=75" in unit and "SuccessExitStatus=75" in unit


async def test_mqtt_uplink_reconnects_when_the_watchdog_asks(tmp_path: Path, broker: Any) -> None:
    from dcud.config.model import MqttConfig
    from dcud.service.commands import CommandRouter
    from dcud.service.mqtt import MqttService, MqttServiceConfig
    from dcud.service.outbox import Outbox, OutboxLimits

    outbox = Outbox(tmp_path / "outbox.sqlite", OutboxLimits(), consumers=["mqtt"], device_id="dcu-test")
    await outbox.open()
    reconnect = UplinkReconnect()
    cfg = MqttServiceConfig.build(MqttConfig(url=broker.url, reconnect_max_s=2), "dcu-test", "dcu/dcu-test")
    service = MqttService(cfg, EventBus(), outbox, CommandRouter(), lambda: {"state": "online"}, reconnect)
    ctx = ServiceContext("mqtt", 30.0, lambda: None)
    task = asyncio.create_task(service.run(ctx))

    async def until(connected: bool) -> None:
        await wait_until(lambda: service.connected is connected, 15.0, step_s=0.005)

    async def serving() -> None:  # connected and past the set-up: the reconnect watcher runs
        await wait_until(
            lambda: any(t.get_name() == "dcud[mqtt:reconnect]" for t in asyncio.all_tasks()),
            15.0,
            step_s=0.005,
        )

    try:
        await until(True)
        await serving()
        reconnect.request("uplink unreachable")
        await until(False)
        await until(True)
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 15)
        await outbox.close()
