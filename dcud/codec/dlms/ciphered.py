"""The ciphered APDUs of DLMS/COSEM (IEC 62056-5-3), sans-I/O: the envelopes, not the crypto.

:class:`CipheredApdu` is a service-specific ciphered APDU (global ``glo-*`` or dedicated ``ded-*`` tag,
one per plain service tag) and :class:`GeneralCiphering` the general-glo / general-ded-ciphering form
that also carries the sender's system title. Both hold the protected content as bytes
(``SC || IC || ciphertext || tag``); sealing and opening it is :mod:`.security`. Kept apart because
protection wraps any APDU (an initiate in an AARQ as much as a GET) and is used by both ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcud.codec.dlms.apdu_common import (
    DED_TAGS,
    PLAIN_TAG_OF,
    TAG_GENERAL_DED_CIPHERING,
    TAG_GENERAL_GLO_CIPHERING,
    _encode_octets,
)
from dcud.errors import LocalProtocolError


@dataclass(frozen=True, slots=True)
class CipheredApdu:
    """A service-specific ciphered APDU (glo-* or ded-*): ``content`` is ``SC || IC || ciphertext || tag``."""

    tag: int
    content: bytes

    def __post_init__(self) -> None:
        if self.tag not in PLAIN_TAG_OF:
            raise LocalProtocolError(f"0x{self.tag:02X} is not a ciphered APDU tag")

    @property
    def plain_tag(self) -> int:
        """The tag of the APDU it carries."""
        return PLAIN_TAG_OF[self.tag]

    @property
    def dedicated(self) -> bool:
        """Whether the dedicated key protects it (else the global key)."""
        return self.tag in DED_TAGS.values()

    def encode(self) -> bytes:
        """Tag, length, content."""
        return bytes([self.tag]) + _encode_octets(self.content)


@dataclass(frozen=True, slots=True)
class GeneralCiphering:
    """general-glo-ciphering (0xDB) or general-ded-ciphering (0xDC), carrying the sender's system title."""

    system_title: bytes
    content: bytes
    tag: int = TAG_GENERAL_GLO_CIPHERING

    def __post_init__(self) -> None:
        if self.tag not in (TAG_GENERAL_GLO_CIPHERING, TAG_GENERAL_DED_CIPHERING):
            raise LocalProtocolError(f"0x{self.tag:02X} is not a general-ciphering tag")

    def encode(self) -> bytes:
        """Tag, system title, content."""
        return bytes([self.tag]) + _encode_octets(self.system_title) + _encode_octets(self.content)


__all__ = [
    "CipheredApdu",
    "GeneralCiphering",
]
