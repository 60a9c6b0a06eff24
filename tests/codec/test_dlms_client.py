"""The DLMS client session against a scripted meter, over an in-test wrapper transport (no HDLC)."""

from __future__ import annotations

import asyncio
import random

import pytest

from dcud.codec.actions import Done, Failed, Send
from dcud.codec.dlms.apdu import (
    AARQ,
    RLRQ,
    ActionRequestNormal,
    Conformance,
    GetRequestNext,
    GetRequestNormal,
    GetRequestWithList,
    Mechanism,
    SetRequestWithDatablock,
    SetRequestWithFirstDatablock,
    decode_apdu,
)
from dcud.codec.dlms.axdr import (
    Array,
    DoubleLongUnsigned,
    Enum,
    Integer,
    LongUnsigned,
    OctetString,
    Structure,
    VisibleString,
)
from dcud.codec.dlms.client import (
    ActionRequest,
    AssociationRefused,
    Auth,
    DlmsClient,
    DlmsClientConfig,
    DlmsSessionResult,
    GetRequest,
    SetRequest,
)
from dcud.codec.dlms.cosem import (
    CLOCK_TIME,
    clock_value,
    decode_scaler_unit,
    entry_descriptor,
    scaled,
)
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.security import AuthenticationFailed, DecipheringError, Keys, SecurityPolicy
from dcud.errors import LocalProtocolError, NegativeResponse, PeerTimeout, RemoteProtocolError
from dcud.service.session_runner import run_session

from helpers.dlms import (
    CLIENT_TITLE,
    GREEN_BOOK_KEYS,
    ScriptedMeter,
    TestWrapperTransport,
    drive,
    wrap,
)

ENERGY = AttributeRef.parse("3/1.0.1.8.0.255/2")
ENERGY_SU = AttributeRef.parse("3/1.0.1.8.0.255/3")
VOLTAGE = AttributeRef.parse("3/1.0.32.7.0.255/2")
SERIAL = AttributeRef.parse("1/0.0.96.1.0.255/2")
PROFILE = AttributeRef.parse("7/1.0.99.1.0.255/2")
DISCONNECT = AttributeRef.parse("70/0.0.96.3.10.255/1")
CLOCK_BYTES = bytes.fromhex("07E80B15040E1E0000FFC400")


def meter_objects() -> dict[AttributeRef, object]:
    return {
        ENERGY: DoubleLongUnsigned(20_411_500),
        ENERGY_SU: Structure((Integer(0), Enum(30))),
        VOLTAGE: LongUnsigned(2301),
        SERIAL: VisibleString("LGZ12345678"),
        CLOCK_TIME: OctetString(CLOCK_BYTES),
        PROFILE: Array(
            tuple(Structure((OctetString(CLOCK_BYTES), DoubleLongUnsigned(i))) for i in range(200))
        ),
    }


def make_meter(**kwargs: object) -> ScriptedMeter:
    return ScriptedMeter(objects=meter_objects(), **kwargs)  # type: ignore[arg-type]


READS = [GetRequest(ENERGY), GetRequest(ENERGY_SU), GetRequest(SERIAL), GetRequest(CLOCK_TIME)]


def run(config: DlmsClientConfig, meter: ScriptedMeter, requests=READS, **kwargs: object):
    transport = TestWrapperTransport()
    client = DlmsClient(transport, config, requests)
    result = drive(client, meter, **kwargs)  # type: ignore[arg-type]
    return client, transport, result


def done(result) -> DlmsSessionResult:
    assert isinstance(result.final, Done), result.final
    value = result.final.result
    assert isinstance(value, DlmsSessionResult)
    return value


def failed(result) -> Exception:
    assert isinstance(result.final, Failed), result.final
    return result.final.error


# ---------------------------------------------------------------------------------------------------
# No security


