"""``dcud decode dlms``: published APDUs and ciphered examples, a GET in blocks, captures recorded from the
simulator (HDLC with HLS-GMAC and ciphering, the wrapper), mode E sign-on bytes, bad input, random bytes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcud.cli_decode_dlms import KeyMaterial, cmd_decode_dlms, decode_capture, detect_framing, parse_capture
from dcud.cli_meters import CliError
from dcud.codec.dlms.apdu import ActionRequestNormal, ActionResponseNormal, ActionResult
from dcud.codec.dlms.axdr import OctetString
from dcud.codec.dlms.client import Auth, DlmsClientConfig, GetRequest
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.iec62056 import encode_identification, encode_option_select, encode_request
from dcud.sim.dlms_model import LoadModel, MeterSpec, parse_time
from dcud.sim.dlms_sim import config_from_dict

from helpers import REPO
from helpers.dlms_sim import HostClock, record_hdlc_session, running
from helpers.meters import SocatPair

VECTORS = REPO / "tests" / "vectors" / "dlms"
SIM_CAPTURES = VECTORS / "sim"
EK = "000102030405060708090A0B0C0D0E0F"
AK = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"
GREEN_BOOK = {"key": EK, "auth_key": AK}


def decode(text: str | bytes, **options: Any) -> list[dict[str, Any]]:
    """The JSON lines of ``cmd_decode_dlms`` for ``text`` (errors are in the lines; no exit here)."""
    raw = text.encode() if isinstance(text, str) else text
    framing = options.pop("framing", "auto")
    keys = KeyMaterial.from_options(
        options.pop("key", None),
        options.pop("auth_key", None),
        None,
        options.pop("system_title", None),
        options.pop("client_system_title", None),
    )
    assert not options
    return list(decode_capture(parse_capture(raw), framing, keys))


def errors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in items if "error" in i]


def vectors(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


# --- published APDUs ---


def test_every_published_apdu_decodes_to_its_type() -> None:
    apdus = vectors("apdus.json")["apdus"]
    text = "\n".join(f"# {a['name']}\n{a['hex']}" for a in apdus)
    items = decode(text)
    assert errors(items) == []
    assert [i["framing"] for i in items] == ["apdu"] * len(apdus)
    assert [i["apdu"]["type"] for i in items] == [a["type"] for a in apdus]
    by_name = {a["name"]: i["apdu"] for a, i in zip(apdus, items, strict=True)}
    assert by_name["aarq_ln_lls"]["authentication_value"] == {"hidden": True, "bytes": 8}, "no password shown"
    assert "3132333435363738" not in json.dumps(items)
    assert by_name["get_request_with_list"]["items"][1]["attribute"] == "8/0.0.1.0.0.255/2"
    range_access = by_name["get_request_range_descriptor"]["access"]
    assert range_access["selector"] == 1 and "from" in range_access and "to" in range_access
    clock = by_name["get_response_with_list"]["results"][1]
    assert clock["date-time"] == "2021-06-03T14:09:23+01:00"
    push = by_name["general_glo_ciphering_push"]
    assert push["deciphered"] is None and push["note"] == "no --key given"


@pytest.mark.parametrize("name", ["authenticated", "encrypted", "authenticated_encrypted"])
def test_green_book_table_40_deciphers(name: str) -> None:
    apdu = next(a for a in vectors("apdus.json")["apdus"] if a["name"] == f"glo_get_request_{name}")
    items = decode(apdu["hex"], client_system_title="4D4D4D0000BC614E", **GREEN_BOOK)
    assert errors(items) == []
    deciphered = items[0]["apdu"]["deciphered"]
    assert deciphered["type"] == "GetRequestNormal" and deciphered["attribute"] == "8/0.0.1.0.0.255/2"
    wrong = decode(apdu["hex"], client_system_title="4D4D4D0000BC614E", key="00" * 16, auth_key=AK)
    if name == "encrypted":  # no tag: a wrong key gives garbage, which does not decode as an APDU
        assert errors(wrong) or wrong[0]["apdu"]["deciphered"] != deciphered
    else:
        assert errors(wrong) and wrong[0]["error"]["type"] == "DecipheringError"
    no_title = decode(apdu["hex"], **GREEN_BOOK)
    assert "system title is unknown" in no_title[0]["error"]["message"]


def test_a_real_meters_encrypted_object_list_block() -> None:
    kamstrup = vectors("kamstrup_object_list_glo.json")
    items = decode(
        kamstrup["ciphered"], key=kamstrup["block_cipher_key"], system_title=kamstrup["server_system_title"]
    )
    assert errors(items) == []
    deciphered = items[0]["apdu"]["deciphered"]
    assert deciphered["type"] == "GetResponseWithDatablock" and deciphered["block_number"] == 1
    assert items[0]["apdu"]["security_control"] == "20", "encryption only: no authentication key needed"


def test_green_book_hls_gmac_answers_are_verified() -> None:
    apdus = {a["name"]: a["hex"] for a in vectors("apdus.json")["apdus"]}
    hls = vectors("security.json")["hls_gmac"]
    method = AttributeRef.parse("15/0.0.40.0.0.255/1")
    reply = ActionRequestNormal(method, OctetString(bytes.fromhex(hls["f_stoc"]))).encode()
    answer = ActionResponseNormal(ActionResult(0, OctetString(bytes.fromhex(hls["f_ctos"])))).encode()
    capture = "\n".join(
        [apdus["aarq_ln_hls_gmac"], apdus["aare_hls_gmac_challenge"], reply.hex(), answer.hex()]
    )
    titles = {"client_system_title": hls["client_system_title"], "system_title": hls["server_system_title"]}
    items = decode(capture, **titles, **GREEN_BOOK)
    assert errors(items) == []
    assert items[2]["apdu"]["hls"] == {"answer": "f(StoC)", "verified": True}
    assert items[3]["apdu"]["hls"] == {"answer": "f(CtoS)", "verified": True}
    wrong = decode(capture, **titles, key=EK, auth_key="00" * 16)
    assert [i["apdu"]["hls"]["verified"] for i in wrong[2:]] == [False, False]
    unverifiable = decode(capture, **titles)
    assert unverifiable[2]["apdu"]["hls"]["verified"] is None


def test_get_in_three_blocks_over_the_wrapper() -> None:
    exchange = vectors("get_with_block.json")
    frames = []
    for step in exchange["exchange"]:
        for apdu, source, destination in ((step["request"], 16, 1), (step["response"], 1, 16)):
            data = bytes.fromhex(apdu)
            frames.append(
                (
                    b"\x00\x01"
                    + source.to_bytes(2, "big")
                    + destination.to_bytes(2, "big")
                    + len(data).to_bytes(2, "big")
                    + data
                ).hex()
            )
    items = decode(" ".join(frames))
    assert detect_framing(bytes.fromhex(frames[0])) == "wrapper"
    assert errors(items) == [] and len(items) == 6
    assert [i["direction"] for i in items] == ["client->server", "server->client"] * 3
    last = items[-1]["apdu"]
    assert last["last_block"]
    assert last["result"] == {"array": [{"double-long-unsigned": n} for n in exchange["value"]]}


# --- captures from the simulator ---


def test_the_simulators_hdlc_capture_with_hls_gmac_and_ciphering() -> None:
    capture = (SIM_CAPTURES / "hdlc_hls_gmac_ciphered.hex").read_text()
    items = decode(capture, **GREEN_BOOK)
    assert errors(items) == [] and items[0]["kind"] == "SNRM" and items[-1]["kind"] == "UA"
    apdus = [i["apdu"] for i in items if "apdu" in i]
    assert (
        apdus[0]["calling_ap_title"] == "4D4D4D0000000001"
        and apdus[1]["responding_ap_title"] == "4D4D4D0000BC614E"
    )
    assert apdus[0]["user_information"]["deciphered"]["type"] == "InitiateRequest"
    plain = [a.get("deciphered") for a in apdus if a["type"] == "CipheredApdu"]
    assert [p["hls"]["verified"] for p in plain if p and "hls" in p] == [True, True]
    model = LoadModel(MeterSpec())
    listed = next(p for p in plain if p["type"] == "GetResponseWithList")  # energy, scaler_unit, clock
    assert listed["results"][:2] == [
        {"double-long-unsigned": model.import_wh(parse_time("2024-06-01T12:00:00Z"))},
        {"structure": [{"integer": 0}, {"enum": 30}]},
    ]
    assert listed["results"][2]["date-time"] == "2024-06-01T12:00:00+00:00"
    profile = next(p for p in plain if p["type"] == "GetResponseWithDatablock" and p["last_block"])
    rows = profile["result"]["array"]
    assert len(rows) == 25 and rows[0]["structure"][0]["date-time"] == "2024-06-01T06:00:00+00:00"
    t = parse_time("2024-06-01T06:00:00Z")
    assert rows[0]["structure"][1:] == [
        {"double-long-unsigned": model.import_wh(t)},
        {"double-long-unsigned": model.export_raw(t)},
    ]
    segmented = [i for i in items if i.get("segments")]
    assert segmented and all(i["direction"] == "server->client" for i in segmented)
    clock_set = next(p for p in plain if p["type"] == "SetRequestNormal")
    assert clock_set["value"]["date-time"] == "2024-06-01T12:00:05+00:00"
    # without keys: every frame still decodes, the ciphered APDUs stay closed
    closed = decode(capture)
    assert errors(closed) == []
    assert all(
        a["deciphered"] is None
        for i in closed
        for a in [i.get("apdu", {})]
        if a.get("type") == "CipheredApdu"
    )
    # a wrong key: every ciphered APDU is an error, and the frames around them still decode
    wrong = decode(capture, key="00" * 16, auth_key=AK)
    assert len(errors(wrong)) > 5 and wrong[-1]["kind"] == "UA" and "error" not in wrong[-1]


def test_the_simulators_wrapper_capture() -> None:
    items = decode((SIM_CAPTURES / "wrapper_public.hex").read_text())
    assert errors(items) == [] and {i["framing"] for i in items} == {"wrapper"}
    assert [i["apdu"]["type"] for i in items][:2] == ["AARQ", "AARE"]
    assert items[-1]["apdu"]["type"] == "RLRE"


@pytest.mark.slow
async def test_a_capture_recorded_now_decodes_to_what_the_client_read(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path / "client-tty", tmp_path / "meter-tty")
    pair.start()
    config = config_from_dict(
        {"line": [{"name": "dlms", "device": str(pair.b)}], "meter": [{"name": "em-1", "line": "dlms"}]}
    )
    requests = [GetRequest(AttributeRef.parse(f"3/1.0.{c}.0.255/2")) for c in ("1.8", "2.8", "32.7")]
    try:
        async with running(config, HostClock("2024-06-01T12:00:00Z")):
            recording = await record_hdlc_session(
                pair.a, DlmsClientConfig(auth=Auth.LLS, password=b"12345678"), requests, 32
            )
    finally:
        pair.kill()
    items = decode(recording.hex_text("live"))
    assert errors(items) == []
    aarq = next(i["apdu"] for i in items if i.get("apdu", {}).get("type") == "AARQ")
    assert aarq["mechanism"] == "LLS" and aarq["authentication_value"] == {"hidden": True, "bytes": 8}
    assert b"12345678".hex() not in json.dumps(items).lower()
    got = next(i["apdu"] for i in items if i.get("apdu", {}).get("type") == "GetResponseWithList")
    model = LoadModel(MeterSpec())
    t = parse_time("2024-06-01T12:00:00Z")
    assert [r for r in got["results"]] == [
        {"double-long-unsigned": model.import_wh(t)},
        {"double-long-unsigned": model.export_raw(t)},
        {"long-unsigned": model.voltage_raw(t)},
    ]


def test_mode_e_sign_on_bytes_before_hdlc_are_skipped() -> None:
    hdlc = [
        line.split("#")[0] for line in (SIM_CAPTURES / "hdlc_hls_gmac_ciphered.hex").read_text().splitlines()
    ]
    sign_on = (
        encode_request("10000017")
        + encode_identification("DCu", "5", "DLMS10000017", ("2",))
        + encode_option_select("5", "2", "2")
    )
    items = decode(sign_on + bytes.fromhex("".join(hdlc)))
    assert items[0] == {"frame": 1, "skipped_bytes": len(sign_on)}
    assert errors(items) == [] and items[1]["kind"] == "SNRM"


def test_damaged_and_cut_frames_are_errors_and_decoding_goes_on() -> None:
    lines = [
        line.split("#")[0].split()
        for line in (SIM_CAPTURES / "hdlc_hls_gmac_ciphered.hex").read_text().splitlines()[1:]
    ]
    frames = [bytes.fromhex("".join(line)) for line in lines]
    damaged = bytearray(frames[2])
    damaged[-3] ^= 0xFF  # the AARQ's FCS
    capture = frames[0] + frames[1] + bytes(damaged) + b"".join(frames[3:]) + frames[4][:20]
    items = decode(capture)
    kinds = [i.get("kind") for i in items]
    assert errors(items)[0]["error"]["message"].startswith("HDLC frame check sequence")
    assert "DISC" in kinds and items[-1]["error"]["type"] == "Incomplete"


def test_wrapper_garbage_is_skipped_to_the_next_frame() -> None:
    frames = [
        line.split("#")[0] for line in (SIM_CAPTURES / "wrapper_public.hex").read_text().splitlines()[1:]
    ]
    capture = bytes.fromhex(frames[0]) + b"\x00\x02\x99" + b"".join(bytes.fromhex(f) for f in frames[1:])
    items = decode(capture, framing="wrapper")
    assert len(errors(items)) == 1 and "3 bytes skipped" in items[1]["error"]["message"]
    assert items[-1]["apdu"]["type"] == "RLRE"


# --- the command ---


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dcud", "decode", "dlms", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )


@pytest.mark.slow
def test_the_command_with_a_key_file_and_stdin(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'block_cipher_key = "{EK}"\nauthentication_key = "{AK}"\n')
    capture = SIM_CAPTURES / "hdlc_hls_gmac_ciphered.hex"
    done = run(str(capture), "--key-file", str(keys))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 28 and lines[-1]["kind"] == "UA"
    assert EK.lower() not in done.stdout.lower() and AK.lower() not in done.stdout.lower(), (
        "keys never printed"
    )
    piped = run("-", "--framing", "hdlc", stdin=capture.read_bytes())
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 28
    (tmp_path / "keys.json").write_text(json.dumps({"block_cipher_key": EK}))
    partial = run(str(capture), "--key-file", str(tmp_path / "keys.json"))
    assert partial.returncode == 1 and "needs --auth-key" in partial.stdout
    assert "did not decode" in partial.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/capture.hex"], "cannot read"),
        ([str(SIM_CAPTURES / "wrapper_public.hex"), "--key", "00112233"], "must be 16 bytes"),
        ([str(SIM_CAPTURES / "wrapper_public.hex"), "--key", "zz" * 16], "not hex"),
        ([str(SIM_CAPTURES / "wrapper_public.hex"), "--system-title", "0102"], "must be 8 bytes"),
        ([str(SIM_CAPTURES / "wrapper_public.hex"), "--key-file", "/nonexistent/keys.toml"], "cannot read"),
    ],
)
def test_bad_input_is_a_clear_message_without_a_traceback(args: list[str], message: str) -> None:
    done = run(*args)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert "zz" * 16 not in done.stderr, "a key is never echoed"


def test_garbage_and_empty_input() -> None:
    out = io.StringIO()
    with pytest.raises(CliError, match="did not decode"):
        _decode_bytes(b"\xff\x00garbage", out)
    assert json.loads(out.getvalue().splitlines()[0])["error"]["type"] == "RemoteProtocolError"
    with pytest.raises(CliError, match="empty"):
        _decode_bytes(b"", io.StringIO())
    with pytest.raises(CliError, match="odd number"):
        _decode_bytes(b"7E A0 0", io.StringIO())


def _decode_bytes(data: bytes, out: io.StringIO, **options: Any) -> int:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".bin") as handle:
        handle.write(data)
        handle.flush()
        return cmd_decode_dlms(handle.name, out=out, **options)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.sampled_from(["auto", "hdlc", "wrapper", "apdu"]))
def test_random_bytes_never_raise(data: bytes, framing: str) -> None:
    keys = KeyMaterial.from_options(EK, AK, None, "4D4D4D0000BC614E", "4D4D4D0000000001")
    for item in decode_capture([data], framing, keys):
        json.dumps(item, default=str)
