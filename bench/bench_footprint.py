"""Footprint of ``dcud run``: idle RSS per feature and of every documented example, each against its floor.

Every scenario is ``dcud run`` started the way systemd starts it (NOTIFY_SOCKET, a real Mosquitto, the
simulators on ptys, ports on 127.0.0.1) twice on the same state directory: the first start makes the
state (the outbox; a TLS port's self-signed certificate, which needs cryptography once), the second
is measured, as a DCU restarts for years on its state. Once it has sent ``READY=1`` and settled
(``BENCH_SETTLE_S``): start-up time, CPU over an idle window (``BENCH_IDLE_S``), then VmRSS.

- ``minimal``: the floor. Only what every daemon runs: the outbox, the command router, the reloader,
  NTP (it reports the clock state even without a server); ``[config_port] enabled = false``, no MQTT.
- one scenario per feature, configured alone on top of ``minimal`` (``adds_mib``: its RSS over the
  floor's; ``base`` names another scenario where a feature needs one, e.g. the EI client a transparent
  line);
- the documented examples that are whole configurations: ``config/dcud.toml`` with its wme.conf (its
  devices replaced by simulators: the IEC and M-Bus meters on ptys, the CAN bus as slcan over a socat
  pty pair with the CiA 402 simulator, the power file in a temporary directory, the MQTT broker and the
  listening ports local), and ``dcud demo`` (its own daemon is measured).

Each scenario's *import floor* is the RSS of a fresh interpreter that only imports the modules the
daemon had imported (read from the daemon: it runs under a probe, a thread blocked on stdin that prints
``sys.modules`` when asked; the thread costs ~0.1 MB). ``over_import_floor_mib`` is what the running
daemon holds beyond its code: buffers, tasks, threads, SQLite's cache; the target is at most 8 MB.

``--python`` runs the daemon and the import floors with another interpreter (a venv with only the
runtime dependencies: the development venv also has ``rich``, which structlog imports when it is
installed, 4-5 MB on every line). Prints one JSON line per scenario and a summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcud.sim.peers import Mosquitto, find_program, free_port, start_mosquitto

REPO = Path(__file__).resolve().parent.parent
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "10"))
SETTLE_S = float(os.environ.get("BENCH_SETTLE_S", "3"))
READY_TIMEOUT_S = float(os.environ.get("BENCH_READY_TIMEOUT_S", "120"))
OVER_FLOOR_TARGET_MIB = 8.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

PROBE = r"""
import json, sys, threading
def _answer():
    for _ in sys.stdin:
        sys.stdout.write(json.dumps(list(sys.modules)) + "\n")
        sys.stdout.flush()
threading.Thread(target=_answer, name="bench-probe", daemon=True).start()
from dcud.__main__ import main
sys.exit(main(sys.argv[1:]))
"""
"""``python -c PROBE run -c dcud.toml``: ``dcud run`` plus a thread that prints sys.modules (insertion
order: a module is entered before the modules it imports) for every line it reads on stdin."""

IMPORT_FLOOR = r"""
import importlib, json, sys
for name in json.loads(sys.stdin.read()):
    if name in sys.modules or name == "__main__":
        continue
    try:
        importlib.import_module(name)
    except BaseException:  # a module that only imports in its parent's context: its parent brings it
        pass
rows = open("/proc/self/status").read().splitlines()
print(next(int(r.split()[1]) for r in rows if r.startswith("VmRSS:")))
"""


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- the peers -------------------------------------------------------------------------------------


METER_SIMS = """\
[[line]]
name = "iec"
protocol = "iec62056-21"
link = "iec.tty"

[[line.meter]]
address = "12345678"
base = 20411.5
rate_per_h = 1.7

[[line]]
name = "mbus"
protocol = "mbus"
link = "mbus.tty"
baud = 2400

