"""CiA 402 drive profile and CiA 301 texts, sans-I/O (protocols.md section 5).

What this module knows: the power state machine decoded from the statusword (6041), the controlword
(6040) values that walk it, the plan of controlword steps that takes a drive from one state to a goal
(and the reason when the goal is not reachable from where the drive is), EMCY frames (CiA 301
emergency codes, error register bits) and the standard SDO abort-code texts.

Everything is a pure function of its arguments; errors are the typed ones of :mod:`dcud.errors`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from dcud.errors import LocalProtocolError, RemoteProtocolError


class DriveState(enum.StrEnum):
    """The CiA 402 power state machine states, named as they appear in state documents."""

    NOT_READY_TO_SWITCH_ON = "not_ready_to_switch_on"
    SWITCH_ON_DISABLED = "switch_on_disabled"
    READY_TO_SWITCH_ON = "ready_to_switch_on"
    SWITCHED_ON = "switched_on"
    OPERATION_ENABLED = "operation_enabled"
    QUICK_STOP_ACTIVE = "quick_stop_active"
    FAULT_REACTION_ACTIVE = "fault_reaction_active"
    FAULT = "fault"


# (mask, value, state): the first match wins; the table of protocols.md section 5.
_STATE_TABLE: tuple[tuple[int, int, DriveState], ...] = (
    (0x4F, 0x00, DriveState.NOT_READY_TO_SWITCH_ON),
    (0x4F, 0x40, DriveState.SWITCH_ON_DISABLED),
    (0x6F, 0x21, DriveState.READY_TO_SWITCH_ON),
    (0x6F, 0x23, DriveState.SWITCHED_ON),
    (0x6F, 0x27, DriveState.OPERATION_ENABLED),
    (0x6F, 0x07, DriveState.QUICK_STOP_ACTIVE),
    (0x4F, 0x0F, DriveState.FAULT_REACTION_ACTIVE),
    (0x4F, 0x08, DriveState.FAULT),
)

ENERGISED = frozenset(
    {
        DriveState.READY_TO_SWITCH_ON,
        DriveState.SWITCHED_ON,
        DriveState.OPERATION_ENABLED,
        DriveState.QUICK_STOP_ACTIVE,
    }
)
"""States with the power stage energised."""

SW_READY_TO_SWITCH_ON = 1 << 0
SW_SWITCHED_ON = 1 << 1
SW_OPERATION_ENABLED = 1 << 2
SW_FAULT = 1 << 3
SW_VOLTAGE_ENABLED = 1 << 4
SW_QUICK_STOP = 1 << 5
"""0 = quick stop active."""
SW_SWITCH_ON_DISABLED = 1 << 6
SW_WARNING = 1 << 7
SW_REMOTE = 1 << 9
SW_TARGET_REACHED = 1 << 10
SW_INTERNAL_LIMIT = 1 << 11


@dataclass(frozen=True, slots=True)
class Statusword:
    """A decoded statusword: the state plus the flags an operator looks at."""

    raw: int
    state: DriveState
    voltage_enabled: bool
    warning: bool
    remote: bool
    target_reached: bool
    internal_limit: bool


def drive_state(statusword: int) -> DriveState:
    """The CiA 402 state of ``statusword``; RemoteProtocolError when no state matches."""
    if not 0 <= statusword <= 0xFFFF:
        raise RemoteProtocolError(f"statusword {statusword} is not a 16-bit value")
    for mask, value, state in _STATE_TABLE:
        if statusword & mask == value:
            return state
    raise RemoteProtocolError(f"statusword 0x{statusword:04X} matches no CiA 402 state")


def decode_statusword(statusword: int) -> Statusword:
    """Decode a statusword (object 6041) into its state and flags."""
    return Statusword(
        raw=statusword,
        state=drive_state(statusword),
        voltage_enabled=bool(statusword & SW_VOLTAGE_ENABLED),
        warning=bool(statusword & SW_WARNING),
        remote=bool(statusword & SW_REMOTE),
        target_reached=bool(statusword & SW_TARGET_REACHED),
        internal_limit=bool(statusword & SW_INTERNAL_LIMIT),
    )


def encode_statusword(state: DriveState, *, flags: int = 0) -> int:
    """A statusword showing ``state`` (simulators); ``flags`` are bits 7..15 (warning, remote...)."""
    if flags & 0x7F or not 0 <= flags <= 0xFFFF:
        raise LocalProtocolError(f"flags 0x{flags:X} touch the state bits 0..6")
    bits = {
        DriveState.NOT_READY_TO_SWITCH_ON: 0x00,
        DriveState.SWITCH_ON_DISABLED: 0x40,
        DriveState.READY_TO_SWITCH_ON: 0x21,
        DriveState.SWITCHED_ON: 0x23,
        DriveState.OPERATION_ENABLED: 0x27,
        DriveState.QUICK_STOP_ACTIVE: 0x07,
        DriveState.FAULT_REACTION_ACTIVE: 0x0F,
        DriveState.FAULT: 0x08,
    }[state]
    # Bit 4 (voltage enabled) where the power stage is on, as real drives report it; the state
    # table ignores it, so it never changes the decoded state.
    if state in ENERGISED:
        bits |= SW_VOLTAGE_ENABLED
    return bits | flags


class Controlword(enum.IntEnum):
    """Controlword (6040) values of the device control commands."""

    DISABLE_VOLTAGE = 0x0000
    QUICK_STOP = 0x0002
    SHUTDOWN = 0x0006
    SWITCH_ON = 0x0007
    DISABLE_OPERATION = 0x0007
    ENABLE_OPERATION = 0x000F
    FAULT_RESET = 0x0080


CW_SWITCH_ON = 1 << 0
CW_ENABLE_VOLTAGE = 1 << 1
CW_QUICK_STOP = 1 << 2
"""0 = trigger quick stop."""
CW_ENABLE_OPERATION = 1 << 3
CW_FAULT_RESET = 1 << 7
CW_HALT = 1 << 8


def apply_controlword(state: DriveState, controlword: int, *, fault_reset_edge: bool = False) -> DriveState:
    """The state a drive in ``state`` enters on ``controlword`` (the device side, used by simulators).

    ``fault_reset_edge`` is True when bit 7 went from 0 to 1 with this write. States that the drive
    leaves by itself (not ready, fault reaction active) are returned unchanged.
    """
    cw = controlword
    if state is DriveState.FAULT:
        return DriveState.SWITCH_ON_DISABLED if fault_reset_edge else state
    if state in (DriveState.NOT_READY_TO_SWITCH_ON, DriveState.FAULT_REACTION_ACTIVE):
        return state
    enable_voltage = bool(cw & CW_ENABLE_VOLTAGE)
    quick_stop_off = bool(cw & CW_QUICK_STOP)  # 1 = no quick stop
    switch_on = bool(cw & CW_SWITCH_ON)
    enable_op = bool(cw & CW_ENABLE_OPERATION)
    if not enable_voltage:
        # Transitions 7, 9, 10, 12: disable voltage from anywhere energised.
        return DriveState.SWITCH_ON_DISABLED
    if not quick_stop_off:
        if state is DriveState.OPERATION_ENABLED:
            return DriveState.QUICK_STOP_ACTIVE  # transition 11
        if state in (DriveState.READY_TO_SWITCH_ON, DriveState.SWITCHED_ON):
            return DriveState.SWITCH_ON_DISABLED  # transitions 7, 10
        return state
    if state is DriveState.QUICK_STOP_ACTIVE:
        return DriveState.OPERATION_ENABLED if (switch_on and enable_op) else state  # transition 16
    if not switch_on:
        # Shutdown (xxxx x110): transitions 2, 6, 8.
        if state in (DriveState.SWITCH_ON_DISABLED, DriveState.SWITCHED_ON, DriveState.OPERATION_ENABLED):
            return DriveState.READY_TO_SWITCH_ON
        return state
    if state is DriveState.SWITCH_ON_DISABLED:
        return state  # switch on needs ready to switch on first
    if state is DriveState.READY_TO_SWITCH_ON:
        # Transition 3 (switch on), or 3 + 4 at once for 000F as many drives allow.
        return DriveState.OPERATION_ENABLED if enable_op else DriveState.SWITCHED_ON
    if state is DriveState.SWITCHED_ON:
        return DriveState.OPERATION_ENABLED if enable_op else state  # transition 4
    if state is DriveState.OPERATION_ENABLED:
        return state if enable_op else DriveState.SWITCHED_ON  # transition 5
    return state


class Goal(enum.StrEnum):
    """What a drive command asks for."""

    ENABLE = "enable"
    DISABLE = "disable"
    QUICK_STOP = "quick_stop"
    FAULT_RESET = "fault_reset"


@dataclass(frozen=True, slots=True)
class Step:
    """Write ``controlword``, then wait until the drive is in one of ``expect`` (empty: do not wait)."""

    controlword: int
    expect: frozenset[DriveState]


class TransitionError(LocalProtocolError):
    """The goal cannot be reached from the drive's present state; ``reason`` says why."""

    def __init__(self, goal: Goal, state: DriveState, reason: str) -> None:
        super().__init__(f"{goal} refused in state {state}: {reason}")
        self.goal = goal
        self.state = state
        self.reason = reason


