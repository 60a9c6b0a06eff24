"""IEC 62056-21 data message decode throughput: one JSON line on stdout.

Decodes a typical mode C readout (identification + data message of a three-phase meter, ~60 data sets)
through ``IecReceiver`` (framing, BCC, data sets) and ``to_values``-style conversion, for a bounded
number of iterations or seconds, whichever ends first.

    python bench/bench_iec_decode.py [--seconds 2] [--max-iterations 200000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from dcud.codec.iec62056 import DataMessage, DataSet, IecReceiver, dataset_values, encode_data_message


def sample_datasets() -> list[DataSet]:
    datasets = [DataSet("0.0.0", [("12345678", None)]), DataSet("F.F", [("00000000", None)])]
    for c in (1, 2, 3, 4, 5, 6, 7, 8):
        for e in range(5):
            datasets.append(DataSet(f"1-0:{c}.8.{e}*255", [(f"{c * 1000 + e:011.3f}", "kWh")]))
    for c, unit in ((32, "V"), (52, "V"), (72, "V"), (31, "A"), (51, "A"), (71, "A"), (14, "Hz")):
        datasets.append(DataSet(f"1-0:{c}.7.0", [("230.12", unit)]))
    datasets.append(DataSet("1.6.0", [("02.345", "kW"), ("24-03-12 08:15", None)]))
    datasets.append(DataSet("0.1.2*04", [("2403010000", None), ("2402010000", None)]))
    return datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--max-iterations", type=int, default=200_000)
    args = parser.parse_args()

    datasets = sample_datasets()
    stream = b"/ISk5MT174-0001\r\n" + encode_data_message(datasets)
    values_per_message = sum(len(ds.values) for ds in datasets)

    rx = IecReceiver()
    count = 0
    start = time.perf_counter()
    stop = start + args.seconds
    while count < args.max_iterations:
        rx.receive_data(stream)
        rx.next_message()  # identification
        msg = rx.next_message()
        assert isinstance(msg, DataMessage) and len(msg.datasets) == len(datasets)
        values = dataset_values(msg.datasets)
        assert len(values) == values_per_message
        count += 1
        if count % 100 == 0 and time.perf_counter() >= stop:
            break
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "bench": "iec_decode",
                "messages_per_s": round(count / elapsed, 1),
                "bytes_per_s": round(count * len(stream) / elapsed),
                "message_bytes": len(stream),
                "datasets_per_message": len(datasets),
                "values_per_message": values_per_message,
                "iterations": count,
                "elapsed_s": round(elapsed, 3),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
