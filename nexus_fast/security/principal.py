"""The principal (who is calling) and the two refusals, shared by every security module."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PermissionDenied", "Principal", "Unauthenticated"]


class Unauthenticated(Exception):
    """No credential, or one that does not verify (gRPC UNAUTHENTICATED, HTTP 401)."""


class PermissionDenied(Exception):
    """A known principal may not do this (gRPC PERMISSION_DENIED, HTTP 403)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    Attributes:
        name: certificate CN or token ``sub`` (``node:<id>`` for node tokens).
        role: ``admin``, ``operator``, ``viewer``, ``node`` or a configured role.
        method: ``"cert"`` or ``"token"``.
        node_id: the node this principal is, for node principals; None otherwise.
        expires_at: unix seconds after which the credential is void (tokens), or None.
    """

    name: str
    role: str
    method: str
    node_id: str | None = None
    expires_at: float | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.role}, {self.method})"
