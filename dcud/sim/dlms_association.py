"""The simulated DLMS meter's associations and their security: AARQ to RLRE, HLS-GMAC, ciphered APDUs.

:class:`AssociationServer` holds one :class:`Association` per client SAP and channel and does what
opening, proving, protecting and closing one takes: the AARQ checks (application context, mechanism,
calling AP title, the xDLMS initiate, plain or ciphered) and the AARE, LLS passwords, HLS-GMAC pass 3
and 4 (``reply_to_hls``), the release (a ciphered initiate in the RLRQ answered in the RLRE), and every
protected request opened (GCM tag, security policy, invocation counter above the last one accepted from
that client SAP, kept for the meter's life) and its answer sealed the way the request came (global or
dedicated key, service-specific or general-glo ciphering). The meter's own counter never repeats.
:class:`~dcud.sim.dlms_meter.DlmsMeter` adds the COSEM objects and the services on top; this is the
security-relevant part of the simulator, kept where it can be read on its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from dcud.codec.dlms.apdu import (
    AARE,
    AARQ,
    DED_TAGS,
    DIAGNOSTIC_AUTHENTICATION_FAILURE,
    DIAGNOSTIC_AUTHENTICATION_REQUIRED,
    GLO_TAGS,
    RLRE,
    RLRQ,
    TAG_GENERAL_DED_CIPHERING,
    TAG_GENERAL_GLO_CIPHERING,
    TAG_INITIATE_REQUEST,
    ActionResult,
    Apdu,
    ApplicationContext,
    AssociationResult,
    CipheredApdu,
    ConfirmedServiceError,
    Conformance,
    ExceptionResponse,
    GeneralCiphering,
    InitiateRequest,
    InitiateResponse,
    Mechanism,
    decode_apdu,
    decode_xdlms_initiate,
)
from dcud.codec.dlms.axdr import Data, OctetString
from dcud.codec.dlms.obis import AttributeRef
from dcud.codec.dlms.security import (
    INVOCATION_COUNTER_MAX,
    InvocationCounter,
    Keys,
    SecurityPolicy,
    hls_gmac_response,
    protect,
    unprotect,
    verify_hls_gmac,
)
from dcud.errors import DcudError
from dcud.sim.dlms_model import ClientSpec, MeterModel, MeterSpec
from dcud.sim.dlms_objects import READ_WRITE_DENIED

METER_CONFORMANCE = (
    Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ
    | Conformance.BLOCK_TRANSFER_WITH_SET_OR_WRITE
    | Conformance.MULTIPLE_REFERENCES
    | Conformance.GET
    | Conformance.SET
    | Conformance.SELECTIVE_ACCESS
    | Conformance.ACTION
)
"""What the simulated meter offers; the AARE grants the intersection with the client's proposal."""


CHALLENGE_BYTES = 16
"""The meter's HLS challenge StoC."""


# Exception-response codes.
STATE_SERVICE_NOT_ALLOWED = 1
STATE_SERVICE_UNKNOWN = 2
SERVICE_OPERATION_NOT_POSSIBLE = 1
SERVICE_NOT_SUPPORTED = 2
SERVICE_DECIPHERING_ERROR = 5
SERVICE_INVOCATION_COUNTER_ERROR = 6

# ConfirmedServiceError (in a refused AARE): service initiate (1), class and code.
CSE_INITIATE = 1
CSE_CLASS_APPLICATION_REFERENCE = 0
CSE_CLASS_INITIATE = 6
CSE_DECIPHERING_ERROR = 6
CSE_OTHER = 0
CSE_DLMS_VERSION_TOO_LOW = 1
CSE_INCOMPATIBLE_CONFORMANCE = 2
CSE_PDU_SIZE_TOO_SHORT = 3


# ---------------------------------------------------------------------------------------------------
# Associations


_State = Literal["pending", "associated", "failed"]


@dataclass
class _LongGet:
    blocks: list[bytes]
    sent: int  # number of the last block sent (1-based)


@dataclass
class _LongSet:
    attribute: AttributeRef
    data: bytearray
    block: int  # last block number received


@dataclass(frozen=True, slots=True)
class _Protection:
    """How a request came protected, so the answer goes back the same way."""

    kind: Literal["glo", "ded", "general-glo", "general-ded"]
    security_control: int


