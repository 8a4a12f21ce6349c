"""What the server wires in: one object per process built from ``[security]``.

``SecurityLayer.from_config`` returns None when ``security.auth_required = false``: then
nothing is installed and every port behaves as before (the server logs one WARNING that
the API is open). Otherwise it holds the authenticator, the role table and the three port
adapters. :func:`check_security` refuses a configuration that asks for authentication
without the means to do it.
"""

from __future__ import annotations

from typing import Any

import grpc

from nexus_fast.config import Config, ConfigError
from nexus_fast.security.grpc_auth import AuthInterceptor
from nexus_fast.security.http_auth import http_middleware
from nexus_fast.security.identity import Authenticator
from nexus_fast.security.origins import OriginPolicy
from nexus_fast.security.permissions import Rbac
from nexus_fast.security.ws_auth import WsAuth

__all__ = ["OPEN_API_WARNING", "SecurityLayer", "check_security"]

OPEN_API_WARNING = (
    "security.auth_required = false: the API is open, anyone who reaches a port controls "
    "the fleet (development only; see docs/security.md)"
)


def check_security(config: Config) -> None:
    """Raise ConfigError (one line, naming what is missing) if auth cannot be enforced."""
    sec = config.security
    if not sec.auth_required:
        return
    missing = []
    if not sec.tls_enabled:
        missing.append("TLS (security.tls_enabled = true, tls_cert_file, tls_key_file)")
    if not (sec.jwt_secret_file or sec.jwt_public_key_file):
        missing.append("a JWT key (security.jwt_secret_file or security.jwt_public_key_file)")
    source = config.sources.get("security.auth_required", "default")
    if missing:
        raise ConfigError(
            "security.auth_required",
            True,
            "TLS and a JWT key",
            source,
            problem="needs " + " and ".join(missing),
        )
    try:
        Authenticator(sec)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "security.auth_required", True, "usable key files", source, problem=str(exc)
        ) from None


class SecurityLayer:
    """Authentication and authorisation for the gRPC, WebSocket and HTTP ports."""

    def __init__(self, config: Config) -> None:
        sec = config.security
        self.authenticator = Authenticator(sec)
        self.rbac = Rbac(sec.rbac)
        self.origins = OriginPolicy.for_server(config)
        self.ws = WsAuth(self.authenticator, self.rbac, self.origins, sec.mtls_enabled)

    @classmethod
    def from_config(cls, config: Config) -> SecurityLayer | None:
        """The layer, or None when ``security.auth_required`` is off."""
        if not config.security.auth_required:
            return None
        check_security(config)
        return cls(config)

    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """For ``grpc.aio.server(interceptors=...)``."""
        return [AuthInterceptor(self.authenticator, self.rbac)]

    def http_middlewares(self) -> list[Any]:
        """For the aiohttp application, inside its error/metrics middleware."""
        return [http_middleware(self.authenticator, self.rbac, self.origins)]
