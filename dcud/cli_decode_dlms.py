"""``dcud decode dlms FILE|-``: decode a captured DLMS/COSEM exchange offline, one JSON line per frame.

The capture is hex text (any whitespace, ``:``/``,`` separators, ``0x`` prefixes, ``#`` comments) or raw
bytes, of HDLC frames (IEC 62056-46, mode E sign-on bytes before them are skipped), wrapper frames
(IEC 62056-47) or bare APDUs (one per line of hex text). The framing is detected from the first bytes
unless ``--framing`` says it. Each frame becomes one JSON object: its fields (addresses, control,
sequence numbers, segmentation; wPorts and length), and, where a frame completes an APDU (HDLC
segments are reassembled per direction), the APDU decoded: AARQ/AARE fields, the xDLMS initiate,
GET/SET/ACTION with their class/OBIS/attribute and selective access, A-XDR data as typed JSON, GET data
blocks reassembled into the value on the last block.

Ciphered APDUs (glo-*, ded-*, general-glo/ded-ciphering and the glo-initiate of the AARQ/AARE) are
deciphered when keys are given (``--key`` block cipher key, ``--auth-key`` authentication key, or
``--key-file``): the sender's system title comes from the AARQ (client) and AARE (meter) of the same
capture, from the APDU itself (general ciphering), or from ``--system-title`` (the meter's) and
``--client-system-title``. With the keys, the HLS-GMAC answers f(StoC) and f(CtoS) are verified too.
Keys and LLS passwords are never printed (the password shows as its length).

A frame that does not decode gets an ``error`` and the next frame is decoded all the same. The command
exits 0 when every frame decoded, else 1 (:class:`~dcud.cli_meters.CliError`) after printing them all.
"""

from __future__ import annotations

import json
import math
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dcud.codec.dlms.apdu import (
    AARE,
    AARQ,
    DIAGNOSTIC_SOURCE_USER,
    PLAIN_TAG_OF,
    RLRE,
    RLRQ,
    TAG_GENERAL_DED_CIPHERING,
    TAG_GENERAL_GLO_CIPHERING,
    AccessResult,
    AccessSelection,
    ActionRequestNextPblock,
    ActionRequestNormal,
    ActionRequestWithFirstPblock,
    ActionRequestWithList,
    ActionRequestWithPblock,
    ActionResponseNextPblock,
    ActionResponseNormal,
    ActionResponseWithList,
    ActionResponseWithPblock,
    ActionResult,
    Apdu,
    ApplicationContext,
    AssociationResult,
    CipheredApdu,
    ConfirmedServiceError,
    Conformance,
    ExceptionResponse,
    GeneralCiphering,
    GetDataResult,
    GetRequestNext,
    GetRequestNormal,
    GetRequestWithList,
    GetResponseNormal,
    GetResponseWithDatablock,
    GetResponseWithList,
    InitiateRequest,
    InitiateResponse,
    Mechanism,
    SetRequestNormal,
    SetRequestWithDatablock,
    SetRequestWithFirstDatablock,
    SetRequestWithList,
    SetResponseDatablock,
    SetResponseLastDatablock,
    SetResponseNormal,
    SetResponseWithList,
    decode_apdu,
    decode_get_results,
    result_text,
)
from dcud.codec.dlms.axdr import (
    Array,
    BitString,
    Boolean,
    CompactArray,
    CosemDateTime,
    Data,
    Date,
    DateTime,
    DontCare,
    Float32,
    Float64,
    Null,
    OctetString,
    Structure,
    Time,
    Utf8String,
    VisibleString,
    decode_data,
)
from dcud.codec.dlms.cosem import (
    ASSOCIATION_LN_OBIS,
    ASSOCIATION_REPLY_TO_HLS,
    SELECTOR_ENTRY,
    SELECTOR_RANGE,
)
from dcud.codec.dlms.hdlc import (
    FLAG,
    LLC_REQUEST,
    LLC_RESPONSE,
    FrameKind,
    HdlcAddress,
    HdlcFrame,
    HdlcFrameReader,
    decode_parameters,
    describe_frmr,
)
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.security import KEY_BYTES, SYSTEM_TITLE_BYTES, Keys, unprotect, verify_hls_gmac
from dcud.codec.dlms.wrapper import HEADER_BYTES, WRAPPER_VERSION
from dcud.config.dlms import DlmsConfigError, read_key_file
from dcud.errors import DcudError, RemoteProtocolError

