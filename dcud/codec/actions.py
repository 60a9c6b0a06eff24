"""What a sans-I/O session asks its driver to do; shared by every protocol session.

One set of action types means one driver (``dcud.service.session_runner``) runs IEC 62056-21 and
M-Bus sessions alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dcud.errors import DcudError

ResultT_co = TypeVar("ResultT_co", covariant=True)


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to the line."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Drain:
    """Wait until the UART has sent everything written so far (before a baud switch)."""


@dataclass(frozen=True, slots=True)
class SetBaud:
    """Switch the line to ``baud`` (framing unchanged)."""

    baud: int


@dataclass(frozen=True, slots=True)
class SetFraming:
    """Switch the line's character framing (``"8N1"``, ``"7E1"``...), rate unchanged.

    Only the IEC 62056-21 mode E sign-on needs it: the sign-on runs at 7E1, HDLC after it at 8N1.
    The driver drains the UART before it switches, like for :class:`SetBaud`.
    """

    framing: str


@dataclass(frozen=True, slots=True)
class Flush:
    """Discard unread input (stale bytes from an earlier exchange)."""


@dataclass(frozen=True, slots=True)
class Done(Generic[ResultT_co]):
    """The session finished; ``result`` is its result object."""

    result: ResultT_co


@dataclass(frozen=True, slots=True)
class Failed:
    """The session gave up: PeerTimeout, RemoteProtocolError, NegativeResponse or a mode refusal."""

    error: DcudError


Action = Send | Drain | SetBaud | SetFraming | Flush | Done[Any] | Failed
