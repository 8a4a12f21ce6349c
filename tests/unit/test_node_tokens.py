"""``--node-token-secret``: one minted token per simulated node (nexus-node, nexus-bench)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from nexus_fast.config import SecurityConfig
from nexus_fast.node.channel import ClientAuth
from nexus_fast.node.cli import parse_args
from nexus_fast.security.identity import Authenticator


def _secret(tmp_path: Path) -> Path:
    path = tmp_path / "jwt.secret"
    path.write_text(secrets.token_urlsafe(48) + "\n")
    return path


def test_each_node_gets_its_own_token_the_server_accepts(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    auth = ClientAuth(token="shared", node_token_secret=str(secret))
    server = Authenticator(SecurityConfig(jwt_secret_file=str(secret)))
    for node_id in ("node-00000", "node-00001"):
        ((key, value),) = auth.node_metadata(node_id)
        assert key == "authorization"
        principal = server.authenticate(value)
        assert (principal.role, principal.node_id, principal.name) == (
            "node",
            node_id,
            f"node:{node_id}",
        )
    assert auth.node_metadata("a") == auth.node_metadata("a")  # minted once, then reused
    assert auth.node_metadata("a") != auth.node_metadata("b")
    # Node channels leave the shared token off: the per-node one must be the only one.
    assert auth.for_nodes().token is None and auth.for_nodes().metadata() == ()
    assert ClientAuth(token="t").for_nodes().token == "t"
    assert ClientAuth(token="t").node_metadata("a") == ()


def test_nexus_node_takes_the_secret_and_checks_the_file(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    args = parse_args(["--nodes", "2", "--node-token-secret", str(secret)])
    assert ClientAuth.from_args(args).node_token_secret == str(secret)
    with pytest.raises(SystemExit) as info:
        parse_args(["--nodes", "2", "--node-token-secret", str(tmp_path / "missing")])
    assert info.value.code == 2
    # It travels to a bench worker in the spec (a path, not the secret itself).
    auth = ClientAuth(node_token_secret=str(secret))
    assert ClientAuth.from_dict(auth.to_dict()).node_token_secret == str(secret)
