"""Every DLMS vector in tests/vectors/dlms (published examples: Green Book, other implementations' tests)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from dcud.codec.actions import Done, Send
from dcud.codec.dlms import apdu as A  # noqa: N812
from dcud.codec.dlms.axdr import (
    Array,
    OctetString,
    Reader,
    Structure,
    date_time_of,
    read_data,
    to_json,
)
from dcud.codec.dlms.client import DlmsClient, DlmsClientConfig, DlmsSessionResult, GetRequest
from dcud.codec.dlms.cosem import CaptureObject, decode_object_list, profile_rows
from dcud.codec.dlms.obis import AttributeRef, Obis
from dcud.codec.dlms.security import Keys, hls_gmac_response, protect, unprotect, verify_hls_gmac
from dcud.codec.dlms.transport import ApduIn
from dcud.errors import RemoteProtocolError

from helpers import TESTS
from helpers.dlms import IdleLink

VECTORS = TESTS / "vectors" / "dlms"
APDUS = json.loads((VECTORS / "apdus.json").read_text())["apdus"]
SECURITY = json.loads((VECTORS / "security.json").read_text())
AARE_ACCEPTED = bytes.fromhex(
    "6129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F040000501F01F40007"
)
KEYS = Keys(bytes.fromhex(SECURITY["block_cipher_key"]), bytes.fromhex(SECURITY["authentication_key"]))


def test_every_vector_file_is_used() -> None:
    names = {p.name for p in VECTORS.iterdir()}
    assert names == {
        "README.md",
        "apdus.json",
        "security.json",
        "get_with_block.json",
        "kamstrup_object_list_glo.json",
        "hdlc",  # the lower layers' frames: tests/codec/test_dlms_hdlc.py walks that folder
        "sim",  # captures recorded from dcud sim dlms: tests/cli/test_cli_decode_dlms.py decodes them
    }


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex().upper()


def _check_initiate(data: bytes, expect: dict[str, Any]) -> None:
    initiate = A.decode_xdlms_initiate(data)
    assert isinstance(initiate, A.InitiateRequest | A.InitiateResponse)
    assert f"{int(initiate.conformance):06X}" == expect["conformance"]
    assert initiate.max_receive_pdu_size == expect["max_receive_pdu_size"]
    assert initiate.dlms_version == expect["dlms_version"]
    if "vaa_name" in expect:
        assert isinstance(initiate, A.InitiateResponse) and initiate.vaa_name == expect["vaa_name"]
    if "dedicated_key" in expect:
        assert (
            isinstance(initiate, A.InitiateRequest)
            and _hex(initiate.dedicated_key) == expect["dedicated_key"]
        )


def _check_access(access: A.AccessSelection | None, expect: dict[str, Any] | None) -> None:
    if expect is None:
        assert access is None
        return
    assert access is not None and access.selector == expect["selector"]
    restricting, start, end, columns = access.parameters.items  # type: ignore[union-attr]
    class_id, name, attribute, _index = restricting.items  # type: ignore[union-attr]
    assert f"{class_id.value}/{Obis.from_bytes(name.value)}/{attribute.value}" == expect["restricting"]
    assert date_time_of(start).to_datetime() == datetime.fromisoformat(expect["from"])
    assert date_time_of(end).to_datetime() == datetime.fromisoformat(expect["to"])
    assert isinstance(columns, Array) and len(columns.items) == len(expect["columns"])


@pytest.mark.parametrize("vector", APDUS, ids=[v["name"] for v in APDUS])
def test_apdu_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    apdu = A.decode_apdu(data)
    assert type(apdu).__name__ == vector["type"]
    assert apdu.encode() == data, "encodes back to the same bytes"
    expect = vector["expect"]
    if isinstance(apdu, A.AARQ | A.AARE):
        assert apdu.application_context == expect["application_context"]
        assert apdu.mechanism == expect["mechanism"]
        assert _hex(apdu.authentication_value) == expect["authentication_value"]
    if isinstance(apdu, A.AARQ):
        assert _hex(apdu.calling_ap_title) == expect["calling_ap_title"]
        assert apdu.user_information is not None
        if "initiate" in expect:
            _check_initiate(apdu.user_information, expect["initiate"])
        else:
            ciphered = A.decode_xdlms_initiate(apdu.user_information)
            assert isinstance(ciphered, A.CipheredApdu) and ciphered.tag == 0x21
            want = expect["ciphered_initiate"]
            opened = unprotect(ciphered.content, system_title=apdu.calling_ap_title or b"", keys=KEYS)
            assert (opened.security_control, opened.invocation_counter) == (
                want["security_control"],
                want["invocation_counter"],
            )
            assert _hex(opened.plaintext) == want["plaintext"]
            _check_initiate(opened.plaintext, want["initiate"])
    elif isinstance(apdu, A.AARE):
        assert (apdu.result, apdu.diagnostic_source, apdu.diagnostic) == (
            expect["result"],
            expect["diagnostic_source"],
            expect["diagnostic"],
        )
        assert apdu.user_information is not None
        if "initiate" in expect:
            _check_initiate(apdu.user_information, expect["initiate"])
        else:
            error = A.decode_xdlms_initiate(apdu.user_information)
            assert isinstance(error, A.ConfirmedServiceError)
            want = expect["confirmed_service_error"]
            assert (error.service, error.error_class, error.error_code) == (
                want["service"],
                want["error_class"],
                want["error_code"],
            )
            assert error.text == "initiate error: initiate dlms-version-too-low"
    elif isinstance(apdu, A.RLRQ | A.RLRE):
        assert apdu.reason == expect["reason"]
    elif isinstance(apdu, A.CipheredApdu):
        assert apdu.tag == expect["tag"]
        assert apdu.content[0] == expect["security_control"]
        assert int.from_bytes(apdu.content[1:5], "big") == expect["invocation_counter"]
        opened = unprotect(apdu.content, system_title=bytes.fromhex("4D4D4D0000BC614E"), keys=KEYS)
        assert opened.plaintext == bytes.fromhex("C0010000080000010000FF0200")
        inner = A.decode_apdu(opened.plaintext)
        assert isinstance(inner, A.GetRequestNormal) and str(inner.attribute) == "8/0.0.1.0.0.255/2"
    elif isinstance(apdu, A.GeneralCiphering):
        assert apdu.tag == expect["tag"] and _hex(apdu.system_title) == expect["system_title"]
        assert apdu.content[0] == expect["security_control"]
        assert int.from_bytes(apdu.content[1:5], "big") == expect["invocation_counter"]
    else:
        _check_xdlms(apdu, expect)


def _check_xdlms(apdu: A.Apdu, expect: dict[str, Any]) -> None:
    assert getattr(apdu, "invoke_id_and_priority", None) == expect["invoke_id_and_priority"]
    if isinstance(apdu, A.GetRequestNormal):
        assert str(apdu.attribute) == expect["attribute"]
        _check_access(apdu.access, expect["access"])
    elif isinstance(apdu, A.GetRequestNext):
        assert apdu.block_number == expect["block_number"]
    elif isinstance(apdu, A.GetRequestWithList):
        assert [str(i.attribute) for i in apdu.items] == expect["attributes"]
    elif isinstance(apdu, A.GetResponseNormal):
        if "access_result" in expect:
            assert apdu.result == A.AccessResult(expect["access_result"])
        elif "rows" in expect:
            assert isinstance(apdu.result, Array) and len(apdu.result.items) == expect["rows"]
            columns = [
                CaptureObject(8, Obis.parse("0.0.1.0.0.255"), 2),
                CaptureObject(1, Obis(0, 0, 96, 10, 1), 2),
                CaptureObject(3, Obis.parse("1.0.1.8.0.255"), 2),
            ]
            rows = profile_rows(apdu.result, columns)
            for row, want in ((rows[0], expect["first"]), (rows[-1], expect["last"])):
                assert row.time is not None
                assert [row.time.to_datetime().isoformat(), *[to_json(v) for v in row.values[1:]]] == want
        else:
            assert not isinstance(apdu.result, A.AccessResult)
            assert to_json(apdu.result) == expect["value"]
    elif isinstance(apdu, A.GetResponseWithDatablock):
        assert (apdu.last_block, apdu.block_number) == (expect["last_block"], expect["block_number"])
        assert apdu.raw_data == A.AccessResult(expect["access_result"])
    elif isinstance(apdu, A.GetResponseWithList):
        assert [to_json(r) for r in apdu.results] == expect["values"]  # type: ignore[arg-type]
        assert date_time_of(apdu.results[1]).to_datetime() == datetime.fromisoformat(expect["clock"])  # type: ignore[arg-type]
    elif isinstance(apdu, A.ActionRequestNormal):
        assert str(apdu.method) == expect["method"]
        assert (None if apdu.parameters is None else to_json(apdu.parameters)) == expect["parameters"]
    elif isinstance(apdu, A.ActionResponseNormal):
        assert apdu.result.result == expect["result"]
        returned = apdu.result.return_parameters
        if "return_access_result" in expect:
            assert returned == A.AccessResult(expect["return_access_result"])
        else:
            assert (None if returned is None else to_json(returned)) == expect["return"]  # type: ignore[arg-type]
    else:  # pragma: no cover - a vector of a type this test does not know
        raise AssertionError(f"no check for {type(apdu).__name__}")


@pytest.mark.parametrize("vector", SECURITY["gcm"], ids=[v["name"] for v in SECURITY["gcm"]])
def test_gcm_vector(vector: dict[str, Any]) -> None:
    title = bytes.fromhex(vector["system_title"])
    plaintext = bytes.fromhex(vector["plaintext"])
    protected = protect(
        plaintext,
        security_control=vector["security_control"],
        system_title=title,
        invocation_counter=vector["invocation_counter"],
        keys=KEYS,
    )
    assert protected.hex().upper() == vector["protected"]
    opened = unprotect(protected, system_title=title, keys=KEYS)
    assert (opened.plaintext, opened.security_control, opened.invocation_counter) == (
        plaintext,
        vector["security_control"],
        vector["invocation_counter"],
    )


def test_hls_gmac_vector_both_passes() -> None:
    v = SECURITY["hls_gmac"]
    client, server = bytes.fromhex(v["client_system_title"]), bytes.fromhex(v["server_system_title"])
    ctos, stoc = bytes.fromhex(v["ctos"]), bytes.fromhex(v["stoc"])
    f_stoc = hls_gmac_response(
        system_title=client, invocation_counter=v["client_invocation_counter"], keys=KEYS, challenge=stoc
    )
    f_ctos = hls_gmac_response(
        system_title=server, invocation_counter=v["server_invocation_counter"], keys=KEYS, challenge=ctos
    )
    assert (f_stoc.hex().upper(), f_ctos.hex().upper()) == (v["f_stoc"], v["f_ctos"])
    assert verify_hls_gmac(f_ctos, system_title=server, keys=KEYS, challenge=ctos)
    assert not verify_hls_gmac(f_ctos, system_title=client, keys=KEYS, challenge=ctos)
    assert not verify_hls_gmac(f_stoc, system_title=client, keys=KEYS, challenge=ctos)


class _ReplayTransport(IdleLink):
    """An ApduTransport that answers each APDU the client sends with the next recorded response."""

    def __init__(self, exchange: list[dict[str, str]]) -> None:
        self.exchange = list(exchange)
        self.requests: list[str] = []

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        self.requests.append(apdu.hex().upper())
        if apdu[0] == 0x60:
            return [
                ApduIn(
                    bytes.fromhex(
                        "6129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F040000501F01F40007"
                    )
                )
            ]
        if apdu[0] == 0x62:
            return [ApduIn(bytes.fromhex("6303800100"))]
        return [Send(apdu), ApduIn(bytes.fromhex(self.exchange.pop(0)["response"]))]


def test_get_with_block_vector_through_the_client() -> None:
    vector = json.loads((VECTORS / "get_with_block.json").read_text())
    transport = _ReplayTransport(vector["exchange"])
    # One exchange keeps its invoke id for every block, as the recorded client did.
    client = DlmsClient(transport, DlmsClientConfig(), [GetRequest(AttributeRef.parse("7/1.0.99.1.0.255/2"))])
    actions = client.start(0.0)
    final = actions[-1]
    assert isinstance(final, Done)
    result = final.result
    assert isinstance(result, DlmsSessionResult)
    assert to_json(result.outcomes[0].value) == vector["value"]  # type: ignore[arg-type]
    sent = [r for r in transport.requests if r[:2] == "C0"]
    want = [e["request"] for e in vector["exchange"]]
    assert sent == want


def test_kamstrup_object_list_vector() -> None:
    vector = json.loads((VECTORS / "kamstrup_object_list_glo.json").read_text())
    ciphered = A.decode_apdu(bytes.fromhex(vector["ciphered"]))
    assert isinstance(ciphered, A.CipheredApdu) and ciphered.plain_tag == A.TAG_GET_RESPONSE
    keys = Keys(bytes.fromhex(vector["block_cipher_key"]), bytes(16))
    opened = unprotect(ciphered.content, system_title=bytes.fromhex(vector["server_system_title"]), keys=keys)
    assert opened.invocation_counter == vector["invocation_counter"]
    assert opened.plaintext.hex().upper() == vector["plain"]
    block = A.decode_apdu(opened.plaintext)
    assert isinstance(block, A.GetResponseWithDatablock) and block.block_number == 1 and not block.last_block
    assert isinstance(block.raw_data, bytes)
    # The first block holds the start of the array: decode the entries it holds completely.
    reader = Reader(block.raw_data)
    assert reader.u8() == Array.TAG and reader.length() == 176
    entries = []
    while True:
        start = reader.pos
        try:
            entries.append(read_data(reader))
        except RemoteProtocolError:
            reader.pos = start
            break
    assert 10 < len(entries) < 176
    objects = decode_object_list(Array(tuple(entries)))
    for want, got in zip(vector["first_objects"], objects, strict=False):
        assert (got.class_id, got.version, str(got.obis), len(got.attributes), len(got.methods)) == (
            want["class_id"],
            want["version"],
            want["obis"],
            want["attributes"],
            want["methods"],
        )
    assert objects[0].class_name == "Clock" and objects[0].attributes[1].readable
    assert isinstance(entries[0], Structure) and isinstance(entries[0].items[2], OctetString)
