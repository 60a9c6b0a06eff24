"""The meter's application layer: associations (none / LLS / HLS-GMAC), ciphering, GET/SET/ACTION.

One :class:`Meter` holds what outlives a connection (objects, clock, invocation counters, request log);
one :class:`Association` per link (an HDLC connection, or a client SAP on a TCP connection) answers
APDUs. ``Association.handle`` takes a whole APDU and returns the whole answer (or None: no answer).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import acse, axdr, ciphering, cosem
from .axdr import Data
from .config import ClientConfig, PeerConfig
from .cosem import AccessError, Served

GET_REQUEST = 0xC0
SET_REQUEST = 0xC1
ACTION_REQUEST = 0xC3
GET_RESPONSE = 0xC4
SET_RESPONSE = 0xC5
ACTION_RESPONSE = 0xC7
EXCEPTION_RESPONSE = 0xD8
GENERAL_GLO_CIPHERING = 0xDB
GENERAL_DED_CIPHERING = 0xDC
# protected request tag -> (plain request tag, protected response tag, dedicated key)
SERVICE_SPECIFIC = {
    0xC8: (GET_REQUEST, 0xCC, False),
    0xC9: (SET_REQUEST, 0xCD, False),
    0xCB: (ACTION_REQUEST, 0xCF, False),
    0xD0: (GET_REQUEST, 0xD4, True),
    0xD1: (SET_REQUEST, 0xD5, True),
    0xD3: (ACTION_REQUEST, 0xD7, True),
}
# exception-response: state-error, service-error
SERVICE_NOT_ALLOWED = 1
SERVICE_UNKNOWN = 2
OPERATION_NOT_POSSIBLE = 1
SERVICE_NOT_SUPPORTED = 2
OTHER_REASON = 3
PDU_TOO_LONG = 4
DECIPHERING_ERROR = 5
INVOCATION_COUNTER_ERROR = 6


# conformance bits (bit 0 is the most significant of 24)
def _bits(*numbers: int) -> int:
    return sum(1 << (23 - n) for n in numbers)


GENERAL_PROTECTION = 1
BLOCK_TRANSFER_WITH_GET = 11
MULTIPLE_REFERENCES = 14
GET = 19
SET = 20
SELECTIVE_ACCESS = 21
ACTION = 23
SERVER_CONFORMANCE = _bits(
    GENERAL_PROTECTION, 9, BLOCK_TRANSFER_WITH_GET, MULTIPLE_REFERENCES, GET, SET, SELECTIVE_ACCESS, ACTION
)
MIN_CLIENT_PDU = 64
MAX_LIST = 64

Record = dict[str, Any]


class Meter:
    """What the meter keeps across connections: objects, clock, invocation counters, the request log."""

    def __init__(self, cfg: PeerConfig, log: Callable[[Record], None]) -> None:
        self.cfg = cfg
        self.log = log
        self.clock = cosem.MeterClock(cfg.clock_start_s, cfg.clock_running, cfg.deviation_min)
        self.energy = cosem.Energy(cfg.profile_start_s, cfg.capture_period_s)
        dev = cfg.deviation_min
        e = self.energy
        self.import_register = cosem.Register(
            cosem.obis_bytes("1.0.1.8.0.255"), e.import_wh, axdr.DOUBLE_LONG_UNSIGNED, 0, cosem.UNIT_WH
        )
        self.export_register = cosem.Register(
            cosem.obis_bytes("1.0.2.8.0.255"),
            lambda t: e.export_wh(t) // 10,
            axdr.DOUBLE_LONG_UNSIGNED,
            1,
            cosem.UNIT_WH,
        )
        self.voltage_register = cosem.Register(
            cosem.obis_bytes("1.0.32.7.0.255"), e.voltage_dv, axdr.LONG_UNSIGNED, -1, cosem.UNIT_V
        )
        self.clock_object = cosem.Clock(self.clock, self._clock_was_set)
        clock_column = cosem.CaptureObject(8, cosem.CLOCK_LN, 2)
        self.load_profile = cosem.ProfileGeneric(
            cosem.obis_bytes("1.0.99.1.0.255"),
            [
                clock_column,
                cosem.CaptureObject(3, self.import_register.ln, 2),
                cosem.CaptureObject(3, self.export_register.ln, 2),
            ],
            cfg.capture_period_s,
            cosem.LoadProfile(e, [self.import_register, self.export_register], cfg.profile_max_entries, dev),
            cfg.profile_max_entries,
        )
        events = cosem.EventLog([(ev.at_s, ev.code) for ev in cfg.events], cfg.event_log_max_entries, dev)
        self.event_code = cosem.DataObject(cosem.EVENT_CODE_LN, lambda t: axdr.u8(events.last_code(t)))
        self.event_log = cosem.ProfileGeneric(
            cosem.obis_bytes("0.0.99.98.0.255"),
            [clock_column, cosem.CaptureObject(1, cosem.EVENT_CODE_LN, 2)],
            0,
            events,
            cfg.event_log_max_entries,
        )
        for profile in (self.load_profile, self.event_log):
            profile.deviation_min = dev
        self.objects: dict[bytes, cosem.CosemObject] = {
            o.ln: o
            for o in (
                self.clock_object,
                self.import_register,
                self.export_register,
                self.voltage_register,
                self.load_profile,
                self.event_code,
                self.event_log,
            )
        }
        self.clients = {c.sap: c for c in cfg.clients}
        self.server_ic = cfg.server_invocation_counter
        self.last_client_ic: dict[int, int] = {}
        self._rng: random.Random | None = (
            random.Random(cfg.challenge_seed) if cfg.challenge_seed is not None else None
        )

    def next_server_ic(self) -> int:
        """A fresh invocation counter for something the meter protects (never reused)."""
        ic = self.server_ic
        self.server_ic += 1
        return ic

    def challenge(self, size: int = 16) -> bytes:
        """The server's HLS challenge StoC (seeded when the configuration asks for repeatable runs)."""
        if self._rng is not None:
            return bytes(self._rng.getrandbits(8) for _ in range(size))
        return secrets.token_bytes(size)

    def _clock_was_set(self, old_s: float, new_s: float) -> None:
        self.log({"kind": "clock_set", "from": cosem.iso_utc(old_s), "to": cosem.iso_utc(new_s)})


