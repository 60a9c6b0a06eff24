"""Hypothesis fuzz harnesses with a fixed budget per CI run, and the regression corpus replayed.

Budget: ``DCUD_FUZZ_PROFILE`` = ``ci`` (default, every test run), ``deep`` (on demand:
``DCUD_FUZZ_PROFILE=deep pytest tests/fuzz``), or ``smoke`` (quick). The numbers are examples per
harness (see :data:`BUDGETS`); they are counts, not times, so a run is reproducible and never flaky
on a slow machine. A failing input is saved to ``build/fuzz-crashes/<target>/last-crash.bin`` (the
minimal one, as hypothesis replays it last); move it into ``tests/vectors/fuzz-regressions/<target>/``
with the fix so that it is replayed on every run. ``tests/fuzz/atheris_fuzz.py`` runs the same
targets coverage-guided under atheris/libFuzzer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from targets import ATTACKER_KEYS, FUZZ_DEVICE, FUZZ_KEYS, REGRESSIONS, TARGETS, run_keeping_crash

from dcud.service.crypto_envelope import seal, seal_stream

BUDGETS = {"smoke": 200, "ci": 2000, "deep": 200_000}
PROFILE = os.environ.get("DCUD_FUZZ_PROFILE", "ci")
if PROFILE not in BUDGETS:
    raise RuntimeError(f"DCUD_FUZZ_PROFILE must be one of {', '.join(BUDGETS)}")


def budget(share: float = 1.0) -> settings:
    """Settings of one harness: the profile's example count (times ``share``), no deadline."""
    return settings(
        max_examples=max(50, int(BUDGETS[PROFILE] * share)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None if PROFILE == "ci" else settings.default.database,
        derandomize=PROFILE == "ci",
    )


def pieces(*alphabet: bytes, max_size: int = 40) -> st.SearchStrategy[bytes]:
    """Byte strings mixing noise with protocol fragments, so random input reaches deep code."""
    return st.lists(st.one_of(st.binary(max_size=8), st.sampled_from(alphabet)), max_size=max_size).map(
        b"".join
    )


IEC_BYTES = pieces(
    b"/",
    b"?",
    b"!",
    b"\r\n",
    b"\x02",
    b"\x03",
    b"\x04",
    b"\x01",
    b"\x06",
    b"\x15",
    b"(",
    b")",
    b"*",
    b"/ISk5MT174-0001\r\n",
    b"1.8.0(001234.5*kWh)\r\n",
    b"\x06050\r\n",
    b"/?12345678!\r\n",
    b"!\r\n\x03",
    b"\x01P0\x02(1234)\x03",
    b"0-0:96.1.1(4B38)\r\n",
    b"!A1B2\r\n",
)
MBUS_BYTES = pieces(
    b"\xe5",
    b"\x10",
    b"\x68",
    b"\x16",
    b"\x68\x03\x03\x68",
    b"\x08\x01\x72",
    b"\x04\x13",
    b"\x0c\x78",
    b"\x10\x5b\x01\x5c\x16",
    b"\x2f\x2f",
    b"\x0f",
    b"\x1f",
    b"\x8f\x7f",
    b"\xfd\x08",
    b"\xfb",
)
WME_LINES = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda n, v: f"{n}={v}",
            st.sampled_from(
                [
                    "ntp_interval",
                    "fw_server_key",
                    "fw_server_encrypt",
                    "datapush_host",
                    "snmp_version",
                    "snmp_auth_key",
                    "tm_server_port",
                    "fw_server_port",
                    "ei_client_pass",
                    "com.sim_pin_code",
                    "calendar_dst_begin",
                    "ntp.address",
                    "bogus",
                    "NTP_interval",
                    " ntp_interval ",
                ]
            ),
            st.one_of(
                st.text(max_size=70), st.sampled_from(["1", "0", "600", "9001", "5a" * 32, "ftp://u:p@h/x"])
            ),
        ),
        st.sampled_from(["# comment", "", "=", "==", "\ufeff", "\r"]),
    ),
    max_size=30,
).map(lambda lines: "\n".join(lines).encode("utf-8", errors="surrogatepass"))


def _http_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes, chunked: bool
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: dcu\r\n"
    for name, value in headers:
        head += f"{name}: {value}\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        return head.encode("latin-1") + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


HTTP_BODIES = st.one_of(
    st.binary(max_size=300),
    WME_LINES,
    st.builds(
        lambda b, ctx: seal(FUZZ_KEYS, b, ctx, device_id=FUZZ_DEVICE),
        st.binary(max_size=64),
        st.sampled_from([b"PUT /config", b"x"]),
    ),
    st.builds(
        lambda b, ctx: seal_stream(FUZZ_KEYS, b, ctx, device_id=FUZZ_DEVICE),
        st.binary(max_size=64),
        st.sampled_from([b"PUT /firmware", b"PUT /firmware?sha256=" + b"0" * 64]),
    )
    .map(lambda envelope: envelope)
    .flatmap(lambda e: st.sampled_from([e, e[:-1], e[:40], e + b"x", bytes([e[0] ^ 1]) + e[1:]])),
)
HTTP_REQUESTS = st.builds(
    _http_request,
    st.sampled_from(["GET", "PUT", "PATCH", "POST", "DELETE", "get", "PUT\x00", ""]),
    st.sampled_from(
        ["/config", "/firmware", "/config?dry_run=1", "/", "*", "/config?" + "a=1&" * 40, "/%00"]
    ),
    st.lists(
        st.tuples(
            st.sampled_from(
                ["Expect", "X-Firmware-SHA256", "Content-Length", "X-Firmware-Name", "Connection", "X"]
            ),
            st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=70),
        ),
        max_size=4,
    ),
    HTTP_BODIES,
    st.booleans(),
)
HTTP_BYTES = st.one_of(
    st.binary(max_size=400),
    HTTP_REQUESTS,
    st.tuples(HTTP_REQUESTS, st.integers(0, 400)).map(lambda t: t[0][: t[1]]),
)