[[line.meter]]
address = "5"
kind = "heat"
base = 48210
rate_per_h = 12
"""


DLMS_SIMS = """\
[[line]]
name = "dlms"
link = "dlms.tty"
baud = 9600

[[meter]]
name = "em-1"
line = "dlms"
physical_address = 17
"""


class Peers:
    """Mosquitto, meter simulators, a Modbus RTU drive, CiA 402 drives over slcan: started on first use."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.dir = workdir / "peers"
        self.dir.mkdir(parents=True)
        self._stack = stack
        self._broker: Mosquitto | None = None
        self._meters = False
        self._modbus: Path | None = None
        self._can: Path | None = None
        self._dlms: Path | None = None

    def broker_url(self) -> str:
        if self._broker is None:
            self._broker = start_mosquitto(self.dir / "mosquitto")
            self._stack.callback(self._broker.stop)
        return self._broker.url

    def _process(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=self.dir)
        log.close()
        self._stack.callback(_stop, proc)
        return proc

    def _wait_for(self, paths: list[Path], proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(p.exists() for p in paths):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"a simulator did not start: see {self.dir}")
            time.sleep(0.05)

    def meter_tty(self, protocol: str) -> str:
        """The pty of the simulated IEC 62056-21 meter 12345678 (``iec``) or M-Bus meter 5 (``mbus``)."""
        if not self._meters:
            (self.dir / "sims.toml").write_text(METER_SIMS)
            command = [sys.executable, "-m", "dcud", "sim", "meters", "--config", "sims.toml"]
            sim = self._process(command, "sims")
            self._wait_for([self.dir / "iec.tty", self.dir / "mbus.tty"], sim)
            self._meters = True
        return str(self.dir / f"{protocol}.tty")

    def dlms_tty(self) -> str:
        """The pty of a simulated DLMS/COSEM meter (HDLC, physical address 17, 9600 Bd, no security)."""
        if self._dlms is None:
            (self.dir / "dlms-sims.toml").write_text(DLMS_SIMS)
            command = [sys.executable, "-m", "dcud", "sim", "dlms", "--config", "dlms-sims.toml"]
            proc = self._process(command, "dlms-sims")
            self._wait_for([self.dir / "dlms.tty"], proc)
            self._dlms = self.dir / "dlms.tty"
        return str(self._dlms)

    def modbus_tty(self) -> str:
        """The pty of a simulated Modbus RTU drive (unit 1, 9600 Bd)."""
        if self._modbus is None:
            link = self.dir / "modbus.tty"
            command = [sys.executable, "-m", "dcud", "sim", "drive", "--link", str(link), "--baud", "9600"]
            proc = self._process(command, "modbus")
            self._wait_for([link], proc)
            self._modbus = link
        return str(self._modbus)

    def can_channel(self) -> str:
        """The dcud end of a socat pty pair carrying slcan, with CiA 402 drives 1 and 2 on the other end."""
        if self._can is None:
            dcu, far = self.dir / "can-dcu", self.dir / "can-sim"
            socat = self._process(
                [find_program("socat", "socat"), f"pty,raw,echo=0,link={dcu}", f"pty,raw,echo=0,link={far}"],
                "socat",
            )
            self._wait_for([dcu, far], socat)
            command = [sys.executable, "-m", "dcud", "sim", "drive", "--interface", "slcan"]
            self._process(
                [*command, "--channel", str(far), "--nodes", "1-2", "--option", "sleep_after_open=0"],
                "can-sim",
            )
            self._can = dcu
        return str(self._can)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- scenarios -------------------------------------------------------------------------------------


@dataclass
class Site:
    """A dcud.toml and a wme.conf (``{state}`` and ``{site}`` are filled in per run)."""

    toml: str
    wme: str = ""
    extra_files: dict[str, str] = field(default_factory=dict)


MINIMAL = """\
device_id = "bench"
parameters = "wme.conf"
state_dir = "{state}"

[config_port]
enabled = false
"""


