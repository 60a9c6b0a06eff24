"""CPU, RSS and state latency of `dcud run` with 8 CANopen drives sending TPDOs every 10 ms.

Set-up per run: a local Mosquitto; a CAN bus; the CiA 402 simulator with 8 nodes in *this* process
(threads), each sending TPDO1 (statusword, position) every 10 ms -- and TPDO2 (velocity, error code,
mode) too with ``BENCH_TPDOS_PER_CYCLE=2`` -- plus a 100 ms heartbeat; ``python -m dcud run`` as a
separate process, as systemd would run it. All drives are enabled over MQTT (the axes move, so the
position changes in every TPDO).

Two CAN transports (this machine has no vcan module, so no socketcan):

- ``udp_multicast`` inside a private network namespace (``unshare -n``; needs root and msgpack): one
  datagram per frame, read by dcud's event loop like socketcan is on the DCU -- the figure for the
  README's claim;
- ``serial`` (python-can's binary framing) over a socat pty pair: the cross-process transport of the
  tests; python-can parses it byte by byte in a reader thread, which dominates the CPU figure.

Measured over ``BENCH_WINDOW_S`` (default 30 s), for the dcud process only (``/proc/<pid>``): CPU in %
of one core (total, event-loop thread, CAN reader thread), RSS; latency from a TPDO on the bus to the
MQTT state message (every 0.5 s the simulator toggles the warning bit of one drive; from the first
TPDO carrying the new statusword, stamped by the simulator, to the state message showing it, both on
this process's monotonic clock, broker hop included); state messages per drive per second against
TPDOs per drive per second. Targets (issue 17): at most 2.5 % of a core; state messages within 50 ms of
the change, at a bounded rate. Prints one JSON line.

The floor, in the same run and the same window (udp_multicast only): bare receivers of the same frames
from the same interface that do nothing else, each a process of its own on uvloop like dcud, reading
every waiting frame per wake-up of the event loop:

- ``python_can``: python-can's udp_multicast bus, read the way dcud reads it (``_recv_internal``);
- ``socket``: the same bus's socket read directly (``recv`` and msgpack, no ``can.Message``): what any
  reader of this interface pays at the least.

Options (environment): ``BENCH_DCUD_SRC`` runs ``dcud run`` from another checkout (a before/after
comparison in one session: the simulator and the floor stay this tree's); ``BENCH_PYSPY=DIR`` samples
the dcud process with py-spy during the window (``--nonblocking``, raw collapsed stacks into DIR; a
profiling run, not a measuring one); ``BENCH_FLOOR=0`` leaves the floor out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from dcud.sim.drive_can import CanDriveSimulator, SimOptions
from dcud.sim.peers import find_program, start_mosquitto

DRIVES = int(os.environ.get("BENCH_DRIVES", "8"))
TPDO_MS = float(os.environ.get("BENCH_TPDO_MS", "10"))
TPDOS_PER_CYCLE = int(os.environ.get("BENCH_TPDOS_PER_CYCLE", "1"))
WINDOW_S = float(os.environ.get("BENCH_WINDOW_S", "30"))
INTERFACES = os.environ.get("BENCH_INTERFACES", "udp_multicast,serial").split(",")
DCUD_SRC = os.environ.get("BENCH_DCUD_SRC", "")
PYSPY_DIR = os.environ.get("BENCH_PYSPY", "")
FLOOR = os.environ.get("BENCH_FLOOR", "1") != "0"
FLOOR_KINDS = ("python_can", "socket")
TARGET_CPU_PCT = 2.5
MULTICAST_GROUP = "239.74.163.2"
TOGGLE_S = 0.5
PREFIX = "dcu/bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds per thread of ``pid`` (tid -> s); the main thread (the event loop) has tid == pid."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def wakeups(pid: int) -> int:
    """Voluntary context switches of ``pid``'s main thread (the event loop): about one per wake-up."""
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def site_toml(site: Path, interface: str, channel: str, broker_url: str) -> str:
    options = "options = { sleep_after_open = 0 }\n" if interface == "slcan" else ""
    drives = "".join(
        f'\n[[drive]]\nname = "axis-{n}"\nbus = "can0"\nprotocol = "canopen"\nnode_id = {n}\n'
        "commands = true\n"
        for n in range(1, DRIVES + 1)
    )
    return (
        f'device_id = "bench"\nparameters = "wme.conf"\nstate_dir = "{site / "state"}"\n'
        'log_level = "warning"\n'
        f'\n[mqtt]\nurl = "{broker_url}"\n'
        f'\n[[can]]\nname = "can0"\ninterface = "{interface}"\nchannel = "{channel}"\n{options}{drives}'
    )