@pytest.mark.parametrize("chunking", ["whole", "bytes", "random"])
def test_no_security_reads_values_and_releases(chunking: str) -> None:
    meter = make_meter()
    _client, transport, result = run(DlmsClientConfig(), meter, chunking=chunking, rng=random.Random(7))
    session = done(result)
    values = [o.value for o in session.outcomes]
    assert values == [
        DoubleLongUnsigned(20_411_500),
        Structure((Integer(0), Enum(30))),
        VisibleString("LGZ12345678"),
        OctetString(CLOCK_BYTES),
    ]
    assert scaled(values[0], decode_scaler_unit(values[1])) == (20_411_500, "Wh")
    assert all(o.ok for o in session.outcomes)
    assert session.released and transport.closed == 1
    assert isinstance(meter.received[0], AARQ) and meter.received[0].mechanism is None
    assert isinstance(meter.received[-1], RLRQ)
    # The meter's conformance (0x00501F) has no multiple-references: one GET per attribute.
    assert sum(isinstance(a, GetRequestNormal) for a in meter.received) == 4
    assert session.last_invocation_counter is None


def test_with_list_when_the_meter_allows_it() -> None:
    meter = make_meter(conformance=Conformance(0x001E1D))
    _client, _transport, result = run(
        DlmsClientConfig(), meter, [*READS, GetRequest(AttributeRef.parse("3/9.9.9.9.9.9/2"))]
    )
    session = done(result)
    lists = [a for a in meter.received if isinstance(a, GetRequestWithList)]
    assert len(lists) == 1 and len(lists[0].items) == 5
    assert [o.ok for o in session.outcomes] == [True, True, True, True, False]
    assert session.outcomes[4].error_text == "object-undefined"


def test_with_list_is_split_by_the_list_bound() -> None:
    meter = make_meter(conformance=Conformance(0x001E1D))
    config = DlmsClientConfig(max_list_items=3)
    requests = [GetRequest(ENERGY)] * 7
    _client, _transport, result = run(config, meter, requests)
    assert len(done(result).outcomes) == 7
    lists = [a for a in meter.received if isinstance(a, GetRequestWithList)]
    assert [len(a.items) for a in lists] == [3, 3]
    assert sum(isinstance(a, GetRequestNormal) for a in meter.received) == 1


@pytest.mark.parametrize("chunking", ["whole", "bytes"])
def test_block_transfer_get_reassembles_the_profile(chunking: str) -> None:
    meter = make_meter(block_bytes=128)
    requests = [GetRequest(PROFILE, entry_descriptor(1, 200))]
    _client, _transport, result = run(DlmsClientConfig(), meter, requests, chunking=chunking)
    session = done(result)
    value = session.outcomes[0].value
    assert isinstance(value, Array) and len(value.items) == 200
    assert value == meter.objects[PROFILE]
    nexts = [a for a in meter.received if isinstance(a, GetRequestNext)]
    assert [n.block_number for n in nexts] == list(range(1, len(nexts) + 1))
    assert session.blocks == len(nexts) + 1 > 10


def test_block_transfer_of_a_list() -> None:
    meter = make_meter(conformance=Conformance(0x001E1D), block_bytes=16)
    _client, _transport, result = run(DlmsClientConfig(), meter)
    session = done(result)
    assert [o.value for o in session.outcomes][2] == VisibleString("LGZ12345678")
    assert any(isinstance(a, GetRequestNext) for a in meter.received)


def test_block_count_is_bounded_and_the_association_still_released() -> None:
    meter = make_meter(block_bytes=16)
    config = DlmsClientConfig(max_blocks=5)
    _client, transport, result = run(config, meter, [GetRequest(PROFILE)])
    error = failed(result)
    assert isinstance(error, RemoteProtocolError) and "more than 5 blocks" in str(error)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1


def test_response_bytes_are_bounded() -> None:
    meter = make_meter(block_bytes=64)
    config = DlmsClientConfig(max_response_bytes=500)
    _client, _transport, result = run(config, meter, [GetRequest(PROFILE)])
    assert "larger than 500 bytes" in str(failed(result))


