"""The DcudError tree (design.md section 8).

Codecs raise and never log; services log once per state change. Only ``dcud.__main__`` turns these
into exit codes (``ConfigError`` is 78, everything else 1).
"""

from __future__ import annotations

from dataclasses import dataclass


class DcudError(Exception):
    """Base of every error dcud raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One configuration problem, pointing at a file, a line (0 when unknown) and a key path."""

    path: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(DcudError):
    """Bad configuration: carries every issue found, not just the first (exit 78)."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    @classmethod
    def single(cls, path: str, line: int, key: str, message: str) -> ConfigError:
        """Build a ConfigError with one issue."""
        return cls([ConfigIssue(path, line, key, message)])

    @property
    def path(self) -> str:
        """File of the first issue."""
        return self.issues[0].path

    @property
    def line(self) -> int:
        """Line of the first issue (0 when the file has no lines or it is unknown)."""
        return self.issues[0].line

    @property
    def key(self) -> str:
        """Key path of the first issue."""
        return self.issues[0].key


class ProtocolError(DcudError):
    """A protocol rule was broken; raised by ``dcud.codec`` only."""


class LocalProtocolError(ProtocolError):
    """We asked the codec for something illegal (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent garbage: checksum, framing, sequence. ``frame`` holds the offending bytes."""

    def __init__(self, message: str, frame: bytes = b"") -> None:
        super().__init__(message)
        self.frame = bytes(frame)


class NegativeResponse(DcudError):
    """A well-formed refusal from the peer (SDO abort, M-Bus application error, IEC error message)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{text} (code 0x{code:X})")
        self.code = code
        self.text = text


class PeerTimeout(DcudError, TimeoutError):
    """No answer within the protocol's deadline."""


class TransportError(DcudError):
    """tty, socket or CAN failure; the original OSError is kept as ``__cause__``."""


class ServiceFailed(DcudError):
    """The supervisor's restart budget for a service is spent."""

    def __init__(self, service: str, message: str = "") -> None:
        super().__init__(f"service {service} failed: {message}" if message else f"service {service} failed")
        self.service = service


class RestartRequested(DcudError):
    """dcud stopped cleanly on purpose to be started again (daily restart): exit 75, which the
    systemd unit lists in ``RestartForceExitStatus=`` and ``SuccessExitStatus=``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
