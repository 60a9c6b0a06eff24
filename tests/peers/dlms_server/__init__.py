"""An independent DLMS/COSEM meter for dcud's interoperability tests (``python -m tests.peers.dlms_server``).

Written from the standards (IEC 62056-46 HDLC, IEC 62056-47 wrapper, IEC 62056-5-3 xDLMS, the DLMS UA
Green Book's security chapter and Blue Book interface classes), without dcud's codec, and checked
against dlms-cosem's client and the Green Book's published HLS-GMAC and ciphering examples.

Licence: this peer is dcud's own code (Apache-2.0) and imports no GPL or BSL code. The tests that drive
it use dlms-cosem (Business Source License 1.1) as an independent client in a separate process, and it
is installed only by the ``test`` extra: nothing of it ships in dcud.
"""
