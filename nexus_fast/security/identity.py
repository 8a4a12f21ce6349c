"""Who is calling: the :class:`Principal` and the :class:`Authenticator` that finds it.

A principal comes from one of two credentials:

- a client certificate verified by the TLS handshake against ``security.tls_ca_file``:
  subject CN = the name, O = the role (``nexus-node``, ``nexus-operator``, ``nexus-viewer``,
  ``nexus-admin``); a node certificate's CN is its node id;
- a JWT bearer token (see :mod:`nexus_fast.security.tokens`): claims ``sub`` and ``role``;
  a node token has ``sub = "node:<id>"`` and ``role = "node"``.

A bearer token, when present, wins over the certificate (a service behind a TLS-terminating
proxy presents the proxy's certificate). An invalid token is refused even when a valid
certificate is present: a client that sends a token means to be that token.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from nexus_fast.config import SecurityConfig
from nexus_fast.security.principal import PermissionDenied, Principal, Unauthenticated
from nexus_fast.security.tokens import TokenVerifier

__all__ = [
    "CERT_ROLES",
    "NODE_SUB_PREFIX",
    "ROLE_ADMIN",
    "ROLE_NODE",
    "ROLE_OPERATOR",
    "ROLE_VIEWER",
    "Authenticator",
    "PermissionDenied",
    "Principal",
    "Unauthenticated",
    "bearer_token",
]

ROLE_ADMIN: Final = "admin"
ROLE_OPERATOR: Final = "operator"
ROLE_VIEWER: Final = "viewer"
ROLE_NODE: Final = "node"
NODE_SUB_PREFIX: Final = "node:"
# Certificate subject O -> role.
CERT_ROLES: Final[Mapping[str, str]] = {
    "nexus-admin": ROLE_ADMIN,
    "nexus-operator": ROLE_OPERATOR,
    "nexus-viewer": ROLE_VIEWER,
    "nexus-node": ROLE_NODE,
    "nexus-replica": "replica",  # another replica of the cluster (docs/cluster.md)
}
_CERT_CACHE_SIZE: Final = 1024


def _node_principal(name: str, node_id: str, method: str, expires: float | None) -> Principal:
    if not node_id:
        raise Unauthenticated("node credential names no node id")
    return Principal(name, ROLE_NODE, method, node_id, expires)


class Authenticator:
    """Turns credentials into principals. Safe to share; everything is cached and bounded."""

    def __init__(self, config: SecurityConfig) -> None:
        self.config = config
        self.default_role = config.rbac.default_role
        self.tokens: TokenVerifier | None = None
        if config.jwt_secret_file or config.jwt_public_key_file:
            self.tokens = TokenVerifier(config)
        self._certs: collections.OrderedDict[bytes, Principal] = collections.OrderedDict()
        self._lock = threading.Lock()

    # --- tokens ---------------------------------------------------------------------

    def from_token(self, token: str) -> Principal:
        """The principal of a bearer token; raises :class:`Unauthenticated`."""
        if self.tokens is None:
            raise Unauthenticated("bearer tokens are not accepted (no JWT key configured)")
        return self.tokens.verify(token, self._token_principal)

    def _token_principal(self, claims: Mapping[str, Any]) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("token has no 'sub' claim")
        role = claims.get("role", self.default_role) or self.default_role
        if not isinstance(role, str) or not role:
            raise Unauthenticated("token has no 'role' claim and no default role is set")
        exp = claims.get("exp")
        expires = float(exp) if isinstance(exp, int | float) else None
        if role == ROLE_NODE or sub.startswith(NODE_SUB_PREFIX):
            # Either half alone would let a token pass as a node it is not meant to be.
            if role != ROLE_NODE or not sub.startswith(NODE_SUB_PREFIX):
                raise Unauthenticated("a node token needs sub 'node:<id>' and role 'node'")
            return _node_principal(sub, sub[len(NODE_SUB_PREFIX) :], "token", expires)
        return Principal(sub, role, "token", None, expires)

    # --- certificates ---------------------------------------------------------------

    def from_pem(self, pem: bytes) -> Principal:
        """The principal named by a verified client certificate (PEM, as gRPC gives it)."""
        with self._lock:
            hit = self._certs.get(pem)
            if hit is not None:
                self._certs.move_to_end(pem)
                return hit
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise Unauthenticated("unreadable client certificate") from None
        subject = cert.subject
        cn = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        org = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        principal = self._cert_principal(
            [v for v in cn if isinstance(v, str)], [v for v in org if isinstance(v, str)]
        )
        with self._lock:
            self._certs[pem] = principal
            while len(self._certs) > _CERT_CACHE_SIZE:
                self._certs.popitem(last=False)
        return principal

    def from_peercert(self, peercert: Mapping[str, Any] | None) -> Principal:
        """The principal of ``SSLObject.getpeercert()`` (WSS and HTTPS)."""
        if not peercert:
            raise Unauthenticated("no credentials: send a bearer token or a client certificate")
        cn: list[str] = []
        org: list[str] = []
        for rdn in peercert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn.append(value)
                elif key == "organizationName":
                    org.append(value)
        return self._cert_principal(cn, org)

    def _cert_principal(self, cn: Sequence[str], org: Sequence[str]) -> Principal:
        if len(cn) != 1 or not cn[0]:
            raise Unauthenticated("client certificate needs exactly one subject CN")
        roles = {CERT_ROLES[o] for o in org if o in CERT_ROLES}
        if len(roles) > 1:
            raise Unauthenticated("client certificate names more than one nexus role")
        name = cn[0]
        if roles == {ROLE_NODE}:
            return _node_principal(name, name, "cert", None)
        role = roles.pop() if roles else self.default_role
        if not role:
            raise Unauthenticated(
                "client certificate names no role (subject O nexus-admin, nexus-operator, "
                "nexus-viewer or nexus-node) and no default role is set"
            )
        if role == ROLE_NODE:
            # default_role = "node" still needs the CN as the node id.
            return _node_principal(name, name, "cert", None)
        return Principal(name, role, "cert")

    # --- either -----------------------------------------------------------------------

    def authenticate(
        self,
        authorization: str | None,
        *,
        pem: bytes | None = None,
        peercert: Mapping[str, Any] | None = None,
    ) -> Principal:
        """Bearer token from an ``Authorization`` value if given, else the certificate."""
        if authorization:
            return self.from_token(bearer_token(authorization))
        if pem:
            return self.from_pem(pem)
        return self.from_peercert(peercert)


def bearer_token(authorization: str) -> str:
    """The token of ``Bearer <token>``; raises :class:`Unauthenticated` for other schemes."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    return token
