"""The read-only SNMP agent: the MIB and the code agree (snmptranslate, smilint), GET/GETNEXT/GETBULK
semantics of the view, and the agent in this process against Net-SNMP's snmpget, snmpwalk and
snmpbulkwalk (v2c and v3), refusals counted, bounded responses, hostile datagrams.
(The agent inside the running daemon, compared with MQTT, is tests/system/test_snmp_e2e.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.runtime.bus import EventBus
from dcud.service import snmp_mib
from dcud.service.snmp import engine_clock
from dcud.service.snmp_agent import (
    MAX_VARBINDS,
    NO_SUCH_INSTANCE,
    NO_SUCH_OBJECT,
    Agent,
    AgentServiceConfig,
    Snapshot,
    build_view,
    view_get,
    view_next,
)
from dcud.sim.peers import find_program, free_port

from helpers import REPO
from helpers.alarm import AUTH_KEY, MIB_PATH, PRIV_KEY, USER, net_snmp
from helpers.snmp import COMMUNITY, bulk_request, hostile_datagrams

ENT = snmp_mib.PLACEHOLDER_ENTERPRISE_OID
ENT_T = snmp_mib.oid_tuple(ENT)

STATUS: dict[str, Any] = {
    "state": "online",
    "device_id": "dcu-test",
    "version": "9.9.9",
    "uptime_s": 12.34,
    "clock": {"synced": True, "offset_s": -0.0123, "server": "127.0.0.1:123"},
    "power": {"state": "ok", "since": "2026-12-07T19:00:00Z"},
    "outbox": {
        "depth": 3,
        "bytes": 4096,
        "max_bytes": 65536,
        "oldest_age_s": 4.6,
        "high_water": False,
        "dropped": {"overflow": 2, "age": 1},
    },
}
STATES: dict[str, dict[str, Any]] = {
    "line/rs485-1": {
        "line": "rs485-1",
        "device": "/dev/ttyS1",
        "kind": "rs485",
        "state": "open",
        "since": "2026-12-07T19:00:01Z",
        "lease": {"owner": "poll"},
        "bytes_rx": 2**40,
        "bytes_tx": 77,
        "errors": 0,
        "last_error": None,
    },
    "line/rs485-1/scan": {"line": "rs485-1", "state": "running"},
    "line/mbus": {
        "line": "mbus",
        "device": "/dev/ttyUSB0",
        "kind": "mbus",
        "state": "failed",
        "lease": None,
        "bytes_rx": 0,
        "bytes_tx": 0,
        "errors": 5,
        "last_error": "device gone",
    },
    "meter/flat-12": {
        "meter": "flat-12",
        "line": "rs485-1",
        "protocol": "iec62056-21",
        "quality": "ok",
        "status": "ok",
        "last_success": "2026-12-07T19:59:00Z",
        "last_error": None,
        "consecutive_failures": 0,
        "counters": {"reads": 10, "ok": 9, "failed": 1},
    },
    "meter/heat-1": {
        "meter": "heat-1",
        "line": "mbus",
        "protocol": "mbus",
        "quality": "failing",
        "status": "failed",
        "last_success": None,
        "last_error": {"ts": "x", "type": "PeerTimeout", "message": "no answer to 10 5B FE"},
        "consecutive_failures": 4,
        "counters": {"reads": 4, "ok": 0, "failed": 4},
    },
    "drive/axis-1": {
        "drive": "axis-1",
        "protocol": "canopen",
        "online": True,
        "nmt": "operational",
        "cia402": "fault",
        "error_code": 0x3210,
        "error_text": "DC link over-voltage",
        "heartbeat": "ok",
        "last_error": None,
    },
    "push/ftp": {
        "target": "ftp://hes@10.0.0.5/in",
        "phase": "resting",
        "backlog": 0,
        "pushed_items": 42,
        "last_success": "2026-12-07T19:58:00Z",
        "last_error": None,
    },
    "push/event": {
        "target": "127.0.0.1:9999",
        "backlog": 1,
        "counters": {"sent": 5},
        "last_error": {"ts": "x", "message": "no route"},
    },
    "bridge/tm": {
        "port": "tm",
        "tcp_port": 9000,
        "line": "rs485-1",
        "state": "listening",
        "tls": True,
        "tls_error": None,
        "session": {"peer": "10.1.2.3:40000"},
        "sessions": 7,
    },
    "bridge/ei": {
        "port": "ei",
        "server": "hes.example:4059",
        "line": "rs485-1",
        "state": "backoff",
        "tls": False,
        "connects": 2,
        "last_error": "refused",
    },
    "uplink": {"reachable": False, "host": "8.8.8.8"},
    "clock": {"synced": True},
}


def snapshot(states: Mapping[str, Mapping[str, Any]] | None = None) -> Snapshot:
    engine = {"id": b"\x80\x00\x7e\xd9\x05abc", "boots": 3, "time": 10, "max_message_size": 1472}
    return Snapshot(lambda: STATUS, STATES if states is None else states, lambda _name: 0, engine)


def name_oid(name: str) -> tuple[int, ...]:
    data = name.encode()
    return (len(data), *data)


# -- the MIB and the code agree ------------------------------------------------------------------


def snmptranslate(*args: str) -> str:
    result = subprocess.run(
        [find_program("snmptranslate", "snmp"), "-M", MIB_PATH, "-m", "DCUD-MIB:SNMPv2-MIB", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


MIB_SYNTAX = {
    "DisplayString": "-- TEXTUAL CONVENTION DisplayString",
    "Integer32": "SYNTAX\tINTEGER",
    "Gauge32": "SYNTAX\tGauge32",
    "Counter32": "SYNTAX\tCounter32",
    "Counter64": "SYNTAX\tCounter64",
    "TimeTicks": "SYNTAX\tTimeTicks",
}


def test_every_agent_object_has_its_name_oid_syntax_and_access_in_the_mib() -> None:
    served: set[str] = set()
    objects = [((*ENT_T, snmp_mib.DEVICE_ARC, o.arc), o) for o in snmp_mib.DEVICE_OBJECTS]
    for table in snmp_mib.TABLES:
        assert snmptranslate("-On", f"DCUD-MIB::{table.name}").strip() == "." + ".".join(
            map(str, (*ENT_T, table.arc))
        )
        entry = snmptranslate("-Td", f"DCUD-MIB::{table.name.removesuffix('Table')}Entry")
        assert f"INDEX\t\t{{ {table.index_name} }}" in entry
        objects += [((*ENT_T, table.arc, 1, c.arc), c) for c in table.columns]
    for oid, obj in objects:
        assert snmptranslate("-On", f"DCUD-MIB::{obj.name}").strip() == "." + ".".join(map(str, oid)), obj
        detail = snmptranslate("-Td", f"DCUD-MIB::{obj.name}")
        assert "MAX-ACCESS\tread-only" in detail, obj.name
        if obj.syntax == "Integer32":
            assert "SYNTAX\tINTEGER" in detail or "SYNTAX\tInteger32" in detail, detail
        else:
            assert MIB_SYNTAX[obj.syntax] in detail, detail
        served.add(obj.name)
    # ... and the other way round: every read-only object of the MIB is served.
    mib_text = (REPO / "mibs" / "DCUD-MIB.txt").read_text()
    read_only = set(
        re.findall(r"^(\w+) OBJECT-TYPE\n(?:.*\n){1,3}?\s+MAX-ACCESS\s+read-only", mib_text, re.M)
    )
    assert read_only == served


def test_mib_passes_smilint() -> None:
    """libsmi's strictest check, with stand-ins of the IETF base modules (tests/mibs/smi)."""
    smilint = find_program("smilint", "smitools")
    result = subprocess.run(
        [smilint, "-l", "9", "-s", str(REPO / "mibs" / "DCUD-MIB.txt")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SMIPATH": str(REPO / "tests" / "mibs" / "smi")},
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_smilint_is_not_blind_with_the_stand_ins(tmp_path: Path) -> None:
    """The same check fails on a broken copy of the MIB (a column missing from its group)."""
    broken = (REPO / "mibs" / "DCUD-MIB.txt").read_text().replace("dcudPortLastError }", "dcudPortSessions }")
    (tmp_path / "DCUD-MIB.txt").write_text(broken)
    result = subprocess.run(
        [find_program("smilint", "smitools"), "-l", "9", "-s", str(tmp_path / "DCUD-MIB.txt")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SMIPATH": str(REPO / "tests" / "mibs" / "smi")},
    )
    assert "dcudPortLastError" in result.stdout + result.stderr


# -- the view ------------------------------------------------------------------------------------

VIEW = build_view(ENT)


def test_get_reads_the_status_document_and_the_retained_states() -> None:
    snap = snapshot()
    dev = (*ENT_T, 3)
    assert view_get(VIEW, (*dev, 1, 0), snap) == ("DisplayString", "dcu-test")
    assert view_get(VIEW, (*dev, 3, 0), snap) == ("TimeTicks", 1234)
    assert view_get(VIEW, (*dev, 4, 0), snap) == ("Integer32", 1)  # power ok
    assert view_get(VIEW, (*dev, 6, 0), snap) == ("Integer32", 1)  # synced
    assert view_get(VIEW, (*dev, 7, 0), snap) == ("Integer32", -12)  # ms
    assert view_get(VIEW, (*dev, 12, 0), snap) == ("Gauge32", 5)
    assert view_get(VIEW, (*dev, 13, 0), snap) == ("Counter32", 3)
    assert view_get(VIEW, (*dev, 14, 0), snap) == ("Integer32", snmp_mib.FALSE)
    assert view_get(VIEW, (*dev, 15, 0), snap) == ("Integer32", 2)  # uplink unreachable
    meter = (*ENT_T, 5, 1)
    assert view_get(VIEW, (*meter, 4, *name_oid("heat-1")), snap) == ("DisplayString", "failing")
    assert view_get(VIEW, (*meter, 7, *name_oid("heat-1")), snap) == (
        "DisplayString",
        "PeerTimeout: no answer to 10 5B FE",
    )
    assert view_get(VIEW, (*meter, 6, *name_oid("heat-1")), snap) == ("DisplayString", "")
    assert view_get(VIEW, (*(*ENT_T, 4, 1), 6, *name_oid("rs485-1")), snap) == ("Counter64", 2**40)
    assert view_get(VIEW, (*(*ENT_T, 6, 1), 6, *name_oid("axis-1")), snap) == ("Integer32", 0x3210)
    assert view_get(VIEW, (*(*ENT_T, 7, 1), 7, *name_oid("event")), snap) == ("Counter32", 5)
    assert view_get(VIEW, (*(*ENT_T, 7, 1), 6, *name_oid("event")), snap) == ("DisplayString", "no route")
    assert view_get(VIEW, (*(*ENT_T, 8, 1), 6, *name_oid("tm")), snap) == ("DisplayString", "10.1.2.3:40000")
    assert view_get(VIEW, (*(*ENT_T, 8, 1), 6, *name_oid("ei")), snap) == (
        "DisplayString",
        "hes.example:4059",
    )
    assert view_get(VIEW, (*(*ENT_T, 8, 1), 7, *name_oid("ei")), snap) == ("Counter32", 2)
    assert view_get(VIEW, (1, 3, 6, 1, 2, 1, 1, 5, 0), snap) == ("DisplayString", "dcu-test")


def test_get_tells_missing_objects_from_missing_instances() -> None:
    snap = snapshot()
    dev = (*ENT_T, 3)
    assert view_get(VIEW, (*dev, 1, 1), snap) == NO_SUCH_INSTANCE
    assert view_get(VIEW, (*dev, 1), snap) == NO_SUCH_INSTANCE
    assert view_get(VIEW, (*dev, 99, 0), snap) == NO_SUCH_OBJECT
    assert view_get(VIEW, (*ENT_T, 5, 1, 4, *name_oid("nope")), snap) == NO_SUCH_INSTANCE
    assert view_get(VIEW, (*ENT_T, 5, 1, 1, *name_oid("flat-12")), snap) == NO_SUCH_OBJECT  # the index
    assert view_get(VIEW, (*ENT_T, 5, 2), snap) == NO_SUCH_OBJECT
    assert view_get(VIEW, (*ENT_T, 0, 1), snap) == NO_SUCH_OBJECT  # notifications are not readable
    assert view_get(VIEW, (1, 3, 6, 1, 4, 1, 9), snap) == NO_SUCH_OBJECT
    assert view_get(VIEW, (), snap) == NO_SUCH_OBJECT


def walk(
    states: Mapping[str, Mapping[str, Any]] | None = None, start: tuple[int, ...] = (), limit: int = 10_000
) -> list[Any]:
    """GETNEXT from ``start`` to the end of the MIB (or ``limit`` cells)."""
    snap = snapshot(states)
    out: list[Any] = []
    oid = start
    for _ in range(20_000):
        found = view_next(VIEW, oid, snap)
        if found is None or len(out) == limit:
            return out
        assert found[0] > oid
        out.append(found)
        oid = found[0]
    raise AssertionError("walk does not end")


def test_getnext_walks_column_by_column_rows_in_index_order_and_ends() -> None:
    cells = walk(start=(*ENT_T, 5))
    meters = [(oid, value) for oid, value in cells if oid[: len(ENT_T) + 1] == (*ENT_T, 5)]
    # column 2 (line) for both rows, then column 3...; "heat-1" (6 octets) before "flat-12" (7).
    assert [oid[len(ENT_T) + 3 :] for oid, _ in meters[:2]] == [name_oid("heat-1"), name_oid("flat-12")]
    assert [value for _, value in meters[:2]] == [("DisplayString", "mbus"), ("DisplayString", "rs485-1")]
    assert len(meters) == 2 * len(snmp_mib.TABLES[1].columns)
    lines = [oid for oid, _ in cells if oid[: len(ENT_T) + 1] == (*ENT_T, 4)]
    assert lines == []  # the walk started after the line table
    everything = walk()
    line_rows = {oid[len(ENT_T) + 3 :] for oid, _ in everything if oid[: len(ENT_T) + 1] == (*ENT_T, 4)}
    assert line_rows == {name_oid("rs485-1"), name_oid("mbus")}  # not line/rs485-1/scan
    assert everything[-1][0] == (1, 3, 6, 1, 6, 3, 15, 1, 1, 6, 0)  # usmStatsDecryptionErrors.0
    assert view_next(VIEW, everything[-1][0], snapshot()) is None
    for oid, value in everything:  # GET agrees with GETNEXT
        assert view_get(VIEW, oid, snapshot()) == value


def test_rows_follow_the_states_at_request_time() -> None:
    states = {k: v for k, v in STATES.items() if not k.startswith("meter/")}
    assert not [c for c in walk(states) if c[0][: len(ENT_T) + 1] == (*ENT_T, 5)]
    states["meter/new"] = {"meter": "new", "quality": "stale"}
    cells = [c for c in walk(states) if c[0][: len(ENT_T) + 1] == (*ENT_T, 5)]
    assert ("DisplayString", "stale") in [v for _, v in cells]
    assert ("DisplayString", "") in [v for _, v in cells]  # members the document lacks read as empty


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=20))
def test_getnext_of_any_oid_is_greater_and_get_agrees(oid: list[int]) -> None:
    snap = snapshot()
    found = view_next(VIEW, tuple(oid), snap)
    if found is not None:
        assert found[0] > tuple(oid)
        assert view_get(VIEW, found[0], snap) == found[1]
    view_get(VIEW, tuple(oid), snap)  # never raises


def test_numbers_are_clamped_and_garbage_reads_as_zero() -> None:
    from dcud.service.snmp_agent import encode_value

    assert int(encode_value(("Gauge32", 2**40))) == 2**32 - 1
    assert int(encode_value(("Gauge32", -5))) == 0
    assert int(encode_value(("Integer32", 2**40))) == 2**31 - 1
    assert int(encode_value(("Counter32", 2**32 + 7))) == 7
    assert snmp_mib.number(float("nan")) == 0 and snmp_mib.number(float("inf")) == 0
    assert snmp_mib.number("12") == 0 and snmp_mib.number(True) == 0
    assert snmp_mib.text("bad\x00\x1bbytes\u00e9") == "bad??bytes?"
    assert len(snmp_mib.text("x" * 1000)) == 255


# -- the agent, in this process, against Net-SNMP ------------------------------------------------


@dataclass
class RunningAgent:
    agent: Agent
    port: int
    bus: EventBus

    def tool(
        self, name: str, *args: str, timeout_s: float = 2.0, retries: int = 1
    ) -> subprocess.CompletedProcess[str]:
        """A Net-SNMP command against the agent (MIBs loaded, so names print as in DCUD-MIB)."""
        return net_snmp(name, *args, timeout_s=timeout_s, retries=retries)


V3_ARGS = ("-v3", "-u", USER, "-l", "authPriv", "-a", "SHA", "-A", AUTH_KEY, "-x", "AES", "-X", PRIV_KEY)


def agent_config(tmp_path: Path, **changes: Any) -> AgentServiceConfig:
    base = AgentServiceConfig(
        device_id="dcu-test",
        host="127.0.0.1",
        port=free_port(socket.SOCK_DGRAM),
        community=COMMUNITY,
        user=USER,
        auth="SHA",
        auth_key=AUTH_KEY,
        priv="AES",
        priv_key=PRIV_KEY,
        engine_id=snmp_mib.default_engine_id("dcu-test"),
        enterprise_oid=ENT,
        state_dir=tmp_path,
    )
    return replace(base, **changes)


@contextlib.asynccontextmanager
async def running_agent(
    tmp_path: Path, states: Mapping[str, Mapping[str, Any]] | None = None, **changes: Any
) -> AsyncIterator[RunningAgent]:
    cfg = agent_config(tmp_path, **changes)
    bus = EventBus()
    for subtopic, document in (STATES if states is None else states).items():
        bus.set_state(subtopic, document)
    errors: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    agent = Agent(cfg, bus, lambda: STATUS, engine_clock(tmp_path))
    try:
        await agent.open()
        yield RunningAgent(agent, cfg.port, bus)
    finally:
        agent.close()
        loop.set_exception_handler(None)
    assert errors == []  # nothing escaped to the event loop


def values(output: str) -> dict[str, str]:
    """``NAME = VALUE`` lines of snmpwalk -OQ."""
    out = {}
    for line in output.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            out[name.strip()] = value.strip().strip('"')
    return out


async def test_v2c_walk_get_and_v3_bulkwalk_serve_the_states(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as ra:
        walked = await asyncio.to_thread(
            ra.tool, "snmpwalk", "-v2c", "-c", COMMUNITY, "-OQ", f"127.0.0.1:{ra.port}", "DCUD-MIB::dcudMIB"
        )
        assert walked.returncode == 0, walked.stderr
        got = values(walked.stdout)
        assert got["DCUD-MIB::dcudDevId.0"] == "dcu-test"
        assert got["DCUD-MIB::dcudDevPower.0"] == "ok"
        assert got["DCUD-MIB::dcudDevClockOffset.0"] == "-12 milliseconds"
        assert got['DCUD-MIB::dcudMeterQuality."flat-12"'] == "ok"
        assert got['DCUD-MIB::dcudMeterLastError."heat-1"'] == "PeerTimeout: no answer to 10 5B FE"
        assert got['DCUD-MIB::dcudLineBytesRx."rs485-1"'] == f"{2**40} bytes"
        assert got['DCUD-MIB::dcudDriveCia402."axis-1"'] == "fault"
        assert got['DCUD-MIB::dcudDriveIsOnline."axis-1"'] == "true"
        assert got['DCUD-MIB::dcudDriveErrorCode."axis-1"'] == str(0x3210)
        assert got['DCUD-MIB::dcudPushPushed."ftp"'] == "42"
        assert got['DCUD-MIB::dcudPortTls."tm"'] == "true"
        assert not [k for k in got if "scan" in k]
        bulk = await asyncio.to_thread(
            ra.tool, "snmpbulkwalk", *V3_ARGS, "-Cr25", "-OQ", f"127.0.0.1:{ra.port}", "DCUD-MIB::dcudMIB"
        )
        assert bulk.returncode == 0, bulk.stderr
        assert values(bulk.stdout) == got
        got_v3 = await asyncio.to_thread(
            ra.tool,
            "snmpget",
            *V3_ARGS,
            "-OQ",
            f"127.0.0.1:{ra.port}",
            "SNMPv2-MIB::sysUpTime.0",
            'DCUD-MIB::dcudMeterStatus."heat-1"',
            "DCUD-MIB::dcudDevVersion.0",
            "DCUD-MIB::dcudDevVersion.1",
            "DCUD-MIB::dcudDevice.99.0",
        )
        assert got_v3.returncode == 0, got_v3.stderr
        lines = got_v3.stdout.splitlines()
        assert lines[1:] == [
            'DCUD-MIB::dcudMeterStatus."heat-1" = failed',
            "DCUD-MIB::dcudDevVersion.0 = 9.9.9",
            "DCUD-MIB::dcudDevVersion.1 = No Such Instance currently exists at this OID",
            "DCUD-MIB::dcudDevice.99.0 = No Such Object available on this agent at this OID",
        ]
        # A manager reads dcud's engine ID over SNMP (SNMP-FRAMEWORK-MIB snmpEngineID.0).
        engine = await asyncio.to_thread(
            ra.tool,
            "snmpget",
            "-v2c",
            "-c",
            COMMUNITY,
            "-Ov",
            "-Ox",
            f"127.0.0.1:{ra.port}",
            ".1.3.6.1.6.3.10.2.1.1.0",
        )
        assert (
            engine.stdout.replace(" ", "")
            .replace("\n", "")
            .lower()
            .endswith(snmp_mib.default_engine_id("dcu-test").hex())
        ), engine.stdout


async def test_wrong_community_user_key_and_level_are_refused_and_counted(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as ra:
        target = f"127.0.0.1:{ra.port}"
        wrong = await asyncio.to_thread(
            ra.tool,
            "snmpget",
            "-v2c",
            "-c",
            "public",
            target,
            "SNMPv2-MIB::sysUpTime.0",
            timeout_s=0.3,
            retries=0,
        )
        assert wrong.returncode != 0 and "Timeout" in wrong.stderr
        v1 = await asyncio.to_thread(
            ra.tool,
            "snmpget",
            "-v1",
            "-c",
            COMMUNITY,
            target,
            "SNMPv2-MIB::sysUpTime.0",
            timeout_s=0.3,
            retries=0,
        )
        assert v1.returncode != 0 and "Timeout" in v1.stderr  # no SNMPv1
        user = await asyncio.to_thread(
            ra.tool, "snmpget", *V3_ARGS[:2], "intruder", *V3_ARGS[3:], target, "SNMPv2-MIB::sysUpTime.0"
        )
        assert "Unknown user name" in user.stderr  # the RFC 3414 report
        key = await asyncio.to_thread(
            ra.tool,
            "snmpget",
            *V3_ARGS[:8],
            "wrong-auth-key",
            *V3_ARGS[9:],
            target,
            "SNMPv2-MIB::sysUpTime.0",
        )
        assert "Authentication failure" in key.stderr
        level = await asyncio.to_thread(
            ra.tool,
            "snmpget",
            "-v3",
            "-u",
            USER,
            "-l",
            "authNoPriv",
            "-a",
            "SHA",
            "-A",
            AUTH_KEY,
            target,
            "SNMPv2-MIB::sysUpTime.0",
        )
        assert "Unsupported security level" in level.stderr
        refused_set = await asyncio.to_thread(
            ra.tool, "snmpset", "-v2c", "-c", COMMUNITY, target, ".1.3.6.1.2.1.1.5.0", "s", "owned"
        )
        assert "notWritable" in refused_set.stderr, refused_set
        state = ra.agent.state_document()
    assert state["bad_community_names"] == 1
    assert state["bad_versions"] == 1
    assert state["unknown_user_names"] == 1
    assert state["wrong_digests"] == 1
    assert state["unsupported_sec_levels"] == 1
    assert state["refused"] == 4
    assert state["set_refused"] == 1
    assert state["errors"] == 0
    assert COMMUNITY not in repr(state)
    assert COMMUNITY not in repr(agent_config(tmp_path))


def exchange(port: int, datagram: bytes, timeout_s: float = 3.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        sock.sendto(datagram, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def decode_response(data: bytes) -> tuple[int, list[Any]]:
    from pyasn1.codec.ber import decoder
    from pysnmp.proto.api import v2c

    message, _ = decoder.decode(data, asn1Spec=v2c.Message())
    pdu = v2c.apiMessage.get_pdu(message)
    return int(v2c.apiPDU.get_error_status(pdu)), list(v2c.apiPDU.get_varbinds(pdu))


def get_request(community: str, oids: list[tuple[int, ...]]) -> bytes:
    """A raw SNMPv2c GetRequest."""
    from pyasn1.codec.ber import encoder
    from pysnmp.proto.api import v2c

    pdu = v2c.GetRequestPDU()
    v2c.apiPDU.set_defaults(pdu)
    v2c.apiPDU.set_varbinds(pdu, [(oid, v2c.null) for oid in oids])
    message = v2c.Message()
    v2c.apiMessage.set_defaults(message)
    v2c.apiMessage.set_community(message, community)
    v2c.apiMessage.set_pdu(message, pdu)
    return encoder.encode(message)  # type: ignore[no-any-return]


MANY_METERS = dict(STATES) | {
    f"meter/meter-{index:04d}": {"meter": f"meter-{index:04d}", "quality": "ok" * 20} for index in range(1000)
}


@pytest.mark.parametrize("max_message_bytes", [484, 1472, 65507])
async def test_getbulk_responses_are_bounded_in_size_and_count(
    tmp_path: Path, max_message_bytes: int
) -> None:
    """max-repetitions 2^31-1 over 1000 meters: the answer fits agent_max_message_bytes and
    MAX_VARBINDS, and is a correct prefix of the walk (RFC 3416 4.2.3 (1))."""
    async with running_agent(tmp_path, MANY_METERS, max_message_bytes=max_message_bytes) as ra:
        data = await asyncio.to_thread(exchange, ra.port, bulk_request(COMMUNITY, 2**31 - 1, count=4))
        assert data is not None and len(data) <= max_message_bytes
        status, varbinds = decode_response(data)
        state = ra.agent.state_document()
    assert status == 0 and 4 <= len(varbinds) <= MAX_VARBINDS
    if max_message_bytes == 65507:
        assert len(varbinds) == MAX_VARBINDS
    expected = walk(MANY_METERS, (1, 3, 6), limit=MAX_VARBINDS)
    repetitions = -(-len(varbinds) // 4)  # the last one may be cut short
    assert [tuple(name) for name, _ in varbinds[::4]] == [oid for oid, _ in expected[:repetitions]]
    assert state["truncated"] == 1 and state["errors"] == 0


async def test_a_get_that_cannot_fit_is_too_big_and_odd_bulk_numbers_are_harmless(tmp_path: Path) -> None:
    async with running_agent(tmp_path, MANY_METERS, max_message_bytes=484) as ra:
        oids = [(*ENT_T, 5, 1, 4, *name_oid(f"meter-{i:04d}")) for i in range(40)]
        data = await asyncio.to_thread(exchange, ra.port, get_request(COMMUNITY, oids))
        assert data is not None
        assert decode_response(data) == (1, [])  # tooBig, no variable bindings (RFC 3416 4.2.1)
        # Negative numbers break RFC 3416's INTEGER (0..max-bindings): a malformed request, dropped
        # and counted like any other (snmpInASNParseErrs).
        data = await asyncio.to_thread(exchange, ra.port, bulk_request(COMMUNITY, -5, non_repeaters=-3), 0.5)
        assert data is None
        data = await asyncio.to_thread(exchange, ra.port, bulk_request(COMMUNITY, 3, non_repeaters=2**31 - 1))
        assert data is not None
        status, varbinds = decode_response(data)
        assert status == 0 and len(varbinds) == 1  # every variable a non-repeater
        state = ra.agent.state_document()
    assert state["too_big"] == 1 and state["asn_parse_errors"] == 1 and state["errors"] == 0


async def test_hostile_datagrams_never_stop_the_agent(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as ra:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in hostile_datagrams():
                sock.sendto(datagram, ("127.0.0.1", ra.port))
        # still answering, in order after the batch
        for _ in range(3):
            data = await asyncio.to_thread(exchange, ra.port, bulk_request(COMMUNITY, 2))
            if data is not None:
                break
        assert data is not None and decode_response(data)[0] == 0
        state = ra.agent.state_document()
    assert state["datagrams"] >= len(hostile_datagrams())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda cut, flips: bytes(
                b ^ flips.get(i, 0) for i, b in enumerate(bulk_request(COMMUNITY, 5, count=2)[:cut])
            ),
            st.integers(min_value=0, max_value=80),
            st.dictionaries(st.integers(min_value=0, max_value=80), st.integers(min_value=1, max_value=255)),
        ),
    )
)
def test_random_datagrams_get_an_answer_or_nothing(
    tmp_path_factory: pytest.TempPathFactory, datagram: bytes
) -> None:
    """Any datagram: the handler returns (never raises) and the next valid request is answered."""
    tmp = tmp_path_factory.mktemp("agent")

    async def run() -> None:
        async with running_agent(tmp) as ra:
            from pysnmp.carrier.asyncio.dgram import udp

            ra.agent._receive(None, udp.DOMAIN_NAME, ("127.0.0.1", 9), datagram)
            data = await asyncio.to_thread(exchange, ra.port, bulk_request(COMMUNITY, 1))
            assert data is not None

    asyncio.run(run())


async def test_requests_above_the_rate_are_dropped_and_counted(tmp_path: Path) -> None:
    from dcud.service.snmp_agent import TokenBucket

    async with running_agent(tmp_path, max_requests_per_s=5) as ra:
        from pysnmp.carrier.asyncio.dgram import udp

        ra.agent._bucket = TokenBucket(5, 10, clock=lambda: 0.0)  # time stands still: no refill
        request = bulk_request(COMMUNITY, 1)
        for _ in range(50):  # synchronously: far faster than 5 a second
            ra.agent._receive(None, udp.DOMAIN_NAME, ("127.0.0.1", 9), request)
        state = ra.agent.state_document()
    assert state["rate_limited"] == 50 - 10  # the burst (10) passes, the rest is dropped


# -- configuration -------------------------------------------------------------------------------


def test_the_agent_slice_comes_from_dcud_toml_and_the_trap_user(tmp_path: Path) -> None:
    from dcud.config.loader import load_config

    from helpers.daemon import write_site

    v3 = (
        f"snmp_user={USER}\nsnmp_auth_algo=2\nsnmp_auth_key={AUTH_KEY}\nsnmp_priv_algo=3\n"
        f"snmp_priv_key={PRIV_KEY}\n"
    )
    toml = f'\n[snmp]\nagent_listen = "[::1]:1161"\nagent_community = "{COMMUNITY}"\n'
    loaded = load_config(write_site(tmp_path / "a", toml_extra=toml, wme=v3))
    cfg = AgentServiceConfig.from_config(loaded)
    assert cfg is not None
    assert (cfg.host, cfg.port, cfg.community, cfg.security_level) == ("::1", 1161, COMMUNITY, "authPriv")
    assert cfg.engine_id == snmp_mib.default_engine_id("dcu-test")  # the trap sender's engine ID
    for shown in (repr(cfg), repr(loaded.toml), repr(loaded.toml.snmp), str(loaded.toml)):
        assert COMMUNITY not in shown and AUTH_KEY not in shown
    assert "agent_community=***" in repr(loaded.toml.snmp)
    # v2c only: a trap user without authentication is no v3 agent user
    only_v2c = load_config(write_site(tmp_path / "b", toml_extra=toml, wme=f"snmp_user={USER}\n"))
    cfg = AgentServiceConfig.from_config(only_v2c)
    assert cfg is not None and not cfg.v3 and cfg.security_level == ""
    # nobody could use it: off, with one warning
    nobody = load_config(write_site(tmp_path / "c", toml_extra='\n[snmp]\nagent_listen = "127.0.0.1:1161"\n'))
    assert AgentServiceConfig.from_config(nobody) is None
    assert AgentServiceConfig.from_config(load_config(write_site(tmp_path / "d"))) is None  # the default: off


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('agent_listen = "localhost:161"', "snmp.agent_listen: Expected `str` matching regex"),
        ('agent_listen = "999.1.1.1:161"', 'snmp.agent_listen: expected "<IPv4>:<port>"'),
        ('agent_listen = "127.0.0.1:0"', 'snmp.agent_listen: expected "<IPv4>:<port>"'),
        ('agent_community = "has a space"', "snmp.agent_community: Expected `str` matching regex"),
        ("agent_max_message_bytes = 100", "snmp.agent_max_message_bytes: Expected `int` >= 484"),
        ("inform_retries = 11", "snmp.inform_retries: Expected `int` <= 10"),
    ],
)
def test_bad_agent_settings_stop_check_config_with_file_line_and_key(
    tmp_path: Path, setting: str, message: str
) -> None:

    from helpers.daemon import run_dcud, write_site

    config = write_site(tmp_path / "site", toml_extra=f"\n[snmp]\n{setting}\n")
    result = run_dcud("check-config", "-c", str(config))
    assert result.returncode == 78
    line = config.read_text().splitlines().index(setting) + 1
    assert f"{config}:{line}: {message.replace('`', '')}" in result.stderr + result.stdout, result.stderr
    assert "has a space" not in result.stderr + result.stdout  # a community is never echoed
