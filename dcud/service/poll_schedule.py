"""The polling schedule as a sans-I/O object: times and results in, "read meter X now" and deadlines out.

:class:`PollSchedule` decides everything about *when* a meter is read and nothing about *how*; the
polling service (:mod:`dcud.service.polling`) is the glue that asks it, reads, tells it the outcome and
sleeps on its injected clock until :meth:`PollSchedule.next_deadline`. No event loop, clock, logging or
I/O here (an import-linter contract keeps them out), so every rule is tested with explicit times
(tests/service/test_poll_schedule.py).

The rules (docs/meters.md, "Polling"):

- **Aligned slots.** A meter is read every ``interval_s`` on wall-clock multiples (UTC epoch), the
  first at the first slot strictly after it was added. Slots are wall-clock labels; waiting is measured
  on the monotonic clock: a deadline is ``monotonic now + (slot - wall now)``, re-checked at least every
  ``recheck_s`` so that a step of the wall clock (NTP) is noticed within that time.
- **Groups.** Meters on one serial line form a group read one at a time (``concurrency=1``) in order of
  due slot, then configuration order; meters without a line (DLMS over TCP) form a group of independent
  meters read up to ``concurrency`` at once. A meter is never handed out twice at the same time.
- **Late, never skipped.** A meter whose slot passed entirely (a busy or unavailable line, more meters
  than the interval allows, a DCU that was suspended or had its wall clock stepped forward) is read for
  the latest slot that has started; the slots in between are counted in ``missed``. A slot is read once:
  a readout that ends ``ok`` or ``failed`` consumes it; there is no second attempt before the next slot
  (the readout itself retries within its lease).
- **Held, not failed.** A readout that could not have the line (``deferred`` behind a transparent
  session, ``busy`` behind a command or a drive, ``line_down``, ``line_error``) keeps its slot: the meter
  stays due and is handed out again. On a shared line every other due meter shares that fate and is
  reported held with the same status. After a ``line_error`` (the line failed under the readout or is
  missing) the group pauses ``line_error_pause_s`` (an independent meter: only that meter).
- **A step back.** When the wall clock steps back so far that a meter's next slot lies more than one
  interval beyond the next aligned slot (a DCU that booted with a wrong clock, corrected by NTP), the
  meter starts again at the next aligned slot and ``realigned`` counts it; a smaller step only delays
  the meter to its next unread slot, so no slot is read twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "LINE_ERROR_PAUSE_S",
    "RECHECK_S",
    "Held",
    "MeterSlots",
    "Outcome",
    "PollSchedule",
    "Read",
    "first_slot_s",
]

RECHECK_S = 10.0
"""Longest wait between two looks at the wall clock (an NTP step is noticed within this)."""
LINE_ERROR_PAUSE_S = 1.0
"""After a ``line_error``: the line service is reopening the device; do not spin on it."""

Outcome = Literal["ok", "failed", "deferred", "busy", "line_down", "line_error"]
"""How a readout ended: ``ok``/``failed`` consume the slot; the others mean the line was not ours."""

_HELD_STATUS: dict[str, str] = {
    "deferred": "deferred",
    "busy": "busy",
    "line_down": "line_down",
    "line_error": "line_down",
}


def first_slot_s(now_s: float, interval_s: int) -> float:
    """The first wall-clock aligned slot strictly after ``now_s``."""
    return (math.floor(now_s / interval_s) + 1) * interval_s


@dataclass(slots=True)
class MeterSlots:
    """One meter's place in the schedule: owned by :class:`PollSchedule`, read by everyone else."""

    name: str = ""
    group: str = ""
    interval_s: int = 1
    order: int = 0
    next_due_s: float = 0.0
    """Wall-clock time of the next slot to read (the one being read while :attr:`reading`)."""
    missed: int = 0
    """Slots passed over because the meter could only be read later (reported, never silent)."""
    realigned: int = 0
    """Times a step back of the wall clock restarted this meter's slots."""
    reading: bool = False
    """Handed out by :meth:`PollSchedule.take`, outcome not yet reported."""
    not_before_s: float = 0.0
    """Monotonic time before which it is not handed out (a pause after a ``line_error``)."""


@dataclass(frozen=True)
class Read:
    """Read meter :attr:`meter` now, for the slot :attr:`slot_s`; report the outcome with ``done``."""

    meter: str
    group: str
    slot_s: float
    missed: int = 0
    """Slots passed over by this hand-out (already added to the meter's ``missed``)."""


@dataclass(frozen=True)
class Held:
    """Meter :attr:`meter` stays due because its line was not available: ``status`` says why."""

    meter: str
    status: str
    """``deferred``, ``busy`` or ``line_down``."""


@dataclass(slots=True)
class _Group:
    name: str
    concurrency: int
    shared_line: bool
    meters: list[MeterSlots] = field(default_factory=list)
    in_flight: int = 0
    paused_until_s: float = 0.0


