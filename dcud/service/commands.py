"""Remote commands (``<p>/cmd/<verb>``) and their replies, independent of the MQTT client.

Every verb declares its request as a msgspec Struct (:class:`Request` plus the verb's own fields,
unknown fields refused, numbers and strings bounded) and whether it changes the DCU
(``state_changing``). :meth:`CommandRouter.dispatch` turns any bytes into one reply document and
never raises (docs/remote-config.md, "MQTT commands"):

1. **bounds first**: a request over ``max_request_bytes`` or nested deeper than ``max_depth`` is
   refused before any recursive decoder sees it (:func:`nesting_exceeds` is a linear scan);
2. **typed decode**: msgspec decodes into the verb's struct; a wrong type, a missing or unknown
   field or an out-of-range value is a ``BadRequestError`` whose ``field`` is msgspec's path
   (``$.set.ntp_interval``);
3. **idempotency**: a state-changing request whose ``id`` ran within ``dedupe_window_s`` is
   answered with the first reply (same bytes) or refused (``DuplicateIdError``, other bytes), never
   run twice; only requests that passed every check below are remembered;
4. **expiry**: ``expires`` (RFC 3339 with a zone) in the past refuses the request;
5. **authentication**: a state-changing verb accepts ``{"id", "expires", "envelope": "<base64>"}``,
   an envelope of :mod:`dcud.service.crypto_envelope` (context ``"MQTT <verb>"``) holding the
   request; whenever an envelope key is configured (``fw_server_key``), it requires one. The handler
   learns whether the request was authenticated (:class:`CommandContext`) and applies its own
   policy (``[remote] plain_param_set``, protected parameters, drive allow-lists);
6. **the handler**: a DcudError it raises becomes an error reply of that type; anything else is an
   ``internal`` error reply and one log line with the traceback.

Reply: ``{"id": ..., "ok": true, "result": {...}}`` or
``{"id": ..., "ok": false, "error": {"type": ..., "message": ..., "field": ...}}`` (``field`` only when
one is to blame).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Protocol, TypeVar

import msgspec
import structlog

from dcud.errors import DcudError
from dcud.runtime.timefmt import rfc3339
from dcud.service.crypto_envelope import EnvelopeKeys, Opened, open_envelope

log = structlog.get_logger("dcud.commands")

MAX_REQUEST_BYTES = 64 * 1024
"""Default bound of one request (``[remote] max_request_bytes``)."""
MAX_DEPTH = 8
"""Default bound of JSON nesting (objects and arrays); no verb needs more than 3."""
MAX_ID_CHARS = 128
MAX_ENVELOPE_CHARS = 4 * ((4 * 1024 * 1024 + 2) // 3)
"""Base64 of the largest request the router would open (the byte bound applies first anyway)."""
DEDUPE_WINDOW_S = 600.0
DEDUPE_MAX_ENTRIES = 256
INTERNAL = "internal"
"""Error type of an unexpected failure (a bug): the details are in the DCU log only."""

RequestId = (
    Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
    | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
)
"""A request id: a string of 1..128 characters or a 64-bit integer, echoed in the reply."""
Expires = Annotated[datetime.datetime, msgspec.Meta(tz=True)]
"""RFC 3339 with a zone (``2030-01-01T00:00:00Z``): after it, the request is refused."""


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The fields every request may carry; verbs subclass it with their own."""

    id: RequestId | None = None
    expires: Expires | None = None


class SealedRequest(Request, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An authenticated request: the verb's request JSON inside an envelope, base64."""

    envelope: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ENVELOPE_CHARS)]


R = TypeVar("R", bound=Request)


