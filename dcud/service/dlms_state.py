"""Durable per-meter state of the DLMS/COSEM readouts: invocation counters, cursors, the clock.

One JSON file per meter, ``<state_dir>/dlms/<meter>.json``, replaced with
:func:`~dcud.runtime.durable.write_durably` (temp, fsync, rename, fsync dir), mode 0600:

``invocation_counters``
    Per key set (a fingerprint of EK, AK, dcud's system title, client SAP and logical device; never the
    keys): ``reserved``, the first value no session may have used. A session may use values from the
    next one up to ``reserved - 1`` only (the client session enforces the limit). Before a session,
    when fewer than :data:`COUNTER_LOW_WATER` values are left, ``reserved`` moves
    :data:`COUNTER_RESERVE` ahead and is written *before* the session starts. After a restart (clean or
    not) counting resumes at ``reserved``: a value is never used twice, whatever happened in between;
    a crash costs at most the rest of one reservation. A command line read, whose sessions have all ended
    when it exits, gives the rest of its reservation back.
``server_counters``
    Per key set: the last invocation counter accepted from the meter (replay protection across
    associations and restarts).
``profile`` / ``event_logs``
    The capture time (epoch seconds) of the last row committed to the outbox: the next readout asks for
    rows after it. Advanced only after the rows are committed (the outbox also records it in the same
    transaction as the rows, see :meth:`dcud.service.outbox.Outbox.put_many`).
``clock``
    The last clock check (meter time, drift, what was done), for the meter's state document.

The directory also holds ``lock``: the daemon holds an exclusive ``flock`` on it for its life once it
reads DLMS meters, and ``dcud read`` / ``dcud dlms objects`` take it without waiting, so two processes
never take invocation counters from the same file at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcud.codec.dlms.security import INVOCATION_COUNTER_MAX, Keys
from dcud.runtime.durable import write_durably

STATE_SUBDIR = "dlms"
STATE_VERSION = 1
COUNTER_RESERVE = 10_000
"""Invocation counter values reserved on disk at a time."""
COUNTER_LOW_WATER = 5_000
"""A session starts with at least this many reserved values left (a readout needs one per request and
per GET block: thousands of blocks is a year of 15-minute rows)."""
FIRST_COUNTER = 1
MAX_STATE_BYTES = 1024 * 1024


class DlmsStateLocked(OSError):
    """Another process (the daemon) holds the DLMS state directory."""


def keyset_id(*, keys: Keys | None, system_title: bytes | None, client_sap: int, logical_device: int) -> str:
    """A fingerprint naming one key set (16 hex digits of SHA-256; the keys cannot be recovered from it)."""
    digest = hashlib.sha256()
    digest.update(b"dcud-dlms-keyset\0")
    if keys is not None:
        digest.update(keys.block_cipher_key)
        digest.update(keys.authentication_key)
    digest.update(system_title or b"")
    digest.update(bytes([client_sap]) + logical_device.to_bytes(2, "big"))
    return digest.hexdigest()[:16]


@dataclass
class MeterState:
    """The state of one meter (module docstring); ``dirty`` when it differs from the file."""

    meter: str
    reserved: dict[str, int] = field(default_factory=dict)
    next_counter: dict[str, int] = field(default_factory=dict)
    """In memory only: the next value to use in this process."""
    server_counters: dict[str, int] = field(default_factory=dict)
    profile_obis: str = ""
    profile_cursor_s: float | None = None
    event_cursors_s: dict[str, float] = field(default_factory=dict)
    clock: dict[str, Any] = field(default_factory=dict)
    counter_floor: int = FIRST_COUNTER
    """Where a key set without a reservation starts (above anything a lost file can have reserved)."""
    dirty: bool = False

    def counter_range(self, keyset: str) -> tuple[int, int]:
        """``(next, limit)`` for a session: the first value it may use and the last. Reserves ahead when
        few values are left (``dirty`` then: save before the session starts)."""
        reserved = self.reserved.get(keyset, self.counter_floor)
        next_value = max(self.next_counter.get(keyset, reserved), FIRST_COUNTER)
        if reserved - next_value < COUNTER_LOW_WATER:
            reserved = min(next_value + COUNTER_RESERVE, INVOCATION_COUNTER_MAX + 1)
            self.reserved[keyset] = reserved
            self.dirty = True
        self.next_counter[keyset] = next_value
        return next_value, reserved - 1

    def counter_used(self, keyset: str, next_value: int) -> None:
        """After a session (ended in any way): the next value a later session starts from."""
        self.next_counter[keyset] = max(self.next_counter.get(keyset, FIRST_COUNTER), next_value)

    def give_back_reservation(self) -> None:
        """After sessions that have all ended (a command line read): the reservations shrink to the next
        values, so the next process starts there instead of a reservation further on."""
        for keyset, next_value in self.next_counter.items():
            if self.reserved.get(keyset, next_value) > next_value:
                self.reserved[keyset] = next_value
                self.dirty = True

    def set_server_counter(self, keyset: str, value: int | None) -> None:
        """The last counter accepted from the meter (never goes back)."""
        if value is not None and value > self.server_counters.get(keyset, -1):
            self.server_counters[keyset] = value
            self.dirty = True

    def profile_cursor(self, obis: str) -> float | None:
        """The capture time of the last committed row of profile ``obis`` (None: none yet)."""
        return self.profile_cursor_s if self.profile_obis == obis else None

    def set_profile_cursor(self, obis: str, capture_s: float) -> None:
        """Advance the profile cursor (only ever forward for the same profile)."""
        if self.profile_obis != obis or self.profile_cursor_s is None or capture_s > self.profile_cursor_s:
            self.profile_obis, self.profile_cursor_s = obis, capture_s
            self.dirty = True

    def set_event_cursor(self, obis: str, capture_s: float) -> None:
        """Advance the cursor of event log ``obis``."""
        if capture_s > self.event_cursors_s.get(obis, float("-inf")):
            self.event_cursors_s[obis] = capture_s
            self.dirty = True

    def to_json(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "version": STATE_VERSION,
            "meter": self.meter,
            "invocation_counters": {
                k: {"reserved": v, "next": self.next_counter.get(k, v)} for k, v in self.reserved.items()
            },
            "server_counters": dict(self.server_counters),
            "profile": (
                {"obis": self.profile_obis, "last_capture_s": self.profile_cursor_s}
                if self.profile_obis and self.profile_cursor_s is not None
                else None
            ),
            "event_logs": {k: {"last_capture_s": v} for k, v in self.event_cursors_s.items()},
            "clock": dict(self.clock),
        }

    @classmethod
    def from_json(cls, meter: str, data: Any) -> MeterState:
        """Parse a file's content; anything malformed is dropped (a fresh state, never a crash)."""
        state = cls(meter)
        if not isinstance(data, dict):
            return state
        for key, value in _dict(data.get("invocation_counters")).items():
            reserved = _dict(value).get("reserved")
            if isinstance(reserved, int) and FIRST_COUNTER <= reserved <= INVOCATION_COUNTER_MAX + 1:
                state.reserved[str(key)] = reserved
        for key, value in _dict(data.get("server_counters")).items():
            if isinstance(value, int) and 0 <= value <= INVOCATION_COUNTER_MAX:
                state.server_counters[str(key)] = value
        profile = _dict(data.get("profile"))
        cursor = profile.get("last_capture_s")
        if isinstance(profile.get("obis"), str) and isinstance(cursor, int | float):
            state.profile_obis, state.profile_cursor_s = str(profile["obis"]), float(cursor)
        for key, value in _dict(data.get("event_logs")).items():
            cursor = _dict(value).get("last_capture_s")
            if isinstance(cursor, int | float):
                state.event_cursors_s[str(key)] = float(cursor)
        state.clock = _dict(data.get("clock"))
        return state


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class DlmsStateStore:
    """The per-meter state files under ``directory`` (None: in memory only, for tests)."""

    def __init__(self, directory: Path | None, wall_clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._wall_clock = wall_clock
        self._states: dict[str, MeterState] = {}
        self.load_errors: dict[str, str] = {}
        """Meters whose file could not be read (they start fresh; the counter resumes far ahead)."""

    def path(self, meter: str) -> Path | None:
        """The file of ``meter``."""
        return None if self.directory is None else self.directory / f"{meter}.json"

    def get(self, meter: str) -> MeterState:
        """The state of ``meter`` (read from its file on first use)."""
        state = self._states.get(meter)
        if state is None:
            state = self._load(meter)
            self._states[meter] = state
        return state

    def _load(self, meter: str) -> MeterState:
        path = self.path(meter)
        if path is None or not path.exists():
            return MeterState(meter)
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_STATE_BYTES + 1)
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError("file too large")
            return MeterState.from_json(meter, json.loads(raw))
        except (OSError, ValueError) as exc:
            # An unreadable file (write_durably never leaves half a file: a damaged disk, a hand edit)
            # must not make the meter unreadable, and its counters must not be reused. They restart at
            # the Unix time: it grows by 31.5 million a year, faster than any DCU takes counter values
            # (a readout every 15 minutes takes some 10,000 a day), so it is above every value used
            # before, and leaves more than 2.5 billion. The file is kept aside for inspection.
            self.load_errors[meter] = str(exc)
            with contextlib.suppress(OSError):
                path.rename(path.with_name(f"{path.name}.corrupt-{int(self._wall_clock())}"))
            state = MeterState(meter, counter_floor=max(FIRST_COUNTER, int(self._wall_clock())))
            state.dirty = True
            return state

    def save(self, meter: str) -> None:
        """Write the file of ``meter`` durably if it changed (raises OSError)."""
        state = self._states.get(meter)
        path = self.path(meter)
        if state is None or not state.dirty:
            return
        if path is not None:
            data = json.dumps(state.to_json(), separators=(",", ":"), sort_keys=True).encode()
            write_durably(path, data)
        state.dirty = False


# --- the directory lock ---------------------------------------------------------------------------

_LOCKS: dict[str, int] = {}
_LOCKS_GUARD = threading.Lock()


def lock_state_dir(directory: Path, *, wait: bool) -> None:
    """Take the exclusive lock of the DLMS state directory for this process (held until it exits).

    ``wait=False`` raises :class:`DlmsStateLocked` at once when another process holds it. Taking it again
    in the same process does nothing.
    """
    key = str(directory.resolve())
    with _LOCKS_GUARD:
        if key in _LOCKS:
            return
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise DlmsStateLocked(f"{directory} is in use by another dcud process") from None
        except BaseException:
            os.close(fd)
            raise
        _LOCKS[key] = fd


def unlock_state_dir(directory: Path) -> None:
    """Give the lock up (the CLI, once its readout is done)."""
    with _LOCKS_GUARD:
        fd = _LOCKS.pop(str(directory.resolve()), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = [
    "COUNTER_LOW_WATER",
    "COUNTER_RESERVE",
    "DlmsStateLocked",
    "DlmsStateStore",
    "MeterState",
    "keyset_id",
    "lock_state_dir",
    "unlock_state_dir",
]
