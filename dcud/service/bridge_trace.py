"""What a transparent session leaves behind: the hex trace, the audit record, and summary log lines.

docs/bridge.md ("Audit", "Hex trace") describes the formats.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from dcud.runtime.events import EventSink
from dcud.runtime.timefmt import rfc3339_ms

if TYPE_CHECKING:
    from dcud.service.bridge_session import BridgeSession

__all__ = ["LOG_SUMMARY_S", "TRACE_LINE_BYTES", "HexTrace", "SummaryLog", "audit"]

log = structlog.get_logger("dcud.bridge")

TRACE_LINE_BYTES = 1024
LOG_SUMMARY_S = 60.0


class HexTrace:
    """Troubleshooting trace: one line per chunk (``time session dir length hex``) or note.

    ``c>m`` is client to meter, ``m>c`` meter to client, ``--`` a note (lease, switch, end). The file is
    rotated to ``<file>.1`` when it reaches ``max_bytes``; a write error turns the trace off (logged once).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._file: Any = None
        self._size = 0
        self.failed = False

    def _open(self) -> Any:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="ascii", buffering=1)
            self._size = self._file.tell()
        return self._file

    def _write(self, text: str) -> None:
        if self.failed:
            return
        try:
            handle = self._open()
            if self._size + len(text) > self.max_bytes:
                handle.close()
                self._file = None
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                handle = self._open()
            handle.write(text)
            self._size += len(text)
        except OSError as exc:
            self.failed = True
            log.error("hex trace off", file=str(self.path), error=exc.strerror or str(exc))

    def data(self, sid: str, direction: str, data: bytes) -> None:
        """Record a chunk of traffic."""
        stamp = rfc3339_ms(time.time())
        for off in range(0, len(data), TRACE_LINE_BYTES):
            piece = data[off : off + TRACE_LINE_BYTES]
            self._write(f"{stamp} {sid} {direction} {len(piece)} {piece.hex()}\n")

    def note(self, sid: str, text: str) -> None:
        """Record an event of the session."""
        self._write(f"{rfc3339_ms(time.time())} {sid} -- {text}\n")

    def close(self) -> None:
        """Close the file (reopened on the next write)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class SummaryLog:
    """Logs the first occurrence at once, then one summary with the count per ``LOG_SUMMARY_S``."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = 0
        self.unlogged = 0
        self.last_s = -LOG_SUMMARY_S

    def hit(self, **fields: object) -> None:
        """Count one occurrence; log it when the last log line is ``LOG_SUMMARY_S`` old."""
        self.count += 1
        now = time.monotonic()
        if now - self.last_s >= LOG_SUMMARY_S:
            log.warning(self.message, total=self.count, since_last_log=self.unlogged + 1, **fields)
            self.last_s = now
            self.unlogged = 0
        else:
            self.unlogged += 1


async def audit(session: BridgeSession, event: EventSink | None) -> None:
    """Write the session's audit record: a log line and a ``bridge_session`` event."""
    record = session.record()
    log.info("bridge session", **record)
    if event is None:
        return
    text = (
        f"transparent session {record['port']} {record['peer']} ended ({record['reason']}): "
        f"{record['bytes_to_meter']} B to meter, {record['bytes_to_client']} B to client"
    )
    try:
        await event("bridge_session", text, **record)
    except Exception as exc:  # the outbox may refuse (full, reject_new): the log line stays
        log.error("audit event not committed", session=session.sid, error=repr(exc))