@dataclass(frozen=True)
class CommandContext:
    """What a handler knows about the request besides its fields."""

    verb: str
    source: str
    request_id: str | int | None
    authenticated: bool
    """True when the request came in an envelope whose tag matched and was not a replay."""
    after_reply: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Actions to run once the reply has been delivered (:meth:`CommandRouter.serve`: after the
    broker's PUBACK), and only if the reply is ``ok``: a restart or a reboot starts here, so that the
    head-end has its answer before the DCU goes away. A handler appends; nothing runs on a refusal."""


Handler = Callable[[R, CommandContext], Awaitable[Mapping[str, Any]]]


class Sealing(Protocol):
    """Where the router gets the envelope key and the replay check (dcud.service.remote_config)."""

    def keys(self) -> EnvelopeKeys | None:
        """The envelope keys in force, or None when no ``fw_server_key`` is configured."""
        ...

    def check_replay(self, opened: Opened) -> None:
        """Raise ReplayedEnvelopeError for an envelope seen before or too old; else remember it."""
        ...

    def device_id(self) -> str:
        """This DCU's ``device_id``: an envelope sealed for another DCU is refused."""
        ...


@dataclass(frozen=True)
class CommandLimits:
    """Bounds of the router (``[remote]`` in dcud.toml)."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    max_depth: int = MAX_DEPTH
    dedupe_window_s: float = DEDUPE_WINDOW_S
    dedupe_max_entries: int = DEDUPE_MAX_ENTRIES


@dataclass
class CommandStats:
    """Counters of the command path (shown in ``<p>/status`` as ``commands``)."""

    received: int = 0
    ok: int = 0
    refused: int = 0
    internal_errors: int = 0
    duplicates: int = 0
    """Requests answered from the first reply of the same id."""
    busy: int = 0
    """Requests answered "busy" before they ran (too many running)."""
    retained_ignored: int = 0
    """Retained messages on command topics: never executed."""
    oversize_dropped: int = 0
    """Messages over ``max_request_bytes`` dropped before they were queued."""
    queue_full_dropped: int = 0
    """Messages dropped because the incoming queue was full."""
    refused_by_type: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The counters as a JSON object."""
        return {
            "received": self.received,
            "ok": self.ok,
            "refused": self.refused,
            "internal_errors": self.internal_errors,
            "duplicates": self.duplicates,
            "busy": self.busy,
            "retained_ignored": self.retained_ignored,
            "oversize_dropped": self.oversize_dropped,
            "queue_full_dropped": self.queue_full_dropped,
            "refused_by_type": dict(sorted(self.refused_by_type.items())),
        }


# -- errors ---------------------------------------------------------------------------------------


class CommandError(DcudError):
    """A request that cannot be served as asked (unknown verb, bad arguments, refused by policy)."""

    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field


class BadRequestError(CommandError):
    """The request is not what the verb takes: too large, too deep, not JSON, wrong field or value."""


class UnknownCommandError(CommandError):
    """No such verb."""


class ExpiredError(CommandError):
    """The request's ``expires`` has passed."""


class NotAuthorizedError(CommandError):
    """The request needs an envelope (authentication) or an opt-in in dcud.toml that is not there."""


class DuplicateIdError(CommandError):
    """A state-changing request reused the ``id`` of a different request within the window."""


# -- bounds ---------------------------------------------------------------------------------------

_JSON_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def nesting_exceeds(data: bytes, max_depth: int) -> bool:
    """Whether JSON ``data`` opens more than ``max_depth`` arrays/objects at once (strings skipped).

    Linear in ``len(data)`` whatever the input (no backtracking), and cheap for ordinary requests:
    bytes with at most ``max_depth`` brackets in all are not scanned at all. Malformed JSON may be
    counted loosely; the decoder refuses it anyway.
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    depth = 0
    in_string = False
    skip_to = -1
    for match in _JSON_STRUCTURE.finditer(data):
        pos = match.start()
        if pos < skip_to:
            continue
        char = data[pos]
        if in_string:
            if char == 0x5C:  # backslash: the next byte is escaped, whatever it is
                skip_to = pos + 2
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            if depth > max_depth:
                return True
        elif char in (0x5D, 0x7D):
            depth = max(0, depth - 1)
    return False


_FIELD_PATH = re.compile(r" - at `(\$[^`]*)`$")
_TOP_DECODER = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ID_DECODER = msgspec.json.Decoder(RequestId)
_SEALED_DECODER = msgspec.json.Decoder(SealedRequest)


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes, where: str = "") -> Any:
    """Decode or raise BadRequestError naming the field (msgspec's path)."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _FIELD_PATH.search(text)
        raise BadRequestError(f"{where}{text}", field=match.group(1) if match else "$") from None
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"{where}not a JSON object: {exc}", field="$") from None
    except RecursionError:  # unreachable behind nesting_exceeds; kept as a second wall
        raise BadRequestError(f"{where}nested too deeply", field="$") from None


def _peek_id(top: Mapping[str, msgspec.Raw]) -> str | int | None:
    """The request's ``id`` if it is a valid one, for the reply to a request refused before decoding."""
    raw = top.get("id")
    if raw is None:
        return None
    try:
        value: str | int = _ID_DECODER.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return value


def envelope_context(verb: str) -> bytes:
    """The envelope context of a sealed request for ``verb``: ``"MQTT <verb>"``."""
    return f"MQTT {verb}".encode()


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """A reply as compact JSON; a result that cannot be encoded becomes an ``internal`` error."""
    try:
        return json.dumps(reply, default=str, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        log.error("reply not encodable", error=repr(exc))
        request_id = reply.get("id") if isinstance(reply.get("id"), str | int) else None
        return json.dumps(_internal_reply(request_id)).encode()


def _internal_reply(request_id: str | int | None) -> dict[str, Any]:
    message = "internal error; the DCU log has the details"
    return {"id": request_id, "ok": False, "error": {"type": INTERNAL, "message": message}}


# -- idempotency ----------------------------------------------------------------------------------


@dataclass
class _Seen:
    at_s: float
    digest: bytes
    reply: asyncio.Future[dict[str, Any]]


class _DedupeCache:
    """``(verb, id)`` -> the first reply, for ``window_s`` and at most ``max_entries`` (oldest go first)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str | int], _Seen] = OrderedDict()
        self.evicted = 0

    def get(self, key: tuple[str, str | int], now_s: float, window_s: float) -> _Seen | None:
        self._expire(now_s, window_s)
        return self._entries.get(key)

    def put(self, key: tuple[str, str | int], seen: _Seen, max_entries: int) -> None:
        self._entries[key] = seen
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1

    def forget(self, key: tuple[str, str | int], seen: _Seen) -> None:
        if self._entries.get(key) is seen:
            del self._entries[key]

    def _expire(self, now_s: float, window_s: float) -> None:
        while self._entries:
            seen = next(iter(self._entries.values()))
            if now_s - seen.at_s <= window_s:
                break
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# -- the router -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verb(Generic[R]):
    name: str
    decoder: msgspec.json.Decoder[R]
    handler: Handler[R]
    state_changing: bool


@dataclass
class _Parsed:
    verb: _Verb[Any]
    outer: Request
    sealed: bool
    digest: bytes


@dataclass
class _Progress:
    verb: str
    source: str
    request_id: str | int | None = None
    after_reply: list[Callable[[], Awaitable[None]]] | None = None


class CommandRouter:
    """Maps verbs to typed handlers and turns any request bytes into a reply document."""

    def __init__(
        self,
        limits: CommandLimits | None = None,
        sealing: Sealing | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or CommandLimits()
        self.sealing = sealing
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self.stats = CommandStats()
        self._verbs: dict[str, _Verb[Any]] = {}
        self._dedupe = _DedupeCache()

    def configure(self, limits: CommandLimits) -> None:
        """New bounds (on start and reload); remembered replies stay."""
        self.limits = limits

    def set_sealing(self, sealing: Sealing | None) -> None:
        """Where envelope keys and the replay check come from."""
        self.sealing = sealing

    def register(
        self,
        verb: str,
        request: type[R],
        handler: Handler[R],
        *,
        state_changing: bool = False,
    ) -> None:
        """Serve ``verb`` with requests of type ``request``; a second registration replaces the first.

        ``state_changing``: the verb changes the DCU or moves something; it then accepts an envelope,
        needs one whenever an envelope key is configured, and repeated ids are answered once.
        """
        self._verbs[verb] = _Verb(verb, msgspec.json.Decoder(request), handler, state_changing)

    def unregister(self, verb: str) -> None:
        """Stop serving ``verb``."""
        self._verbs.pop(verb, None)

    def verbs(self) -> list[str]:
        """Registered verbs, sorted."""
        return sorted(self._verbs)

    def is_state_changing(self, verb: str) -> bool:
        """Whether ``verb`` is registered as state-changing."""
        entry = self._verbs.get(verb)
        return entry is not None and entry.state_changing

    # -- dispatch ------------------------------------------------------------------------------

    async def dispatch(
        self,
        verb: str,
        payload: bytes,
        source: str = "mqtt",
        *,
        after_reply: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> dict[str, Any]:
        """Run one request; always returns a reply document, never raises (except cancellation).

        ``after_reply`` receives the actions the handler wants run once its reply is delivered
        (:attr:`CommandContext.after_reply`); without it they are dropped (use :meth:`serve`).
        """
        self.stats.received += 1
        progress = _Progress(verb[:64], source, after_reply=after_reply)
        try:
            parsed = self._parse(verb, payload, progress)
        except Exception as exc:
            return self._error_reply(progress, exc)
        if not parsed.verb.state_changing or parsed.outer.id is None:
            return await self._run(parsed, progress)
        return await self._run_once(parsed, progress)

    async def handle(self, verb: str, payload: bytes, source: str = "mqtt") -> bytes:
        """:meth:`dispatch` with the reply encoded as JSON bytes."""
        return encode_reply(await self.dispatch(verb, payload, source))

    async def serve(
        self,
        verb: str,
        payload: bytes,
        send: Callable[[bytes], Awaitable[object]],
        source: str = "mqtt",
    ) -> None:
        """Run one request, ``await send(reply)``, then the handler's after-reply actions.

        ``send`` returns once the reply is delivered (MQTT: PUBACKed). The actions run only when the
        reply was ``ok`` and ``send`` returned; if it raised, they are dropped (logged) and the error
        propagates: a head-end that got no answer repeats the request instead of finding the DCU gone.
        An action's failure is logged, never raised (the reply is already out).
        """
        actions: list[Callable[[], Awaitable[None]]] = []
        reply = await self.dispatch(verb, payload, source, after_reply=actions)
        try:
            await send(encode_reply(reply))
        except BaseException:
            if actions:
                log.warning(
                    "reply not delivered; its action is not started", verb=verb[:64], id=reply.get("id")
                )
            raise
        if not reply.get("ok"):
            return
        for action in actions:
            try:
                await action()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("action after the reply failed", verb=verb[:64], id=reply.get("id"), exc_info=exc)

    def busy_reply(self, payload: bytes, why: str) -> dict[str, Any]:
        """The reply to a request refused before it ran (too many commands in progress)."""
        self.stats.busy += 1
        request_id: str | int | None = None
        with contextlib.suppress(Exception):  # best effort: the id only helps the caller correlate
            if len(payload) <= self.limits.max_request_bytes and not nesting_exceeds(
                payload, self.limits.max_depth
            ):
                request_id = _peek_id(_TOP_DECODER.decode(payload))
        return {"id": request_id, "ok": False, "error": {"type": "Busy", "message": why}}

    def _parse(self, verb: str, payload: bytes, progress: _Progress) -> _Parsed:
        limits = self.limits
        if len(payload) > limits.max_request_bytes:
            raise BadRequestError(f"request larger than {limits.max_request_bytes} bytes", field="$")
        entry = self._verbs.get(verb)
        if entry is None:
            shown = json.dumps(verb[:64])
            raise UnknownCommandError(f"unknown command {shown}; known: {', '.join(self.verbs())}")
        if nesting_exceeds(payload, limits.max_depth):
            raise BadRequestError(f"request nested deeper than {limits.max_depth} levels", field="$")
        body = payload if payload.strip() else b"{}"
        top: dict[str, msgspec.Raw] = _decode(_TOP_DECODER, body)
        progress.request_id = _peek_id(top)
        sealed = "envelope" in top
        outer: Request = _decode(_SEALED_DECODER if sealed else entry.decoder, body)
        progress.request_id = outer.id
        return _Parsed(entry, outer, sealed, hashlib.sha256(payload).digest())

    async def _run_once(self, parsed: _Parsed, progress: _Progress) -> dict[str, Any]:
        """Run a state-changing request with an id at most once within the window."""
        assert parsed.outer.id is not None
        key = (parsed.verb.name, parsed.outer.id)
        now_s = self._monotonic()
        seen = self._dedupe.get(key, now_s, self.limits.dedupe_window_s)
        if seen is not None:
            if seen.digest != parsed.digest:
                return self._error_reply(
                    progress,
                    DuplicateIdError(
                        f"id {json.dumps(parsed.outer.id)} was used for another {parsed.verb.name} request "
                        f"within {self.limits.dedupe_window_s:g} s; use a new id",
                        field="$.id",
                    ),
                )
            self.stats.duplicates += 1
            log.info(
                "repeated request answered from the first reply", verb=progress.verb, id=progress.request_id
            )
            return dict(await asyncio.shield(seen.reply))
        admitted: list[_Seen] = []

        def admit() -> None:
            # Remembered only once the request passed every check and its command starts: a refused
            # request (bad, expired, unauthenticated) cannot block the id for the real one.
            entry = _Seen(now_s, parsed.digest, asyncio.get_running_loop().create_future())
            self._dedupe.put(key, entry, self.limits.dedupe_max_entries)
            admitted.append(entry)

        try:
            reply = await self._run(parsed, progress, admit)
        except BaseException:
            # Interrupted (the service stops): a repeat may run it again; whoever waits is told.
            for entry in admitted:
                self._dedupe.forget(key, entry)
                if not entry.reply.done():
                    interrupted = CommandError(
                        "the first request with this id was interrupted; send it again"
                    )
                    entry.reply.set_result(self._error_reply(progress, interrupted, count=False))
            raise
        for entry in admitted:
            entry.reply.set_result(reply)
        return reply

    async def _run(
        self, parsed: _Parsed, progress: _Progress, admit: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        try:
            result = dict(await self._execute(parsed, progress, admit))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._error_reply(progress, exc)
        self.stats.ok += 1
        return {"id": progress.request_id, "ok": True, "result": result}

    async def _execute(
        self, parsed: _Parsed, progress: _Progress, admit: Callable[[], None] | None
    ) -> Mapping[str, Any]:
        entry = parsed.verb
        outer = parsed.outer
        now_s = self._wall_clock()
        _check_expiry(outer.expires, now_s, "$.expires")
        keys = self.sealing.keys() if self.sealing is not None else None
        request: Request
        if parsed.sealed:
            assert isinstance(outer, SealedRequest)
            request = self._open(entry, outer, keys)
            _check_expiry(request.expires, now_s, "$.expires (in the envelope)")
            authenticated = True
        else:
            if entry.state_changing and keys is not None:
                raise NotAuthorizedError(
                    f"{entry.name} changes the DCU: while an envelope key (fw_server_key) is configured it "
                    'needs {"envelope": "<base64 envelope>"} (docs/remote-config.md)',
                    field="$.envelope",
                )
            request = outer
            authenticated = False
        ctx = CommandContext(entry.name, progress.source, progress.request_id, authenticated)
        if progress.after_reply is not None:
            ctx = dataclasses.replace(ctx, after_reply=progress.after_reply)
        log.info(
            "command",
            verb=entry.name,
            source=progress.source,
            id=progress.request_id,
            authenticated=authenticated,
        )
        if admit is not None:
            admit()  # no await since the dedupe lookup: a concurrent repeat finds this entry
        return await entry.handler(request, ctx)

    def _open(self, entry: _Verb[Any], outer: SealedRequest, keys: EnvelopeKeys | None) -> Request:
        """The request inside an envelope: tag, then replay, then the verb's typed decode."""
        if not entry.state_changing:
            raise BadRequestError(
                f"{entry.name} does not take an envelope (it changes nothing)", field="$.envelope"
            )
        if keys is None or self.sealing is None:
            raise NotAuthorizedError(
                "an envelope was sent, but no envelope key (fw_server_key) is configured on this DCU",
                field="$.envelope",
            )
        try:
            data = base64.b64decode(outer.envelope, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError("envelope is not base64", field="$.envelope") from None
        opened = open_envelope(keys, data, envelope_context(entry.name), device_id=self.sealing.device_id())
        self.sealing.check_replay(opened)
        plaintext = opened.plaintext
        if len(plaintext) > self.limits.max_request_bytes:
            raise BadRequestError("the request in the envelope is too large", field="$.envelope")
        if nesting_exceeds(plaintext, self.limits.max_depth):
            raise BadRequestError("the request in the envelope is nested too deeply", field="$.envelope")
        inner: Request = _decode(
            entry.decoder, plaintext if plaintext.strip() else b"{}", "in the envelope: "
        )
        if isinstance(inner, SealedRequest):  # pragma: no cover - no verb's request type is SealedRequest
            raise BadRequestError("an envelope inside an envelope", field="$.envelope")
        if inner.id is not None and inner.id != outer.id:
            raise BadRequestError("the id inside the envelope differs from the request's id", field="$.id")
        return inner

    def _error_reply(self, progress: _Progress, exc: Exception, *, count: bool = True) -> dict[str, Any]:
        if not isinstance(exc, DcudError):
            self.stats.internal_errors += 1
            # One line with the traceback; the caller learns only that it was not its fault.
            log.error(
                "command failed: internal error",
                verb=progress.verb,
                source=progress.source,
                id=progress.request_id,
                exc_info=exc,
            )
            return _internal_reply(progress.request_id)
        kind = type(exc).__name__
        if count:
            self.stats.refused += 1
            if len(self.stats.refused_by_type) < 64 or kind in self.stats.refused_by_type:
                self.stats.refused_by_type[kind] = self.stats.refused_by_type.get(kind, 0) + 1
        error: dict[str, Any] = {"type": kind, "message": str(exc)}
        blamed = getattr(exc, "field", None)
        if isinstance(blamed, str):
            error["field"] = blamed
        log.warning(
            "command refused",
            verb=progress.verb,
            source=progress.source,
            id=progress.request_id,
            error_type=kind,
            error=str(exc)[:500],
        )
        return {"id": progress.request_id, "ok": False, "error": error}


def _check_expiry(expires: datetime.datetime | None, now_s: float, where: str) -> None:
    if expires is not None and expires.timestamp() <= now_s:
        shown = rfc3339(now_s)
        raise ExpiredError(f"request expired at {expires.isoformat()} (DCU time {shown})", field=where)