def _minimal(_peers: Peers) -> Site:
    return Site(MINIMAL)


def _mqtt(peers: Peers) -> Site:
    return Site(MINIMAL + f'\n[mqtt]\nurl = "{peers.broker_url()}"\n')


def _meters(protocol: str) -> Callable[[Peers], Site]:
    def site(peers: Peers) -> Site:
        mbus = protocol == "mbus"
        kind, meter, address = ("mbus", "mbus", "5") if mbus else ("rs485", "iec62056-21", "12345678")
        return Site(
            MINIMAL
            + f'\n[[line]]\nname = "line-1"\ndevice = "{peers.meter_tty(protocol)}"\nkind = "{kind}"\n'
            + f'\n[[meter]]\nname = "meter-1"\nline = "line-1"\nprotocol = "{meter}"\naddress = "{address}"\n'
            + "interval_s = 60\n"
        )

    return site


def _dlms_meter(peers: Peers) -> Site:
    return Site(
        MINIMAL
        + f'\n[[line]]\nname = "dlms-1"\ndevice = "{peers.dlms_tty()}"\nkind = "rs485"\nbaud = 9600\n'
        + 'framing = "8N1"\n'
        + '\n[[meter]]\nname = "em-1"\nline = "dlms-1"\nprotocol = "dlms"\naddress = "17"\ninterval_s = 60\n'
        + '[meter.dlms]\nobjects = ["1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255"]\n'
    )


def _ftp_push(_peers: Peers) -> Site:
    # Configured, idle between two pushes (datapush_periodic=15 minutes): the uploader and its client.
    return Site(
        MINIMAL, f"datapush_host=ftp://bench:secret@127.0.0.1:{free_port()}/push\ndatapush_periodic=15\n"
    )


def _snmp_traps(_peers: Peers) -> Site:
    wme = f"snmp_trap=1\nsnmp_manager_ip=127.0.0.1\nsnmp_manager_port={free_port()}\nsnmp_version=2\n"
    return Site(MINIMAL, wme + "snmp_user=bench-community\n")


def _snmp_agent(_peers: Peers) -> Site:
    return Site(MINIMAL + f'\n[snmp]\nagent_listen = "127.0.0.1:{free_port()}"\nagent_community = "bench"\n')


def _can_drives(peers: Peers) -> Site:
    return Site(
        MINIMAL
        + f'\n[[can]]\nname = "can0"\ninterface = "slcan"\nchannel = "{peers.can_channel()}"\n'
        + "options = { sleep_after_open = 0 }\n"
        + '\n[[drive]]\nname = "axis-1"\nbus = "can0"\nprotocol = "canopen"\nnode_id = 1\n'
        + '\n[[drive]]\nname = "axis-2"\nbus = "can0"\nprotocol = "canopen"\nnode_id = 2\n'
    )


def _modbus_drive(peers: Peers) -> Site:
    return Site(
        MINIMAL
        + f'\n[[line]]\nname = "rs485-2"\ndevice = "{peers.modbus_tty()}"\nkind = "rs485"\nbaud = 9600\n'
        + 'framing = "8E1"\n'
        + '\n[[drive]]\nname = "conveyor"\nbus = "rs485-2"\nprotocol = "modbus-rtu"\nnode_id = 1\n'
        + "[drive.registers]\nstatus = 0\ncontrol = 1\nposition = 2\nvelocity = 4\nfault = 6\nio = 7\n"
    )


def _inputs(_peers: Peers) -> Site:
    return Site(
        MINIMAL + '\n[[input]]\nname = "door"\nsource = "file"\npath = "{site}/door"\n',
        extra_files={"door": "0\n"},
    )


