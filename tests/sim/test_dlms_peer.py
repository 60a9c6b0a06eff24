"""The independent DLMS/COSEM test peer (tests/peers/dlms_server), checked before dcud's codec relies on it.

Two independent checks: dlms-cosem's client (its own process, tests/peers/cosem_client.py) drives the
peer over HDLC on a socat pty pair and over the TCP wrapper; what dlms-cosem cannot do (HLS-GMAC
without ciphering, a wrong HLS answer, replaying a ciphered request, a silent meter) is sent as raw bytes
built here from the standard, with this module's own CRC and AES-GCM, not the peer's. The peer's
cryptography is also held to the Green Book's published examples, and its frame parser to a real
meter's frames.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from helpers import REPO
from helpers.cosem import COSEM_CLIENT, get, ok_steps, profile_get, register_gets, report_of, write_plan
from peers.dlms_fixture import GREEN_BOOK_AUTHENTICATION_KEY, GREEN_BOOK_BLOCK_CIPHER_KEY, DlmsPeer
from peers.dlms_server import acse, application, ciphering, config, hdlc

CLIENT_RUN_TIMEOUT_S = 90
NOW = "2024-06-01T12:00:00Z"
PROFILE_START = "2024-05-31T00:00:00Z"
CONFIG: dict[str, Any] = {"clock": {"start": NOW}, "profile": {"start": PROFILE_START}}
EK = bytes.fromhex(GREEN_BOOK_BLOCK_CIPHER_KEY)
AK = bytes.fromhex(GREEN_BOOK_AUTHENTICATION_KEY)
CLIENT_TITLE = bytes.fromhex("4D4D4D0000000001")
SERVER_TITLE = bytes.fromhex("4D4D4D0000BC614E")
HLS_KEYS = {
    "block_cipher_key": GREEN_BOOK_BLOCK_CIPHER_KEY,
    "authentication_key": GREEN_BOOK_AUTHENTICATION_KEY,
}

Start = Callable[..., DlmsPeer]


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expected_import_wh(at: str) -> int:
    """The documented load (README): period k imports 250 + 25*(k mod 8) Wh; summed plainly here."""
    periods = int((ts(at) - ts(PROFILE_START)) // 900)
    return 1_000_000 + sum(250 + 25 * (k % 8) for k in range(periods))


def expected_export_wh(at: str) -> int:
    periods = int((ts(at) - ts(PROFILE_START)) // 900)
    return 200_000 + sum(50 + 10 * (k % 3) for k in range(periods))


def cosem(tmp_path: Path, peer: DlmsPeer, transport: str, **plan: Any) -> dict[str, Any]:
    """Run dlms-cosem's client against ``peer`` in its own process; its JSON report."""
    full: dict[str, Any] = {"transport": transport, **plan}
    if transport == "tcp":
        full["port"] = peer.tcp_port
    else:
        full["device"] = peer.device
        full["physical_address"] = peer.physical_address
    done = subprocess.run(
        [sys.executable, str(COSEM_CLIENT), str(write_plan(tmp_path, full))],
        capture_output=True,
        text=True,
        timeout=CLIENT_RUN_TIMEOUT_S,
        cwd=REPO,
        check=False,
    )
    return report_of(done.returncode, done.stdout, done.stderr)


# --- the peer's own building blocks against published vectors ---


def test_peer_cryptography_reproduces_the_green_book_examples() -> None:
    # Green Book HLS example with mechanism 5 (Table 43): f(StoC) from the client, f(CtoS) from the server
    assert ciphering.hls_answer(CLIENT_TITLE, 1, EK, AK, b"P6wRJ21F").hex().upper() == (
        "10000000011A52FE7DD3E72748973C1E28"
    )
    assert ciphering.hls_answer(SERVER_TITLE, 0x01234567, EK, AK, b"K56iVagY").hex().upper() == (
        "1001234567FE1466AFB3DBCD4F9389E2B7"
    )
    # Green Book: the InitiateRequest ciphered with security control 0x30 in a glo-initiate-request
    plain = bytes.fromhex("01011000112233445566778899AABBCCDDEEFF0000065F1F0400007E1F04B0")
    expected = bytes.fromhex(
        "3001234567801302FF8A7874133D414CED25B42534D28DB0047720606B175BD52211BE6841DB204D39EE6FDB8E356855"
    )
    assert ciphering.protect(0x30, SERVER_TITLE, 0x01234567, EK, AK, plain) == expected
    assert ciphering.unprotect(expected, SERVER_TITLE, EK, AK) == (0x30, 0x01234567, plain)
    damaged = expected[:-1] + bytes([expected[-1] ^ 1])
    with pytest.raises(ciphering.SecurityError):
        ciphering.unprotect(damaged, SERVER_TITLE, EK, AK)
    request = acse.parse_initiate_request(plain)
    assert request.dedicated_key == bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    assert (request.dlms_version, request.conformance, request.client_max_receive_pdu) == (
        6,
        0x007E1F,
        0x04B0,
    )


