"""The dispatcher caps each ControlMessage by bytes as well as by count.

It used to batch by count only: ten 1 MB commands for one node went out as one 10 MB
message, over the gRPC limit (server.max_message_size, 4 MB), so the node's stream failed
and none of them arrived. The real core (CoreFabric on an LmdbStore) drives these tests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nexus_fast.core.nodes import SESSION_QUEUE_SIZE, Session
from nexus_fast.pb import fabric_pb2 as pb

from .fabric import Fabric, commands_in, drain, fabric, run, spec, until, wait_sent

MB = 1024 * 1024
LIMIT = 4 * MB

DISPATCHED = pb.COMMAND_STATE_DISPATCHED
SUCCEEDED = pb.COMMAND_STATE_SUCCEEDED
CANCELLED = pb.COMMAND_STATE_CANCELLED


async def big_fabric(path: Path, **kw: int) -> Fabric:
    return await fabric(path, max_batch_size=100, max_payload_size=2 * MB, **kw)


async def messages_for(session: Session, count: int) -> list[pb.ControlMessage]:
    """Read messages off the node's stream until ``count`` commands came."""
    got: list[pb.ControlMessage] = []
    while len(commands_in(got)) < count:
        message = await asyncio.wait_for(session.outbound.get(), 10)
        assert message is not None, "the node's stream was closed"
        if message.commands:
            got.append(message)
    return got


def test_ten_1mb_commands_reach_one_node_in_messages_under_the_limit(tmp_path: Path) -> None:
    async def main() -> None:
        f = await big_fabric(tmp_path, max_message_size=LIMIT)
        session = await f.node("n1")
        assert session is not None
        drain(session)
        ids = [f"c{i}" for i in range(10)]
        await f.commands.submit([spec(i, payload=bytes([n]) * MB) for n, i in enumerate(ids)])
        messages = await messages_for(session, 10)
        assert [c.id for c in commands_in(messages)] == ids  # all, once, in order
        assert all(c.payload == bytes([n]) * MB for n, c in enumerate(commands_in(messages)))
        assert all(m.ByteSize() <= LIMIT for m in messages), [m.ByteSize() for m in messages]
        assert len(messages) >= 3  # 10 MB needs at least three 4 MB messages
        for i in ids:
            f.succeed("n1", i)
        assert all(f.commands.get(i).state == SUCCEEDED for i in ids)

        # A new stream gets the in-flight ones again, under the limit too.
        await f.commands.submit([spec(f"r{n}", payload=b"r" * MB) for n in range(6)])
        await messages_for(session, 6)
        new = await f.node("n1")
        assert new is not None
        resent = await messages_for(new, 6)
        assert sorted(c.id for c in commands_in(resent)) == [f"r{n}" for n in range(6)]
        assert all(m.ByteSize() <= LIMIT for m in resent), [m.ByteSize() for m in resent]
        await f.stop()

    run(main())


def test_a_command_over_the_budget_still_goes_alone(tmp_path: Path) -> None:
    async def main() -> None:
        # page_budget(1 MB) leaves ~960 KB for commands; each of these is bigger.
        f = await big_fabric(tmp_path, max_message_size=MB)
        session = await f.node("n1")
        assert session is not None
        drain(session)
        big = [spec(f"x{n}", payload=b"x" * (MB - 1000)) for n in range(3)]
        await f.commands.submit([spec("t0", payload=b"t"), *big, spec("t1", payload=b"t")])
        messages = await messages_for(session, 5)
        assert [[c.id for c in m.commands] for m in messages] == [
            ["t0"],  # x0 would take it over the budget
            ["x0"],
            ["x1"],
            ["x2"],
            ["t1"],
        ]
        await f.stop()

    run(main())


def test_commands_popped_for_a_full_stream_wait_and_keep_their_order(tmp_path: Path) -> None:
    async def main() -> None:
        f = await big_fabric(tmp_path, max_message_size=LIMIT)
        session = await f.node("n1")
        assert session is not None
        drain(session)
        # Leave the stream room for exactly one more message (has_room keeps 16 spare).
        for _ in range(SESSION_QUEUE_SIZE - 16 - 1):
            assert session.send(pb.ControlMessage())
        ids = [f"c{i}" for i in range(6)]
        await f.commands.submit([spec(i, payload=b"p" * (3 * MB // 2)) for i in ids])
        await until(lambda: f.commands.get("c0").state == DISPATCHED)
        # Two fit the one message left; the rest wait, placed, not lost.
        assert [f.commands.get(i).state for i in ids].count(DISPATCHED) == 2
        # Backlog passes while the stream is still full must keep them waiting, not drop them.
        f.commands._dispatch.mark_backlog()
        await asyncio.sleep(0.05)
        assert [f.commands.get(i).state for i in ids].count(DISPATCHED) == 2
        await f.commands.cancel("c3")  # cancelled while waiting: never sent
        assert f.commands.get("c3").state == CANCELLED
        sent = commands_in(drain(session))
        assert [c.id for c in sent] == ["c0", "c1"]
        # The node read its stream: the ticker's backlog pass sends the rest, in order.
        rest = await wait_sent(session, 3, timeout=10)
        assert [c.id for c in rest] == ["c2", "c4", "c5"]
        await asyncio.sleep(0.05)
        assert commands_in(drain(session)) == []  # each once
        await f.stop()

    run(main())
