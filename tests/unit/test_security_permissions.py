"""The permission table names every method, op and route; roles grant what docs say."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from nexus_fast.api import ws_events, ws_server
from nexus_fast.api.http_server import HttpServer
from nexus_fast.config import EventsConfig, RbacConfig, RoleConfig
from nexus_fast.core.events import EventBus
from nexus_fast.pb import cluster_pb2, fabric_pb2
from nexus_fast.security.identity import Principal
from nexus_fast.security.permissions import (
    ALL_PERMISSIONS,
    CLUSTER_RELAY,
    CLUSTER_SNAPSHOT,
    GRPC_METHODS,
    HTTP_ROUTES,
    NODE_SELF,
    PUBLIC,
    ROLE_REPLICA,
    WS_OPS,
    Rbac,
    matches,
)


def _methods(descriptor: Any) -> list[str]:
    return [
        f"/{service.full_name}/{method.name}"
        for service in descriptor.services_by_name.values()
        for method in service.methods
    ]


def test_every_grpc_method_has_a_permission() -> None:
    methods = (
        _methods(fabric_pb2.DESCRIPTOR)
        + _methods(cluster_pb2.DESCRIPTOR)
        + _methods(health_pb2.DESCRIPTOR)
        + _methods(reflection_pb2.DESCRIPTOR)
    )
    assert len(methods) > 20
    missing = [m for m in methods if m not in GRPC_METHODS]
    assert not missing, f"methods without a permission in GRPC_METHODS: {missing}"


def test_every_websocket_op_has_a_permission() -> None:
    source = inspect.getsource(ws_events) + inspect.getsource(ws_server)
    ops = set(re.findall(r'op == "(\w+)"', source))
    assert {"ping", "subscribe", "unsubscribe", "submit"} <= ops
    missing = ops - set(WS_OPS)
    assert not missing, f"WebSocket ops without a permission in WS_OPS: {missing}"


def test_every_http_route_has_a_permission() -> None:
    bus = EventBus(None, EventsConfig(), 16)  # type: ignore[arg-type]  # routes only, never read
    app = HttpServer("127.0.0.1", 0, backend=None, events=bus)._build_app()  # type: ignore[arg-type]
    routes = {resource.canonical for resource in app.router.resources()}
    assert "/api/v1/nodes/{node_id}" in routes
    missing = routes - set(HTTP_ROUTES)
    assert not missing, f"HTTP routes without a permission in HTTP_ROUTES: {missing}"


def test_only_probes_and_static_pages_are_public() -> None:
    public = {
        k for table in (GRPC_METHODS, WS_OPS, HTTP_ROUTES) for k, v in table.items() if v == PUBLIC
    }
    assert public == {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "ping",
        "/live",
        "/ready",
        "/health",
        "/",
        "/dashboard",
        "/dashboard/{asset}",
    }


def _who(role: str, node_id: str | None = None) -> Principal:
    return Principal(f"{role}-1", role, "token", node_id)


ADMIN, OPERATOR, VIEWER = _who("admin"), _who("operator"), _who("viewer")
NODE = _who("node", "n1")


@pytest.mark.parametrize(
    ("principal", "permission", "allowed"),
    [
        (ADMIN, "node.write", True),
        (ADMIN, "audit.read", True),
        (OPERATOR, "command.write", True),
        (OPERATOR, "agent.write", True),
        (OPERATOR, "node.drain", True),
        (OPERATOR, "node.eligibility", True),
        (OPERATOR, "node.read", True),
        (OPERATOR, "node.write", False),  # RemoveNode is admin-only
        (OPERATOR, "audit.read", False),
        (OPERATOR, NODE_SELF, False),  # an operator is no node
        (VIEWER, "event.read", True),
        (VIEWER, "metrics.read", True),
        (VIEWER, "command.write", False),
        (VIEWER, "node.drain", False),
        (NODE, NODE_SELF, True),
        (NODE, "node.read", False),
        (NODE, "command.write", False),
        (NODE, PUBLIC, True),
        (ADMIN, None, False),  # not in the table: denied, even for admin
        (_who("stranger"), "node.read", False),
    ],
)
def test_builtin_roles(principal: Principal, permission: str | None, allowed: bool) -> None:
    assert Rbac(RbacConfig()).allows(principal, permission) is allowed


def test_configured_roles_with_wildcards() -> None:
    rbac = Rbac(
        RbacConfig(
            roles=(
                RoleConfig("deployer", ("agent.*", "*.read")),
                RoleConfig("viewer", ("node.read",)),  # replaces the built-in viewer
                RoleConfig("greedy", ("*",)),
            )
        )
    )
    deployer = _who("deployer")
    assert rbac.allows(deployer, "agent.write") and rbac.allows(deployer, "command.read")
    assert not rbac.allows(deployer, "command.write")
    assert rbac.allows(VIEWER, "node.read") and not rbac.allows(VIEWER, "event.read")
    # "*" in a configured role still does not make a node of it.
    assert rbac.allows(_who("greedy"), "node.write")
    assert not rbac.allows(_who("greedy"), NODE_SELF)


def test_rbac_disabled_still_restricts_nodes() -> None:
    rbac = Rbac(RbacConfig(enabled=False))
    assert rbac.allows(VIEWER, "command.write") and rbac.allows(_who("anyone"), "node.write")
    assert not rbac.allows(NODE, "command.write")
    assert not rbac.allows(VIEWER, NODE_SELF)


def test_only_admin_relays_node_streams_even_with_rbac_off() -> None:
    # The leader trusts the node identity a relay names: cluster.relay is never implied.
    for enabled in (False, True):
        rbac = Rbac(RbacConfig(enabled=enabled))
        assert rbac.allows(_who("admin"), CLUSTER_RELAY)
        assert rbac.allows(_who(ROLE_REPLICA), CLUSTER_RELAY)
        assert not rbac.allows(VIEWER, CLUSTER_RELAY)
        assert not rbac.allows(_who("operator"), CLUSTER_RELAY)
        assert not rbac.allows(NODE, CLUSTER_RELAY)
    assert GRPC_METHODS["/nexus.cluster.v1.ReplicaService/Relay"] == CLUSTER_RELAY


def test_only_replicas_and_admin_fetch_snapshots_whatever_rbac_says() -> None:
    # A snapshot is the whole store (the audit log too): never configurable, never implied.
    greedy = RoleConfig("greedy", ("*", "cluster.*"))
    for enabled in (False, True):
        rbac = Rbac(RbacConfig(enabled=enabled, roles=(greedy,)))
        assert rbac.allows(_who("admin"), CLUSTER_SNAPSHOT)
        assert rbac.allows(_who(ROLE_REPLICA), CLUSTER_SNAPSHOT)
        for other in (VIEWER, NODE, _who("operator"), _who("greedy"), _who("anyone")):
            assert not rbac.allows(other, CLUSTER_SNAPSHOT), (enabled, other.role)
    assert GRPC_METHODS["/nexus.cluster.v1.ReplicaService/FetchSnapshot"] == CLUSTER_SNAPSHOT


def test_matches() -> None:
    assert matches("*", "node.read") and matches("node.*", "node.drain")
    assert matches("*.read", "agent.read") and not matches("*.read", "agent.write")
    assert not matches("node.*", "nodes.read") and not matches("node.read", "node.readx")
    assert all("." in p for p in ALL_PERMISSIONS)


def test_docs_show_the_whole_table() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    for table in (GRPC_METHODS, WS_OPS, HTTP_ROUTES):
        for name, permission in table.items():
            assert f"| `{name}` | `{permission}` |" in docs, name
