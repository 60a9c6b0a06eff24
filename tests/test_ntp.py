"""The NTP client against a real chronyd on a loopback port, answer checks, spellings, clock owner."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import write_site

from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service import ntp
from dcud.sim.alarm_peers import Chronyd, start_chronyd


class Events:
    """Collects what the service commits through ``Runtime.event``."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    async def __call__(self, event_type: str, text: str, **fields: Any) -> None:
        self.items.append({"type": event_type, "text": text, **fields})

    def types(self) -> list[str]:
        return [item["type"] for item in self.items]


@pytest.fixture
def chronyd(tmp_path: Path) -> Any:
    server = start_chronyd(tmp_path / "chrony")
    try:
        yield server
    finally:
        server.stop()


def site_config(tmp_path: Path, wme: str, toml: str = "") -> ntp.NtpServiceConfig:
    return ntp.NtpServiceConfig.from_config(
        load_config(write_site(tmp_path / "site", wme=wme, toml_extra=toml))
    )


async def wait_clock(bus: EventBus, predicate: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            state = bus.states.get("clock")
            if state is not None and predicate(state):
                return dict(state)
            await asyncio.sleep(0.02)


class Running:
    def __init__(self, service: ntp.NtpService) -> None:
        self.service = service
        self.ctx = ServiceContext("ntp", 30.0, lambda: None)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.service.run(self.ctx))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ctx.stopping.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


async def test_synchronised_with_a_small_offset_then_unsynchronised_when_the_server_dies(
    tmp_path: Path, chronyd: Chronyd
) -> None:
    cfg = site_config(
        tmp_path, f"ntp.address=127.0.0.1\nntp.port={chronyd.port}\nntp.interval=1\nntp.timeout=1\n"
    )
    bus = EventBus()
    events = Events()
    service = ntp.NtpService(cfg, bus, events)
    async with Running(service):
        state = await wait_clock(bus, lambda s: s["synced"] is True)
        assert abs(state["offset_s"]) < 0.05  # same host: the offset is measurement noise
        assert 0 <= state["delay_s"] < 0.05
        assert state["stratum"] == 8  # chronyd serves its local clock at "local stratum 8"
        assert state["server"] == f"127.0.0.1:{chronyd.port}"
        assert state["last_sync_ts"].endswith("Z")
        assert ntp.clock_synced(bus) is True
        chronyd.stop()
        state = await wait_clock(bus, lambda s: s["synced"] is False)
        assert state["failures"] == cfg.unsync_after == 3  # the documented default
        assert ntp.clock_synced(bus) is False
        assert events.types() == ["clock_unsync"]
        assert events.items[0]["server"] == f"127.0.0.1:{chronyd.port}"


async def test_recovery_raises_clock_sync(tmp_path: Path) -> None:
    port_holder = start_chronyd(tmp_path / "chrony-a")
    port = port_holder.port
    port_holder.stop()
    cfg = site_config(
        tmp_path,
        f"ntp_address=127.0.0.1\nntp_port={port}\nntp_interval=1\nntp_timeout=1\n",
        "\n[ntp]\nunsync_after = 2\n",
    )
    bus = EventBus()
    events = Events()
    async with Running(ntp.NtpService(cfg, bus, events)):
        await wait_clock(bus, lambda s: s["synced"] is False)
        server = start_chronyd(tmp_path / "chrony-b", port=port)
        try:
            await wait_clock(bus, lambda s: s["synced"] is True)
        finally:
            server.stop()
    assert events.types() == ["clock_unsync", "clock_sync"]


def test_dotted_spelling_wins_when_both_are_set(tmp_path: Path) -> None:
    both = site_config(
        tmp_path / "a",
        "ntp_address=192.0.2.1\nntp.address=192.0.2.2\nntp_port=1123\nntp.port=2123\n"
        "ntp_interval=600\nntp.interval=60\nntp_timeout=30\nntp.timeout=5\n",
    )
    assert (both.server, both.port, both.interval_s, both.timeout_s) == ("192.0.2.2", 2123, 60, 5)
    legacy = site_config(tmp_path / "b", "ntp_address=192.0.2.1\nntp_interval=600\n")
    assert (legacy.server, legacy.port, legacy.interval_s, legacy.timeout_s) == ("192.0.2.1", 123, 600, 10)
    none = site_config(tmp_path / "c", "")
    assert (none.server, none.interval_s) == (None, 30)