COMMAND_BYTES = pieces(
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"',
    b"\\",
    b'"id":',
    b'"expires":"2999-01-01T00:00:00Z"',
    b'"set":{"ntp_interval":',
    b'"text":"ntp_interval=1\\n"',
    b'"names":["ntp_interval"]',
    b'"meter":"m1"',
    b'"line":"mbus-1","first":1,"last":300',
    b'"drive":"axis-1"',
    b'"index":"0x6060","value":1e400',
    b'"values":[1,2,70000]',
    b'"envelope":"AAAA"',
    b"null",
    b"true",
    b"-0.0",
    b"1e999",
    b"99999999999999999999999",
    b"\xff",
    b"\\u0000",
    max_size=60,
)


@budget(0.5)
@given(
    verb=st.integers(0, 255),
    payload=st.one_of(st.binary(max_size=300), COMMAND_BYTES, COMMAND_BYTES.map(lambda b: b"{" + b + b"}")),
)
def test_fuzz_commands(verb: int, payload: bytes) -> None:
    run_keeping_crash("commands", bytes([verb]) + payload)


@budget()
@given(data=st.one_of(st.binary(max_size=400), IEC_BYTES.map(lambda b: b"\x01\x00" + b), IEC_BYTES))
def test_fuzz_iec(data: bytes) -> None:
    run_keeping_crash("iec", data)


@budget()
@given(data=st.one_of(st.binary(max_size=400), MBUS_BYTES))
def test_fuzz_mbus(data: bytes) -> None:
    run_keeping_crash("mbus", data)


@budget()
@given(data=st.one_of(st.binary(max_size=600), WME_LINES))
def test_fuzz_wme(data: bytes) -> None:
    run_keeping_crash("wme", data)


@budget()
@given(mode=st.integers(0, 255), request=HTTP_BYTES)
def test_fuzz_http(mode: int, request: bytes) -> None:
    run_keeping_crash("http", bytes([mode]) + request)


FORGED = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda b: seal(ATTACKER_KEYS, b, b"PUT /config", device_id=FUZZ_DEVICE), st.binary(max_size=64)
    ),
    st.tuples(st.binary(max_size=64), st.integers(0, 10_000), st.integers(1, 255)).map(
        lambda t: _flip(seal(FUZZ_KEYS, t[0], b"PUT /config", device_id=FUZZ_DEVICE), t[1], t[2])
    ),
    st.builds(lambda b: seal(FUZZ_KEYS, b, b"PUT /firmware", device_id=FUZZ_DEVICE), st.binary(max_size=64)),
    st.builds(lambda b: seal(FUZZ_KEYS, b, b"PUT /config", device_id="dcu-other"), st.binary(max_size=64)),
)


def _flip(envelope: bytes, index: int, mask: int) -> bytes:
    data = bytearray(envelope)
    data[index % len(data)] ^= mask
    return bytes(data)


@budget(0.5)
@given(data=FORGED)
def test_fuzz_envelope(data: bytes) -> None:
    run_keeping_crash("envelope", data)


def _prefixed(apdu: bytes) -> bytes:
    return len(apdu).to_bytes(2, "big") + apdu


_DLMS_PIECES = [
    _prefixed(
        bytes.fromhex(
            "6129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F040000501F01F40007"
        )
    ),
    _prefixed(
        bytes.fromhex(
            "6142A109060760857405080101A203020100A305A10302010EA40A04084D4D4D0000BC614E88020780890760857405080205"
            "AA0A8008503677524A323146BE10040E0800065F1F040000501F01F40007"
        )
    ),
    _prefixed(bytes.fromhex("C401C1000600001391")),
    _prefixed(bytes.fromhex("C401C10101")),
    _prefixed(bytes.fromhex("C402C10000000001000C010506000000010600000002")),
    _prefixed(bytes.fromhex("C402C1010000000200050600000005")),
    _prefixed(bytes.fromhex("C401C10002020F00161E")),
    _prefixed(bytes.fromhex("C701C1000100091110000000011A52FE7DD3E72748973C1E28")),
    _prefixed(bytes.fromhex("6303800100")),
    _prefixed(bytes.fromhex("D80102")),
    _prefixed(bytes.fromhex("CC1E3001234567411312FF935A47566827C467BC7D825C3BE4A77C3FCC056B6B")),
    bytes.fromhex("C402C1"),
    bytes.fromhex("0009"),
]
DLMS_BYTES = st.tuples(
    st.integers(0, 255),
    st.lists(st.one_of(st.binary(max_size=6), st.sampled_from(_DLMS_PIECES)), max_size=12).map(b"".join),
).map(lambda t: bytes([t[0]]) + t[1])


@budget()
@given(data=st.one_of(st.binary(max_size=300), DLMS_BYTES))
def test_fuzz_dlms(data: bytes) -> None:
    run_keeping_crash("dlms", data)


def _corpus() -> list[tuple[str, Path]]:
    return sorted(
        (target.name, path)
        for target in REGRESSIONS.iterdir()
        if target.is_dir()
        for path in target.iterdir()
        if path.is_file() and path.suffix != ".md" and not path.name.startswith(".")
    )


def test_regression_corpus_targets_exist() -> None:
    assert {t.name for t in REGRESSIONS.iterdir() if t.is_dir()} <= set(TARGETS)


@pytest.mark.parametrize(("target", "path"), _corpus(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_regression_vector(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())
