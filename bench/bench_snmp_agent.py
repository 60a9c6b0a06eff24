"""The read-only SNMP agent under a manager's walk: time, requests and memory with many meters.

Runs the agent (dcud.service.snmp_agent.Agent) in this process over an event bus holding ``--meters``
meter state documents (plus a few lines, a drive, push targets and ports), then, with Net-SNMP as the
manager in its own process: snmpbulkwalk v2c (-Cr25) and snmpwalk v2c of the meter table, and
snmpbulkwalk v3 SHA + AES-128 (-Cr25). Then ``--flood`` GETNEXT datagrams from a raw socket, after
which the process's peak RSS (VmHWM) is compared with the RSS before it. The agent reads the states
at request time (no copy), so each request re-sorts the rows of the table it touches: this
measures what that costs.

Prints one JSON line. Usage: python bench/bench_snmp_agent.py [--meters 1000] [--flood 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dcud.runtime.bus import EventBus  # noqa: E402
from dcud.service import snmp_mib  # noqa: E402
from dcud.service.snmp import engine_clock  # noqa: E402
from dcud.service.snmp_agent import Agent, AgentServiceConfig  # noqa: E402
from dcud.sim.peers import free_port  # noqa: E402

COMMUNITY = "bench-read"
AUTH_KEY = "auth-pass-123"
PRIV_KEY = "priv-pass-456"
V3 = ("-v3", "-u", "dcud", "-l", "authPriv", "-a", "SHA", "-A", AUTH_KEY, "-x", "AES", "-X", PRIV_KEY)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def fill(bus: EventBus, meters: int) -> None:
    for index in range(meters):
        name = f"meter-{index:04d}"
        bus.set_state(
            f"meter/{name}",
            {
                "meter": name,
                "line": f"rs485-{index % 4}",
                "protocol": "mbus",
                "quality": "ok",
                "status": "ok",
                "last_success": "2026-12-07T20:00:00Z",
                "last_error": None,
                "consecutive_failures": 0,
                "counters": {"reads": 100, "ok": 100, "failed": 0},
            },
        )
    for index in range(4):
        line = {"state": "open", "device": f"/dev/ttyS{index}", "kind": "rs485"}
        bus.set_state(f"line/rs485-{index}", line)
    bus.set_state("drive/axis-1", {"protocol": "canopen", "online": True, "nmt": "operational"})
    bus.set_state("push/ftp", {"target": "ftp://hes/in", "backlog": 0})
    bus.set_state("bridge/tm", {"tcp_port": 9000, "state": "listening"})


def run_tool(*args: str) -> tuple[float, int]:
    started = time.perf_counter()
    out = subprocess.run([*args], capture_output=True, text=True, timeout=600, check=True).stdout
    return time.perf_counter() - started, len(out.splitlines())


def getnext(community: str, port: int, count: int) -> float:
    # A fixed GETNEXT of the meter table's first column (BER built by hand, request-id 1).
    oid = bytes([0x2B, 6, 1, 4, 1, 0x81, 0xFD, 0x59, 5, 1, 2])  # 1.3.6.1.4.1.32473.5.1.2
    varbind = b"\x30" + bytes([len(oid) + 4]) + b"\x06" + bytes([len(oid)]) + oid + b"\x05\x00"
    varbinds = b"\x30" + bytes([len(varbind)]) + varbind
    pdu_body = b"\x02\x01\x01\x02\x01\x00\x02\x01\x00" + varbinds
    pdu = b"\xa1" + bytes([len(pdu_body)]) + pdu_body
    body = b"\x02\x01\x01\x04" + bytes([len(community)]) + community.encode() + pdu
    message = b"\x30" + bytes([len(body)]) + body
    started = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for _ in range(count):
            sock.sendto(message, ("127.0.0.1", port))
            sock.recv(65535)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--flood", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port(socket.SOCK_DGRAM)
        cfg = AgentServiceConfig(
            device_id="bench",
            host="127.0.0.1",
            port=port,
            community=COMMUNITY,
            user="dcud",
            auth="SHA",
            auth_key=AUTH_KEY,
            priv="AES",
            priv_key=PRIV_KEY,
            engine_id=snmp_mib.default_engine_id("bench"),
            enterprise_oid=snmp_mib.PLACEHOLDER_ENTERPRISE_OID,
            state_dir=Path(tmp),
            max_requests_per_s=10000,
        )
        bus = EventBus()
        fill(bus, args.meters)
        status: dict[str, Any] = {"device_id": "bench", "version": "bench", "uptime_s": 1.0, "outbox": {}}
        agent = Agent(cfg, bus, lambda: status, engine_clock(Path(tmp)))
        await agent.open()
        target = f"127.0.0.1:{port}"
        base = ("-t", "5", "-r", "1", "-On", target, ".1.3.6.1.4.1.32473")
        result: dict[str, Any] = {"bench": "snmp_agent", "meters": args.meters}
        for name, command in (
            ("bulkwalk_v2c_r25", ["snmpbulkwalk", "-v2c", "-c", COMMUNITY, "-Cr25", *base]),
            ("walk_v2c", ["snmpwalk", "-v2c", "-c", COMMUNITY, *base]),
            ("bulkwalk_v3_sha_aes_r25", ["snmpbulkwalk", *V3, "-Cr25", *base]),
        ):
            before = agent.counters.datagrams
            seconds, cells = await asyncio.to_thread(run_tool, *command)
            requests = agent.counters.datagrams - before
            result[name] = {
                "s": round(seconds, 2),
                "cells": cells,
                "requests": requests,
                "ms_per_request": round(1000 * seconds / max(1, requests), 2),
            }
        rss_before = rss_kib("VmRSS")
        seconds = await asyncio.to_thread(getnext, COMMUNITY, port, args.flood)
        result["flood_getnext"] = {
            "requests": args.flood,
            "per_s": round(args.flood / seconds),
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_kib("VmRSS"),
            "peak_kib": rss_kib("VmHWM"),
        }
        result["errors"] = agent.counters.errors
        agent.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