class FakeStats:
    def __init__(self, **kw: Any) -> None:
        now = time.time()
        self.mode = 4
        self.stratum = 2
        self.leap = 0
        self.ref_id = 0x7F000001
        self.tx_timestamp = now + ntp.NTP_EPOCH_OFFSET_S
        self.orig_timestamp = now + ntp.NTP_EPOCH_OFFSET_S
        self.delay = 0.01
        self.offset = 0.002
        self.__dict__.update(kw)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"mode": 3}, "mode 3"),
        ({"stratum": 16}, "stratum 16"),
        ({"leap": 3}, "leap indicator 3"),
        ({"tx_timestamp": 0}, "transmit timestamp"),
        ({"orig_timestamp": 1000.0}, "originate"),
        ({"delay": 5.0}, "round-trip delay"),
        ({"delay": -0.1}, "round-trip delay"),
    ],
)
def test_insane_answers_are_rejected(fields: dict[str, Any], reason: str) -> None:
    now = time.time()
    with pytest.raises(ntp.NtpRejected, match=reason):
        ntp.check_answer(FakeStats(**fields), now - 1, now + 1, max_delay_s=1.5)


def test_kiss_of_death_is_recognised() -> None:
    now = time.time()
    with pytest.raises(ntp.NtpRejected) as info:
        ntp.check_answer(FakeStats(stratum=0, ref_id=int.from_bytes(b"RATE", "big")), now - 1, now + 1, 1.5)
    assert info.value.kiss == "RATE"
    sample = ntp.check_answer(FakeStats(), now - 1, now + 1, 1.5)
    assert sample.offset_s == pytest.approx(0.002)


async def test_large_offset_is_unsynchronised_and_stepping_only_without_an_owner(tmp_path: Path) -> None:
    cfg = site_config(
        tmp_path,
        "ntp.address=127.0.0.1\nntp.interval=1\n",
        "\n[ntp]\nstep_clock = true\nmax_offset_s = 1.0\n",
    )
    steps: list[float] = []
    bus = EventBus()
    events = Events()

    def query(host: str, port: int, timeout_s: float, max_delay_s: float) -> ntp.NtpSample:
        return ntp.NtpSample(offset_s=7.5, delay_s=0.01, stratum=2, ref_id="GPS", leap=0)

    service = ntp.NtpService(cfg, bus, events, query=query, stepper=steps.append)
    ctx = ServiceContext("ntp", 30.0, lambda: None)
    service.owner = "chrony"
    await service.poll_once(ctx)
    assert steps == []  # a time daemon owns the clock: never step
    assert bus.states["clock"]["synced"] is False and events.types() == ["clock_unsync"]
    service.owner = None
    await service.poll_once(ctx)
    assert steps == [7.5]
    assert ntp.should_step(cfg, None, 0.1) is False  # below the threshold


def test_clock_owner_detection(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    root = tmp_path / "root"
    (proc / "1").mkdir(parents=True)
    (proc / "1" / "comm").write_text("systemd\n")
    root.mkdir()
    assert ntp.detect_clock_owner(proc, root) is None
    (proc / "812").mkdir()
    (proc / "812" / "comm").write_text("systemd-timesyn\n")
    assert ntp.detect_clock_owner(proc, root) == "systemd-timesyncd"
    (root / "run" / "chrony").mkdir(parents=True)
    (root / "run" / "chrony" / "chronyd.pid").write_text("1\n")
    assert ntp.detect_clock_owner(proc, root) == "chrony"


async def test_no_server_configured_reports_no_verdict(tmp_path: Path) -> None:
    cfg = site_config(tmp_path, "")
    bus = EventBus()
    async with Running(ntp.NtpService(cfg, bus, Events())):
        state = await wait_clock(bus, lambda s: "owner" in s)
    assert state["synced"] is None and state["server"] is None
    assert ntp.clock_synced(bus) is None
