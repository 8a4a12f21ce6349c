"""The one permission table and role-based access control over it.

Every gRPC method, WebSocket op and HTTP route names the permission it needs
(``resource.verb``); anything not in the table is denied. ``public`` means no credential
is needed (liveness and readiness probes). ``node.self`` is NodeService for the caller's
own node id only: the interceptor and ``NodeService.Connect`` compare the request's
node id with the principal's (Kubernetes' NodeRestriction, here).

Roles grant permission patterns: ``*``, ``node.*`` (every verb of a resource) and
``*.read`` (one verb of every resource). Built in: ``admin`` (``*``), ``operator``
(commands, agents, node drain and eligibility, every read but the audit log), ``viewer``
(those reads but the configuration), ``node`` (``node.self`` only, whatever the
configuration says).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from nexus_fast.security.identity import ROLE_ADMIN, ROLE_NODE, Principal
from nexus_fast.security.rbac import RbacConfig

__all__ = [
    "ALL_PERMISSIONS",
    "BUILTIN_ROLES",
    "CLUSTER_RELAY",
    "CLUSTER_SNAPSHOT",
    "GRPC_METHODS",
    "HTTP_ROUTES",
    "NODE_SELF",
    "PUBLIC",
    "REPLICA_FORWARD",
    "ROLE_REPLICA",
    "WS_OPS",
    "Rbac",
    "matches",
]

PUBLIC: Final = "public"
NODE_SELF: Final = "node.self"
ROLE_REPLICA: Final = "replica"
"""Another replica of the cluster (certificate O = nexus-replica, or a token)."""
CLUSTER_RELAY: Final = "cluster.relay"
"""Relaying node streams from a follower to the leader (ReplicaService.Relay). The leader
trusts the node identity a relay names, so it is held by the replica role and by admin
(who holds ``node.self`` anyway) only: never configurable, never implied by "rbac off"."""
CLUSTER_SNAPSHOT: Final = "cluster.snapshot"
"""A copy of the whole store (ReplicaService.FetchSnapshot: every record, the audit log):
held by the replica role and admin only, never configurable, never implied by "rbac off"."""
REPLICA_FORWARD: Final = "cluster.forward"
"""Held by the replica role only: may act on behalf of the principal a follower names."""

_NODE: Final = "/nexus.fabric.v1.NodeService/"
_CONTROL: Final = "/nexus.fabric.v1.ControlService/"
_REPLICA: Final = "/nexus.cluster.v1.ReplicaService/"

GRPC_METHODS: Final[Mapping[str, str]] = MappingProxyType(
    {
        _NODE + "Register": NODE_SELF,
        _NODE + "Connect": NODE_SELF,
        _NODE + "Deregister": NODE_SELF,
        _CONTROL + "WatchEvents": "event.read",
        _CONTROL + "ListNodes": "node.read",
        _CONTROL + "GetNode": "node.read",
        _CONTROL + "DrainNode": "node.drain",
        _CONTROL + "SetNodeEligibility": "node.eligibility",
        _CONTROL + "RemoveNode": "node.write",
        _CONTROL + "SubmitCommands": "command.write",
        _CONTROL + "GetCommand": "command.read",
        _CONTROL + "ListCommands": "command.read",
        _CONTROL + "CancelCommand": "command.write",
        _CONTROL + "WaitCommands": "command.read",
        _CONTROL + "DeployAgent": "agent.write",
        _CONTROL + "ListAgents": "agent.read",
        _CONTROL + "GetAgent": "agent.read",
        _CONTROL + "StopAgent": "agent.write",
        _CONTROL + "ListAudit": "audit.read",
        _CONTROL + "SetFailpoints": "failpoint.write",  # fault injection: admin only
        _CONTROL + "ListFailpoints": "failpoint.read",
        _REPLICA + "Relay": CLUSTER_RELAY,  # follower -> leader node streams: replicas only
        _CONTROL + "GetClusterStatus": "cluster.read",
        _REPLICA + "FetchSnapshot": CLUSTER_SNAPSHOT,  # bootstrap: replicas, admin
        # Load balancers and orchestrators probe without credentials (TLS still applies).
        "/grpc.health.v1.Health/Check": PUBLIC,
        "/grpc.health.v1.Health/Watch": PUBLIC,
        "/grpc.health.v1.Health/List": "health.read",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "reflection.read",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "reflection.read",
    }
)
"""gRPC method full name -> permission."""

WS_OPS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "ping": PUBLIC,  # answered by the framing layer on an authenticated connection
        "subscribe": "event.read",
        "unsubscribe": "event.read",
        "submit": "command.write",
    }
)
"""WebSocket op -> permission (the upgrade itself needs an authenticated principal)."""

HTTP_ROUTES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "/live": PUBLIC,
        "/ready": PUBLIC,
        "/health": PUBLIC,
        "/health/detailed": "health.read",
        "/metrics": "metrics.read",
        "/api/v1/metrics": "metrics.read",
        "/api/v1/metrics/database": "metrics.read",
        "/api/v1/metrics/performance": "metrics.read",
        "/api/v1/nodes": "node.read",
        "/api/v1/nodes/{node_id}": "node.read",
        "/api/v1/commands/{command_id}": "command.read",
        "/api/v1/agents": "agent.read",
        "/api/v1/events": "event.read",
        "/api/v1/events/stream": "event.read",
        # The effective configuration, secrets redacted: no viewer needs ports and paths.
        "/api/v1/config": "config.read",
        # A static page with no data in it; the calls it makes are authorised one by one.
        "/": PUBLIC,
        "/dashboard": PUBLIC,
        "/dashboard/{asset}": PUBLIC,  # the page's script and stylesheet
    }
)
"""HTTP route template (aiohttp ``resource.canonical``) -> permission."""

ALL_PERMISSIONS: Final = frozenset(
    {*GRPC_METHODS.values(), *WS_OPS.values(), *HTTP_ROUTES.values(), REPLICA_FORWARD} - {PUBLIC}
)

_READS: Final = (
    "node.read",
    "command.read",
    "agent.read",
    "event.read",
    "health.read",
    "metrics.read",
    "reflection.read",
    "cluster.read",
)
BUILTIN_ROLES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        ROLE_ADMIN: ("*",),
        "operator": (
            "command.*",
            "agent.*",
            "node.drain",
            "node.eligibility",
            "config.read",
            *_READS,
        ),
        "viewer": _READS,
        ROLE_NODE: (NODE_SELF,),
        # Another replica of the cluster: it forwards calls to the leader on behalf of the
        # principal that made them (grpc_auth accepts the on-behalf-of header from this role
        # only, whatever the configuration gives other roles).
        ROLE_REPLICA: (REPLICA_FORWARD, CLUSTER_RELAY, CLUSTER_SNAPSHOT, "cluster.read"),
    }
)


def matches(pattern: str, permission: str) -> bool:
    """``*``, ``resource.*``, ``*.verb`` or an exact ``resource.verb``."""
    if pattern == "*" or pattern == permission:
        return True
    resource, _, verb = permission.partition(".")
    p_resource, _, p_verb = pattern.partition(".")
    return (p_resource in ("*", resource)) and (p_verb in ("*", verb))


class Rbac:
    """Role -> granted permissions, expanded once so a check is one set lookup."""

    def __init__(self, config: RbacConfig) -> None:
        self.reconfigure(config)

    def reconfigure(self, config: RbacConfig) -> None:
        """Expand ``config``'s roles; checks made after this use them (hot reload)."""
        self.enabled = config.enabled
        patterns = dict(BUILTIN_ROLES)
        for role in config.roles:
            patterns[role.name] = role.permissions
        # The fixed roles cannot be configured away (config.py refuses to redefine them).
        patterns[ROLE_ADMIN] = BUILTIN_ROLES[ROLE_ADMIN]
        patterns[ROLE_NODE] = BUILTIN_ROLES[ROLE_NODE]
        patterns[ROLE_REPLICA] = BUILTIN_ROLES[ROLE_REPLICA]
        roles: dict[str, frozenset[str]] = {}
        for name, granted in patterns.items():
            perms = {p for p in ALL_PERMISSIONS if any(matches(g, p) for g in granted)}
            if name not in (ROLE_ADMIN, ROLE_NODE):
                # node.self is the node role's alone: an operator is no node.
                perms.discard(NODE_SELF)
            if name != ROLE_REPLICA:
                perms.discard(REPLICA_FORWARD)  # not even admin speaks for others
            roles[name] = frozenset(perms)
        self.roles = roles  # one assignment: a check never sees half a table
        self._unchecked = frozenset(
            ALL_PERMISSIONS - {NODE_SELF, REPLICA_FORWARD, CLUSTER_RELAY, CLUSTER_SNAPSHOT}
        )

    def allows(self, principal: Principal, permission: str | None) -> bool:
        """True when ``principal`` holds ``permission``; None (not in the table) is denied."""
        if permission is None:
            return False
        if permission == PUBLIC:
            return True
        if permission in (CLUSTER_RELAY, CLUSTER_SNAPSHOT):  # node identities; the whole store
            return principal.role in (ROLE_ADMIN, ROLE_REPLICA)
        if permission == REPLICA_FORWARD:  # speaking for others: replicas only, always
            return principal.role == ROLE_REPLICA
        if principal.role == ROLE_NODE:
            # Nodes act only as themselves, with or without RBAC.
            return permission == NODE_SELF
        if not self.enabled:
            return permission in self._unchecked or principal.role == ROLE_ADMIN
        granted = self.roles.get(principal.role)
        return granted is not None and permission in granted
