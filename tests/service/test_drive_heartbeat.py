"""The CiA 301 heartbeat consumer: the sans-I/O watch, and the CAN drive service driving it on a ManualClock.

The watch (:mod:`dcud.codec.heartbeat`) takes arrivals and ``now`` and hands out events and its next
deadline; the service stamps heartbeats on its injected clock and sleeps on that clock until the
deadline. Here the clock is a :class:`~dcud.runtime.clock.ManualClock`, so a loss is made by moving time,
not by waiting for it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.codec.heartbeat import (
    HeartbeatBack,
    HeartbeatLost,
    HeartbeatStatus,
    HeartbeatWatch,
    heartbeat_timeout_s,
)
from dcud.config.model import CanConfig, DriveConfig
from dcud.errors import LocalProtocolError
from dcud.runtime.bus import EventBus
from dcud.runtime.clock import ManualClock
from dcud.service.drive_commands import DriveRegistry
from dcud.service.drives import CanDrivesConfig, CanDriveService
from dcud.transport.can import CanSettings

from helpers.meters import Events, FakeOutbox, supervised, wait_until

# -- the watch ---------------------------------------------------------------------------------------


def test_consumer_timeout_from_the_producer_time() -> None:
    assert heartbeat_timeout_s(100) == pytest.approx(0.3)  # period + 200 ms beats 1.5 x at short periods
    assert heartbeat_timeout_s(1000) == pytest.approx(1.5)


def test_lost_at_the_deadline_once_and_back_with_the_next_heartbeat() -> None:
    watch = HeartbeatWatch()
    watch.add(1, 0.3)
    assert watch.status(1) is HeartbeatStatus.UNKNOWN and watch.next_deadline() is None
    assert watch.heartbeat(1, 10.0) == []
    assert watch.status(1) is HeartbeatStatus.OK
    assert watch.next_deadline() == pytest.approx(10.3)
    assert watch.handle_timer(10.29) == []
    assert watch.heartbeat(1, 10.2) == []  # the deadline moves on with every heartbeat
    assert watch.next_deadline() == pytest.approx(10.5)
    assert watch.handle_timer(10.3) == []
    assert watch.handle_timer(10.5) == [HeartbeatLost(1, 0.3)]
    assert watch.status(1) is HeartbeatStatus.LOST and watch.next_deadline() is None
    assert watch.handle_timer(20.0) == []  # reported once
    assert watch.heartbeat(1, 21.0) == [HeartbeatBack(1)]
    assert watch.status(1) is HeartbeatStatus.OK and watch.next_deadline() == pytest.approx(21.3)


def test_timeouts_learnt_off_and_reset() -> None:
    watch = HeartbeatWatch()
    watch.add(1)  # no configured timeout: learnt from 1017 at set-up
    watch.add(2, 0.5)
    watch.heartbeat(1, 0.0)
    watch.heartbeat(2, 0.0)
    assert watch.next_deadline() == pytest.approx(0.5)  # node 1 is not watched yet
    watch.set_timeout(1, 0.3)
    assert watch.next_deadline() == pytest.approx(0.3)
    assert watch.handle_timer(1.0) == [HeartbeatLost(1, 0.3), HeartbeatLost(2, 0.5)]
    watch.set_timeout(2, None)  # producer time 0: nothing to watch
    assert watch.status(2) is HeartbeatStatus.OFF and watch.timeout_s(2) is None
    watch.reset(1)  # the bus closed: nothing heard, and no "back" after it
    assert watch.status(1) is HeartbeatStatus.UNKNOWN
    assert watch.heartbeat(1, 2.0) == []
    with pytest.raises(LocalProtocolError):
        watch.status(9)
    with pytest.raises(LocalProtocolError):
        watch.add(3, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["hb", "timer"]), st.integers(1, 3), st.floats(0.0, 2.0)),
        max_size=40,
    )
)
def test_losses_come_exactly_when_overdue(steps: list[tuple[str, int, float]]) -> None:
    """Against a model: lost iff a timer call at or after last + timeout; events alternate lost/back."""
    timeouts = {1: 0.3, 2: 0.5, 3: 1.0}
    watch = HeartbeatWatch()
    for node, timeout in timeouts.items():
        watch.add(node, timeout)
    last: dict[int, float] = {}
    lost: set[int] = set()
    now = 0.0
    for kind, node, delta in steps:
        now += delta
        if kind == "hb":
            events = watch.heartbeat(node, now)
            assert events == ([HeartbeatBack(node)] if node in lost else [])
            lost.discard(node)
            last[node] = now
        else:
            due = {n for n, t in last.items() if n not in lost and now >= t + timeouts[n]}
            events = watch.handle_timer(now)
            assert {e.node_id for e in events if isinstance(e, HeartbeatLost)} == due
            lost |= due
        watched = [t + timeouts[n] for n, t in last.items() if n not in lost]
        assert watch.next_deadline() == (pytest.approx(min(watched)) if watched else None)


# -- the service on a ManualClock ----------------------------------------------------------------------

_channels = itertools.count()


def _service(clock: ManualClock, timeout_s: float | None = 0.3) -> tuple[CanDriveService, Events, str]:
    channel = f"hb-watch-{id(clock)}-{next(_channels)}"
    drive = DriveConfig(
        name="axis-1",
        bus="can0",
        protocol="canopen",
        node_id=1,
        heartbeat_timeout_s=timeout_s,
        timeout_s=0.2,  # no SDO server on this bus: the set-up probes fail fast (real time)
    )
    events = Events()
    service = CanDriveService(
        CanDrivesConfig(CanConfig(name="can0", interface="virtual", channel=channel), (drive,)),
        EventBus(),
        events,
        FakeOutbox().put,
        DriveRegistry(),
        settings=CanSettings("can0", "virtual", channel),
        clock=clock,
    )
    return service, events, channel


@contextlib.asynccontextmanager
async def _running(
    timeout_s: float | None = 0.3,
) -> AsyncIterator[tuple[ManualClock, CanDriveService, Events, Any, Any]]:
    """The service supervised on a ManualClock, its port open, a virtual CAN peer on its channel: the
    clock, the service, its events, the peer and the drive ``axis-1``."""
    clock = ManualClock()
    service, events, channel = _service(clock, timeout_s)
    peer: Any = can.Bus(interface="virtual", channel=channel)
    try:
        async with supervised(service):
            drive = service.drives["axis-1"]
            await wait_until(lambda: service.port is not None and service.port.is_open, 10)
            yield clock, service, events, peer, drive
    finally:
        peer.shutdown()


def _heartbeat(peer: can.BusABC, state: int = 0x7F) -> None:
    peer.send(can.Message(arbitration_id=0x701, data=bytes([state]), is_extended_id=False))


async def test_service_sleeps_on_its_clock_until_the_watch_deadline() -> None:
    async with _running() as (clock, service, events, peer, drive):
        assert clock.sleepers() == 0  # nothing watched yet: no deadline, no timer
        _heartbeat(peer)
        await wait_until(lambda: drive.heartbeat is HeartbeatStatus.OK, 10)
        await clock.wait_for_sleepers(1)  # the watch now sleeps until the heartbeat is due
        assert clock.next_deadline_s() == pytest.approx(clock.monotonic() + 0.3)

        clock.advance(0.2)
        _heartbeat(peer)  # stamped at +0.2 on the clock: due at +0.5 now
        await wait_until(lambda: _last_due(service) == pytest.approx(clock.monotonic() + 0.3), 10)
        clock.advance(0.15)  # +0.35: past the first deadline, not the second
        await clock.wait_for_sleepers(1)
        assert drive.heartbeat is HeartbeatStatus.OK and not _of(events, "drive_heartbeat_lost")
        assert clock.next_deadline_s() == pytest.approx(clock.monotonic() + 0.15)

        clock.advance(0.15)  # +0.5: overdue
        await wait_until(lambda: bool(_of(events, "drive_heartbeat_lost")), 10)
        state = service._state_bus.states["drive/axis-1"]
        assert state["heartbeat"] == "lost" and state["online"] is False
        assert _of(events, "drive_heartbeat_lost")[0]["timeout_s"] == pytest.approx(0.3)
        assert clock.sleepers() == 0  # nothing left to watch: the watch waits for a heartbeat

        _heartbeat(peer)
        await wait_until(lambda: bool(_of(events, "drive_heartbeat_restored")), 10)
        assert drive.heartbeat is HeartbeatStatus.OK
        await clock.wait_for_sleepers(1)
        assert len(_of(events, "drive_heartbeat_lost")) == 1


def _last_due(service: CanDriveService) -> float:
    return service.heartbeats.next_deadline() or 0.0


def _of(events: Events, event_type: str) -> list[dict[str, Any]]:
    return [e for e in events.items if e["type"] == event_type]


async def test_heartbeats_do_not_wake_the_watch() -> None:
    """Healthy heartbeats move the deadline but leave the sleeping watch alone (no re-arm per frame)."""
    async with _running() as (clock, service, _events, peer, drive):
        _heartbeat(peer)
        await wait_until(lambda: drive.heartbeat is HeartbeatStatus.OK, 10)
        await clock.wait_for_sleepers(1)
        first = clock.next_deadline_s()
        assert first is not None and service.port is not None
        received = service.port.stats.rx_frames
        clock.advance(0.1)
        for _ in range(5):
            _heartbeat(peer)
        await wait_until(lambda: service.port is not None and service.port.stats.rx_frames >= received + 5, 5)
        assert service.heartbeats.next_deadline() == pytest.approx(first + 0.1)
        assert not service._rearm.is_set()
        assert clock.next_deadline_s() == first and clock.sleepers() == 1  # still the first timer


async def test_a_timeout_learnt_after_the_first_heartbeats_is_watched() -> None:
    """Regression: the timeout read from the drive (1017) arrives after its heartbeats started; the
    timer, asleep with nothing to watch, must arm at the next heartbeat and report the loss."""
    async with _running(timeout_s=None) as (clock, service, events, peer, drive):
        _heartbeat(peer)
        await wait_until(lambda: drive.heartbeat is HeartbeatStatus.OK, 10)
        assert clock.sleepers() == 0  # no timeout known: nothing to watch
        service.heartbeats.set_timeout(1, 0.3)  # what the SDO read of 1017 does
        _heartbeat(peer)
        await clock.wait_for_sleepers(1)
        clock.advance(0.31)
        await wait_until(lambda: bool(_of(events, "drive_heartbeat_lost")), 10)