class Socat:
    def __init__(self, a: Path, b: Path) -> None:
        self.proc = subprocess.Popen(
            [find_program("socat", "socat"), f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(250):
            if a.exists() and b.exists():
                return
            time.sleep(0.02)
        raise RuntimeError("socat did not create its ptys")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def floor_main(kind: str, channel: str) -> None:
    """A bare receiver (module docstring): counts frames until SIGTERM, then prints the count."""
    import signal

    import can
    import msgpack
    import uvloop

    bus: Any = can.Bus(interface="udp_multicast", channel=channel)
    frames = 0

    def read_python_can() -> None:
        nonlocal frames
        for _ in range(256):
            msg, _filtered = bus._recv_internal(0.0)
            if msg is None:
                return
            frames += 1

    sock = bus._multicast._socket
    sock.setblocking(False)
    unpack = msgpack.unpackb

    def read_socket() -> None:
        nonlocal frames
        for _ in range(256):
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            unpack(data, raw=False)
            frames += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(bus.fileno(), read_python_can if kind == "python_can" else read_socket)
        print("ready", flush=True)
        await stop.wait()

    uvloop.run(main())
    print(json.dumps({"frames": frames}), flush=True)
    bus.shutdown()


class Floor:
    """One floor process (:func:`floor_main`) in this network namespace."""

    def __init__(self, kind: str, channel: str) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--floor", kind, channel],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"floor {kind} did not start")
        self.frames = 0

    def stop(self) -> None:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        self.frames = json.loads(lines[-1])["frames"] if lines else -1


async def measure(
    proc: subprocess.Popen[bytes], sim: CanDriveSimulator, broker_port: int, floors: list[Floor]
) -> dict[str, Any]:
    states: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    latencies: list[float] = []
    unmatched: list[int] = []
    replies: dict[str, dict[str, Any]] = {}
    counting = False

    async with aiomqtt.Client("127.0.0.1", broker_port, identifier="bench-drives") as client:
        await client.subscribe(f"{PREFIX}/drive/#", qos=1)
        await client.subscribe(f"{PREFIX}/cmd/#", qos=1)

        async def receive() -> None:
            async for message in client.messages:
                now = time.monotonic()
                topic = message.topic.value
                if not isinstance(message.payload, bytes):
                    continue
                if "/cmd/" in topic and topic.endswith("/reply"):
                    reply = json.loads(message.payload)
                    replies[str(reply.get("id"))] = reply
                    continue
                name = topic.removeprefix(f"{PREFIX}/drive/").removesuffix("/state")
                if "/" in name:
                    continue  # history
                doc = json.loads(message.payload)
                previous = states.get(name)
                states[name] = doc
                if not counting:
                    continue
                counts[name] = counts.get(name, 0) + 1
                if previous is not None and previous.get("warning") != doc.get("warning"):
                    node = int(name.split("-")[1])
                    changes = [
                        t for sw, t in list(sim.drive(node).statusword_changes) if sw == doc["statusword"]
                    ]
                    # This drive's previous toggle is 4 s old: anything that old is a mismatch.
                    if changes and now - changes[-1] < TOGGLE_S * DRIVES / 2:
                        latencies.append((now - changes[-1]) * 1000)
                    else:
                        unmatched.append(doc["statusword"])

        receiver = asyncio.create_task(receive())

        def ready() -> bool:
            return len(states) == DRIVES and all(
                s.get("nmt") == "operational" and s.get("configured") for s in states.values()
            )

        for _ in range(600):
            if ready():
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"drives not operational: { {k: v.get('nmt') for k, v in states.items()} }")
        for n in range(1, DRIVES + 1):
            await client.publish(
                f"{PREFIX}/cmd/drive/enable", json.dumps({"id": n, "drive": f"axis-{n}"}), qos=1
            )
        for _ in range(300):
            if len(replies) >= DRIVES:
                break
            await asyncio.sleep(0.1)
        failed = [r for r in replies.values() if not r.get("ok")]
        if failed or len(replies) < DRIVES:
            raise RuntimeError(f"enable failed: {failed or replies}")
        await asyncio.sleep(2.0)  # settle: every axis moving

        tpdo_before = sum(d.tpdo_sent for d in sim.drives.values())
        threads_before = thread_cpu_s(proc.pid)
        floors_before = [cpu_s(f.proc.pid) for f in floors]
        wakeups_before = [wakeups(p) for p in (proc.pid, *(f.proc.pid for f in floors))]
        spy = start_pyspy(proc.pid)
        cpu_before, started = cpu_s(proc.pid), time.monotonic()
        counting = True
        toggles = 0
        while time.monotonic() - started < WINDOW_S:
            node = toggles % DRIVES + 1
            drive = sim.drive(node)
            drive.set_warning(not drive.model.warning)
            toggles += 1
            await asyncio.sleep(TOGGLE_S)
        elapsed = time.monotonic() - started
        cpu = cpu_s(proc.pid) - cpu_before
        threads_after = thread_cpu_s(proc.pid)
        floor_cpu = [cpu_s(f.proc.pid) - before for f, before in zip(floors, floors_before, strict=True)]
        woke = [
            wakeups(p) - before
            for p, before in zip((proc.pid, *(f.proc.pid for f in floors)), wakeups_before, strict=True)
        ]
        counting = False
        if spy is not None:
            spy.wait(timeout=60)
        tpdo_frames = sum(d.tpdo_sent for d in sim.drives.values()) - tpdo_before
        await asyncio.sleep(0.5)
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await receiver

    per_thread = {t: threads_after[t] - threads_before.get(t, 0.0) for t in threads_after}
    loop_s = per_thread.pop(proc.pid, 0.0)
    busiest = max(per_thread.values(), default=0.0)
    rate = statistics.mean(counts.get(f"axis-{n}", 0) for n in range(1, DRIVES + 1)) / elapsed
    frames_per_s = tpdo_frames / elapsed
    floor = {
        f.kind: {
            "cpu_pct_of_core": round(100 * used / elapsed, 2),
            "us_per_frame": round(1e6 * used / tpdo_frames, 1) if tpdo_frames else None,
            "wakeups_per_s": round(w / elapsed),
        }
        for f, used, w in zip(floors, floor_cpu, woke[1:], strict=True)
    }
    return {
        "window_s": round(elapsed, 1),
        "cpu_pct_of_core": round(100 * cpu / elapsed, 2),
        "us_per_frame": round(1e6 * cpu / tpdo_frames, 1) if tpdo_frames else None,
        "wakeups_per_s": round(woke[0] / elapsed),
        "floor": floor,
        "cpu_pct_by_thread": {
            "event_loop": round(100 * loop_s / elapsed, 2),
            "can_reader": round(100 * busiest / elapsed, 2),
            "others": round(100 * (sum(per_thread.values()) - busiest) / elapsed, 2),
        },
        "rss_mib": round(status_kib(proc.pid, "VmRSS") / 1024, 1),
        "rss_peak_mib": round(status_kib(proc.pid, "VmHWM") / 1024, 1),
        "tpdo_frames_per_s": round(frames_per_s, 1),
        "tpdo_per_s_per_drive": round(tpdo_frames / elapsed / DRIVES, 1),
        "state_msgs_per_s_per_drive": round(rate, 2),
        "latency_ms": {
            "n": len(latencies),
            "toggles": toggles,
            "unmatched": len(unmatched),
            "p50": round(statistics.median(latencies), 1) if latencies else None,
            "p95": round(percentile(latencies, 0.95), 1) if latencies else None,
            "max": round(max(latencies), 1) if latencies else None,
        },
    }


def start_pyspy(pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` for the window (BENCH_PYSPY), or None."""
    if not PYSPY_DIR:
        return None
    out = Path(PYSPY_DIR) / f"dcud-{int(time.time())}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    # BENCH_PYSPY_NATIVE=1: C frames too (uvloop, libc); py-spy then pauses the process per sample.
    native = ["--native"] if os.environ.get("BENCH_PYSPY_NATIVE") == "1" else ["--nonblocking"]
    command = ["py-spy", "record", *native, "--format", "raw", "--rate", "200"]
    return subprocess.Popen(
        [*command, "--duration", str(int(WINDOW_S)), "--pid", str(pid), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_one(interface: str) -> dict[str, Any]:
    """One measurement on ``interface`` (in this process's network namespace)."""
    with tempfile.TemporaryDirectory(prefix="dcud-bench-drives-") as tmp:
        work = Path(tmp)
        broker = start_mosquitto(work / "mosquitto")
        socat: Socat | None = None
        if interface == "udp_multicast":
            dcud_channel = sim_channel = MULTICAST_GROUP
        else:
            socat = Socat(work / "can-dcu", work / "can-sim")
            dcud_channel, sim_channel = str(work / "can-dcu"), str(work / "can-sim")
        options: dict[str, Any] = {"sleep_after_open": 0} if interface == "slcan" else {}
        sim = CanDriveSimulator(
            interface,
            sim_channel,
            list(range(1, DRIVES + 1)),
            SimOptions(heartbeat_ms=100, tpdo_period_s=TPDO_MS / 1000, tpdos=(1, 2)[:TPDOS_PER_CYCLE]),
            **options,
        )
        site = work / "site"
        site.mkdir()
        (site / "wme.conf").write_text("ntp_interval=600\n")
        (site / "dcud.toml").write_text(site_toml(site, interface, dcud_channel, broker.url))
        sock_path = work / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(30)
        log = (work / "dcud.log").open("wb")
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        if DCUD_SRC:
            env["PYTHONPATH"] = DCUD_SRC
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcud", "run", "-c", str(site / "dcud.toml")],
            env=env,
            cwd=DCUD_SRC or None,
            stdout=log,
            stderr=log,
        )
        floors: list[Floor] = []
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            sim.start()  # after dcud listens: it sees the boot-ups
            if FLOOR and interface == "udp_multicast":
                floors = [Floor(kind, dcud_channel) for kind in FLOOR_KINDS]
            result = asyncio.run(measure(proc, sim, broker.port, floors))
            for floor in floors:
                floor.stop()
            result["floor_frames"] = {f.kind: f.frames for f in floors}
        finally:
            for floor in floors:
                if floor.proc.poll() is None:
                    floor.proc.kill()
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            sim.stop()
            if socat is not None:
                socat.stop()
            broker.stop()
            sock.close()
    latency = result["latency_ms"]
    result["ok"] = (
        result["cpu_pct_of_core"] <= TARGET_CPU_PCT
        and latency["max"] is not None
        and latency["max"] < 50.0
        and result["state_msgs_per_s_per_drive"] < result["tpdo_per_s_per_drive"] / 10
    )
    return result


def run_in_netns(interface: str) -> dict[str, Any]:
    """Run one measurement in a private network namespace (multicast must not leave it)."""
    try:
        import msgpack  # noqa: F401 (python-can's udp_multicast needs it)
    except ImportError:
        return {"skipped": "python-can's udp_multicast needs msgpack: pip install msgpack"}
    unshare = find_program("unshare", "util-linux")
    script = (
        "ip link set lo up && ip route add 224.0.0.0/4 dev lo && "
        f'exec "{sys.executable}" "{Path(__file__).resolve()}" --one {interface}'
    )
    done = subprocess.run(
        [unshare, "-n", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=WINDOW_S + 240,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"skipped": f"netns run failed ({done.returncode}): {done.stderr.strip()[-300:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--floor":
        floor_main(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(run_one(sys.argv[2])))
        return
    results: dict[str, Any] = {}
    for interface in INTERFACES:
        results[interface] = run_in_netns(interface) if interface == "udp_multicast" else run_one(interface)
    print(
        json.dumps(
            {
                "bench": "drives",
                "drives": DRIVES,
                "tpdo_period_ms": TPDO_MS,
                "tpdos_per_cycle": TPDOS_PER_CYCLE,
                "dcud_src": DCUD_SRC or str(Path(__file__).resolve().parent.parent),
                "targets": {"cpu_pct_of_core": TARGET_CPU_PCT, "latency_ms": 50.0},
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
