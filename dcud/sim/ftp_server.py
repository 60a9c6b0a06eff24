"""A real FTP server (pyftpdlib) on loopback for the data push tests, the demo and the benchmark.

Run as a process: ``python -m dcud.sim.ftp_server --root DIR --port N [--user U --password P]
[--control FILE] [--log FILE] [--tls-cert PEM --tls-key PEM]``. :func:`start_ftp_server` does that and
returns an :class:`FtpPeer` with the knobs the tests need:

- ``set_mode("ok")``: a normal server;
- ``set_mode("refuse_login")``: every login is answered 530;
- ``set_mode("stall", stall_after_bytes=N)``: an upload stops being read after N bytes and is never
  answered (the client sees a transfer that hangs mid-way; the partial file stays);
- ``set_mode("ok", rate_bytes_per_s=R)``: uploads are read at most R bytes per second (slow link);
- ``stop()`` / ``start()``: the server is down (connection refused) / back on the same port.

The control file (JSON) is re-read for every connection and every upload, so a mode change applies to
the next one. Every connection, login, upload, rename and deletion is appended to the log file as a JSON
line (``events()``), which is how tests count attempts without measuring time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcud.sim.peers import free_port, wait_for_tcp

__all__ = ["FtpPeer", "main", "start_ftp_server"]


# ------------------------------------------------------------------------------------ server process


def _serve(args: argparse.Namespace) -> None:
    from pyftpdlib.authorizers import AuthenticationFailed, DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
    from pyftpdlib.servers import FTPServer

    control_path = Path(args.control) if args.control else None
    log_path = Path(args.log) if args.log else None

    def control() -> dict[str, Any]:
        if control_path is None:
            return {}
        try:
            data = json.loads(control_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def record(event: str, **fields: Any) -> None:
        if log_path is None:
            return
        line = json.dumps({"event": event, "mono": time.monotonic(), "wall": time.time(), **fields})
        with log_path.open("a") as fh:
            fh.write(line + "\n")

    class Authorizer(DummyAuthorizer):  # type: ignore[misc]
        def validate_authentication(self, username: str, password: str, handler: Any) -> None:
            if control().get("mode") == "refuse_login":
                record("login_refused", user=username)
                raise AuthenticationFailed("login refused (test knob)")
            super().validate_authentication(username, password, handler)

    dtp_base: Any = ThrottledDTPHandler  # the rate knob; TLS data connections need the TLS handler
    if args.tls_cert:
        from pyftpdlib.handlers import TLS_DTPHandler

        dtp_base = TLS_DTPHandler

    class SimDTP(dtp_base):  # type: ignore[misc]
        def __init__(self, sock: Any, cmd_channel: Any) -> None:
            ctl = control()
            self.read_limit = int(ctl.get("rate_bytes_per_s", 0) or 0)
            self._stall_after = int(ctl.get("stall_after_bytes", 0)) if ctl.get("mode") == "stall" else None
            self._stalled = False
            super().__init__(sock, cmd_channel)
            if self._stall_after is not None:  # read in small chunks so the stall point is exact
                size: int = int(getattr(self, "ac_in_buffer_size", 65536))
                self.ac_in_buffer_size = max(1, min(size, self._stall_after))

        def handle_read(self) -> None:
            if self._stall_after is not None and self.tot_bytes_received >= self._stall_after:
                if not self._stalled:
                    self._stalled = True
                    with contextlib.suppress(Exception):
                        self.file_obj.flush()
                    record("stall", bytes=self.tot_bytes_received)
                    self.del_channel()  # never read again, never answer: the transfer hangs
                return
            super().handle_read()

        handle_read_event = handle_read  # the base class binds its own handle_read under this name

    base: Any = FTPHandler
    if args.tls_cert:
        from pyftpdlib.handlers import TLS_FTPHandler

        base = TLS_FTPHandler

    class Handler(base):  # type: ignore[misc]
        dtp_handler = SimDTP
        auth_failed_timeout = 0.05  # pyftpdlib delays a 530 by 3 s by default; tests count, not wait
        passive_ports = None
        permit_foreign_addresses = False

        def on_connect(self) -> None:
            record("connect", peer=self.remote_ip)

        def on_login(self, username: str) -> None:
            record("login", user=username)

        def on_login_failed(self, username: str, password: str) -> None:
            record("login_failed", user=username)

        def ftp_STOR(self, file: str, mode: str = "w") -> Any:  # noqa: N802 (pyftpdlib names)
            record("stor", name=os.path.basename(file))
            return super().ftp_STOR(file, mode)

        def on_file_received(self, file: str) -> None:
            record("received", name=os.path.basename(file), bytes=os.path.getsize(file))

        def on_incomplete_file_received(self, file: str) -> None:
            record("incomplete", name=os.path.basename(file))

        def ftp_RNTO(self, path: str) -> Any:  # noqa: N802
            source = self._rnfr
            result = super().ftp_RNTO(path)
            record("rename", source=os.path.basename(source or ""), target=os.path.basename(path))
            return result

        def ftp_DELE(self, path: str) -> Any:  # noqa: N802
            record("dele", name=os.path.basename(path), existed=os.path.exists(path))
            return super().ftp_DELE(path)

    if args.tls_cert:
        Handler.certfile = args.tls_cert
        Handler.keyfile = args.tls_key
        Handler.tls_control_required = False
        Handler.tls_data_required = False

    authorizer = Authorizer()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    authorizer.add_user(args.user, args.password, str(root), perm="elradfmwMT")
    Handler.authorizer = authorizer
    Handler.banner = "dcud sim FTP server ready"
    server = FTPServer(("127.0.0.1", args.port), Handler)
    server.max_cons = 64

    def stop(_signum: int, _frame: object) -> None:
        server.close_all()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever(timeout=0.2, handle_exit=True)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point of the simulated FTP server."""
    parser = argparse.ArgumentParser(prog="python -m dcud.sim.ftp_server", description=__doc__)
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="dcu")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--control", default="")
    parser.add_argument("--log", default="")
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    _serve(parser.parse_args(argv))


