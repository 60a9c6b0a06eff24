"""Builds the drive services of a configuration: one CAN bus service per ``[[can]]`` with CANopen
drives (:mod:`dcud.service.drives`), one Modbus RTU service per line with Modbus drives
(:mod:`dcud.service.drive_modbus`), and the ``drive/...`` commands for both.

Apart from :mod:`dcud.service.drives` so that each kind's modules (python-can for CAN, the Modbus
session for RS485) are imported only when a drive of that kind is configured (docs/benchmarks.md,
"Footprint per feature").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dcud.runtime.clock import SYSTEM_CLOCK, Clock
from dcud.service.drive_commands import register_drive_commands

if TYPE_CHECKING:
    from dcud.config.loader import LoadedConfig
    from dcud.runtime.bus import EventBus
    from dcud.runtime.events import EventSink
    from dcud.runtime.supervisor import Service
    from dcud.service.commands import CommandRouter
    from dcud.service.drive_base import HistorySink
    from dcud.service.line import LineRegistry


def build_drive_services(
    config: LoadedConfig,
    *,
    lines: LineRegistry,
    bus: EventBus,
    history: HistorySink,
    commands: CommandRouter,
    event: EventSink,
    clock: Clock = SYSTEM_CLOCK,
) -> Sequence[Service]:
    """``SERVICE_BUILDERS`` entry: one CanDriveService per CAN bus with drives, one ModbusDriveService
    per line with drives; registers the ``drive/...`` commands. ``clock`` is the heartbeat watch's."""
    registry = register_drive_commands(commands)
    services: list[Service] = []
    drives = config.toml.drive
    if any(d.protocol == "canopen" for d in drives):
        from dcud.service.drives import CanDrivesConfig, CanDriveService

        for can in config.toml.can:
            on_bus = tuple(d for d in drives if d.protocol == "canopen" and d.bus == can.name)
            if on_bus:
                services.append(
                    CanDriveService(CanDrivesConfig(can, on_bus), bus, event, history, registry, clock=clock)
                )
    if any(d.protocol == "modbus-rtu" for d in drives):
        from dcud.service.drive_modbus import build_modbus_drive_services

        services.extend(build_modbus_drive_services(config, registry, lines, bus, event, history))
    configured = {d.name for d in drives}
    for name in list(bus.states):
        if name.startswith("drive/") and name.removeprefix("drive/") not in configured:
            bus.clear_state(name)
    return services
