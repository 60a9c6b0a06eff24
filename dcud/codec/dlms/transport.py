"""The seam between the DLMS/COSEM application layer and its lower layers (HDLC or the TCP wrapper).

A lower layer is a sans-I/O object: the client session hands it APDUs and the bytes that arrived; it
hands back a list of items, each either a line action of :mod:`dcud.codec.actions` (``Send``,
``SetBaud``, ``SetFraming``, ``Drain``, ``Flush``; all but ``Send`` only in the mode E sign-on),
which the session passes through to its driver unchanged, or one of the link events below, which
the session consumes. Time comes in as ``now`` (seconds, monotonic); the lower layer's own deadline
(HDLC response timeout, retransmission) comes out of :meth:`ApduTransport.next_deadline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dcud.errors import DcudError


@dataclass(frozen=True, slots=True)
class LinkUp:
    """The link is established (HDLC: UA received for SNRM; wrapper: at once)."""


@dataclass(frozen=True, slots=True)
class ApduIn:
    """One complete APDU (segments reassembled, HDLC LLC header and wrapper header removed)."""

    apdu: bytes


@dataclass(frozen=True, slots=True)
class LinkDown:
    """The link ended: ``error`` is None after an orderly close, else the reason (PeerTimeout,
    RemoteProtocolError such as FRMR/DM or a bad frame sequence)."""

    error: DcudError | None


LinkEvent = LinkUp | ApduIn | LinkDown


class ApduTransport(Protocol):
    """A DLMS lower layer; every method returns line actions and link events, in order."""

    def open(self, now: float) -> list[object]:
        """Start the link (HDLC: SNRM with the negotiated parameters; wrapper: LinkUp at once)."""
        ...

    def send_apdu(self, apdu: bytes, now: float) -> list[object]:
        """Send one APDU (segmented and windowed as negotiated)."""
        ...

    def receive_data(self, data: bytes, now: float) -> list[object]:
        """Feed bytes from the line/socket, split anywhere."""
        ...

    def handle_timer(self, now: float) -> list[object]:
        """Called once ``now`` reached :meth:`next_deadline` (retransmit, or LinkDown(PeerTimeout))."""
        ...

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` is due; None while nothing is awaited."""
        ...

    def close(self, now: float) -> list[object]:
        """End the link (HDLC: DISC, LinkDown(None) on UA/DM or on timeout; wrapper: LinkDown(None))."""
        ...
