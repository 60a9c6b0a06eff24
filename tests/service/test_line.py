"""Line ownership: leases serialize, queues are bounded and ordered, a vanished device comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog.testing

from dcud.config.model import LineConfig
from dcud.errors import LocalProtocolError, TransportError
from dcud.runtime.bus import EventBus
from dcud.service.line import (
    LeaseTimeout,
    Line,
    LineBusyError,
    LineClosedError,
    LineRegistry,
    LineService,
    LineServiceConfig,
)
from dcud.transport.serial import Framing, Rs485Settings, SerialPort

from helpers.meters import Events, SocatPair, supervised, wait_until
from helpers.pty import PtyPeer, released


@pytest.fixture
async def pty_line() -> AsyncIterator[tuple[Line, PtyPeer]]:
    peer = PtyPeer()
    line = Line(LineConfig(name="l1", device=peer.path, kind="mbus"), max_waiters=4)
    port = SerialPort(peer.path, 2400, "8E1")
    await port.open()
    line.attach(port)
    try:
        yield line, peer
    finally:
        line.detach("closed")
        await released(port)
        peer.close()


async def test_leases_never_interleave(pty_line: tuple[Line, PtyPeer]) -> None:
    line, peer = pty_line
    inside = 0
    most_inside = 0

    async def user(tag: str) -> None:
        nonlocal inside, most_inside
        async with line.lease(f"user-{tag}", "poll", timeout_s=10) as port:
            inside += 1
            most_inside = max(most_inside, inside)
            for ch in f"<{tag}{tag}{tag}{tag}>".encode():
                port.write(bytes([ch]))
                await asyncio.sleep(0)  # give every other task a chance to cut in
            await port.drain()
            inside -= 1

    line.max_waiters = 32
    await asyncio.gather(*(user(chr(ord("a") + i)) for i in range(12)))
    await wait_until(lambda: len(peer.drain()) >= 12 * 6, 5)
    text = peer.drain().decode()
    assert most_inside == 1
    chunks = [text[i : i + 6] for i in range(0, len(text), 6)]
    assert sorted(chunks) == sorted(f"<{c * 4}>" for c in "abcdefghijkl")
    assert line.counters.leases_granted == 12
    assert line.holder is None and line.waiting == 0


async def test_waiters_are_bounded_and_refusals_counted(pty_line: tuple[Line, PtyPeer]) -> None:
    line, _peer = pty_line
    line.max_waiters = 2
    release = asyncio.Event()

    async def hold() -> None:
        async with line.lease("holder", "poll"):
            await release.wait()

    async def wait_for_line() -> str:
        async with line.lease("waiter", "poll", timeout_s=10) as port:
            return port.owner

    holder = asyncio.create_task(hold())
    await wait_until(lambda: line.holder is not None, 5)
    waiters = [asyncio.create_task(wait_for_line()) for _ in range(2)]
    await wait_until(lambda: line.waiting == 2, 5)
    with pytest.raises(LineBusyError):
        async with line.lease("third", "poll", timeout_s=10):
            pass
    assert line.counters.leases_refused == 1
    release.set()
    assert await asyncio.gather(*waiters) == ["waiter", "waiter"]
    await holder


async def test_priority_then_fifo(pty_line: tuple[Line, PtyPeer]) -> None:
    line, _peer = pty_line
    line.max_waiters = 8
    release = asyncio.Event()
    order: list[str] = []

    async def hold() -> None:
        async with line.lease("holder", "poll"):
            await release.wait()

    async def take(owner: str, kind: str) -> None:
        async with line.lease(owner, kind, timeout_s=10):  # type: ignore[arg-type]
            order.append(owner)

    holder = asyncio.create_task(hold())
    await wait_until(lambda: line.holder is not None, 5)
    tasks = []
    for owner, kind in (("poll-1", "poll"), ("drive-1", "drive"), ("poll-2", "poll"), ("bridge-1", "bridge")):
        tasks.append(asyncio.create_task(take(owner, kind)))
        queued = len(tasks)
        await wait_until(lambda: line.waiting == queued, 5)  # noqa: B023 (awaited right here)
    tasks.append(asyncio.create_task(take("cli-1", "cli")))
    await wait_until(lambda: line.waiting == 5, 5)
    release.set()
    await asyncio.gather(holder, *tasks)
    assert order == ["bridge-1", "cli-1", "drive-1", "poll-1", "poll-2"]


async def test_timeout_names_the_holder_and_defers_behind_a_bridge(pty_line: tuple[Line, PtyPeer]) -> None:
    line, _peer = pty_line
    release = asyncio.Event()

    async def bridge() -> None:
        async with line.lease("tcp:127.0.0.1:5555", "bridge"):
            await release.wait()

    task = asyncio.create_task(bridge())
    await wait_until(lambda: line.holder is not None, 5)
    with pytest.raises(LeaseTimeout) as caught:
        async with line.lease("poll:flat-1", "poll", timeout_s=0.05):
            pass
    assert caught.value.deferred
    assert caught.value.holder is not None and caught.value.holder.kind == "bridge"
    assert line.waiting == 0  # the timed-out waiter left the queue
    release.set()
    await task
    async with line.lease("poll:flat-1", "poll", timeout_s=1) as port:
        assert port.kind == "poll"


async def test_cancelled_waiter_does_not_block_the_queue(pty_line: tuple[Line, PtyPeer]) -> None:
    line, _peer = pty_line
    release = asyncio.Event()

    async def hold() -> None:
        async with line.lease("holder", "cli"):
            await release.wait()

    async def wait_for_line() -> None:
        async with line.lease("waiter", "poll", timeout_s=10):
            pass

    holder = asyncio.create_task(hold())
    await wait_until(lambda: line.holder is not None, 5)
    doomed = asyncio.create_task(wait_for_line())
    await wait_until(lambda: line.waiting == 1, 5)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert line.waiting == 0
    release.set()
    await holder
    async with line.lease("next", "poll", timeout_s=1):
        pass


async def test_lease_ends_cleanly(pty_line: tuple[Line, PtyPeer]) -> None:
    line, peer = pty_line
    async with line.lease("iec", "cli") as port:
        await port.set_baud(9600)
        await port.set_framing("7E1")
        assert port.baud == 9600 and port.framing == "7E1"
        peer.send(b"stale")
        await wait_until(lambda: line.port is not None and line.port.in_waiting > 0, 5)
    assert line.port is not None
    assert line.port.baud == 2400 and str(line.port.framing) == "8E1"  # back to the line's settings
    assert line.port.in_waiting == 0  # input flushed for the next holder
    with pytest.raises(LocalProtocolError):
        port.write(b"late")
    async with line.lease("next", "poll") as port2:
        peer.send(b"hello\x16")
        assert await port2.read_until(b"\x16", timeout_s=5) == b"hello\x16"


async def test_echo_filter_drops_our_own_bytes() -> None:
    peer = PtyPeer()
    port = SerialPort(peer.path, 2400, "8E1", echo_filter=True)
    await port.open()
    try:
        port.write(b"\x10\x5b\x01\x5c\x16")
        await port.drain()
        peer.send(b"\x10\x5b\x01\x5c\x16" + b"\xe5")  # a converter's echo, then the answer
        assert await port.read(16, timeout_s=5) == b"\xe5"
        assert port.counters.echo_dropped == 5
    finally:
        port.close()
        await released(port)
        peer.close()


async def test_rs485_ioctl_refused_on_a_pty_is_reported_not_fatal() -> None:
    peer = PtyPeer()
    port = SerialPort(peer.path, 9600, "8N1", rs485=Rs485Settings(rts_on_send=True))
    await port.open()
    try:
        assert not port.rs485_applied and port.rs485_error
        port.write(b"x")
        await port.drain()
    finally:
        port.close()
        await released(port)
        peer.close()


def test_rs485_settings_from_wme_modes() -> None:
    line = LineConfig(name="r", device="/dev/null", kind="rs485")
    assert LineServiceConfig(line, rs485_mode=0).rs485_settings() is None
    two_wire = LineServiceConfig(line, rs485_mode=1, dcd_mode=3).rs485_settings()
    assert two_wire is not None and two_wire.rts_on_send and not two_wire.rx_during_tx
    four_wire_low = LineServiceConfig(line, rs485_mode=2, dcd_mode=0).rs485_settings()
    assert four_wire_low is not None and four_wire_low.rx_during_tx and not four_wire_low.rts_on_send
    mbus = LineConfig(name="m", device="/dev/null", kind="mbus")
    assert LineServiceConfig(mbus, rs485_mode=1).rs485_settings() is None
    assert Framing.parse("7E1").bits_per_char == 10 and Framing.parse("8E1").bits_per_char == 11


async def test_exclusive_open_refuses_a_second_owner() -> None:
    peer = PtyPeer()
    first = SerialPort(peer.path, 2400, "8E1")
    await first.open()
    try:
        with pytest.raises(TransportError):
            await SerialPort(peer.path, 2400, "8E1").open()
    finally:
        first.close()
        await released(first)
        peer.close()


async def test_registry_removal_fails_waiters() -> None:
    registry = LineRegistry()
    line = registry.attach(LineConfig(name="gone", device="/dev/null"))
    waiter = asyncio.create_task(_lease_once(line))
    await wait_until(lambda: line.waiting == 1, 5)
    registry.remove("gone")
    with pytest.raises(LineClosedError):
        await waiter
    assert registry.get("gone") is None


async def _lease_once(line: Line) -> None:
    async with line.lease("x", "poll", timeout_s=10):
        pass


async def test_device_disappears_and_comes_back(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path / "dev", tmp_path / "far")
    pair.start()
    bus = EventBus()
    events = Events()
    registry = LineRegistry()
    config = LineServiceConfig(
        LineConfig(name="usb-1", device=str(tmp_path / "dev"), kind="mbus", reopen_max_s=1), rs485_mode=1
    )
    service = LineService(config, registry, bus, events)
    try:
        async with supervised(service):
            line = registry["usb-1"]
            await wait_until(lambda: line.state == "open", 10)
            assert bus.states["line/usb-1"]["state"] == "open"
            async with line.lease("probe", "cli") as port:
                port.write(b"ping")
                await port.drain()

            pair.kill()  # the adapter is unplugged
            await wait_until(lambda: line.state == "failed", 10)
            await wait_until(lambda: "line_down" in events.types(), 10)
            assert bus.states["line/usb-1"]["state"] == "failed"
            assert bus.states["line/usb-1"]["errors"] >= 1

            # A lease asked for while the device is gone waits, and is granted once it is back.
            waiting = asyncio.create_task(_lease_once(line))
            await wait_until(lambda: line.waiting == 1, 10)  # queued behind the missing device
            assert not waiting.done()
            pair.start()  # plugged in again, same names
            await wait_until(lambda: line.state == "open", 15)
            await wait_until(lambda: "line_up" in events.types(), 10)
            await asyncio.wait_for(waiting, 10)
            assert events.types().count("line_down") == 1
            assert events.types().count("line_up") == 1
    finally:
        pair.kill()


async def test_receiver_is_dropped_when_the_lease_ends(pty_line: tuple[Line, PtyPeer]) -> None:
    line, peer = pty_line
    first: list[bytes] = []
    async with line.lease("bridge-a", "bridge") as port:
        port.set_receiver(first.append)
        peer.send(b"a1")
        await wait_until(lambda: first == [b"a1"], 5)
        assert port.output_pending() == 0
    # The lease ended with its receiver still set: later bytes are buffered, never pushed to it.
    peer.send(b"x")
    await wait_until(lambda: line.port is not None and line.port.in_waiting == 1, 5)
    assert first == [b"a1"]
    port.set_receiver(None)  # a late clean-up does nothing
    with pytest.raises(LocalProtocolError):
        port.set_receiver(first.append)
    with pytest.raises(LocalProtocolError):
        port.output_pending()


async def test_receivers_never_see_another_holders_bytes(pty_line: tuple[Line, PtyPeer]) -> None:
    line, peer = pty_line
    first: list[bytes] = []
    second: list[bytes] = []
    async with line.lease("bridge-a", "bridge") as port:
        port.set_receiver(first.append)
        peer.send(b"a1")
        await wait_until(lambda: first == [b"a1"], 5)
        port.set_receiver(None)  # the client is full: bytes wait in the port
        peer.send(b"a2")
        await wait_until(lambda: line.port is not None and line.port.in_waiting == 2, 5)
    async with line.lease("bridge-b", "bridge") as port2:
        port2.set_receiver(second.append)
        assert second == []  # a2 was the first holder's: flushed with its lease
        peer.send(b"b1")
        await wait_until(lambda: second == [b"b1"], 5)
        port2.write(b"ping")
        await port2.drain()
    assert first == [b"a1"] and second == [b"b1"]
    assert peer.drain() == b"ping"


async def test_a_pty_refusing_the_framing_is_noted_not_warned() -> None:
    """The demo's and the simulators' lines are ptys: 8E1 refused there is expected, not a warning."""
    peer = PtyPeer()
    config = LineServiceConfig(LineConfig(name="sim-1", device=peer.path, kind="mbus"), rs485_mode=0)
    registry = LineRegistry()
    try:
        with structlog.testing.capture_logs() as logs:
            async with supervised(LineService(config, registry, EventBus(), Events())):
                await wait_until(lambda: registry["sim-1"].state == "open", 10)
        notes = [entry for entry in logs if entry["event"] == "framing not applied"]
        assert [(entry["log_level"], entry["pty"]) for entry in notes] == [("info", True)], logs
        assert "8E1" in notes[0]["error"]
        assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")], logs
    finally:
        peer.close()


async def test_is_pty_is_found_on_open(tmp_path: Path) -> None:
    peer = PtyPeer()
    port = SerialPort(peer.path, 9600, "8N1")
    await port.open()
    try:
        assert port.is_pty
    finally:
        port.close()
        await released(port)
        peer.close()
    assert not SerialPort(str(tmp_path / "nothing"), 9600).is_pty  # unopened: False, never a guess
