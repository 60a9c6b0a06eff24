"""Sans-I/O DLMS/COSEM client session: associate, run a list of GET/SET/ACTION requests, release.

The session drives any :class:`~dcud.codec.dlms.transport.ApduTransport` (HDLC on a serial line, the TCP
wrapper) and speaks the interface :func:`dcud.service.session_runner.run_session` runs: ``start(now)``,
``receive_data(data, now)``, ``handle_timer(now)``, ``next_deadline()``, each returning the line actions of
:mod:`dcud.codec.actions` and, at the end, ``Done(DlmsSessionResult)`` or ``Failed(error)``.

Sequence: open the link, AARQ/AARE (authentication none, LLS password or HLS-GMAC; security none,
authenticated, encrypted or both, with the xDLMS initiate ciphered under the global key), for HLS-GMAC the
ACTION reply_to_HLS_authentication on the current association (0.0.40.0.0.255 method 1) and the check of
the meter's answer, then the requests one exchange at a time (GETs grouped into GET-with-list when the
negotiated conformance has multiple-references; long values by block transfer, bounded in blocks and
bytes; long SETs in data blocks), then RLRQ/RLRE and the link close. The release and the close happen
after an error or a timeout too: an association the AARE accepted is always released, and the link is
always closed, so the line is left clean. A refused AARE has no association to release: only the link
is closed.

A request the meter refuses (a Data-Access-Result, an Action-Result) is that request's outcome, not a
session failure. The session fails on timeouts (:class:`~dcud.errors.PeerTimeout`), malformed or
unexpected APDUs (:class:`~dcud.errors.RemoteProtocolError`, :class:`~dcud.codec.dlms.security.
DecipheringError`), refused associations (:class:`AssociationRefused`) and failed authentication
(:class:`~dcud.codec.dlms.security.AuthenticationFailed`, "LLS/HLS authentication failed").

The invocation counter is the service's durable state: the session starts from
``DlmsClientConfig.invocation_counter`` (the next value to use), never uses a value twice, and reports
the last one it used in :attr:`DlmsClient.last_invocation_counter` (also after a failure). Counters the
meter sends must increase (from ``server_invocation_counter``, the last one accepted, when given).
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dcud.codec.actions import Done, Failed
from dcud.codec.dlms.apdu import (
    AARE,
    AARQ,
    CLIENT_CONFORMANCE,
    DIAGNOSTIC_AUTHENTICATION_FAILURE,
    DIAGNOSTIC_SOURCE_USER,
    GLO_TAGS,
    RLRE,
    RLRQ,
    TAG_INITIATE_REQUEST,
    AccessResult,
    AccessSelection,
    ActionRequestNormal,
    ActionResponseNormal,
    Apdu,
    ApplicationContext,
    AssociationResult,
    AttributeWithSelection,
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
    SetResponseDatablock,
    SetResponseLastDatablock,
    SetResponseNormal,
    decode_apdu,
    decode_get_results,
    decode_xdlms_initiate,
    result_text,
)
from dcud.codec.dlms.axdr import MAX_ELEMENTS, Data, OctetString, decode_data, encode_data
from dcud.codec.dlms.cosem import ASSOCIATION_LN_OBIS, ASSOCIATION_REPLY_TO_HLS, CLASS_ASSOCIATION_LN
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.security import (
    HEADER_BYTES,
    INVOCATION_COUNTER_MAX,
    TAG_BYTES,
    AuthenticationFailed,
    DecipheringError,
    InvocationCounter,
    Keys,
    SecurityPolicy,
    check_system_title,
    hls_gmac_response,
    protect,
    unprotect,
    verify_hls_gmac,
)
from dcud.codec.dlms.transport import ApduIn, ApduTransport, LinkDown, LinkUp
from dcud.errors import DcudError, LocalProtocolError, NegativeResponse, PeerTimeout, RemoteProtocolError

DEFAULT_RESPONSE_TIMEOUT_S = 10.0
"""Time for the meter's answer to one APDU, on top of what the lower layer spends (HDLC retries)."""
DEFAULT_MAX_BLOCKS = 10_000
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""One attribute value, reassembled from blocks (a year of 15-minute rows with a few columns fits)."""
DEFAULT_MAX_LIST_ITEMS = 10
CHALLENGE_BYTES = 32
"""HLS client challenge (CtoS) length: the Green Book allows 8..64; 32 is what interoperates widely."""
MIN_CHALLENGE_BYTES = 8
MAX_CHALLENGE_BYTES = 64
CIPHER_OVERHEAD_BYTES = 1 + 3 + HEADER_BYTES + TAG_BYTES
"""What ciphering adds to an APDU: tag, length (up to 3 bytes), security header, GMAC tag."""


class AssociationRefused(NegativeResponse):
    """The meter refused the association (AARE result not accepted); ``code`` is the diagnostic."""


class Auth(enum.Enum):
    """Authentication of the association (``auth`` in dcud.toml)."""

    NONE = "none"
    LLS = "lls"
    HLS_GMAC = "hls-gmac"


@dataclass(frozen=True)
class DlmsClientConfig:
    """Everything a session needs besides the transport and the requests.

    ``system_title`` is the client's (8 bytes), needed for HLS-GMAC and any security policy;
    ``invocation_counter`` the next counter value to use (kept durably by the service);
    ``server_invocation_counter`` the last counter accepted from this meter (None: accept any at first).
    ``invocation_counter_limit`` is the last counter value the session may use (None: 2^32 - 1): the end
    of the range the service reserved durably; a session that needs more fails with LocalProtocolError.
    ``challenge`` fixes the HLS client challenge (tests); None draws 32 random bytes. ``password`` and the
    keys never appear in ``repr()``.
    """

    auth: Auth = Auth.NONE
    password: bytes = field(default=b"", repr=False)
    security: SecurityPolicy = SecurityPolicy.NONE
    keys: Keys | None = None
    system_title: bytes | None = None
    invocation_counter: int = 0
    invocation_counter_limit: int | None = None
    server_invocation_counter: int | None = None
    challenge: bytes | None = field(default=None, repr=False)
    conformance: Conformance = CLIENT_CONFORMANCE
    max_receive_pdu_bytes: int = 0xFFFF
    response_timeout_s: float = DEFAULT_RESPONSE_TIMEOUT_S
    max_blocks: int = DEFAULT_MAX_BLOCKS
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_list_items: int = DEFAULT_MAX_LIST_ITEMS
    use_with_list: bool = True
    protected_release: bool = False
    max_elements: int = MAX_ELEMENTS

    def __post_init__(self) -> None:
        needs_crypto = self.auth is Auth.HLS_GMAC or self.security is not SecurityPolicy.NONE
        if needs_crypto:
            if self.keys is None:
                raise LocalProtocolError(
                    "HLS-GMAC and security need a block cipher key and an authentication key"
                )
            if self.system_title is None:
                raise LocalProtocolError("HLS-GMAC and security need the client system title")
            check_system_title(self.system_title, "client system title")
        if self.auth is Auth.LLS and not self.password:
            raise LocalProtocolError("LLS needs a password")
        if (
            self.challenge is not None
            and not MIN_CHALLENGE_BYTES <= len(self.challenge) <= MAX_CHALLENGE_BYTES
        ):
            raise LocalProtocolError(
                f"the HLS challenge must be {MIN_CHALLENGE_BYTES}..{MAX_CHALLENGE_BYTES} bytes"
            )
        if self.response_timeout_s <= 0:
            raise LocalProtocolError("response_timeout_s must be positive")
        if self.max_blocks < 1 or self.max_response_bytes < 1 or self.max_list_items < 1:
            raise LocalProtocolError("block, byte and list bounds must be positive")
        if not 12 <= self.max_receive_pdu_bytes <= 0xFFFF:
            raise LocalProtocolError("max_receive_pdu_bytes must be 12..65535")
        if self.invocation_counter_limit is not None and not (
            0 <= self.invocation_counter_limit <= INVOCATION_COUNTER_MAX
        ):
            raise LocalProtocolError("invocation_counter_limit must be 0..2^32-1")


# ---------------------------------------------------------------------------------------------------
# Requests and results


@dataclass(frozen=True, slots=True)
class GetRequest:
    """Read one attribute (with selective access for profile buffers)."""

    attribute: AttributeRef
    access: AccessSelection | None = None


@dataclass(frozen=True, slots=True)
class SetRequest:
    """Write one attribute."""

    attribute: AttributeRef
    value: Data


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """Invoke one method (``method.index`` is the method id)."""

    method: AttributeRef
    parameters: Data | None = None


Request = GetRequest | SetRequest | ActionRequest

Planner = Callable[[Sequence["Outcome"]], Sequence[Request]]
"""Called when the queued requests are done, with every outcome so far; returns the next requests
(empty: release). A readout whose later requests depend on earlier answers (the object list, then the
registers it names, then a profile range from the meter's clock) runs in one association this way."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request got: ``result`` 0 (success) or the meter's Data-Access-/Action-Result code, and
    ``value`` (GET: the attribute value; ACTION: the return parameters, if any)."""

    request: Request
    result: int = 0
    value: Data | None = None

    @property
    def ok(self) -> bool:
        """Whether the meter carried the request out."""
        return self.result == 0

    @property
    def error_text(self) -> str:
        """The result's name ('' on success)."""
        return "" if self.ok else result_text(self.result)


@dataclass(frozen=True)
class DlmsSessionResult:
    """The outcome of every request, in order, and what the association negotiated."""

    outcomes: list[Outcome]
    conformance: Conformance
    server_max_receive_pdu_bytes: int
    server_system_title: bytes | None
    last_invocation_counter: int | None
    server_invocation_counter: int | None
    released: bool
    blocks: int = 0


class _State(enum.Enum):
    IDLE = "idle"
    OPENING = "opening"
    ASSOCIATING = "associating"
    AUTHENTICATING = "authenticating"
    REQUESTING = "requesting"
    RELEASING = "releasing"
    CLOSING = "closing"
    DONE = "done"


@dataclass(slots=True)
class _Exchange:
    """One request APDU in flight (a single request, or several GETs as one list)."""

    requests: list[Request]
    blocks: bytearray = field(default_factory=bytearray)
    block_number: int = 0
    set_chunks: list[bytes] = field(default_factory=list)


_Handler = Callable[[Apdu], list[object]]


class DlmsClient:
    """One client session over ``transport``: see the module docstring."""

    def __init__(
        self,
        transport: ApduTransport,
        config: DlmsClientConfig,
        requests: Sequence[Request] = (),
        *,
        planner: Planner | None = None,
    ) -> None:
        self.transport = transport
        self.config = config
        self.requests: list[Request] = list(requests)
        self._planner = planner
        limit = config.invocation_counter_limit
        self._counter = InvocationCounter(
            config.invocation_counter, limit=INVOCATION_COUNTER_MAX if limit is None else limit
        )
        self._server_counter = config.server_invocation_counter
        self._challenge = (
            config.challenge if config.challenge is not None else secrets.token_bytes(CHALLENGE_BYTES)
        )
        self._state = _State.IDLE
        self._now = 0.0
        self._deadline: float | None = None
        self._out: list[object] = []
        self._error: DcudError | None = None
        self._associated = False
        self._released = False
        self._handler: _Handler | None = None
        self._expected_invoke_id = 0
        self._invoke_id = 0
        self._outcomes: list[Outcome] = []
        self._pending: deque[Request] = deque(self.requests)
        self._exchange: _Exchange | None = None
        self._blocks_total = 0
        self.conformance = Conformance(0)
        self.server_max_receive_pdu_bytes = 0
        self.server_system_title: bytes | None = None

    # -- public interface -------------------------------------------------------------------------

    @property
    def last_invocation_counter(self) -> int | None:
        """The last invocation counter this session used (None: none); the service stores it durably."""
        return self._counter.last_used

    @property
    def next_invocation_counter(self) -> int:
        """The next counter value a later session must start from."""
        return self._counter.next_value

    @property
    def server_invocation_counter(self) -> int | None:
        """The last counter accepted from the meter."""
        return self._server_counter

    @property
    def error(self) -> DcudError | None:
        """The first error of the session (it still releases and closes after it)."""
        return self._error

    def start(self, now: float) -> list[object]:
        """Open the link."""
        if self._state is not _State.IDLE:
            raise LocalProtocolError("the session has started already")
        self._now = now
        self._state = _State.OPENING
        self._deadline = now + self.config.response_timeout_s
        return self._run(self._call(lambda: self.transport.open(now)))

    def receive_data(self, data: bytes, now: float) -> list[object]:
        """Bytes from the line or socket, split anywhere."""
        self._now = now
        if self._state in (_State.IDLE, _State.DONE):
            return []
        return self._run(self._call(lambda: self.transport.receive_data(data, now)))

    def handle_timer(self, now: float) -> list[object]:
        """Called once ``now`` reached :meth:`next_deadline`."""
        self._now = now
        if self._state in (_State.IDLE, _State.DONE):
            return []
        out: list[object] = []
        transport_deadline = self.transport.next_deadline()
        if transport_deadline is not None and now >= transport_deadline:
            out += self._run(self._call(lambda: self.transport.handle_timer(now)))
        if not self._done() and self._deadline is not None and now >= self._deadline:
            out += self._run(self._on_timeout())
        return out

    def _done(self) -> bool:
        return self._state is _State.DONE

    def abort(self, now: float, error: DcudError | None = None) -> list[object]:
        """End the session early (its task is being cancelled): close the link at once. A request is
        always in flight then, so no RLRQ can go out; closing the link ends the association (HDLC: DISC,
        which the meter answers with UA and drops the association; the wrapper: the driver closes the
        connection). Returns the line actions; the session ends with ``Failed`` (``error``, or a
        LocalProtocolError) once the link is down or its close timed out. Nothing happens once the
        session is closing or done; during the release the close starts at once."""
        self._now = now
        if self._state in (_State.IDLE, _State.DONE, _State.CLOSING):
            return []
        if self._error is None:
            self._error = error or LocalProtocolError("the readout was cancelled")
        return self._run(self._start_close())

    def next_deadline(self) -> float | None:
        """The earlier of the transport's deadline and the session's own."""
        if self._state in (_State.IDLE, _State.DONE):
            return None
        deadlines = [d for d in (self.transport.next_deadline(), self._deadline) if d is not None]
        return min(deadlines) if deadlines else None

    # -- event plumbing ---------------------------------------------------------------------------

    def _call(self, operation: Callable[[], list[object]]) -> list[object]:
        """A transport call; a DcudError it raises ends the link like a LinkDown would."""
        try:
            return list(operation())
        except DcudError as exc:
            return [LinkDown(exc)]

    def _run(self, items: list[object]) -> list[object]:
        queue: deque[object] = deque(items)
        while queue:
            item = queue.popleft()
            if self._state is _State.DONE:
                continue
            if isinstance(item, LinkUp):
                queue.extend(self._on_link_up())
            elif isinstance(item, ApduIn):
                queue.extend(self._on_apdu(item.apdu))
            elif isinstance(item, LinkDown):
                queue.extend(self._on_link_down(item.error))
            else:
                self._out.append(item)
        out, self._out = self._out, []
        return out

    def _send(self, apdu: bytes, handler: _Handler, *, cipher: bool = True) -> list[object]:
        self._handler = handler
        self._deadline = self._now + self.config.response_timeout_s
        wire = self._wrap(apdu) if cipher else apdu
        return self._call(lambda: self.transport.send_apdu(wire, self._now))

    def _next_invoke_id(self) -> int:
        """A fresh invoke id (1..15) for a new exchange; its blocks keep it (see _same_invoke_id)."""
        self._invoke_id = self._invoke_id % 15 + 1
        self._expected_invoke_id = self._invoke_id
        return 0xC0 | self._invoke_id

    def _same_invoke_id(self) -> int:
        """The invoke id of the exchange in progress (GET-Request-Next, further SET blocks)."""
        return 0xC0 | self._invoke_id

    def _check_invoke_id(self, invoke_id_and_priority: int) -> None:
        if invoke_id_and_priority & 0x0F != self._expected_invoke_id:
            raise RemoteProtocolError(
                f"response to invoke id {invoke_id_and_priority & 0x0F}, expected {self._expected_invoke_id}"
            )

    # -- link events ------------------------------------------------------------------------------

    def _on_link_up(self) -> list[object]:
        if self._state is not _State.OPENING:
            return []
        self._state = _State.ASSOCIATING
        try:
            aarq = self._build_aarq()
        except DcudError as exc:
            return self._fail(exc)
        return self._send(aarq, self._on_aare, cipher=False)

    def _on_link_down(self, error: DcudError | None) -> list[object]:
        if self._state in (_State.RELEASING, _State.CLOSING):
            # The work is done (or has failed already): a link that ends during the release or the
            # close, however it ends, leaves nothing more to clean up.
            return self._finish()
        if self._error is None:
            self._error = error or RemoteProtocolError(f"the link closed while {self._state.value}")
        return self._finish()

    def _on_apdu(self, data: bytes) -> list[object]:
        handler = self._handler
        if handler is None:
            # Nothing asked: a late answer after a timeout, or noise. It changes nothing.
            return []
        try:
            apdu = decode_apdu(data, max_elements=self.config.max_elements)
            if self._state is _State.RELEASING:
                return handler(apdu)
            apdu = self._unwrap(apdu)
            if isinstance(apdu, ExceptionResponse):
                raise NegativeResponse(apdu.service_error, f"the meter raised an exception: {apdu.text}")
            if isinstance(apdu, ConfirmedServiceError):
                raise NegativeResponse(apdu.error_code, f"the meter refused the service: {apdu.text}")
            return handler(apdu)
        except DcudError as exc:
            return self._fail(exc)

    def _on_timeout(self) -> list[object]:
        state = self._state
        self._handler = None
        if state is _State.RELEASING:
            return self._start_close()
        if state is _State.CLOSING:
            return self._finish()
        what = {
            _State.OPENING: "the link did not come up",
            _State.ASSOCIATING: "no AARE",
            _State.AUTHENTICATING: "no answer to the HLS authentication",
            _State.REQUESTING: "no answer to a request",
        }.get(state, "no answer")
        return self._fail(PeerTimeout(f"{what} within {self.config.response_timeout_s:g} s"))

    # -- ending -----------------------------------------------------------------------------------

    def _fail(self, error: DcudError) -> list[object]:
        if self._error is None:
            self._error = error
        if self._state in (_State.RELEASING, _State.CLOSING, _State.DONE):
            return self._start_close() if self._state is _State.RELEASING else []
        if self._associated:
            return self._start_release()
        return self._start_close()

    def _start_release(self) -> list[object]:
        self._state = _State.RELEASING
        user_information = None
        if self.config.protected_release and self.config.security is not SecurityPolicy.NONE:
            try:
                user_information = self._ciphered_initiate()
            except DcudError:
                user_information = None
        return self._send(RLRQ(0, user_information).encode(), self._on_rlre, cipher=False)

    def _on_rlre(self, apdu: Apdu) -> list[object]:
        if isinstance(apdu, RLRE):
            self._released = True
            return self._start_close()
        return []  # a late answer to an earlier request: keep waiting for the RLRE

    def _start_close(self) -> list[object]:
        self._state = _State.CLOSING
        self._handler = None
        self._deadline = self._now + self.config.response_timeout_s
        return self._call(lambda: self.transport.close(self._now))

    def _finish(self) -> list[object]:
        self._state = _State.DONE
        self._deadline = None
        self._handler = None
        if self._error is not None:
            self._out.append(Failed(self._error))
        else:
            self._out.append(Done(self._result()))
        return []

    def _result(self) -> DlmsSessionResult:
        return DlmsSessionResult(
            outcomes=list(self._outcomes),
            conformance=self.conformance,
            server_max_receive_pdu_bytes=self.server_max_receive_pdu_bytes,
            server_system_title=self.server_system_title,
            last_invocation_counter=self.last_invocation_counter,
            server_invocation_counter=self._server_counter,
            released=self._released,
            blocks=self._blocks_total,
        )

    # -- ciphering --------------------------------------------------------------------------------

    def _protect(self, plaintext: bytes) -> bytes:
        keys, title = self.config.keys, self.config.system_title
        assert keys is not None and title is not None  # checked by the config
        return protect(
            plaintext,
            security_control=self.config.security.security_control,
            system_title=title,
            invocation_counter=self._counter.take(),
            keys=keys,
        )

    def _wrap(self, apdu: bytes) -> bytes:
        if self.config.security is SecurityPolicy.NONE:
            return apdu
        tag = GLO_TAGS.get(apdu[0])
        if tag is None:
            raise LocalProtocolError(f"APDU 0x{apdu[0]:02X} has no ciphered form")
        return CipheredApdu(tag, self._protect(apdu)).encode()

    def _ciphered_initiate(self) -> bytes:
        initiate = InitiateRequest(self.config.conformance, self.config.max_receive_pdu_bytes).encode()
        return CipheredApdu(GLO_TAGS[TAG_INITIATE_REQUEST], self._protect(initiate)).encode()

    def _unprotect(self, content: bytes, system_title: bytes | None) -> bytes:
        keys = self.config.keys
        if keys is None or self.config.security is SecurityPolicy.NONE:
            raise RemoteProtocolError("the meter sent a ciphered APDU but no security is configured", content)
        if system_title is None:
            raise RemoteProtocolError("ciphered APDU before the meter told its system title", content)
        try:
            opened = unprotect(content, system_title=system_title, keys=keys)
        except DecipheringError as exc:
            raise DecipheringError(f"the meter's APDU does not decipher: {exc}", content) from None
        if not self.config.security.satisfied_by(opened.security_control):
            raise RemoteProtocolError(
                f"the meter protected an APDU with SC 0x{opened.security_control:02X}, "
                f"less than the policy {self.config.security.value}",
                content,
            )
        if self._server_counter is not None and opened.invocation_counter <= self._server_counter:
            raise DecipheringError(
                f"replayed APDU: invocation counter {opened.invocation_counter} is not above "
                f"{self._server_counter}",
                content,
            )
        self._server_counter = opened.invocation_counter
        return opened.plaintext

    def _unwrap(self, apdu: Apdu) -> Apdu:
        secured = self.config.security is not SecurityPolicy.NONE
        if isinstance(apdu, CipheredApdu):
            if apdu.dedicated:
                raise RemoteProtocolError("the meter used dedicated ciphering, which was not negotiated")
            inner = decode_apdu(
                self._unprotect(apdu.content, self.server_system_title), max_elements=self.config.max_elements
            )
            if isinstance(inner, CipheredApdu | GeneralCiphering) or inner_tag(inner) != apdu.plain_tag:
                raise RemoteProtocolError("a ciphered APDU carries something other than its tag says")
            return inner
        if isinstance(apdu, GeneralCiphering):
            if self.server_system_title is not None and apdu.system_title != self.server_system_title:
                raise RemoteProtocolError("general-glo-ciphering from another system title")
            if apdu.tag != 0xDB:
                raise RemoteProtocolError("the meter used dedicated ciphering, which was not negotiated")
            inner = decode_apdu(
                self._unprotect(apdu.content, apdu.system_title), max_elements=self.config.max_elements
            )
            if isinstance(inner, CipheredApdu | GeneralCiphering):
                raise RemoteProtocolError("general-glo-ciphering nests another ciphered APDU")
            return inner
        if secured and not isinstance(apdu, ExceptionResponse | ConfirmedServiceError | AARE | RLRE):
            raise RemoteProtocolError(
                f"unprotected {type(apdu).__name__} under the security policy {self.config.security.value}"
            )
        return apdu

    # -- association ------------------------------------------------------------------------------

    def _build_aarq(self) -> bytes:
        config = self.config
        secured = config.security is not SecurityPolicy.NONE
        mechanism: int | None = None
        authentication_value: bytes | None = None
        if config.auth is Auth.LLS:
            mechanism, authentication_value = Mechanism.LLS, config.password
        elif config.auth is Auth.HLS_GMAC:
            mechanism, authentication_value = Mechanism.HLS_GMAC, self._challenge
        if secured:
            user_information = self._ciphered_initiate()
        else:
            user_information = InitiateRequest(config.conformance, config.max_receive_pdu_bytes).encode()
        calling_title = config.system_title if secured or config.auth is Auth.HLS_GMAC else None
        return AARQ(
            application_context=ApplicationContext.LN_CIPHERING if secured else ApplicationContext.LN,
            calling_ap_title=calling_title,
            mechanism=mechanism,
            authentication_value=authentication_value,
            user_information=user_information,
        ).encode()

    def _on_aare(self, apdu: Apdu) -> list[object]:
        if not isinstance(apdu, AARE):
            raise RemoteProtocolError(f"expected an AARE, got {type(apdu).__name__}")
        if apdu.result != AssociationResult.ACCEPTED:
            raise self._refusal(apdu)
        self._associated = True
        secured = self.config.security is not SecurityPolicy.NONE
        if apdu.responding_ap_title is not None:
            if len(apdu.responding_ap_title) != 8:
                raise RemoteProtocolError(f"server system title of {len(apdu.responding_ap_title)} bytes")
            self.server_system_title = apdu.responding_ap_title
        if (secured or self.config.auth is Auth.HLS_GMAC) and self.server_system_title is None:
            raise RemoteProtocolError("the AARE lacks the server system title that security needs")
        if apdu.user_information is None:
            raise RemoteProtocolError("the AARE carries no xDLMS InitiateResponse")
        initiate = decode_xdlms_initiate(apdu.user_information)
        if isinstance(initiate, CipheredApdu):
            if initiate.plain_tag == TAG_INITIATE_REQUEST:
                raise RemoteProtocolError("the AARE carries an InitiateRequest")
            try:
                initiate = decode_xdlms_initiate(self._unprotect(initiate.content, self.server_system_title))
            except DecipheringError as exc:
                raise DecipheringError(f"the AARE's InitiateResponse: {exc}") from None
        elif secured:
            raise RemoteProtocolError("unprotected InitiateResponse although security is configured")
        if isinstance(initiate, ConfirmedServiceError):
            raise NegativeResponse(initiate.error_code, f"the meter refused the initiate: {initiate.text}")
        if not isinstance(initiate, InitiateResponse):
            raise RemoteProtocolError(f"the AARE carries {type(initiate).__name__}, not an InitiateResponse")
        self.conformance = initiate.conformance
        self.server_max_receive_pdu_bytes = initiate.max_receive_pdu_size or 0xFFFF
        if self.config.auth is Auth.HLS_GMAC:
            return self._start_hls(apdu)
        return self._next_request()

    def _refusal(self, aare: AARE) -> DcudError:
        result = {1: "rejected permanently", 2: "rejected transiently"}.get(
            aare.result, f"result {aare.result}"
        )
        detail = aare.diagnostic_text
        if aare.user_information is not None:
            try:
                initiate = decode_xdlms_initiate(aare.user_information)
            except DcudError:
                initiate = None
            if isinstance(initiate, ConfirmedServiceError):
                detail += f"; {initiate.text}"
        if (
            aare.diagnostic_source == DIAGNOSTIC_SOURCE_USER
            and aare.diagnostic == DIAGNOSTIC_AUTHENTICATION_FAILURE
        ):
            if self.config.auth is Auth.LLS:
                return AuthenticationFailed(
                    aare.diagnostic, "LLS authentication failed: the meter refused the password"
                )
            return AuthenticationFailed(
                aare.diagnostic, f"{self.config.auth.value} authentication failed ({result})"
            )
        hint = ""
        if self.config.security is not SecurityPolicy.NONE:
            hint = " (wrong keys or system title?)"
        return AssociationRefused(aare.diagnostic, f"association {result}: {detail}{hint}")

    def _start_hls(self, aare: AARE) -> list[object]:
        stoc = aare.authentication_value
        if stoc is None or not MIN_CHALLENGE_BYTES <= len(stoc) <= MAX_CHALLENGE_BYTES:
            raise RemoteProtocolError("HLS: the AARE carries no usable server challenge (8..64 bytes)")
        if stoc == self._challenge:
            raise RemoteProtocolError("HLS: the server challenge echoes ours")
        keys, title = self.config.keys, self.config.system_title
        assert keys is not None and title is not None  # checked by the config
        reply = hls_gmac_response(
            system_title=title, invocation_counter=self._counter.take(), keys=keys, challenge=stoc
        )
        self._state = _State.AUTHENTICATING
        method = AttributeRef(CLASS_ASSOCIATION_LN, ASSOCIATION_LN_OBIS, ASSOCIATION_REPLY_TO_HLS)
        request = ActionRequestNormal(method, OctetString(reply), self._next_invoke_id())
        return self._send(request.encode(), self._on_hls_reply)

    def _on_hls_reply(self, apdu: Apdu) -> list[object]:
        if not isinstance(apdu, ActionResponseNormal):
            raise RemoteProtocolError(f"HLS: expected an ACTION response, got {type(apdu).__name__}")
        self._check_invoke_id(apdu.invoke_id_and_priority)
        result = apdu.result
        if result.result != 0:
            raise AuthenticationFailed(
                result.result,
                f"HLS authentication failed: the meter refused our reply to its challenge "
                f"({result.text}; wrong key?)",
            )
        answer = result.return_parameters
        keys = self.config.keys
        assert keys is not None and self.server_system_title is not None
        if not isinstance(answer, OctetString) or not verify_hls_gmac(
            answer.value, system_title=self.server_system_title, keys=keys, challenge=self._challenge
        ):
            raise AuthenticationFailed(
                0,
                "HLS authentication failed: the meter's reply to our challenge does not verify (wrong key?)",
            )
        return self._next_request()

    # -- requests ---------------------------------------------------------------------------------

    def _next_request(self) -> list[object]:
        self._state = _State.REQUESTING
        self._exchange = None
        if not self._pending and self._planner is not None:
            self._pending.extend(self._plan(self._planner))
        if not self._pending:
            return self._start_release()
        first = self._pending.popleft()
        if isinstance(first, GetRequest):
            batch: list[Request] = [first]
            if self._can_list():
                batch += self._take_list_batch(first)
            self._exchange = _Exchange(list(batch))
            if len(batch) == 1:
                request = GetRequestNormal(first.attribute, first.access, self._next_invoke_id())
                return self._send(request.encode(), self._on_get_response)
            items = tuple(
                AttributeWithSelection(g.attribute, g.access) for g in batch if isinstance(g, GetRequest)
            )
            return self._send(
                GetRequestWithList(items, self._next_invoke_id()).encode(), self._on_get_response
            )
        if isinstance(first, SetRequest):
            self._exchange = _Exchange([first])
            return self._send_set(first)
        self._exchange = _Exchange([first])
        action = ActionRequestNormal(first.method, first.parameters, self._next_invoke_id())
        return self._send(action.encode(), self._on_action_response)

    def _plan(self, planner: Planner) -> list[Request]:
        """The planner's next requests; its failure fails the session (which then releases)."""
        try:
            return list(planner(tuple(self._outcomes)))
        except DcudError:
            raise
        except Exception as exc:  # a planner bug must still leave the association released
            raise LocalProtocolError(f"the request planner failed: {exc!r}") from exc

    def _can_list(self) -> bool:
        return self.config.use_with_list and bool(self.conformance & Conformance.MULTIPLE_REFERENCES)

    def _take_list_batch(self, first: GetRequest) -> list[Request]:
        batch: list[Request] = []
        if first.access is not None:
            return batch
        budget = self.server_max_receive_pdu_bytes - CIPHER_OVERHEAD_BYTES - 3 - 3 - 10
        while (
            self._pending
            and len(batch) + 1 < self.config.max_list_items
            and isinstance(self._pending[0], GetRequest)
            and self._pending[0].access is None
            and (len(batch) + 2) * 10 <= budget
        ):
            batch.append(self._pending.popleft())
        return batch

    def _record(self, request: Request, result: GetDataResult | None, code: int = 0) -> None:
        if isinstance(result, AccessResult):
            self._outcomes.append(Outcome(request, result.code))
        else:
            self._outcomes.append(Outcome(request, code, result))

    def _on_get_response(self, apdu: Apdu) -> list[object]:
        exchange = self._exchange
        assert exchange is not None
        if not isinstance(apdu, GetResponseNormal | GetResponseWithDatablock | GetResponseWithList):
            raise RemoteProtocolError(f"expected a GET response, got {type(apdu).__name__}")
        self._check_invoke_id(apdu.invoke_id_and_priority)
        listed = len(exchange.requests) > 1
        if isinstance(apdu, GetResponseNormal):
            if listed:
                raise RemoteProtocolError("GET-with-list answered with a single result")
            self._record(exchange.requests[0], apdu.result)
            return self._next_request()
        if isinstance(apdu, GetResponseWithList):
            if not listed or len(apdu.results) != len(exchange.requests):
                raise RemoteProtocolError(f"GET-with-list answered with {len(apdu.results)} results")
            for request, result in zip(exchange.requests, apdu.results, strict=True):
                self._record(request, result)
            return self._next_request()
        return self._on_get_block(exchange, apdu)

    def _on_get_block(self, exchange: _Exchange, apdu: GetResponseWithDatablock) -> list[object]:
        expected = exchange.block_number + 1
        if apdu.block_number != expected:
            raise RemoteProtocolError(f"GET block {apdu.block_number}, expected {expected}")
        exchange.block_number = expected
        self._blocks_total += 1
        if isinstance(apdu.raw_data, AccessResult):
            # The transfer broke off: every request of this exchange gets the result.
            for request in exchange.requests:
                self._record(request, apdu.raw_data)
            return self._next_request()
        exchange.blocks += apdu.raw_data
        if len(exchange.blocks) > self.config.max_response_bytes:
            raise RemoteProtocolError(f"GET response larger than {self.config.max_response_bytes} bytes")
        if exchange.block_number > self.config.max_blocks and not apdu.last_block:
            raise RemoteProtocolError(f"GET response in more than {self.config.max_blocks} blocks")
        if not apdu.last_block:
            following = GetRequestNext(apdu.block_number, self._same_invoke_id())
            return self._send(following.encode(), self._on_get_response)
        raw = bytes(exchange.blocks)
        if len(exchange.requests) > 1:
            results = decode_get_results(raw, max_elements=self.config.max_elements)
            if len(results) != len(exchange.requests):
                raise RemoteProtocolError(f"GET-with-list answered with {len(results)} results")
            for request, result in zip(exchange.requests, results, strict=True):
                self._record(request, result)
        else:
            self._record(exchange.requests[0], decode_data(raw, max_elements=self.config.max_elements))
        return self._next_request()

    def _set_overhead(self) -> int:
        cipher = CIPHER_OVERHEAD_BYTES if self.config.security is not SecurityPolicy.NONE else 0
        return 3 + 9 + 1 + 5 + 3 + cipher

    def _send_set(self, request: SetRequest) -> list[object]:
        value = encode_data(request.value)
        room = self.server_max_receive_pdu_bytes - self._set_overhead()
        fits = len(value) <= room
        if fits or not self.conformance & Conformance.BLOCK_TRANSFER_WITH_SET_OR_WRITE or room < 1:
            apdu = SetRequestNormal(request.attribute, request.value, None, self._next_invoke_id())
            return self._send(apdu.encode(), self._on_set_response)
        exchange = self._exchange
        assert exchange is not None
        exchange.set_chunks = [value[i : i + room] for i in range(0, len(value), room)]
        if len(exchange.set_chunks) > self.config.max_blocks:
            raise LocalProtocolError(f"SET value needs more than {self.config.max_blocks} blocks")
        exchange.block_number = 1
        first = SetRequestWithFirstDatablock(
            request.attribute,
            len(exchange.set_chunks) == 1,
            1,
            exchange.set_chunks[0],
            None,
            self._next_invoke_id(),
        )
        return self._send(first.encode(), self._on_set_response)

    def _on_set_response(self, apdu: Apdu) -> list[object]:
        exchange = self._exchange
        assert exchange is not None
        if not isinstance(apdu, SetResponseNormal | SetResponseDatablock | SetResponseLastDatablock):
            raise RemoteProtocolError(f"expected a SET response, got {type(apdu).__name__}")
        self._check_invoke_id(apdu.invoke_id_and_priority)
        request = exchange.requests[0]
        if isinstance(apdu, SetResponseNormal):
            self._record(request, None, apdu.result)
            return self._next_request()
        if apdu.block_number != exchange.block_number:
            raise RemoteProtocolError(
                f"SET block {apdu.block_number} acknowledged, sent {exchange.block_number}"
            )
        if isinstance(apdu, SetResponseLastDatablock):
            if exchange.block_number != len(exchange.set_chunks):
                raise RemoteProtocolError("SET finished before its last block")
            self._blocks_total += exchange.block_number
            self._record(request, None, apdu.result)
            return self._next_request()
        if exchange.block_number >= len(exchange.set_chunks):
            raise RemoteProtocolError("SET: the meter asks for a block after the last")
        exchange.block_number += 1
        chunk = exchange.set_chunks[exchange.block_number - 1]
        last = exchange.block_number == len(exchange.set_chunks)
        following = SetRequestWithDatablock(last, exchange.block_number, chunk, self._same_invoke_id())
        return self._send(following.encode(), self._on_set_response)

    def _on_action_response(self, apdu: Apdu) -> list[object]:
        exchange = self._exchange
        assert exchange is not None
        if not isinstance(apdu, ActionResponseNormal):
            raise RemoteProtocolError(f"expected an ACTION response, got {type(apdu).__name__}")
        self._check_invoke_id(apdu.invoke_id_and_priority)
        result = apdu.result
        returned = result.return_parameters
        if isinstance(returned, AccessResult):
            self._record(exchange.requests[0], None, result.result or returned.code)
        else:
            self._record(exchange.requests[0], returned, result.result)
        return self._next_request()


def inner_tag(apdu: Apdu) -> int:
    """The tag byte an APDU encodes with (what a ciphered wrapper's tag must correspond to)."""
    tag = getattr(apdu, "TAG", None)
    if isinstance(tag, int):
        return tag
    return int(getattr(apdu, "tag", -1))


__all__ = [
    "ActionRequest",
    "AssociationRefused",
    "Auth",
    "DlmsClient",
    "DlmsClientConfig",
    "DlmsSessionResult",
    "GetRequest",
    "Outcome",
    "Planner",
    "Request",
    "SetRequest",
]
