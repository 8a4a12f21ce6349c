"""[cluster] (nexus_fast/cluster/config.py): defaults, parsing and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus_fast.config import ClusterConfig, ConfigError, load_config
from nexus_fast.reload import LIVE_KEYS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_off_and_documented() -> None:
    cluster = load_config(env={}).cluster
    assert cluster == ClusterConfig()
    assert cluster.enabled is False and cluster.lease_ttl == 2.0
    assert cluster.etcd_endpoints == ("127.0.0.1:2379",) and cluster.prefix == b"/nexus"
    assert cluster.resolved_advertise("127.0.0.1", 50053) == "127.0.0.1:50053"
    assert cluster.resolved_name()  # the host name
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key in ClusterConfig.__dataclass_fields__:
        assert key in readme, key
    # Every cluster key needs a restart: none is applied by a reload.
    assert not [key for key in LIVE_KEYS if key.startswith("cluster.")]


def test_example_file_loads() -> None:
    cluster = load_config(CONFIGS / "cluster-example.toml", env={}).cluster
    assert cluster.enabled and cluster.name == "r1" and len(cluster.etcd_endpoints) == 3


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("cluster.lease_ttl", "500ms", "1s..60s"),
        ("cluster.lease_ttl", "-1s", "positive duration"),
        ("cluster.etcd_endpoints", "127.0.0.1", "host:2379"),
        ("cluster.etcd_endpoints", "a:99999", "host:2379"),
        ("cluster.etcd_prefix", "nexus", "leading /"),
        ("cluster.etcd_prefix", "/nexus/", "no trailing /"),
        ("cluster.name", "two words", "letters, digits"),
        ("cluster.advertise", "nohost", "host:port"),
        ("cluster.max_entry_bytes", "8MB", "1536KB"),
        ("cluster.etcd_ca_file", "/no/such/ca.pem", "an existing file"),
        ("cluster.etcd_cert_file", "/no/such/cert.pem", "set together"),
        ("cluster.enabled", "maybe", "a boolean"),
    ],
)
def test_bad_values_are_one_line_errors(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={key: value})
    message = str(info.value)
    assert info.value.key == key and expected in message and "\n" not in message


def test_a_configured_role_cannot_be_the_replica_role(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[security.rbac]\nroles = [{name = "replica", permissions = ["*"]}]\n')
    with pytest.raises(ConfigError, match="replica"):
        load_config(path, env={})
