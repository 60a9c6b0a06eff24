"""The reflected CRC-16 with polynomial 8005 (A001 reflected), shared by the codecs that use it.

CRC-16/MODBUS (init FFFF) and CRC-16/ARC (init 0000, DSMR P1) differ only in the initial value.
"""

from __future__ import annotations


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc16_reflected_8005(data: bytes, init: int) -> int:
    """CRC-16 over ``data`` with the reflected polynomial A001, the given initial value, no final XOR."""
    crc = init
    table = _TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc
