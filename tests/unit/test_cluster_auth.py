"""Cluster mode's pieces of the security model and the error table: the replica role, the
on-behalf-of header (accepted from replicas only) and the leader hint trailer."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nexus_fast import errors
from nexus_fast.api import status
from nexus_fast.config import RbacConfig
from nexus_fast.security.grpc_auth import _on_behalf
from nexus_fast.security.identity import CERT_ROLES
from nexus_fast.security.permissions import NODE_SELF, REPLICA_FORWARD, ROLE_REPLICA, Rbac
from nexus_fast.security.principal import PermissionDenied, Principal
from nexus_fast.security.tools import main as credentials_main

REPLICA = Principal("r2", ROLE_REPLICA, "cert")
ADMIN = Principal("root", "admin", "cert")


@pytest.mark.parametrize("enabled", [True, False])
def test_only_the_replica_role_may_speak_for_others(enabled: bool) -> None:
    rbac = Rbac(RbacConfig(enabled=enabled))
    assert rbac.allows(REPLICA, REPLICA_FORWARD)
    assert not rbac.allows(ADMIN, REPLICA_FORWARD)  # not even admin
    assert not rbac.allows(Principal("bob", "viewer", "token"), REPLICA_FORWARD)
    assert rbac.allows(Principal("bob", "viewer", "token"), "cluster.read")
    assert CERT_ROLES["nexus-replica"] == ROLE_REPLICA


def test_on_behalf_names_the_caller_for_a_replica() -> None:
    rbac = Rbac(RbacConfig())
    caller = _on_behalf(rbac, REPLICA, "operator:alice")
    assert (caller.name, caller.role, caller.method) == ("alice", "operator", "replica:r2")
    assert rbac.allows(caller, "command.write")
    viewer = _on_behalf(rbac, REPLICA, "viewer:bob")
    assert not rbac.allows(viewer, "command.write")  # the caller's rights, not the replica's


@pytest.mark.parametrize("header", ["", "operator", ":alice", "node:node:n1", "x" * 600])
def test_on_behalf_refuses_malformed_or_node_headers(header: str) -> None:
    # A node principal without its node id, or on a method that is not Register/Deregister.
    with pytest.raises(PermissionDenied):
        _on_behalf(Rbac(RbacConfig()), REPLICA, header)
    with pytest.raises(PermissionDenied):
        _on_behalf(Rbac(RbacConfig()), REPLICA, header, node_id="n1", method=_CONTROL_SUBMIT)


_REGISTER = "/nexus.fabric.v1.NodeService/Register"
_DEREGISTER = "/nexus.fabric.v1.NodeService/Deregister"
_CONTROL_SUBMIT = "/nexus.fabric.v1.ControlService/SubmitCommands"


@pytest.mark.parametrize("method", [_REGISTER, _DEREGISTER])
def test_on_behalf_names_a_node_with_its_id_for_register_and_deregister(method: str) -> None:
    rbac = Rbac(RbacConfig())
    node = _on_behalf(rbac, REPLICA, "node:node:n1", node_id="n1", method=method)
    assert (node.name, node.role, node.node_id) == ("node:n1", "node", "n1")
    assert node.method == "replica:r2"
    assert rbac.allows(node, NODE_SELF)  # and the interceptor checks request.node_id == "n1"
    assert not rbac.allows(node, "command.write")


@pytest.mark.parametrize(
    ("header", "node_id", "method", "reason"),
    [
        ("node:node:n1", None, _REGISTER, "without its"),  # no node id: cannot hold it to one
        ("node:node:n1", "", _REGISTER, "without its"),
        ("node:node:n1", "n" * 300, _REGISTER, "without its"),
        ("node:node:n1", "n1", _CONTROL_SUBMIT, "may not act for node"),
        ("node:node:n1", "n1", "/nexus.fabric.v1.NodeService/Connect", "may not act for node"),
        ("operator:alice", "n1", _REGISTER, "without a node principal"),
    ],
)
def test_on_behalf_refuses_a_node_outside_register_or_without_its_id(
    header: str, node_id: str | None, method: str, reason: str
) -> None:
    with pytest.raises(PermissionDenied, match=reason):
        _on_behalf(Rbac(RbacConfig()), REPLICA, header, node_id=node_id, method=method)


def test_only_a_replica_may_name_a_node() -> None:
    for caller in (ADMIN, Principal("node:n2", "node", "token", "n2")):
        with pytest.raises(PermissionDenied, match="replica role"):
            _on_behalf(Rbac(RbacConfig()), caller, "node:node:n1", node_id="n1", method=_REGISTER)


def test_on_behalf_from_a_non_replica_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="replica role"):
        _on_behalf(Rbac(RbacConfig()), ADMIN, "admin:someone-else")


def test_leader_hint_trailer_and_retry_while_none_is_elected() -> None:
    elsewhere = errors.LeaderElsewhere("not the leader", "127.0.0.1:7001")
    assert status.grpc_status(elsewhere) == grpc.StatusCode.UNAVAILABLE
    assert status.grpc_trailers(elsewhere) == ((status.LEADER_TRAILER, "127.0.0.1:7001"),)
    assert status.error_code(elsewhere) == "not_leader" and status.http_status(elsewhere) == 503
    none = errors.LeaderElsewhere("no leader elected yet")
    assert status.grpc_trailers(none) == ((status.RETRY_AFTER_TRAILER, "500"),)
    assert status.http_headers(none) == {"Retry-After": "1"}

    class NotLeader(errors.Unavailable):  # the replicated store's, by duck typing
        leader_advertise = "10.0.0.1:50053"

    assert status.grpc_trailers(NotLeader("x")) == ((status.LEADER_TRAILER, "10.0.0.1:50053"),)


def test_certs_replica_is_a_server_and_client_certificate(tmp_path: Path) -> None:
    assert credentials_main(["certs", "--out", str(tmp_path), "--replica", "r1"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "replica-r1.pem").read_bytes())
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert CERT_ROLES[str(org)] == ROLE_REPLICA
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