def test_set_and_action() -> None:
    meter = make_meter()
    meter.actions[DISCONNECT] = None
    new_time = clock_value(__import__("datetime").datetime.fromisoformat("2026-11-21T14:30:00+01:00"))
    requests = [
        SetRequest(CLOCK_TIME, new_time),
        ActionRequest(DISCONNECT, Integer(0)),
        GetRequest(CLOCK_TIME),
    ]
    _client, _transport, result = run(DlmsClientConfig(), meter, requests)
    session = done(result)
    assert [o.ok for o in session.outcomes] == [True, True, True]
    assert session.outcomes[2].value == new_time
    unknown = ActionRequest(AttributeRef.parse("70/0.0.96.3.11.255/2"))
    _client, _transport, result = run(DlmsClientConfig(), make_meter(), [unknown])
    assert done(result).outcomes[0].error_text == "object-unavailable"


def test_long_set_goes_in_data_blocks() -> None:
    meter = make_meter(max_pdu=64, conformance=Conformance(0x00581F))
    value = OctetString(bytes(range(200)))
    target = AttributeRef.parse("1/0.0.96.1.1.255/2")
    _client, _transport, result = run(DlmsClientConfig(), meter, [SetRequest(target, value)])
    assert done(result).outcomes[0].ok
    assert meter.objects[target] == value
    firsts = [a for a in meter.received if isinstance(a, SetRequestWithFirstDatablock)]
    more = [a for a in meter.received if isinstance(a, SetRequestWithDatablock)]
    assert len(firsts) == 1 and len(more) >= 3 and more[-1].last_block


# ---------------------------------------------------------------------------------------------------
# LLS


def test_lls_password() -> None:
    meter = make_meter(mechanism=Mechanism.LLS, password=b"12345678")
    config = DlmsClientConfig(auth=Auth.LLS, password=b"12345678")
    _client, _transport, result = run(config, meter)
    assert len(done(result).outcomes) == 4
    aarq = meter.received[0]
    assert isinstance(aarq, AARQ) and aarq.mechanism == Mechanism.LLS
    assert aarq.authentication_value == b"12345678"
    assert "12345678" not in repr(aarq) and "12345678" not in repr(config)


def test_lls_wrong_password_is_a_clear_error_and_the_link_is_closed() -> None:
    meter = make_meter(mechanism=Mechanism.LLS, password=b"12345678")
    config = DlmsClientConfig(auth=Auth.LLS, password=b"wrong")
    _client, transport, result = run(config, meter)
    error = failed(result)
    assert isinstance(error, AuthenticationFailed)
    assert str(error) == "LLS authentication failed: the meter refused the password (code 0xD)"
    assert "wrong" not in str(error)
    # A refused AARQ leaves no association to release: only the link is closed.
    assert transport.closed == 1
    assert not any(isinstance(a, RLRQ) for a in meter.received)


def test_wrong_mechanism_is_an_association_refusal() -> None:
    meter = make_meter(mechanism=Mechanism.LLS, password=b"x")
    _client, transport, result = run(DlmsClientConfig(), meter)
    error = failed(result)
    assert isinstance(error, AssociationRefused)
    assert "authentication-mechanism-name-not-recognised" in str(error)
    assert transport.closed == 1


# ---------------------------------------------------------------------------------------------------
# HLS-GMAC and ciphering


def hls_config(**kwargs: object) -> DlmsClientConfig:
    base: dict[str, object] = {
        "auth": Auth.HLS_GMAC,
        "keys": GREEN_BOOK_KEYS,
        "system_title": CLIENT_TITLE,
        "invocation_counter": 1,
        "challenge": b"K56iVagY",
    }
    base.update(kwargs)
    return DlmsClientConfig(**base)  # type: ignore[arg-type]


def test_hls_gmac_without_ciphering_matches_green_book_table_43() -> None:
    meter = make_meter(mechanism=Mechanism.HLS_GMAC, keys=GREEN_BOOK_KEYS)
    client, transport, result = run(hls_config(), meter)
    session = done(result)
    assert len(session.outcomes) == 4 and session.released
    # Pass 3 with the Green Book's values: IC 1, StoC "P6wRJ21F".
    action = transport.sent[1]
    assert action.hex().upper().endswith("0911" + "10000000011A52FE7DD3E72748973C1E28")
    assert session.last_invocation_counter == 1 == client.last_invocation_counter
    assert client.next_invocation_counter == 2


