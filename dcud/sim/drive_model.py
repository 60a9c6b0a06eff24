"""The simulated CiA 402 servo drive itself, shared by the CAN and the Modbus RTU simulators.

:class:`DriveModel` is the device behind either bus: the power state machine (controlword writes move
it, the statusword shows it), an axis that moves at the target velocity while the operation is enabled,
fault injection (fault reaction, then fault) and the quick stop option code.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.cia402 import CW_FAULT_RESET, DriveState, apply_controlword, encode_statusword

DEFAULT_TARGET_VELOCITY = 1000
"""Increments per second once the operation is enabled (60FF default)."""
QUICK_STOP_STAY = 6
"""605A option code: stop, then stay in quick stop active (5..8); 1..4 fall to switch on disabled."""
FAULT_REACTION_S = 0.05


@dataclass
class DriveModel:
    """The CiA 402 device: power state machine, motion, faults. Not thread-safe: callers hold a lock."""

    state: DriveState = DriveState.SWITCH_ON_DISABLED
    position: int = 0
    velocity: int = 0
    target_velocity: int = DEFAULT_TARGET_VELOCITY
    error_code: int = 0
    error_register: int = 0
    mode: int = 3
    digital_inputs: int = 0
    quick_stop_option: int = QUICK_STOP_STAY
    warning: bool = False
    controlword: int = 0
    fault_since_s: float = 0.0
    _position_frac: float = 0.0

    @property
    def statusword(self) -> int:
        """6041 as the drive shows it."""
        flags = 0x0200  # remote: the drive follows the controlword
        if self.warning:
            flags |= 0x0080
        if self.velocity == 0 and self.state is DriveState.OPERATION_ENABLED:
            flags |= 0x0400  # target reached
        return encode_statusword(self.state, flags=flags)

    def write_controlword(self, value: int) -> DriveState:
        """Apply a controlword write; returns the new state."""
        edge = bool(value & CW_FAULT_RESET) and not (self.controlword & CW_FAULT_RESET)
        self.controlword = value
        before = self.state
        self.state = apply_controlword(self.state, value, fault_reset_edge=edge)
        if before is DriveState.FAULT and self.state is not DriveState.FAULT:
            self.error_code = 0
            self.error_register = 0
        return self.state

    def inject_fault(self, code: int, now: float) -> None:
        """A fault occurs: fault reaction now, fault after FAULT_REACTION_S."""
        self.error_code = code
        klass = {0x2: 0x02, 0x3: 0x04, 0x4: 0x08, 0x8: 0x10}.get(code >> 12, 0x80)
        self.error_register = 0x01 | klass
        self.state = DriveState.FAULT_REACTION_ACTIVE
        self.fault_since_s = now

    def reset(self) -> None:
        """Power-on state (reset node)."""
        self.state = DriveState.SWITCH_ON_DISABLED
        self.velocity = 0
        self.error_code = 0
        self.error_register = 0
        self.controlword = 0

    def step(self, now: float, dt_s: float) -> None:
        """Advance time: fault reaction ends, quick stop completes, the axis moves."""
        if self.state is DriveState.FAULT_REACTION_ACTIVE and now - self.fault_since_s >= FAULT_REACTION_S:
            self.state = DriveState.FAULT
        if self.state is DriveState.OPERATION_ENABLED:
            self.velocity = self.target_velocity
        else:
            self.velocity = 0
        if self.state is DriveState.QUICK_STOP_ACTIVE and 1 <= self.quick_stop_option <= 4:
            self.state = DriveState.SWITCH_ON_DISABLED
        self._position_frac += self.velocity * dt_s
        whole = int(self._position_frac)
        self._position_frac -= whole
        self.position = (self.position + whole + 2**31) % 2**32 - 2**31


__all__ = ["DEFAULT_TARGET_VELOCITY", "FAULT_REACTION_S", "QUICK_STOP_STAY", "DriveModel"]
