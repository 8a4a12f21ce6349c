"""What the server wires in: one object per process built from ``[security]``.

``SecurityLayer.from_config`` returns None when ``security.auth_required = false`` and
``[security.limits]`` is off: then nothing is installed and every port behaves as before
(the server logs one WARNING that the API is open). With authentication it holds the
authenticator, the role table and the three port adapters; with limits enabled, the
:class:`~nexus_fast.security.limits.PrincipalLimits` they all charge (with authentication
off, every caller is the one anonymous principal and only the limits are installed). :func:`check_security` refuses a configuration that asks for authentication
without the means to do it.
"""

from __future__ import annotations

from typing import Any

import grpc

from nexus_fast.api.ws_server import Admit, Connection, OnMessage
from nexus_fast.config import Config, ConfigError
from nexus_fast.security.grpc_auth import AuthInterceptor, LimitsInterceptor
from nexus_fast.security.http_auth import http_middleware, limits_middleware
from nexus_fast.security.identity import Authenticator
from nexus_fast.security.limits import NodeSlotRelease, PrincipalLimits
from nexus_fast.security.origins import OriginPolicy
from nexus_fast.security.permissions import Rbac
from nexus_fast.security.ws_auth import WsAuth
from nexus_fast.security.ws_limits import WsLimits

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
    """Authentication, authorisation and limits for the gRPC, WebSocket and HTTP ports."""

    def __init__(self, config: Config) -> None:
        sec = config.security
        self.authenticating = sec.auth_required
        """False in the limits-only layer (authentication off, limits on)."""
        self.limits = PrincipalLimits(sec.limits) if sec.limits.enabled else None
        self.authenticator: Authenticator | None = None
        self.rbac: Rbac | None = None
        self.ws: WsAuth | None = None
        if sec.auth_required:
            self.authenticator = Authenticator(sec)
            self.rbac = Rbac(sec.rbac)
            self.origins = OriginPolicy.for_server(config)
            self.ws = WsAuth(self.authenticator, self.rbac, self.origins, sec.mtls_enabled)
        self._ws_limits = WsLimits(self.limits) if self.limits is not None else None

    @classmethod
    def from_config(cls, config: Config) -> SecurityLayer | None:
        """The layer, or None when authentication and limits are both off."""
        sec = config.security
        if not sec.auth_required and not sec.limits.enabled:
            return None
        check_security(config)
        return cls(config)

    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """For ``grpc.aio.server(interceptors=...)``."""
        if self.authenticator is not None and self.rbac is not None:
            return [AuthInterceptor(self.authenticator, self.rbac, self.limits)]
        return [LimitsInterceptor(self.limits)] if self.limits is not None else []

    def http_middlewares(self) -> list[Any]:
        """For the aiohttp application, inside its error/metrics middleware."""
        if self.authenticator is not None and self.rbac is not None:
            return [http_middleware(self.authenticator, self.rbac, self.origins, self.limits)]
        return [limits_middleware(self.limits)] if self.limits is not None else []

    @property
    def ws_admit(self) -> Admit | None:
        """The WebSocket upgrade check (None without authentication)."""
        return self.ws.admit if self.ws is not None else None

    def ws_on_connect(self, conn: Connection) -> None:
        """``on_connect`` of the WebSocket server: name the principal, hold its slot."""
        if self.ws is not None:
            self.ws.on_connect(conn)
        if self._ws_limits is not None:
            self._ws_limits.on_connect(conn)

    def ws_guard(self, on_message: OnMessage) -> OnMessage:
        """The WebSocket op handler behind the limits and the per-op permission check."""
        guarded = self.ws.guard(on_message) if self.ws is not None else on_message
        return self._ws_limits.guard(guarded) if self._ws_limits is not None else guarded

    def node_listeners(self) -> list[NodeSlotRelease]:
        """For ``NodeRegistry.listeners``: release a node's slot when the node is gone."""
        return [NodeSlotRelease(self.limits)] if self.limits is not None else []