def _relay_leds(_peers: Peers) -> Site:
    return Site(
        MINIMAL
        + '\n[relay]\nsource = "file"\npath = "{site}/relay"\n'
        + '\n[leds]\nroot = "{site}/leds"\nled1 = "green:power"\nled6 = "red:uplink"\n',
        "em_relay=10\n",
        extra_files={
            "relay": "0\n",
            "leds/green:power/brightness": "0\n",
            "leds/green:power/max_brightness": "1\n",
            "leds/green:power/trigger": "none\n",
            "leds/red:uplink/brightness": "0\n",
            "leds/red:uplink/trigger": "none\n",
        },
    )


def _power(_peers: Peers) -> Site:
    power = '\n[power]\nsource = "file"\npath = "{site}/online"\n'
    return Site(MINIMAL + power, extra_files={"online": "1\n"})


def _config_port(_peers: Peers) -> Site:
    return Site(MINIMAL.replace("\n[config_port]\nenabled = false\n", ""), f"fw_server_port={free_port()}\n")


def _transparent_port(peers: Peers) -> Site:
    return Site(
        MINIMAL
        + f'\n[[line]]\nname = "rs485-1"\ndevice = "{peers.meter_tty("iec")}"\nkind = "rs485"\n'
        + 'transparent = "primary"\n',
        f"tm_server_port={free_port()}\n",
    )


def _transparent_port_plain(peers: Peers) -> Site:
    site = _transparent_port(peers)
    site.wme += "tm.tls_enable=0\n"  # the default is TLS (tm.tls_enable=1), which needs cryptography
    return site


def _ei_client(peers: Peers) -> Site:
    site = _transparent_port(peers)
    # Nothing listens there: the client dials, is refused, backs off (what it holds while it waits).
    site.wme += f"ei_client_addr=127.0.0.1\nei_client_port={free_port()}\nei_client_auth_mode=N\n"
    return site


def _wme_example(peers: Peers) -> Site:
    """The earlier footprint bench's site: the example parameters, MQTT, no line (config port on)."""
    toml = 'device_id = "bench"\nparameters = "wme.conf"\nstate_dir = "{state}"\n'
    toml += f'[mqtt]\nurl = "{peers.broker_url()}"\n'
    return Site(toml, _example_wme())


def _example_wme() -> str:
    # Its listening ports on free ones (a real DCU's 9000-9002 may be taken here).
    ports = {"tm_server_port": free_port(), "tm2.port": free_port(), "fw_server_port": free_port()}
    kept = [
        row
        for row in (REPO / "config" / "wme.conf").read_text().splitlines()
        if row.partition("=")[0].strip() not in ports
    ]
    return "\n".join(kept + [f"{name}={port}" for name, port in ports.items()]) + "\n"


def _example(peers: Peers) -> Site:
    """config/dcud.toml and config/wme.conf, with this machine's stand-ins for the DCU's devices."""
    toml = (REPO / "config" / "dcud.toml").read_text()
    swaps = [
        ('state_dir = "/var/lib/dcud"', 'state_dir = "{state}"'),
        ('url = "mqtt://127.0.0.1:1883"', f'url = "{peers.broker_url()}"'),
        ('device = "/dev/ttyS1"', f'device = "{peers.meter_tty("iec")}"'),
        ('device = "/dev/ttyUSB0"', f'device = "{peers.meter_tty("mbus")}"'),
        (
            'interface = "socketcan"\nchannel = "can0"',
            f'interface = "slcan"\nchannel = "{peers.can_channel()}"\noptions = {{ sleep_after_open = 0 }}',
        ),
        ('path = "/sys/class/power_supply/AC/online"', 'path = "{site}/online"'),
    ]
    for old, new in swaps:
        if old not in toml:
            raise SystemExit(f"config/dcud.toml changed: {old!r} not found; update bench_footprint.py")
        toml = toml.replace(old, new)
    return Site(toml, _example_wme(), extra_files={"online": "1\n"})


@dataclass(frozen=True)
class Scenario:
    """One configuration to measure."""

    name: str
    kind: str
    """floor | feature | example"""
    site: Callable[[Peers], Site]
    base: str = "minimal"
    note: str = ""