def test_peer_parses_the_frames_of_a_real_meter_session() -> None:
    # SNRM, UA and AARQ of a real meter session (client 16, one-byte server address 1), as published in
    # a Gurux forum thread ("Unable to read meter using ciphering - India DLMS")
    snrm = bytes.fromhex("7EA0070321930F017E")
    ua = bytes.fromhex("7EA01E210373C37A818012050180060180070400000001080400000001533B7E")
    aarq = bytes.fromhex(
        "7EA02B032110FBAFE6E600601DA109060760857405080101BE10040E01000000065F1F0400401E1DFFFFE7257E"
    )
    frame = hdlc.parse_frame(snrm[1:-1], segmented=False)
    assert (frame.upper, frame.lower, frame.client_sap, frame.control) == (1, None, 16, 0x93)
    assert hdlc.parse_frame(ua[1:-1], segmented=False).info.startswith(b"\x81\x80\x12")
    info = hdlc.parse_frame(aarq[1:-1], segmented=False).info
    assert info[:3] == hdlc.LLC_REQUEST
    parsed = acse.parse_aarq(info[3:])
    assert parsed.context == 1 and parsed.mechanism is None
    assert parsed.user_information is not None
    request = acse.parse_initiate_request(parsed.user_information)
    assert (request.conformance, request.client_max_receive_pdu) == (0x401E1D, 0xFFFF)
    with pytest.raises(hdlc.FrameError):
        hdlc.parse_frame(aarq[1:-2] + bytes([aarq[-2] ^ 0xFF]), segmented=False)


# --- dlms-cosem's client against the peer, over HDLC and over TCP ---

TRANSPORTS = ["hdlc", "tcp"]


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_registers_with_scaler_unit_and_the_clock(dlms_peer: Start, tmp_path: Path, transport: str) -> None:
    peer = dlms_peer(transport, **CONFIG)
    steps = ok_steps(
        cosem(
            tmp_path,
            peer,
            transport,
            client_sap=16,
            steps=[
                *register_gets("1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255"),
                get(8, "0.0.1.0.0.255", 2, as_time=True),
            ],
        )
    )
    assert steps[0]["value"] == expected_import_wh(NOW)
    assert steps[1]["value"] == [0, 30]  # scaler 0, Wh
    assert steps[2]["value"] * 10 == expected_export_wh(NOW) - expected_export_wh(NOW) % 10
    assert steps[3]["value"] == [1, 30]  # scaler 1: raw * 10 Wh
    assert 2295 <= steps[4]["value"] <= 2305 and steps[5]["value"] == [-1, 35]  # V, scaler -1
    assert steps[6]["time"] == NOW
    released = peer.wait_for("release")
    assert released[0]["client_sap"] == 16 and released[0]["was"] == "associated"
    if transport == "hdlc":
        peer.wait_for("disc")


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_load_profile_by_range_with_block_transfer(dlms_peer: Start, tmp_path: Path, transport: str) -> None:
    peer = dlms_peer(transport, **CONFIG)
    first = {"from": "2024-06-01T00:00:00+00:00", "to": "2024-06-01T05:45:00+00:00"}
    second = {"from": "2024-06-01T06:00:00+00:00", "to": "2024-06-01T12:00:00+00:00"}
    steps = ok_steps(
        cosem(
            tmp_path,
            peer,
            transport,
            client_sap=16,
            max_pdu_size=128,  # every reply above 128 bytes comes in GET blocks
            steps=[
                get(7, "1.0.99.1.0.255", 2, range=first, rows=True),
                get(7, "1.0.99.1.0.255", 2, range=second, rows=True),
            ],
        )
    )
    rows = steps[0]["rows"] + steps[1]["rows"]
    times = [row[0] for row in rows]
    assert times == [iso(ts("2024-06-01T00:00:00Z") + 900 * k) for k in range(49)]
    for at, imported, exported in rows:
        assert imported == expected_import_wh(at)
        assert exported == expected_export_wh(at) // 10
    reads = peer.requests(kind="get")
    assert [r["blocks"] > 1 for r in reads] == [True, True]
    served = [row for r in reads for row in r["rows"]]
    assert served == times, "each row served once, in order"
    assert len(peer.requests(kind="get_next")) == sum(r["blocks"] - 1 for r in reads)


