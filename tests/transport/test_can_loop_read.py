"""The event loop's own CAN reader (socketcan on the DCU), exercised with python-can's udp_multicast.

socketcan needs the vcan module, which this machine lacks; udp_multicast is the other interface the loop
reads itself (one datagram per frame, ``add_reader``), so it runs the same path: ``_DrainingNotifier``
draining every waiting frame per wake-up through ``_GuardedBus.read_waiting``. Multicast never leaves a
network namespace that the test creates (``unshare --map-root-user --net``: any user may).
"""

from __future__ import annotations

import json

import pytest

from helpers.netns import run_in_own_netns

GROUP = "239.74.163.3"

SCRIPT = f"""
import asyncio, json, socket
import can
from dcud.transport.can import CanPort, CanSettings

def frame(i):
    return can.Message(arbitration_id=0x180 + i % 8, data=i.to_bytes(2, "big"), is_extended_id=False)

async def main():
    got = []
    settings = CanSettings("c", "udp_multicast", "{GROUP}")
    port = CanPort(settings, lambda cid, data, now: got.append((cid, data.hex())))
    stopping = asyncio.Event()
    runner = asyncio.ensure_future(port.run(stopping))
    for _ in range(500):
        if port.is_open:
            break
        await asyncio.sleep(0.01)
    peer = can.Bus(interface="udp_multicast", channel="{GROUP}", receive_own_messages=False)
    garbage = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    garbage.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    try:
        for i in range(50):  # a burst: many frames wait per wake-up
            peer.send(frame(i))
        garbage.sendto(b"\\xc1 not msgpack", ("{GROUP}", 43113))
        peer.send(can.Message(arbitration_id=0x1ABCDEF, data=b"x", is_extended_id=True))
        # Then one frame per wake-up: each is sent once the one before it arrived. The last (60) is
        # the marker: frames arrive in order, so once it is in, anything stray would be before it.
        for i in range(50, 61):
            peer.send(frame(i))
            for _ in range(500):
                if len(got) > i:
                    break
                await asyncio.sleep(0.01)
        print(json.dumps({{"got": got, "stats": port.stats.to_json(), "state": str(port.state)}}))
    finally:
        peer.shutdown()
        garbage.close()
        stopping.set()
        await asyncio.wait_for(runner, 10)

asyncio.run(main())
"""


@pytest.mark.netns(user_ns=True)
def test_loop_reader_drains_in_order_and_rides_over_garbage() -> None:
    import msgpack  # noqa: F401  (python-can's udp_multicast needs it: a test dependency, never skipped)

    setup = ["{ip} link set lo up", "{ip} route add 224.0.0.0/4 dev lo"]
    done = run_in_own_netns(SCRIPT, setup, 120, user_ns=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    result = json.loads(lines[-1])
    expected = [[0x180 + i % 8, i.to_bytes(2, "big").hex()] for i in range(61)]
    assert result["got"] == expected  # every standard frame, in order, nothing else
    stats = result["stats"]
    assert stats["malformed"] == 1  # the garbage datagram was counted and skipped...
    assert stats["ignored"] == 1  # ...the extended frame was not for us...
    assert stats["rx_frames"] == 61
    assert result["state"] == "active"  # ...and the bus stayed open
