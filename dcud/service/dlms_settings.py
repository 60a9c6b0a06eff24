"""One DLMS meter's settings as a readout needs them: derived from dcud.toml, turned into client and link.

:class:`DlmsMeterSettings` is a ``[[meter]]`` with ``protocol = "dlms"`` after the loader checked it: keys
read from their files, the client system title, the objects, profile and event logs parsed, the key set's
identity. It makes the session's :class:`~dcud.codec.dlms.client.DlmsClientConfig` (with the counters
the state store hands out, and the answer timeout sized to the line) and its transport (HDLC on a line,
with mode E first when configured, or the wrapper for a TCP meter). Apart from the readout plan and the
polling glue because ``dcud read``/``dcud dlms objects`` and the tests build it on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcud.codec.dlms.client import Auth, DlmsClientConfig
from dcud.codec.dlms.hdlc_link import HdlcLink
from dcud.codec.dlms.mode_e import ModeESettings
from dcud.codec.dlms.obis import Obis
from dcud.codec.dlms.security import Keys, SecurityPolicy
from dcud.codec.dlms.wrapper import WrapperTransport
from dcud.config.dlms import (
    ObjectSpec,
    client_system_title,
    meter_keys,
    parse_host,
    parse_obis,
    parse_object,
    physical_address,
)
from dcud.config.model import DlmsConfig, LineConfig, MeterConfig
from dcud.service.dlms_state import keyset_id
from dcud.service.line import LineClosedError

DEFAULT_HDLC_TIMEOUT_S = 5.0
DEFAULT_SESSION_TIMEOUT_S = 10.0
HDLC_MAX_PDU_BYTES = 2048
"""The largest APDU dcud takes on a serial line (longer answers come in GET blocks): at 9600 Bd it is on
the line for 2.3 s, so one answer cannot outlast the session's timeout, and a block costs one round trip
per 2 kB at most. Meters usually accept 512 or 1024 themselves."""


# --- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DlmsMeterSettings:
    """One DLMS meter as the readout needs it, derived from dcud.toml exactly as the loader checked it."""

    name: str
    line: str
    host: str
    port: int
    address: str
    physical_address: int | None
    dlms: DlmsConfig
    keys: Keys | None = field(repr=False)
    system_title: bytes
    objects: tuple[ObjectSpec, ...]
    profile: Obis | None
    event_logs: tuple[Obis, ...]
    timeout_s: float | None
    retries: int
    max_baud: int | None
    keyset: str

    @classmethod
    def from_config(cls, meter: MeterConfig, base_dir: Path, device_id: str) -> DlmsMeterSettings:
        """From a validated ``[[meter]]`` (a DlmsConfigError here means the file changed since)."""
        dlms = meter.dlms or DlmsConfig()
        keys = meter_keys(dlms, base_dir)
        title = client_system_title(dlms, device_id)
        host, port = parse_host(meter.host) if meter.host else ("", 0)
        return cls(
            name=meter.name,
            line=meter.line,
            host=host,
            port=port,
            address=meter.address,
            physical_address=physical_address(meter.address) if meter.line else None,
            dlms=dlms,
            keys=keys,
            system_title=title,
            objects=tuple(parse_object(text) for text in dlms.objects),
            profile=parse_obis(dlms.profile) if dlms.profile else None,
            event_logs=tuple(parse_obis(text) for text in dlms.event_logs),
            timeout_s=meter.timeout_s,
            retries=meter.retries,
            max_baud=meter.max_baud,
            keyset=keyset_id(
                keys=keys,
                system_title=title,
                client_sap=dlms.client,
                logical_device=dlms.logical_device,
            ),
        )

    @property
    def where(self) -> str:
        """``line <name>`` or ``host:port`` (for messages)."""
        return f"line {self.line}" if self.line else f"{self.host}:{self.port}"

    def client_config(
        self, invocation_counter: int, limit: int, server_counter: int | None, line: LineConfig | None = None
    ) -> DlmsClientConfig:
        """The session's configuration with the counters the state store handed out.

        On TCP ``timeout_s`` bounds each answer. On HDLC it is the link's per-frame timeout (the link
        retries and gives up by itself); the session's own bound on one answer is a backstop above it
        that also covers the line time of the largest APDU dcud accepts (:data:`HDLC_MAX_PDU_BYTES`).
        """
        dlms = self.dlms
        secured = dlms.auth == "hls-gmac" or dlms.security != "none"
        if self.host:
            max_pdu, timeout_s = 0xFFFF, self.timeout_s or DEFAULT_SESSION_TIMEOUT_S
        else:
            baud = (self.max_baud or 9600) if dlms.mode_e or line is None else line.effective_baud
            link_s = (self.timeout_s or DEFAULT_HDLC_TIMEOUT_S) * 4
            max_pdu = HDLC_MAX_PDU_BYTES
            timeout_s = max(DEFAULT_SESSION_TIMEOUT_S, link_s) + 1.5 * 11 * max_pdu / baud
        return DlmsClientConfig(
            auth=Auth(dlms.auth),
            password=dlms.password.encode(),
            security=SecurityPolicy(dlms.security),
            keys=self.keys,
            system_title=self.system_title if secured else None,
            invocation_counter=invocation_counter,
            invocation_counter_limit=limit,
            server_invocation_counter=server_counter,
            response_timeout_s=timeout_s,
            max_receive_pdu_bytes=max_pdu,
        )

    def transport(self, line: LineConfig | None) -> HdlcLink | WrapperTransport:
        """HDLC on ``line`` (mode E first when configured), or the wrapper for a TCP meter."""
        dlms = self.dlms
        if self.host:
            return WrapperTransport(
                client_sap=dlms.client,
                logical_device=dlms.logical_device,
                response_timeout_s=self.timeout_s or DEFAULT_SESSION_TIMEOUT_S,
            )
        if line is None:
            raise LineClosedError(f"line {self.line} is not configured")
        mode_e: ModeESettings | bool = False
        if dlms.mode_e:
            mode_e = ModeESettings(
                address=dlms.iec_address, initial_baud=line.effective_baud, max_baud=self.max_baud
            )
        return HdlcLink(
            client_sap=dlms.client,
            logical_device=dlms.logical_device,
            physical_address=self.physical_address,
            response_timeout_s=self.timeout_s or DEFAULT_HDLC_TIMEOUT_S,
            baud=None if dlms.mode_e else line.effective_baud,
            mode_e=mode_e,
        )

    def describe(self) -> dict[str, Any]:
        """What the state document shows of the configuration (never a secret)."""
        doc: dict[str, Any] = {
            "transport": "tcp" if self.host else "hdlc",
            "client": self.dlms.client,
            "logical_device": self.dlms.logical_device,
            "auth": self.dlms.auth,
            "security": self.dlms.security,
        }
        if self.host:
            doc["host"] = f"{self.host}:{self.port}"
        return doc


__all__ = [
    "DEFAULT_HDLC_TIMEOUT_S",
    "DEFAULT_SESSION_TIMEOUT_S",
    "HDLC_MAX_PDU_BYTES",
    "DlmsMeterSettings",
]