@pytest.mark.slow
def test_load_profile_in_full_and_its_attributes(dlms_peer: Start, tmp_path: Path) -> None:
    peer = dlms_peer("tcp", **{**CONFIG, "profile": {"start": PROFILE_START, "max_entries": 96}})
    steps = ok_steps(
        cosem(
            tmp_path,
            peer,
            "tcp",
            client_sap=16,
            steps=[
                get(7, "1.0.99.1.0.255", 2, rows=True),
                get(7, "1.0.99.1.0.255", 3),
                get(7, "1.0.99.1.0.255", 4),
                get(7, "1.0.99.1.0.255", 7),
                get(7, "1.0.99.1.0.255", 8),
            ],
        )
    )
    rows = steps[0]["rows"]
    assert len(rows) == 96, "the meter keeps its newest max_entries rows"
    assert rows[-1][0] == NOW and rows[0][0] == iso(ts(NOW) - 95 * 900)
    columns = [(c[0], c[1]["octets"], c[2], c[3]) for c in steps[1]["value"]]
    assert columns == [(8, "0000010000ff", 2, 0), (3, "0100010800ff", 2, 0), (3, "0100020800ff", 2, 0)]
    assert [s["value"] for s in steps[2:]] == [900, 96, 96]


@pytest.mark.slow
def test_moving_the_meter_clock_adds_profile_rows(dlms_peer: Start, tmp_path: Path) -> None:
    peer = dlms_peer("tcp", **CONFIG)
    before = ok_steps(cosem(tmp_path, peer, "tcp", client_sap=16, steps=[get(7, "1.0.99.1.0.255", 7)]))
    assert peer.advance_clock(1800) == "2024-06-01T12:30:00Z"
    after = ok_steps(
        cosem(
            tmp_path,
            peer,
            "tcp",
            client_sap=16,
            steps=[get(7, "1.0.99.1.0.255", 7), get(3, "1.0.1.8.0.255", 2)],
        )
    )
    assert after[0]["value"] == before[0]["value"] + 2
    assert after[1]["value"] == expected_import_wh("2024-06-01T12:30:00Z")


