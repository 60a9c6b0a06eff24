"""Table-driven reflected CRC-16s shared by the codecs that use them.

- polynomial 8005 (reflected A001): CRC-16/MODBUS (init FFFF) and CRC-16/ARC (init 0000, DSMR P1) differ
  only in the initial value;
- polynomial 1021 (reflected 8408): CRC-16/X.25 (init FFFF, final XOR FFFF), the HCS and FCS of HDLC
  frames (ISO/IEC 13239, IEC 62056-46), sent low byte first.
"""

from __future__ import annotations


def _table(reflected_poly: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ reflected_poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE_8005 = _table(0xA001)
_TABLE_1021 = _table(0x8408)


def crc16_reflected_8005(data: bytes, init: int) -> int:
    """CRC-16 over ``data`` with the reflected polynomial A001, the given initial value, no final XOR."""
    crc = init
    table = _TABLE_8005
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def crc16_x25(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/X.25 over ``data`` (reflected 1021, init FFFF, final XOR FFFF; check value 906E)."""
    crc = 0xFFFF
    table = _TABLE_1021
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFF
