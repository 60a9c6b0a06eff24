"""Servo drive simulators (``dcud sim drive``): CiA 402 drives on CAN, a Modbus RTU drive on a tty.

- The device, shared by both: :mod:`dcud.sim.drive_model` (the CiA 402 power state machine, an axis
  moving at the target velocity while enabled, fault injection).
- **CANopen**: :mod:`dcud.sim.drive_can`, any number of nodes on one python-can bus (``slcan``/``serial``
  on one end of a pty pair, ``virtual`` in one process, ``udp_multicast``, ``socketcan``), each a canopen
  ``LocalNode`` (SDO, NMT, heartbeat) sending TPDO1 (6041 + 6064) and TPDO2 (606C + 603F + 6061) every
  ``tpdo_period_s`` while operational.
- **Modbus RTU**: :mod:`dcud.sim.drive_modbus`, the drive behind holding registers, answered with
  pymodbus (independent of dcud's codec), alone on a tty or beside simulated meters on one line.

Control (``dcud sim drive`` reads these lines on stdin; tests call ``CanDriveSimulator.control``):
``fault NODE [CODE]``, ``kill NODE``, ``revive NODE``, ``reboot NODE``, ``warning NODE on|off``,
``raw HEX`` (bytes straight onto the serial line: malformed frames), ``frame COBID HEX`` (any CAN frame,
e.g. from a node id nobody configured), ``status``, ``quit``.

This module is the command line (:func:`cmd_sim_drive`, which imports only the simulator asked for)
and the demo's drives (:func:`start_demo_drives`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _option_value(text: str) -> str | int | float | bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_bus_options(items: Sequence[str]) -> dict[str, str | int | float | bool]:
    """``["sleep_after_open=0", "tty_baudrate=115200"]`` -> python-can keyword arguments."""
    options: dict[str, str | int | float | bool] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bus option {item!r} is not KEY=VALUE")
        options[key.strip()] = _option_value(value.strip())
    return options


def cmd_sim_drive(args: Any) -> int:
    """``dcud sim drive`` (arguments from ``dcud.__main__``); imports only the simulator asked for."""
    if args.modbus or args.link:
        from dcud.sim.drive_modbus import run_modbus_cli

        return run_modbus_cli(args.modbus or "", args.link, args.unit, args.baud)
    if not args.channel:
        print("dcud sim drive: --channel is required for CAN (or use --modbus TTY)", file=sys.stderr)
        return 2
    from dcud.sim.drive_can import SimOptions, parse_nodes, run_can_cli

    options = SimOptions(
        heartbeat_ms=args.heartbeat_ms, tpdo_period_s=args.tpdo_ms / 1000.0, boot_up=not args.no_boot_up
    )
    return run_can_cli(
        args.interface, args.channel, parse_nodes(args.nodes), options, parse_bus_options(args.option)
    )


# -- demo ----------------------------------------------------------------------------------------------

DEMO_TOML = """
[[can]]
name = "can0"
interface = "slcan"
channel = "{channel}"
options = {{ sleep_after_open = 0 }}

[[drive]]
name = "axis-1"
bus = "can0"
protocol = "canopen"
node_id = 1
commands = true
history_interval_s = 60

[[drive]]
name = "axis-2"
bus = "can0"
protocol = "canopen"
node_id = 2
commands = true
history_interval_s = 60
"""


def _prepare_demo_dir(workdir: Any) -> tuple[str, str, str]:
    import os

    os.makedirs(workdir, exist_ok=True)
    dcu_end, sim_end = os.path.join(workdir, "can-dcu"), os.path.join(workdir, "can-sim")
    for path in (dcu_end, sim_end):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return dcu_end, sim_end, os.path.join(workdir, "drive-sim.log")


def _links_ready(*paths: str) -> bool:
    import os

    return all(os.path.exists(p) for p in paths)


async def start_demo_drives(workdir: Any) -> tuple[str, Callable[[], Any]]:
    """Two CiA 402 drives for ``dcud demo``: a socat pty pair carrying slcan, the simulator on one end.

    Returns the dcud.toml snippet (``[[can]]`` ``can0`` and ``[[drive]]`` axis-1/axis-2, commands on)
    and an async ``cleanup()`` that stops the simulator and socat. The simulator logs to
    ``workdir/drive-sim.log``.
    """
    import asyncio
    import os

    from dcud.sim.peers import find_program

    dcu_end, sim_end, log_path = _prepare_demo_dir(workdir)
    socat = await asyncio.create_subprocess_exec(
        find_program("socat", "socat"),
        f"pty,raw,echo=0,link={dcu_end}",
        f"pty,raw,echo=0,link={sim_end}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    for _ in range(200):
        if _links_ready(dcu_end, sim_end):
            break
        await asyncio.sleep(0.025)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dcud",
        "sim",
        "drive",
        "--interface",
        "slcan",
        "--channel",
        str(sim_end),
        "--nodes",
        "1-2",
        "--option",
        "sleep_after_open=0",
        stdin=asyncio.subprocess.PIPE,
        stdout=log_fd,
        stderr=log_fd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(log_fd)

    async def cleanup() -> None:
        for proc in (sim, socat):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 3.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()

    return DEMO_TOML.format(channel=dcu_end), cleanup


__all__ = ["cmd_sim_drive", "parse_bus_options", "start_demo_drives"]
