"""Reading documents exactly as the polling service commits them, for tests, the demo and benchmarks.

:func:`iec_reading` encodes a real IEC 62056-21 data message (with its BCC) and decodes it the way a
readout does, so the ``raw`` readout, ``ident`` and ``values`` agree; :func:`mbus_reading` builds an
M-Bus style document with ``tariff``/``storage`` per value.
"""

from __future__ import annotations

import json
from typing import Any

from dcud.codec.iec62056 import DataSet, dataset_values, encode_data_message
from dcud.service.meter_read import MeterReading, reading_payload

__all__ = ["iec_reading", "mbus_reading", "reading_bytes"]


def iec_reading(
    meter: str, seq: int, ts_s: float, *, energy_kwh: float = 1234.5, tariffs: int = 2
) -> dict[str, Any]:
    """An IEC 62056-21 reading: serial, total and per-tariff energy registers, a power value."""
    datasets = [
        DataSet("C.1.0", [(f"{seq:08d}", None)]),
        DataSet("1.8.0", [(f"{energy_kwh:010.3f}", "kWh")]),
    ]
    for tariff in range(1, tariffs + 1):
        datasets.append(DataSet(f"1.8.{tariff}", [(f"{energy_kwh / tariffs:010.3f}", "kWh")]))
    datasets.append(DataSet("1.7.0", [("01.234", "kW")]))
    raw = encode_data_message(datasets)
    reading = MeterReading(
        meter=meter,
        protocol="iec62056-21",
        values=[dict(v) for v in dataset_values(datasets)],
        details={
            "ident": "/ISK5ME382-1003",
            "manufacturer": "ISK",
            "mode": "C",
            "baud": 9600,
            "bcc_ok": True,
            "raw": raw.decode("latin-1"),
            "raw_encoding": "latin-1",
        },
        started_s=ts_s - 1.5,
        finished_s=ts_s,
    )
    return reading_payload(reading, seq=seq, line="rs485-1", address=f"{seq % 100:08d}")


def mbus_reading(meter: str, seq: int, ts_s: float) -> dict[str, Any]:
    """An M-Bus reading with a total, two tariff registers and a stored value."""
    values: list[dict[str, Any]] = [
        {"id": 0, "value": 12345.0, "unit": "Wh", "quantity": "energy", "storage": 0, "tariff": 0},
        {"id": 1, "value": 6000.0, "unit": "Wh", "quantity": "energy", "storage": 0, "tariff": 1},
        {"id": 2, "value": 6345.0, "unit": "Wh", "quantity": "energy", "storage": 0, "tariff": 2},
        {"id": 3, "value": 11000.0, "unit": "Wh", "quantity": "energy", "storage": 1, "tariff": 0},
    ]
    reading = MeterReading(meter=meter, protocol="mbus", values=values, started_s=ts_s - 1, finished_s=ts_s)
    return reading_payload(reading, seq=seq, line="mbus-1", address=str(seq % 250))


def reading_bytes(payload: dict[str, Any]) -> bytes:
    """The outbox payload of a reading document (compact JSON, as polling stores it)."""
    return json.dumps(payload, separators=(",", ":")).encode()