def plan(goal: Goal, state: DriveState) -> tuple[Step, ...]:
    """The controlword steps that take a drive in ``state`` to ``goal`` (empty when already there).

    Raises :class:`TransitionError` when the goal is not reachable from ``state`` by the master
    (a fault must be reset first, a drive still initialising must be waited for...).
    """
    if state is DriveState.NOT_READY_TO_SWITCH_ON:
        raise TransitionError(goal, state, "the drive is still initialising (not ready to switch on)")
    if state is DriveState.FAULT_REACTION_ACTIVE:
        raise TransitionError(goal, state, "the drive is executing its fault reaction; wait for fault")
    if goal is Goal.FAULT_RESET:
        if state is not DriveState.FAULT:
            raise TransitionError(goal, state, f"the drive is not in fault (it is {state})")
        # Bit 7 acts on its rising edge: 0000 first, then 0080.
        return (
            Step(Controlword.DISABLE_VOLTAGE, frozenset()),
            Step(Controlword.FAULT_RESET, frozenset({DriveState.SWITCH_ON_DISABLED})),
        )
    if state is DriveState.FAULT:
        raise TransitionError(goal, state, "the drive is in fault; send fault_reset first")
    if goal is Goal.ENABLE:
        steps: list[Step] = []
        current = state
        if current is DriveState.QUICK_STOP_ACTIVE:
            steps.append(Step(Controlword.DISABLE_VOLTAGE, frozenset({DriveState.SWITCH_ON_DISABLED})))
            current = DriveState.SWITCH_ON_DISABLED
        if current is DriveState.SWITCH_ON_DISABLED:
            steps.append(Step(Controlword.SHUTDOWN, frozenset({DriveState.READY_TO_SWITCH_ON})))
            current = DriveState.READY_TO_SWITCH_ON
        if current is DriveState.READY_TO_SWITCH_ON:
            steps.append(Step(Controlword.SWITCH_ON, frozenset({DriveState.SWITCHED_ON})))
            current = DriveState.SWITCHED_ON
        if current is DriveState.SWITCHED_ON:
            steps.append(Step(Controlword.ENABLE_OPERATION, frozenset({DriveState.OPERATION_ENABLED})))
        return tuple(steps)
    if goal is Goal.DISABLE:
        if state is DriveState.SWITCH_ON_DISABLED:
            return ()
        return (Step(Controlword.DISABLE_VOLTAGE, frozenset({DriveState.SWITCH_ON_DISABLED})),)
    if goal is Goal.QUICK_STOP:
        if state not in ENERGISED:
            raise TransitionError(goal, state, f"quick stop acts on an energised drive only (it is {state})")
        if state is DriveState.QUICK_STOP_ACTIVE:
            return ()
        # The quick-stop option code (605A) decides whether the drive stays in quick stop active
        # or falls through to switch on disabled; both are a completed quick stop.
        return (
            Step(
                Controlword.QUICK_STOP,
                frozenset({DriveState.QUICK_STOP_ACTIVE, DriveState.SWITCH_ON_DISABLED}),
            ),
        )
    raise LocalProtocolError(f"unknown goal {goal!r}")


