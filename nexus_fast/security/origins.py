"""Browser checks shared by the WebSocket upgrade and the HTTP middleware.

``Origin`` is compared with ``security.allowed_origins`` (default: this server's own HTTP
and WebSocket host:port) so a web page elsewhere cannot drive the API with a user's
credentials; ``Host`` with ``security.allowed_hosts`` (when set) against DNS rebinding.
A request without ``Origin`` is not from a browser's cross-origin context and passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from nexus_fast.config import Config

__all__ = ["OriginPolicy"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _netloc(value: str) -> str:
    """``https://Host:8082/x`` or ``host:8082`` -> ``host:8082`` (lower case)."""
    value = value.strip().lower()
    if "://" in value:
        return urlsplit(value).netloc
    return value.split("/", 1)[0]


class OriginPolicy:
    """Which Origin and Host header values this server answers."""

    def __init__(self, origins: Iterable[str], hosts: Iterable[str] = ()) -> None:
        self.origins = frozenset(_netloc(o) for o in origins)
        self.hosts = frozenset(h.strip().lower() for h in hosts)

    @classmethod
    def for_server(cls, config: Config) -> OriginPolicy:
        """From ``security.allowed_origins`` / ``allowed_hosts``, or this server's ports."""
        sec, srv = config.security, config.server
        origins: list[str] = list(sec.allowed_origins)
        if not origins:
            names = [srv.host]
            if srv.host in _LOOPBACK or srv.host in ("0.0.0.0", "::"):
                names += ["127.0.0.1", "localhost"]
            origins = [f"{n}:{p}" for n in names for p in (srv.http_port, srv.websocket_port)]
        return cls(origins, sec.allowed_hosts)

    def origin_allowed(self, origin: str | None) -> bool:
        """True for no Origin header or one whose host:port is allowed."""
        if origin is None:
            return True
        return _netloc(origin) in self.origins

    def host_allowed(self, host: str | None) -> bool:
        """True when no allow-list is set, or the Host (with or without port) is on it."""
        if not self.hosts:
            return True
        if not host:
            return False
        host = host.strip().lower()
        return host in self.hosts or host.rsplit(":", 1)[0] in self.hosts
