"""Shared fixtures: real peers on loopback, temporary installations, a notify socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from peers.dlms_fixture import dlms_peer  # noqa: F401  (the DLMS/COSEM test peer: tests/peers/README.md)

from dcud.runtime.sdnotify import Notifier
from dcud.sim.peers import Mosquitto, start_mosquitto

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free loopback port (CI installs it; missing is a failure, not a skip)."""
    b = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield b
    finally:
        b.stop()


def write_site(
    directory: Path,
    *,
    mqtt_url: str | None = None,
    toml_extra: str = "",
    wme: str = "ntp_interval=600\n",
    device_id: str = "dcu-test",
) -> Path:
    """Write a minimal dcud.toml + wme.conf into ``directory``; returns the dcud.toml path."""
    directory.mkdir(parents=True, exist_ok=True)
    mqtt = f'\n[mqtt]\nurl = "{mqtt_url}"\nstatus_interval_s = 2\nreconnect_max_s = 2\n' if mqtt_url else ""
    config = directory / "dcud.toml"
    config.write_text(
        f'device_id = "{device_id}"\nparameters = "wme.conf"\nstate_dir = "{directory / "state"}"\n'
        f"grace_s = 3\n{toml_extra}{mqtt}"
    )
    (directory / "wme.conf").write_text(wme)
    return config


class NotifySocket:
    """A test NOTIFY_SOCKET: collects the datagrams a daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout_s: float = 20.0) -> list[str]:
        """Wait until a datagram contains ``line``; returns every message so far."""
        deadline = time.monotonic() + timeout_s
        while not any(line in m.splitlines() for m in self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line!r} within {timeout_s} s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        yield ns
    finally:
        ns.close()


def start_daemon(config: Path, notify: NotifySocket | None = None, **env: str) -> subprocess.Popen[bytes]:
    """``python -m dcud run -c config`` as a process, logs to config's directory."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if notify is not None:
        environment["NOTIFY_SOCKET"] = str(notify.path)
    log = (config.parent / "dcud.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(config)],
        stdout=log,
        stderr=log,
        env=environment,
        cwd=REPO,
    )
    log.close()
    return proc


def daemon_log(config: Path) -> str:
    path = config.parent / "dcud.log"
    return path.read_text(errors="replace") if path.exists() else ""


class RecordingNotifier(Notifier):
    """An sd_notify stand-in that records every line instead of sending it."""

    def __init__(self) -> None:
        super().__init__("")
        self.sent: list[str] = []

    def notify(self, *lines: str) -> bool:
        self.sent.extend(lines)
        return True


def make_cert(common_name: str) -> tuple[bytes, bytes]:
    """A self-signed EC certificate for ``common_name`` valid for 127.0.0.1 (SAN), and its key (both PEM)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(san, False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class PtyPeer:
    """The master side of a pty whose slave a port opens; nothing is read unless asked."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.received = bytearray()
        self.closed = False

    def drain(self) -> bytes:
        """Read what the port wrote so far (bounded)."""
        for _ in range(1000):
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self.received += chunk
        return bytes(self.received)

    def send(self, data: bytes) -> None:
        """Bytes for the port to receive."""
        os.write(self.master, data)

    def hang_up(self) -> None:
        """Close the master: the port's reads fail (EIO), like an unplugged adapter."""
        if not self.closed:
            os.close(self.master)
            self.closed = True

    def close(self) -> None:
        """Close both ends."""
        self.hang_up()
        os.close(self.slave)


def _unshare_argv(user_ns: bool) -> list[str]:
    """``unshare`` for a network namespace: as root plainly, else (or on request) in a user namespace."""
    unshare = shutil.which("unshare")
    assert unshare, "needs util-linux unshare (scripts/test.sh installs it)"
    if user_ns or os.geteuid() != 0:
        return [unshare, "--map-root-user", "--net"]
    return [unshare, "--net"]


def netns_problem(user_ns: bool) -> str:
    """Why this process cannot make the network namespace the test needs ("" when it can).

    Tried, not guessed: ``unshare ... true`` is run once. Without ``user_ns`` the test needs real root
    (CAP_SYS_ADMIN to create the namespace, CAP_NET_ADMIN inside it for sysctls such as
    ``ping_group_range``); with it, a user namespace of its own, which any user may create unless the
    kernel forbids unprivileged user namespaces or the process runs in a chroot.
    """
    if not user_ns and os.geteuid() != 0:
        return (
            "needs root (CAP_SYS_ADMIN to create a network namespace, CAP_NET_ADMIN to set its "
            "ping_group_range); this user is not root"
        )
    if shutil.which("unshare") is None:
        return "needs util-linux `unshare`, which is not installed (scripts/test.sh installs it)"
    argv = _unshare_argv(user_ns)
    try:
        result = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(argv[1:])}` could not run here: {exc}"
    if result.returncode == 0:
        return ""
    said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
    if user_ns:
        return (
            f"`unshare --map-root-user --net` failed here ({said}): the kernel refuses a user "
            "namespace to this process (sysctl kernel.unprivileged_userns_clone=0, a chroot, or a "
            "container without user namespaces)"
        )
    return f"`unshare --net` failed here ({said}): this root lacks CAP_SYS_ADMIN (a container?)"


def _netns_mark(user_ns: bool) -> pytest.MarkDecorator:
    problem = "" if os.environ.get("CI") else netns_problem(user_ns)
    how = (
        "; to run it: as root on a machine or VM (not a chroot), e.g. `sudo .venv/bin/python -m pytest "
        "tests/test_watchdog.py tests/test_can_loop_read.py tests/test_bridge.py -k 'namespace or "
        "loop_reader or vanished'`. With CI set this is a failure, not a skip."
    )
    return pytest.mark.skipif(bool(problem), reason=f"network namespace test: {problem}{how}")


needs_netns = _netns_mark(user_ns=False)
"""For tests that run as root in a network namespace of their own (:func:`run_in_own_netns`)."""

needs_user_netns = _netns_mark(user_ns=True)
"""For tests that run in a user and network namespace of their own (``user_ns=True``): any user."""


def run_in_own_netns(
    script: str, setup: Sequence[str] = (), timeout_s: float = 60.0, *, user_ns: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run python ``script`` in a network namespace of our own (``unshare --net``, from the repository).

    ``setup``: shell commands run inside it first, ``{ip}`` standing for iproute2's ``ip``. Nothing in
    the namespace reaches the host's network, so multicast and raw sockets stay inside the test.
    ``user_ns``: inside a user namespace of its own too (``--map-root-user``), which needs no root.
    """
    ip = shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert ip, "needs iproute2 ip (scripts/test.sh installs it)"
    commands = "".join(f"{command.format(ip=ip)} && " for command in setup)
    return subprocess.run(
        [*_unshare_argv(user_ns), "sh", "-c", f'{commands}exec {sys.executable} -c "$0"', script],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO,
    )
