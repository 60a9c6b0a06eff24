"""Start the DLMS/COSEM test peer (``tests.peers.dlms_server``) as a process, and talk to its control channel.

``dlms_peer`` is a pytest fixture (registered by tests/conftest.py) returning a factory::

    def test_something(dlms_peer):
        peer = dlms_peer(transport="hdlc", clock={"start": "2024-06-01T12:00:00Z"})
        peer.device            # the tty the client opens (the other end of a socat pty pair)
        peer.tcp_port          # the wrapper port on 127.0.0.1 (transport "tcp" or "both")
        peer.wait_for("release")

Outside pytest (benchmarks), :func:`start_dlms_peer` is a context manager doing the same.
Everything is bounded: the peer and socat are waited for on the lines they print, never with sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GREEN_BOOK_BLOCK_CIPHER_KEY = "000102030405060708090A0B0C0D0E0F"
GREEN_BOOK_AUTHENTICATION_KEY = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"


def _read_line(fd: int, until: Callable[[str], bool], timeout_s: float, what: str) -> str:
    """Read ``fd`` (unbuffered) until a line satisfies ``until``; that line. Bounded by ``timeout_s``."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            lines = seen.decode(errors="replace").splitlines(keepends=True)
            for line in lines:
                if line.endswith("\n") and until(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"{what} did not start within {timeout_s} s: {seen[-2000:]!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"{what} exited before it was ready: {seen[-2000:]!r}")
            seen += chunk


class SocatPty:
    """A socat pty pair: the peer opens ``meter_end``, the client under test opens ``client_end``."""

    def __init__(self, directory: Path, timeout_s: float = 10.0) -> None:
        socat = shutil.which("socat") or shutil.which("socat", path="/usr/bin:/usr/sbin:/bin")
        if socat is None:
            raise AssertionError("socat is not installed: run `sudo apt-get install socat`")
        self.meter_end = directory / "meter-tty"
        self.client_end = directory / "client-tty"
        for link in (self.meter_end, self.client_end):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        self.proc = subprocess.Popen(
            [
                socat,
                "-d",
                "-d",
                f"pty,raw,echo=0,link={self.meter_end}",
                f"pty,raw,echo=0,link={self.client_end}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        try:
            _read_line(
                self.proc.stderr.fileno(),
                lambda line: "starting data transfer loop" in line,
                timeout_s,
                "socat",
            )
        except AssertionError:
            self.close()
            raise
        # socat goes on logging (-d -d) until it exits: drain the pipe so it never blocks or gets SIGPIPE
        threading.Thread(target=self.proc.stderr.read, name="socat-stderr", daemon=True).start()

    def close(self) -> None:
        """Stop socat: both ttys vanish."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass
class DlmsPeer:
    """A running peer: where a client reaches it, and its control channel."""

    process: subprocess.Popen[bytes]
    config: dict[str, Any]
    control_port: int
    tcp_port: int | None = None
    device: str | None = None
    pty: SocatPty | None = None
    physical_address: int = 17
    logical_device: int = 1
    _socket: socket.socket | None = field(default=None, repr=False)
    _reader: IO[str] | None = field(default=None, repr=False)

    def control(self, op: str, socket_timeout_s: float = 30.0, **args: Any) -> dict[str, Any]:
        """One request on the control channel; returns the peer's JSON answer."""
        if self._socket is None:
            self._socket = socket.create_connection(
                ("127.0.0.1", self.control_port), timeout=socket_timeout_s
            )
            self._reader = self._socket.makefile("r", encoding="utf-8")
        assert self._reader is not None
        self._socket.settimeout(socket_timeout_s)
        self._socket.sendall((json.dumps({"op": op, **args}) + "\n").encode())
        line = self._reader.readline()
        if not line:
            raise AssertionError(f"the peer closed its control channel (exit code {self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def status(self) -> dict[str, Any]:
        """Meter time, silence, invocation counters, connections, last request number."""
        return self.control("status")

    def silent(self, for_s: float | None = None) -> None:
        """Stop answering (for ``for_s`` seconds, or until :meth:`speak`)."""
        self.control("silent", for_s=for_s)

    def speak(self) -> None:
        """Answer again."""
        self.control("speak")

    def advance_clock(self, seconds: float) -> str:
        """Move the meter's clock; returns its new time (ISO 8601 UTC)."""
        now: str = self.control("advance_clock", s=seconds)["now"]
        return now

    def set_clock(self, utc: str) -> str:
        """Set the meter's clock to ``utc`` (ISO 8601)."""
        now: str = self.control("set_clock", utc=utc)["now"]
        return now

    def reset_links(self) -> None:
        """Drop every link and association, like a meter that restarted its communication stack."""
        self.control("reset_links")

    def requests(self, kind: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """The request log (every record after ``since``, of ``kind`` when given)."""
        args: dict[str, Any] = {"since": since}
        if kind is not None:
            args["kind"] = kind
        records: list[dict[str, Any]] = self.control("requests", **args)["records"]
        return records

    def wait_for(
        self, kind: str, count: int = 1, since: int = 0, timeout_s: float = 20.0
    ) -> list[dict[str, Any]]:
        """Wait until the log holds ``count`` records of ``kind`` after ``since``; AssertionError if not."""
        answer = self.control(
            "wait", socket_timeout_s=timeout_s + 10, kind=kind, count=count, since=since, timeout_s=timeout_s
        )
        if not answer["ok"]:
            raise AssertionError(
                f"{count} x {kind!r} not logged within {timeout_s} s; got {answer['records']}"
            )
        records: list[dict[str, Any]] = answer["records"]
        return records

    def stop(self) -> int | None:
        """Stop the peer (SIGTERM, then SIGKILL) and socat; returns the peer's exit code."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.pty is not None:
            self.pty.close()
        return self.process.returncode


@contextlib.contextmanager
def start_dlms_peer(
    directory: Path, transport: str = "tcp", timeout_s: float = 30.0, **config: Any
) -> Iterator[DlmsPeer]:
    """Run a peer with ``transport`` ``"tcp"``, ``"hdlc"`` or ``"both"`` and the extra ``config`` keys.

    HDLC runs on a socat pty pair made here; the client end is ``peer.device``. The configuration is
    written to ``directory/peer.json``, the request log to ``directory/requests.jsonl``.
    """
    if transport not in ("tcp", "hdlc", "both"):
        raise ValueError(f"transport must be tcp, hdlc or both, not {transport!r}")
    directory.mkdir(parents=True, exist_ok=True)
    pty = SocatPty(directory) if transport in ("hdlc", "both") else None
    cfg: dict[str, Any] = {"request_log": str(directory / "requests.jsonl"), **config}
    if pty is not None:
        cfg["hdlc"] = {**cfg.get("hdlc", {}), "device": str(pty.meter_end)}
    if transport in ("tcp", "both"):
        cfg.setdefault("tcp", {"port": 0})
    (directory / "peer.json").write_text(json.dumps(cfg, indent=1))
    stderr = open(directory / "peer.stderr", "w", encoding="utf-8")  # noqa: SIM115
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.peers.dlms_server", "--config", str(directory / "peer.json")],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
    )
    stderr.close()
    peer: DlmsPeer | None = None
    try:
        assert process.stdout is not None
        try:
            line = _read_line(
                process.stdout.fileno(), lambda text: text.startswith("READY "), timeout_s, "the DLMS peer"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(directory / 'peer.stderr').read_text()[-3000:]}") from None
        ready = json.loads(line[len("READY ") :])
        peer = DlmsPeer(
            process=process,
            config=cfg,
            control_port=ready["control_port"],
            tcp_port=ready.get("tcp_port"),
            device=str(pty.client_end) if pty is not None else None,
            pty=pty,
            physical_address=int(cfg.get("hdlc", {}).get("physical_address", 17)),
            logical_device=int(cfg.get("logical_device", 1)),
        )
        yield peer
    finally:
        if peer is not None:
            peer.stop()
        else:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            if pty is not None:
                pty.close()


@pytest.fixture
def dlms_peer(tmp_path: Path) -> Iterator[Callable[..., DlmsPeer]]:
    """Factory: ``dlms_peer(transport="tcp"|"hdlc"|"both", **config)`` starts a peer; all stop at teardown."""
    with contextlib.ExitStack() as stack:
        count = 0

        def start(transport: str = "tcp", **config: Any) -> DlmsPeer:
            nonlocal count
            count += 1
            return stack.enter_context(start_dlms_peer(tmp_path / f"dlms-peer-{count}", transport, **config))

        yield start