@dataclass
class _Protection:
    """How the request that is being answered was protected, so the answer is protected the same way."""

    sc: int
    response_tag: int | None  # service-specific response tag, or None for general ciphering
    general_tag: int | None
    key: bytes


@dataclass
class _LongGet:
    invoke_id: int
    blocks: list[bytes]
    sent: int  # number of blocks sent; the last one sent has number ``sent``


class Association:
    """One application association of one client SAP over one link."""

    def __init__(self, meter: Meter, client: ClientConfig, transport: str, link_id: str) -> None:
        self.meter = meter
        self.client = client
        self.transport = transport
        self.link_id = link_id
        self.state = "idle"  # idle -> associated | pending (HLS) -> associated | failed; released
        self.ciphered = False
        self.client_title: bytes | None = None
        self.dedicated_key: bytes | None = None
        self.last_dedicated_ic = -1
        self.max_send_pdu = meter.cfg.max_pdu_size
        self.conformance = 0
        self.ctos = b""
        self.stoc = b""
        self.long_get: _LongGet | None = None
        self.protection: _Protection | None = None

    # --- facts for the objects (cosem.Context) ---
    @property
    def now_s(self) -> float:
        """The meter's time."""
        return self.meter.clock.now()

    @property
    def can_write(self) -> bool:
        """Authenticated clients may SET the clock."""
        return self.client.can_write and self.state == "associated"

    def log(self, kind: str, **facts: Any) -> None:
        """One request-log record about this association."""
        self.meter.log(
            {
                "kind": kind,
                "transport": self.transport,
                "link": self.link_id,
                "client_sap": self.client.sap,
                **facts,
            }
        )

    def close(self, why: str) -> None:
        """The link under the association went away (DISC, SNRM, TCP close): an abort unless released."""
        if self.state in ("associated", "pending"):
            self.log("aborted", why=why)
        self.state = "idle"
        self.long_get = None

    # --- entry point ---
    def handle(self, apdu: bytes) -> bytes | None:
        """Answer one APDU (None: nothing to answer). Never raises on hostile input."""
        if not apdu:
            return None
        tag = apdu[0]
        try:
            if tag == acse.AARQ:
                return self._aarq(apdu)
            if tag == acse.RLRQ:
                return self._rlrq(apdu)
            if tag in SERVICE_SPECIFIC or tag in (GENERAL_GLO_CIPHERING, GENERAL_DED_CIPHERING):
                return self._protected(apdu)
            if tag in (GET_REQUEST, SET_REQUEST, ACTION_REQUEST):
                if self.client.security:
                    self.log("refused", service=f"0x{tag:02X}", why="this client must protect its APDUs")
                    return _exception(SERVICE_NOT_ALLOWED, DECIPHERING_ERROR)
                self.protection = None
                return self._service(apdu)
            self.log("refused", service=f"0x{tag:02X}", why="unknown APDU")
            return _exception(SERVICE_UNKNOWN, SERVICE_NOT_SUPPORTED)
        except (axdr.DecodeError, IndexError, ValueError) as exc:
            self.log("malformed", service=f"0x{tag:02X}", why=str(exc))
            return _exception(SERVICE_NOT_ALLOWED, OTHER_REASON)

    # --- ACSE ---
    def _reject(
        self, context: int, diagnostic: int, why: str, user_information: bytes | None = None
    ) -> bytes:
        self.state = "idle"
        self.log("aarq", result="rejected", diagnostic=diagnostic, why=why)
        return acse.Aare(
            context, acse.REJECTED_PERMANENT, diagnostic, user_information=user_information
        ).encode()

    def _aarq(self, apdu: bytes) -> bytes:
        self.long_get = None
        self.dedicated_key = None
        self.last_dedicated_ic = -1
        client = self.client
        expected_context = acse.CONTEXT_LN_CIPHERED if client.security else acse.CONTEXT_LN
        try:
            aarq = acse.parse_aarq(apdu)
        except axdr.DecodeError as exc:
            return self._reject(expected_context, acse.DIAG_NO_REASON, f"malformed AARQ: {exc}")
        context = aarq.context if aarq.context is not None else expected_context
        if aarq.context != expected_context:
            return self._reject(context, acse.DIAG_CONTEXT_NOT_SUPPORTED, f"context {aarq.context}")
        wanted = {
            "none": acse.MECHANISM_NONE,
            "lls": acse.MECHANISM_LLS,
            "hls-gmac": acse.MECHANISM_HLS_GMAC,
        }[client.auth]
        mechanism = aarq.mechanism or acse.MECHANISM_NONE
        if wanted != acse.MECHANISM_NONE and mechanism == acse.MECHANISM_NONE:
            return self._reject(context, acse.DIAG_MECHANISM_REQUIRED, "no authentication mechanism")
        if mechanism != wanted:
            return self._reject(context, acse.DIAG_MECHANISM_NOT_RECOGNISED, f"mechanism {mechanism}")
        if aarq.user_information is None:
            return self._reject(context, acse.DIAG_NO_REASON, "no InitiateRequest")
        initiate = aarq.user_information
        cipher_error = acse.confirmed_service_error_initiate(0, 6)  # application-reference: deciphering-error
        if client.security:
            title = aarq.calling_ap_title
            if title is None or len(title) != 8:
                return self._reject(
                    context, 3, "no 8-byte calling-AP-title"
                )  # calling-AP-title-not-recognized
            if initiate[0] != acse.GLO_INITIATE_REQUEST:
                return self._reject(
                    context, acse.DIAG_NO_REASON, "InitiateRequest not ciphered", cipher_error
                )
            try:
                content = acse.unwrap(initiate, acse.GLO_INITIATE_REQUEST)
                sc, ic, initiate = ciphering.unprotect(
                    content, title, self.meter.cfg.block_cipher_key, self.meter.cfg.authentication_key
                )
            except (ciphering.SecurityError, axdr.DecodeError) as exc:
                return self._reject(context, acse.DIAG_NO_REASON, f"InitiateRequest: {exc}", cipher_error)
            if sc & client.security != client.security:
                return self._reject(
                    context, acse.DIAG_NO_REASON, f"security control 0x{sc:02X} too weak", cipher_error
                )
            if not self._accept_ic(ic):
                return self._reject(
                    context, acse.DIAG_NO_REASON, f"invocation counter {ic} replayed", cipher_error
                )
            self.client_title = title
            self.protection = _Protection(
                sc, acse.GLO_INITIATE_RESPONSE, None, self.meter.cfg.block_cipher_key
            )
        elif initiate[:1] != bytes([acse.INITIATE_REQUEST]):
            return self._reject(context, acse.DIAG_NO_REASON, "user-information is not an InitiateRequest")
        try:
            request = acse.parse_initiate_request(initiate)
        except axdr.DecodeError as exc:
            return self._reject(context, acse.DIAG_NO_REASON, f"InitiateRequest: {exc}")
        if request.dlms_version < 6:
            return self._reject(
                context, acse.DIAG_NO_REASON, "DLMS version", acse.confirmed_service_error_initiate(6, 1)
            )
        if request.client_max_receive_pdu < MIN_CLIENT_PDU:
            return self._reject(
                context, acse.DIAG_NO_REASON, "PDU size", acse.confirmed_service_error_initiate(6, 3)
            )
        conformance = request.conformance & SERVER_CONFORMANCE
        if not conformance & _bits(GET):
            return self._reject(
                context, acse.DIAG_NO_REASON, "conformance", acse.confirmed_service_error_initiate(6, 2)
            )
        if client.auth == "lls" and aarq.auth_value != client.password:
            return self._reject(context, acse.DIAG_AUTHENTICATION_FAILURE, "wrong LLS password")
        if client.auth == "hls-gmac":
            if aarq.calling_ap_title is None or len(aarq.calling_ap_title) != 8:
                return self._reject(context, 3, "HLS-GMAC needs the client's system title")
            if aarq.auth_value is None or not 8 <= len(aarq.auth_value) <= 64:
                return self._reject(
                    context, acse.DIAG_AUTHENTICATION_FAILURE, "challenge CtoS not 8..64 bytes"
                )
            self.client_title = aarq.calling_ap_title
            self.ctos = aarq.auth_value
            self.stoc = self.meter.challenge()
        self.ciphered = bool(client.security)
        self.dedicated_key = request.dedicated_key if self.ciphered else None
        self.conformance = conformance
        self.max_send_pdu = min(request.client_max_receive_pdu, self.meter.cfg.max_pdu_size)
        response = acse.initiate_response(conformance, self.meter.cfg.max_pdu_size)
        if self.ciphered:
            response = self._protect_with(self.protection, response)
        pending = client.auth == "hls-gmac"
        self.state = "pending" if pending else "associated"
        self.log(
            "aarq",
            result="accepted",
            auth=client.auth,
            ciphered=self.ciphered,
            pending_hls=pending,
            max_send_pdu=self.max_send_pdu,
            conformance=f"{conformance:06X}",
        )
        return acse.Aare(
            context,
            acse.ACCEPTED,
            acse.DIAG_AUTHENTICATION_REQUIRED if pending else acse.DIAG_NONE,
            system_title=self.meter.cfg.system_title if (self.ciphered or pending) else None,
            mechanism=mechanism,
            stoc=self.stoc if pending else None,
            user_information=response,
        ).encode()

    def _rlrq(self, apdu: bytes) -> bytes:
        reason, user_information = acse.parse_rlrq(apdu)
        answer = None
        note: dict[str, Any] = {"reason": reason}
        if user_information is not None:
            answer = acse.initiate_response(self.conformance, self.meter.cfg.max_pdu_size)
            if (
                user_information[:1] == bytes([acse.GLO_INITIATE_REQUEST])
                and self.ciphered
                and self.client_title
            ):
                try:
                    content = acse.unwrap(user_information, acse.GLO_INITIATE_REQUEST)
                    sc, ic, _ = ciphering.unprotect(
                        content,
                        self.client_title,
                        self.meter.cfg.block_cipher_key,
                        self.meter.cfg.authentication_key,
                    )
                    note["ic_fresh"] = self._accept_ic(ic)
                    answer = self._protect_with(
                        _Protection(sc, acse.GLO_INITIATE_RESPONSE, None, self.meter.cfg.block_cipher_key),
                        answer,
                    )
                except (ciphering.SecurityError, axdr.DecodeError) as exc:
                    note["decipher_failed"] = str(exc)
        was = self.state
        self.state = "released"
        self.long_get = None
        self.log("release", was=was, **note)
        return acse.rlre(answer)

    # --- protection ---
    def _accept_ic(self, ic: int) -> bool:
        last = self.meter.last_client_ic.get(self.client.sap, -1)
        if ic <= last:
            return False
        self.meter.last_client_ic[self.client.sap] = ic
        return True

    def _protected(self, apdu: bytes) -> bytes:
        tag = apdu[0]
        cfg = self.meter.cfg
        if not self.ciphered or self.client_title is None:
            self.log("refused", service=f"0x{tag:02X}", why="protected APDU outside a ciphered association")
            return _exception(SERVICE_NOT_ALLOWED, DECIPHERING_ERROR)
        title = self.client_title
        if tag in SERVICE_SPECIFIC:
            inner_tag, response_tag, dedicated = SERVICE_SPECIFIC[tag]
            content = acse.unwrap(apdu, tag)
            general = None
        else:
            dedicated = tag == GENERAL_DED_CIPHERING
            inner_tag, response_tag, general = 0, None, tag
            length, pos = axdr.decode_length(apdu, 1)
            if length not in (0, 8) or pos + length > len(apdu):
                raise axdr.DecodeError("general ciphering: bad system title")
            if length == 8 and apdu[pos : pos + 8] != title:
                self.log("refused", service=f"0x{tag:02X}", why="system title is not the associated client's")
                return _exception(SERVICE_NOT_ALLOWED, DECIPHERING_ERROR)
            content = acse.unwrap(bytes([0]) + apdu[pos + length :], 0)
        key = self.dedicated_key if dedicated else cfg.block_cipher_key
        if key is None:
            self.log("refused", service=f"0x{tag:02X}", why="no dedicated key in this association")
            return _exception(SERVICE_NOT_ALLOWED, DECIPHERING_ERROR)
        try:
            sc, ic, plain = ciphering.unprotect(content, title, key, cfg.authentication_key)
        except ciphering.SecurityError as exc:
            self.log("refused", service=f"0x{tag:02X}", why=f"deciphering: {exc}")
            return _exception(SERVICE_NOT_ALLOWED, DECIPHERING_ERROR)
        if sc & self.client.security != self.client.security:
            self.log(
                "refused", service=f"0x{tag:02X}", why=f"security control 0x{sc:02X} weaker than required"
            )
            return _exception(SERVICE_NOT_ALLOWED, DECIPHERING_ERROR)
        if dedicated:
            fresh = ic > self.last_dedicated_ic
            if fresh:
                self.last_dedicated_ic = ic
        else:
            fresh = self._accept_ic(ic)
        if not fresh:
            self.log("refused", service=f"0x{tag:02X}", why=f"invocation counter {ic} replayed", ic=ic)
            return _exception(SERVICE_NOT_ALLOWED, INVOCATION_COUNTER_ERROR)
        if (
            not plain
            or (inner_tag and plain[0] != inner_tag)
            or plain[0] not in (GET_REQUEST, SET_REQUEST, ACTION_REQUEST)
        ):
            raise axdr.DecodeError("protected APDU does not hold the service its tag names")
        self.protection = _Protection(sc, response_tag, general, key)
        answer = self._service(plain)
        return self._protect_with(self.protection, answer)

    def _protect_with(self, protection: _Protection | None, plain: bytes) -> bytes:
        if protection is None or plain[:1] == bytes([EXCEPTION_RESPONSE]):
            return plain
        cfg = self.meter.cfg
        content = ciphering.protect(
            protection.sc,
            cfg.system_title,
            self.meter.next_server_ic(),
            protection.key,
            cfg.authentication_key,
            plain,
        )
        if protection.general_tag is not None:
            return (
                bytes([protection.general_tag, 8])
                + cfg.system_title
                + axdr.encode_length(len(content))
                + content
            )
        assert protection.response_tag is not None
        return bytes([protection.response_tag]) + axdr.encode_length(len(content)) + content

    def _overhead(self) -> int:
        """Bytes protection adds around an xDLMS APDU (tag, length, SC, IC, tag; general: system title)."""
        p = self.protection
        if p is None:
            return 0
        tag_bytes = ciphering.TAG_BYTES if p.sc & ciphering.SC_AUTHENTICATED else 0
        return 1 + 3 + 5 + tag_bytes + (9 if p.general_tag is not None else 0)

    # --- xDLMS services ---
    def _service(self, apdu: bytes) -> bytes:
        tag = apdu[0]
        if self.state in ("pending", "failed"):
            if tag == ACTION_REQUEST and self.state == "pending":
                return self._action(apdu, hls_only=True)
            return self._denied(apdu, f"HLS authentication not completed ({self.state})")
        if self.state != "associated":
            self.log("refused", service=f"0x{tag:02X}", why=f"no association ({self.state})")
            return _exception(SERVICE_NOT_ALLOWED, OPERATION_NOT_POSSIBLE)
        if tag == GET_REQUEST:
            return self._get(apdu)
        if tag == SET_REQUEST:
            return self._set(apdu)
        return self._action(apdu, hls_only=False)

    def _denied(self, apdu: bytes, why: str) -> bytes:
        tag, kind, iid = apdu[0], apdu[1], apdu[2]
        self.log("refused", service=f"0x{tag:02X}", why=why)
        if tag == GET_REQUEST and kind == 1:
            return bytes([GET_RESPONSE, 1, iid, 1, cosem.READ_WRITE_DENIED])
        if tag == SET_REQUEST and kind == 1:
            return bytes([SET_RESPONSE, 1, iid, cosem.READ_WRITE_DENIED])
        return _exception(SERVICE_NOT_ALLOWED, OPERATION_NOT_POSSIBLE)

    def _object(self, class_id: int, ln: bytes) -> cosem.CosemObject:
        obj: cosem.CosemObject | None = (
            AssociationObject(self) if ln == cosem.ASSOCIATION_LN else self.meter.objects.get(ln)
        )
        if obj is None:
            raise AccessError(cosem.OBJECT_UNDEFINED, f"no object {cosem.obis_text(ln)}")
        if obj.class_id != class_id:
            raise AccessError(
                cosem.OBJECT_CLASS_INCONSISTENT, f"{cosem.obis_text(ln)} is class {obj.class_id}"
            )
        return obj

    def _read_one(self, apdu: bytes, pos: int) -> tuple[Served | int, dict[str, Any], int]:
        """One attribute descriptor with selection at ``pos``: (value or error code, log facts, next pos)."""
        class_id = int.from_bytes(apdu[pos : pos + 2], "big")
        ln = bytes(apdu[pos + 2 : pos + 8])
        attr = int.from_bytes(apdu[pos + 8 : pos + 9], "big", signed=True)
        if len(ln) != 6 or pos + 10 > len(apdu):
            raise axdr.DecodeError("truncated attribute descriptor")
        pos += 9
        selector: int | None = None
        params: Data | None = None
        if apdu[pos]:
            selector = apdu[pos + 1]
            params, pos = axdr.decode(apdu, pos + 2)
        else:
            pos += 1
        facts: dict[str, Any] = {"class_id": class_id, "obis": cosem.obis_text(ln), "attr": attr}
        try:
            served = self._object(class_id, ln).get(attr, selector, params, self)
        except AccessError as exc:
            facts.update(result=exc.code, why=str(exc))
            return exc.code, facts, pos
        facts.update(result=0, **served.note)
        return served, facts, pos

    def _get(self, apdu: bytes) -> bytes:
        kind, iid = apdu[1], apdu[2]
        if kind == 1:
            self.long_get = None
            value, facts, end = self._read_one(apdu, 3)
            if end != len(apdu):
                raise axdr.DecodeError("bytes after the GET request")
            if isinstance(value, int):
                self.log("get", **facts)
                return bytes([GET_RESPONSE, 1, iid, 1, value])
            payload = axdr.encode(value.value)
            whole = bytes([GET_RESPONSE, 1, iid, 0]) + payload
            return self._maybe_blocks("get", iid, whole, payload, facts)
        if kind == 2:
            if len(apdu) != 7:
                raise axdr.DecodeError("GET-request-next has a 4-byte block number")
            return self._next_block(iid, int.from_bytes(apdu[3:7], "big"))
        if kind == 3:
            self.long_get = None
            count, pos = axdr.decode_length(apdu, 3)
            if not 1 <= count <= MAX_LIST:
                raise axdr.DecodeError(f"{count} attributes in one GET-with-list")
            results = bytearray(axdr.encode_length(count))
            items = []
            for _ in range(count):
                value, facts, pos = self._read_one(apdu, pos)
                items.append(facts)
                results += bytes([1, value]) if isinstance(value, int) else b"\x00" + axdr.encode(value.value)
            if pos != len(apdu):
                raise axdr.DecodeError("bytes after the GET-with-list request")
            whole = bytes([GET_RESPONSE, 3, iid]) + results
            return self._maybe_blocks("get_list", iid, whole, bytes(results), {"items": items})
        self.log("refused", service="GET", why=f"GET request type {kind}")
        return _exception(SERVICE_NOT_ALLOWED, SERVICE_NOT_SUPPORTED)

    def _maybe_blocks(
        self, kind: str, iid: int, whole: bytes, payload: bytes, facts: dict[str, Any]
    ) -> bytes:
        room = self.max_send_pdu - self._overhead()
        if len(whole) <= room:
            self.log(kind, bytes=len(payload), blocks=0, **facts)
            return whole
        if not self.conformance & _bits(BLOCK_TRANSFER_WITH_GET):
            self.log(kind, bytes=len(payload), blocks=0, **facts, refused="needs block transfer")
            return bytes([GET_RESPONSE, 1, iid, 1, cosem.OTHER_REASON])
        size = room - 12  # C4 02 iid last block(4) choice length(<=3)
        blocks = [payload[i : i + size] for i in range(0, len(payload), size)]
        self.long_get = _LongGet(iid, blocks, 0)
        self.log(kind, bytes=len(payload), blocks=len(blocks), **facts)
        return self._send_block()

    def _send_block(self) -> bytes:
        lg = self.long_get
        assert lg is not None
        chunk = lg.blocks[lg.sent]
        lg.sent += 1
        last = lg.sent == len(lg.blocks)
        if last:
            self.long_get = None
        return (
            bytes([GET_RESPONSE, 2, lg.invoke_id, 1 if last else 0])
            + lg.sent.to_bytes(4, "big")
            + b"\x00"
            + axdr.encode_length(len(chunk))
            + chunk
        )

    def _next_block(self, iid: int, acked: int) -> bytes:
        lg = self.long_get
        if lg is None:
            self.log("get_next", block=acked, result=cosem.NO_LONG_GET_IN_PROGRESS)
            return (
                bytes([GET_RESPONSE, 2, iid, 1])
                + (acked + 1).to_bytes(4, "big")
                + bytes([1, cosem.NO_LONG_GET_IN_PROGRESS])
            )
        if acked != lg.sent:
            self.long_get = None
            self.log("get_next", block=acked, result=cosem.LONG_GET_ABORTED, expected=lg.sent)
            return (
                bytes([GET_RESPONSE, 2, iid, 1])
                + (acked + 1).to_bytes(4, "big")
                + bytes([1, cosem.LONG_GET_ABORTED])
            )
        self.log("get_next", block=acked, result=0, last=lg.sent + 1 == len(lg.blocks))
        return self._send_block()

    def _set(self, apdu: bytes) -> bytes:
        kind, iid = apdu[1], apdu[2]
        if kind != 1:
            self.log("refused", service="SET", why=f"SET request type {kind}")
            return _exception(SERVICE_NOT_ALLOWED, SERVICE_NOT_SUPPORTED)
        class_id = int.from_bytes(apdu[3:5], "big")
        ln = bytes(apdu[5:11])
        attr = int.from_bytes(apdu[11:12], "big", signed=True)
        pos = 12
        if apdu[pos]:
            raise axdr.DecodeError("SET with selective access")
        value = axdr.decode_all(apdu[pos + 1 :])
        facts: dict[str, Any] = {"class_id": class_id, "obis": cosem.obis_text(ln), "attr": attr}
        try:
            self._object(class_id, ln).set(attr, value, self)
            result = 0
        except AccessError as exc:
            result = exc.code
            facts["why"] = str(exc)
        self.log("set", result=result, **facts)
        return bytes([SET_RESPONSE, 1, iid, result])

    def _action(self, apdu: bytes, hls_only: bool) -> bytes:
        kind, iid = apdu[1], apdu[2]
        if kind != 1:
            self.log("refused", service="ACTION", why=f"ACTION request type {kind}")
            return _exception(SERVICE_NOT_ALLOWED, SERVICE_NOT_SUPPORTED)
        class_id = int.from_bytes(apdu[3:5], "big")
        ln = bytes(apdu[5:11])
        method = int.from_bytes(apdu[11:12], "big", signed=True)
        params: Data | None = axdr.decode_all(apdu[13:]) if apdu[12] else None
        if not apdu[12] and len(apdu) != 13:
            raise axdr.DecodeError("bytes after the ACTION request")
        facts: dict[str, Any] = {"class_id": class_id, "obis": cosem.obis_text(ln), "method": method}
        if (class_id, ln, method) == (15, cosem.ASSOCIATION_LN, 1) and self.state == "pending":
            return self._reply_to_hls(iid, params, facts)
        result = (
            cosem.READ_WRITE_DENIED
            if hls_only or (ln in self.meter.objects or ln == cosem.ASSOCIATION_LN)
            else cosem.OBJECT_UNDEFINED
        )
        self.log("action", result=result, **facts)
        return bytes([ACTION_RESPONSE, 1, iid, result, 0])

    def _reply_to_hls(self, iid: int, params: Data | None, facts: dict[str, Any]) -> bytes:
        cfg = self.meter.cfg
        answer = params.value if params is not None and params.tag == axdr.OCTET_STRING else None
        ok = False
        if (
            isinstance(answer, bytes)
            and len(answer) == 17
            and answer[0] == ciphering.SC_AUTHENTICATED
            and self.client_title
        ):
            ic = int.from_bytes(answer[1:5], "big")
            expected = ciphering.hls_answer(
                self.client_title, ic, cfg.block_cipher_key, cfg.authentication_key, self.stoc
            )
            ok = secrets.compare_digest(expected, answer)
        if not ok:
            self.state = "failed"
            self.log("hls", result="failed", **facts)
            return bytes([ACTION_RESPONSE, 1, iid, cosem.READ_WRITE_DENIED, 0])
        self.state = "associated"
        proof = ciphering.hls_answer(
            cfg.system_title,
            self.meter.next_server_ic(),
            cfg.block_cipher_key,
            cfg.authentication_key,
            self.ctos,
        )
        self.log("hls", result="ok", **facts)
        return bytes([ACTION_RESPONSE, 1, iid, 0, 1, 0]) + axdr.encode(axdr.octets(proof))