SCENARIOS = [
    Scenario("minimal", "floor", _minimal),
    Scenario("mqtt", "feature", _mqtt, note="connected to Mosquitto"),
    Scenario("iec_meter", "feature", _meters("iec"), note="one line, one IEC 62056-21 meter polled"),
    Scenario("mbus_meter", "feature", _meters("mbus"), note="one line, one M-Bus meter polled"),
    Scenario("dlms_meter", "feature", _dlms_meter, note="one DLMS meter on HDLC, no security"),
    Scenario("ftp_push", "feature", _ftp_push, note="idle between pushes"),
    Scenario("snmp_traps", "feature", _snmp_traps),
    Scenario("snmp_agent", "feature", _snmp_agent),
    Scenario("can_drives", "feature", _can_drives, note="2 CiA 402 drives, slcan over a pty"),
    Scenario("modbus_drive", "feature", _modbus_drive, note="1 drive polled on a line"),
    Scenario("inputs", "feature", _inputs, note="one file input"),
    Scenario("relay_leds", "feature", _relay_leds, note="file relay, 2 LEDs"),
    Scenario("power", "feature", _power, note="file power-fail input"),
    Scenario("config_port", "feature", _config_port, note="on by default"),
    Scenario("transparent_port", "feature", _transparent_port, note="tm on an IEC line"),
    Scenario("transparent_port_plain", "feature", _transparent_port_plain, note="tm without TLS"),
    Scenario("ei_client", "feature", _ei_client, base="transparent_port", note="dialling a closed port"),
    Scenario("wme_example", "example", _wme_example, note="config/wme.conf, MQTT, no field devices"),
    Scenario("example", "example", _example, note="config/dcud.toml + config/wme.conf"),
]
DEMO = Scenario("demo", "example", lambda _peers: Site(""), note="dcud demo (its own daemon)")
DLMS_CIPHER = ["cryptography.hazmat.primitives.ciphers.aead"]


def dlms_cipher_estimate(python: str, dlms_modules: list[str]) -> dict[str, Any]:
    """What a DLMS meter with security adds to one without: cryptography, imported when it first ciphers."""
    plain = import_floor_mib(python, dlms_modules)
    ciphered = import_floor_mib(python, dlms_modules + DLMS_CIPHER)
    return {
        "bench": "footprint",
        "scenario": "dlms_ciphering",
        "kind": "feature",
        "base": "dlms_meter",
        "import_adds_mib": round(ciphered - plain, 2),
        "note": "import only: cryptography on top of dlms_meter's modules",
    }


# -- one run ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    """The NOTIFY_SOCKET systemd would give the daemon."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(READY_TIMEOUT_S)
    try:
        yield sock
    finally:
        sock.close()


def _wait_ready(sock: socket.socket, proc: subprocess.Popen[Any], log: Path) -> None:
    while True:
        try:
            if b"READY=1" in sock.recv(4096):
                return
        except TimeoutError:
            raise RuntimeError(f"no READY=1 within {READY_TIMEOUT_S} s; log {log}") from None
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}; log {log}")


def _write_site(site: Site, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fill = {"{state}": str(directory / "state"), "{site}": str(directory)}
    text = site.toml
    for key, value in fill.items():
        text = text.replace(key, value)
    (directory / "dcud.toml").write_text(text)
    (directory / "wme.conf").write_text(site.wme)
    for name, content in site.extra_files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return directory / "dcud.toml"


def measure(python: str, config: Path, *, idle: bool = True) -> dict[str, Any]:
    """Start ``dcud run`` under the probe, wait for READY=1, settle, measure, read its modules, stop it."""
    workdir = config.parent
    log_path = workdir / "dcud.log"
    with notify_socket(workdir / "notify.sock") as sock, log_path.open("ab") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            [python, "-c", PROBE, "run", "-c", str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": str(workdir / "notify.sock"), "PYTHONUNBUFFERED": "1"},
            text=True,
        )
        try:
            _wait_ready(sock, proc, log_path)
            result: dict[str, Any] = {"ready_s": round(time.monotonic() - started, 3)}
            if not idle:
                return result
            time.sleep(SETTLE_S)  # start-up work (first readouts, connections) settles first
            cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
            time.sleep(IDLE_S)
            cpu1, t1 = _cpu_s(proc.pid), time.monotonic()
            status = _status(proc.pid)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("modules\n")
            proc.stdin.flush()
            modules = json.loads(proc.stdout.readline())
            return {
                **result,
                "rss_mib": round(status["VmRSS"] / 1024, 2),
                "peak_rss_mib": round(status["VmHWM"] / 1024, 2),
                "threads": status["Threads"],
                "idle_cpu_pct": round(100.0 * (cpu1 - cpu0) / (t1 - t0), 3),
                "modules": modules,
            }
        finally:
            _stop(proc)  # type: ignore[arg-type]


def import_floor_mib(python: str, modules: list[str]) -> float:
    """RSS of an interpreter that imported ``modules`` and did nothing else."""
    done = subprocess.run(
        [python, "-c", IMPORT_FLOOR], input=json.dumps(modules), capture_output=True, text=True, check=True
    )
    return round(int(done.stdout.strip()) / 1024, 2)


def demo_rss(python: str, workdir: Path) -> dict[str, Any]:
    """``dcud demo``: its own daemon measured as the others; modules from a probe run on its site."""
    notify = workdir / "notify.sock"
    with notify_socket(notify) as sock, (workdir / "demo.log").open("ab") as log:
        demo = subprocess.Popen(
            [python, "-m", "dcud", "demo", "--workdir", str(workdir / "demo")],
            stdout=log,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},  # handed down to its `dcud run`
        )
        try:
            started = time.monotonic()
            _wait_ready(sock, demo, workdir / "demo.log")
            ready_s = time.monotonic() - started
            daemon = _demo_daemon(demo.pid)
            time.sleep(SETTLE_S)
            cpu0, t0 = _cpu_s(daemon), time.monotonic()
            time.sleep(IDLE_S)
            cpu1, t1 = _cpu_s(daemon), time.monotonic()
            status = _status(daemon)
            result: dict[str, Any] = {
                "ready_s": round(ready_s, 3),
                "rss_mib": round(status["VmRSS"] / 1024, 2),
                "peak_rss_mib": round(status["VmHWM"] / 1024, 2),
                "threads": status["Threads"],
                "idle_cpu_pct": round(100.0 * (cpu1 - cpu0) / (t1 - t0), 3),
            }
            # Its modules: the demo's daemon stops (the simulators and the broker stay), a probe run
            # takes its place on the same site.
            os.kill(daemon, signal.SIGTERM)
            _wait_gone(daemon)
            probe = measure(python, workdir / "demo" / "dcud.toml")
            result["modules"] = probe["modules"]
            result["probe_rss_mib"] = probe["rss_mib"]
            return result
        finally:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()


