"""Drive commands: the registry of running drives and the ``<p>/cmd/drive/<verb>`` handlers.

Commands (the drive named in the payload: ``{"drive": "axis-1"}``) are served by
:func:`register_drive_commands` for every protocol: ``enable``, ``disable``, ``quick_stop``,
``fault_reset``, ``read``, ``write`` and ``state``. Each request is a typed struct
(:class:`DriveRequest`, :class:`DriveReadRequest`, :class:`DriveWriteRequest`). All but ``state`` are
refused unless the drive has ``commands = true``; a command the drive's present state does not allow is
refused with the reason (:class:`DriveStateError`); ``drive/write`` writes only what ``[[drive]]
writable`` lists (:class:`WriteAllowList`). A running drive, whatever its protocol, is a
:class:`DriveHandle` in the router's :class:`DriveRegistry`; the drive services add theirs.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import msgspec
import structlog

from dcud.codec.cia402 import Goal
from dcud.config.model import DriveConfig, Name
from dcud.errors import DcudError
from dcud.service.commands import CommandContext, CommandError, CommandRouter, Request

log = structlog.get_logger("dcud.drives")


class DriveStateError(CommandError):
    """The command is not allowed in the drive's present state; the message says why."""


class DriveUnavailableError(CommandError):
    """No such drive is running (unknown name, service restarting, or commands disabled)."""


class DriveHandle(Protocol):
    """What the command handlers need of a running drive, whatever its protocol."""

    @property
    def name(self) -> str:
        """The drive's name."""
        ...

    @property
    def commands_enabled(self) -> bool:
        """``commands = true`` in its ``[[drive]]``."""
        ...

    @property
    def write_allow_list(self) -> WriteAllowList:
        """What ``drive/write`` may write (``[[drive]] writable``)."""
        ...

    def state_document(self) -> dict[str, Any]:
        """The current state document."""
        ...

    async def command(self, goal: Goal) -> dict[str, Any]:
        """Take the drive to ``goal``; returns the resulting state document."""
        ...

    async def read_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Read one object (CANopen) or register range (Modbus)."""
        ...

    async def write_object(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Write one object (CANopen) or register (Modbus)."""
        ...


class DriveRegistry:
    """Running drives by name; one per command router, so handlers survive reloads."""

    def __init__(self) -> None:
        self._drives: dict[str, DriveHandle] = {}

    def add(self, drive: DriveHandle) -> None:
        """A drive started serving."""
        self._drives[drive.name] = drive

    def discard(self, drive: DriveHandle) -> None:
        """A drive stopped (only if it is the one registered under its name)."""
        if self._drives.get(drive.name) is drive:
            del self._drives[drive.name]

    def get(self, name: str) -> DriveHandle | None:
        """The running drive called ``name``."""
        return self._drives.get(name)

    def names(self) -> list[str]:
        """Names of the running drives."""
        return sorted(self._drives)


_REGISTRIES: weakref.WeakKeyDictionary[CommandRouter, DriveRegistry] = weakref.WeakKeyDictionary()


def drive_registry(router: CommandRouter) -> DriveRegistry:
    """The registry of drives whose commands ``router`` serves."""
    registry = _REGISTRIES.get(router)
    if registry is None:
        registry = DriveRegistry()
        _REGISTRIES[router] = registry
    return registry


# -- requests and handlers ---------------------------------------------------------------------------

HexOrInt = (
    Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
    | Annotated[str, msgspec.Meta(pattern=r"^(0[xX][0-9A-Fa-f]{1,4}|[0-9]{1,5})$")]
)
"""An index, sub-index or register address: a JSON number or a string ``"0x6060"`` / ``"40"``."""


class DriveRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``drive/enable``, ``disable``, ``quick_stop``, ``fault_reset``, ``state``: the drive's name."""

    drive: Name


class DriveReadRequest(DriveRequest, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``drive/read``: CANopen ``index``/``subindex``/``type``; Modbus ``address``/``count``/``table``."""

    index: HexOrInt | None = None
    subindex: HexOrInt | None = None
    type: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    address: HexOrInt | None = None
    count: Annotated[int, msgspec.Meta(ge=1, le=125)] | None = None
    table: Literal["holding", "input"] | None = None


class DriveWriteRequest(DriveRequest, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``drive/write``: CANopen ``index``/``subindex``/``type``/``value``; Modbus ``address`` and
    ``value`` or ``values``. Only what ``[[drive]] writable`` lists (docs/drives.md)."""

    index: HexOrInt | None = None
    subindex: HexOrInt | None = None
    type: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    value: (
        bool
        | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
        | Annotated[float, msgspec.Meta(ge=-3.4e38, le=3.4e38)]
        | Annotated[str, msgspec.Meta(max_length=256)]
        | None
    ) = None
    address: HexOrInt | None = None
    values: (
        Annotated[
            list[Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]], msgspec.Meta(min_length=1, max_length=123)
        ]
        | None
    ) = None


class DriveWriteRefusedError(CommandError):
    """``drive/write`` of an object or register that ``[[drive]] writable`` does not list."""


