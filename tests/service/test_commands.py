"""The command router: typed requests, bounds before decoding, idempotency, expiry, envelopes, no escapes.

Unit tests of one layer (dcud.service.commands) with small handlers; the same paths against the running
daemon and a real broker are in tests/service/test_mqtt_commands.py and tests/system/test_hostile_mqtt.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from dcud.service.commands import (
    CommandContext,
    CommandLimits,
    CommandRouter,
    NotAuthorizedError,
    Request,
    encode_reply,
    envelope_context,
    nesting_exceeds,
)
from dcud.service.crypto_envelope import EnvelopeKeys, Opened, ReplayGuard, seal

KEY = "0123456789abcdef" * 4


class SetRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    value: Annotated[int, msgspec.Meta(ge=1, le=86400)]
    name: Annotated[str, msgspec.Meta(max_length=8)] = "x"
    tags: list[Annotated[str, msgspec.Meta(max_length=4)]] = msgspec.field(default_factory=list)


class Calls:
    def __init__(self) -> None:
        self.sets: list[tuple[int, bool]] = []
        self.release = asyncio.Event()
        self.release.set()


DEVICE_ID = "dcu-test"


class Sealing:
    def __init__(self, key: str | None) -> None:
        self._keys = EnvelopeKeys.from_parameter(key) if key else None
        self.guard = ReplayGuard(300)

    def keys(self) -> EnvelopeKeys | None:
        return self._keys

    def check_replay(self, opened: Opened) -> None:
        self.guard.check(opened.timestamp_s, opened.nonce, 0)

    def device_id(self) -> str:
        return DEVICE_ID


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def make_router(
    key: str | None = None, *, limits: CommandLimits | None = None, clock: Clock | None = None
) -> tuple[CommandRouter, Calls]:
    clock = clock or Clock()
    router = CommandRouter(limits, Sealing(key), monotonic=clock, wall_clock=lambda: 1.9e9)
    calls = Calls()

    async def ping(_request: Request, _ctx: CommandContext) -> dict[str, Any]:
        return {"pong": True}

    async def set_(request: SetRequest, ctx: CommandContext) -> dict[str, Any]:
        await calls.release.wait()
        calls.sets.append((request.value, ctx.authenticated))
        return {"value": request.value, "authenticated": ctx.authenticated}

    async def broken(_request: Request, _ctx: CommandContext) -> dict[str, Any]:
        return {}["missing"]  # a bug: KeyError

    async def unencodable(_request: Request, _ctx: CommandContext) -> dict[str, Any]:
        circular: dict[str, Any] = {}
        circular["self"] = circular
        return circular

    router.register("ping", Request, ping)
    router.register("thing/set", SetRequest, set_, state_changing=True)
    router.register("thing/peek", SetRequest, set_)
    router.register("broken", Request, broken)
    router.register("unencodable", Request, unencodable)
    return router, calls


async def call(router: CommandRouter, verb: str, request: Any) -> dict[str, Any]:
    payload = request if isinstance(request, bytes) else json.dumps(request).encode()
    return await router.dispatch(verb, payload)


# -- typed requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field", "text"),
    [
        ({"value": "300"}, "$.value", "Expected `int`, got `str`"),
        ({"value": None}, "$.value", "got `null`"),
        ({}, "$", "missing required field `value`"),
        ({"value": 300, "colour": "red"}, "$", "unknown field `colour`"),
        ({"value": 0}, "$.value", ">= 1"),
        ({"value": 10**30}, "$.value", "<= 86400"),
        (b'{"value": 1e400}', "$.value", "out of range"),
        ({"value": 300, "name": "x" * 100}, "$.name", "length <= 8"),
        ({"value": 300, "tags": ["ok", "toolong"]}, "$.tags[1]", "length <= 4"),
        ({"value": 300, "id": ""}, "$.id", ""),
        ({"value": 300, "id": "x" * 129}, "$.id", ""),
        ({"value": 300, "id": 1.5}, "$.id", ""),
        ({"value": 300, "expires": "2030-01-01T00:00:00"}, "$.expires", "timezone"),
        ({"value": 300, "expires": "tomorrow"}, "$.expires", ""),
        ([1, 2], "$", "Expected `object`, got `array`"),
    ],
)
async def test_bad_requests_name_the_field(request_: Any, field: str, text: str) -> None:
    router, calls = make_router()
    reply = await call(router, "thing/peek", request_)
    assert reply["ok"] is False and reply["error"]["type"] == "BadRequestError", reply
    assert reply["error"]["field"] == field
    assert text in reply["error"]["message"]
    assert calls.sets == []


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 60000,  # the reported crash: json.loads raised RecursionError
        b'{"value": ' + b"[" * 60000,
        b'{"id": "a", "value": 300, "tags": ' + b'{"a": ' * 20 + b"1" + b"}" * 20 + b"}",
        b"not json",
        b"\xff\xfe",
        b'{"value": NaN}',
        b'{"value": Infinity}',
        b'{"value": 300',
        b'"\\ud800"',
    ],
)
async def test_hostile_bytes_are_refused_without_recursion(payload: bytes) -> None:
    router, calls = make_router()
    reply = await router.dispatch("thing/peek", payload)
    assert reply["ok"] is False and reply["error"]["type"] == "BadRequestError", reply
    assert reply["error"]["field"] == "$"
    assert router.stats.internal_errors == 0 and calls.sets == []


async def test_nesting_is_bounded_before_any_decoder_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from dcud.service import commands

    router, _ = make_router(limits=CommandLimits(max_depth=4))
    decoded: list[bytes] = []
    original = commands._decode

    def spy(decoder: Any, data: bytes, where: str = "") -> Any:
        decoded.append(data)
        return original(decoder, data, where)

    monkeypatch.setattr(commands, "_decode", spy)
    reply = await call(router, "thing/peek", {"value": 1, "tags": [[[["a"]]]]})
    assert reply["error"]["field"] == "$" and "nested deeper than 4" in reply["error"]["message"]
    assert decoded == []
    assert (await call(router, "thing/peek", {"value": 1, "tags": ["a"]}))["ok"]
    assert decoded  # the spy sees ordinary requests


async def test_requests_over_the_size_bound_are_refused() -> None:
    router, _ = make_router(limits=CommandLimits(max_request_bytes=1024))
    reply = await call(router, "thing/peek", {"value": 1, "name": "x" * 2000})
    assert reply["error"]["type"] == "BadRequestError" and "larger than 1024" in reply["error"]["message"]


async def test_empty_payload_is_an_empty_request_and_unknown_verbs_are_named() -> None:
    router, _ = make_router()
    assert (await router.dispatch("ping", b""))["result"] == {"pong": True}
    reply = await router.dispatch("nope/" + "x" * 500, b"{}")
    assert reply["error"]["type"] == "UnknownCommandError" and "ping" in reply["error"]["message"]
    assert len(reply["error"]["message"]) < 400


async def test_the_id_is_echoed_even_when_the_rest_is_refused() -> None:
    router, _ = make_router()
    reply = await call(router, "thing/peek", {"id": "abc", "value": "nope"})
    assert reply["id"] == "abc" and reply["error"]["field"] == "$.value"
    assert (await call(router, "ping", {"id": 2**40}))["id"] == 2**40
    busy = router.busy_reply(b'{"id": 7, "x": ' + b"[" * 5000, "busy")
    assert busy["id"] is None and busy["error"]["type"] == "Busy"
    assert router.busy_reply(b'{"id": 7}', "busy")["id"] == 7


async def test_unexpected_errors_become_internal_replies_and_one_log_line() -> None:
    router, _ = make_router()
    with capture_logs() as logs:
        reply = await call(router, "broken", {"id": 9})
    assert reply == {
        "id": 9,
        "ok": False,
        "error": {"type": "internal", "message": "internal error; the DCU log has the details"},
    }
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1 and isinstance(errors[0]["exc_info"], KeyError)
    assert router.stats.internal_errors == 1
    assert (await call(router, "ping", {}))["ok"]  # the router keeps serving
    encoded = await router.handle("unencodable", b"{}")
    assert json.loads(encoded)["error"]["type"] == "internal"


def test_encode_reply_survives_anything() -> None:
    assert json.loads(encode_reply({"id": 1, "ok": True, "result": {"t": {1, 2}}}))["ok"] is True
    bad: dict[str, Any] = {"id": "x"}
    bad["loop"] = bad
    assert json.loads(encode_reply(bad)) == {
        "id": "x",
        "ok": False,
        "error": {"type": "internal", "message": "internal error; the DCU log has the details"},
    }


# -- bounds: the nesting scan --------------------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9', max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner)
    ),
    max_leaves=30,
)


@settings(derandomize=True, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(value=_JSON, bound=st.integers(min_value=1, max_value=8))
def test_nesting_scan_matches_the_real_depth(value: Any, bound: int) -> None:
    data = json.dumps(value, ensure_ascii=False).encode()
    assert nesting_exceeds(data, bound) == (_depth(value) > bound)


def test_nesting_scan_is_linear_on_escape_heavy_input() -> None:
    # Many unterminated strings of escaped quotes: a backtracking scanner would take minutes here.
    data = b'"' + b'\\"' * 30000 + b"[" * 9
    assert nesting_exceeds(data, 8) is False  # all inside one (unterminated) string
    assert nesting_exceeds(b"[" * 9, 8) is True


# -- idempotency ---------------------------------------------------------------------------------


async def test_a_repeated_id_runs_once_and_gets_the_first_reply() -> None:
    clock = Clock()
    router, calls = make_router(clock=clock)
    first = await call(router, "thing/set", {"id": "op-1", "value": 5})
    again = await call(router, "thing/set", {"id": "op-1", "value": 5})
    assert first == again and first["ok"] and calls.sets == [(5, False)]
    other = await call(router, "thing/set", {"id": "op-1", "value": 6})
    assert other["error"]["type"] == "DuplicateIdError" and other["error"]["field"] == "$.id"
    assert calls.sets == [(5, False)] and router.stats.duplicates == 1
    # A request refused before its command ran is not remembered: it cannot block the id.
    bad = await call(router, "thing/set", {"id": "op-2", "value": 5, "expires": "2001-01-01T00:00:00Z"})
    assert bad["error"]["type"] == "ExpiredError"
    assert (await call(router, "thing/set", {"id": "op-2", "value": 6}))["ok"]
    calls.sets.remove((6, False))
    # After the window the id may be used again.
    clock.now_s += router.limits.dedupe_window_s + 1
    assert (await call(router, "thing/set", {"id": "op-1", "value": 6}))["ok"]
    assert calls.sets == [(5, False), (6, False)]
    # Requests without an id, and verbs that change nothing, are not remembered.
    await call(router, "thing/set", {"value": 7})
    await call(router, "thing/set", {"value": 7})
    await call(router, "thing/peek", {"id": "p", "value": 8})
    await call(router, "thing/peek", {"id": "p", "value": 8})
    assert calls.sets[2:] == [(7, False), (7, False), (8, False), (8, False)]


async def test_a_duplicate_arriving_while_the_first_runs_waits_for_its_reply() -> None:
    router, calls = make_router()
    calls.release.clear()
    payload = json.dumps({"id": 42, "value": 9}).encode()
    first = asyncio.create_task(router.dispatch("thing/set", payload))
    second = asyncio.create_task(router.dispatch("thing/set", payload))
    await asyncio.sleep(0)
    calls.release.set()
    assert await first == await second
    assert calls.sets == [(9, False)]


async def test_the_dedupe_memory_is_bounded() -> None:
    router, calls = make_router(limits=CommandLimits(dedupe_max_entries=4))
    for i in range(10):
        await call(router, "thing/set", {"id": i, "value": 1})
    await call(router, "thing/set", {"id": 0, "value": 1})  # forgotten (oldest first): runs again
    await call(router, "thing/set", {"id": 9, "value": 1})  # remembered
    assert len(calls.sets) == 11


# -- expiry --------------------------------------------------------------------------------------


async def test_expired_requests_are_refused_and_future_ones_run() -> None:
    router, calls = make_router()  # wall clock 1.9e9 (2030-03-17)
    reply = await call(router, "thing/peek", {"value": 1, "expires": "2030-01-01T00:00:00+01:00"})
    assert reply["error"]["type"] == "ExpiredError" and reply["error"]["field"] == "$.expires"
    reply = await call(router, "thing/peek", {"value": 1, "expires": "2031-01-01T00:00:00Z"})
    assert reply["ok"] and calls.sets == [(1, False)]


# -- envelopes -----------------------------------------------------------------------------------


def sealed(request: dict[str, Any], verb: str = "thing/set", *, outer: dict[str, Any] | None = None) -> bytes:
    envelope = seal(
        EnvelopeKeys.from_parameter(KEY),
        json.dumps(request).encode(),
        envelope_context(verb),
        device_id=DEVICE_ID,
    )
    return json.dumps({**(outer or {}), "envelope": base64.b64encode(envelope).decode()}).encode()


async def test_state_changing_verbs_need_the_envelope_whenever_a_key_is_set() -> None:
    router, calls = make_router(KEY)
    reply = await call(router, "thing/set", {"value": 1})
    assert reply["error"]["type"] == NotAuthorizedError.__name__ and reply["error"]["field"] == "$.envelope"
    assert (await call(router, "thing/peek", {"value": 2}))["ok"]  # changes nothing: plain is fine
    reply = await router.dispatch("thing/set", sealed({"value": 3}, outer={"id": "s1"}))
    assert reply["ok"] and reply["id"] == "s1" and reply["result"]["authenticated"] is True
    assert calls.sets == [(2, False), (3, True)]
    # Bound to the verb: an envelope made for another verb does not open.
    reply = await router.dispatch("thing/set", sealed({"value": 4}, verb="param/set"))
    assert reply["error"]["type"] == "EnvelopeAuthError"
    # The inside is typed like a plain request.
    reply = await router.dispatch("thing/set", sealed({"value": 4, "colour": 1}))
    assert reply["error"]["type"] == "BadRequestError" and "in the envelope" in reply["error"]["message"]
    reply = await router.dispatch("thing/set", sealed({"value": 4, "id": "b"}, outer={"id": "a"}))
    assert reply["error"]["field"] == "$.id"
    reply = await router.dispatch("thing/set", sealed({"value": 4, "expires": "2001-01-01T00:00:00Z"}))
    assert reply["error"]["type"] == "ExpiredError"
    for bad in ({"envelope": "!!!"}, {"envelope": ""}, {"envelope": 5}, {"envelope": "AAAA", "value": 1}):
        reply = await call(router, "thing/set", bad)
        assert reply["error"]["type"] == "BadRequestError", (bad, reply)
    reply = await call(router, "thing/set", {"envelope": base64.b64encode(b"DCUE" + b"\0" * 100).decode()})
    assert reply["error"]["type"] == "MalformedEnvelopeError"
    reply = await router.dispatch("thing/peek", sealed({"value": 4}, verb="thing/peek"))
    assert (
        reply["error"]["type"] == "BadRequestError"
        and "does not take an envelope" in reply["error"]["message"]
    )
    assert calls.sets == [(2, False), (3, True)]


async def test_an_unauthenticated_request_cannot_take_the_id_of_a_sealed_one() -> None:
    router, calls = make_router(KEY)
    squat = await call(router, "thing/set", {"id": "hes-1", "value": 66})  # no envelope: refused
    assert squat["error"]["type"] == "NotAuthorizedError"
    junk = await call(router, "thing/set", {"id": "hes-1", "envelope": base64.b64encode(b"x" * 96).decode()})
    assert junk["error"]["type"] == "MalformedEnvelopeError"
    reply = await router.dispatch("thing/set", sealed({"value": 7}, outer={"id": "hes-1"}))
    assert reply["ok"] and calls.sets == [(7, True)]
    again = await router.dispatch("thing/set", sealed({"value": 8}, outer={"id": "hes-1"}))
    assert again["error"]["type"] == "DuplicateIdError" and calls.sets == [(7, True)]


async def test_without_a_key_an_envelope_is_refused_and_plain_requests_run() -> None:
    router, calls = make_router(None)
    reply = await router.dispatch("thing/set", sealed({"value": 1}))
    assert reply["error"]["type"] == "NotAuthorizedError" and "no envelope key" in reply["error"]["message"]
    assert (await call(router, "thing/set", {"value": 2}))["ok"]
    assert calls.sets == [(2, False)]
