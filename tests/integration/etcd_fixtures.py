"""Real etcd for the cluster tests: ``etcd1`` (one member) and ``etcd3`` (three members).

Module-scoped; each yields a started :class:`EtcdCluster` on free loopback ports and stops
its processes by pid afterwards, also when a test failed. Import the ones a module uses:
``from tests.integration.etcd_fixtures import etcd1, etcd3  # noqa: F401``.
A test that kills members restarts them before it ends (``start_member``), so the next
test of the module finds every member up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nexus_fast.cluster.etcd_procs import EtcdCluster


def _cluster(tmp_path_factory: pytest.TempPathFactory, members: int) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path_factory.mktemp(f"etcd{members}"), members)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member."""
    yield from _cluster(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three etcd members (one may die, two may not)."""
    yield from _cluster(tmp_path_factory, 3)
