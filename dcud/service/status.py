"""The ``<p>/status`` document: identity, uptime, clock, power and outbox health.

Its own light module, so that what serves the document without MQTT (the SNMP agent, the
device-manager push) does not import the MQTT client (``dcud.app.Shared.status`` assembles the rest).
"""

from __future__ import annotations

import time
from typing import Any

from dcud.runtime.bus import EventBus
from dcud.runtime.timefmt import rfc3339
from dcud.service.outbox import Outbox


def status_document(
    *,
    device_id: str,
    version: str,
    started_monotonic_s: float,
    outbox: Outbox,
    bus: EventBus,
) -> dict[str, Any]:
    """The ``<p>/status`` payload: identity, uptime, clock, power and outbox health."""
    stats = outbox.stats()
    return {
        "state": "online",
        "device_id": device_id,
        "version": version,
        "ts": rfc3339(time.time()),
        "uptime_s": round(time.monotonic() - started_monotonic_s, 1),
        "clock": dict(bus.states.get("clock", {"synced": None})),
        "power": dict(bus.states.get("power", {"state": "unknown"})),
        "snmp": dict(bus.states["snmp"]) if "snmp" in bus.states else None,  # engine ID for v3 receivers
        "outbox": {
            "depth": stats.depth,
            "bytes": stats.size_bytes,
            "max_bytes": stats.max_bytes,
            "oldest_age_s": round(stats.oldest_age_s, 1),
            "high_water": stats.high_water,
            "dropped": dict(stats.dropped),
        },
    }