# -- EMCY -------------------------------------------------------------------------------------

EMCY_SIZE_BYTES = 8

NO_ERROR_TEXT = "no error"
"""``emcy_text(0)``: code 0 means no error (CiA 301 names it "error reset or no error"; as a drive's
error code, 603F or Modbus, it is only ever "no error"). State documents show no text at all for 0."""
EMCY_RESET_TEXT = "error reset"
"""The text of an EMCY frame with code 0: the drive says its errors cleared."""

_EMCY_CODES: dict[int, str] = {
    0x0000: NO_ERROR_TEXT,
    0x1000: "generic error",
    0x2000: "current",
    0x2100: "current, device input side",
    0x2200: "current inside the device",
    0x2300: "current, device output side",
    0x2310: "continuous over-current",
    0x2320: "short circuit / earth leakage",
    0x2330: "earth leakage",
    0x2340: "short circuit",
    0x3000: "voltage",
    0x3100: "mains voltage",
    0x3200: "voltage inside the device",
    0x3210: "DC-link over-voltage",
    0x3220: "DC-link under-voltage",
    0x3300: "output voltage",
    0x4000: "temperature",
    0x4100: "ambient temperature",
    0x4200: "device temperature",
    0x4210: "excess temperature device",
    0x4310: "excess temperature drive",
    0x5000: "device hardware",
    0x5441: "safe torque off active",
    0x6000: "device software",
    0x6100: "internal software",
    0x6200: "user software",
    0x6300: "data set",
    0x7000: "additional modules",
    0x7300: "sensor",
    0x7305: "incremental sensor 1 fault",
    0x8000: "monitoring",
    0x8100: "communication",
    0x8110: "CAN overrun (objects lost)",
    0x8120: "CAN in error passive mode",
    0x8130: "life guard error or heartbeat error",
    0x8140: "recovered from bus off",
    0x8150: "CAN-ID collision",
    0x8200: "protocol error",
    0x8210: "PDO not processed due to length error",
    0x8220: "PDO length exceeded",
    0x8400: "velocity speed controller",
    0x8500: "position controller",
    0x8611: "following error",
    0x8612: "reference limit",
    0x9000: "external error",
    0xF000: "additional functions",
    0xFF00: "device specific",
}