FRAMINGS = ("auto", "hdlc", "wrapper", "apdu")
CLIENT = "client->server"
SERVER = "server->client"
_REQUEST_TAGS = {0x01, 0x60, 0x62, 0xC0, 0xC1, 0xC3}
"""Plain tags a client sends (initiate request, AARQ, RLRQ, GET, SET, ACTION); the rest are the meter's."""
_HEX = set(string.hexdigits)
MAX_CAPTURE_BYTES = 64 * 1024 * 1024


class DecodeError(DcudError):
    """Bad input to ``dcud decode dlms`` (not hex/binary, bad key, unknown framing)."""


# ---------------------------------------------------------------------------------------------------
# Input


def parse_capture(raw: bytes) -> list[bytes]:
    """The capture as chunks: one per line of hex text (comments and separators removed), or the raw
    bytes as one chunk when it is not hex text."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return [raw]
    lines: list[bytes] = []
    for line in text.splitlines():
        content = line.split("#", 1)[0].replace("0x", "").replace("0X", "")
        content = content.replace(":", " ").replace(",", " ")
        if not content.strip():
            continue
        digits = "".join(content.split())
        if not set(digits) <= _HEX:
            return [raw]  # not hex text: the bytes themselves
        if len(digits) % 2:
            raise DecodeError(f"odd number of hex digits on the line {line.strip()[:60]!r}")
        lines.append(bytes.fromhex(digits))
    return lines or [raw]


def detect_framing(data: bytes) -> str:
    """``hdlc`` (starts with a flag, or a mode E sign-on), ``wrapper`` (version 0001) or ``apdu``."""
    if data[:1] == bytes([FLAG]) or data.startswith(b"/?"):
        return "hdlc"
    if len(data) >= HEADER_BYTES and int.from_bytes(data[:2], "big") == WRAPPER_VERSION:
        return "wrapper"
    return "apdu"


def _hex_key(value: str, what: str, size: int) -> bytes:
    try:
        data = bytes.fromhex(value.replace(" ", "").replace(":", ""))
    except ValueError:
        raise DecodeError(f"{what} is not hex") from None
    if len(data) != size:
        raise DecodeError(f"{what} must be {size} bytes ({2 * size} hex digits), not {len(data)}")
    return data


@dataclass
class KeyMaterial:
    """What deciphering needs; the keys never appear in ``repr()`` or output."""

    block_cipher_key: bytes | None = field(default=None, repr=False)
    authentication_key: bytes | None = field(default=None, repr=False)
    server_title: bytes | None = None
    client_title: bytes | None = None

    @classmethod
    def from_options(
        cls,
        key: str | None = None,
        auth_key: str | None = None,
        key_file: str | None = None,
        system_title: str | None = None,
        client_system_title: str | None = None,
    ) -> KeyMaterial:
        """From the command line; a key file holds ``block_cipher_key``/``authentication_key`` (hex) as
        TOML or JSON, read as dcud.toml's ``key_file`` is (:func:`dcud.config.dlms.read_key_file`), but
        either key may be left out."""
        found: dict[str, str] = {}
        if key_file:
            try:
                parsed = read_key_file(Path(key_file))
            except DlmsConfigError as exc:
                raise DecodeError(str(exc)) from None
            unknown = set(parsed) - {"block_cipher_key", "authentication_key"}
            if unknown:
                raise DecodeError(f"{key_file}: unknown keys {sorted(unknown)}")
            found = {k: str(v) for k, v in parsed.items()}
        if key:
            found["block_cipher_key"] = key
        if auth_key:
            found["authentication_key"] = auth_key
        material = cls()
        if "block_cipher_key" in found:
            material.block_cipher_key = _hex_key(found["block_cipher_key"], "the block cipher key", KEY_BYTES)
        if "authentication_key" in found:
            material.authentication_key = _hex_key(
                found["authentication_key"], "the authentication key", KEY_BYTES
            )
        if system_title:
            material.server_title = _hex_key(system_title, "--system-title", SYSTEM_TITLE_BYTES)
        if client_system_title:
            material.client_title = _hex_key(client_system_title, "--client-system-title", SYSTEM_TITLE_BYTES)
        return material


# ---------------------------------------------------------------------------------------------------
# A-XDR data as JSON


def _datetime_text(value: CosemDateTime) -> str:
    try:
        return value.to_datetime().isoformat()
    except RemoteProtocolError:
        return str(value)


def data_json(value: Data) -> Any:
    """A-XDR data as typed JSON: ``{"<type>": value}``; arrays and structures hold lists of the same.
    Octet strings are hex, with ``"date-time"`` beside when they hold a valid 12-byte date-time."""
    if isinstance(value, Array | Structure):
        return {value.NAME: [data_json(item) for item in value.items]}
    if isinstance(value, CompactArray):
        return {value.NAME: [data_json(item) for item in value.items]}
    if isinstance(value, Null | DontCare):
        return {value.NAME: None}
    if isinstance(value, OctetString):
        out: dict[str, Any] = {value.NAME: value.value.hex()}
        if len(value.value) == CosemDateTime.SIZE:
            try:
                moment = CosemDateTime.from_bytes(value.value).to_datetime()
            except RemoteProtocolError:
                pass
            else:
                out["date-time"] = moment.isoformat()
        return out
    if isinstance(value, DateTime):
        return {value.NAME: _datetime_text(value.value)}
    if isinstance(value, Date | Time):
        return {value.NAME: value.value.to_bytes().hex()}
    if isinstance(value, BitString):
        return {value.NAME: value.bits}
    if isinstance(value, Float32 | Float64):
        number = value.value
        return {value.NAME: number if math.isfinite(number) else str(number)}
    if isinstance(value, VisibleString | Utf8String | Boolean):
        return {value.NAME: value.value}
    raw = getattr(value, "value", None)
    return {value.NAME: raw}


def _result_json(result: GetDataResult) -> Any:
    if isinstance(result, AccessResult):
        return {"access_result": result.code, "text": result.text}
    return data_json(result)


# ---------------------------------------------------------------------------------------------------
# APDUs as JSON


def _invoke(iip: int) -> dict[str, Any]:
    return {
        "invoke_id": iip & 0x0F,
        "priority": "high" if iip & 0x80 else "normal",
        "confirmed": bool(iip & 0x40),
    }


def _attribute(ref: AttributeRef, name: str = "attribute") -> dict[str, Any]:
    """``ref`` as text under ``name`` (an ACTION's ``method``), and its class, OBIS code and index."""
    return {name: str(ref), "class_id": ref.class_id, "obis": str(ref.obis), "index": ref.index}


def _access(access: AccessSelection | None) -> dict[str, Any] | None:
    if access is None:
        return None
    out: dict[str, Any] = {"selector": access.selector, "parameters": data_json(access.parameters)}
    items = access.parameters.items if isinstance(access.parameters, Structure) else ()
    if access.selector == SELECTOR_RANGE and len(items) == 4:
        for name, item in (("from", items[1]), ("to", items[2])):
            if isinstance(item, OctetString) and len(item.value) == CosemDateTime.SIZE:
                out[name] = _datetime_text(CosemDateTime.from_bytes(item.value))
            elif isinstance(item, DateTime):
                out[name] = _datetime_text(item.value)
    elif access.selector == SELECTOR_ENTRY and len(items) == 4:
        out |= dict(
            zip(
                ("from_entry", "to_entry", "from_column", "to_column"),
                (data_json(i) for i in items),
                strict=True,
            )
        )
    return out


def _name(table: type[Any], value: int | None) -> str | int | None:
    if value is None:
        return None
    try:
        return str(table(value).name)
    except ValueError:
        return value


def _conformance(value: int) -> dict[str, Any]:
    return {
        "value": f"{int(value):06X}",
        "services": [flag.name.lower() for flag in Conformance if flag.name and value & flag],
    }


def _action_result(result: ActionResult) -> dict[str, Any]:
    out: dict[str, Any] = {"result": result.result, "text": result.text}
    if result.return_parameters is not None:
        out["return"] = _result_json(result.return_parameters)
    return out


@dataclass
class _Stream:
    """What a capture tells about later frames: system titles, challenges, blocks in progress."""

    keys: KeyMaterial
    ctos: bytes | None = None
    stoc: bytes | None = None
    dedicated_key: bytes | None = field(default=None, repr=False)
    get_blocks: bytearray = field(default_factory=bytearray)
    get_list: bool = False
    set_blocks: bytearray = field(default_factory=bytearray)
    problems: list[dict[str, str]] = field(default_factory=list)
    """Errors inside an APDU that still decoded (a user-information that did not): the frame's error."""

    def title_of(self, direction: str | None) -> bytes | None:
        if direction == CLIENT:
            return self.keys.client_title
        if direction == SERVER:
            return self.keys.server_title
        return None


def direction_of_apdu(data: bytes) -> str | None:
    """Who sent an APDU, from its tag (ciphered ones by the tag they carry)."""
    if not data:
        return None
    tag = PLAIN_TAG_OF.get(data[0], data[0])
    if tag in (TAG_GENERAL_GLO_CIPHERING, TAG_GENERAL_DED_CIPHERING):
        return None
    return CLIENT if tag in _REQUEST_TAGS else SERVER


def decode_apdu_json(data: bytes, stream: _Stream, direction: str | None) -> dict[str, Any]:
    """One APDU as JSON (raises DcudError when it does not decode, or when a part of it did not)."""
    stream.problems.clear()
    apdu = decode_apdu(data)
    out = _apdu_json(apdu, stream, direction or direction_of_apdu(data))
    if stream.problems:
        problem = stream.problems[0]
        stream.problems.clear()
        raise _PartlyDecoded(out, problem)
    return out


class _PartlyDecoded(DcudError):
    """An APDU decoded except for a part (carried in ``apdu``; ``problem`` says what)."""

    def __init__(self, apdu: dict[str, Any], problem: dict[str, str]) -> None:
        super().__init__(problem["message"])
        self.apdu = apdu
        self.problem = problem


def _apdu_json(apdu: Apdu, stream: _Stream, direction: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(apdu).__name__}
    if isinstance(apdu, AARQ):
        out |= _aarq_json(apdu, stream)
    elif isinstance(apdu, AARE):
        out |= _aare_json(apdu, stream)
    elif isinstance(apdu, RLRQ | RLRE):
        out["reason"] = apdu.reason
        if apdu.user_information is not None:
            sender = CLIENT if isinstance(apdu, RLRQ) else SERVER
            out["user_information"] = _user_information(apdu.user_information, stream, sender)
    elif isinstance(apdu, InitiateRequest):
        out |= {
            "dlms_version": apdu.dlms_version,
            "conformance": _conformance(apdu.conformance),
            "max_receive_pdu_size": apdu.max_receive_pdu_size,
            "dedicated_key": None
            if apdu.dedicated_key is None
            else {"hidden": True, "bytes": len(apdu.dedicated_key)},
            "response_allowed": apdu.response_allowed,
            "quality_of_service": apdu.quality_of_service,
        }
        stream.dedicated_key = apdu.dedicated_key
    elif isinstance(apdu, InitiateResponse):
        out |= {
            "dlms_version": apdu.dlms_version,
            "conformance": _conformance(apdu.conformance),
            "max_receive_pdu_size": apdu.max_receive_pdu_size,
            "vaa_name": apdu.vaa_name,
        }
    elif isinstance(apdu, ConfirmedServiceError):
        out |= {"service": apdu.service, "error_class": apdu.error_class, "error_code": apdu.error_code}
        out["text"] = apdu.text
    elif isinstance(apdu, ExceptionResponse):
        out |= {"state_error": apdu.state_error, "service_error": apdu.service_error, "text": apdu.text}
        if apdu.invocation_counter is not None:
            out["invocation_counter"] = apdu.invocation_counter
    elif isinstance(apdu, CipheredApdu | GeneralCiphering):
        out |= _ciphered_json(apdu, stream, direction)
    else:
        out |= _service_json(apdu, stream)
    return out


def _aarq_json(apdu: AARQ, stream: _Stream) -> dict[str, Any]:
    if apdu.calling_ap_title is not None and len(apdu.calling_ap_title) == SYSTEM_TITLE_BYTES:
        stream.keys.client_title = stream.keys.client_title or apdu.calling_ap_title
    out: dict[str, Any] = {
        "application_context": _name(ApplicationContext, apdu.application_context),
        "calling_ap_title": None if apdu.calling_ap_title is None else apdu.calling_ap_title.hex().upper(),
        "mechanism": _name(Mechanism, apdu.mechanism),
    }
    value = apdu.authentication_value
    if value is not None:
        if apdu.mechanism == Mechanism.LLS:
            out["authentication_value"] = {"hidden": True, "bytes": len(value)}  # the LLS password
        else:
            out["authentication_value"] = value.hex().upper()
            stream.ctos = value
    if apdu.extra:
        out["other_fields"] = [f"{tag:02X}" for tag, _ in apdu.extra]
    if apdu.user_information is not None:
        out["user_information"] = _user_information(apdu.user_information, stream, CLIENT)
    return out


def _aare_json(apdu: AARE, stream: _Stream) -> dict[str, Any]:
    if apdu.responding_ap_title is not None and len(apdu.responding_ap_title) == SYSTEM_TITLE_BYTES:
        stream.keys.server_title = stream.keys.server_title or apdu.responding_ap_title
    out: dict[str, Any] = {
        "application_context": _name(ApplicationContext, apdu.application_context),
        "result": _name(AssociationResult, apdu.result),
        "diagnostic": apdu.diagnostic,
        "diagnostic_text": apdu.diagnostic_text,
        "diagnostic_source": "user" if apdu.diagnostic_source == DIAGNOSTIC_SOURCE_USER else "provider",
        "responding_ap_title": None
        if apdu.responding_ap_title is None
        else apdu.responding_ap_title.hex().upper(),
        "mechanism": _name(Mechanism, apdu.mechanism),
    }
    if apdu.authentication_value is not None:
        out["authentication_value"] = apdu.authentication_value.hex().upper()
        stream.stoc = apdu.authentication_value
    if apdu.user_information is not None:
        out["user_information"] = _user_information(apdu.user_information, stream, SERVER)
    return out


def _user_information(data: bytes, stream: _Stream, sender: str) -> dict[str, Any]:
    # The rest of the AARQ/AARE (system titles, challenges) still counts: the error is kept beside it.
    try:
        return _apdu_json(decode_apdu(data), stream, sender)
    except DcudError as exc:
        error = {"type": type(exc).__name__, "message": f"user-information: {exc}"}
        stream.problems.append(error)
        return {"error": error}


def _ciphered_json(
    apdu: CipheredApdu | GeneralCiphering, stream: _Stream, direction: str | None
) -> dict[str, Any]:
    content = apdu.content
    out: dict[str, Any] = {"tag": f"{apdu.tag:02X}"}
    if isinstance(apdu, CipheredApdu):
        out["carries"] = f"{apdu.plain_tag:02X}"
        dedicated = apdu.dedicated
        title = stream.title_of(direction or direction_of_apdu(bytes([apdu.plain_tag])))
    else:
        dedicated = apdu.tag == TAG_GENERAL_DED_CIPHERING
        title = apdu.system_title
        out["system_title"] = title.hex().upper()
    out["dedicated"] = dedicated
    if len(content) >= 5:
        out["security_control"] = f"{content[0]:02X}"
        out["invocation_counter"] = int.from_bytes(content[1:5], "big")
    keys = stream.keys
    ek = stream.dedicated_key if dedicated else keys.block_cipher_key
    if ek is None:
        out["deciphered"] = None
        out["note"] = "no dedicated key in the capture" if dedicated else "no --key given"
        return out
    if title is None:
        raise DecodeError(
            "the sender's system title is unknown (no AARQ/AARE with it in the capture): "
            "give --system-title (the meter's) or --client-system-title"
        )
    authenticated = len(content) >= 1 and bool(content[0] & 0x10)
    if authenticated and keys.authentication_key is None:
        raise DecodeError("an authenticated APDU needs --auth-key to be deciphered")
    material = Keys(ek, keys.authentication_key or bytes(KEY_BYTES))
    try:
        opened = unprotect(content, system_title=title, keys=material)
        inner = decode_apdu(opened.plaintext)
        if isinstance(inner, CipheredApdu | GeneralCiphering):
            raise RemoteProtocolError("a ciphered APDU carries another ciphered APDU", opened.plaintext[:64])
    except DcudError as exc:
        # What the header says is still worth showing: the error goes beside it.
        out["deciphered"] = None
        stream.problems.append({"type": type(exc).__name__, "message": str(exc)})
        return out
    out["deciphered"] = _apdu_json(inner, stream, direction or direction_of_apdu(opened.plaintext))
    return out


def _service_json(apdu: Apdu, stream: _Stream) -> dict[str, Any]:
    out: dict[str, Any] = {}
    iip = getattr(apdu, "invoke_id_and_priority", None)
    if isinstance(iip, int):
        out |= _invoke(iip)
    if isinstance(apdu, GetRequestNormal):
        out |= _attribute(apdu.attribute)
        out["access"] = _access(apdu.access)
        stream.get_list = False
    elif isinstance(apdu, GetRequestWithList):
        out["items"] = [{**_attribute(i.attribute), "access": _access(i.access)} for i in apdu.items]
        stream.get_list = True
    elif isinstance(
        apdu, GetRequestNext | ActionRequestNextPblock | ActionResponseNextPblock | SetResponseDatablock
    ):
        out["block_number"] = apdu.block_number
    elif isinstance(apdu, GetResponseNormal):
        out["result"] = _result_json(apdu.result)
    elif isinstance(apdu, GetResponseWithList):
        out["results"] = [_result_json(r) for r in apdu.results]
    elif isinstance(apdu, GetResponseWithDatablock):
        out |= {"last_block": apdu.last_block, "block_number": apdu.block_number}
        if isinstance(apdu.raw_data, AccessResult):
            out["result"] = _result_json(apdu.raw_data)
            stream.get_blocks.clear()
        else:
            if apdu.block_number == 1:
                stream.get_blocks.clear()
            stream.get_blocks += apdu.raw_data
            out["raw_bytes"] = len(apdu.raw_data)
            if apdu.last_block:
                raw = bytes(stream.get_blocks)
                stream.get_blocks.clear()
                out["reassembled_bytes"] = len(raw)
                if stream.get_list:
                    out["results"] = [_result_json(r) for r in decode_get_results(raw)]
                else:
                    out["result"] = data_json(decode_data(raw))
    elif isinstance(apdu, SetRequestNormal):
        out |= _attribute(apdu.attribute) | {"access": _access(apdu.access), "value": data_json(apdu.value)}
    elif isinstance(apdu, SetRequestWithList):
        out["items"] = [
            {**_attribute(i.attribute), "access": _access(i.access), "value": data_json(v)}
            for i, v in zip(apdu.items, apdu.values, strict=True)
        ]
    elif isinstance(apdu, SetRequestWithFirstDatablock | SetRequestWithDatablock):
        if isinstance(apdu, SetRequestWithFirstDatablock):
            out |= _attribute(apdu.attribute)
            stream.set_blocks.clear()
        out |= {
            "last_block": apdu.last_block,
            "block_number": apdu.block_number,
            "raw_bytes": len(apdu.raw_data),
        }
        stream.set_blocks += apdu.raw_data
        if apdu.last_block:
            out["value"] = data_json(decode_data(bytes(stream.set_blocks)))
            stream.set_blocks.clear()
    elif isinstance(apdu, SetResponseNormal | SetResponseLastDatablock):
        out |= {"result": apdu.result, "text": result_text(apdu.result)}
        if isinstance(apdu, SetResponseLastDatablock):
            out["block_number"] = apdu.block_number
    elif isinstance(apdu, SetResponseWithList):
        out["results"] = [{"result": r, "text": result_text(r)} for r in apdu.results]
    elif isinstance(apdu, ActionRequestNormal):
        out |= _attribute(apdu.method, "method")
        out["parameters"] = None if apdu.parameters is None else data_json(apdu.parameters)
        hls = apdu.method.obis == ASSOCIATION_LN_OBIS and apdu.method.index == ASSOCIATION_REPLY_TO_HLS
        if hls and isinstance(apdu.parameters, OctetString):
            out["hls"] = _verify_hls(apdu.parameters, stream, CLIENT)
    elif isinstance(apdu, ActionRequestWithList):
        out["methods"] = [str(m) for m in apdu.methods]
        out["parameters"] = [data_json(p) for p in apdu.parameters]
    elif isinstance(apdu, ActionRequestWithFirstPblock | ActionRequestWithPblock | ActionResponseWithPblock):
        if isinstance(apdu, ActionRequestWithFirstPblock):
            out["method"] = str(apdu.method)
        out |= {
            "last_block": apdu.last_block,
            "block_number": apdu.block_number,
            "raw_bytes": len(apdu.raw_data),
        }
    elif isinstance(apdu, ActionResponseNormal):
        out |= _action_result(apdu.result)
        returned = apdu.result.return_parameters
        if stream.ctos is not None and isinstance(returned, OctetString) and len(returned.value) == 17:
            out["hls"] = _verify_hls(returned, stream, SERVER)
    elif isinstance(apdu, ActionResponseWithList):
        out["results"] = [_action_result(r) for r in apdu.results]
    return out


def _verify_hls(answer: Data | None, stream: _Stream, sender: str) -> dict[str, Any]:
    """Check an HLS-GMAC answer: f(StoC) from the client, f(CtoS) from the meter."""
    challenge = stream.stoc if sender == CLIENT else stream.ctos
    keys = stream.keys
    title = stream.title_of(sender)
    what = "f(StoC)" if sender == CLIENT else "f(CtoS)"
    if keys.block_cipher_key is None or keys.authentication_key is None:
        return {"answer": what, "verified": None, "note": "give --key and --auth-key to verify it"}
    if challenge is None or title is None:
        return {
            "answer": what,
            "verified": None,
            "note": "the challenge or the system title is not in the capture",
        }
    value = answer.value if isinstance(answer, OctetString) else b""
    verified = verify_hls_gmac(
        value,
        system_title=title,
        keys=Keys(keys.block_cipher_key, keys.authentication_key),
        challenge=challenge,
    )
    return {"answer": what, "verified": verified}


# ---------------------------------------------------------------------------------------------------
# Framings


def _station(address: HdlcAddress) -> str:
    return str(address) if address.lower is None else f"{address.upper}/{address.lower}"


class _Hdlc:
    """HDLC frames of a capture, with the direction learnt from SNRM/UA and the LLC header, and the
    segments of each direction reassembled."""

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.client: HdlcAddress | None = None
        self.parts: dict[str, list[bytes]] = {CLIENT: [], SERVER: []}

    def direction(self, frame: HdlcFrame) -> str | None:
        kind = frame.kind
        if kind in (FrameKind.SNRM, FrameKind.DISC):
            self.client = frame.source
            return CLIENT
        if kind in (FrameKind.UA, FrameKind.DM, FrameKind.FRMR):
            self.client = frame.destination
            return SERVER
        if self.client is not None:
            if frame.source.same_station(self.client):
                return CLIENT
            if frame.destination.same_station(self.client):
                return SERVER
        if kind is FrameKind.I and frame.info[:3] in (LLC_REQUEST, LLC_RESPONSE):
            sender = CLIENT if frame.info[:3] == LLC_REQUEST else SERVER
            self.client = frame.source if sender == CLIENT else frame.destination
            return sender
        if frame.source.size_bytes == 1 and frame.destination.size_bytes > 1:
            return CLIENT
        if frame.destination.size_bytes == 1 and frame.source.size_bytes > 1:
            return SERVER
        return None

    def entry(self, frame: HdlcFrame, size: int) -> dict[str, Any]:
        direction = self.direction(frame)
        out: dict[str, Any] = {
            "framing": "hdlc",
            "direction": direction,
            "bytes": size,
            "destination": _station(frame.destination),
            "source": _station(frame.source),
            "address_bytes": [frame.destination.size_bytes, frame.source.size_bytes],
            "control": f"{frame.control:02X}",
            "kind": frame.kind.value,
            "poll_final": frame.poll_final,
        }
        if frame.kind is FrameKind.I:
            out |= {"ns": frame.ns, "nr": frame.nr, "segmented": frame.segmented}
        elif frame.kind in (FrameKind.RR, FrameKind.RNR):
            out["nr"] = frame.nr
        if frame.info:
            out["info_bytes"] = len(frame.info)
        if frame.kind in (FrameKind.SNRM, FrameKind.UA) and frame.info:
            params = decode_parameters(frame.info)
            out["parameters"] = {
                "max_info_tx": params.max_info_tx,
                "max_info_rx": params.max_info_rx,
                "window_tx": params.window_tx,
                "window_rx": params.window_rx,
            }
        if frame.kind is FrameKind.FRMR:
            out["reject"] = describe_frmr(frame.info)
        if frame.kind is FrameKind.I or (frame.kind is FrameKind.UI and frame.info):
            self._information(frame, direction, out)
        return out

    def _information(self, frame: HdlcFrame, direction: str | None, out: dict[str, Any]) -> None:
        key = direction or CLIENT
        parts = self.parts[key]
        parts.append(frame.info)
        if frame.segmented:
            out["segment"] = len(parts)
            return
        data = b"".join(parts)
        self.parts[key] = []
        if len(parts) > 1:
            out["segments"] = len(parts)
        if data[:2] != b"\xe6\xe6" and data[:2] != b"\xe6\xe7":
            raise RemoteProtocolError(
                f"information without the LLC header (starts {data[:3].hex()})", data[:64]
            )
        out["direction"] = direction
        _decode_into(out, data[3:], self.stream)

    def frames(self, data: bytes) -> Iterator[dict[str, Any]]:
        reader = HdlcFrameReader()
        reader.receive_data(data)
        for _ in range(len(data) + 1):
            skipped = reader.discarded_bytes
            try:
                frame = reader.next_frame()
            except RemoteProtocolError as exc:
                yield {"framing": "hdlc", "error": {"type": type(exc).__name__, "message": str(exc)}}
                continue
            if reader.discarded_bytes > skipped:
                yield {"skipped_bytes": reader.discarded_bytes - skipped}
            if frame is None:
                break
            size = (
                7
                + len(frame.destination.encode())
                + len(frame.source.encode())
                + (len(frame.info) + 2 if frame.info else 0)
            )
            try:
                yield self.entry(frame, size)
            except DcudError as exc:
                yield {
                    "framing": "hdlc",
                    "kind": frame.kind.value,
                    "source": _station(frame.source),
                    "destination": _station(frame.destination),
                    "error": {"type": type(exc).__name__, "message": str(exc)},
                }
        if reader.buffered_bytes > 1:
            yield {
                "framing": "hdlc",
                "error": {"type": "Incomplete", "message": "the capture ends inside a frame"},
            }


def _wrapper_frames(data: bytes, stream: _Stream) -> Iterator[dict[str, Any]]:
    pos = 0
    for _ in range(len(data) + 1):
        if pos >= len(data):
            return
        header = data[pos : pos + HEADER_BYTES]
        length = int.from_bytes(header[6:8], "big") if len(header) == HEADER_BYTES else -1
        if (
            len(header) < HEADER_BYTES
            or int.from_bytes(header[:2], "big") != WRAPPER_VERSION
            or pos + HEADER_BYTES + length > len(data)
        ):
            # Not a frame here: find the next place a whole frame starts.
            start = pos
            pos += 1
            while pos < len(data):
                head = data[pos : pos + HEADER_BYTES]
                if (
                    len(head) == HEADER_BYTES
                    and int.from_bytes(head[:2], "big") == WRAPPER_VERSION
                    and pos + HEADER_BYTES + int.from_bytes(head[6:8], "big") <= len(data)
                ):
                    break
                pos += 1
            yield {
                "framing": "wrapper",
                "offset": start,
                "error": {
                    "type": "RemoteProtocolError",
                    "message": f"no wrapper frame at byte {start}: {pos - start} bytes skipped",
                },
            }
            continue
        apdu = data[pos + HEADER_BYTES : pos + HEADER_BYTES + length]
        entry: dict[str, Any] = {
            "framing": "wrapper",
            "offset": pos,
            "source_wport": int.from_bytes(header[2:4], "big"),
            "destination_wport": int.from_bytes(header[4:6], "big"),
            "length": length,
        }
        pos += HEADER_BYTES + length
        entry["direction"] = direction_of_apdu(apdu)
        _decode_into(entry, apdu, stream)
        yield entry


def decode_capture(chunks: list[bytes], framing: str, keys: KeyMaterial) -> Iterator[dict[str, Any]]:
    """Every frame of a capture as a JSON-ready dict (``frame`` numbers them from 1)."""
    if framing not in FRAMINGS:
        raise DecodeError(f"--framing must be one of {', '.join(FRAMINGS)}")
    data = b"".join(chunks)
    if not data:
        raise DecodeError("the capture is empty")
    if framing == "auto":
        framing = detect_framing(data)
    stream = _Stream(keys)
    if framing == "hdlc":
        items: Iterator[dict[str, Any]] = _Hdlc(stream).frames(data)
    elif framing == "wrapper":
        items = _wrapper_frames(data, stream)
    else:
        items = _apdu_items(chunks, stream)
    for number, item in enumerate(items, 1):
        yield {"frame": number, **item}


def _apdu_items(chunks: list[bytes], stream: _Stream) -> Iterator[dict[str, Any]]:
    for chunk in chunks:
        entry: dict[str, Any] = {
            "framing": "apdu",
            "bytes": len(chunk),
            "direction": direction_of_apdu(chunk),
        }
        _decode_into(entry, chunk, stream)
        yield entry


def _decode_into(entry: dict[str, Any], data: bytes, stream: _Stream) -> None:
    """Put the decoded APDU into ``entry``, or the error (with what did decode)."""
    try:
        entry["apdu"] = decode_apdu_json(data, stream, entry.get("direction"))
    except _PartlyDecoded as partly:
        entry["apdu"] = partly.apdu
        entry["error"] = partly.problem
    except DcudError as exc:
        entry["error"] = {"type": type(exc).__name__, "message": str(exc)}


def cmd_decode_dlms(
    source: str,
    *,
    framing: str = "auto",
    key: str | None = None,
    auth_key: str | None = None,
    key_file: str | None = None,
    system_title: str | None = None,
    client_system_title: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """``dcud decode dlms``: JSON lines on ``out``; 0 when every frame decoded, else CliError (exit 1)."""
    from dcud.cli_meters import CliError

    try:
        keys = KeyMaterial.from_options(key, auth_key, key_file, system_title, client_system_title)
        if source == "-":
            raw = sys.stdin.buffer.read(MAX_CAPTURE_BYTES + 1)
        else:
            try:
                with open(source, "rb") as handle:
                    raw = handle.read(MAX_CAPTURE_BYTES + 1)
            except OSError as exc:
                raise DecodeError(f"cannot read {source}: {exc.strerror}") from None
        if len(raw) > MAX_CAPTURE_BYTES:
            raise DecodeError(f"{source}: more than {MAX_CAPTURE_BYTES} bytes")
        errors = frames = 0
        for item in decode_capture(parse_capture(raw), framing, keys):
            if "error" in item:
                errors += 1
            if "skipped_bytes" not in item:
                frames += 1
            out.write(json.dumps(item, default=str) + "\n")
    except DecodeError as exc:
        raise CliError(str(exc)) from None
    out.flush()
    if errors:
        raise CliError(f"{errors} of {frames} frame(s) in {source} did not decode")
    if not frames:
        raise CliError(f"no DLMS frame found in {source}")
    return 0


__all__ = [
    "FRAMINGS",
    "DecodeError",
    "KeyMaterial",
    "cmd_decode_dlms",
    "data_json",
    "decode_capture",
    "detect_framing",
    "parse_capture",
]