class PollSchedule:
    """When each meter is read (module docstring); all times are arguments, nothing is awaited."""

    def __init__(
        self, *, recheck_s: float = RECHECK_S, line_error_pause_s: float = LINE_ERROR_PAUSE_S
    ) -> None:
        if recheck_s <= 0:
            raise ValueError("recheck_s must be positive")
        self.recheck_s = recheck_s
        self.line_error_pause_s = line_error_pause_s
        self._groups: dict[str, _Group] = {}
        self._meters: dict[str, MeterSlots] = {}

    # -- set-up --------------------------------------------------------------------------------

    def add_group(self, name: str, *, concurrency: int = 1, shared_line: bool = True) -> None:
        """A serial line (``shared_line``, one readout at a time) or a set of independent meters."""
        if name in self._groups:
            raise ValueError(f"group {name!r} exists")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._groups[name] = _Group(name, concurrency, shared_line)

    def add(self, name: str, group: str, interval_s: int, order: int, wall_s: float) -> MeterSlots:
        """Schedule meter ``name`` in ``group``: its first slot is the first aligned one after ``wall_s``."""
        if name in self._meters:
            raise ValueError(f"meter {name!r} is scheduled already")
        if interval_s < 1:
            raise ValueError("interval_s must be at least 1")
        slots = MeterSlots(name, group, interval_s, order, next_due_s=first_slot_s(wall_s, interval_s))
        self._groups[group].meters.append(slots)
        self._meters[name] = slots
        return slots

    @property
    def groups(self) -> dict[str, int]:
        """Group name -> how many readouts it runs at once."""
        return {name: group.concurrency for name, group in self._groups.items()}

    def meter(self, name: str) -> MeterSlots:
        """The schedule of meter ``name``."""
        return self._meters[name]

    # -- the machine ---------------------------------------------------------------------------

    def take(self, group: str, monotonic_s: float, wall_s: float) -> Read | None:
        """The next readout of ``group`` to start now, or None (then wait for :meth:`next_deadline`)."""
        g = self._groups[group]
        self._realign(g, wall_s)
        if g.in_flight >= g.concurrency or monotonic_s < g.paused_until_s:
            return None
        due = [m for m in g.meters if self._eligible(m, monotonic_s, wall_s)]
        if not due:
            return None
        slots = min(due, key=lambda m: (m.next_due_s, m.order))
        missed = self._catch_up(slots, wall_s)
        slots.reading = True
        g.in_flight += 1
        return Read(slots.name, group, slots.next_due_s, missed)

    def done(self, read: Read, outcome: Outcome, monotonic_s: float, wall_s: float) -> list[Held]:
        """Report how ``read`` ended; returns the meters now held (the read one first), if any."""
        slots = self._meters[read.meter]
        g = self._groups[read.group]
        if not slots.reading or slots.next_due_s != read.slot_s:
            raise ValueError(f"{read} is not in progress")
        slots.reading = False
        g.in_flight -= 1
        if outcome in ("ok", "failed"):
            slots.next_due_s = read.slot_s + slots.interval_s
            return []
        status = _HELD_STATUS[outcome]
        held = [slots]
        if g.shared_line:
            # The line is not ours right now: every meter still due on it shares that fate.
            held += [m for m in g.meters if m is not slots and not m.reading and m.next_due_s <= wall_s]
        for m in held:
            self._catch_up(m, wall_s)
        if outcome == "line_error":
            pause_until = monotonic_s + self.line_error_pause_s
            if g.shared_line:
                g.paused_until_s = max(g.paused_until_s, pause_until)
            else:
                slots.not_before_s = max(slots.not_before_s, pause_until)
        return [Held(m.name, status) for m in held]

    def next_deadline(self, group: str, monotonic_s: float, wall_s: float) -> float:
        """Monotonic time at which :meth:`take` may have something for ``group`` (at most ``recheck_s``)."""
        g = self._groups[group]
        self._realign(g, wall_s)
        deadline = monotonic_s + self.recheck_s
        if g.in_flight >= g.concurrency:
            return deadline  # a readout that ends asks again at once
        for m in g.meters:
            if m.reading:
                continue
            due_s = monotonic_s + max(0.0, m.next_due_s - wall_s)
            deadline = min(deadline, max(due_s, m.not_before_s, g.paused_until_s))
        return max(deadline, monotonic_s)

    # -- rules ---------------------------------------------------------------------------------

    @staticmethod
    def _eligible(m: MeterSlots, monotonic_s: float, wall_s: float) -> bool:
        return not m.reading and m.next_due_s <= wall_s and monotonic_s >= m.not_before_s

    @staticmethod
    def _catch_up(m: MeterSlots, wall_s: float) -> int:
        """A meter whose slot passed entirely goes to the latest slot that has started; returns how many
        slots it passed over. Late meters are never skipped, so an overloaded line reads every meter once
        per pass instead of starving the ones at its end."""
        interval = m.interval_s
        if wall_s < m.next_due_s + interval:
            return 0
        current = math.floor(wall_s / interval) * interval
        passed = round((current - m.next_due_s) / interval)
        m.missed += passed
        m.next_due_s = current
        return passed

    @staticmethod
    def _realign(g: _Group, wall_s: float) -> None:
        """After a step back of the wall clock beyond one interval: start again at the next slot."""
        for m in g.meters:
            natural = first_slot_s(wall_s, m.interval_s)
            if not m.reading and m.next_due_s > natural + m.interval_s:
                m.next_due_s = natural
                m.realigned += 1
