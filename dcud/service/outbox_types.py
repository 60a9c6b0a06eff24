"""The outbox's public vocabulary: errors, items, limits, stats and fill-state reports.

Shared by the event-loop API (:mod:`dcud.service.outbox`, which re-exports all of it) and the writer
thread (:mod:`dcud.service.outbox_writer`); import it from :mod:`dcud.service.outbox`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from dcud.errors import DcudError

__all__ = [
    "MAX_TAKE",
    "ROW_OVERHEAD_BYTES",
    "SCHEMA_VERSION",
    "OutboxClosed",
    "OutboxCorrupt",
    "OutboxError",
    "OutboxFull",
    "OutboxInUse",
    "OutboxItem",
    "OutboxLimits",
    "OutboxSchemaTooNew",
    "OutboxStats",
    "OverflowPolicy",
    "OverflowReport",
    "plausible_wall_s",
]

SCHEMA_VERSION: Final = 1
"""``PRAGMA user_version`` of the database layout this code writes."""

MAX_TAKE: Final = 10_000
"""Largest ``limit`` accepted by :meth:`Outbox.take` (bounds one read and its parameter list)."""

ROW_OVERHEAD_BYTES: Final = 64
"""Bytes charged per item on top of payload, kind and subtopic: uid, seq, timestamps, b-tree cell."""
MIN_PLAUSIBLE_WALL_S: Final = 1_577_836_800.0  # 2020-01-01T00:00:00Z: earlier means the clock is not set


# --------------------------------------------------------------------------------------------- errors


class OutboxError(DcudError):
    """The outbox could not do what was asked; ``path`` is the database file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class OutboxFull(OutboxError):
    """``put`` refused: the outbox is full and the policy is ``REJECT_NEW``, or the item is too large."""


class OutboxCorrupt(OutboxError):
    """The file at ``path`` is not a readable outbox database. Nothing was deleted; the caller decides."""


class OutboxSchemaTooNew(OutboxError):
    """The database was written by a newer dcud (``found`` > ``supported``); it is left untouched."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        super().__init__(
            path, f"outbox schema version {found} is newer than this dcud supports ({supported}); refusing"
        )
        self.found = found
        self.supported = supported


class OutboxInUse(OutboxError):
    """Another process holds the database (a second dcud on the same ``state_dir``)."""


class OutboxClosed(OutboxError):
    """The outbox is not open (not yet opened, closing, or closed)."""


# ---------------------------------------------------------------------------------------- public data


class OverflowPolicy(StrEnum):
    """What ``put`` does when the outbox is full."""

    DROP_OLDEST = "drop_oldest"
    REJECT_NEW = "reject_new"


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One durable item, as handed out by :meth:`Outbox.take`."""

    seq: int
    """Delivery order; increasing, never reused within one database file."""
    uid: str
    """Stable id for receivers to dedupe: ``<device_id>-<epoch>-<seq>``, stored with the item."""
    kind: str
    subtopic: str
    payload: bytes
    created_s: float
    """Wall clock (``time.time()``) at put."""


@dataclass(frozen=True)
class OutboxLimits:
    """Size and age bounds and what happens when they are hit."""

    max_bytes: int = 64 * 1024 * 1024
    max_age_s: float = 30 * 86_400.0
    policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST
    high_water_ratio: float = 0.8
    clear_ratio: float = 0.7
    """The high-water alarm clears below this fraction of ``max_bytes`` (hysteresis)."""

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {self.max_age_s}")
        if not 0.0 < self.clear_ratio <= self.high_water_ratio <= 1.0:
            raise ValueError(
                "need 0 < clear_ratio <= high_water_ratio <= 1,"
                f" got {self.clear_ratio} and {self.high_water_ratio}"
            )


@dataclass(frozen=True, slots=True)
class OverflowReport:
    """A transition of the outbox's fill state, passed to ``on_overflow``."""

    high_water: bool
    """True: the "nearly full" mark (``high_water_ratio``); False: overflow (``outbox_full``)."""
    active: bool
    """True: the state was entered; False: it cleared."""
    policy: OverflowPolicy
    size_bytes: int
    max_bytes: int
    dropped_overflow: int
    """Items dropped to make room, over the life of the database."""
    rejected: int
    """Puts refused, over the life of the database."""


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A cheap snapshot of the outbox, refreshed by the writer after every batch."""

    depth: int
    """Items not yet delivered to every registered consumer."""
    items: int
    """Rows stored (``depth`` plus delivered items awaiting batched deletion)."""
    size_bytes: int
    max_bytes: int
    oldest_age_s: float
    """Age of the oldest undelivered item; 0.0 when there is none or the clock was not set."""
    backlog: Mapping[str, int]
    """Per registered consumer: items after its cursor, including those in flight."""
    in_flight: Mapping[str, int]
    """Per registered consumer: items taken and neither acked nor given back."""
    dropped: Mapping[str, int]
    """Items dropped undelivered, by reason (``overflow``, ``age``), over the life of the database."""
    rejected: int
    high_water: bool
    overflow: bool
    commits: int
    """Transactions committed since open (puts per commit shows how well group commit works)."""


def plausible_wall_s(wall_s: float) -> bool:
    """Whether a wall-clock reading can be real (the clock was set: 2020 or later)."""
    return wall_s >= MIN_PLAUSIBLE_WALL_S
