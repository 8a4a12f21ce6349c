"""The live-stream ownership rule and the actor on events, in process (real LmdbStore)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from nexus_fast.codec.protowire import CommandEvents, actor_field, event
from nexus_fast.core.acting import ANONYMOUS
from nexus_fast.core.assembly import CoreFabric
from nexus_fast.errors import PermissionDenied
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore


def test_command_event_with_actor_matches_protobuf() -> None:
    record = pb.CommandRecord(id="c1", state=pb.COMMAND_STATE_PLACED, node_id="n1")
    body = record.SerializeToString()
    encoder = CommandEvents()
    built = encoder.encode(record, body, encoder.time_field(1234), actor_field("alice"))
    expected = event("command", "command.placed", "c1", body, 1234, "alice")
    assert built == expected
    assert pb.Event.FromString(built).actor == "alice"
    assert actor_field("") == b""


def _events(fab: CoreFabric) -> list[pb.Event]:
    return [pb.Event.FromString(body) for _, body in fab.store.events_since(0, 1000)]


def test_takeover_rules(tmp_path: Path) -> None:
    async def main() -> None:
        fab = await CoreFabric(LmdbStore(tmp_path, map_size=1 << 24)).start()
        registry = fab.nodes
        # Heartbeats every minute: a stream opened now is not silent during this test.
        registry.settings = dataclasses.replace(registry.settings, heartbeat_interval=60.0)
        request = pb.RegisterRequest(node_id="n1", address="a:1")
        node, _ = await registry.register(request, ANONYMOUS, "ipv4:10.0.0.1:1000")
        epoch = node.session_epoch
        live = await registry.open_session("n1", epoch, ANONYMOUS, "ipv4:10.0.0.1:1000")
        # Another connection, same (anonymous) name, healthy stream: refused, stream kept.
        with pytest.raises(PermissionDenied):
            await registry.open_session("n1", epoch, ANONYMOUS, "ipv4:10.0.0.2:2000")
        with pytest.raises(PermissionDenied):
            await registry.register(request, ANONYMOUS, "ipv4:10.0.0.1:3000")
        with pytest.raises(PermissionDenied):
            await registry.deregister("n1", epoch, "mallory", "ipv4:10.0.0.1:1000")
        assert registry.session_of("n1") is live and not live.closed
        assert registry.get("n1").session_epoch == epoch
        # The same connection (same client process) may re-register: supersedes, with changes.
        changed = pb.RegisterRequest(node_id="n1", address="a:2", labels={"z": "1"})
        await registry.register(changed, ANONYMOUS, "ipv4:10.0.0.1:1000")
        assert live.closed and registry.session_of("n1") is None
        # A verified principal takes over its own stream from anywhere, not another's.
        epoch2 = registry.get("n1").session_epoch
        mine = await registry.open_session("n1", epoch2, "node:n1", "ipv4:10.0.0.3:1")
        again = await registry.open_session("n1", epoch2, "node:n1", "ipv4:10.0.0.4:1")
        assert mine.closed and registry.session_of("n1") is again
        with pytest.raises(PermissionDenied):
            await registry.open_session("n1", epoch2, "mallory", "ipv4:10.0.0.4:1")
        # A stream silent for two heartbeat intervals is half-dead: replaceable by anyone
        # admitted for the node (a credential change must not lock a node out).
        registry.settings = dataclasses.replace(registry.settings, heartbeat_interval=0.01)
        await asyncio.sleep(0.05)
        other = await registry.open_session("n1", epoch2, "n1", "ipv4:10.0.0.5:1")
        assert again.closed and registry.session_of("n1") is other
        await registry.drain("n1", True, "maint", "alice")
        await asyncio.sleep(0)
        events = _events(fab)
        by_type = [(e.type, e.actor) for e in events]
        assert ("node.registered", ANONYMOUS) in by_type
        # The events carry the node after the change (status set before they are encoded).
        for e in events:
            if e.type in ("node.registered", "node.reregistered", "node.superseded"):
                assert pb.Node.FromString(e.payload).status == pb.NODE_STATUS_READY, e.type
        assert ("node.drain", "alice") in by_type
        refused = [e for e in events if e.type == "node.takeover_refused"]
        # Rate-limited: one per node per heartbeat interval.
        assert len(refused) == 1 and refused[0].details["peer"] == "ipv4:10.0.0.2:2000"
        rereg = [e for e in events if e.type == "node.reregistered"]
        assert rereg[-1].details["changed"] == "address,labels"
        superseded = [e for e in events if e.type == "node.superseded"]
        assert [e.details["call"] for e in superseded] == ["Register", "Connect", "Connect"]
        assert superseded[2].details["new_principal"] == "n1"
        assert superseded[1].details["old_peer"] == "ipv4:10.0.0.3:1"
        await fab.stop()

    asyncio.run(main())
