"""The serial port's fast path: writes go to the driver at once, received bytes can be pushed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import dcud.transport.serial as serial_mod
from dcud.errors import TransportError
from dcud.transport.serial import SerialPort, char_time_s

from helpers.meters import wait_until
from helpers.pty import PtyPeer, released


@pytest.fixture
async def port_peer() -> AsyncIterator[tuple[SerialPort, PtyPeer]]:
    peer = PtyPeer()
    port = SerialPort(peer.path, 2400, "8E1")
    await port.open()
    try:
        yield port, peer
    finally:
        port.close()
        await released(port)
        peer.close()


async def test_write_reaches_the_driver_without_a_loop_turn(port_peer: tuple[SerialPort, PtyPeer]) -> None:
    port, peer = port_peer
    assert port.write(b"abc") == 0  # the driver took it all: nothing left in user space
    assert port.output_pending() == 0
    assert peer.drain() == b"abc"  # no await since the write: it went out in the call
    assert port.counters.bytes_tx == 3
    await port.drain()


async def test_partial_writes_keep_the_order_of_the_calls(port_peer: tuple[SerialPort, PtyPeer]) -> None:
    port, peer = port_peer
    chunks = [bytes([i]) * 4096 + i.to_bytes(2, "big") for i in range(64)]  # far more than a pty holds
    expected = b"".join(chunks)
    left = [port.write(chunk) for chunk in chunks]
    pending = port.output_pending()
    assert 0 < pending < len(expected)  # the pty took a part at once, the rest is queued
    assert left[0] == 0 and left[-1] == pending  # write() says what waits in user space
    assert port.write(b"tail") == pending + 4  # queued behind, never jumps ahead
    assert port.output_pending() == pending + 4
    await wait_until(lambda: len(peer.drain()) >= len(expected) + 4, 20, step_s=0.005)
    assert peer.drain() == expected + b"tail"
    assert port.counters.bytes_tx == len(expected) + 4
    await wait_until(lambda: port.output_pending() == 0, 5)
    await port.drain()


async def test_drain_waits_for_the_queue_and_wakes_when_it_empties(
    port_peer: tuple[SerialPort, PtyPeer],
) -> None:
    """drain() sleeps while bytes wait in user space and wakes when the transport has written them all
    (the transport's pause/resume callbacks, not a polling loop); a closed port ends the wait."""
    port, peer = port_peer
    payload = bytes(range(256)) * 1024  # 256 KiB: far more than the pty takes at once
    port.write(payload)
    assert port.output_pending() > 0
    draining = asyncio.ensure_future(port.drain(timeout_s=30))
    await asyncio.sleep(0)  # one loop turn: the drain runs up to its wait on the queue
    assert not draining.done()
    # The far end reads what the pty holds; the transport writes more (its writer callback ran) but
    # the queue does not empty: a drain that woke on progress rather than on an empty queue ends here.
    pending = port.output_pending()
    peer.drain()
    await wait_until(lambda: port.output_pending() < pending, 10, step_s=0.005)
    assert port.output_pending() > 0 and not draining.done()
    await wait_until(lambda: len(peer.drain()) >= len(payload), 20, step_s=0.005)
    await asyncio.wait_for(draining, 10)
    assert peer.drain() == payload and port.output_pending() == 0
    port.write(payload)
    stuck = asyncio.ensure_future(port.drain(timeout_s=30))
    await asyncio.sleep(0)  # one loop turn: the drain is waiting on the queue when the port closes
    assert not stuck.done()
    port.close()
    with pytest.raises(TransportError):
        await asyncio.wait_for(stuck, 10)


async def test_echo_filter_sees_fast_written_bytes() -> None:
    peer = PtyPeer()
    port = SerialPort(peer.path, 2400, "8E1", echo_filter=True)
    await port.open()
    got: list[bytes] = []
    try:
        port.write(b"\x10\x5b\x01\x5c\x16")
        assert peer.drain() == b"\x10\x5b\x01\x5c\x16"
        port.set_receiver(got.append)
        peer.send(b"\x10\x5b\x01\x5c\x16\xe5")  # a converter's echo, then the answer
        await wait_until(lambda: bool(got), 5)
        assert got == [b"\xe5"]
        assert port.counters.echo_dropped == 5
    finally:
        port.close()
        await released(port)
        peer.close()


async def test_output_pending_and_drain_bound_count_the_driver_queue(
    port_peer: tuple[SerialPort, PtyPeer], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _peer = port_peer
    assert port.output_pending() == 0  # TIOCOUTQ on a pty answers (0: a pty has no wire)
    without_driver = port._drain_timeout_s()
    monkeypatch.setattr(serial_mod, "_tiocoutq", lambda fd: 4000)  # a UART with 4000 bytes to send
    assert port.output_pending() == 4000
    bound = port._drain_timeout_s()
    assert bound >= 2 * 4000 * char_time_s(2400, 11)
    assert bound > without_driver

    def refuse(fd: int) -> int:
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(serial_mod, "_tiocoutq", refuse)
    assert port.output_pending() == 0
    port.close()
    assert port.output_pending() == 0


async def test_receiver_gets_buffered_bytes_first_then_live_chunks(
    port_peer: tuple[SerialPort, PtyPeer],
) -> None:
    port, peer = port_peer
    got: list[bytes] = []
    peer.send(b"first")
    await wait_until(lambda: port.in_waiting == 5, 5)
    port.set_receiver(got.append)
    assert got == [b"first"] and port.in_waiting == 0  # handed over inside the call
    peer.send(b"second")
    await wait_until(lambda: b"".join(got) == b"firstsecond", 5)
    assert port.in_waiting == 0
    port.set_receiver(None)  # back to buffering for read()
    peer.send(b"third")
    assert await port.read(16, timeout_s=5) == b"third"
    assert b"".join(got) == b"firstsecond"
    assert port.counters.bytes_rx == len(b"firstsecondthird")


async def test_receiver_gets_an_empty_chunk_once_when_the_port_closes(
    port_peer: tuple[SerialPort, PtyPeer],
) -> None:
    port, _peer = port_peer
    got: list[bytes] = []
    port.set_receiver(got.append)
    transport = port._transport
    assert transport is not None
    port.close()
    assert got == [b""]
    # The transport's own connection_lost comes a loop turn later (it drops its tty when done):
    # no second b"" from it.
    await wait_until(lambda: transport.serial is None, 5, step_s=0.001)
    assert got == [b""]


async def test_receiver_hears_a_vanished_device(port_peer: tuple[SerialPort, PtyPeer]) -> None:
    port, peer = port_peer
    got: list[bytes] = []
    port.set_receiver(got.append)
    peer.send(b"bye")
    await wait_until(lambda: got == [b"bye"], 5)
    peer.hang_up()
    await wait_until(lambda: not port.is_open, 5)
    assert got == [b"bye", b""]
    assert port.failure is not None  # reported as before: the line service reopens


async def test_receiver_set_on_a_closed_port_gets_the_rest_then_the_end(
    port_peer: tuple[SerialPort, PtyPeer],
) -> None:
    port, peer = port_peer
    peer.send(b"left")
    await wait_until(lambda: port.in_waiting == 4, 5)
    port.close()
    got: list[bytes] = []
    port.set_receiver(got.append)
    assert got == [b"left", b""]


async def test_write_direct_is_write_in_every_case_it_does_not_shortcut(
    port_peer: tuple[SerialPort, PtyPeer],
) -> None:
    """The lease holder's hot-path write: same order, same counts, same errors as write()."""
    port, peer = port_peer
    assert port.write_direct(b"abc") == 0 and peer.drain() == b"abc"
    chunks = [bytes([i]) * 4096 for i in range(64)]  # far more than a pty holds: the rest is queued
    left = [port.write_direct(chunk) for chunk in chunks]
    assert left[-1] > 0
    assert port.write_direct(b"tail") == left[-1] + 4  # behind the queue, never ahead of it
    await wait_until(lambda: len(peer.drain()) >= 3 + 64 * 4096 + 4, 20, step_s=0.005)
    assert peer.drain() == b"abc" + b"".join(chunks) + b"tail"
    assert port.counters.bytes_tx == 3 + 64 * 4096 + 4
    port.close()
    with pytest.raises(TransportError):
        port.write_direct(b"late")


async def test_write_direct_feeds_the_echo_filter() -> None:
    peer = PtyPeer()
    port = SerialPort(peer.path, 9600, "8N1", echo_filter=True)
    await port.open()
    try:
        assert port.write_direct(b"ping") == 0
        assert bytes(port._echo) == b"ping"  # the echo the converter will send back is expected
    finally:
        port.close()
        await released(port)
        peer.close()
