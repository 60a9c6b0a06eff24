"""Raw SNMP requests for the agent tests: BER encoded here rather than by a library, so that they can
carry what no manager would send, and the fixed batch of hostile datagrams the agent must survive."""

from __future__ import annotations

__all__ = ["COMMUNITY", "ber_int", "ber_oid", "bulk_request", "hostile_datagrams", "tlv"]

COMMUNITY = "noc-read-only"
"""The agent's read community in the agent tests (not helpers.alarm.COMMUNITY, the traps')."""


def tlv(tag: int, value: bytes) -> bytes:
    """BER tag-length-value (definite length)."""
    size = len(value)
    if size < 0x80:
        return bytes([tag, size]) + value
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + value


def ber_int(value: int) -> bytes:
    """A BER INTEGER (two's complement, shortest form but never empty)."""
    return tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def ber_oid(oid: tuple[int, ...]) -> bytes:
    """A BER OBJECT IDENTIFIER (the first two arcs in one, base-128 arcs), whatever the arcs' sizes."""
    arcs = [oid[0] * 40 + oid[1], *oid[2:]]
    body = bytearray()
    for arc in arcs:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


def bulk_request(
    community: str,
    max_repetitions: int,
    non_repeaters: int = 0,
    count: int = 1,
    oid: tuple[int, ...] = (1, 3, 6),
) -> bytes:
    """A raw SNMPv2c GetBulkRequest, encoded here so that it can carry what no manager would send
    (negative or huge numbers, thousands of variables)."""
    varbinds = tlv(0x30, b"".join(tlv(0x30, ber_oid(oid) + b"\x05\x00") for _ in range(count)))
    pdu = tlv(0xA5, ber_int(4242) + ber_int(non_repeaters) + ber_int(max_repetitions) + varbinds)
    return tlv(0x30, ber_int(1) + tlv(0x04, community.encode()) + pdu)


def hostile_datagrams() -> list[bytes]:
    """A fixed batch: truncations and bit flips of valid requests, wrong tags, absurd lengths."""
    valid = bulk_request(COMMUNITY, 10, count=3)
    batch = [valid[:cut] for cut in range(len(valid))]
    batch += [valid[:i] + bytes([valid[i] ^ 0xFF]) + valid[i + 1 :] for i in range(len(valid))]
    batch += [
        b"",
        b"\x00",
        b"\x30\x84\xff\xff\xff\xff",  # a SEQUENCE claiming 4 GiB
        b"\x30\x80" + b"\x30\x80" * 5000,  # indefinite lengths nested deep
        b"\x30\x03\x02\x01\x63",  # version 99
        b"\x30\x0b\x02\x01\x03\x30\x06\x02\x01\x01\x02\x01\x00",  # a v3 header cut short
        bytes(range(256)) * 4,
        bulk_request(COMMUNITY, 10, oid=(1, 3) + (2**32 - 1,) * 120),  # the longest OID
        bulk_request(COMMUNITY, 10, count=2000),  # thousands of varbinds
    ]
    return batch
