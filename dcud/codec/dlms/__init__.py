"""DLMS/COSEM (IEC 62056-5-3, -6-2, -46, -47), sans-I/O: the lower layers (HDLC link, TCP wrapper) and
the application layer (A-XDR, xDLMS APDUs, security, COSEM interface classes, the client session).

The two halves meet at :class:`dcud.codec.dlms.transport.ApduTransport`.
"""
