"""Transparent-port round-trip latency: dcud vs ser2net (chardelay: false) vs socat, same harness, one run.

Harness per bridge: a TCP client (this process, blocking socket, TCP_NODELAY) -> the bridge on
127.0.0.1 -> a pty pair (``os.openpty``: the bridge opens the slave at 115200 8N1) -> an echo device
(its own process, blocking read/write on the pty master). Every frame carries a sequence number and
random bytes covering all 256 values; the echo must come back byte for byte (``lost``/``reordered``
count the frames that did not).

- dcud runs as the real daemon (``python -m dcud run``, uvloop) with the line as its primary transparent
  line (``tm.tls_enable=0``, defaults otherwise: IEC awareness, leases, audit on);
- ser2net 4 (``chardelay: false``, ``tcp(nodelay)``), socat (``TCP-LISTEN,nodelay`` to ``FILE:...,raw``);
- ``relay``: a reference floor, not a contender: a bare uvloop relay in Python (``--relay``) with none of
  dcud's session features; it is measured in the same blocks and left out of the ratios.

Groups (one JSON line each): ``bridge_latency`` per bridge and frame size (p50/p99 in microseconds, the
p50 of each trial, and the bridge process's CPU time per round trip from schedstat, which a busy machine
disturbs far less than latency), ``bridge_latency_ratio`` per frame size (dcud over the better of
ser2net and socat; targets 1.1 / 1.5; also the p50 ratio of each trial), and ``bridge_idle_sessions``
per bridge: RSS and CPU of 20 idle sessions held on 20 other ports (dcud: one process with 20
transparent-port services; ser2net: one process, 20 connections; socat: one process per port).
Bounded: ``BENCH_TRIALS`` trials (every process started afresh) of ``BENCH_ROUNDS`` frames per bridge
and size, pooled; ``BENCH_IDLE_S`` of idle measurement.

Run: ``python bench/bench_bridge.py`` (needs ser2net and socat: ``apt-get install ser2net socat``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3000"))
TRIALS = int(os.environ.get("BENCH_TRIALS", "3"))
"""Independent trials (every bridge and echo device started afresh): a run's result is the pooled
ROUNDS x TRIALS round trips, so that where the scheduler happened to put the processes in one trial
(same vCPU as their echo device or not) does not decide the ratio alone."""
WARMUP = int(os.environ.get("BENCH_WARMUP", "300"))
SIZES = (64, 1024)
BAUD = 115200
IDLE_SESSIONS = int(os.environ.get("BENCH_IDLE_SESSIONS", "20"))
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "10"))
BLOCK = 100
ROUND_TIMEOUT_S = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


# -- processes and /proc -------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """CPU time of every thread of ``pid``: from schedstat (nanoseconds), else from stat (clock ticks,
    10 ms steps: too coarse for tens of microseconds per round trip)."""
    try:
        return (
            sum(
                int((task / "schedstat").read_text().split()[0])
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            / 1e9
        )
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def program(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise SystemExit(f"{name} is not installed: apt-get install {name}")
    return found


# -- the echo device -------------------------------------------------------------------------------


def echo_main() -> None:
    """``--echo``: open a pty, print the slave's path, echo everything on the master until killed."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    print(os.ttyname(slave), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            time.sleep(0.001)  # no slave open yet (EIO): the bridge has not opened the line
            continue
        view = memoryview(data)
        while view:
            view = view[os.write(master, view) :]


def relay_main(port: int, tty_path: str) -> None:
    """``--relay PORT TTY``: the reference floor, a bare uvloop relay of one TCP client to one tty.

    No sniffer, no leases, no backpressure model, no accounting: what any Python bridge costs at the
    least on this machine. Reported beside the others (never in the ratio) so that the part of dcud's
    latency that is its own features can be told from the part that is Python and the event loop.
    """
    import asyncio

    import uvloop

    fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    loop = uvloop.new_event_loop()

    class Relay(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.add_reader(fd, lambda: self.transport.write(os.read(fd, 65536)))

        def data_received(self, data: bytes) -> None:
            os.write(fd, data)  # a bench: a full pty would raise here, which is fine for 1 KiB frames

        def connection_lost(self, exc: Exception | None) -> None:
            loop.remove_reader(fd)

    loop.run_until_complete(loop.create_server(Relay, "127.0.0.1", port))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    loop.run_forever()


@contextlib.contextmanager
def echo_device() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, __file__, "--echo"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().decode().strip()
    finally:
        stop(proc)  # type: ignore[arg-type]


# -- the bridges -------------------------------------------------------------------------------------


def start_dcud(workdir: Path, tty_path: str, port: int, tree: Path = REPO) -> subprocess.Popen[bytes]:
    """The daemon from source tree ``tree`` (this repository, or a BENCH_COMPARE tree)."""
    workdir = workdir if tree == REPO else workdir / f"dcud-{tree.name}"
    site = workdir / "dcud-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "wme.conf").write_text(
        f"tm_server_port={port}\ntm2.port={free_port()}\ntm.tls_enable=0\ntm.baud={BAUD}\n"
        f"fw_server_port={free_port()}\n"
    )
    (site / "dcud.toml").write_text(
        f'device_id = "bench"\nparameters = "wme.conf"\nstate_dir = "{site / "state"}"\n'
        f'[transparent]\nlisten = "loopback"\n'
        f'[[line]]\nname = "bench"\ndevice = "{tty_path}"\nkind = "rs232"\nbaud = {BAUD}\n'
        f'framing = "8N1"\ntransparent = "primary"\n'
    )
    log = (workdir / "dcud.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "dcud", "run", "-c", str(site / "dcud.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tree,  # ``python -m dcud`` runs the tree it is started in
    )