@pytest.mark.parametrize(
    "policy",
    [SecurityPolicy.AUTHENTICATED, SecurityPolicy.ENCRYPTED, SecurityPolicy.AUTHENTICATED_ENCRYPTED],
)
def test_hls_gmac_with_ciphering(policy: SecurityPolicy) -> None:
    meter = make_meter(mechanism=Mechanism.HLS_GMAC, keys=GREEN_BOOK_KEYS, policy=policy, block_bytes=200)
    config = hls_config(security=policy, invocation_counter=1000)
    requests = [*READS, GetRequest(PROFILE)]
    client, transport, result = run(config, meter, requests, chunking="random", rng=random.Random(3))
    session = done(result)
    assert [o.ok for o in session.outcomes] == [True] * 5
    assert session.outcomes[4].value == meter.objects[PROFILE]
    assert session.server_system_title == meter.system_title
    # Every APDU after the AARQ and before the RLRQ went ciphered, each with a fresh counter.
    assert all(apdu[0] in (0xC8, 0xCB) for apdu in transport.sent[1:-1])
    # 1000 protects the AARQ's initiate, 1001 goes into f(StoC), the rest protect one APDU each.
    count = len(meter.client_counters)
    assert meter.client_counters == [1000, *range(1002, 1002 + count - 1)]
    assert session.last_invocation_counter == meter.client_counters[-1] == client.last_invocation_counter
    assert session.server_invocation_counter == meter.counter.last_used
    aarq = meter.received[0]
    assert isinstance(aarq, AARQ) and aarq.application_context == 3 and aarq.calling_ap_title == CLIENT_TITLE


