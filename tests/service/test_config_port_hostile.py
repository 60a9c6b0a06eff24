"""Hostile input against the config port of a running daemon (issue 13), with curl and raw sockets.

Every test drives ``python -m dcud run`` (started as in tests/service/test_config_port.py) and, after each
batch, checks that the daemon still answers, that no service failed (the supervisor logs
``service failed`` on every restart) and that nothing changed: the parameter file in force, the
staged firmware, no temp files left. Each batch prints one JSON line (``CONFIG-PORT-TALLY``) with
the inputs tried, crashes, service restarts and answers by status: SECURITY.md's table has them.

The regression tests of issue 13's config port items each fail on the code before it:
plain writes accepted by default, four slow firmware clients holding the port, no per-source
limit, a forged firmware upload spooled to disk before its tag was checked, envelopes replayable
across DCUs, and a replay state that could not be saved being ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import select
import shutil
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcud.service.crypto_envelope import (
    STREAM_HEADER_BYTES,
    EnvelopeKeys,
    seal,
    seal_stream,
)

from helpers.config_port import DEVICE, ENCRYPTED, KEY, KEYS, PLAIN_WRITES, Dcu, curl, dcu, open_response
from helpers.daemon import daemon_log

pytestmark = pytest.mark.slow

WRONG_KEYS = EnvelopeKeys.from_parameter("a5" * 32)
SHA_ZERO = "0" * 64
EXAMPLES = 120
"""Generated inputs per hypothesis batch (bounded and derandomized: the same inputs every run)."""
HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# -- raw HTTP over sockets --------------------------------------------------------------------------


def connect(port: int, source: str = "127.0.0.1", timeout_s: float = 30) -> socket.socket:
    """A TCP connection to the port from ``source`` (any 127.0.0.0/8 address is this host)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_answer(sock: socket.socket, limit_bytes: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (bounded in size and by the socket timeout)."""
    data = b""
    for _ in range(4096):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        if len(data) > limit_bytes:
            break
    return data


def exchange(port: int, request: bytes, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send ``request`` (the server may answer and close early), then read the answer."""
    with connect(port, source) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        answer = read_answer(sock)
    return status_of(answer), answer.partition(b"\r\n\r\n")[2]


def status_of(answer: bytes) -> int:
    """The status code of an HTTP answer; 0 when there was none."""
    if not answer.startswith(b"HTTP/1.1 "):
        return 0
    return int(answer[9:12])


def http(method: str, target: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One HTTP/1.1 request with a Content-Length."""
    head = f"{method} {target} HTTP/1.1\r\nHost: dcu\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


def sealed(method: str, target: str, plaintext: bytes, **kw: Any) -> bytes:
    """An envelope for this DCU (keyword arguments override key and device_id)."""
    keys = kw.pop("keys", KEYS)
    device_id = kw.pop("device_id", DEVICE)
    return seal(keys, plaintext, f"{method} {target}".encode(), device_id=device_id, **kw)


# -- the health check after each batch ---------------------------------------------------------------


@dataclass
class Tally:
    """What one batch tried and what came of it (printed for SECURITY.md)."""

    batch: str
    inputs: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def add(self, status: int) -> None:
        self.inputs += 1
        self.statuses[status] += 1

    def report(self, *, crashes: int, restarts: int) -> None:
        line = {
            "batch": self.batch,
            "inputs": self.inputs,
            "crashes": crashes,
            "restarts": restarts,
            "answers": {str(k): v for k, v in sorted(self.statuses.items())},
        }
        print("CONFIG-PORT-TALLY", json.dumps(line, sort_keys=True))


@dataclass
class Baseline:
    """What must not change: the file in force and the staged firmware."""

    file_in_force: str
    staged: list[str]


def baseline(d: Dcu) -> Baseline:
    return Baseline(d.file_in_force(), sorted(p.name for p in firmware_dir(d).glob("*")))


def firmware_dir(d: Dcu) -> Path:
    return d.site.parent / "state" / "firmware"


def service_failures(d: Dcu) -> int:
    return daemon_log(d.site).count("service failed")


def check_unharmed(d: Dcu, before: Baseline, tally: Tally, *, encrypted: bool) -> None:
    """The daemon runs, answers a read, restarted nothing, and nothing changed."""
    crashes = 0 if d.proc.poll() is None else 1
    restarts = service_failures(d)
    if encrypted:
        request = sealed("GET", "/config", b"")
        code, body = curl("-X", "GET", "--data-binary", "@-", f"{d.url}/config", data=request)
        assert code == 200, body
        assert b"ntp_interval" in open_response(200, request, body)
    else:
        code, body = curl(f"{d.url}/config")
        assert code == 200, body
    tally.report(crashes=crashes, restarts=restarts)
    assert crashes == 0 and restarts == 0, daemon_log(d.site)[-4000:]
    assert tally.statuses[500] == 0, tally
    assert d.file_in_force() == before.file_in_force
    assert sorted(p.name for p in firmware_dir(d).glob("*")) == before.staged


# -- 1. plain writes -----------------------------------------------------------------------------------


def test_plain_writes_are_refused_by_default(tmp_path: Path) -> None:
    # Regression (issue 13): a plain port accepted PUT/PATCH/firmware from anyone who reached it.
    with dcu(tmp_path, config_port="") as d:
        before = baseline(d)
        tally = Tally("plain writes, default")
        fw = tmp_path / "fw.img"
        fw.write_bytes(b"firmware" * 1000)
        sha = hashlib.sha256(fw.read_bytes()).hexdigest()
        attempts = [
            ("-X", "PUT", "--data-binary", "ntp_interval=300\n", f"{d.url}/config"),
            ("-X", "PATCH", "--data-binary", "ntp_interval=300\n", f"{d.url}/config"),
            ("-X", "PUT", "--data-binary", "ntp_interval=300\n", f"{d.url}/config?dry_run=1"),
            ("-T", str(fw), "-H", f"X-Firmware-SHA256: {sha}", f"{d.url}/firmware"),
        ]
        for args in attempts:
            code, body = curl(*args)
            tally.add(code)
            assert code == 403, body
            assert b"plain_writes = true" in body
        assert daemon_log(d.site).count("plain write refused") == len(attempts)  # one line each
        assert not d.remote_file().exists()
        check_unharmed(d, before, tally, encrypted=False)
        assert curl(f"{d.url}/firmware")[1] == b'{"staged":null}\n'


def test_plain_writes_are_accepted_with_the_opt_in(tmp_path: Path) -> None:
    with dcu(tmp_path, config_port=PLAIN_WRITES) as d:
        code, body = curl("-X", "PATCH", "--data-binary", "ntp_interval=300\n", f"{d.url}/config")
        assert code == 200, body
        assert "ntp_interval=300" in d.file_in_force()
        firmware = b"firmware" * 1000
        sha = hashlib.sha256(firmware).hexdigest()
        code, body = curl(
            "-X",
            "PUT",
            "-H",
            f"X-Firmware-SHA256: {sha}",
            "--data-binary",
            "@-",
            f"{d.url}/firmware",
            data=firmware,
        )
        assert code == 200, body
        assert service_failures(d) == 0


# -- 3. slow bodies and the per-source limit -----------------------------------------------------------


class SlowClient(threading.Thread):
    """Sends a request head, then one body byte a second until the server answers (bounded)."""

    def __init__(self, port: int, source: str, head: bytes, max_bytes: int = 120) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.head, self.max_bytes = port, source, head, max_bytes
        self.sent_bytes = 0
        self.answer = b""
        self.connected = threading.Event()

    def run(self) -> None:
        with connect(self.port, self.source) as sock:
            sock.sendall(self.head)
            self.connected.set()
            for _ in range(self.max_bytes):
                readable, _, _ = select.select([sock], [], [], 1.0)  # one byte a second
                if readable:
                    self.answer = read_answer(sock)
                    return
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    self.answer = read_answer(sock)
                    return
                self.sent_bytes += 1


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain-opt-in", "encrypted"])
def test_four_slow_firmware_clients_cannot_keep_reads_out(tmp_path: Path, encrypted: bool) -> None:
    # Regression (issue 13): four clients sending a PUT /firmware head and then one byte a second
    # held all max_connections (4) slots for firmware_timeout_s (30 min): GET /config got 503.
    wme = ENCRYPTED if encrypted else ""
    limits = "max_connections = 4\nbody_rate_window_s = 3\n"  # min_body_rate_bytes_s: default 1024
    with dcu(tmp_path, wme=wme, config_port=PLAIN_WRITES + limits) as d:
        before = baseline(d)
        tally = Tally(f"four slow firmware clients ({'encrypted' if encrypted else 'plain, opt-in'})")
        head = (
            f"PUT /firmware HTTP/1.1\r\nHost: dcu\r\nContent-Length: 1000000\r\n"
            f"X-Firmware-SHA256: {SHA_ZERO}\r\n\r\n"
        ).encode()
        # Four sources, so that the per-source limit (2) is not what stops them.
        clients = [SlowClient(d.port, f"127.0.0.{n}", head) for n in range(2, 6)]
        for client in clients:
            client.start()
        for client in clients:
            assert client.connected.wait(30)
        for client in clients:
            client.join(timeout=120)
            assert not client.is_alive(), "a slow client was never cut"
            tally.add(status_of(client.answer))
            assert status_of(client.answer) == 408, client.answer
            assert b"body slower than" in client.answer
            assert client.sent_bytes < 60, client.sent_bytes  # cut by the rate bound, not by itself
        assert daemon_log(d.site).count("slow body cut") == len(clients)  # counted and logged once each
        # The slots are free again: reads are served (bounded wait for the closes to be seen).
        deadline = time.monotonic() + 30
        while True:
            code = exchange(d.port, sealed_get() if encrypted else http("GET", "/config"), "127.0.0.6")[0]
            if code == 200:
                break
            assert code == 503 and time.monotonic() < deadline, code
        check_unharmed(d, before, tally, encrypted=encrypted)
        assert not list(firmware_dir(d).glob(".incoming*"))


def sealed_get() -> bytes:
    return http("GET", "/config", sealed("GET", "/config", b""))


def test_per_source_connection_limit(tmp_path: Path) -> None:
    # Regression (issue 13): one address could take every slot of the port.
    with dcu(tmp_path, config_port="header_timeout_s = 30\n") as d:  # defaults: 4 in all, 2 per source
        before = baseline(d)
        tally = Tally("per-source limit")
        held = [connect(d.port, "127.0.0.1") for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"GET /config HTTP/1.1\r\n")  # a head that does not end (yet)
            third = connect(d.port, "127.0.0.1")
            with third:
                answer = read_answer(third)
            tally.add(status_of(answer))
            assert status_of(answer) == 503 and b"from this address" in answer, answer
            assert daemon_log(d.site).count("too many from this source") == 1  # one log line
            # Another source is served meanwhile.
            code, body = curl("--interface", "127.0.0.2", f"{d.url}/config")
            tally.add(code)
            assert code == 200, body
            for sock in held:
                sock.sendall(b"Host: dcu\r\n\r\n")
                answer = read_answer(sock)
                tally.add(status_of(answer))
                assert status_of(answer) == 200
        finally:
            for sock in held:
                sock.close()
        check_unharmed(d, before, tally, encrypted=False)


# -- 2. and 4. envelopes -----------------------------------------------------------------------------------


def test_forged_firmware_is_refused_before_its_body_is_written(tmp_path: Path) -> None:
    # Regression (issue 13): the body was spooled to a temp file and the tag checked at the end;
    # now the 144-byte header is authenticated first and the answer comes before the body.
    with dcu(tmp_path, wme=ENCRYPTED) as d:
        before = baseline(d)
        tally = Tally("forged firmware headers")
        firmware = bytes(range(256)) * 4000  # 1 MB
        sha = hashlib.sha256(firmware).hexdigest()
        forgeries = {
            "wrong key": seal_stream(WRONG_KEYS, firmware, b"PUT /firmware", device_id=DEVICE),
            "other DCU": seal_stream(KEYS, firmware, b"PUT /firmware", device_id="dcu-other"),
            "other path": seal_stream(KEYS, firmware, b"PUT /config", device_id=DEVICE),
        }
        for name, upload in forgeries.items():
            with connect(d.port) as sock:
                head = f"PUT /firmware HTTP/1.1\r\nHost: dcu\r\nContent-Length: {len(upload)}\r\n"
                sock.sendall(
                    f"{head}X-Firmware-SHA256: {sha}\r\n\r\n".encode() + upload[:STREAM_HEADER_BYTES]
                )
                answer = read_answer(sock)  # the body has not been sent: the answer comes first
                assert not list(firmware_dir(d).glob(".incoming*")), name
            tally.add(status_of(answer))
            assert status_of(answer) == 403 and b"authentication failed" in answer, (name, answer)
        # An authentic header, then a body changed on the way: refused before install.
        upload = bytearray(seal_stream(KEYS, firmware, b"PUT /firmware", device_id=DEVICE))
        upload[STREAM_HEADER_BYTES + 1000] ^= 0x01
        code, _ = exchange(d.port, http("PUT", "/firmware", bytes(upload), (("X-Firmware-SHA256", sha),)))
        tally.add(code)
        assert code == 403
        # A one-shot envelope (kind 1) is not accepted for firmware: it cannot be checked up front.
        code, body = exchange(
            d.port,
            http("PUT", "/firmware", sealed("PUT", "/firmware", firmware), (("X-Firmware-SHA256", sha),)),
        )
        tally.add(code)
        assert code == 400 and b"seal --stream" in body, body
        check_unharmed(d, before, tally, encrypted=True)
        # And the real thing is staged.
        good = seal_stream(KEYS, firmware, b"PUT /firmware", device_id=DEVICE)
        code, _ = exchange(d.port, http("PUT", "/firmware", good, (("X-Firmware-SHA256", sha),)))
        assert code == 200
        assert (firmware_dir(d) / f"{sha}.bin").read_bytes() == firmware


def test_bad_envelopes_are_refused(tmp_path: Path) -> None:
    with dcu(tmp_path, wme=ENCRYPTED) as d:
        before = baseline(d)
        tally = Tally("bad envelopes (fixed)")
        good = sealed("PATCH", "/config", b"ntp_interval=300\n")
        v1 = bytearray(sealed("PATCH", "/config", b"ntp_interval=300\n"))
        v1[4] = 1
        cases = {
            "wrong key": sealed("PATCH", "/config", b"ntp_interval=300\n", keys=WRONG_KEYS),
            "wrong device_id": sealed("PATCH", "/config", b"ntp_interval=300\n", device_id="dcu-other"),
            "wrong path": sealed("PATCH", "/firmware", b"ntp_interval=300\n"),
            "truncated": good[:-1],
            "truncated to the header": good[:48],
            "one block less": good[:48] + good[64:],
            "garbage": b"\x00\xff" * 64,
            "magic and garbage": b"DCUE" + b"\x02\x01" + bytes(200),
            "version 1": bytes(v1),
            "plain": b"ntp_interval=300\n",
            "empty": b"",
        }
        for name, body in cases.items():
            code, answer = exchange(d.port, http("PATCH", "/config", body))
            tally.add(code)
            assert code in (400, 403), (name, code, answer)
            assert b"ntp_interval" not in answer and KEY.encode() not in answer
        # The good one once, then its replay.
        assert exchange(d.port, http("PATCH", "/config", good))[0] == 200
        before = baseline(d)
        code, answer = exchange(d.port, http("PATCH", "/config", good))
        tally.add(code)
        assert code == 403 and b"replayed" in answer
        check_unharmed(d, before, tally, encrypted=True)

        tally = Tally("bad envelopes (hypothesis)")

        @HYPOTHESIS
        @given(body=BAD_ENVELOPES, target=st.sampled_from(["PUT /config", "PATCH /config", "GET /config"]))
        def one(body: bytes, target: str) -> None:
            method, path = target.split(" ")
            code, answer = exchange(d.port, http(method, path, body))
            tally.add(code)
            assert code in (400, 403, 413), (code, answer[:200])
            assert KEY.encode() not in answer

        one()

        @HYPOTHESIS
        @given(upload=BAD_STREAMS)
        def firmware(upload: bytes) -> None:
            code, answer = exchange(
                d.port, http("PUT", "/firmware", upload, (("X-Firmware-SHA256", SHA_ZERO),))
            )
            tally.add(code)
            assert code in (400, 403, 413), (code, answer[:200])

        firmware()
        check_unharmed(d, before, tally, encrypted=True)
        assert not list(firmware_dir(d).glob(".incoming*"))


def _flip(data: bytes, index: int, mask: int) -> bytes:
    out = bytearray(data)
    out[index % len(out)] ^= mask
    return bytes(out)


def _cut(data: bytes, at: int) -> bytes:
    return data[: at % len(data)]


PLAINTEXTS = st.sampled_from([b"", b"ntp_interval=300\n", b"fw_server_encrypt=0\n", b"x" * 100])
CONTEXTS = st.sampled_from(["PUT /config", "PATCH /config", "GET /config"])
BAD_ENVELOPES = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"DCUE\x02\x01\x00\x00" + b),
    st.builds(lambda p, c: seal(WRONG_KEYS, p, c.encode(), device_id=DEVICE), PLAINTEXTS, CONTEXTS),
    st.builds(
        lambda p, c, dev: seal(KEYS, p, c.encode(), device_id=dev),
        PLAINTEXTS,
        CONTEXTS,
        st.sampled_from(["dcu-other", "dcu-tes", "dcu-test2", "DCU-TEST"]),
    ),
    st.builds(
        lambda p, c, i, m: _flip(seal(KEYS, p, c.encode(), device_id=DEVICE), i, m),
        PLAINTEXTS,
        CONTEXTS,
        st.integers(0, 400),
        st.integers(1, 255),
    ),
    st.builds(  # cut anywhere short of the whole envelope
        lambda p, c, n: _cut(seal(KEYS, p, c.encode(), device_id=DEVICE), n),
        PLAINTEXTS,
        CONTEXTS,
        st.integers(0, 10_000),
    ),
    # Authentic, but for another method or target than the one it is sent with (context).
    st.builds(lambda p: seal(KEYS, p, b"PUT /firmware", device_id=DEVICE), PLAINTEXTS),
)
BAD_STREAMS = st.one_of(
    st.binary(max_size=400),
    st.builds(
        lambda p: seal_stream(WRONG_KEYS, p, b"PUT /firmware", device_id=DEVICE), st.binary(max_size=200)
    ),
    st.builds(
        lambda p: seal_stream(KEYS, p, b"PUT /firmware", device_id="dcu-other"), st.binary(max_size=200)
    ),
    st.builds(
        lambda p, i, m: _flip(seal_stream(KEYS, p, b"PUT /firmware", device_id=DEVICE), i, m),
        st.binary(min_size=1, max_size=200),
        st.integers(0, 400),
        st.integers(1, 255),
    ),
    st.builds(
        lambda p, n: seal_stream(KEYS, p, b"PUT /firmware", device_id=DEVICE)[:n],
        st.binary(max_size=200),
        st.integers(0, 143),
    ),
)


# -- oversized and malformed heads ------------------------------------------------------------------------


def test_oversized_and_malformed_heads_are_refused(tmp_path: Path) -> None:
    with dcu(tmp_path, config_port="") as d:
        before = baseline(d)
        tally = Tally("oversized and malformed heads")
        cases = [
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: d\r\n\r\n",
            b"GET /config HTTP/1.1\r\nHost: d\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            b"GET /config HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 3000 + b"\r\n",
            b"GET /config HTTP/1.1\r\nHost: d\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"PUT /config HTTP/1.1\r\nHost: d\r\nContent-Length: -1\r\n\r\n",
            b"PUT /config HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(300),  # a TLS ClientHello
            b"\r\n\r\n\r\n",
        ]
        for request in cases:
            code, answer = exchange(d.port, request)
            tally.add(code)
            assert code in (400, 403, 413, 431, 505), (request[:60], code, answer[:200])

        @HYPOTHESIS
        @given(request=HEADS)
        def one(request: bytes) -> None:
            code, answer = exchange(d.port, request)
            tally.add(code)
            assert code in (0, 200, 400, 403, 404, 405, 408, 411, 413, 422, 431, 501, 505), (
                code,
                answer[:200],
            )

        one()
        check_unharmed(d, before, tally, encrypted=False)


HEADER_NAMES = st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "Expect", "X-Firmware-SHA256", "X-Firmware-Name", "X"]
)
HEADER_VALUES = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.integers(-5, 10**12).map(str),
    st.sampled_from(["chunked", "100-continue", "gzip, chunked"]),
    st.integers(15_000, 40_000).map(lambda n: "a" * n),
)
RAW_HEADS = st.builds(
    lambda method, target, host, headers, body: (
        f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
        + (b"Host: dcu\r\n" if host else b"")
        + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
        + b"\r\n"
        + body
    ),
    st.sampled_from(["GET", "PUT", "PATCH", "POST", "DELETE", "get", "PUT\x00", "", "OPTIONS"]),
    st.sampled_from(["/config", "/firmware", "/config?dry_run=1", "/", "*", "/%00", "/" + "x" * 17_000]),
    st.booleans(),
    st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
    st.binary(max_size=200),
)
WELL_FORMED = st.builds(  # past h11: exercises the port's own routing, limits and refusals
    lambda method, target, headers, body: http(method, target, body, tuple(headers)),
    st.sampled_from(["GET", "PUT", "PATCH", "POST", "DELETE"]),
    st.sampled_from(["/config", "/firmware", "/config?dry_run=1", "/firmware?sha256=" + SHA_ZERO, "/x"]),
    st.lists(
        st.tuples(st.sampled_from(["X-Firmware-SHA256", "X-Firmware-Name", "Expect", "X"]), HEADER_VALUES),
        max_size=3,
    ),
    st.one_of(st.binary(max_size=300), st.sampled_from([b"ntp_interval=300\n", b"fw_server_encrypt=0\n"])),
)
HEADS = st.one_of(RAW_HEADS, WELL_FORMED)


# -- 4. the replay state must be saved ---------------------------------------------------------------------


def test_a_replay_state_that_cannot_be_saved_refuses_the_request(tmp_path: Path) -> None:
    # Regression (issue 13): the replay guard swallowed a failed save and accepted the request, which
    # could then be replayed after a restart.
    with dcu(tmp_path, wme=ENCRYPTED) as d:
        before = baseline(d)
        tally = Tally("replay state unwritable")
        state = d.site.parent / "state" / "config_port"
        shutil.rmtree(state, ignore_errors=True)
        state.write_text("not a directory")  # unwritable for root too (chmod is not)
        try:
            upload = sealed("PATCH", "/config", b"ntp_interval=300\n")
            code, answer = exchange(d.port, http("PATCH", "/config", upload))
            tally.add(code)
            assert code == 503 and b"replay state not saved" in answer, answer
            assert d.file_in_force() == before.file_in_force
            firmware = b"fw" * 500
            sha = hashlib.sha256(firmware).hexdigest()
            stream = seal_stream(KEYS, firmware, b"PUT /firmware", device_id=DEVICE)
            code, answer = exchange(d.port, http("PUT", "/firmware", stream, (("X-Firmware-SHA256", sha),)))
            tally.add(code)
            assert code == 503, answer
            assert "replay state not saved" in daemon_log(d.site)
        finally:
            state.unlink()
        # Once the state can be saved again, a fresh request goes through.
        check_unharmed(d, before, tally, encrypted=True)
        fresh = sealed("PATCH", "/config", b"ntp_interval=300\n")
        assert exchange(d.port, http("PATCH", "/config", fresh))[0] == 200
        assert (state / "replay.json").exists()
