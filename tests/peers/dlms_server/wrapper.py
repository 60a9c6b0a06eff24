"""The TCP wrapper (IEC 62056-47): version 1, source and destination wPorts, length, APDU."""

from __future__ import annotations

from collections.abc import Callable

from .application import Association, Record

HEADER = 8
MAX_APDU = 0xFFFF


class WrapperError(ValueError):
    """The byte stream is not the wrapper protocol: the connection is dropped."""


class WrapperLink:
    """The meter's side of one TCP connection; one association per client SAP on it."""

    def __init__(
        self,
        logical_device: int,
        known_saps: set[int],
        open_association: Callable[[int, str], Association],
        log: Callable[[Record], None],
        is_silent: Callable[[], bool],
        link_id: str,
    ) -> None:
        self.logical_device = logical_device
        self.known_saps = known_saps
        self.open_association = open_association
        self.log = log
        self.is_silent = is_silent
        self.link_id = link_id
        self.buffer = bytearray()
        self.associations: dict[int, Association] = {}

    def feed(self, data: bytes) -> list[bytes]:
        """Bytes from the socket in; wrapper frames out. Raises WrapperError on a foreign protocol."""
        self.buffer += data
        out = []
        while len(self.buffer) >= HEADER:
            version = int.from_bytes(self.buffer[0:2], "big")
            source = int.from_bytes(self.buffer[2:4], "big")
            dest = int.from_bytes(self.buffer[4:6], "big")
            length = int.from_bytes(self.buffer[6:8], "big")
            if version != 1:
                raise WrapperError(f"wrapper version {version}")
            if len(self.buffer) < HEADER + length:
                break
            apdu = bytes(self.buffer[HEADER : HEADER + length])
            del self.buffer[: HEADER + length]
            answer = self._apdu(source, dest, apdu)
            if answer is not None:
                header = (1).to_bytes(2, "big") + dest.to_bytes(2, "big") + source.to_bytes(2, "big")
                out.append(header + len(answer).to_bytes(2, "big") + answer)
        return out

    def _apdu(self, source: int, dest: int, apdu: bytes) -> bytes | None:
        if dest != self.logical_device:
            self.log({"kind": "foreign_frame", "transport": "tcp", "link": self.link_id, "dest": dest})
            return None
        if source not in self.known_saps:
            self.log(
                {"kind": "unknown_client", "transport": "tcp", "link": self.link_id, "client_sap": source}
            )
            return None
        if self.is_silent():
            self.log({"kind": "dropped", "transport": "tcp", "link": self.link_id, "client_sap": source})
            return None
        association = self.associations.get(source)
        if association is None:
            association = self.open_association(source, f"{self.link_id}/{source}")
            self.associations[source] = association
        return association.handle(apdu)

    def close(self, why: str) -> None:
        """The connection went away: every association on it ends."""
        for association in self.associations.values():
            association.close(why)
        self.associations.clear()
