"""structlog set-up: JSON lines when not on a terminal (journald), a readable console on a terminal.

Secrets never reach a log line: a processor masks them, as a last line of defence behind the rule that
code never passes a secret to a logger in the first place. What it masks (:func:`mask_value`):

- the value of every key that names a secret, at any depth (dicts and other mappings, lists, tuples,
  sets: the ``changed`` map of a ``config_changed`` event, a request body, a nested event payload).
  A key names a secret when it is a secret WM-E parameter (``snmp_user``, ``fw_server_key``,
  ``ei_client_pass``... from the catalogue's ``secret`` flag), or when one of its words (split at
  ``_ . -`` and camelCase) is a secret word (:data:`SECRET_WORDS`: password, pass, passphrase, secret,
  token, psk, pin, community, credential(s), cookie, authorization, apikey...), or when its last word
  is ``key``/``keys`` after another word (``auth_key``, ``block_cipher_key``; a bare ``key`` names a
  configuration key and stays). ``None``, ``""`` and booleans are left as they are;
- the password of every URL in any string (``mqtt://user:pw@host`` -> ``mqtt://user:***@host``),
  including the event text, exception texts and stdlib log records (aiomqtt, pysnmp);
- structures nested deeper than :data:`MAX_DEPTH` are replaced by ``"<too deep>"`` (a hostile,
  deeply nested value must not make the log call itself fail).

The caller's objects are never changed: masked containers are copies.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

import structlog

from dcud.config.wme_catalogue import ENTRIES

MASK: Final = "***"
MAX_DEPTH: Final = 16
"""Nesting levels the masker walks; anything deeper is replaced, never logged unmasked."""

SECRET_WORDS: Final = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "passphrase",
        "pwd",
        "secret",
        "secrets",
        "token",
        "tokens",
        "psk",
        "pin",
        "community",
        "credential",
        "credentials",
        "cookie",
        "authorization",
        "apikey",
    }
)
"""A key containing one of these words (as a word, not a substring: ``ping`` is not ``pin``) is secret."""

SECRET_PARAMETERS: Final = frozenset(e.name.lower() for e in ENTRIES if e.secret)
"""The WM-E parameters flagged secret in the catalogue (``snmp_user`` among them)."""

_URL_PARAMETERS: Final = frozenset(e.name.lower() for e in ENTRIES if e.secret and e.kind == "url")
_WORD_RE: Final = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_URL_PASSWORD_RE: Final = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/@]*@")


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(key)]


def is_secret_key(key: str) -> bool:
    """Whether the value of ``key`` must never be logged (module doc)."""
    lowered = key.lower()
    if lowered in SECRET_PARAMETERS:
        return True
    words = _words(key)
    if any(w in SECRET_WORDS for w in words):
        return True
    return len(words) > 1 and words[-1] in ("key", "keys")


def mask_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL replaced by ``***``."""
    if "://" not in text:
        return text
    return _URL_PASSWORD_RE.sub(lambda m: f"{m.group('head')}{MASK}@", text)


def _mask_secret_value(key: str, value: Any) -> Any:
    if value is None or value == "" or isinstance(value, bool):
        return value
    if key.lower() in _URL_PARAMETERS and isinstance(value, str) and "://" in value:
        return mask_text(value)  # a push URL: only its password part is secret
    return MASK


def mask_value(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with every secret masked (module doc); scalars other than str pass unchanged."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, int | float | bytes | bytearray) or value is None:
        return value
    if depth >= MAX_DEPTH:
        if isinstance(value, Mapping | list | tuple | set | frozenset):
            return "<too deep>"
        return value
    if isinstance(value, Mapping):
        return {
            key: (
                _mask_secret_value(key, item)
                if isinstance(key, str) and is_secret_key(key)
                else mask_value(item, depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [mask_value(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(mask_value(item, depth + 1) for item in value)
    if isinstance(value, set | frozenset):
        return [mask_value(item, depth + 1) for item in value]
    return value


def _mask_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        value = event[key]
        if is_secret_key(key):
            event[key] = _mask_secret_value(key, value)
        else:
            event[key] = mask_value(value, 1)
    return event


class _StdlibSecretFilter(logging.Filter):
    """Masks URL passwords in records of libraries that log through stdlib ``logging``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not silence its record
            return True
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once for the process.

    ``json=None`` picks JSON when stderr is not a terminal (systemd captures stderr into journald).
    """
    use_json = (not sys.stderr.isatty()) if json is None else json
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        # Render the traceback first, so that the masker sees (and cleans) its text too.
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared += [_mask_secrets, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (aiomqtt, pysnmp, canopen) log through stdlib logging: route it to stderr at WARNING+.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _StdlibSecretFilter) for f in handler.filters):
            handler.addFilter(_StdlibSecretFilter())
