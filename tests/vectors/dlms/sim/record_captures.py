"""Record the simulator captures of this folder again: ``python tests/vectors/dlms/sim/record_captures.py``.

dcud's client session against ``dcud sim dlms`` (in this process, host clock fixed at 2024-06-01T12:00Z,
the meter's HLS challenge seeded, the client's challenge and invocation counters fixed), with every chunk
written and read kept in order. Over HDLC (a socat pty pair): the management client 1 with HLS-GMAC,
authenticated and encrypted, Green Book keys. Over the wrapper: the public client 16.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # tests/, for the helpers

from dcud.codec.dlms.client import DlmsClientConfig, GetRequest, SetRequest  # noqa: E402
from dcud.codec.dlms.cosem import clock_value, range_descriptor  # noqa: E402
from dcud.codec.dlms.obis import AttributeRef  # noqa: E402
from dcud.sim.dlms_sim import config_from_dict  # noqa: E402

from helpers.dlms_sim import HostClock, hls_config, record_hdlc_session, record_tcp_session, running  # noqa: E402
from helpers.meters import SocatPair  # noqa: E402

NOW = "2024-06-01T12:00:00Z"


async def record(tmp: Path) -> None:
    pair = SocatPair(tmp / "client-tty", tmp / "meter-tty")
    pair.start()
    meter = {
        "name": "em-1",
        "line": "dlms",
        "tcp_port": 0,
        "profile_start": "2024-05-30T00:00:00Z",
        "challenge_seed": "capture",
        "invocation_counter": 1000,
    }
    config = config_from_dict({"line": [{"name": "dlms", "device": str(pair.b)}], "meter": [meter]})
    six_hours = range_descriptor(datetime(2024, 6, 1, 6, tzinfo=UTC), datetime(2024, 6, 1, 12, tzinfo=UTC))
    requests = [
        GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/2")),
        GetRequest(AttributeRef.parse("3/1.0.1.8.0.255/3")),
        GetRequest(AttributeRef.parse("8/0.0.1.0.0.255/2")),
        GetRequest(AttributeRef.parse("7/1.0.99.1.0.255/2"), six_hours),
        SetRequest(
            AttributeRef.parse("8/0.0.1.0.0.255/2"), clock_value(datetime(2024, 6, 1, 12, 0, 5, tzinfo=UTC))
        ),
    ]
    try:
        async with running(config, HostClock(NOW)) as sim:
            client = hls_config(invocation_counter=500, challenge=b"dcud-sim-capture-challenge-00001")
            hls = await record_hdlc_session(pair.a, client, requests, 1)
            (HERE / "hdlc_hls_gmac_ciphered.hex").write_text(
                hls.hex_text(
                    "dcud sim dlms, HDLC: client 1 (HLS-GMAC, authenticated and encrypted, Green Book"
                    " keys, client system title 4D4D4D0000000001) reads 1.0.1.8.0.255, the clock, 6 h of"
                    f" the load profile (two GET blocks) and sets the clock; meter time {NOW}"
                )
            )
            public = await record_tcp_session(sim.tcp_port("em-1"), DlmsClientConfig(), requests[:4], 16)
            (HERE / "wrapper_public.hex").write_text(
                public.hex_text(
                    "dcud sim dlms, TCP wrapper: the public client 16 reads 1.0.1.8.0.255 (value and"
                    f" scaler_unit), the clock and 6 h of the load profile; meter time {NOW}"
                )
            )
    finally:
        pair.kill()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(record(Path(directory)))
