"""Shared by the power, SNMP and watchdog tests and bench/bench_lastgasp.py: a site with traps."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dcud.config.loader import load_config
from dcud.runtime.bus import EventBus
from dcud.runtime.supervisor import ServiceContext
from dcud.service import snmp_mib
from dcud.service.snmp import SnmpServiceConfig, SnmpTrapService
from dcud.sim.alarm_peers import SnmpTrapd, SnmpUser, start_snmptrapd
from dcud.sim.peers import find_program, free_port

from helpers import REPO
from helpers.meters import wait_until
from helpers.mqtt import Subscriber

MIB_DIRS = (REPO / "tests" / "mibs", REPO / "mibs")
MIBS = ("DCUD-MIB", "SNMPv2-MIB")
MIB_PATH = ":".join(str(d) for d in MIB_DIRS)
"""``MIB_DIRS`` as Net-SNMP's ``-M`` takes them."""
DEVICE_ID = "dcu-test"
PREFIX = f"dcu/{DEVICE_ID}"
AUTH_KEY = "auth-pass-123"
PRIV_KEY = "priv-pass-456"
USER = "dcud"
COMMUNITY = "noc-watch"


def trap_receiver(workdir: Path, port: int | None = None, **users: tuple[str, str]) -> SnmpTrapd:
    """snmptrapd with DCUD-MIB loaded, community ``public`` and the v3 user ``dcud`` (SHA + AES).

    ``dcud`` exists twice: for traps under dcud's engine ID, and for INFORMs under snmptrapd's own.
    """
    engine_id = snmp_mib.default_engine_id(DEVICE_ID)
    all_users = [
        SnmpUser(USER, engine_id, "SHA", AUTH_KEY, "AES", PRIV_KEY),
        SnmpUser(USER, None, "SHA", AUTH_KEY, "AES", PRIV_KEY),
    ]
    for name, (auth, priv) in users.items():
        all_users.append(SnmpUser(name, engine_id, auth, AUTH_KEY, priv, PRIV_KEY))
    return start_snmptrapd(
        workdir,
        communities=("public", COMMUNITY),
        users=tuple(all_users),
        mib_dirs=MIB_DIRS,
        mibs=MIBS,
        port=port,
    )


def snmp_params(trapd: SnmpTrapd, version: int = 3, auth: int = 2, priv: int = 3, user: str = USER) -> str:
    """WM-E parameter lines for traps to ``trapd``."""
    lines = [
        "snmp_trap=1",
        "snmp_manager_ip=127.0.0.1",
        f"snmp_manager_port={trapd.port}",
        f"snmp_version={version}",
        f"snmp_user={user}",
    ]
    if version == 3:
        lines += [f"snmp_auth_algo={auth}", f"snmp_auth_key={AUTH_KEY}"]
        if priv:
            lines += [f"snmp_priv_algo={priv}", f"snmp_priv_key={PRIV_KEY}"]
    return "\n".join(lines) + "\n"


def net_snmp(
    tool: str, *args: str, timeout_s: float = 2.0, retries: int = 2, options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """A Net-SNMP command (``snmpget``, ``snmpwalk``...) with DCUD-MIB loaded, so names print as in the MIB;
    ``options`` (``-OQUt``...) before the timeout and retries, ``args`` (the agent, the OIDs) after."""
    return subprocess.run(
        [
            find_program(tool, "snmp"),
            "-M",
            MIB_PATH,
            "-m",
            "DCUD-MIB:SNMPv2-MIB",
            *options,
            "-t",
            str(timeout_s),
            "-r",
            str(retries),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def power_toml(power_file: Path, poll_s: float = 0.01, debounce_s: float = 0.05) -> str:
    """A ``[power]`` table reading ``power_file``."""
    return (
        f'\n[power]\nsource = "file"\npath = "{power_file}"\n'
        f"poll_interval_s = {poll_s}\ndebounce_s = {debounce_s}\n"
    )


def set_power(path: Path, present: bool) -> None:
    """Write the power file the way sysfs reads (``1``/``0`` and a newline)."""
    path.write_text("1\n" if present else "0\n")


def is_trap(name: str) -> Callable[[Any], bool]:
    """Predicate: a received trap whose snmpTrapOID is ``DCUD-MIB::<name>``."""
    return lambda trap: trap.value("snmpTrapOID.0") == f"DCUD-MIB::{name}"


class UdpSink:
    """A UDP socket on 127.0.0.1 collecting event push datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def receive(self, timeout_s: float = 10.0) -> bytes:
        """The next datagram (TimeoutError after ``timeout_s``)."""
        self.sock.settimeout(timeout_s)
        return self.sock.recv(4096)

    def close(self) -> None:
        self.sock.close()


class EventSubscriber(Subscriber):
    """Collects ``<prefix>/event`` and the power, SNMP and clock states from Mosquitto in the background."""

    def __init__(self, port: int) -> None:
        topics = [f"{PREFIX}/event"] + [f"{PREFIX}/{name}/state" for name in ("power", "snmp", "clock")]
        super().__init__(port, topics, PREFIX)

    async def wait_event(self, event_type: str, timeout_s: float = 10.0, after: int = 0) -> dict[str, Any]:
        """The first event of ``event_type`` (among events from index ``after`` on)."""

        def first() -> dict[str, Any] | None:
            return next(
                (payload for payload in self.events[after:] if payload.get("type") == event_type), None
            )

        await self.wait(lambda: first() is not None, f"event {event_type}", timeout_s)
        event = first()
        assert event is not None
        return event

    async def wait_state(
        self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """The retained state ``<prefix>/<name>`` once ``predicate`` holds."""
        await self.wait(
            lambda: name in self.states and predicate(self.states[name]), f"state {name}", timeout_s
        )
        return self.states[name]


def pick_udp_port() -> int:
    """A free UDP port on 127.0.0.1."""
    return free_port(socket.SOCK_DGRAM)


@contextlib.asynccontextmanager
async def running_service(
    config_path: Path, state_dir: Path, bus: EventBus | None = None
) -> AsyncIterator[Callable[[Mapping[str, Any]], None]]:
    """The ``snmp`` service of a site, running; yields the function the runtime would call per event."""
    slice_ = SnmpServiceConfig.from_config(load_config(config_path))
    assert slice_ is not None
    listeners: list[Callable[[Mapping[str, Any]], None]] = []

    def add(listener: Callable[[Mapping[str, Any]], None]) -> Callable[[], None]:
        listeners.append(listener)
        return lambda: listeners.remove(listener)

    bus = bus if bus is not None else EventBus()
    service = SnmpTrapService(slice_, bus, add)
    ctx = ServiceContext("snmp", 30.0, lambda: None)
    task = asyncio.create_task(service.run(ctx))
    try:
        await wait_until(lambda: ctx.ready, 5.0, step_s=0.01)
        assert "snmp" in bus.states
        assert bus.states["snmp"]["engine_id"] == snmp_mib.engine_id_hex(slice_.engine_id)
        yield lambda event: [listener(event) for listener in listeners]  # type: ignore[func-returns-value]
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        assert not listeners
