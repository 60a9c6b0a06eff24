"""``dcud read`` of a DLMS/COSEM meter and ``dcud dlms objects``: one association, from the command line.

Both open the meter's line themselves (the tty's ``flock``, as ``dcud read`` does for every protocol) or
connect to its ``host``, and take the invocation counters from the daemon's state directory (never
reusing one). While the daemon runs it holds that directory (and the line): the command fails at once
with a clear message instead of waiting; ``dcud read --via-mqtt`` asks the daemon instead.

``dcud read`` reads the registers of ``objects`` and the clock; it never reads the load profile or the
event logs, whose cursors belong to the daemon (rows a command line read took would never reach the
outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

from dcud.config.loader import LoadedConfig, load_config
from dcud.config.model import LineConfig, MeterConfig
from dcud.errors import DcudError
from dcud.runtime.timefmt import rfc3339_ms
from dcud.service.dlms_meter import (
    DlmsMeterSettings,
    ObjectCache,
    PlanOptions,
    ReadoutPlan,
    dlms_session,
    open_tcp,
)
from dcud.service.dlms_state import DlmsStateLocked, DlmsStateStore, lock_state_dir, unlock_state_dir
from dcud.service.session_runner import SessionPort


class DlmsCliError(DcudError):
    """A DLMS command that cannot be served (not a DLMS meter, the daemon holds it...)."""


def dlms_meter(config: LoadedConfig, name: str) -> MeterConfig | None:
    """The ``[[meter]]`` called ``name`` when it is a DLMS meter, else None."""
    return next((m for m in config.toml.meter if m.name == name and m.protocol == "dlms"), None)


def _settings(config: LoadedConfig, name: str) -> tuple[MeterConfig, DlmsMeterSettings, LineConfig | None]:
    meter = dlms_meter(config, name)
    if meter is None:
        known = ", ".join(m.name for m in config.toml.meter if m.protocol == "dlms") or "none"
        raise DlmsCliError(f'no DLMS meter named "{name}" in {config.path} (DLMS meters: {known})')
    try:
        settings = DlmsMeterSettings.from_config(meter, config.path.parent, config.device_id)
    except ValueError as exc:
        raise DlmsCliError(f"meter {name}: {exc}") from None
    line = next((x for x in config.toml.line if x.name == meter.line), None) if meter.line else None
    return meter, settings, line


@contextlib.asynccontextmanager
async def _meter_port(settings: DlmsMeterSettings, line: LineConfig | None) -> AsyncIterator[SessionPort]:
    if settings.host:
        port = await open_tcp(settings.host, settings.port)
        try:
            yield port
        finally:
            await port.close()
        return
    from dcud.cli_meters import open_line

    assert line is not None  # the loader checked it
    async with open_line(line, f"cli:{settings.name}") as leased:
        yield leased


async def run_cli_readout(
    config: LoadedConfig, name: str, options: PlanOptions
) -> tuple[DlmsMeterSettings, ReadoutPlan, float]:
    """One association with the meter ``name``; its plan (with the result) and the start time."""
    _meter, settings, line = _settings(config, name)
    directory = config.state_dir / "dlms"
    try:
        lock_state_dir(directory, wait=False)
    except DlmsStateLocked:
        raise DlmsCliError(
            f"the DLMS state in {directory} is in use - is the daemon running? It reads meter {name}: "
            "use `dcud read --via-mqtt`, or stop it first."
        ) from None
    except OSError as exc:
        raise DlmsCliError(f"cannot use the DLMS state directory {directory}: {exc}") from None
    try:
        store = DlmsStateStore(directory)
        plan = ReadoutPlan(settings, ObjectCache(), options=options)
        started = time.time()
        try:
            async with _meter_port(settings, line) as port:
                await dlms_session(settings, line, port, store, plan)
        finally:
            # The session has ended, however it ended (a cancellation included): no value past the
            # next one was used, so the rest of the reservation is given back.
            store.get(name).give_back_reservation()
            with contextlib.suppress(OSError):  # not given back: the reservation stays, which is safe
                store.save(name)
        return settings, plan, started
    finally:
        unlock_state_dir(directory)


async def read_dlms(config: LoadedConfig, name: str) -> dict[str, Any]:
    """``dcud read --meter NAME`` of a DLMS meter: the reading document."""
    settings, plan, started = await run_cli_readout(
        config, name, PlanOptions(profile=False, events=False, clock=True)
    )
    result = plan.result
    finished = time.time()
    document: dict[str, Any] = {
        "meter": name,
        "ts": rfc3339_ms(finished),
        "seq": 0,
        "values": result.values,
        "protocol": "dlms",
        "line": settings.line,
        "address": settings.address,
        "trigger": "cli",
        "duration_ms": round((finished - started) * 1000),
    }
    if settings.host:
        document["host"] = f"{settings.host}:{settings.port}"
    if result.clock is not None:
        document["clock"] = result.clock
    if result.errors:
        document["errors"] = result.errors
    return document


async def list_objects(config: LoadedConfig, name: str) -> list[dict[str, object]]:
    """The association's object list of meter ``name`` (``dcud dlms objects``)."""
    _, plan, _ = await run_cli_readout(config, name, PlanOptions(objects_only=True))
    if plan.result.objects is None:
        why = "; ".join(e["error"] for e in plan.result.errors) or "no answer"
        raise DlmsCliError(f"meter {name}: {why}")
    return [entry.to_json() for entry in plan.result.objects]


_ACCESS = {0: "-", 1: "r", 2: "w", 3: "rw", 4: "ar", 5: "ar", 6: "aw", 7: "arw"}


def objects_table(objects: list[dict[str, object]]) -> str:
    """The object list as a table for a terminal: class, version, OBIS, attributes (id:access), methods."""
    rows = [("class", "ver", "obis", "attributes", "methods")]
    for entry in objects:
        attributes = entry.get("attributes")
        methods = entry.get("methods")
        attrs = " ".join(
            f"{a['id']}:{_ACCESS.get(int(a['access']), str(a['access']))}"
            + (f"[{','.join(str(s) for s in a['selectors'])}]" if a.get("selectors") else "")
            for a in (attributes if isinstance(attributes, list) else [])
        )
        meths = " ".join(
            f"{m['id']}" + ("" if int(m["access"]) else "-")
            for m in (methods if isinstance(methods, list) else [])
        )
        kind = f"{entry.get('class_id')} {entry.get('class')}"
        rows.append((kind, str(entry.get("version")), str(entry.get("obis")), attrs, meths))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([*(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])), row[4]]) for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def cmd_dlms_objects(config_path: str, meter: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    """``dcud dlms objects``: JSON (or a table on a terminal)."""
    config = load_config(Path(config_path))
    objects = asyncio.run(list_objects(config, meter))
    if as_json or not out.isatty():
        json.dump({"meter": meter, "objects": objects}, out, indent=1)
        out.write("\n")
    else:
        out.write(objects_table(objects))
    return 0


__all__ = ["DlmsCliError", "cmd_dlms_objects", "dlms_meter", "list_objects", "objects_table", "read_dlms"]