# ----------------------------------------------------------------------------------- test-side API


@dataclass
class FtpPeer:
    """A simulated FTP server process and its knobs (module doc)."""

    workdir: Path
    port: int
    user: str = "dcu"
    password: str = "secret"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        """The directory the FTP user sees as ``/``."""
        return self.workdir / "root"

    @property
    def control_path(self) -> Path:
        """The JSON control file."""
        return self.workdir / "control.json"

    @property
    def log_path(self) -> Path:
        """The JSON-lines event log."""
        return self.workdir / "events.jsonl"

    def url(self, path: str = "", scheme: str = "ftp") -> str:
        """``ftp://user:password@127.0.0.1:port/path``."""
        return f"{scheme}://{self.user}:{self.password}@127.0.0.1:{self.port}{path}"

    def set_mode(self, mode: str = "ok", **knobs: Any) -> None:
        """Change the behaviour for the next connection/upload (module doc)."""
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mode": mode, **knobs}))
        os.replace(tmp, self.control_path)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The logged events so far (optionally only one ``event`` kind)."""
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if kind is None or event.get("event") == kind:
                    out.append(event)
        return out

    def start(self) -> None:
        """Start (or restart) the server process; ready when this returns."""
        if self.process is not None and self.process.poll() is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.control_path.exists():
            self.set_mode("ok")
        command = [
            sys.executable,
            "-m",
            "dcud.sim.ftp_server",
            "--root",
            str(self.root),
            "--port",
            str(self.port),
            "--user",
            self.user,
            "--password",
            self.password,
            "--control",
            str(self.control_path),
            "--log",
            str(self.log_path),
        ]
        if self.tls_cert is not None and self.tls_key is not None:
            command += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        log = (self.workdir / "server.log").open("ab")
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        log.close()
        try:
            wait_for_tcp(self.port, timeout_s=15.0)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (connections are refused until :meth:`start`)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def start_ftp_server(
    workdir: Path,
    port: int | None = None,
    *,
    user: str = "dcu",
    password: str = "secret",
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> FtpPeer:
    """Start a simulated FTP server on 127.0.0.1 (a free port unless given); ready when this returns."""
    workdir.mkdir(parents=True, exist_ok=True)
    peer = FtpPeer(workdir, port or free_port(), user, password, tls_cert, tls_key)
    peer.start()
    return peer


if __name__ == "__main__":
    main()