def _demo_daemon(parent: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if int(stat[1]) == parent and b"run" in cmdline and b"dcud" in cmdline:
                return int(entry.name)
    raise RuntimeError("dcud demo runs no daemon")


def _wait_gone(pid: int, timeout_s: float = 30) -> None:
    """Until ``pid`` (another process's child) has exited: gone, or a zombie its parent has not reaped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} did not stop")


# -- main ------------------------------------------------------------------------------------------


def _packages(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules if not m.startswith("_")}


def _ready_median(python: str, config: Path, runs: int) -> float | None:
    if runs <= 1:
        return None
    ready = sorted(measure(python, config, idle=False)["ready_s"] for _ in range(runs))
    return ready[len(ready) // 2]


def main() -> None:
    """Run the scenarios, print one JSON line each and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the daemon and floors")
    parser.add_argument("--only", default="", help="comma-separated scenario names (minimal is always run)")
    parser.add_argument("--no-demo", action="store_true", help="leave out `dcud demo`")
    parser.add_argument("--quick", action="store_true", help="no demo, one start for ready_s (under qemu)")
    parser.add_argument("--ready-runs", type=int, default=3, help="starts of the example for ready_s")
    args = parser.parse_args()
    wanted = {name for name in args.only.split(",") if name}
    scenarios = [s for s in SCENARIOS if not wanted or s.name in wanted or s.name == "minimal"]
    demo = not (args.no_demo or args.quick) and (not wanted or "demo" in wanted)
    python = shutil.which(args.python) or args.python
    has_rich = subprocess.run([python, "-c", "import rich"], capture_output=True, check=False).returncode == 0
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dcud-footprint-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        peers = Peers(workdir, stack)
        for scenario in scenarios:
            config = _write_site(scenario.site(peers), workdir / scenario.name)
            # The first start makes the state (outbox, a TLS port's self-signed certificate: cryptography);
            # a DCU restarts on it for years, so the second start is the one measured.
            first = measure(python, config, idle=False)
            run = {**measure(python, config), "first_ready_s": first["ready_s"]}
            if scenario.name == "example":
                median = _ready_median(python, config, 1 if args.quick else args.ready_runs)
                if median is not None:
                    run["ready_s_median"] = median
            results[scenario.name] = _report(scenario, run, results, python)
        if demo:
            run = demo_rss(python, workdir)
            results["demo"] = _report(DEMO, run, results, python)
        if "dlms_meter" in results:
            estimate = dlms_cipher_estimate(python, results["dlms_meter"]["module_names"])
            print(json.dumps(estimate), flush=True)
    examples = [r for r in results.values() if r["kind"] == "example"]
    print(
        json.dumps(
            {
                "bench": "footprint_summary",
                "python": python,
                "machine": os.uname().machine,
                "rich_installed": has_rich,
                "minimal_rss_mib": results["minimal"]["rss_mib"],
                "minimal_import_floor_mib": results["minimal"]["import_floor_mib"],
                "examples_within_target": all(r["ok"] for r in examples),
                "target_over_import_floor_mib": OVER_FLOOR_TARGET_MIB,
                "idle_s": IDLE_S,
                "settle_s": SETTLE_S,
            }
        )
    )


def _report(
    scenario: Scenario, run: dict[str, Any], results: dict[str, dict[str, Any]], python: str
) -> dict[str, Any]:
    name, kind, base, note = scenario.name, scenario.kind, scenario.base, scenario.note
    modules: list[str] = run.pop("modules")
    floor = import_floor_mib(python, modules)
    line: dict[str, Any] = {"bench": "footprint", "scenario": name, "kind": kind, **run}
    line["import_floor_mib"] = floor
    line["over_import_floor_mib"] = round(run["rss_mib"] - floor, 2)
    line["ok"] = line["over_import_floor_mib"] <= OVER_FLOOR_TARGET_MIB
    line["modules"] = len(modules)
    if name != "minimal":
        reference = results[base]
        line["base"] = base
        line["minimal_rss_mib"] = results["minimal"]["rss_mib"]
        line["adds_mib"] = round(run["rss_mib"] - reference["rss_mib"], 2)
        line["import_adds_mib"] = round(floor - reference["import_floor_mib"], 2)
        line["new_packages"] = sorted(_packages(modules) - set(reference["packages"]))
        new = set(modules) - set(reference["module_names"])
        line["new_dcud_modules"] = sorted(m.removeprefix("dcud.") for m in new if m.startswith("dcud."))
    if note:
        line["note"] = note
    print(json.dumps(line), flush=True)
    return {**line, "packages": sorted(_packages(modules)), "module_names": modules}


if __name__ == "__main__":
    main()