_EMCY_CLASSES: dict[int, str] = {
    0x0: "no error",
    0x1: "generic error",
    0x2: "current",
    0x3: "voltage",
    0x4: "temperature",
    0x5: "device hardware",
    0x6: "device software",
    0x7: "additional modules",
    0x8: "monitoring",
    0x9: "external error",
    0xF: "additional functions",
}

_ERROR_REGISTER_BITS: tuple[str, ...] = (
    "generic",
    "current",
    "voltage",
    "temperature",
    "communication",
    "device profile",
    "reserved",
    "manufacturer",
)


def emcy_text(code: int) -> str:
    """A readable text for a CiA 301/402 emergency (or 603F error) code; vendor codes say so."""
    if not 0 <= code <= 0xFFFF:
        raise LocalProtocolError(f"emergency code {code} is not a 16-bit value")
    if code in _EMCY_CODES:
        return _EMCY_CODES[code]
    if code >= 0xFF00:
        return f"device specific (0x{code:04X})"
    for generic in (code & 0xFFF0, code & 0xFF00):
        if generic in _EMCY_CODES and generic != 0:
            return f"{_EMCY_CODES[generic]} (0x{code:04X})"
    return f"{_EMCY_CLASSES.get(code >> 12, 'unknown class')} (0x{code:04X})"


