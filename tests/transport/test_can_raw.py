"""The loop reader's receive path without python-can's per-frame work: raw SocketCAN frames, one drain.

This machine has no AF_CAN (no vcan module), so the raw SocketCAN read is fed here through an AF_UNIX
datagram socket pair carrying the same 16-byte ``struct can_frame`` datagrams a SocketCAN raw socket
delivers (linux/can.h); what only a real AF_CAN socket can show (the kernel's receive filter, the frame
layout as the kernel writes it) is untested here, see docs/drives.md. The python-can read of the other
loop-read interface (udp_multicast) runs for real in tests/transport/test_can_loop_read.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from typing import Any

import can
import pytest

from dcud.transport.can import (
    CAN_EFF_FLAG,
    CAN_ERR_CRTL,
    CAN_ERR_FLAG,
    CAN_RTR_FLAG,
    CanBusState,
    CanPort,
    CanSettings,
    _GuardedBus,
    receive_filters,
)

from helpers.meters import wait_until


def can_frame(can_id: int, data: bytes) -> bytes:
    """A ``struct can_frame`` as the kernel delivers it."""
    return struct.pack("=IB3x8s", can_id, len(data), data)


class _FakeBus:
    """What the guard needs of a bus when it reads the socket itself."""

    channel_info = "fake"
    _filters = None


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _port(received: list[tuple[int, bytes, float]], states: list[CanBusState]) -> CanPort:
    return CanPort(
        CanSettings("can0", "socketcan", "can0"),
        lambda can_id, data, now: received.append((can_id, data, now)),
        lambda state, _error: states.append(state),
    )


async def test_raw_frames_are_read_in_one_drain(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    received: list[tuple[int, bytes, float]] = []
    states: list[CanBusState] = []
    port = _port(received, states)
    guard = _GuardedBus(_FakeBus(), port, asyncio.get_running_loop(), False, raw_socket=reader)  # type: ignore[arg-type]
    for datagram in (
        can_frame(0x181, bytes.fromhex("3702e8030000")),  # TPDO1: statusword + position
        can_frame(0x701, b"\x05"),  # heartbeat
        can_frame(0x12345 | CAN_EFF_FLAG, b"\x01"),  # 29-bit: not CANopen here
        can_frame(0x601 | CAN_RTR_FLAG, b""),  # remote frame
        can_frame(CAN_ERR_FLAG | CAN_ERR_CRTL, bytes([0, 0x10, 0, 0, 0, 0, 0, 0])),  # error passive
        bytes(72),  # a CAN FD frame
        can_frame(0x581, bytes.fromhex("4300100092010200")),  # 8 data bytes
    ):
        writer.send(datagram)
    guard.drain()
    assert [(i, d) for i, d, _ in received] == [
        (0x181, bytes.fromhex("3702e8030000")),
        (0x701, b"\x05"),
        (0x581, bytes.fromhex("4300100092010200")),
    ]
    assert len({now for _, _, now in received}) == 1  # one clock reading per wake-up
    assert port.stats.rx_frames == 3 and port.stats.ignored == 3 and port.stats.error_frames == 1
    assert states == [CanBusState.ERROR_PASSIVE]
    guard.drain()  # nothing waiting: returns at once
    assert len(received) == 3 and not guard.dead


async def test_raw_read_failure_is_fatal(pair: tuple[socket.socket, socket.socket]) -> None:
    _writer, reader = pair
    port = _port([], [])
    failed: list[BaseException] = []
    port._on_fatal = failed.append  # type: ignore[method-assign]
    guard = _GuardedBus(_FakeBus(), port, asyncio.get_running_loop(), False, raw_socket=reader)  # type: ignore[arg-type]
    reader.close()  # the interface went away under the reader
    guard.drain()
    assert guard.dead
    await wait_until(lambda: bool(failed), 5)  # the report goes through the loop (call_soon_threadsafe)
    assert len(failed) == 1 and isinstance(failed[0], OSError)


class _QueueBus:
    """A python-can bus whose ``_recv_internal`` hands out a script of frames and failures."""

    channel_info = "queue"

    def __init__(self, script: list[Any], filters: list[dict[str, int]] | None = None) -> None:
        self.script = script
        self._filters = filters

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if not self.script:
            return None, False
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item, False

    def _matches_filters(self, msg: can.Message) -> bool:
        return msg.arbitration_id != 0x18A


async def test_python_can_drain_filters_and_rides_over_garbage() -> None:
    received: list[tuple[int, bytes, float]] = []
    port = _port(received, [])
    malformed: list[BaseException] = []
    port._on_malformed = malformed.append  # type: ignore[method-assign]

    def msg(can_id: int, data: bytes) -> can.Message:
        return can.Message(arbitration_id=can_id, data=data, is_extended_id=False)

    bus = _QueueBus(
        [msg(0x181, b"\x01"), msg(0x18A, b"\x02"), can.CanOperationError("bad frame"), msg(0x701, b"\x05")],
        filters=[{"can_id": 0x181, "can_mask": 0x7FF}],
    )
    guard = _GuardedBus(bus, port, asyncio.get_running_loop(), False)  # type: ignore[arg-type]
    assert guard.raw_socket is None  # not a SocketCAN socket: python-can reads it
    guard.drain()  # 0x181 delivered, 0x18A filtered, then garbage ends this drain
    await wait_until(lambda: bool(malformed), 5)
    assert [i for i, _, _ in received] == [0x181] and len(malformed) == 1
    guard.drain()  # the next readiness reads on
    assert [i for i, _, _ in received] == [0x181, 0x701] and not guard.dead


def test_receive_filters_keep_every_heartbeat_and_emcy() -> None:
    filters = receive_filters({0x701, 0x081, 0x581, 0x181, 0x281})
    assert filters == [
        {"can_id": 0x700, "can_mask": 0x780, "extended": False},
        {"can_id": 0x080, "can_mask": 0x780, "extended": False},
        {"can_id": 0x181, "can_mask": 0x7FF, "extended": False},
        {"can_id": 0x281, "can_mask": 0x7FF, "extended": False},
        {"can_id": 0x581, "can_mask": 0x7FF, "extended": False},
    ]


async def test_receive_ids_leave_other_interfaces_unfiltered() -> None:
    """Only SocketCAN filters in the kernel; python-can would filter the virtual bus per frame (costly)."""
    port = CanPort(CanSettings("v", "virtual", "raw-filter-test"), lambda *_: None)
    stop = asyncio.Event()
    task = asyncio.create_task(port.run(stop))
    try:
        await wait_until(lambda: port.is_open, 10)
        assert port._bus is not None
        port.set_receive_ids({0x181, 0x701})
        assert port._bus._filters is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
