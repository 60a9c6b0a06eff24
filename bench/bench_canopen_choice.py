"""The measurement behind "own sans-I/O CANopen codec, not the canopen library, inside dcud".

Both candidates do the same two jobs in one process, on python-can's in-process ``virtual`` bus:

1. TPDO reception: a TPDO (statusword + position) decoded into the drive's state, N times.
   - ``canopen``: a RemoteNode with the drive's object dictionary, TPDO maps configured locally,
     frames dispatched by ``Network.notify`` (what its notifier thread runs) to a PDO callback that
     reads the values and hands them to the event loop (``call_soon_threadsafe``: the asyncio boundary
     every frame must cross, since the library runs in threads);
   - ``own``: dcud's ``CanDriveService._on_frame`` -> ``CanopenDrive.on_tpdo`` (decode with a
     precompiled struct, state update, throttled publish), already in the loop.
2. SDO reads of 6041 from a canopen LocalNode (the simulator) on the virtual bus, M times:
   - ``canopen``: ``node.sdo.upload`` in a worker thread (it blocks), awaited from the loop;
   - ``own``: ``CanopenDrive.sdo_upload`` (sans-I/O client, asyncio future, CanPort sender thread).

Prints one JSON line: CPU microseconds per TPDO and per SDO read, SDO latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import struct
import time
from typing import Any

import canopen

from dcud.codec.heartbeat import HeartbeatWatch
from dcud.config.model import CanConfig, DriveConfig
from dcud.runtime.bus import EventBus
from dcud.service.drive_canopen import CanopenDrive
from dcud.service.drive_commands import DriveRegistry
from dcud.service.drives import CanDrivesConfig, CanDriveService
from dcud.sim.drive_can import build_object_dictionary
from dcud.transport.can import CanSettings

TPDOS = int(os.environ.get("BENCH_TPDOS", "200000"))
SDOS = int(os.environ.get("BENCH_SDOS", "2000"))


def cpu_us_per(fn: Any, n: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) / n * 1e6


async def tpdo_canopen(loop: asyncio.AbstractEventLoop) -> float:
    network: Any = canopen.Network()
    node: Any = canopen.RemoteNode(1, build_object_dictionary(1))
    network.add_node(node)
    node.tpdo.read(from_od=True)
    pdo = node.tpdo[1]
    pdo.subscribe()
    state: dict[str, int] = {}

    def apply(statusword: int, position: int) -> None:
        state["statusword"] = statusword
        state["position"] = position

    def callback(mapped: Any) -> None:
        loop.call_soon_threadsafe(apply, mapped[0].raw, mapped[1].raw)

    pdo.add_callback(callback)
    frames = [struct.pack("<Hi", 0x0237, i) for i in range(1000)]

    def run() -> None:
        for i in range(TPDOS):
            network.notify(0x181, frames[i % 1000], 0.0)

    start = time.process_time()
    run()
    # Let the loop run the handed-over callbacks, counted too.
    await asyncio.sleep(0)
    for _ in range(100):
        if state.get("position") == (TPDOS - 1) % 1000:
            break
        await asyncio.sleep(0.01)
    return (time.process_time() - start) / TPDOS * 1e6


async def tpdo_own() -> float:
    config = CanDrivesConfig(
        CanConfig(name="bench", interface="virtual", channel="bench-tpdo"),
        (DriveConfig(name="axis-1", bus="bench", protocol="canopen", node_id=1, state_interval_s=1.0),),
    )

    async def event(*_args: Any, **_kw: Any) -> None:
        return None

    async def history(*_args: Any) -> None:
        return None

    service = CanDriveService(config, EventBus(), event, history, DriveRegistry())
    from dcud.transport.can import CanPort

    port = CanPort(CanSettings("bench", "virtual", "bench-tpdo"), service._on_frame)
    drive = CanopenDrive(
        config.drives[0],
        port=port,
        bus=EventBus(),
        events=asyncio.Queue(10),
        counters={},
        route=service.route,
        heartbeats=service.heartbeats,
    )
    service.drives["axis-1"] = drive
    from dcud.codec import canopen as co

    tpdo = drive._make_tpdo(1, 0x181, [co.MappedObject(0x6041, 0, 16), co.MappedObject(0x6064, 0, 32)])
    service.route(0x181, lambda data, now: drive.on_tpdo(tpdo, data, now))
    frames = [struct.pack("<Hi", 0x0237, i) for i in range(1000)]
    on_frame = service._on_frame

    def run() -> None:
        now = time.monotonic()
        for i in range(TPDOS):
            on_frame(0x181, frames[i % 1000], now)

    return cpu_us_per(run, TPDOS)


async def sdo_canopen(channel: str) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    network: Any = canopen.Network()
    network.connect(interface="virtual", channel=channel)
    node: Any = network.add_node(1, build_object_dictionary(1))
    latencies = []
    start_cpu = time.process_time()
    try:
        for _ in range(SDOS):
            t = time.perf_counter()
            await loop.run_in_executor(None, node.sdo.upload, 0x6041, 0)
            latencies.append(time.perf_counter() - t)
    finally:
        network.disconnect()
    return (time.process_time() - start_cpu) / SDOS * 1e6, statistics.median(latencies) * 1e3


async def sdo_own(channel: str) -> tuple[float, float]:
    from dcud.transport.can import CanPort

    drive_holder: dict[str, CanopenDrive] = {}

    def on_frame(can_id: int, data: bytes, now: float) -> None:
        if can_id == 0x581:
            drive_holder["d"].on_sdo(data, now)

    # batch_s=0: hand every frame over at once, as the canopen library's callbacks are; the 5 ms
    # batching of thread-read interfaces is a CPU/latency policy, not part of the protocol cost.
    port = CanPort(CanSettings("bench", "virtual", channel, batch_s=0.0), on_frame)
    drive = CanopenDrive(
        DriveConfig(name="axis-1", bus="bench", protocol="canopen", node_id=1),
        port=port,
        bus=EventBus(),
        events=asyncio.Queue(10),
        counters={},
        route=lambda *_: None,
        heartbeats=HeartbeatWatch(),
    )
    drive_holder["d"] = drive
    stop = asyncio.Event()
    task = asyncio.create_task(port.run(stop))
    for _ in range(100):
        if port.is_open:
            break
        await asyncio.sleep(0.01)
    latencies = []
    start_cpu = time.process_time()
    try:
        for _ in range(SDOS):
            t = time.perf_counter()
            await drive.sdo_upload(0x6041, 0)
            latencies.append(time.perf_counter() - t)
    finally:
        cpu = (time.process_time() - start_cpu) / SDOS * 1e6
        stop.set()
        await task
    return cpu, statistics.median(latencies) * 1e3


def local_server(channel: str) -> Any:
    network: Any = canopen.Network()
    network.connect(interface="virtual", channel=channel)
    node: Any = canopen.LocalNode(1, build_object_dictionary(1))
    network.add_node(node)
    return network


async def main() -> None:
    loop = asyncio.get_running_loop()
    lib_tpdo = await tpdo_canopen(loop)
    own_tpdo = await tpdo_own()
    server = local_server("bench-sdo-a")
    try:
        lib_sdo_cpu, lib_sdo_ms = await sdo_canopen("bench-sdo-a")
    finally:
        server.disconnect()
    server = local_server("bench-sdo-b")
    try:
        own_sdo_cpu, own_sdo_ms = await sdo_own("bench-sdo-b")
    finally:
        server.disconnect()
    # Server CPU is in the same process for both: the SDO CPU figures include it equally.
    print(
        json.dumps(
            {
                "bench": "canopen_choice",
                "tpdos": TPDOS,
                "sdos": SDOS,
                "tpdo_cpu_us": {"canopen_lib": round(lib_tpdo, 2), "own_codec": round(own_tpdo, 2)},
                "tpdo_speedup": round(lib_tpdo / own_tpdo, 1),
                "sdo_cpu_us_incl_server": {
                    "canopen_lib": round(lib_sdo_cpu, 1),
                    "own_codec": round(own_sdo_cpu, 1),
                },
                "sdo_median_ms": {"canopen_lib": round(lib_sdo_ms, 3), "own_codec": round(own_sdo_ms, 3)},
            }
        )
    )


if __name__ == "__main__":
    from dcud.log import setup_logging

    setup_logging("error")
    asyncio.run(main())