def error_register_flags(register: int) -> list[str]:
    """Names of the bits set in an error register (object 1001)."""
    return [name for bit, name in enumerate(_ERROR_REGISTER_BITS) if register & (1 << bit)]


@dataclass(frozen=True, slots=True)
class Emcy:
    """One emergency message: error code, error register (1001) and 5 vendor bytes."""

    code: int
    register: int
    vendor: bytes

    @property
    def text(self) -> str:
        """Readable text of the error code ("error reset" for code 0: the errors cleared)."""
        return EMCY_RESET_TEXT if self.code == 0 else emcy_text(self.code)

    @property
    def is_reset(self) -> bool:
        """True for the "error reset / no error" EMCY a drive sends when its errors clear."""
        return self.code == 0


def decode_emcy(data: bytes) -> Emcy:
    """Decode the 8 data bytes of an EMCY frame (COB-ID 080 + node)."""
    if len(data) != EMCY_SIZE_BYTES:
        raise RemoteProtocolError(f"EMCY must carry {EMCY_SIZE_BYTES} bytes, got {len(data)}", data)
    code, register = struct.unpack_from("<HB", data)
    return Emcy(code=code, register=register, vendor=bytes(data[3:8]))


def encode_emcy(code: int, register: int, vendor: bytes = b"") -> bytes:
    """The 8 data bytes of an EMCY frame (simulators)."""
    if not 0 <= code <= 0xFFFF or not 0 <= register <= 0xFF or len(vendor) > 5:
        raise LocalProtocolError("EMCY code is u16, register u8, vendor data at most 5 bytes")
    return struct.pack("<HB", code, register) + vendor.ljust(5, b"\x00")


# -- SDO abort codes --------------------------------------------------------------------------

SDO_ABORT_TEXTS: dict[int, str] = {
    0x05030000: "toggle bit not alternated",
    0x05040000: "SDO protocol timed out",
    0x05040001: "client/server command specifier not valid or unknown",
    0x05040002: "invalid block size",
    0x05040003: "invalid sequence number",
    0x05040004: "CRC error",
    0x05040005: "out of memory",
    0x06010000: "unsupported access to an object",
    0x06010001: "attempt to read a write only object",
    0x06010002: "attempt to write a read only object",
    0x06020000: "object does not exist in the object dictionary",
    0x06040041: "object cannot be mapped to the PDO",
    0x06040042: "the number and length of the objects to be mapped would exceed PDO length",
    0x06040043: "general parameter incompatibility reason",
    0x06040047: "general internal incompatibility in the device",
    0x06060000: "access failed due to a hardware error",
    0x06070010: "data type does not match, length of service parameter does not match",
    0x06070012: "data type does not match, length of service parameter too high",
    0x06070013: "data type does not match, length of service parameter too low",
    0x06090011: "sub-index does not exist",
    0x06090030: "invalid value for parameter (download only)",
    0x06090031: "value of parameter written too high (download only)",
    0x06090032: "value of parameter written too low (download only)",
    0x06090036: "maximum value is less than minimum value",
    0x060A0023: "resource not available: SDO connection",
    0x08000000: "general error",
    0x08000020: "data cannot be transferred or stored to the application",
    0x08000021: "data cannot be transferred or stored to the application because of local control",
    0x08000022: "data cannot be transferred or stored to the application because of the present device state",
    0x08000023: "object dictionary dynamic generation fails or no object dictionary is present",
    0x08000024: "no data available",
}


def sdo_abort_text(code: int) -> str:
    """The CiA 301 text of an SDO abort code (unknown codes are named as such, never an error)."""
    return SDO_ABORT_TEXTS.get(code, f"unknown abort code 0x{code:08X}")
