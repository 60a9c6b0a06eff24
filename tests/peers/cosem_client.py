"""Drive the DLMS peer with dlms-cosem's blocking client, in a process of its own.

dlms-cosem (Business Source License 1.1) is a test-only dependency and an independent implementation of
the client side; it runs here, never inside dcud or the test process. The test writes a JSON plan (how
to connect and associate, then steps), runs ``python tests/peers/cosem_client.py PLAN``, and reads one
JSON document from stdout: the association outcome and one result per step. Values are decoded by
dlms-cosem itself, so a test that asserts on them checks the peer against a second reading of the
standard.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any


def _quiet() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"octets": bytes(value).hex()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _as_time(raw: bytes) -> str:
    from dlms_cosem import time as cosem_time

    moment, _status = cosem_time.datetime_from_bytes(raw)
    if moment.tzinfo is None:  # dlms-cosem leaves deviation 0 naive: it is UTC here
        moment = moment.replace(tzinfo=dt.UTC)
    text: str = moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return text


def _attribute(step: dict[str, Any]) -> Any:
    from dlms_cosem import cosem, enumerations

    return cosem.CosemAttribute(
        interface=enumerations.CosemInterface(step["class_id"]),
        instance=cosem.Obis.from_string(step["obis"]),
        attribute=step["attr"],
    )


def _client(plan: dict[str, Any]) -> Any:
    from dlms_cosem import security
    from dlms_cosem.client import DlmsClient
    from dlms_cosem.io import BlockingTcpIO, HdlcTransport, SerialIO, TcpTransport

    timeout_s = int(plan.get("timeout_s", 5))
    if plan["transport"] == "tcp":
        transport: Any = TcpTransport(
            client_logical_address=plan["client_sap"],
            server_logical_address=plan.get("logical_device", 1),
            io=BlockingTcpIO(host=plan.get("host", "127.0.0.1"), port=plan["port"], timeout=timeout_s),
            timeout=timeout_s,
        )
    else:
        transport = HdlcTransport(
            client_logical_address=plan["client_sap"],
            server_logical_address=plan.get("logical_device", 1),
            server_physical_address=plan.get("physical_address", 17),
            io=SerialIO(port_name=plan["device"], baud_rate=9600, timeout=timeout_s),
            timeout=timeout_s,
        )
    auth = plan.get("auth", "none")
    if auth == "lls":
        authentication: Any = security.LowLevelSecurityAuthentication(secret=plan["password"].encode())
    elif auth == "hls-gmac":
        # a 64-byte challenge makes dlms-cosem build an invalid AARQ: 32 is the default here
        authentication = security.HighLevelSecurityGmacAuthentication(
            challenge_length=plan.get("challenge_length", 32)
        )
    else:
        authentication = security.NoSecurityAuthentication()
    keys: dict[str, Any] = {}
    if plan.get("block_cipher_key"):
        keys = {
            "encryption_key": bytes.fromhex(plan["block_cipher_key"]),
            "authentication_key": bytes.fromhex(plan["authentication_key"]),
            "client_system_title": bytes.fromhex(plan.get("client_system_title", "4D4D4D0000000001")),
            "client_initial_invocation_counter": plan.get("client_invocation_counter", 1),
        }
    return DlmsClient(
        transport=transport,
        authentication=authentication,
        max_pdu_size=plan.get("max_pdu_size", 65535),
        timeout=timeout_s,
        **keys,
    )


def _step(client: Any, step: dict[str, Any]) -> dict[str, Any]:
    from dlms_cosem import cosem, dlms_data, enumerations, utils
    from dlms_cosem import time as cosem_time
    from dlms_cosem.cosem.capture_object import CaptureObject
    from dlms_cosem.cosem.selective_access import RangeDescriptor

    op = step["op"]
    if op == "get":
        access = None
        if "range" in step:
            clock = cosem.CosemAttribute(
                interface=enumerations.CosemInterface.CLOCK, instance=cosem.Obis(0, 0, 1, 0, 0), attribute=2
            )
            access = RangeDescriptor(
                restricting_object=CaptureObject(cosem_attribute=clock),
                from_value=dt.datetime.fromisoformat(step["range"]["from"]),
                to_value=dt.datetime.fromisoformat(step["range"]["to"]),
            )
        raw = client.get(_attribute(step), access_descriptor=access)
        value = utils.parse_as_dlms_data(raw)
        result: dict[str, Any] = {"ok": True, "raw": raw.hex(), "value": _jsonable(value)}
        if step.get("as_time"):
            result["time"] = _as_time(value)
        if step.get("rows"):
            result["rows"] = [[_as_time(row[0]), *_jsonable(row[1:])] for row in value]
        return result
    if op == "set":
        if "time" in step:
            moment = dt.datetime.fromisoformat(step["time"].replace("Z", "+00:00"))
            data = dlms_data.OctetStringData(cosem_time.datetime_to_bytes(moment)).to_bytes()
        else:
            data = bytes.fromhex(step["data_hex"])
        response = client.set(_attribute(step), data)
        return {
            "ok": True,
            "response": type(response).__name__,
            "result": _jsonable(getattr(response, "result", None)),
        }
    if op == "release":
        response = client.release_association()
        return {"ok": True, "response": type(response).__name__}
    raise ValueError(f"unknown step {op!r}")


def run(plan: dict[str, Any]) -> dict[str, Any]:
    """Connect, associate, run the steps, release and disconnect; every failure is reported, not raised."""
    _quiet()
    out: dict[str, Any] = {"steps": []}
    client = _client(plan)
    try:
        client.connect()
    except Exception as exc:
        out["connect"] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        return out
    out["connect"] = {"ok": True}
    try:
        try:
            client.associate()
            out["associate"] = {"ok": True}
        except Exception as exc:
            out["associate"] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            return out
        for step in plan.get("steps", []):
            try:
                out["steps"].append(_step(client, step))
            except Exception as exc:
                out["steps"].append({"ok": False, "error": type(exc).__name__, "message": str(exc)})
                if not step.get("continue_on_error"):
                    return out
        if plan.get("release", True):
            try:
                client.release_association()
                out["release"] = {"ok": True}
            except Exception as exc:
                out["release"] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    finally:
        try:
            client.disconnect()
            out["disconnect"] = {"ok": True}
        except Exception as exc:
            out["disconnect"] = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    return out


if __name__ == "__main__":
    try:
        result = run(json.loads(Path(sys.argv[1]).read_text()))
    except Exception as exc:
        result = {"crashed": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    print(json.dumps(result))