def test_hls_wrong_key_is_a_clear_error_and_release_and_close_are_sent() -> None:
    meter = make_meter(mechanism=Mechanism.HLS_GMAC, keys=GREEN_BOOK_KEYS)
    wrong = Keys(bytes(16), bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"))
    _client, transport, result = run(hls_config(keys=wrong), meter)
    error = failed(result)
    assert isinstance(error, AuthenticationFailed)
    assert str(error).startswith("HLS authentication failed: the meter refused our reply to its challenge")
    assert "000000" not in str(error) and "D0D1" not in str(error)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1


def test_meter_that_cannot_prove_itself_fails_hls() -> None:
    meter = make_meter(mechanism=Mechanism.HLS_GMAC, keys=GREEN_BOOK_KEYS, forge_ctos=True)
    _client, transport, result = run(hls_config(), meter)
    error = failed(result)
    assert isinstance(error, AuthenticationFailed)
    assert "does not verify" in str(error)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1
    assert not any(isinstance(a, GetRequestNormal) for a in meter.received)


def test_ciphered_association_with_wrong_keys_is_refused_clearly() -> None:
    meter = make_meter(
        mechanism=Mechanism.HLS_GMAC, keys=GREEN_BOOK_KEYS, policy=SecurityPolicy.AUTHENTICATED_ENCRYPTED
    )
    config = hls_config(keys=Keys(bytes(16), bytes(16)), security=SecurityPolicy.AUTHENTICATED_ENCRYPTED)
    _client, transport, result = run(config, meter)
    error = failed(result)
    assert isinstance(error, AssociationRefused)
    assert "wrong keys or system title?" in str(error)
    assert transport.closed == 1


def test_replayed_response_is_refused() -> None:
    meter = make_meter(policy=SecurityPolicy.AUTHENTICATED_ENCRYPTED, keys=GREEN_BOOK_KEYS)
    config = DlmsClientConfig(
        security=SecurityPolicy.AUTHENTICATED_ENCRYPTED,
        keys=GREEN_BOOK_KEYS,
        system_title=CLIENT_TITLE,
        server_invocation_counter=0x01234567 + 2,
    )
    _client, transport, result = run(config, meter)
    error = failed(result)
    assert isinstance(error, DecipheringError) and "replayed" in str(error)
    assert transport.closed == 1


def test_unprotected_response_under_a_policy_is_refused() -> None:
    meter = make_meter(policy=SecurityPolicy.AUTHENTICATED, keys=GREEN_BOOK_KEYS)
    config = DlmsClientConfig(
        security=SecurityPolicy.AUTHENTICATED, keys=GREEN_BOOK_KEYS, system_title=CLIENT_TITLE
    )
    meter.policy = SecurityPolicy.NONE  # AARE still ciphered below, then plain answers
    original = meter._associate

    def associate(aarq: AARQ) -> bytes:
        meter.policy = SecurityPolicy.AUTHENTICATED
        try:
            return original(aarq)
        finally:
            meter.policy = SecurityPolicy.NONE

    meter._associate = associate  # type: ignore[method-assign]
    _client, transport, result = run(config, meter)
    error = failed(result)
    assert isinstance(error, RemoteProtocolError) and "unprotected GetResponseNormal" in str(error)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1


def test_invocation_counter_exhaustion_is_local_and_releases() -> None:
    meter = make_meter(policy=SecurityPolicy.AUTHENTICATED, keys=GREEN_BOOK_KEYS)
    config = DlmsClientConfig(
        security=SecurityPolicy.AUTHENTICATED,
        keys=GREEN_BOOK_KEYS,
        system_title=CLIENT_TITLE,
        invocation_counter=0xFFFF_FFFF,
    )
    client, transport, result = run(config, meter)
    error = failed(result)
    assert isinstance(error, LocalProtocolError) and "exhausted" in str(error)
    assert client.last_invocation_counter == 0xFFFF_FFFF
    assert transport.closed == 1


# ---------------------------------------------------------------------------------------------------
# Timeouts, exceptions, link loss


def test_timeout_on_a_request_releases_and_closes() -> None:
    meter = make_meter(silent_on=lambda apdu: isinstance(apdu, GetRequestNormal) and apdu.attribute == SERIAL)
    client, transport, result = run(DlmsClientConfig(response_timeout_s=5.0), meter)
    error = failed(result)
    assert isinstance(error, PeerTimeout) and "no answer to a request within 5 s" in str(error)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1
    assert client.error is error


def test_timeout_on_the_release_still_closes_and_keeps_the_readings() -> None:
    meter = make_meter(answer_rlrq=False)
    _client, transport, result = run(DlmsClientConfig(), meter)
    session = done(result)
    assert len(session.outcomes) == 4 and not session.released
    assert transport.closed == 1


def test_no_aare_closes_without_release() -> None:
    meter = make_meter()
    meter.handle = lambda data: None  # type: ignore[method-assign]
    _client, transport, result = run(DlmsClientConfig(), meter)
    assert "no AARE" in str(failed(result))
    assert transport.closed == 1


def test_link_that_never_comes_up() -> None:
    transport = TestWrapperTransport(fail_open=True)
    client = DlmsClient(transport, DlmsClientConfig(response_timeout_s=2.0), READS)
    assert client.start(0.0) == []
    assert client.next_deadline() == 2.0
    actions = client.handle_timer(2.0)
    assert isinstance(actions[-1], Failed) and "link did not come up" in str(actions[-1].error)
    assert transport.closed == 1 and client.next_deadline() is None


def test_exception_response_is_a_negative_response() -> None:
    meter = make_meter()
    original = meter._serve
    meter._serve = lambda apdu: b"\xd8\x01\x02" if isinstance(apdu, GetRequestNormal) else original(apdu)  # type: ignore[method-assign]
    _client, _transport, result = run(DlmsClientConfig(), meter)
    error = failed(result)
    assert isinstance(error, NegativeResponse)
    assert "service-not-allowed: service-not-supported" in str(error)
    assert isinstance(meter.received[-1], RLRQ)


def test_garbage_response_is_a_remote_protocol_error() -> None:
    meter = make_meter()
    meter._serve = lambda apdu: b"\xc4\x01\xc1\x00\x99"  # type: ignore[method-assign]
    _client, transport, result = run(DlmsClientConfig(), meter)
    assert isinstance(failed(result), RemoteProtocolError)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1


def test_wrong_invoke_id_is_refused() -> None:
    meter = make_meter()
    meter._serve = lambda apdu: bytes.fromhex("C401C7000600000001")  # type: ignore[method-assign]
    _client, _transport, result = run(DlmsClientConfig(), meter)
    assert "invoke id 7" in str(failed(result))


def test_link_down_mid_session_fails_without_release() -> None:
    meter = make_meter()
    transport = TestWrapperTransport()
    client = DlmsClient(transport, DlmsClientConfig(), READS)
    actions = client.start(0.0)
    aarq = next(a for a in actions if isinstance(a, Send))
    aare = meter.feed(aarq.data)[0]
    actions = client.receive_data(aare, 0.1)
    assert any(isinstance(a, Send) for a in actions)
    bad = client.receive_data(b"\x00\x02garbage", 0.2)
    assert isinstance(bad[-1], Failed) and isinstance(bad[-1].error, RemoteProtocolError)
    assert client.next_deadline() is None and client.receive_data(b"x", 0.3) == []


def test_config_is_checked() -> None:
    with pytest.raises(LocalProtocolError, match="block cipher key"):
        DlmsClientConfig(auth=Auth.HLS_GMAC)
    with pytest.raises(LocalProtocolError, match="system title"):
        DlmsClientConfig(security=SecurityPolicy.AUTHENTICATED, keys=GREEN_BOOK_KEYS)
    with pytest.raises(LocalProtocolError, match="password"):
        DlmsClientConfig(auth=Auth.LLS)
    with pytest.raises(LocalProtocolError, match="challenge"):
        hls_config(challenge=b"short")
    assert "Keys(<hidden>)" in repr(hls_config())
    assert "K56iVagY" not in repr(hls_config())


def test_random_challenge_is_32_bytes() -> None:
    meter = make_meter(mechanism=Mechanism.HLS_GMAC, keys=GREEN_BOOK_KEYS)
    _client, _transport, result = run(hls_config(challenge=None), meter)
    done(result)
    aarq = meter.received[0]
    assert isinstance(aarq, AARQ) and aarq.authentication_value is not None
    assert len(aarq.authentication_value) == 32


# ---------------------------------------------------------------------------------------------------
# The session runner drives it like the other protocols' sessions


class _LoopbackPort:
    """A SessionPort whose peer is the scripted meter (bytes answered as they are written)."""

    def __init__(self, meter: ScriptedMeter) -> None:
        self.meter = meter
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    def write(self, data: bytes) -> None:
        for frame in self.meter.feed(data):
            self.inbox.put_nowait(frame)

    async def drain(self) -> None:
        return None

    async def read(self, max_bytes: int = 4096, timeout_s: float = 1.0) -> bytes:
        try:
            return await asyncio.wait_for(self.inbox.get(), min(timeout_s, 5.0))
        except TimeoutError:
            return b""

    async def set_baud(self, baud: int) -> None:
        return None

    def flush_input(self) -> None:
        return None


async def test_runs_under_the_session_runner() -> None:
    meter = make_meter(
        mechanism=Mechanism.HLS_GMAC, keys=GREEN_BOOK_KEYS, policy=SecurityPolicy.AUTHENTICATED_ENCRYPTED
    )
    client = DlmsClient(
        TestWrapperTransport(), hls_config(security=SecurityPolicy.AUTHENTICATED_ENCRYPTED), READS
    )
    result = await asyncio.wait_for(run_session(client, _LoopbackPort(meter)), 30)
    assert isinstance(result, DlmsSessionResult) and len(result.outcomes) == 4


def test_wrap_frames_are_what_the_meter_decodes() -> None:
    # Guard for the helper itself: a frame the in-test transport builds carries the APDU unchanged.
    frame = wrap(b"\x62\x03\x80\x01\x00", 0x10, 0x01)
    assert frame.hex() == "00010010000100056203800100"
    assert isinstance(decode_apdu(frame[8:]), RLRQ)
    assert isinstance(ActionRequestNormal, type)


def test_weaker_protection_than_the_policy_is_refused() -> None:
    meter = make_meter(policy=SecurityPolicy.AUTHENTICATED, keys=GREEN_BOOK_KEYS)
    config = DlmsClientConfig(
        security=SecurityPolicy.AUTHENTICATED_ENCRYPTED, keys=GREEN_BOOK_KEYS, system_title=CLIENT_TITLE
    )
    _client, transport, result = run(config, meter)
    error = failed(result)
    assert isinstance(error, RemoteProtocolError) and "SC 0x10, less than the policy" in str(error)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1


# ---------------------------------------------------------------------------------------------------
# The planner, the counter limit, abort


def test_a_planner_chooses_later_requests_from_earlier_answers() -> None:
    meter = make_meter()
    seen: list[int] = []

    def planner(outcomes: object) -> list[GetRequest]:
        done_so_far = list(outcomes)  # type: ignore[call-overload]
        seen.append(len(done_so_far))
        if not done_so_far:
            return [GetRequest(ENERGY)]
        if len(done_so_far) == 1:  # the second phase depends on the first answer
            assert done_so_far[0].value == DoubleLongUnsigned(20_411_500)
            return [GetRequest(ENERGY_SU), GetRequest(SERIAL)]
        return []

    transport = TestWrapperTransport()
    client = DlmsClient(transport, DlmsClientConfig(), planner=planner)
    session = done(drive(client, meter))
    assert [o.request for o in session.outcomes] == [
        GetRequest(ENERGY),
        GetRequest(ENERGY_SU),
        GetRequest(SERIAL),
    ]
    assert seen == [0, 1, 3] and session.released and transport.closed == 1


def test_a_planner_that_fails_still_leaves_the_association_released() -> None:
    meter = make_meter()

    def planner(outcomes: object) -> list[GetRequest]:
        raise KeyError("a bug in the planner")

    transport = TestWrapperTransport()
    client = DlmsClient(transport, DlmsClientConfig(), planner=planner)
    error = failed(drive(client, meter))
    assert isinstance(error, LocalProtocolError) and "planner failed" in str(error)
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1


def test_the_session_stops_at_its_counter_limit_and_releases() -> None:
    meter = make_meter(policy=SecurityPolicy.AUTHENTICATED, keys=GREEN_BOOK_KEYS)
    config = DlmsClientConfig(
        security=SecurityPolicy.AUTHENTICATED,
        keys=GREEN_BOOK_KEYS,
        system_title=CLIENT_TITLE,
        invocation_counter=100,
        invocation_counter_limit=102,  # the AARQ, then two requests
    )
    client, transport, result = run(config, meter)
    error = failed(result)
    assert isinstance(error, LocalProtocolError) and "reservation exhausted at 102" in str(error)
    assert client.last_invocation_counter == 102 and client.next_invocation_counter == 103
    assert isinstance(meter.received[-1], RLRQ) and transport.closed == 1


def test_abort_closes_the_link_at_once_and_fails_the_session() -> None:
    meter = make_meter(silent_on=lambda apdu: isinstance(apdu, GetRequestNormal) and apdu.attribute == SERIAL)
    transport = TestWrapperTransport()
    client = DlmsClient(transport, DlmsClientConfig(), READS)
    now = 0.0
    actions = client.start(now)
    for _ in range(100):  # until the request to the silent object is in flight
        replies = [r for a in actions if isinstance(a, Send) for r in meter.feed(a.data)]
        if not replies:
            break
        actions = [x for reply in replies for x in client.receive_data(reply, now)]
    assert any(isinstance(a, GetRequestNormal) and a.attribute == SERIAL for a in meter.received)
    ending = client.abort(now + 1)
    assert transport.closed == 1 and not isinstance(meter.received[-1], RLRQ)
    (final,) = [a for a in ending if isinstance(a, Failed)]
    assert isinstance(final.error, LocalProtocolError) and "cancelled" in str(final.error)
    assert client.abort(now + 2) == [] and client.next_deadline() is None