def ser2net_yaml(connections: list[tuple[int, str]]) -> str:
    text = "%YAML 1.1\n---\n"
    for i, (port, tty_path) in enumerate(connections):
        text += (
            f"connection: &c{i}\n"
            f"  accepter: tcp(nodelay),127.0.0.1,{port}\n"
            f"  connector: serialdev,{tty_path},{BAUD}n81,local\n"
            "  options:\n    chardelay: false\n    kickolduser: true\n"
        )
    return text


def start_ser2net(workdir: Path, connections: list[tuple[int, str]]) -> subprocess.Popen[bytes]:
    config = workdir / f"ser2net-{connections[0][0]}.yaml"
    config.write_text(ser2net_yaml(connections))
    log = (workdir / "ser2net.log").open("wb")
    return subprocess.Popen(
        [program("ser2net"), "-n", "-c", str(config), "-P", str(workdir / "ser2net.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def start_socat(tty_path: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            program("socat"),
            f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,nodelay",
            f"FILE:{tty_path},raw,echo=0,b{BAUD}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# -- the client ----------------------------------------------------------------------------------------


def frames(size: int, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    pool = bytes(range(256)) * (size // 256 + 2) + rng.randbytes(size)
    out = []
    for seq in range(count):
        start = rng.randrange(0, len(pool) - size)
        body = bytearray(pool[start : start + size])
        body[:4] = seq.to_bytes(4, "big")
        out.append(bytes(body))
    return out


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def round_trip(sock: socket.socket, frame: bytes) -> tuple[float, str]:
    """One frame out and back: (microseconds, "ok" | "lost" | "reordered")."""
    started = time.perf_counter_ns()
    sock.sendall(frame)
    try:
        echoed = recv_exactly(sock, len(frame))
    except (TimeoutError, ConnectionError):
        return (time.perf_counter_ns() - started) / 1000.0, "lost"
    elapsed = (time.perf_counter_ns() - started) / 1000.0
    if echoed == frame:
        return elapsed, "ok"
    return elapsed, "reordered" if sorted(echoed) == sorted(frame) else "lost"


def summary(samples: list[float], lost: int, reordered: int, cpu_s_total: float) -> dict[str, object]:
    ordered = sorted(samples)
    return {
        "cpu_us_per_round_trip": round(cpu_s_total * 1e6 / len(ordered), 1) if ordered else None,
        "rounds": len(ordered),
        "p50_us": round(statistics.median(ordered), 1) if ordered else None,
        "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1) if ordered else None,
        "mean_us": round(statistics.fmean(ordered), 1) if ordered else None,
        "lost": lost,
        "reordered": reordered,
    }


class Tally:
    """One bridge's raw results for one frame size, pooled over the trials."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.lost = 0
        self.reordered = 0
        self.cpu_s = 0.0
        self.trial_p50_us: list[float] = []

    def summary(self) -> dict[str, object]:
        return summary(self.samples, self.lost, self.reordered, self.cpu_s)


def measure_interleaved(
    socks: dict[str, socket.socket],
    size: int,
    pids: dict[str, int],
    tallies: dict[str, Tally],
    rng: random.Random,
) -> None:
    """WARMUP + ROUNDS frames per bridge in blocks of BLOCK, the bridges taken in turn, so that whatever
    else the machine does at the time hits every bridge alike; added to ``tallies``.

    The order is shuffled for every block. A rotation (each block starting one bridge later) keeps every
    bridge behind the same neighbour, and the bridge that follows a heavy one (ser2net at 1 KiB spends
    4x the CPU of the others) finds the vCPUs awake: measured, socat behind ser2net came out 6-13 % faster
    at 1 KiB than with the order shuffled, which flattered socat against every other bridge.
    """
    names = list(socks)
    stream = frames(size, WARMUP + ROUNDS, seed=size)
    samples: dict[str, list[float]] = {n: [] for n in names}
    bad: dict[str, dict[str, int]] = {n: {"lost": 0, "reordered": 0} for n in names}
    broken: set[str] = set()
    cpu = dict.fromkeys(names, 0.0)
    for start in range(0, len(stream), BLOCK):
        order = rng.sample(names, len(names))
        for name in order:
            if name in broken:
                continue
            measured = start >= WARMUP
            cpu_before = cpu_s(pids[name]) if measured else 0.0
            for index in range(start, min(start + BLOCK, len(stream))):
                elapsed, verdict = round_trip(socks[name], stream[index])
                if verdict != "ok":
                    bad[name][verdict] += 1
                    if verdict == "lost":
                        broken.add(name)  # out of step from here on: stop measuring this bridge
                        break
                if index >= WARMUP:
                    samples[name].append(elapsed)
            if measured:
                cpu[name] += cpu_s(pids[name]) - cpu_before
    for name in names:
        tally = tallies.setdefault(name, Tally())
        tally.samples += samples[name]
        tally.lost += bad[name]["lost"]
        tally.reordered += bad[name]["reordered"]
        tally.cpu_s += cpu[name]
        if samples[name]:
            tally.trial_p50_us.append(round(statistics.median(samples[name]), 1))


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=ROUND_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- idle sessions ------------------------------------------------------------------------------------


def multi_main(count: int) -> None:
    """``--dcud-multi N``: N ptys, N lines and N transparent-port services in one dcud process."""
    import asyncio

    from dcud.config.model import LineConfig
    from dcud.runtime.bus import EventBus
    from dcud.runtime.supervisor import Supervisor
    from dcud.service.bridge import BridgeConfig, BridgeService, SessionPolicy
    from dcud.service.line import LineRegistry, LineService, LineServiceConfig

    async def serve() -> None:
        lines = LineRegistry()
        bus = EventBus()
        services: list[object] = []
        bridges: list[BridgeService] = []
        keep = []
        for i in range(count):
            master, slave = os.openpty()
            tty.setraw(master)
            keep.append((master, slave))
            line = LineConfig(name=f"l{i}", device=os.ttyname(slave), kind="rs232", baud=BAUD, framing="8N1")
            config = BridgeConfig(port_name=f"p{i}", line=line, port=0, baud=BAUD, policy=SessionPolicy())
            bridge = BridgeService(config, lines, bus)
            bridges.append(bridge)
            services += [LineService(LineServiceConfig(line), lines, bus), bridge]
        supervisor = Supervisor(services)  # type: ignore[arg-type]
        task = asyncio.create_task(supervisor.run())
        for _ in range(200):
            if all(b.bound_port for b in bridges):
                break
            await asyncio.sleep(0.05)
        print(json.dumps([b.bound_port for b in bridges]), flush=True)
        stop_event = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop_event.set)
        await stop_event.wait()
        supervisor.request_stop()
        await task

    import uvloop

    uvloop.run(serve())


def idle_cost(name: str, pids: Callable[[], list[int]], ports: list[int], echoed: bool) -> dict[str, object]:
    """RSS and CPU of the bridge process(es) while IDLE_SESSIONS idle sessions are connected."""
    time.sleep(1.0)
    rss_before = sum(rss_kib(p) for p in pids())
    clients = []
    for port in ports:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"\x00")  # one byte: the session is really up and bridged
        if echoed:
            recv_exactly(sock, 1)
        clients.append(sock)
    time.sleep(1.0)
    cpu_before = sum(cpu_s(p) for p in pids())
    time.sleep(IDLE_S)
    cpu_after = sum(cpu_s(p) for p in pids())
    rss_after = sum(rss_kib(p) for p in pids())
    for sock in clients:
        sock.close()
    return {
        "bench": "bridge_idle_sessions",
        "bridge": name,
        "sessions": len(ports),
        "processes": len(pids()),
        "idle_s": IDLE_S,
        "rss_kib": rss_after,
        "rss_delta_kib": rss_after - rss_before,
        "cpu_ms_per_s": round((cpu_after - cpu_before) * 1000 / IDLE_S, 3),
    }


def echo_ptys(count: int) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, paths = [], []
    for _ in range(count):
        proc = subprocess.Popen([sys.executable, __file__, "--echo"], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        paths.append(proc.stdout.readline().decode().strip())
        procs.append(proc)
    return procs, paths


def run_idle(workdir: Path) -> None:
    """``bridge_idle_sessions`` for dcud, ser2net and socat."""
    n = IDLE_SESSIONS
    # dcud: one process serving n transparent ports on ptys of its own (nothing answers the probe).
    proc = subprocess.Popen(
        [sys.executable, __file__, "--dcud-multi", str(n)], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        line = b""
        for _ in range(1000):  # skip the service's log lines up to the port list
            line = proc.stdout.readline()
            if line.startswith(b"[") or not line:
                break
        ports = json.loads(line)
        print(json.dumps(idle_cost("dcud", lambda: [proc.pid], ports, echoed=False)), flush=True)
    finally:
        stop(proc)
    echoes, paths = echo_ptys(n)
    try:
        ports = [free_port() for _ in range(n)]
        s2n = start_ser2net(workdir, list(zip(ports, paths, strict=True)))
        try:
            wait_port_quiet(ports[0], s2n)
            print(json.dumps(idle_cost("ser2net", lambda: [s2n.pid], ports, echoed=True)), flush=True)
        finally:
            stop(s2n)
        ports = [free_port() for _ in range(n)]
        socats = [start_socat(path, port) for path, port in zip(paths, ports, strict=True)]
        try:
            for port, sp in zip(ports, socats, strict=True):
                wait_port_quiet(port, sp)
            pids = [s.pid for s in socats]
            print(json.dumps(idle_cost("socat", lambda: pids, ports, echoed=True)), flush=True)
        finally:
            for sp in socats:
                stop(sp)
    finally:
        for echo in echoes:
            stop(echo)


def wait_port_quiet(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """Wait until ``port`` listens, without connecting (a socat without fork serves one connection)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bridge exited with {proc.returncode}")
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False)
        if f":{port}" in out.stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# -- main ------------------------------------------------------------------------------------------


STARTERS: dict[str, Callable[[Path, str, int], subprocess.Popen[bytes]]] = {
    "dcud": start_dcud,
    "ser2net": lambda w, t, p: start_ser2net(w, [(p, t)]),
    "socat": lambda _w, t, p: start_socat(t, p),
    "relay": lambda _w, t, p: subprocess.Popen([sys.executable, __file__, "--relay", str(p), t]),
}


def compare_trees() -> dict[str, Path]:
    """``BENCH_COMPARE="before=/tmp/a,partA=/tmp/b"``: other dcud source trees (``git archive`` of a
    commit) measured in the same blocks as ``dcud``, so that versions are compared side by side in one
    run (same machine noise); reported as ``dcud@<name>`` and left out of the ratios."""
    trees: dict[str, Path] = {}
    for item in filter(None, os.environ.get("BENCH_COMPARE", "").split(",")):
        name, _, path = item.partition("=")
        trees[f"dcud@{name}"] = Path(path).resolve()
    return trees


def _starter_of(tree: Path) -> Callable[[Path, str, int], subprocess.Popen[bytes]]:
    return lambda w, t, p: start_dcud(w, t, p, tree)


for _name, _tree in compare_trees().items():
    STARTERS[_name] = _starter_of(_tree)


def ratio_line(size: int, tallies: dict[str, Tally]) -> dict[str, object]:
    """dcud over the better of ser2net and socat, for one frame size (pooled trials, and per trial)."""
    group = {name: tally.summary() for name, tally in tallies.items()}

    def value(result: dict[str, object], key: str) -> float:
        number = result[key]
        return float(number) if isinstance(number, (int, float)) else float("inf")

    dcud = group["dcud"]
    others = {name: group[name] for name in ("ser2net", "socat")}
    best_p50 = min(others, key=lambda n: value(others[n], "p50_us"))
    best_p99 = min(others, key=lambda n: value(others[n], "p99_us"))
    p50_ratio = value(dcud, "p50_us") / value(others[best_p50], "p50_us")
    p99_ratio = value(dcud, "p99_us") / value(others[best_p99], "p99_us")
    return {
        "bench": "bridge_latency_ratio",
        "frame_bytes": size,
        "dcud_p50_us": dcud["p50_us"],
        "dcud_p99_us": dcud["p99_us"],
        "best_p50": best_p50,
        "best_p99": best_p99,
        "p50_ratio": round(p50_ratio, 3),
        "p99_ratio": round(p99_ratio, 3),
        "ratios": {
            name: {
                "p50": round(value(dcud, "p50_us") / value(r, "p50_us"), 3),
                "p99": round(value(dcud, "p99_us") / value(r, "p99_us"), 3),
            }
            for name, r in others.items()
        },
        "target_p50": 1.1,
        "target_p99": 1.5,
        "meets_target": p50_ratio <= 1.1 and p99_ratio <= 1.5,
        "lost": sum(int(str(r["lost"])) for r in group.values()),
        "reordered": sum(int(str(r["reordered"])) for r in group.values()),
        "cpu_ratio": {
            name: round(value(dcud, "cpu_us_per_round_trip") / value(r, "cpu_us_per_round_trip"), 3)
            for name, r in others.items()
        },
        "trial_p50_ratios": [
            round(d / min(others_p50), 3)
            for d, *others_p50 in zip(
                tallies["dcud"].trial_p50_us,
                tallies["ser2net"].trial_p50_us,
                tallies["socat"].trial_p50_us,
                strict=False,
            )
        ],
        "relay_p50_us": group["relay"]["p50_us"] if "relay" in group else None,
        # Issue 17: dcud's CPU per round trip over the bare relay's (target 1.15).
        "cpu_ratio_relay": round(
            value(dcud, "cpu_us_per_round_trip") / value(group["relay"], "cpu_us_per_round_trip"), 3
        )
        if "relay" in group
        else None,
        "target_cpu_ratio_relay": 1.15,
        "load_avg_1m": os.getloadavg()[0],
    }


def side_by_side(size: int, tallies: dict[str, Tally]) -> dict[str, object]:
    """Every dcud version's CPU per round trip over the relay's, and its p50 over the better of ser2net
    and socat, from the same blocks (``BENCH_COMPARE``)."""
    group = {name: tally.summary() for name, tally in tallies.items()}
    relay_cpu = float(str(group["relay"]["cpu_us_per_round_trip"]))
    best_p50 = min(float(str(group[n]["p50_us"])) for n in ("ser2net", "socat"))
    best_p99 = min(float(str(group[n]["p99_us"])) for n in ("ser2net", "socat"))
    return {
        "bench": "bridge_side_by_side",
        "frame_bytes": size,
        "cpu_ratio_relay": {
            name: round(float(str(r["cpu_us_per_round_trip"])) / relay_cpu, 3)
            for name, r in group.items()
            if name.startswith("dcud")
        },
        "p50_ratio": {
            name: round(float(str(r["p50_us"])) / best_p50, 3)
            for name, r in group.items()
            if name.startswith("dcud")
        },
        "p99_ratio": {
            name: round(float(str(r["p99_us"])) / best_p99, 3)
            for name, r in group.items()
            if name.startswith("dcud")
        },
        "load_avg_1m": os.getloadavg()[0],
    }


def trial(tallies: dict[int, dict[str, Tally]], rng: random.Random) -> None:
    """Start every bridge (each with its own echo device), measure both frame sizes, stop them."""
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, starter in STARTERS.items():
            tty_path = stack.enter_context(echo_device())
            ports[name] = free_port()
            proc = starter(workdir, tty_path, ports[name])
            pids[name] = proc.pid
            stack.callback(stop, proc)
            try:
                wait_port_quiet(ports[name], proc)
            except RuntimeError as exc:  # say why (a dcud that exits 78 names the bad key in its log)
                logs = sorted(workdir.rglob("dcud.log"))
                tails = "".join(f"\n{log}:\n" + log.read_text(errors="replace")[-2000:] for log in logs)
                raise RuntimeError(f"{name}: {exc}{tails}") from exc
        time.sleep(1.0)
        socks = {name: connect(port) for name, port in ports.items()}
        for size in SIZES:
            measure_interleaved(socks, size, pids, tallies.setdefault(size, {}), rng)
        for sock in socks.values():
            sock.close()


def main() -> None:
    tallies: dict[int, dict[str, Tally]] = {}
    rng = random.Random(62056)  # the block orders: shuffled, and the same in every run
    for _ in range(TRIALS):
        trial(tallies, rng)
    for size in SIZES:
        for name, tally in tallies[size].items():
            line = {"bench": "bridge_latency", "bridge": name, "frame_bytes": size, **tally.summary()}
            print(json.dumps({**line, "trial_p50_us": tally.trial_p50_us}))
        print(json.dumps(ratio_line(size, tallies[size])), flush=True)
        if compare_trees():
            print(json.dumps(side_by_side(size, tallies[size])), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-bridge-idle-") as tmp:
        run_idle(Path(tmp))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--echo"]:
        echo_main()
    elif sys.argv[1:2] == ["--relay"]:
        relay_main(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1:2] == ["--dcud-multi"]:
        multi_main(int(sys.argv[2]))
    else:
        main()