@pytest.mark.slow
def test_event_log_and_object_list(dlms_peer: Start, tmp_path: Path) -> None:
    events = [
        {"at": "2024-06-01T08:00:00Z", "code": 1},
        {"at": "2024-06-01T09:30:00Z", "code": 2},
        {"at": "2024-06-02T00:00:00Z", "code": 3},
    ]
    peer = dlms_peer("tcp", **CONFIG, events=events)
    steps = ok_steps(
        cosem(
            tmp_path,
            peer,
            "tcp",
            client_sap=16,
            max_pdu_size=256,
            steps=[
                get(7, "0.0.99.98.0.255", 2, rows=True),
                get(1, "0.0.96.11.0.255", 2),
                get(15, "0.0.40.0.0.255", 2),
            ],
        )
    )
    assert steps[0]["rows"] == [["2024-06-01T08:00:00Z", 1], ["2024-06-01T09:30:00Z", 2]], (
        "future events not yet"
    )
    assert steps[1]["value"] == 2
    listed = {(entry[0], entry[2]["octets"]) for entry in steps[2]["value"]}
    assert listed == {
        (15, "0000280000ff"),
        (8, "0000010000ff"),
        (3, "0100010800ff"),
        (3, "0100020800ff"),
        (3, "0100200700ff"),
        (7, "0100630100ff"),
        (1, "0000600b00ff"),
        (7, "0000636200ff"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_lls_client_sets_the_clock_and_the_public_client_may_not(
    dlms_peer: Start, tmp_path: Path, transport: str
) -> None:
    peer = dlms_peer(transport, **CONFIG)
    clock = "0.0.1.0.0.255"
    steps = ok_steps(
        cosem(
            tmp_path,
            peer,
            transport,
            client_sap=32,
            auth="lls",
            password="12345678",
            steps=[
                {"op": "set", "class_id": 8, "obis": clock, "attr": 2, "time": "2024-06-01T12:07:30Z"},
                get(8, clock, 2, as_time=True),
            ],
        )
    )
    assert steps[0]["result"] == 0 and steps[1]["time"] == "2024-06-01T12:07:30Z"
    assert peer.status()["now"] == "2024-06-01T12:07:30Z"
    assert peer.requests(kind="clock_set")[0]["to"] == "2024-06-01T12:07:30Z"
    public = ok_steps(
        cosem(
            tmp_path,
            peer,
            transport,
            client_sap=16,
            steps=[{"op": "set", "class_id": 8, "obis": clock, "attr": 2, "time": NOW}],
        )
    )
    assert public[0]["result"] == 3, "read-write-denied for the public client"
    assert peer.status()["now"] == "2024-06-01T12:07:30Z"


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_lls_password_is_refused(dlms_peer: Start, tmp_path: Path, transport: str) -> None:
    peer = dlms_peer(transport, **CONFIG)
    report = cosem(
        tmp_path,
        peer,
        transport,
        client_sap=32,
        auth="lls",
        password="87654321",
        steps=[get(3, "1.0.1.8.0.255", 2)],
    )
    assert not report["associate"]["ok"]
    assert (
        "REJECTED_PERMANENT" in report["associate"]["message"]
        and "AUTHENTICATION_FAILED" in report["associate"]["message"]
    )
    assert peer.requests(kind="aarq")[0]["diagnostic"] == 13
    assert peer.requests(kind="get") == []


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hls_gmac_with_global_ciphering(dlms_peer: Start, tmp_path: Path, transport: str) -> None:
    peer = dlms_peer(transport, **CONFIG)
    steps = ok_steps(
        cosem(
            tmp_path,
            peer,
            transport,
            client_sap=1,
            auth="hls-gmac",
            challenge_length=32,
            client_invocation_counter=1000,
            max_pdu_size=256,
            **HLS_KEYS,
            steps=[
                get(3, "1.0.1.8.0.255", 2),
                profile_get("1.0.99.1.0.255", "2024-06-01T06:00:00+00:00", "2024-06-01T12:00:00+00:00"),
            ],
        )
    )
    assert steps[0]["value"] == expected_import_wh(NOW)
    assert len(steps[1]["rows"]) == 25
    aarq = peer.requests(kind="aarq")[0]
    assert aarq["result"] == "accepted" and aarq["ciphered"] and aarq["pending_hls"]
    assert peer.requests(kind="hls")[0]["result"] == "ok"
    assert peer.requests(kind="get")[1]["blocks"] > 1, "ciphered GET blocks"
    assert peer.requests(kind="release")[0].get("ic_fresh") is True
    assert int(peer.status()["client_invocation_counters"]["1"]) > 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    ("keys", "why"),
    [
        ({**HLS_KEYS, "block_cipher_key": "000102030405060708090A0B0C0D0E0E"}, "tag does not verify"),
        ({**HLS_KEYS, "authentication_key": "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDE"}, "tag does not verify"),
    ],
    ids=["wrong-block-cipher-key", "wrong-authentication-key"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_key_is_refused(
    dlms_peer: Start, tmp_path: Path, keys: dict[str, str], why: str, transport: str
) -> None:
    peer = dlms_peer(transport, **CONFIG)
    report = cosem(
        tmp_path, peer, transport, client_sap=1, auth="hls-gmac", client_invocation_counter=7, **keys
    )
    assert not report["associate"]["ok"]
    # AARE rejected-permanent with a ConfirmedServiceError: initiateError, application-reference,
    # deciphering-error (6)
    assert (
        "REJECTED_PERMANENT" in report["associate"]["message"]
        and "extra info: 6" in report["associate"]["message"]
    )
    aarq = peer.requests(kind="aarq")[0]
    assert aarq["result"] == "rejected" and why in aarq["why"]


@pytest.mark.slow
def test_replayed_association_request_is_refused(dlms_peer: Start, tmp_path: Path) -> None:
    peer = dlms_peer("tcp", **CONFIG)
    plan: dict[str, Any] = {"client_sap": 1, "auth": "hls-gmac", "client_invocation_counter": 50, **HLS_KEYS}
    ok_steps(cosem(tmp_path, peer, "tcp", **plan))
    again = cosem(tmp_path, peer, "tcp", **plan)  # a client that restarted its counter
    assert not again["associate"]["ok"] and "REJECTED_PERMANENT" in again["associate"]["message"]
    assert "replayed" in peer.requests(kind="aarq")[1]["why"]
    later = cosem(tmp_path, peer, "tcp", **{**plan, "client_invocation_counter": 1000})
    assert later["associate"]["ok"], "a fresh counter is accepted"


# --- raw bytes, built here from the standard: what dlms-cosem cannot send ---


def fcs(data: bytes) -> int:
    """CRC-16/X.25 bit by bit (IEC 62056-46 Annex), independent of the peer's table."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def hdlc_frame(client_sap: int, upper: int, lower: int, control: int, info: bytes = b"") -> bytes:
    header = bytes([0, 0, (client_sap << 1) | 1, 0, 0, 0])
    dest = bytes([upper << 1, (lower << 1) | 1])
    length = 2 + len(dest) + 1 + 1 + (2 + len(info) if info else 0) + 2
    header = bytes([0xA0 | (length >> 8), length & 0xFF]) + dest + bytes([(client_sap << 1) | 1, control])
    body = header + (fcs(header).to_bytes(2, "little") + info if info else b"")
    return b"\x7e" + body + fcs(body).to_bytes(2, "little") + b"\x7e"


def wrapped(client_sap: int, apdu: bytes) -> bytes:
    return b"\x00\x01" + client_sap.to_bytes(2, "big") + b"\x00\x01" + len(apdu).to_bytes(2, "big") + apdu


def ber(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


INITIATE = bytes.fromhex("01000000065F1F040000181D0200")  # get, set, selective access, action, block get; 512


def aarq(
    context: int, mechanism: int | None = None, ctos: bytes = b"", user_information: bytes = INITIATE
) -> bytes:
    body = ber(0xA1, ber(0x06, bytes.fromhex("608574050801") + bytes([context])))
    if mechanism is not None:
        body += ber(0xA6, ber(0x04, CLIENT_TITLE))
        body += ber(0x8A, b"\x07\x80") + ber(0x8B, bytes.fromhex("608574050802") + bytes([mechanism]))
        body += ber(0xAC, ber(0x80, ctos))
    body += ber(0xBE, ber(0x04, user_information))
    return ber(0x60, body)


def aare_field(aare: bytes, tag: int) -> bytes:
    pos = 2
    while pos < len(aare):
        if aare[pos] == tag:
            return aare[pos + 2 : pos + 2 + aare[pos + 1]]
        pos += 2 + aare[pos + 1]
    raise AssertionError(f"no field 0x{tag:02X} in {aare.hex()}")


def gcm_protect(sc: int, title: bytes, ic: int, plain: bytes) -> bytes:
    """SC || IC || ciphertext || 12-byte tag with AESGCM (security control 0x30)."""
    assert sc == 0x30
    sealed = AESGCM(EK).encrypt(title + ic.to_bytes(4, "big"), plain, bytes([sc]) + AK)
    return bytes([sc]) + ic.to_bytes(4, "big") + sealed[:-16] + sealed[-16:-4]


def gcm_open(content: bytes, title: bytes) -> bytes:
    sc, iv = content[0], title + content[1:5]
    decryptor = Cipher(algorithms.AES(EK), modes.GCM(iv, content[-12:], min_tag_length=12)).decryptor()
    decryptor.authenticate_additional_data(bytes([sc]) + AK)
    return decryptor.update(content[5:-12]) + decryptor.finalize()


def gmac(title: bytes, ic: int, challenge: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(EK), modes.GCM(title + ic.to_bytes(4, "big"))).encryptor()
    encryptor.authenticate_additional_data(b"\x10" + AK + challenge)
    encryptor.finalize()
    return b"\x10" + ic.to_bytes(4, "big") + encryptor.tag[:12]


def read_frame(fd: int, timeout_s: float = 20.0) -> bytes:
    """One HDLC frame from a non-blocking tty, waiting (bounded) for its closing flag."""
    import select

    data = b""
    for _ in range(100):
        if len(data) > 8 and data.endswith(b"\x7e") and len(data) >= ((data[1] & 7) << 8 | data[2]) + 2:
            return data
        readable, _, _ = select.select([fd], [], [], timeout_s)
        assert readable, f"no frame within {timeout_s} s; got {data.hex()}"
        data += os.read(fd, 256)
    raise AssertionError(f"no complete frame: {data.hex()}")


class Wire:
    """A raw wrapper connection to the peer."""

    def __init__(self, peer: DlmsPeer, client_sap: int) -> None:
        assert peer.tcp_port is not None
        self.sock = socket.create_connection(("127.0.0.1", peer.tcp_port), timeout=20)
        self.client_sap = client_sap

    def ask(self, apdu: bytes) -> bytes:
        self.sock.sendall(wrapped(self.client_sap, apdu))
        header = self._exactly(8)
        assert header[:6] == b"\x00\x01\x00\x01" + self.client_sap.to_bytes(2, "big")
        return self._exactly(int.from_bytes(header[6:8], "big"))

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "the peer closed the connection"
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


GET_IMPORT = bytes.fromhex("C001C100030100010800FF0200")
HLS_NO_CIPHER = {
    "clients": [
        {"sap": 16},
        {"sap": 2, "auth": "hls-gmac"},
        {"sap": 1, "auth": "hls-gmac", "security": "authenticated-encrypted"},
    ]
}


def reply_to_hls(answer: bytes) -> bytes:
    return bytes.fromhex("C301C1000F0000280000FF0101") + b"\x09" + bytes([len(answer)]) + answer


@pytest.mark.slow
def test_hls_gmac_without_ciphering_and_a_wrong_answer(dlms_peer: Start) -> None:
    peer = dlms_peer("tcp", **CONFIG, **HLS_NO_CIPHER)
    wire = Wire(peer, 2)
    try:
        ctos = b"K56iVagY" * 2
        aare = wire.ask(aarq(1, mechanism=5, ctos=ctos))
        assert aare_field(aare, 0xA2) == b"\x02\x01\x00"  # accepted...
        assert aare_field(aare, 0xA3) == b"\xa1\x03\x02\x01\x0e"  # ...authentication-required
        stoc = aare_field(aare, 0xAA)[2:]
        assert aare_field(aare, 0xA4)[2:] == SERVER_TITLE and 8 <= len(stoc) <= 64
        assert wire.ask(GET_IMPORT) == bytes.fromhex("C401C10103"), "read-write-denied before pass 3"
        wrong = bytearray(gmac(CLIENT_TITLE, 1, stoc))
        wrong[-1] ^= 1
        refused = wire.ask(reply_to_hls(bytes(wrong)))
        assert refused[:4] == bytes.fromhex("C701C103"), refused.hex()
        assert wire.ask(GET_IMPORT) == bytes.fromhex("C401C10103"), "still no access after a failed HLS"
        assert peer.requests(kind="hls")[0]["result"] == "failed"
        # a new association on the same connection, answered correctly this time
        aare = wire.ask(aarq(1, mechanism=5, ctos=ctos))
        stoc = aare_field(aare, 0xAA)[2:]
        accepted = wire.ask(reply_to_hls(gmac(CLIENT_TITLE, 2, stoc)))
        assert accepted[:6] == bytes.fromhex("C701C1000100")
        proof = accepted[8:]
        assert accepted[6:8] == b"\x09\x11"
        assert proof == gmac(SERVER_TITLE, int.from_bytes(proof[1:5], "big"), ctos), (
            "the meter proves its key"
        )
        assert wire.ask(GET_IMPORT)[:4] == bytes.fromhex("C401C100")
    finally:
        wire.close()
    aborted = peer.wait_for("aborted")
    assert aborted[0]["client_sap"] == 2, "a connection closed without RLRQ aborts the association"


@pytest.mark.slow
def test_replayed_ciphered_request_is_refused(dlms_peer: Start) -> None:
    peer = dlms_peer("tcp", **CONFIG)
    wire = Wire(peer, 1)
    try:
        content = gcm_protect(0x30, CLIENT_TITLE, 10, INITIATE)
        glo_initiate = b"\x21" + bytes([len(content)]) + content
        aare = wire.ask(aarq(3, mechanism=5, ctos=b"0123456789abcdef", user_information=glo_initiate))
        assert aare_field(aare, 0xA2) == b"\x02\x01\x00", aare.hex()
        stoc = aare_field(aare, 0xAA)[2:]
        response = aare_field(aare, 0xBE)[2:]
        assert response[0] == 0x28, "glo-initiate-response"
        assert gcm_open(response[2:], SERVER_TITLE)[:1] == b"\x08", (
            "an InitiateResponse under the meter's title"
        )

        def glo(tag: int, ic: int, plain: bytes) -> bytes:
            content = gcm_protect(0x30, CLIENT_TITLE, ic, plain)
            return bytes([tag, len(content)]) + content

        answer = wire.ask(glo(0xCB, 11, reply_to_hls(gmac(CLIENT_TITLE, 11, stoc))))
        assert answer[0] == 0xCF and gcm_open(answer[2:], SERVER_TITLE)[:4] == bytes.fromhex("C701C100")
        request = glo(0xC8, 12, GET_IMPORT)
        first = wire.ask(request)
        assert first[0] == 0xCC and gcm_open(first[2:], SERVER_TITLE)[:4] == bytes.fromhex("C401C100")
        assert wire.ask(request) == bytes.fromhex("D80106"), "exception: invocation-counter-error"
        assert wire.ask(glo(0xC8, 11, GET_IMPORT)) == bytes.fromhex("D80106")
        tampered = bytearray(glo(0xC8, 13, GET_IMPORT))
        tampered[10] ^= 0x01
        assert wire.ask(bytes(tampered)) == bytes.fromhex("D80105"), "exception: deciphering-error"
        assert wire.ask(GET_IMPORT) == bytes.fromhex("D80105"), (
            "plain requests refused in a ciphered association"
        )
        later = wire.ask(glo(0xC8, 14, GET_IMPORT))
        assert gcm_open(later[2:], SERVER_TITLE)[:4] == bytes.fromhex("C401C100")
        replays = [r for r in peer.requests(kind="refused") if "replayed" in r["why"]]
        assert [r["ic"] for r in replays] == [12, 11]
    finally:
        wire.close()


@pytest.mark.slow
def test_a_silent_meter_answers_nothing_until_it_speaks_again(dlms_peer: Start) -> None:
    peer = dlms_peer("both", **CONFIG)
    wire = Wire(peer, 16)
    assert peer.device is not None
    tty = os.open(peer.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        peer.silent()
        since = peer.status()["last_seq"]
        wire.sock.sendall(wrapped(16, aarq(1)))
        os.write(tty, hdlc_frame(16, 1, 17, 0x93))
        dropped = peer.wait_for("dropped", count=2, since=since)
        assert {r["transport"] for r in dropped} == {"tcp", "hdlc"}
        wire.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            wire.sock.recv(1)
        with pytest.raises(BlockingIOError):
            os.read(tty, 1)
        wire.sock.setblocking(True)
        peer.speak()
        assert aare_field(wire.ask(aarq(1)), 0xA2) == b"\x02\x01\x00"
        broken = bytearray(hdlc_frame(16, 1, 17, 0x93))
        broken[-2] ^= 0xFF
        os.write(tty, bytes(broken) + hdlc_frame(16, 1, 17, 0x93))
        assert peer.wait_for("frame_error", since=since)[0]["why"] == "FCS"
        ua = read_frame(tty)
        assert ua[6] == 0x73, f"UA (client 16, two-byte server address): {ua.hex()}"
    finally:
        os.close(tty)
        wire.close()


@pytest.mark.slow
def test_hostile_input_never_stops_the_meter(dlms_peer: Start) -> None:
    import random

    peer = dlms_peer("tcp", **CONFIG)
    rng = random.Random(15)
    wire = Wire(peer, 16)
    try:
        assert aare_field(wire.ask(aarq(1)), 0xA2) == b"\x02\x01\x00"
        for _ in range(300):
            apdu = bytes([rng.choice([0x60, 0x62, 0xC0, 0xC1, 0xC3, 0xC8, 0xDB])]) + rng.randbytes(
                rng.randrange(0, 40)
            )
            wire.ask(apdu)  # an answer (AARE, exception, error result) every time, never a crash
        assert wire.ask(aarq(1))[0] == 0x61
    finally:
        wire.close()
    bad = socket.create_connection(("127.0.0.1", peer.tcp_port or 0), timeout=20)
    bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert bad.recv(1) == b"", "not the wrapper protocol: the meter hangs up"
    bad.close()
    assert peer.status()["ok"]


@pytest.mark.slow
def test_get_with_list_entry_descriptor_and_unknown_objects(dlms_peer: Start) -> None:
    peer = dlms_peer("tcp", **CONFIG)
    wire = Wire(peer, 16)
    try:
        assert aare_field(wire.ask(aarq(1)), 0xA2) == b"\x02\x01\x00"
        with_list = bytes.fromhex("C003C10200030100010800FF030000030100630100FF0200")
        answer = wire.ask(with_list)
        # the register's scaler_unit, then object-class-inconsistent (1.0.99.1.0.255 is class 7, not 3)
        assert answer == bytes.fromhex("C403C1020002020F00161E0109")
        # entry descriptor: entries 1..2 (the oldest), column 2 only (the energy import)
        by_entry = bytes.fromhex("C001C100070100630100FF020102") + bytes.fromhex(
            "020406000000010600000002120002120002"
        )
        first, second = expected_import_wh(PROFILE_START), expected_import_wh("2024-05-31T00:15:00Z")
        assert wire.ask(by_entry) == bytes.fromhex("C401C1000102020106") + first.to_bytes(
            4, "big"
        ) + bytes.fromhex("020106") + second.to_bytes(4, "big")
        unknown = bytes.fromhex("C001C100030100630700FF0200")
        assert wire.ask(unknown) == bytes.fromhex("C401C10104"), "object-undefined"
        assert wire.ask(bytes.fromhex("C001C100030100010800FF0700")) == bytes.fromhex("C401C10104")
        assert wire.ask(bytes.fromhex("C0028100000001")) == bytes.fromhex("C4028101000000020110"), (
            "no-long-get-in-progress"
        )
    finally:
        wire.close()


# --- the HDLC link in this process: hostile frames, inactivity (injected clock) ---


def hdlc_link(records: list[dict[str, Any]], now: list[float], timeout_s: float = 0.0) -> hdlc.HdlcLink:
    meter = application.Meter(config.parse({"tcp": {}, **CONFIG}), records.append)

    def open_association(sap: int, link: str) -> application.Association:
        return application.Association(meter, meter.clients[sap], "hdlc", link)

    return hdlc.HdlcLink(
        1, 17, 128, {16, 1, 32}, open_association, records.append, lambda: False, timeout_s, lambda: now[0]
    )


def test_hdlc_link_answers_random_frames_without_failing() -> None:
    import random

    rng = random.Random(46)
    records: list[dict[str, Any]] = []
    now = [0.0]
    link = hdlc_link(records, now)
    assert link.feed(hdlc_frame(16, 1, 17, 0x93))[0][6] == 0x73
    llc = bytes.fromhex("E6E600")
    apdus = [
        aarq(1),
        aarq(3, 5, b"x" * 16),
        GET_IMPORT,
        reply_to_hls(b"\x10" * 17),
        bytes.fromhex("6203800100"),
    ]
    for _ in range(3000):
        if not link.connected and rng.random() < 0.5:
            link.feed(hdlc_frame(16, 1, 17, 0x93))
        apdu = bytearray(rng.choice(apdus))
        for _ in range(rng.randrange(3)):  # flip, cut or extend
            apdu[rng.randrange(len(apdu))] = rng.randrange(256)
        if rng.random() < 0.5:
            apdu = apdu[: rng.randrange(1, len(apdu) + 1)] + rng.randbytes(rng.randrange(3))
        if (
            rng.random() < 0.5
        ):  # in sequence, to the meter, from the connected client: reaches the application
            control = (link.vs << 5) | 0x10 | (link.vr << 1)
            frame = hdlc_frame(16, 1, 17, control, llc + bytes(apdu))
        else:
            control = rng.choice([0x10, 0x32, 0x11, 0x31, 0x93, 0x53, 0x13, rng.randrange(256)])
            info = rng.choice([b"", llc + bytes(apdu), rng.randbytes(rng.randrange(0, 200))])
            frame = hdlc_frame(
                rng.choice([16, 16, 1, 5]), rng.choice([1, 1, 2]), rng.choice([17, 17, 3]), control, info
            )
        if rng.random() < 0.1:
            frame = rng.randbytes(rng.randrange(1, 40)) + frame[: rng.randrange(len(frame))]
            now[0] += 2.0
        for answer in link.feed(frame):
            assert answer[0] == 0x7E and answer[-1] == 0x7E and answer[3] >> 1 in (16, 1, 32)
            assert fcs(answer[1:-3]) == int.from_bytes(answer[-3:-1], "little")
        while link.pending:  # take every segment of a long answer
            link.feed(hdlc_frame(16, 1, 17, 0x11 | (link.vr << 5)))
    kinds = {r["kind"] for r in records}
    assert {"aarq", "get", "malformed", "frame_error"} <= kinds, kinds
    now[0] += 2.0  # a gap on the line: whatever frame was cut short is dropped
    assert link.feed(b"\x7e" * 5 + hdlc_frame(16, 1, 17, 0x93))[0][6] == 0x73, "still answers an SNRM"


def test_hdlc_inactivity_timeout_drops_the_connection() -> None:
    records: list[dict[str, Any]] = []
    now = [1000.0]
    link = hdlc_link(records, now, timeout_s=120.0)
    assert link.feed(hdlc_frame(16, 1, 17, 0x93))[0][6] == 0x73
    aare = link.feed(hdlc_frame(16, 1, 17, 0x10, bytes.fromhex("E6E600") + aarq(1)))[0]
    assert aare[6] == 0x30 and aare[12] == 0x61, "I-frame N(R)=1 N(S)=0 carrying an AARE"
    now[0] += 119.0
    answer = link.feed(hdlc_frame(16, 1, 17, 0x32, bytes.fromhex("E6E600") + GET_IMPORT))[0]
    assert answer[12:16] == bytes.fromhex("C401C100"), "within the timeout: served"
    now[0] += 121.0
    assert link.feed(hdlc_frame(16, 1, 17, 0x54, bytes.fromhex("E6E600") + GET_IMPORT))[0][6] == 0x1F, "DM"
    assert [r["kind"] for r in records][-3:] == ["inactivity_timeout", "aborted", "not_connected"]