def _exception(state_error: int, service_error: int) -> bytes:
    return bytes([EXCEPTION_RESPONSE, state_error, service_error])


_CONTEXT_ARCS = (2, 16, 756, 5, 8)


class AssociationObject(cosem.CosemObject):
    """Class 15 (Association LN) 0.0.40.0.0.255, version 1, as the current association sees it."""

    class_id = 15
    version = 1
    attribute_count = 9

    def __init__(self, association: Association) -> None:
        super().__init__(cosem.ASSOCIATION_LN)
        self.association = association

    def get(self, attr: int, selector: int | None, params: Data | None, ctx: cosem.Context) -> Served:
        """object_list, partners, context, xDLMS context, mechanism, status, security setup."""
        a = self.association
        if selector is not None:
            return super().get(attr, selector, params, ctx)
        if attr == 2:
            return Served(axdr.array([self._entry(o) for o in self._objects()]))
        if attr == 3:
            return Served(axdr.struct_(axdr.i8(a.client.sap), axdr.u16(a.meter.cfg.logical_device)))
        if attr == 4:
            return Served(self._name(1, acse.CONTEXT_LN_CIPHERED if a.ciphered else acse.CONTEXT_LN))
        if attr == 5:
            cfg = a.meter.cfg
            return Served(
                axdr.struct_(
                    Data(axdr.BIT_STRING, (24, a.conformance.to_bytes(3, "big"))),
                    axdr.u16(cfg.max_pdu_size),
                    axdr.u16(a.max_send_pdu),
                    axdr.u8(6),
                    axdr.i8(0),
                    axdr.octets(b""),
                )
            )
        if attr == 6:
            return Served(self._name(2, {"none": 0, "lls": 1, "hls-gmac": 5}[a.client.auth]))
        if attr == 7:
            raise AccessError(cosem.READ_WRITE_DENIED, "the secret is not readable")
        if attr == 8:
            return Served(axdr.enum({"associated": 2, "pending": 1}.get(a.state, 0)))
        if attr == 9:
            return Served(axdr.octets(bytes([0, 0, 43, 0, 0, 255])))
        return super().get(attr, selector, params, ctx)

    def access_mode(self, attr: int, can_write: bool) -> int:
        """The secret is hidden; the rest is read-only."""
        return cosem.NO_ACCESS if attr == 7 else cosem.READ_ONLY

    def methods(self) -> list[int]:
        """reply_to_HLS_authentication."""
        return [1]

    def _objects(self) -> list[cosem.CosemObject]:
        return [self, *self.association.meter.objects.values()]

    def _entry(self, obj: cosem.CosemObject) -> Data:
        can_write = self.association.can_write
        attributes = [
            axdr.struct_(
                axdr.i8(i),
                axdr.enum(obj.access_mode(i, can_write)),
                axdr.array([axdr.i8(s) for s in obj.selectors(i)]) if obj.selectors(i) else axdr.null(),
            )
            for i in range(1, obj.attribute_count + 1)
        ]
        methods = [axdr.struct_(axdr.i8(m), axdr.enum(1)) for m in obj.methods()]
        return axdr.struct_(
            axdr.u16(obj.class_id),
            axdr.u8(obj.version),
            axdr.octets(obj.ln),
            axdr.struct_(axdr.array(attributes), axdr.array(methods)),
        )

    @staticmethod
    def _name(kind: int, arc: int) -> Data:
        # Blue Book: {joint-iso-ctt 2, country 16, country-name 756, identified-organization 5,
        # DLMS-UA 8, kind (1 context, 2 mechanism), id}
        return axdr.struct_(
            axdr.u8(2), axdr.u8(16), axdr.u16(756), axdr.u8(5), axdr.u8(8), axdr.u8(kind), axdr.u8(arc)
        )
