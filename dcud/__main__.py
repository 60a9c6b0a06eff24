"""The ``dcud`` command line; the only place that picks exit codes (design.md section 4).

Exit codes: 0 success or clean stop, 78 (EX_CONFIG) bad configuration, 75 clean stop to be restarted
(daily restart, ``snrp_restart_time``), 1 any other failure.
Subcommands import their implementation lazily so that ``dcud run`` starts fast on a small CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from dcud import __version__
from dcud.errors import ConfigError, DcudError, RestartRequested

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78
EXIT_RESTART = 75
"""Clean stop to be started again (daily restart); the unit forces a restart on it."""

DEFAULT_CONFIG = "/etc/dcud/dcud.toml"


def _run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when importable (not on armv7, which has no wheel), else on plain asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _cmd_run(args: argparse.Namespace) -> int:
    from dcud.app import run_daemon
    from dcud.log import setup_logging

    setup_logging(args.log_level or "info")
    _run_async(run_daemon(Path(args.config)))
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    from dcud.config.loader import load_config

    config = load_config(Path(args.config))
    print(
        f"{args.config}: OK ({len(config.toml.line)} lines, {len(config.toml.meter)} meters, "
        f"{len(config.toml.can)} CAN buses, {len(config.toml.drive)} drives, "
        f"{len(config.params.raw)} parameters set)"
    )
    print(f"parameter file in force: {config.params.path}")  # the remote copy once there is one
    from dcud.config.wme import CATALOGUE, no_effect

    # Honest: a parameter the file sets that this DCU validates but does not act on is named, not hidden.
    for name in no_effect(config.params.raw):
        line = config.params.lines.get(name, 0)
        note = CATALOGUE[name].note or "validated and reported only"
        print(f"{config.params.path}:{line}: {name}: no effect on this DCU (support level accepted): {note}")
    return EXIT_OK


def _cmd_params(args: argparse.Namespace) -> int:
    from dcud.config.wme import CATALOGUE, ParameterSet, load_parameter_file, parse_parameter_text

    params: ParameterSet
    engine_id = ""
    if args.config:
        from dcud.config.loader import load_config
        from dcud.service.snmp_mib import engine_id_for, engine_id_hex

        loaded = load_config(Path(args.config))
        params = loaded.params
        snmp = loaded.toml.snmp
        engine_id = engine_id_hex(engine_id_for(snmp.engine_id, loaded.device_id, snmp.enterprise_oid))
    elif args.file:
        params = load_parameter_file(Path(args.file))
    else:
        params, _ = parse_parameter_text("", "<defaults>")
    current = params.masked()
    rows = []
    for name, param in CATALOGUE.items():
        rows.append(
            {
                "name": name,
                "group": param.group,
                "term": param.term,
                "default": param.default,
                "unit": param.unit,
                "kind": str(param.kind),
                "allowed": list(param.allowed) if param.allowed else None,
                "minimum": param.minimum,
                "maximum": param.maximum,
                "support": str(param.support),
                "secret": param.secret,
                "value": current.get(name),
                "set": params.is_set(name),
                "note": param.note or None,
            }
        )
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)  # type: ignore[arg-type]
    # support: applied (dcud acts on it), accepted (validated, no effect here), read-only (status).
    print(f"{'name':<{width}} {'*'} {'value':<24} {'unit':<4} support")
    for row in rows:
        value = row["value"] if row["value"] not in (None, "") else "-"
        marker = "*" if row["set"] else " "
        print(f"{row['name']:<{width}} {marker} {value!s:<24} {row['unit']!s:<4} {row['support']}")
    if engine_id:  # what an SNMPv3 trap receiver must be configured with (createUser -e ...)
        print(f"# snmp engine id: {engine_id}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from dcud.demo import run_demo
    from dcud.log import setup_logging

    setup_logging("warning")
    return run_demo(duration_s=args.duration, workdir=Path(args.workdir) if args.workdir else None)


def _cmd_read(args: argparse.Namespace) -> int:
    from dcud.cli_meters import cmd_read

    return cmd_read(args.config, args.meter, args.via_mqtt, args.timeout)


def _cmd_scan(args: argparse.Namespace) -> int:
    from dcud.cli_meters import cmd_scan

    return cmd_scan(args.config, args.line, mode=args.mode, first=args.first, last=args.last)


def _cmd_decode(args: argparse.Namespace) -> int:
    if args.protocol == "dlms":
        from dcud.cli_decode_dlms import cmd_decode_dlms

        return cmd_decode_dlms(
            args.source,
            framing=args.framing,
            key=args.key,
            auth_key=args.auth_key,
            key_file=args.key_file,
            system_title=args.system_title,
            client_system_title=args.client_system_title,
        )
    from dcud.cli_meters import cmd_decode

    return cmd_decode(args.protocol, args.source, args.bcc, args.p1)


def _cmd_dlms_objects(args: argparse.Namespace) -> int:
    from dcud.cli_dlms import cmd_dlms_objects

    return cmd_dlms_objects(args.config, args.meter, args.json)


def _add_dlms_command(sub: Any) -> None:
    """``dcud dlms objects``: the object list of a DLMS/COSEM meter (docs/dlms.md)."""
    dlms = sub.add_parser("dlms", help="DLMS/COSEM meter commands")
    dlms_sub = dlms.add_subparsers(dest="dlms_command", required=True, metavar="COMMAND")
    objects = dlms_sub.add_parser("objects", help="the object list of a meter (class, OBIS, attributes)")
    objects.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    objects.add_argument("--meter", required=True, help="a [[meter]] name (protocol = dlms)")
    objects.add_argument("--json", action="store_true", help="JSON even on a terminal")
    objects.set_defaults(func=_cmd_dlms_objects)


def _cmd_sim_meters(args: argparse.Namespace) -> int:
    from dcud.cli_meters import cmd_sim_meters

    return cmd_sim_meters(
        args.sim_config,
        protocol=args.protocol,
        addresses=args.addresses,
        link=args.link,
        device=args.device,
        baud=args.baud,
        control=args.control,
    )


def _cmd_sim_dlms(args: argparse.Namespace) -> int:
    from dcud.cli_meters import cmd_sim_dlms

    return cmd_sim_dlms(args)


def _add_dlms_sim_command(sim_sub: Any) -> None:
    """``dcud sim dlms``: DLMS/COSEM meters on HDLC lines and the TCP wrapper (docs/dlms.md)."""
    dlms = sim_sub.add_parser("dlms", help="DLMS/COSEM meters on HDLC ptys and the TCP wrapper")
    dlms.add_argument("--config", dest="sim_config", help="simulator TOML/JSON ([[line]], [[meter]])")
    dlms.add_argument("--link", default="", help="one meter on HDLC on a new pty, symlinked here")
    dlms.add_argument("--device", default="", help="... or on this existing tty (socat pair end)")
    dlms.add_argument("--tcp-port", type=int, default=None, help="one meter on the wrapper at 127.0.0.1:PORT")
    dlms.add_argument("--baud", type=int, default=0, help="pace the pty at this rate (default 0: unpaced)")
    dlms.add_argument("--mode-e", action="store_true", help="IEC 62056-21 sign-on before HDLC")
    dlms.add_argument("--physical-address", type=int, default=17, help="HDLC physical address (17)")
    dlms.add_argument("--silent", action="store_true", help="start silent")
    dlms.add_argument("--control", default="", help='JSON control file: {"silent": ["<meter>"]}')
    dlms.set_defaults(func=_cmd_sim_dlms)


def _cmd_sim_drive(args: argparse.Namespace) -> int:
    from dcud.sim.drive import cmd_sim_drive

    return cmd_sim_drive(args)


def _add_drive_sim_command(sim_sub: Any) -> None:
    """``dcud sim drive``: CiA 402 drives on a CAN bus, or a Modbus RTU drive on a tty (docs/drives.md)."""
    drive = sim_sub.add_parser("drive", help="CiA 402 drives on a CAN bus, or a Modbus RTU drive on a tty")
    drive.add_argument("--interface", default="slcan", help="python-can interface (default slcan)")
    drive.add_argument("--channel", help="CAN channel: a tty for slcan/serial (socat pty pair end), can0...")
    drive.add_argument("--nodes", default="1", help='CANopen node ids, e.g. "1-3,7" (default 1)')
    drive.add_argument("--heartbeat-ms", type=int, default=100, help="heartbeat producer time (1017)")
    drive.add_argument("--tpdo-ms", type=float, default=10.0, help="TPDO period while operational")
    drive.add_argument("--no-boot-up", action="store_true", help="start pre-operational without a boot-up")
    drive.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="python-can bus option (repeat)"
    )
    drive.add_argument("--modbus", metavar="TTY", help="serve a Modbus RTU drive on this tty instead")
    drive.add_argument("--link", default="", help="--modbus on a new pty, symlinked here (instead of a tty)")
    drive.add_argument("--unit", type=int, default=1, help="Modbus unit id (default 1)")
    drive.add_argument("--baud", type=int, default=9600, help="Modbus line rate (default 9600)")
    drive.set_defaults(func=_cmd_sim_drive)


def _add_meter_commands(sub: Any) -> Any:
    """``read``, ``scan``, ``decode`` and the ``sim`` group (returns the ``sim`` subparsers)."""
    read = sub.add_parser("read", help="read one meter now, JSON to stdout")
    read.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    read.add_argument("--meter", required=True, help="a [[meter]] name")
    read.add_argument(
        "--via-mqtt",
        action="store_true",
        help="ask the running daemon (cmd/read) instead of opening the line (which the daemon owns)",
    )
    read.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for --via-mqtt")
    read.set_defaults(func=_cmd_read)

    scan = sub.add_parser("scan", help="M-Bus primary/secondary scan of a line (not while the daemon runs)")
    scan.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    scan.add_argument("--line", required=True, help="a [[line]] name (kind = mbus)")
    mode = scan.add_mutually_exclusive_group()
    mode.add_argument("--primary", dest="mode", action="store_const", const="primary", help="(default)")
    mode.add_argument("--secondary", dest="mode", action="store_const", const="secondary")
    scan.add_argument("--first", type=int, default=0, help="first primary address (default 0)")
    scan.add_argument("--last", type=int, default=250, help="last primary address (default 250)")
    scan.set_defaults(func=_cmd_scan, mode="primary")

    decode = sub.add_parser("decode", help="decode a captured M-Bus, IEC 62056-21 or DLMS exchange offline")
    decode.add_argument("protocol", choices=["mbus", "iec", "dlms"])
    decode.add_argument("source", help="file with hex text or raw bytes; - for stdin")
    decode.add_argument("--bcc", default="xor", choices=["xor", "sum7", "none"], help="IEC BCC rule")
    decode.add_argument("--p1", action="store_true", help="IEC: DSMR P1 / mode D telegrams")
    decode.add_argument(
        "--framing",
        default="auto",
        choices=["auto", "hdlc", "wrapper", "apdu"],
        help="DLMS: what the capture holds",
    )
    decode.add_argument("--key", help="DLMS: block cipher key (hex) to decipher ciphered APDUs")
    decode.add_argument("--auth-key", help="DLMS: authentication key (hex)")
    decode.add_argument("--key-file", help="DLMS: TOML/JSON with block_cipher_key and authentication_key")
    decode.add_argument("--system-title", help="DLMS: the meter's system title (hex), if not in the capture")
    decode.add_argument("--client-system-title", help="DLMS: the client's system title (hex)")
    decode.set_defaults(func=_cmd_decode)

    sim = sub.add_parser("sim", help="field-device simulators")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="DEVICE")
    meters = sim_sub.add_parser("meters", help="IEC 62056-21 meters and M-Bus slaves on ptys")
    meters.add_argument("--config", dest="sim_config", help="simulator TOML ([[line]] with [[line.meter]])")
    meters.add_argument("--protocol", choices=["mbus", "iec"], default="mbus", help="one-line mode")
    meters.add_argument("--addresses", default="", help='one-line mode: e.g. "1-5,12345678"')
    meters.add_argument("--link", default="", help="symlink to the pty created for the line")
    meters.add_argument("--device", default="", help="use this existing tty (socat pair end) instead")
    meters.add_argument("--baud", type=int, default=0, help="line rate (default 2400 M-Bus, 300 IEC)")
    meters.add_argument("--control", default="", help='JSON control file: {"silent": ["<address>"]}')
    meters.set_defaults(func=_cmd_sim_meters)
    return sim_sub


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="dcud", description="Data Concentrator Unit daemon")
    parser.add_argument("--version", action="version", version=f"dcud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (systemd Type=notify)")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate dcud.toml and the WM-E parameter file")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    check.set_defaults(func=_cmd_check_config)

    params = sub.add_parser("params", help="the WM-E parameter catalogue with current values")
    params.add_argument("-c", "--config", help="dcud.toml whose parameter file gives the current values")
    params.add_argument("-f", "--file", help="a WM-E parameter file (instead of -c)")
    params.add_argument("--json", action="store_true", help="JSON array instead of a table")
    params.set_defaults(func=_cmd_params)

    demo = sub.add_parser("demo", help="the whole system on this computer with simulated devices")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--workdir", help="keep the demo's files here (default: a temporary directory)")
    demo.set_defaults(func=_cmd_demo)

    sim_sub = _add_meter_commands(sub)
    _add_dlms_command(sub)
    # Other simulators join the ``sim`` group here: sim_sub.add_parser("drive", ...).
    _add_drive_sim_command(sim_sub)
    _add_dlms_sim_command(sim_sub)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dcud`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return EXIT_CONFIG
    except RestartRequested as exc:
        print(f"dcud: restarting: {exc.reason}", file=sys.stderr)
        return EXIT_RESTART
    except DcudError as exc:
        print(f"dcud: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
