"""One readout of one meter on a leased line, and the reading document it becomes.

Shared by the polling service, the ``cmd/read`` MQTT command and ``dcud read``: the protocol session
(:class:`~dcud.codec.iec_session.IecReadout` or :class:`~dcud.codec.mbus_session.MbusReadout`) is
built from the meter's and the line's configuration and driven by
:func:`~dcud.service.session_runner.run_session`.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

from dcud.codec.iec_session import IecReadout, IecReadoutResult
from dcud.codec.mbus_session import MbusReadout, MbusReadoutResult
from dcud.config.model import LineConfig, MeterConfig
from dcud.errors import LocalProtocolError
from dcud.runtime.timefmt import rfc3339, rfc3339_ms
from dcud.service.session_runner import SessionPort, run_session

IEC_RETRY_PAUSE_S = 1.5
"""Before a new IEC sign-on after a failed one: the meter's own timers (tt, idle) must run out."""


@dataclass(frozen=True)
class ReadDefaults:
    """Installation-wide defaults for readouts (from the WM-E parameters)."""

    iec_max_baud: int | None = None
    """``datapush_iec_readout_baudrate``: cap of the mode C baud switch when a meter sets no max_baud."""


@dataclass
class MeterReading:
    """A successful readout, protocol details included, before it becomes a payload."""

    meter: str
    protocol: str
    values: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)
    started_s: float = 0.0
    """Wall-clock time (epoch seconds) the readout began."""
    finished_s: float = 0.0
    """Wall-clock time it ended; the reading's ``ts``."""
    retries: int = 0
    publish: bool = True
    """False: nothing to publish as a reading (a DLMS meter read only for its profile and events)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Protocol state for the meter's state document (merged into it: DLMS clock, cursors)."""


def mbus_address(address: str) -> tuple[int | None, str | None]:
    """``(primary, None)`` for ``"0".."250"``, ``(None, secondary)`` for 8 digits (or a 16-digit mask)."""
    text = address.strip()
    if text.isdigit() and len(text) <= 3:
        return int(text), None
    if len(text) in (8, 16):
        return None, text
    raise LocalProtocolError(f"not an M-Bus address: {address!r}")


def build_session(meter: MeterConfig, line: LineConfig, defaults: ReadDefaults) -> IecReadout | MbusReadout:
    """The readout session for ``meter`` on ``line``."""
    if meter.protocol == "mbus":
        primary, secondary = mbus_address(meter.address)
        return MbusReadout(
            primary,
            secondary=secondary,
            baud=line.effective_baud,
            response_timeout_s=meter.timeout_s,
            retries=meter.retries,
        )
    kwargs: dict[str, Any] = {}
    if meter.timeout_s is not None:
        kwargs["reaction_timeout_s"] = meter.timeout_s
    return IecReadout(
        meter.address,
        initial_baud=line.effective_baud,
        max_baud=meter.max_baud if meter.max_baud is not None else defaults.iec_max_baud,
        bcc_mode=meter.bcc,
        **kwargs,
    )


def _iec_reading(meter: MeterConfig, result: IecReadoutResult) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    details: dict[str, Any] = {
        "ident": result.ident.raw.decode("latin-1").rstrip("\r\n"),
        "manufacturer": result.ident.manufacturer,
        "mode": result.ident.mode,
        "baud": result.baud,
        "bcc_ok": result.bcc_ok,
        # The data message exactly as received (STX..BCC): the FTP push writes it unchanged.
        "raw": result.raw.decode("latin-1"),
        "raw_encoding": "latin-1",
    }
    if result.naks:
        details["naks"] = result.naks
    return [dict(v) for v in result.to_values()], details


def _mbus_reading(result: MbusReadoutResult) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    details: dict[str, Any] = {}
    if result.telegrams:
        first = result.telegrams[0]
        details["device"] = {
            "id": first.id,
            "manufacturer": first.manufacturer,
            "version": first.version,
            "medium": first.medium_name or first.medium,
            "access_number": first.access_number,
            "status": first.status,
        }
    details["telegrams"] = len(result.telegrams)
    details["frames"] = [base64.b64encode(frame).decode("ascii") for frame in result.frames]
    details["frames_encoding"] = "base64"
    return result.to_values(), details


async def read_meter(
    port: SessionPort,
    meter: MeterConfig,
    line: LineConfig,
    defaults: ReadDefaults | None = None,
) -> MeterReading:
    """One readout on an already leased ``port``; raises the session's typed error on failure."""
    started = time.time()
    session = build_session(meter, line, defaults or ReadDefaults())
    result = await run_session(session, port)
    if isinstance(result, IecReadoutResult):
        values, details = _iec_reading(meter, result)
        retries = result.naks
    elif isinstance(result, MbusReadoutResult):
        values, details = _mbus_reading(result)
        retries = result.retries
    else:
        raise LocalProtocolError(f"unexpected readout result {type(result).__name__}")
    return MeterReading(
        meter=meter.name,
        protocol=meter.protocol,
        values=values,
        details=details,
        started_s=started,
        finished_s=time.time(),
        retries=retries,
    )


def reading_payload(
    reading: MeterReading,
    *,
    seq: int,
    line: str,
    address: str,
    trigger: str = "schedule",
    slot_s: float | None = None,
    clock_synced: bool | None = None,
) -> dict[str, Any]:
    """The ``<p>/meter/<name>/reading`` document (design.md section 6)."""
    payload: dict[str, Any] = {
        "meter": reading.meter,
        "ts": rfc3339_ms(reading.finished_s),
        "seq": seq,
        "values": reading.values,
        "protocol": reading.protocol,
        "line": line,
        "address": address,
        "trigger": trigger,
        "duration_ms": round((reading.finished_s - reading.started_s) * 1000),
    }
    if slot_s is not None:
        payload["slot"] = rfc3339(slot_s)
    if clock_synced is not None:
        payload["clock_synced"] = clock_synced
    if reading.retries:
        payload["retries"] = reading.retries
    payload.update(reading.details)
    return payload
