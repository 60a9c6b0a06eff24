"""Firmware staging: ``PUT /firmware`` on the config port stores an update file, checked by SHA-256.

dcud does not apply firmware (that is the OS image updater's job: RAUC, SWUpdate, Mender...). It
receives the file, checks its SHA-256 against the one the head-end declared, and keeps exactly one
staged file under ``<state_dir>/firmware/``:

- ``<sha256>.bin``: the file, written to a temp file first, fsynced and renamed;
- ``staged.json``: ``{"sha256", "size_bytes", "name", "staged_ts", "who"}``, written the same way
  after the file. It is the one switch: it names the file in force (the previous file is deleted
  only after it), so a power cut leaves the previous staged file or the new one, never half a file.

The staged file is reported on the retained state ``<p>/firmware/state`` and in ``<p>/status`` (member
``firmware``), also after a restart. A new upload replaces the staged one only once it is complete
and its hash matched; a failed upload leaves the staged file as it was.

:meth:`FirmwareStager.begin` opens the temporary file, so the config port calls it only once a
request may write: after the stream header of an encrypted upload was authenticated (and its nonce
spent), or on a plain port whose installer set ``plain_writes = true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dcud.errors import DcudError
from dcud.runtime.bus import EventBus
from dcud.runtime.durable import fsync_dir, write_durably
from dcud.runtime.timefmt import rfc3339

STATE_SUBTOPIC = "firmware"
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._+-]{1,128}")


class FirmwareRejectedError(DcudError):
    """The upload was refused (hash mismatch, too large, bad name); the staged file is unchanged."""


@dataclass(frozen=True)
class StagedFirmware:
    """The staged file's record (``staged.json``)."""

    sha256: str
    size_bytes: int
    name: str
    staged_ts: str
    who: str

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object."""
        return asdict(self)


def check_sha256(text: str | None) -> str:
    """The declared SHA-256 in lower case; FirmwareRejectedError unless it is 64 hex digits."""
    if text is None or not _SHA256_RE.fullmatch(text.strip()):
        raise FirmwareRejectedError("declare the file's SHA-256 (64 hex digits) in X-Firmware-SHA256")
    return text.strip().lower()


def check_name(text: str | None) -> str:
    """A safe display name for the file (never used as a path)."""
    if not text:
        return "firmware.bin"
    if not _NAME_RE.fullmatch(text):
        raise FirmwareRejectedError("X-Firmware-Name: 1..128 of A-Z a-z 0-9 . _ + -")
    return text


class FirmwareUpload:
    """One upload in progress: plaintext bytes go to a temp file while being hashed."""

    def __init__(self, stager: FirmwareStager, expected_sha256: str, name: str, who: str) -> None:
        self._stager = stager
        self.expected_sha256 = expected_sha256
        self.name = name
        self.who = who
        self.size_bytes = 0
        self._hash = hashlib.sha256()
        self.temp_path = stager.directory / f".incoming.{os.getpid()}.{id(self)}.tmp"
        stager.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        """Append plaintext; FirmwareRejectedError once the size limit is passed."""
        self.size_bytes += len(data)
        if self.size_bytes > self._stager.max_bytes:
            raise FirmwareRejectedError(f"firmware larger than {self._stager.max_bytes} bytes")
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> StagedFirmware:
        """Check the hash, then make the file the staged one (blocking: run it in a thread)."""
        digest = self._hash.hexdigest()
        try:
            if digest != self.expected_sha256:
                raise FirmwareRejectedError(
                    f"SHA-256 mismatch: received {digest}, declared {self.expected_sha256}"
                )
            if self.size_bytes == 0:
                raise FirmwareRejectedError("empty firmware file")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            record = StagedFirmware(
                sha256=digest,
                size_bytes=self.size_bytes,
                name=self.name,
                staged_ts=rfc3339(time.time()),
                who=self.who,
            )
            self._stager.install(self.temp_path, record)
            return record
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the upload (idempotent); the staged file stays as it was."""
        with contextlib.suppress(OSError, ValueError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp_path.unlink()


class FirmwareStager:
    """Keeps the one staged firmware file of this DCU and reports it on the bus."""

    def __init__(
        self, directory: Path, bus: EventBus | None = None, max_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._bus = bus
        self.staged: StagedFirmware | None = self._load()
        self._publish()

    @property
    def staged_path(self) -> Path | None:
        """The staged file (None when nothing is staged)."""
        return self.file_for(self.staged.sha256) if self.staged else None

    def file_for(self, sha256: str) -> Path:
        """Where the file of a given hash lives."""
        return self.directory / f"{sha256}.bin"

    @property
    def record_path(self) -> Path:
        """Its record."""
        return self.directory / "staged.json"

    def _load(self) -> StagedFirmware | None:
        try:
            data = json.loads(self.record_path.read_text())
            record = StagedFirmware(**{k: data[k] for k in StagedFirmware.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record if self.file_for(record.sha256).exists() else None

    def begin(self, expected_sha256: str, name: str, who: str) -> FirmwareUpload:
        """Start an upload (the temp file is created now)."""
        return FirmwareUpload(self, expected_sha256, name, who)

    def install(self, temp_path: Path, record: StagedFirmware) -> None:
        """Rename a complete, checked temp file into place, then switch the record to it."""
        previous = self.staged_path
        os.replace(temp_path, self.file_for(record.sha256))
        fsync_dir(self.directory)
        write_durably(self.record_path, json.dumps(record.to_json()).encode(), 0o640)
        self.staged = record
        if previous is not None and previous != self.file_for(record.sha256):
            with contextlib.suppress(OSError):
                previous.unlink()
        self._publish()

    def status(self) -> Mapping[str, Any]:
        """The ``<p>/firmware/state`` document: ``{"staged": {...} | null}``."""
        return {"staged": self.staged.to_json() if self.staged else None}

    def _publish(self) -> None:
        if self._bus is not None:
            self._bus.set_state(STATE_SUBTOPIC, dict(self.status()))
