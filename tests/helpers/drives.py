"""``dcud sim drive`` as a process on one end of a pty pair (CANopen over slcan or serial), for the drive
tests and the whole-site SNMP test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from helpers import REPO


class SimProcess:
    """``python -m dcud sim drive`` on one end of the pty pair; control lines in, JSON lines out."""

    def __init__(self, channel: Path, nodes: str, interface: str = "slcan", heartbeat_ms: int = 100) -> None:
        options = ["--option", "sleep_after_open=0"] if interface == "slcan" else []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dcud",
                "sim",
                "drive",
                "--interface",
                interface,
                "--channel",
                str(channel),
                "--nodes",
                nodes,
                "--heartbeat-ms",
                str(heartbeat_ms),
                *options,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    async def line(self, timeout_s: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        text = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout_s)
        assert text, "simulator exited"
        doc: dict[str, Any] = json.loads(text)
        return doc

    async def control(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = await self.line()
        assert answer.get("ok"), answer
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextlib.asynccontextmanager
async def simulator(channel: Path, nodes: str = "1", interface: str = "slcan") -> AsyncIterator[SimProcess]:
    """The drive simulator for ``nodes`` on ``channel``, ready (its first JSON line) before the body runs."""
    sim = SimProcess(channel, nodes, interface)
    try:
        ready = await sim.line(timeout_s=20)
        assert ready["ready"], ready
        yield sim
    finally:
        await asyncio.to_thread(sim.stop)
