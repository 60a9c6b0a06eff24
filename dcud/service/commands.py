"""Remote commands (``<p>/cmd/<verb>``) and their replies, independent of the MQTT client.

A handler takes the request's JSON object and returns a JSON object, or raises a DcudError whose type
and message become the error reply. Services register their verbs (``drive/enable``, ``param/set``...).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from dcud.errors import DcudError

Handler = Callable[[Mapping[str, Any]], Awaitable[Mapping[str, Any]]]

log = structlog.get_logger("dcud.commands")

MAX_REQUEST_BYTES = 64 * 1024


class CommandRouter:
    """Maps verbs to handlers and turns requests into reply documents."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, verb: str, handler: Handler) -> None:
        """Serve ``verb``; a second registration replaces the first (used on reload)."""
        self._handlers[verb] = handler

    def unregister(self, verb: str) -> None:
        """Stop serving ``verb``."""
        self._handlers.pop(verb, None)

    def verbs(self) -> list[str]:
        """Registered verbs, sorted."""
        return sorted(self._handlers)

    async def dispatch(self, verb: str, payload: bytes, source: str = "mqtt") -> dict[str, Any]:
        """Run one request; always returns a reply document, never raises for bad input."""
        request_id: Any = None
        try:
            if len(payload) > MAX_REQUEST_BYTES:
                raise CommandError(f"request larger than {MAX_REQUEST_BYTES} bytes")
            request: Any = json.loads(payload) if payload.strip() else {}
            if not isinstance(request, dict):
                raise CommandError("request must be a JSON object")
            request_id = request.get("id")
            handler = self._handlers.get(verb)
            if handler is None:
                raise CommandError(f'unknown command "{verb}"; known: {", ".join(self.verbs())}')
            log.info("command", verb=verb, source=source, id=request_id)
            result = await handler(request)
        except (DcudError, ValueError) as exc:
            kind = type(exc).__name__ if isinstance(exc, DcudError) else "CommandError"
            log.warning("command refused", verb=verb, source=source, error=str(exc))
            return {"id": request_id, "ok": False, "error": {"type": kind, "message": str(exc)}}
        return {"id": request_id, "ok": True, "result": dict(result)}

    def busy_reply(self, payload: bytes, why: str) -> dict[str, Any]:
        """The reply to a request refused before it ran (too many commands in progress)."""
        request_id: Any = None
        try:
            request = json.loads(payload) if len(payload) <= MAX_REQUEST_BYTES else None
            if isinstance(request, dict):
                request_id = request.get("id")
        except ValueError:
            pass
        return {"id": request_id, "ok": False, "error": {"type": "Busy", "message": why}}


class CommandError(DcudError):
    """A request that cannot be served as asked (unknown verb, bad arguments, refused by policy)."""
