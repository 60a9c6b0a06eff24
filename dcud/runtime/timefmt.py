"""RFC 3339 UTC timestamps for the wire (MQTT payloads, state documents, events, SNMP).

Two forms: whole seconds (``2026-11-21T14:00:00Z``) and milliseconds (``2026-11-21T14:00:00.123Z``)
where two stamps within one second must stay apart (power edges, drive events, bridge sessions,
readings). Local time (file names, schedules) is :class:`dcud.config.timekeeping.LocalClock`'s job.
"""

from __future__ import annotations

import time

__all__ = ["rfc3339", "rfc3339_ms"]


def rfc3339(epoch_s: float) -> str:
    """Unix time as RFC 3339 UTC in whole seconds (``2026-11-21T14:00:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def rfc3339_ms(epoch_s: float) -> str:
    """Unix time as RFC 3339 UTC with milliseconds (``2026-11-21T14:00:00.123Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s * 1000) % 1000:03d}Z"
