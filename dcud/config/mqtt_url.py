"""``mqtt://user:pass@host:port`` and ``mqtts://`` URLs, parsed once at load time."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from dcud.errors import DcudError


class MqttUrlError(DcudError, ValueError):
    """The URL is not an MQTT broker URL dcud can use (the message never contains the password)."""


@dataclass(frozen=True)
class MqttUrl:
    """A broker address with credentials; ``password`` is excluded from repr so it never gets logged."""

    tls: bool
    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)
    path: str = ""

    def redacted(self) -> str:
        """The URL with the password masked, for logs and status."""
        scheme = "mqtts" if self.tls else "mqtt"
        auth = f"{self.username}:***@" if self.password else (f"{self.username}@" if self.username else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}{self.path}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """Parse and validate; raise MqttUrlError naming what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MqttUrlError(f"not a valid URL ({exc})") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise MqttUrlError(f'expected mqtt:// or mqtts://, got "{parts.scheme}://"')
    if not parts.hostname:
        raise MqttUrlError("the URL has no host")
    tls = parts.scheme == "mqtts"
    return MqttUrl(
        tls=tls,
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=parts.path if parts.path not in ("", "/") else "",
    )
