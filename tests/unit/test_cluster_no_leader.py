"""Answers without a reachable leader name etcd when etcd is why (A4): the election records
its last etcd failure and the forwarding channel names it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from nexus_fast import errors
from nexus_fast.api import status
from nexus_fast.cluster.election import Election
from nexus_fast.cluster.etcd import EtcdClient
from nexus_fast.cluster.forward import LeaderChannel
from nexus_fast.config import Config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
def test_no_leader_answer_names_etcd_when_etcd_is_down() -> None:
    asyncio.run(_no_leader_names_etcd())


async def _no_leader_names_etcd() -> None:
    client = EtcdClient([f"127.0.0.1:{_closed_port()}"], timeout=0.3)
    election = Election(client, b"/t/", "r1", "127.0.0.1:1", lease_ttl=2.0)
    channel = LeaderChannel(Config(), lambda: (None, False), election.etcd_cause)
    assert election.etcd_cause() is None and election.last_error is None
    with pytest.raises(errors.LeaderElsewhere, match=r"^no leader elected yet$"):
        channel.get()  # etcd not asked yet: nothing to blame
    await election.start()
    try:
        async with asyncio.timeout(20):
            while election.last_error is None:
                cause = election.etcd_cause()  # the campaign is waiting for etcd meanwhile
                assert cause is None or "etcd" in cause
                await asyncio.sleep(0.05)
        with pytest.raises(errors.LeaderElsewhere) as refused:
            channel.get()
        assert str(refused.value).startswith("no leader elected: etcd unavailable: ")
        assert status.grpc_trailers(refused.value) == ((status.RETRY_AFTER_TRAILER, "500"),)
        unreachable = str(channel.unreachable("failed to connect to all addresses"))
        assert unreachable.startswith("leader ? unreachable: failed to connect")
        assert "; etcd unavailable: " in unreachable
        answered = str(channel.unreachable("store is closed"))  # the leader, going away
        assert answered.startswith("leader ?: store is closed; etcd unavailable: ")
    finally:
        await election.stop()
        await client.close()
