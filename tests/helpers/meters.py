"""Helpers of the meter tests: socat pty pairs, in-process simulators, a supervisor harness, fakes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcud.runtime.supervisor import Service, Supervisor, SupervisorOptions
from dcud.sim.peers import find_program
from dcud.sim.serial_sim import SimConfig, SimHandle, serve

from helpers import REPO

FAST = SupervisorOptions(grace_s=2.0, liveness_s=3.0, restart_initial_s=0.05, restart_max_s=0.2)


class SocatPair:
    """``socat`` joining two ptys, reachable as symlinks ``a`` and ``b`` (a null-modem cable)."""

    def __init__(self, a: Path, b: Path) -> None:
        self.a = a
        self.b = b
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 5.0) -> None:
        """Start socat and wait until both links exist."""
        socat = find_program("socat", "socat")
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        self.proc = subprocess.Popen(
            [socat, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not (self.a.exists() and self.b.exists()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("socat did not create its ptys")
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill socat: both ptys vanish, like an unplugged USB adapter."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()


def start_sim(*args: str, stderr: int | None = None) -> subprocess.Popen[bytes]:
    """``python -m dcud sim <args>`` as a process; its stdout a pipe, unbuffered (its announcements
    come line by line); ``stderr`` as given (inherited by default)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dcud", "sim", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@contextlib.contextmanager
def simulator_process(workdir: Path, sims_toml: str) -> Iterator[subprocess.Popen[bytes]]:
    """``dcud sim meters`` as its own process, configured by ``sims_toml`` (written to
    ``workdir/sims.toml``; links relative to ``workdir``); yields once it printed ``ready``."""
    (workdir / "sims.toml").write_text(sims_toml)
    proc = start_sim("meters", "--config", str(workdir / "sims.toml"))
    try:
        assert proc.stdout is not None
        for _ in range(3):
            if json.loads(proc.stdout.readline()).get("ready"):
                break
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def simulators(config: SimConfig) -> AsyncIterator[SimHandle]:
    """Run simulated lines in this event loop; yields once every line is open."""
    ready: asyncio.Future[SimHandle] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, on_ready=ready.set_result, stop=stop))
    try:
        done, _ = await asyncio.wait([ready, task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            raise AssertionError("simulators did not start")
        yield ready.result()
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


@contextlib.asynccontextmanager
async def supervised(*services: Service) -> AsyncIterator[Supervisor]:
    """Run services under a real supervisor; stop them gracefully afterwards."""
    sup = Supervisor(list(services), options=FAST)
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(sup.all_ready.wait(), 10)
        yield sup
    finally:
        sup.request_stop()
        await asyncio.wait_for(task, 15)


@dataclass
class Events:
    """Collects ``Runtime.event`` calls."""

    items: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, event_type: str, text: str, **fields: object) -> None:
        self.items.append({"type": event_type, "text": text, **fields})
        self.changed.set()

    def types(self) -> list[str]:
        return [e["type"] for e in self.items]


@dataclass
class FakeOutbox:
    """An in-memory outbox: items in order, decoded."""

    items: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def put(self, kind: str, subtopic: str, payload: bytes) -> None:
        self.items.append((kind, subtopic, json.loads(payload)))
        self.changed.set()

    def readings(self, meter: str | None = None) -> list[dict[str, Any]]:
        return [
            p for k, s, p in self.items if k == "reading" and (meter is None or s == f"meter/{meter}/reading")
        ]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0, step_s: float = 0.05) -> None:
    """Poll ``condition`` until true; AssertionError after ``timeout_s`` (bounded loop)."""
    for _ in range(int(timeout_s / step_s) + 1):
        if condition():
            return
        await asyncio.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def write_control(path: Path, silent: list[str]) -> None:
    """Atomically (re)write a simulator control file; the mtime bump makes the simulator notice."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"silent": silent}))
    os.replace(tmp, path)
