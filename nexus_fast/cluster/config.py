"""``[cluster]``: replicas on etcd (docs/cluster.md). Every key needs a restart.

Kept out of ``nexus_fast/config.py`` (which imports it): the section's fields, defaults
and cross-field checks live here, parsed by the same :class:`~nexus_fast.config_spec.Spec`
machinery as every other section.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nexus_fast.config_spec import spec_field as _f
from nexus_fast.units import KB, MB

__all__ = ["ClusterConfig", "check_cluster"]

# etcd refuses requests over --max-request-bytes (1.5 MiB by default): an entry must fit.
MAX_ENTRY_CEILING: Final = 1536 * KB
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOST_PORT: Final = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: off (the default) is the embedded single process; on, this process is one
    replica of a control plane whose log and leader election live in etcd."""

    enabled: bool = _f(False, "bool")
    name: str = _f("", "str")  # empty: the host name
    etcd_endpoints: tuple[str, ...] = _f(("127.0.0.1:2379",), "strlist")
    etcd_prefix: str = _f("/nexus", "str")
    lease_ttl: float = _f(2.0, "duration", positive=True)
    advertise: str = _f("", "str")  # empty: server.host:server.grpc_port
    etcd_ca_file: str = _f("", "str")
    etcd_cert_file: str = _f("", "str")
    etcd_key_file: str = _f("", "str")
    etcd_timeout: float = _f(2.0, "duration", positive=True)
    max_entry_bytes: int = _f(1 * MB, "size", min=64 * KB, max=MAX_ENTRY_CEILING)

    def resolved_name(self) -> str:
        """This replica's name: ``name``, or the host name when empty."""
        return self.name or socket.gethostname().split(".")[0]

    def resolved_advertise(self, host: str, grpc_port: int) -> str:
        """The gRPC address other replicas and clients reach this one at."""
        if self.advertise:
            return self.advertise
        if host in ("", "0.0.0.0", "::"):  # a wildcard is no address to dial
            host = socket.gethostname()
        return f"{host}:{grpc_port}"

    @property
    def prefix(self) -> bytes:
        """``etcd_prefix`` as the key prefix every cluster key starts with."""
        return self.etcd_prefix.encode()


def check_cluster(cluster: ClusterConfig, err: Callable[[str, str], Exception]) -> None:
    """Cross-field checks of ``[cluster]``; ``err(key, expected)`` builds the ConfigError."""
    if not _NAME.fullmatch(cluster.name) and cluster.name:
        raise err("cluster.name", "letters, digits, '.', '_' or '-' (at most 63), or empty")
    for endpoint in cluster.etcd_endpoints:
        if not _valid_address(endpoint.removeprefix("http://").removeprefix("https://")):
            raise err("cluster.etcd_endpoints", "a list of etcd client addresses like host:2379")
    if cluster.enabled and not cluster.etcd_endpoints:
        raise err("cluster.etcd_endpoints", "at least one address when cluster.enabled = true")
    prefix = cluster.etcd_prefix
    if not prefix.startswith("/") or prefix.endswith("/") or not prefix.isascii() or " " in prefix:
        raise err("cluster.etcd_prefix", 'a key prefix like "/nexus" (leading /, no trailing /)')
    if not 1.0 <= cluster.lease_ttl <= 60.0:
        raise err("cluster.lease_ttl", "a duration in 1s..60s (etcd leases count whole seconds)")
    if cluster.etcd_timeout > 60.0:
        raise err("cluster.etcd_timeout", "a duration of at most 60s")
    if cluster.advertise and not _valid_address(cluster.advertise):
        raise err("cluster.advertise", "host:port that other replicas can dial, or empty")
    if bool(cluster.etcd_cert_file) != bool(cluster.etcd_key_file):
        key = "cluster.etcd_cert_file" if cluster.etcd_cert_file else "cluster.etcd_key_file"
        raise err(key, "set together: cluster.etcd_cert_file and cluster.etcd_key_file")
    for key in ("cluster.etcd_ca_file", "cluster.etcd_cert_file", "cluster.etcd_key_file"):
        path = getattr(cluster, key.partition(".")[2])
        if path and not Path(path).is_file():
            raise err(key, "an existing file (or empty)")


def _valid_address(address: str) -> bool:
    match = _HOST_PORT.fullmatch(address)
    return match is not None and 1 <= int(match.group(2)) <= 65535
