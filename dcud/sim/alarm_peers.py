"""Alarm and time peers for tests, the demo and benchmarks: Net-SNMP snmptrapd and chronyd.

Both are real programs started on 127.0.0.1 with a free port and a private working directory (see
:mod:`dcud.sim.peers`, which re-exports these names), and stopped for sure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dcud.sim.peers import find_program, free_port


@dataclass(frozen=True)
class SnmpUser:
    """A USM user snmptrapd accepts: ``createUser -e <engine_id> name auth auth_key priv priv_key``.

    ``engine_id`` None: the user of snmptrapd's own engine (no ``-e``), for INFORMs, where the
    receiver is the authoritative engine.
    """

    name: str
    engine_id: bytes | None
    auth: str = "SHA"
    auth_key: str = ""
    priv: str = "AES"
    priv_key: str = ""


@dataclass(frozen=True)
class ReceivedTrap:
    """One notification as snmptrapd printed it: security info and ``(name, value)`` varbinds."""

    security: str
    varbinds: tuple[tuple[str, str], ...]

    def value(self, name_suffix: str) -> str | None:
        """The value of the first varbind whose name ends with ``name_suffix`` (type prefix removed)."""
        for name, value in self.varbinds:
            if name.endswith(name_suffix):
                if value.endswith(":") and " " not in value:  # an empty value: "STRING:"
                    return ""
                return value.split(": ", 1)[1] if ": " in value else value
        return None


@dataclass
class SnmpTrapd:
    """Net-SNMP snmptrapd on 127.0.0.1:port, printing every trap as one ``TRAP|...`` log line."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path

    def traps(self) -> list[ReceivedTrap]:
        """Every trap received so far, in order."""
        out = []
        for line in self.log_text().splitlines():
            if not line.startswith("TRAP|"):
                continue
            _tag, security, rest = line.split("|", 2)
            pairs = []
            for item in rest.split("\t"):
                name, sep, value = item.partition(" = ")
                if sep:
                    pairs.append((name.strip(), value.strip()))
            out.append(ReceivedTrap(security, tuple(pairs)))
        return out

    def wait_for(self, predicate: Callable[[ReceivedTrap], bool], timeout_s: float = 10.0) -> ReceivedTrap:
        """The first received trap matching ``predicate``; TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for trap in self.traps():
                if predicate(trap):
                    return trap
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching trap within {timeout_s} s; log:\n{self.log_text()}")
            time.sleep(0.005)

    def log_text(self) -> str:
        """snmptrapd's log (traps and its own messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Terminate snmptrapd and wait for it."""
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s; waits."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def start_snmptrapd(
    workdir: Path,
    *,
    communities: tuple[str, ...] = ("public",),
    users: tuple[SnmpUser, ...] = (),
    mib_dirs: tuple[Path, ...] = (),
    mibs: tuple[str, ...] = (),
    port: int | None = None,
) -> SnmpTrapd:
    """Start snmptrapd (no system config files, MIBs only from ``mib_dirs``); ready when this returns.

    With ``mibs`` (e.g. ``("DCUD-MIB", "SNMPv2-MIB")``) trap OIDs and varbinds are printed by name.
    """
    binary = find_program("snmptrapd", "snmptrapd")
    port = port or free_port(socket.SOCK_DGRAM)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"authCommunity log {c}" for c in communities]
    for user in users:
        auth = f' {user.auth} "{user.auth_key}"' if user.auth != "none" else ""
        priv = f' {user.priv} "{user.priv_key}"' if user.priv != "none" and auth else ""
        level = "priv" if priv else ("auth" if auth else "noauth")
        engine = f"-e 0x{user.engine_id.hex()} " if user.engine_id is not None else ""
        lines.append(f"createUser {engine}{user.name}{auth}{priv}")
        lines.append(f"authUser log {user.name} {level}")
    lines.append("format2 TRAP|%P|%v\\n")
    lines.append("format1 TRAP|%P|%v\\n")
    conf = workdir / "snmptrapd.conf"
    conf.write_text("\n".join(lines) + "\n")
    log_path = workdir / "snmptrapd.log"
    log_path.unlink(missing_ok=True)
    command = [
        binary,
        "-f",
        "-C",
        "-c",
        str(conf),
        "-n",
        "-Lf",
        str(log_path),
        "-M",
        ":".join(str(d) for d in mib_dirs) if mib_dirs else str(workdir),
        "-m",
        ":".join(mibs),
        f"--persistentDir={workdir / 'persist'}",
        f"udp:127.0.0.1:{port}",
    ]
    err = (workdir / "snmptrapd.stderr").open("ab")
    process = subprocess.Popen(command, stdout=err, stderr=err, start_new_session=True)
    err.close()
    trapd = SnmpTrapd(process, port, workdir, log_path)
    deadline = time.monotonic() + 10.0
    while "NET-SNMP version" not in trapd.log_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise TimeoutError(f"snmptrapd did not start: {trapd.log_text()}")
        time.sleep(0.02)
    return trapd


@dataclass
class Chronyd:
    """chronyd serving NTP on 127.0.0.1:port from its local clock (``-x``: never touches the clock)."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    def stop(self) -> None:
        """Terminate chronyd and wait for it."""
        stop_process(self.process)


def start_chronyd(workdir: Path, port: int | None = None, stratum: int = 8) -> Chronyd:
    """Start chronyd as an NTP server on a loopback port; ready (answers a query) when this returns.

    ``chronyd -x -d -f conf``: ``-x`` never adjusts the system clock, ``local stratum`` serves the local
    clock, no drift file, no command sockets (``cmdport 0``, ``bindcmdaddress /``).
    """
    import ntplib

    binary = find_program("chronyd", "chrony")
    port = port or free_port(socket.SOCK_DGRAM)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "chrony.conf"
    conf.write_text(
        f"port {port}\n"
        "bindaddress 127.0.0.1\n"
        f"local stratum {stratum}\n"
        "allow 127.0.0.1\n"
        "cmdport 0\n"
        "bindcmdaddress /\n"
        f"pidfile {workdir / 'chronyd.pid'}\n"
    )
    log = (workdir / "chronyd.log").open("ab")
    # -U: as a user other than root chronyd refuses to start ("Not superuser") unless told that it has
    # what it needs, which it has here: a loopback port above 1023, files in workdir, -x.
    args = [binary, "-x", "-d", "-f", str(conf), *(["-U"] if os.geteuid() != 0 else [])]
    process = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
    log.close()
    client = ntplib.NTPClient()
    deadline = time.monotonic() + 15.0
    while True:
        try:
            client.request("127.0.0.1", version=4, port=port, timeout=0.5)
            break
        except (ntplib.NTPException, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                log_text = (workdir / "chronyd.log").read_text(errors="replace")
                raise TimeoutError(f"chronyd did not answer on port {port}: {log_text}") from None
    return Chronyd(process, port, workdir)