@dataclass(frozen=True)
class WriteAllowList:
    """What ``drive/write`` may write on one drive, from ``[[drive]] writable`` (empty: nothing)."""

    protocol: str
    objects: frozenset[tuple[int, int | None]] = frozenset()
    """CANopen: ``(index, subindex)``; subindex None allows every sub-index of the index."""
    registers: tuple[tuple[int, int], ...] = ()
    """Modbus: inclusive ranges of holding registers."""
    entries: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: DriveConfig) -> WriteAllowList:
        """Parse ``writable`` (checked at load by :class:`~dcud.config.model.DriveConfig`)."""
        objects: set[tuple[int, int | None]] = set()
        registers: list[tuple[int, int]] = []
        for entry in config.writable:
            if config.protocol == "canopen":
                index, _, sub = entry.partition(":")
                objects.add((int(index, 16), int(sub, 16) if sub else None))
            else:
                first, _, last = entry.partition("-")
                registers.append((int(first), int(last or first)))
        return cls(config.protocol, frozenset(objects), tuple(registers), tuple(config.writable))

    def allows_object(self, index: int, subindex: int) -> bool:
        """CANopen: whether ``index:subindex`` is listed."""
        return (index, subindex) in self.objects or (index, None) in self.objects

    def allows_registers(self, address: int, count: int) -> bool:
        """Modbus: whether every register of ``address .. address + count - 1`` is listed."""
        return all(
            any(lo <= reg <= hi for lo, hi in self.registers) for reg in range(address, address + count)
        )

    def describe(self) -> str:
        """The list as configured, for error messages."""
        return ", ".join(self.entries) if self.entries else "nothing (writable = [] in its [[drive]])"


def check_writable(drive: DriveHandle, request: DriveWriteRequest) -> None:
    """DriveWriteRefusedError unless ``request`` writes only what the drive's allow-list lists."""
    allow = drive.write_allow_list
    if allow.protocol == "canopen":
        index = parse_int(_fields(request), "index", lo=0, hi=0xFFFF)
        subindex = parse_int(_fields(request), "subindex", default=0, lo=0, hi=0xFF)
        if allow.allows_object(index, subindex):
            return
        target = f"object 0x{index:04X}:{subindex:02X}"
        where = "$.index"
    else:
        address = parse_int(_fields(request), "address", lo=0, hi=0xFFFF)
        count = len(request.values) if request.values is not None else 1
        if allow.allows_registers(address, count):
            return
        target = f"register {address}" if count == 1 else f"registers {address}..{address + count - 1}"
        where = "$.address"
    raise DriveWriteRefusedError(
        f"drive {drive.name}: write to {target} refused: not in its writable list ({allow.describe()})",
        field=where,
    )


def _fields(request: msgspec.Struct) -> dict[str, Any]:
    """The fields a request sets (None left out), for the protocol-specific argument parsers."""
    return {k: v for k, v in msgspec.structs.asdict(request).items() if v is not None}


def register_drive_commands(router: CommandRouter) -> DriveRegistry:
    """Serve ``drive/<verb>`` on ``router`` (idempotent); returns the registry the handlers consult.

    Transitions and ``drive/write`` are state-changing (an envelope is required whenever
    ``fw_server_key`` is set); every verb but ``state`` needs ``commands = true``; ``drive/write`` also
    needs the target in ``[[drive]] writable``.
    """
    registry = drive_registry(router)

    def lookup(name: str, *, needs_commands: bool = True) -> DriveHandle:
        drive = registry.get(name)
        if drive is None:
            known = ", ".join(registry.names()) or "none"
            raise DriveUnavailableError(
                f"no running drive {json.dumps(name)} (running: {known})", field="$.drive"
            )
        if needs_commands and not drive.commands_enabled:
            raise DriveUnavailableError(
                f"commands are disabled for drive {name}: set commands = true in its [[drive]] in dcud.toml",
                field="$.drive",
            )
        return drive

    def transition(goal: Goal) -> Callable[[DriveRequest, CommandContext], Awaitable[Mapping[str, Any]]]:
        async def handler(request: DriveRequest, ctx: CommandContext) -> Mapping[str, Any]:
            drive = lookup(request.drive)
            log.info("drive command", drive=drive.name, command=str(goal), id=ctx.request_id)
            try:
                state = await drive.command(goal)
            except DcudError as exc:
                log.warning("drive command failed", drive=drive.name, command=str(goal), error=str(exc))
                raise
            log.info("drive command done", drive=drive.name, command=str(goal), state=state.get("cia402"))
            return {"drive": drive.name, "command": str(goal), "state": state}

        return handler

    async def read(request: DriveReadRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        drive = lookup(request.drive)
        fields = _fields(request)
        log.info("drive command", drive=drive.name, command="read", request=_loggable(fields))
        return await drive.read_object(fields)

    async def write(request: DriveWriteRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        drive = lookup(request.drive)
        fields = _fields(request)
        check_writable(drive, request)
        log.info("drive command", drive=drive.name, command="write", request=_loggable(fields))
        return await drive.write_object(fields)

    async def state(request: DriveRequest, _ctx: CommandContext) -> Mapping[str, Any]:
        return lookup(request.drive, needs_commands=False).state_document()

    for goal in Goal:
        router.register(f"drive/{goal}", DriveRequest, transition(goal), state_changing=True)
    router.register("drive/read", DriveReadRequest, read)
    router.register("drive/write", DriveWriteRequest, write, state_changing=True)
    router.register("drive/state", DriveRequest, state)
    return registry


def _loggable(request: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in request.items()
        if k in ("id", "index", "subindex", "type", "value", "address", "count")
    }


def parse_int(
    request: Mapping[str, Any], key: str, *, default: int | None = None, lo: int = 0, hi: int = 0xFFFF
) -> int:
    """An integer argument (JSON number or "0x..." string) within ``lo..hi``; CommandError otherwise."""
    raw = request.get(key, default)
    if raw is None:
        raise CommandError(f'missing "{key}"')
    try:
        value = int(raw, 0) if isinstance(raw, str) else raw
    except ValueError:
        raise CommandError(f'"{key}": expected an integer, got {raw!r}') from None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CommandError(f'"{key}": expected an integer {lo}..{hi}, got {raw!r}')
    return value