@dataclass
class Association:
    """One application association (a client SAP on one channel)."""

    client: ClientSpec
    channel: Hashable
    state: _State
    conformance: Conformance
    client_max_pdu: int
    client_title: bytes | None = None
    ctos: bytes = field(default=b"", repr=False)
    stoc: bytes = field(default=b"", repr=False)
    dedicated_key: bytes | None = field(default=None, repr=False)
    long_get: _LongGet | None = None
    long_set: _LongSet | None = None


# ---------------------------------------------------------------------------------------------------
# The server side of associations


class AssociationServer(MeterModel):
    """The meter's associations (see the module docstring); ``challenge`` draws its HLS challenges
    (random, or derived from ``spec.challenge_seed`` when set, for repeatable runs)."""

    def __init__(
        self, spec: MeterSpec, clock: Callable[[], float], challenge: Callable[[int], bytes] | None
    ) -> None:
        super().__init__(spec, clock)
        self.keys = spec.keys
        self.title = spec.title
        self.counter = InvocationCounter(spec.invocation_counter)
        self.client_counters: dict[int, int] = {}
        """The last invocation counter accepted from each client SAP."""
        self._associations: dict[tuple[Hashable, int], Association] = {}
        self._challenges = 0
        if challenge is not None:
            self._challenge = challenge
        elif spec.challenge_seed:
            self._challenge = self._seeded_challenge
        else:
            self._challenge = secrets.token_bytes

    # -- channels ---------------------------------------------------------------------------------

    def channel_closed(self, channel: Hashable) -> None:
        """The link under ``channel`` went away (DISC, SNRM, TCP close): its associations end."""
        for key in [k for k in self._associations if k[0] == channel]:
            self._end_association(key, "link closed")

    def associations(self) -> list[Association]:
        """The open associations."""
        return list(self._associations.values())

    # -- association --------------------------------------------------------------------------------

    def _associate(self, channel: Hashable, client: ClientSpec, aarq: AARQ) -> bytes:
        policy = client.policy
        context = ApplicationContext.LN if policy is SecurityPolicy.NONE else ApplicationContext.LN_CIPHERING
        needed = {"none": None, "lls": Mechanism.LLS, "hls-gmac": Mechanism.HLS_GMAC}[client.auth]
        key = (channel, client.sap)
        if key in self._associations:
            self._end_association(key, "new AARQ")

        def refuse(diagnostic: int, why: str, error: ConfirmedServiceError | None = None) -> bytes:
            self.stats.refused += 1
            self.record("aarq", client_sap=client.sap, result="rejected", diagnostic=diagnostic, why=why)
            user = None if error is None else error.encode()
            return AARE(
                aarq.application_context,
                AssociationResult.REJECTED_PERMANENT,
                diagnostic,
                user_information=user,
            ).encode()

        initiate_error = ConfirmedServiceError(CSE_INITIATE, CSE_CLASS_INITIATE, CSE_OTHER)
        if aarq.application_context != context:
            return refuse(2, f"application context {aarq.application_context}, expected {int(context)}")
        if needed is None and aarq.mechanism not in (None, Mechanism.NONE):
            return refuse(11, f"mechanism {aarq.mechanism} for a client without authentication")
        if needed is not None and aarq.mechanism is None:
            return refuse(12, "no authentication mechanism")
        if needed is not None and aarq.mechanism != needed:
            return refuse(11, f"mechanism {aarq.mechanism}, expected {int(needed)}")
        title = aarq.calling_ap_title
        needs_title = policy is not SecurityPolicy.NONE or needed == Mechanism.HLS_GMAC
        if needs_title and (title is None or len(title) != 8):
            return refuse(3, "no 8-byte calling AP title (client system title)")
        if aarq.user_information is None:
            return refuse(1, "no xDLMS initiate", initiate_error)
        try:
            initiate = decode_xdlms_initiate(aarq.user_information)
        except DcudError:
            return refuse(1, "malformed xDLMS initiate", initiate_error)
        deciphering = ConfirmedServiceError(
            CSE_INITIATE, CSE_CLASS_APPLICATION_REFERENCE, CSE_DECIPHERING_ERROR
        )
        ciphered = isinstance(initiate, CipheredApdu)
        if isinstance(initiate, CipheredApdu):
            if (
                policy is SecurityPolicy.NONE
                or initiate.dedicated
                or initiate.plain_tag != TAG_INITIATE_REQUEST
            ):
                return refuse(1, "ciphered initiate not expected here", deciphering)
            assert title is not None
            try:
                opened = unprotect(initiate.content, system_title=title, keys=self.keys)
            except DcudError as exc:
                return refuse(1, f"initiate does not decipher: {exc}", deciphering)
            if not policy.satisfied_by(opened.security_control):
                return refuse(
                    1, f"initiate protected with SC 0x{opened.security_control:02X} only", deciphering
                )
            if not self._accept_counter(client.sap, opened.invocation_counter):
                return refuse(1, f"replayed invocation counter {opened.invocation_counter}", deciphering)
            try:
                initiate = decode_xdlms_initiate(opened.plaintext)
            except DcudError:
                return refuse(1, "malformed xDLMS initiate", initiate_error)
        elif policy is not SecurityPolicy.NONE:
            return refuse(1, "plain initiate under a security policy", deciphering)
        if not isinstance(initiate, InitiateRequest):
            return refuse(1, f"user-information is {type(initiate).__name__}", initiate_error)
        if initiate.dlms_version < 6:
            return refuse(1, "DLMS version below 6", ConfirmedServiceError(1, 6, CSE_DLMS_VERSION_TOO_LOW))
        if not initiate.conformance & Conformance.GET:
            return refuse(
                1, "no GET in the conformance", ConfirmedServiceError(1, 6, CSE_INCOMPATIBLE_CONFORMANCE)
            )
        client_max_pdu = initiate.max_receive_pdu_size or 0xFFFF
        if client_max_pdu < 64:
            return refuse(1, "client PDU below 64 bytes", ConfirmedServiceError(1, 6, CSE_PDU_SIZE_TOO_SHORT))
        if needed == Mechanism.LLS and not hmac.compare_digest(
            aarq.authentication_value or b"", client.password.encode()
        ):
            return refuse(DIAGNOSTIC_AUTHENTICATION_FAILURE, "wrong password")
        ctos = aarq.authentication_value or b""
        if needed == Mechanism.HLS_GMAC and not 8 <= len(ctos) <= 64:
            return refuse(DIAGNOSTIC_AUTHENTICATION_FAILURE, f"client challenge of {len(ctos)} bytes")
        conformance = Conformance(METER_CONFORMANCE & initiate.conformance)
        association = Association(
            client=client,
            channel=channel,
            state="pending" if needed == Mechanism.HLS_GMAC else "associated",
            conformance=conformance,
            client_max_pdu=client_max_pdu,
            client_title=title,
            ctos=ctos,
            dedicated_key=initiate.dedicated_key,
        )
        response = InitiateResponse(conformance, self.spec.max_pdu_size).encode()
        if policy is not SecurityPolicy.NONE:
            content = protect(
                response,
                security_control=policy.security_control,
                system_title=self.title,
                invocation_counter=self.counter.take(),
                keys=self.keys,
            )
            response = CipheredApdu(GLO_TAGS[response[0]], content).encode()
        diagnostic = 0
        stoc = None
        if needed == Mechanism.HLS_GMAC:
            diagnostic = DIAGNOSTIC_AUTHENTICATION_REQUIRED
            stoc = self._new_challenge(ctos)
            association.stoc = stoc
        self._associations[key] = association
        self.stats.associations += 1
        self.record(
            "aarq",
            association,
            result="accepted",
            ciphered=ciphered,
            pending_hls=association.state == "pending",
            client_max_pdu=client_max_pdu,
            conformance=f"{int(conformance):06X}",
        )
        return AARE(
            context,
            AssociationResult.ACCEPTED,
            diagnostic,
            responding_ap_title=self.title if needs_title else None,
            mechanism=needed,
            authentication_value=stoc,
            user_information=response,
        ).encode()

    def _end_association(self, key: tuple[Hashable, int], why: str) -> None:
        association = self._associations.pop(key, None)
        if association is not None:
            self.record("aborted", association, state=association.state, why=why)

    def _new_challenge(self, ctos: bytes) -> bytes:
        for _ in range(8):
            stoc = self._challenge(CHALLENGE_BYTES)
            if stoc != ctos:
                return stoc
        return bytes(b ^ 0xFF for b in ctos[:CHALLENGE_BYTES].ljust(CHALLENGE_BYTES, b"\0"))

    def _seeded_challenge(self, size: int) -> bytes:
        self._challenges += 1
        digest = hashlib.sha256(f"{self.spec.challenge_seed}:{self._challenges}".encode()).digest()
        return digest[:size]

    def _accept_counter(self, sap: int, counter: int) -> bool:
        last = self.client_counters.get(sap)
        if last is not None and counter <= last:
            return False
        self.client_counters[sap] = counter
        return True

    def reply_to_hls(self, association: Association, parameters: Data | None) -> ActionResult:
        """HLS pass 3 and 4: check the client's f(StoC), answer f(CtoS)."""
        if association.state != "pending" or association.client.auth != "hls-gmac":
            self.record("hls", association, result="unexpected")
            return ActionResult(READ_WRITE_DENIED)
        title = association.client_title
        assert title is not None  # an HLS association has one (checked at the AARQ)
        answer = parameters.value if isinstance(parameters, OctetString) else b""
        valid = verify_hls_gmac(answer, system_title=title, keys=self.keys, challenge=association.stoc)
        # No counter check here: f(StoC) binds the fresh StoC of this association, which is what keeps
        # it from being replayed (its IC is taken before the counter of the ACTION that carries it).
        if not valid:
            association.state = "failed"
            self.stats.refused += 1
            self.record("hls", association, result="failed", why="f(StoC) does not verify")
            return ActionResult(READ_WRITE_DENIED)
        association.state = "associated"
        reply = hls_gmac_response(
            system_title=self.title,
            invocation_counter=self.counter.take(),
            keys=self.keys,
            challenge=association.ctos,
        )
        self.record("hls", association, result="ok")
        return ActionResult(0, OctetString(reply))

    def _release(self, key: tuple[Hashable, int], association: Association | None, rlrq: RLRQ) -> bytes:
        user_information = None
        note: dict[str, Any] = {"reason": rlrq.reason}
        if association is not None and rlrq.user_information is not None and association.client_title:
            policy = association.client.policy
            try:
                initiate = decode_xdlms_initiate(rlrq.user_information)
                if isinstance(initiate, CipheredApdu) and policy is not SecurityPolicy.NONE:
                    opened = unprotect(
                        initiate.content, system_title=association.client_title, keys=self.keys
                    )
                    note["ic_fresh"] = self._accept_counter(association.client.sap, opened.invocation_counter)
                    response = InitiateResponse(association.conformance, self.spec.max_pdu_size).encode()
                    content = protect(
                        response,
                        security_control=opened.security_control,
                        system_title=self.title,
                        invocation_counter=self.counter.take(),
                        keys=self.keys,
                    )
                    user_information = CipheredApdu(GLO_TAGS[response[0]], content).encode()
            except DcudError as exc:
                note["decipher_failed"] = str(exc)[:200]
        if association is not None:
            self._associations.pop(key, None)
        self.record("release", association, was=None if association is None else association.state, **note)
        return RLRE(0, user_information).encode()

    # -- protection ---------------------------------------------------------------------------------

    def _open(self, association: Association, apdu: Apdu) -> tuple[Apdu, _Protection | None] | bytes:
        """The plain request and how it was protected, or the exception-response refusing it."""
        policy = association.client.policy
        refused = ExceptionResponse(STATE_SERVICE_NOT_ALLOWED, SERVICE_DECIPHERING_ERROR).encode()
        if not isinstance(apdu, CipheredApdu | GeneralCiphering):
            if policy is not SecurityPolicy.NONE:
                self.record("refused", association, why="plain request under a security policy")
                self.stats.refused += 1
                return refused
            return apdu, None
        title = association.client_title
        if policy is SecurityPolicy.NONE or title is None:
            self.record("refused", association, why="ciphered request without a security policy")
            self.stats.refused += 1
            return refused
        if isinstance(apdu, CipheredApdu):
            dedicated = apdu.dedicated
            kind: Literal["glo", "ded", "general-glo", "general-ded"] = "ded" if dedicated else "glo"
            content = apdu.content
        else:
            dedicated = apdu.tag == TAG_GENERAL_DED_CIPHERING
            kind = "general-ded" if dedicated else "general-glo"
            content = apdu.content
            if apdu.system_title != title:
                self.record("refused", association, why="general ciphering under another system title")
                self.stats.refused += 1
                return refused
        keys = self._keys(association, dedicated)
        if keys is None:
            self.record("refused", association, why="dedicated ciphering without a dedicated key")
            self.stats.refused += 1
            return refused
        try:
            opened = unprotect(content, system_title=title, keys=keys)
        except DcudError as exc:
            self.record("refused", association, why=f"does not decipher: {exc}"[:200])
            self.stats.refused += 1
            return refused
        if not policy.satisfied_by(opened.security_control):
            self.record("refused", association, why=f"SC 0x{opened.security_control:02X} below the policy")
            self.stats.refused += 1
            return refused
        if not self._accept_counter(association.client.sap, opened.invocation_counter):
            expected = self.client_counters.get(association.client.sap, 0) + 1
            self.record(
                "refused", association, why="replayed invocation counter", ic=opened.invocation_counter
            )
            self.stats.refused += 1
            return ExceptionResponse(
                STATE_SERVICE_NOT_ALLOWED,
                SERVICE_INVOCATION_COUNTER_ERROR,
                min(expected, INVOCATION_COUNTER_MAX),
            ).encode()
        inner = decode_apdu(opened.plaintext)
        if isinstance(inner, CipheredApdu | GeneralCiphering) or (
            isinstance(apdu, CipheredApdu) and opened.plaintext[:1] != bytes([apdu.plain_tag])
        ):
            self.record("refused", association, why="ciphered APDU carries something else than its tag says")
            self.stats.refused += 1
            return refused
        return inner, _Protection(kind, opened.security_control)

    def _keys(self, association: Association, dedicated: bool) -> Keys | None:
        if not dedicated:
            return self.keys
        if association.dedicated_key is None or len(association.dedicated_key) != 16:
            return None
        return Keys(association.dedicated_key, self.keys.authentication_key)

    def _seal(self, association: Association, plain: bytes, protection: _Protection | None) -> bytes:
        if protection is None or plain[0] == ExceptionResponse.TAG:
            return plain
        dedicated = protection.kind in ("ded", "general-ded")
        keys = self._keys(association, dedicated)
        assert keys is not None  # the request deciphered with them
        content = protect(
            plain,
            security_control=protection.security_control,
            system_title=self.title,
            invocation_counter=self.counter.take(),
            keys=keys,
        )
        if protection.kind == "glo":
            return CipheredApdu(GLO_TAGS[plain[0]], content).encode()
        if protection.kind == "ded":
            return CipheredApdu(DED_TAGS[plain[0]], content).encode()
        tag = TAG_GENERAL_DED_CIPHERING if dedicated else TAG_GENERAL_GLO_CIPHERING
        return GeneralCiphering(self.title, content, tag).encode()

    def _overhead(self, protection: _Protection | None) -> int:
        if protection is None:
            return 0
        return 1 + 3 + 5 + 12 + (9 if protection.kind.startswith("general") else 0)


__all__ = [
    "CHALLENGE_BYTES",
    "CSE_CLASS_APPLICATION_REFERENCE",
    "CSE_CLASS_INITIATE",
    "CSE_DECIPHERING_ERROR",
    "CSE_DLMS_VERSION_TOO_LOW",
    "CSE_INCOMPATIBLE_CONFORMANCE",
    "CSE_INITIATE",
    "CSE_OTHER",
    "CSE_PDU_SIZE_TOO_SHORT",
    "METER_CONFORMANCE",
    "SERVICE_DECIPHERING_ERROR",
    "SERVICE_INVOCATION_COUNTER_ERROR",
    "SERVICE_NOT_SUPPORTED",
    "SERVICE_OPERATION_NOT_POSSIBLE",
    "STATE_SERVICE_NOT_ALLOWED",
    "STATE_SERVICE_UNKNOWN",
    "Association",
    "AssociationServer",
]
