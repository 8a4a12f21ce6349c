"""CommandService without sockets: a real LmdbStore, NodeRegistry and Scheduler wired as in
``server.py``; node streams are driven through ``register`` / ``open_session`` and read from
``Session.outbound``; node reports go in through ``handle_reports`` as the gRPC adapter does.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nexus_fast.codec import protowire
from nexus_fast.core.commands import STATE_NAMES
from nexus_fast.core.nodes import NODES_DB
from nexus_fast.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore
from nexus_fast.store.base import Delete

from .fabric import (
    cancels_in,
    commands_in,
    drain,
    fabric,
    res,
    run,
    spec,
    until,
    wait_sent,
)

# Deadlines of 0.1-0.2 s need the 10 ms ticker (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("fast_ticks")

PENDING = pb.COMMAND_STATE_PENDING
PLACED = pb.COMMAND_STATE_PLACED
DISPATCHED = pb.COMMAND_STATE_DISPATCHED
ACKED = pb.COMMAND_STATE_ACKED
SUCCEEDED = pb.COMMAND_STATE_SUCCEEDED
FAILED = pb.COMMAND_STATE_FAILED
TIMED_OUT = pb.COMMAND_STATE_TIMED_OUT
CANCELLED = pb.COMMAND_STATE_CANCELLED


# ------------------------------------------------------------------ submit: bad input


BAD_SPECS: list[tuple[str, Callable[[], list[pb.CommandSpec]]]] = [
    ("commands", lambda: []),
    ("commands", lambda: [spec() for _ in range(101)]),
    ("commands[1].kind", lambda: [spec("ok-1"), spec("bad", kind="")]),
    ("commands[1].kind", lambda: [spec("ok-1"), spec("bad", kind="k" * 129)]),
    ("commands[1].payload", lambda: [spec("ok-1"), spec("bad", payload=b"x" * 1025)]),
    ("commands[1].priority", lambda: [spec("ok-1"), spec("bad", priority=3)]),
    ("commands[1].timeout_ms", lambda: [spec("ok-1"), spec("bad", timeout_ms=25 * 3600_000)]),
    ("commands[1].max_attempts", lambda: [spec("ok-1"), spec("bad", max_attempts=101)]),
    ("commands[1].idempotency_key", lambda: [spec("ok-1"), spec("has space")]),
    ("commands[1].idempotency_key", lambda: [spec("ok-1"), spec("k" * 129)]),
    ("commands[1].target_node", lambda: [spec("ok-1"), spec("bad", target_node="no spaces")]),
    (
        "commands[1].placement.label_selector",
        lambda: [
            spec("ok-1"),
            spec("bad", placement=pb.Placement(label_selector={"bad key!": "x"})),
        ],
    ),
    (
        "commands[1].placement.request.cpu",
        lambda: [spec("ok-1"), spec("bad", placement=pb.Placement(request=res(cpu=-1)))],
    ),
]


@pytest.mark.parametrize(("field", "make"), BAD_SPECS, ids=[f for f, _ in BAD_SPECS])
def test_bad_batch_names_the_field_and_changes_nothing(
    tmp_path: Path, field: str, make: Callable[[], list[pb.CommandSpec]]
) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        drain(session)
        await f.commands.submit([spec("before")])
        await wait_sent(session, 1)
        await f.flush()  # the "dispatched" write
        before = (f.stored_count(), f.commands.active_count, f.scheduler.tasks_of("n1"))
        last_index = f.store.last_event_index
        with pytest.raises(InvalidArgument) as err:
            await f.commands.submit(make())
        assert err.value.field.startswith(field), err.value.field
        await asyncio.sleep(0.03)
        await f.flush()
        # The valid command ahead of the bad one was not placed, stored or sent either.
        assert (f.stored_count(), f.commands.active_count, f.scheduler.tasks_of("n1")) == before
        assert f.store.last_event_index == last_index
        assert f.stored("ok-1") is None
        assert commands_in(drain(session)) == []
        await f.stop()

    run(main())


def test_unknown_target_node_is_not_found_and_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1")
        with pytest.raises(NotFound, match=r"commands\[1\]\.target_node.*ghost"):
            await f.commands.submit([spec("a", target_node="n1"), spec("b", target_node="ghost")])
        assert f.stored_count() == 0
        assert f.commands.active_count == 0
        assert f.scheduler.tasks_of("n1") == 0
        await f.stop()

    run(main())


# ------------------------------------------------------------------ submit: idempotency


def test_idempotency_within_batch_across_batches_and_restart(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        reply = await f.commands.submit(
            [spec("k1", payload=b"first"), spec("k1", payload=b"first"), spec("k2"), spec()]
        )
        r = reply.results
        assert [x.duplicate for x in r] == [False, True, False, False]
        assert r[0].id == r[1].id == "k1"
        assert r[1].state == r[0].state == PLACED and r[1].node_id == "n1"
        assert r[3].id and r[3].id not in ("k1", "k2")
        assert f.stored_count() == 3
        assert f.scheduler.tasks_of("n1") == 3  # the duplicate reserved nothing
        assert f.stored("k1").spec.payload == b"first"  # type: ignore[union-attr]
        sent = await wait_sent(session, 3)
        assert sorted(c.id for c in sent) == sorted(["k1", "k2", r[3].id])

        # Across batches: the live command's current state, no second command.
        f.report("n1", acks=[pb.CommandAck(command_id="k1")])
        # The same key with another spec: refused as a whole, naming the existing command.
        with pytest.raises(AlreadyExists, match=r"commands\[1\].idempotency_key: 'k1'") as exc:
            await f.commands.submit([spec("k9"), spec("k1", payload=b"third")])
        assert exc.value.existing_id == "k1"
        again = await f.commands.submit([spec("k1", payload=b"first"), spec("k3")])
        assert again.results[0].duplicate and again.results[0].state == ACKED
        assert not again.results[1].duplicate
        f.succeed("n1", "k2")
        await f.flush()
        dup = (await f.commands.submit([spec("k2")])).results[0]
        assert dup.duplicate and dup.state == SUCCEEDED and dup.node_id == "n1"
        assert f.stored_count() == 4
        assert [c.id for c in await wait_sent(session, 1)] == ["k3"]
        await asyncio.sleep(0.03)
        assert commands_in(drain(session)) == []  # nothing for the duplicates
        await f.stop()

        # Restart: a fresh set of services on the same LMDB directory.
        g = await fabric(tmp_path)
        assert g.stored_count() == 4
        reply = await g.commands.submit(
            [spec("k1", payload=b"first"), spec("k2"), spec("k3"), spec("k4")]
        )
        assert [x.duplicate for x in reply.results] == [True, True, True, False]
        assert [x.id for x in reply.results] == ["k1", "k2", "k3", "k4"]
        assert reply.results[0].state == ACKED
        assert reply.results[1].state == SUCCEEDED
        assert g.stored_count() == 5
        assert g.stored("k1").spec.payload == b"first"  # type: ignore[union-attr]
        await g.stop()

    run(main())


def test_queue_full_is_resource_exhausted_with_retry_hint(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path, queue_capacity=3)
        await f.node("n1", connect=False)
        await f.commands.submit([spec("a"), spec("b")])
        with pytest.raises(ResourceExhausted) as err:
            await f.commands.submit([spec("c"), spec("d")])
        assert err.value.retry_after > 0
        assert "retry" in str(err.value)
        assert f.stored_count() == 2 and f.commands.active_count == 2
        assert f.scheduler.tasks_of("n1") == 2
        # Known keys take no room; one more new one fits.
        reply = await f.commands.submit([spec("a"), spec("c")])
        assert [x.duplicate for x in reply.results] == [True, False]
        with pytest.raises(ResourceExhausted):
            await f.commands.submit([spec("d")])
        # A finished command frees its room.
        await f.commands.cancel("a")
        await f.commands.submit([spec("d")])
        assert f.commands.active_count == 3
        await f.stop()

    run(main())


# ------------------------------------------------------------------ placement and dispatch


def test_command_reaches_the_node_only_after_the_submission_is_durable(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        drain(session)
        gate = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        real_commit = f.store.commit
        loop = asyncio.get_running_loop()

        def slow_commit(ops: Any, events: Any = (), audit: Any = ()) -> asyncio.Future[Any]:
            inner = real_commit(ops, events, audit)
            outer: asyncio.Future[Any] = loop.create_future()

            async def later() -> None:
                result = await inner
                await gate.wait()
                outer.set_result(result)

            tasks.add(loop.create_task(later()))
            return outer

        f.store.commit = slow_commit  # type: ignore[method-assign]
        task = loop.create_task(f.commands.submit([spec("a"), spec("b")]))
        await asyncio.sleep(0.1)  # many ticks: nothing may flow before the commit resolves
        assert not task.done()
        assert commands_in(drain(session)) == []
        assert f.commands.get("a").state == PLACED
        gate.set()
        reply = await task
        assert [x.state for x in reply.results] == [PLACED, PLACED]
        sent = await wait_sent(session, 2)
        assert [c.id for c in sent] == ["a", "b"]
        assert all(c.attempt == 1 and c.kind == "run" for c in sent)
        f.store.commit = real_commit  # type: ignore[method-assign]
        await until(lambda: f.commands.get("a").state == DISPATCHED)
        await f.flush()
        assert f.stored("a").state == DISPATCHED  # type: ignore[union-attr]
        await f.stop()

    run(main())


def test_many_commands_go_out_in_few_batched_messages(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path, max_batch_size=100)
        session = await f.node("n1")
        assert session is not None
        drain(session)
        await f.commands.submit([spec(f"a{i:03d}") for i in range(100)])
        await asyncio.gather(
            f.commands.submit([spec(f"b{i:03d}") for i in range(100)]),
            f.commands.submit([spec(f"c{i:03d}") for i in range(100)]),
        )
        await until(lambda: f.commands.get("c099").state == DISPATCHED)
        messages = [m for m in drain(session) if m.commands]
        ids = [c.id for c in commands_in(messages)]
        assert sorted(ids) == sorted(f"{p}{i:03d}" for p in "abc" for i in range(100))
        assert len(ids) == len(set(ids))
        assert len(messages) <= 4, [len(m.commands) for m in messages]
        assert all(len(m.commands) <= 100 for m in messages)
        await f.stop()

    run(main())


def test_priority_lanes_dispatch_high_before_low(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1", connect=False)
        await f.commands.submit(
            [spec("low", priority=0), spec("high", priority=2), spec("mid", priority=1)]
        )
        session = await f.node("n1")
        assert session is not None
        sent = await wait_sent(session, 3)
        assert [c.id for c in sent] == ["high", "mid", "low"]
        await f.stop()

    run(main())


def test_node_without_a_stream_gets_its_commands_when_it_connects(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1", connect=False)
        reply = await f.commands.submit([spec("a"), spec("b")])
        assert [(x.state, x.node_id) for x in reply.results] == [(PLACED, "n1")] * 2
        await asyncio.sleep(0.05)
        assert f.commands.get("a").state == PLACED
        epoch = f.nodes.get("n1").session_epoch
        session = await f.nodes.open_session("n1", epoch)
        sent = await wait_sent(session, 2)
        assert [c.id for c in sent] == ["a", "b"]
        await until(lambda: f.commands.get("b").state == DISPATCHED)
        await f.stop()

    run(main())


def test_inflight_commands_are_sent_again_on_a_new_session(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        old = await f.node("n1")
        assert old is not None
        await f.commands.submit([spec("d"), spec("a"), spec("s")])
        first = await wait_sent(old, 3)
        f.report("n1", acks=[pb.CommandAck(command_id="a")])
        f.succeed("n1", "s")
        assert f.commands.get("a").state == ACKED
        assert f.commands.get("d").state == DISPATCHED

        new = await f.node("n1")  # re-register: a new epoch, the old stream ends
        assert new is not None
        assert old.closed
        resent = await wait_sent(new, 2)
        assert sorted(c.id for c in resent) == ["a", "d"]  # not the finished one
        by_id = {c.id: c for c in first}
        for c in resent:
            assert c.attempt == by_id[c.id].attempt == 1  # the same attempt, not a retry
        await asyncio.sleep(0.05)
        assert commands_in(drain(new)) == []  # sent once, not once per tick
        f.succeed("n1", "d")
        assert f.commands.get("d").state == SUCCEEDED
        await f.stop()

    run(main())


# ------------------------------------------------------------------ reports


def test_ack_then_success(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        await f.commands.submit([spec("a", placement=pb.Placement(request=res(cpu=2)))])
        assert f.scheduler.reserved_of("n1")["cpu"] == 2
        await wait_sent(session, 1)
        f.report("n1", acks=[pb.CommandAck(command_id="a", attempt=1)])
        assert f.commands.get("a").state == ACKED
        f.succeed("n1", "a", b"output!")
        record = f.commands.get("a")
        assert record.state == SUCCEEDED and record.output == b"output!"
        assert record.finished_ms > 0 and record.node_id == "n1"
        assert f.scheduler.tasks_of("n1") == 0
        assert f.scheduler.reserved_of("n1")["cpu"] == 0
        assert f.commands.active_count == 0
        await f.flush()
        stored = f.stored("a")
        assert stored is not None and stored.state == SUCCEEDED and stored.output == b"output!"
        # A late duplicate result changes nothing.
        f.fail("n1", "a")
        assert f.commands.get("a").state == SUCCEEDED
        await f.stop()

    run(main())


def test_failure_is_retried_on_another_node_then_fails_with_the_reason(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        s2 = await f.node("n2")
        assert s1 is not None and s2 is not None
        sessions = {"n1": s1, "n2": s2}
        await f.commands.submit([spec("a", max_attempts=2)])
        first = f.commands.get("a").node_id
        other = "n2" if first == "n1" else "n1"
        await wait_sent(sessions[first], 1)
        f.fail(first, "a", "disk on fire")
        record = f.commands.get("a")
        assert record.state in (PENDING, PLACED, DISPATCHED)
        assert list(record.tried_nodes) == [first]
        assert "disk on fire" in record.reason
        sent = await wait_sent(sessions[other], 1)
        assert sent[0].id == "a" and sent[0].attempt == 2
        assert f.commands.get("a").node_id == other
        assert f.scheduler.tasks_of(first) == 0 and f.scheduler.tasks_of(other) == 1
        f.fail(other, "a", "out of luck")
        record = f.commands.get("a")
        assert record.state == FAILED
        assert "out of luck" in record.reason
        assert record.attempt == 2
        assert f.scheduler.tasks_of("n1") == f.scheduler.tasks_of("n2") == 0
        await f.flush()
        assert f.stored("a").state == FAILED  # type: ignore[union-attr]
        await f.stop()

    run(main())


def test_report_from_the_wrong_node_is_ignored(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1")
        await f.node("n2", cpu=1.0)
        await f.commands.submit([spec("a", target_node="n1")])
        await until(lambda: f.commands.get("a").state == DISPATCHED)
        f.report("n2", acks=[pb.CommandAck(command_id="a")])
        f.succeed("n2", "a")
        f.fail("n2", "a")
        record = f.commands.get("a")
        assert record.state == DISPATCHED and record.node_id == "n1" and record.attempt == 1
        f.report("n1", acks=[pb.CommandAck(command_id="a")])
        assert f.commands.get("a").state == ACKED
        await f.stop()

    run(main())


def test_failed_target_node_command_is_retried_on_its_node_only(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        await f.node("n2")
        assert session is not None
        await f.commands.submit([spec("a", target_node="n1", max_attempts=2)])
        await wait_sent(session, 1)
        f.fail("n1", "a", "nope")
        record = f.commands.get("a")
        assert record.state != FAILED and "nope" in record.reason
        await wait_sent(session, 1)  # the same node again, the next attempt
        record = f.commands.get("a")
        assert record.node_id == "n1" and record.attempt == 2 and not record.tried_nodes
        f.fail("n1", "a", "nope again")
        record = f.commands.get("a")
        assert record.state == FAILED and record.attempt == 2 and "nope again" in record.reason
        assert record.node_id == "n1"
        await asyncio.sleep(0.05)
        assert commands_in(drain(session)) == []
        assert f.scheduler.tasks_of("n1") == 0
        await f.stop()

    run(main())


# ------------------------------------------------------------------ deadlines


def test_no_result_within_timeout_is_retried_then_timed_out(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        s2 = await f.node("n2")
        assert s1 is not None and s2 is not None
        drain(s1), drain(s2)
        await f.commands.submit([spec("a", timeout_ms=150, max_attempts=2)])
        first = f.commands.get("a").node_id
        sessions = {"n1": s1, "n2": s2}
        other = "n2" if first == "n1" else "n1"
        await until(lambda: f.commands.get("a").state == DISPATCHED)
        f.report(first, acks=[pb.CommandAck(command_id="a")])  # an ack does not stop the clock
        await until(lambda: f.commands.get("a").node_id == other, 1.0)
        record = f.commands.get("a")
        assert record.attempt == 2 and list(record.tried_nodes) == [first]
        assert cancels_in(drain(sessions[first])) == ["a"]
        await until(lambda: f.commands.get("a").state == TIMED_OUT, 1.0)
        record = f.commands.get("a")
        # The second attempt got its own timeout, by the service's own stamps (whole ms).
        assert record.finished_ms - record.dispatched_ms >= 150 - 1
        assert "no result from node" in record.reason and other in record.reason
        assert cancels_in(drain(sessions[other])) == ["a"]
        assert f.scheduler.tasks_of("n1") == f.scheduler.tasks_of("n2") == 0
        # A result after the timeout changes nothing.
        f.succeed(other, "a")
        assert f.commands.get("a").state == TIMED_OUT
        await f.stop()

    run(main())


def test_pending_without_a_feasible_node_times_out_with_the_reason(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1")
        reply = await f.commands.submit(
            [spec("a", timeout_ms=100, placement=pb.Placement(request=res(gpu=1)))]
        )
        assert reply.results[0].state == PENDING
        assert "gpu" in reply.results[0].reason
        await until(lambda: f.commands.get("a").state == TIMED_OUT, 1.0)
        record = f.commands.get("a")
        assert "no feasible node" in record.reason and "gpu" in record.reason
        assert record.attempt == 0 and record.node_id == ""
        await f.flush()
        assert f.stored("a").state == TIMED_OUT  # type: ignore[union-attr]
        await f.stop()

    run(main())


def test_pending_is_placed_when_capacity_appears(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("cpu-only")
        await f.commands.submit([spec("a", placement=pb.Placement(request=res(gpu=1)))])
        await asyncio.sleep(0.05)
        assert f.commands.get("a").state == PENDING
        session = await f.node("gpu-node", gpu=2)
        assert session is not None
        sent = await wait_sent(session, 1)
        assert sent[0].id == "a" and sent[0].attempt == 1
        record = f.commands.get("a")
        assert record.node_id == "gpu-node" and record.reason == ""
        assert f.scheduler.reserved_of("gpu-node")["gpu"] == 1
        await f.stop()

    run(main())


def test_placed_but_never_dispatched_times_out(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1", connect=False)
        await f.commands.submit([spec("a", timeout_ms=80, max_attempts=1)])
        await until(lambda: f.commands.get("a").state == TIMED_OUT, 1.0)
        assert "not dispatched" in f.commands.get("a").reason
        assert f.scheduler.tasks_of("n1") == 0
        session = await f.node("n1")
        assert session is not None
        await asyncio.sleep(0.03)
        assert commands_in(drain(session)) == []  # a finished command is not sent late
        await f.stop()

    run(main())


# ------------------------------------------------------------------ node down


def test_node_down_replaces_queued_and_retries_inflight(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.commands.submit([spec("inflight", max_attempts=2), spec("doomed", max_attempts=1)])
        await wait_sent(s1, 2)
        f.report("n1", acks=[pb.CommandAck(command_id="inflight")])
        f.nodes.close_session(s1)  # the stream broke; the node is still ready
        await f.commands.submit([spec("queued", max_attempts=1), spec("queued2", max_attempts=1)])
        assert f.commands.get("queued").state == PLACED
        assert f.scheduler.tasks_of("n1") == 4
        s2 = await f.node("n2")
        assert s2 is not None
        drain(s2)

        await f.down("n1", keep=["n2"])
        assert f.scheduler.tasks_of("n1") == 0
        doomed = f.commands.get("doomed")
        assert doomed.state == FAILED and "n1 went down" in doomed.reason
        sent = await wait_sent(s2, 3)
        assert sorted(c.id for c in sent) == ["inflight", "queued", "queued2"]
        inflight = f.commands.get("inflight")
        assert inflight.node_id == "n2" and inflight.attempt == 2
        assert list(inflight.tried_nodes) == ["n1"]
        for cid in ("queued", "queued2"):
            record = f.commands.get(cid)
            # Queued work never reached n1: moving it costs no attempt.
            assert record.node_id == "n2" and record.attempt == 1, cid
            assert not record.tried_nodes
        await until(lambda: f.commands.get("queued2").state == DISPATCHED)
        assert f.scheduler.tasks_of("n2") == 3
        await f.flush()
        assert f.stored("doomed").state == FAILED  # type: ignore[union-attr]
        # n1 comes back: nothing of the moved work is sent to it again.
        back = await f.node("n1")
        assert back is not None
        await asyncio.sleep(0.03)
        assert commands_in(drain(back)) == []
        await f.stop()

    run(main())


def test_removed_node_hands_its_queue_back_and_its_slot_carries_nothing_over(
    tmp_path: Path,
) -> None:
    # The scheduler hears of the removal first and lets its slot go; the queue still holds
    # the node's lane until it has moved the queued work back to pending.
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1", connect=False)
        await f.commands.submit([spec("a"), spec("b")])
        assert f.commands.get("a").state == PLACED
        slot = f.scheduler.slot_of("n1")
        await f.nodes.remove("n1")
        for cid in ("a", "b"):
            record = f.commands.get(cid)
            assert record.state == PENDING and record.attempt == 0, cid
        assert f.scheduler.slots.get("n1") is None  # every holder let go
        s2 = await f.node("n2")
        assert s2 is not None
        assert f.scheduler.slot_of("n2") == slot  # the freed slot, reused
        sent = await wait_sent(s2, 2)
        assert sorted(c.id for c in sent) == ["a", "b"]
        for cid in ("a", "b"):
            record = f.commands.get(cid)
            assert record.node_id == "n2" and record.attempt == 1, cid
        assert f.scheduler.tasks_of("n2") == 2
        await asyncio.sleep(0.03)
        assert commands_in(drain(s2)) == []  # each once
        await f.stop()

    run(main())


# ------------------------------------------------------------------ cancel


def test_cancel_in_each_live_state_and_refuse_final(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1", connect=False)
        await f.commands.submit(
            [spec("pending", placement=pb.Placement(request=res(gpu=1))), spec("placed")]
        )
        s2 = await f.node("n2", cpu=1.0)
        assert s2 is not None
        await f.commands.submit([spec("dispatched", target_node="n2")])
        await wait_sent(s2, 1)
        assert f.commands.get("dispatched").state == DISPATCHED
        assert f.scheduler.tasks_of("n1") == f.scheduler.tasks_of("n2") == 1

        for cid in ("pending", "placed", "dispatched"):
            record = await f.commands.cancel(cid)
            assert record.state == CANCELLED and record.reason
            stored = f.stored(cid)
            assert stored is not None and stored.state == CANCELLED  # durable when answered
        assert f.scheduler.tasks_of("n1") == f.scheduler.tasks_of("n2") == 0
        assert f.commands.active_count == 0
        assert cancels_in(drain(s2)) == ["dispatched"]
        s1 = await f.node("n1")
        assert s1 is not None
        await asyncio.sleep(0.05)
        messages = drain(s1)
        assert commands_in(messages) == [] and cancels_in(messages) == []
        gpu = await f.node("gpu", gpu=1)
        assert gpu is not None
        await asyncio.sleep(0.05)
        assert commands_in(drain(gpu)) == []  # the cancelled pending one is never placed

        for cid in ("pending", "placed", "dispatched"):
            with pytest.raises(FailedPrecondition, match="cancelled"):
                await f.commands.cancel(cid)
        with pytest.raises(NotFound):
            await f.commands.cancel("ghost")
        f.succeed("n2", "dispatched")  # too late
        assert f.commands.get("dispatched").state == CANCELLED
        await f.stop()

    run(main())


# ------------------------------------------------------------------ wait


def test_wait_yields_final_at_once_others_as_they_finish_and_stops_at_timeout(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        await f.commands.submit([spec("done"), spec("a"), spec("b"), spec("never")])
        await wait_sent(session, 4)
        f.succeed("n1", "done")
        # A final state reaches a waiter only once it is on disk: what a client is told
        # survives a crash.
        async for record in f.commands.wait(["done"], 5):
            stored = f.store.get("commands", b"c/done")
            assert stored is not None and pb.CommandRecord.FromString(stored).state == SUCCEEDED
            assert record.state == SUCCEEDED

        # A tiny timeout still yields the final ones.
        got = [r async for r in f.commands.wait(["a", "done", "never"], 0.001)]
        assert [r.id for r in got] == ["done", ""]
        # The timeout ends with a marker naming the ones not final, in request order.
        assert got[-1] == pb.CommandRecord(wait_timed_out_ids=["a", "never"])

        async def finish_later() -> None:
            await asyncio.sleep(0.03)
            f.succeed("n1", "b")
            await asyncio.sleep(0.03)
            f.fail("n1", "a", "x")  # max_attempts 3: a retry, not final

        task = asyncio.get_running_loop().create_task(finish_later())
        got2 = [(r.id, r.state) async for r in f.commands.wait(["done", "b", "a", "b"], 0.5)]
        # It waited past a's failure (a retry, not final) for its timeout, not just for b.
        assert task.done()
        await task
        assert got2 == [("done", SUCCEEDED), ("b", SUCCEEDED), ("", 0)]
        assert not f.commands._waiters  # nothing left registered

        with pytest.raises(NotFound):
            async for _ in f.commands.wait(["done", "ghost"], 1.0):
                raise AssertionError("yielded before checking every id")
        with pytest.raises(InvalidArgument):
            async for _ in f.commands.wait([], 1.0):
                pass
        await f.stop()

    run(main())


def test_stop_ends_waits_without_a_timeout(tmp_path: Path) -> None:
    """A wait() with no timeout used to outlive stop(): it held the server's drain."""

    async def main() -> None:
        f = await fabric(tmp_path)
        await f.commands.submit([spec("stuck")])  # no node: never final

        async def waiting() -> list[str]:
            return [r.id async for r in f.commands.wait(["stuck"], None)]

        task = asyncio.get_running_loop().create_task(waiting())
        await until(lambda: len(f.commands._waiters) == 1)
        await f.commands.stop()
        with pytest.raises(Unavailable, match="server stopping"):
            await asyncio.wait_for(task, 10)
        assert not f.commands._waiters
        with pytest.raises(Unavailable):  # and no new wait starts
            f.commands.wait(["stuck"], None)
        await f.stop()

    run(main())


def test_wait_never_yields_a_command_twice(tmp_path: Path) -> None:
    """A command that finishes while the caller handles an earlier one comes once."""

    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        await f.commands.submit([spec("first"), spec("second")])
        await wait_sent(session, 2)
        f.succeed("n1", "first")
        got = []
        async for record in f.commands.wait(["first", "second"], 0.2):
            got.append(record.id)
            if record.id == "first":
                # The consumer awaits (e.g. a stream write) and meanwhile "second" finishes.
                await asyncio.sleep(0)
                f.succeed("n1", "second")
        assert got == ["first", "second"]
        await f.stop()

    run(main())


def test_a_just_finished_command_reads_final_before_its_write_is_durable(
    tmp_path: Path,
) -> None:
    """The final state is written without waiting; until it lands, reads must not fall back
    to the older state in the store (a wait() would then sleep until its timeout)."""

    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        await f.commands.submit([spec("a")])
        await wait_sent(session, 1)
        f.succeed("n1", "a", b"out")
        assert f.commands.get("a").state == SUCCEEDED
        assert f.commands.get("a").output == b"out"

        async def states() -> list[int]:
            return [r.state async for r in f.commands.wait(["a"], 3600)]

        # A wait that read the older stored state would sleep its whole hour: wait_for fails.
        assert await asyncio.wait_for(states(), 10) == [SUCCEEDED]
        dup = (await f.commands.submit([spec("a")])).results[0]
        assert dup.duplicate and dup.state == SUCCEEDED
        with pytest.raises(FailedPrecondition, match="succeeded"):
            await f.commands.cancel("a")
        page, _ = f.commands.list_commands(states=[SUCCEEDED])
        assert [r.id for r in page] == ["a"]
        await f.flush()
        assert f.stored("a").state == SUCCEEDED  # type: ignore[union-attr]
        assert not f.commands._log.finishing  # memory is let go once durable
        await f.stop()

    run(main())


# ------------------------------------------------------------------ restart


def test_restart_restores_live_commands_and_not_final_ones(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        await f.commands.submit([spec("dispatched"), spec("acked"), spec("done")])
        await wait_sent(session, 3)
        f.report("n1", acks=[pb.CommandAck(command_id="acked")])
        f.succeed("n1", "done")
        f.nodes.close_session(session)
        await f.commands.submit(
            [spec("placed"), spec("pending", placement=pb.Placement(request=res(gpu=1)))]
        )
        cancelled = (await f.commands.submit([spec("cancelled", target_node="n1")])).results[0]
        await f.commands.cancel(cancelled.id)
        await f.stop()

        g = await fabric(tmp_path)
        assert g.commands.active_count == 4
        states = {
            cid: g.commands.get(cid).state
            for cid in ("dispatched", "acked", "placed", "pending", "done", "cancelled")
        }
        assert states == {
            "dispatched": DISPATCHED,
            "acked": ACKED,
            "placed": PLACED,
            "pending": PENDING,
            "done": SUCCEEDED,
            "cancelled": CANCELLED,
        }
        assert {r.id for r in g.commands.active_records()} == {
            "dispatched",
            "acked",
            "placed",
            "pending",
        }
        assert g.scheduler.tasks_of("n1") == 3  # reservations restored
        s = await g.node("n1")
        assert s is not None
        sent = await wait_sent(s, 3)
        assert sorted(c.id for c in sent) == ["acked", "dispatched", "placed"]
        by_id = {c.id: c for c in sent}
        assert by_id["dispatched"].attempt == 1 and by_id["placed"].attempt == 1
        await until(lambda: g.commands.get("placed").state == DISPATCHED)
        for cid in ("dispatched", "acked", "placed"):
            g.succeed("n1", cid)
            assert g.commands.get(cid).state == SUCCEEDED
        gpu = await g.node("gpu", gpu=1)
        assert gpu is not None
        sent = await wait_sent(gpu, 1)
        assert sent[0].id == "pending"
        with pytest.raises(FailedPrecondition):
            await g.commands.cancel("done")
        await g.stop()

    run(main())


def test_restart_with_a_node_gone_retries_its_inflight_elsewhere(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.commands.submit([spec("a", max_attempts=2), spec("b", max_attempts=1)])
        await wait_sent(s1, 2)
        f.nodes.close_session(s1)
        await f.commands.submit([spec("c", max_attempts=1)])
        assert f.commands.get("c").state == PLACED
        await f.stop()
        # While the server was down, n1 was removed (e.g. by an operator tool on the file).
        raw = LmdbStore(tmp_path, map_size=1 << 24)
        await raw.open()
        await raw.commit([Delete(NODES_DB, b"n1")])
        await raw.close()

        g = await fabric(tmp_path)
        b = g.commands.get("b")
        assert b.state == FAILED and "n1" in b.reason  # out of attempts
        a = g.commands.get("a")
        assert a.state == PENDING and list(a.tried_nodes) == ["n1"]
        c = g.commands.get("c")
        assert c.state == PENDING and c.attempt == 0 and not c.tried_nodes
        await g.flush()
        assert g.stored("b").state == FAILED  # type: ignore[union-attr]
        s2 = await g.node("n2")
        assert s2 is not None
        sent = {c.id: c for c in await wait_sent(s2, 2)}
        assert sorted(sent) == ["a", "c"]
        assert sent["a"].attempt == 2 and sent["c"].attempt == 1
        await g.stop()

    run(main())


# ------------------------------------------------------------------ list


def test_list_commands_pages_and_filters(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        await f.node("n2", connect=False)
        assert s1 is not None
        ids = [f"c{i:02d}" for i in range(10)]
        await f.commands.submit([spec(i, target_node="n1") for i in ids[:6]])
        await f.commands.submit([spec(i, target_node="n2") for i in ids[6:]])
        await wait_sent(s1, 6)
        f.succeed("n1", "c00")
        f.succeed("n1", "c01")

        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page, token = f.commands.list_commands(page_size=3, page_token=token)
            assert len(page) <= 3
            seen += [r.id for r in page]
            pages += 1
            if not token:
                break
        assert seen == ids and pages == 4

        page, token = f.commands.list_commands(states=[SUCCEEDED])
        assert [r.id for r in page] == ["c00", "c01"] and token == ""
        page, _ = f.commands.list_commands(states=[DISPATCHED, PLACED], node_id="n2")
        assert [r.id for r in page] == ids[6:]
        assert all(r.state == PLACED for r in page)  # the live state, not the stored one
        page, token = f.commands.list_commands(node_id="n1", page_size=2, page_token="c01")
        assert [r.id for r in page] == ["c02", "c03"] and token == "c03"
        page, token = f.commands.list_commands(node_id="n1", page_size=2, page_token=token)
        assert [r.id for r in page] == ["c04", "c05"]
        page, token = f.commands.list_commands(node_id="n1", page_size=2, page_token=token)
        assert page == [] and token == ""
        page, _ = f.commands.list_commands(node_id="nobody")
        assert page == []
        with pytest.raises(InvalidArgument, match="states"):
            f.commands.list_commands(states=[99])
        with pytest.raises(InvalidArgument, match="page_size"):
            f.commands.list_commands(page_size=5001)
        await f.stop()

    run(main())


def test_get_unknown_and_empty(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        with pytest.raises(NotFound):
            f.commands.get("ghost")
        with pytest.raises(InvalidArgument):
            f.commands.get("")
        await f.stop()

    run(main())


@pytest.mark.parametrize("state", sorted(STATE_NAMES))
@pytest.mark.parametrize(
    ("command_id", "payload", "output"),
    [
        ("a", b"", b""),
        ("x" * 200, b"p" * 100, b"o" * 20_000),  # key and body lengths past 1 and 2 bytes
        ("big-payload", b"p" * 5_000, b""),  # the event carries the record without it
    ],
)
def test_hand_encoded_event_equals_protobuf(
    state: int, command_id: str, payload: bytes, output: bytes
) -> None:
    record = pb.CommandRecord(id=command_id, state=state, node_id="n1", output=output)  # type: ignore[arg-type]
    record.spec.kind = "run"
    record.spec.payload = payload
    body = record.SerializeToString()
    for ts in (1, 127, 128, 1_732_650_000_123):
        slim = pb.CommandRecord()
        slim.CopyFrom(record)
        if len(payload) > protowire.EVENT_PAYLOAD_LIMIT:
            slim.spec.payload = b""
        expected = pb.Event(
            time_ms=ts,
            topic="command",
            type=f"command.{STATE_NAMES[state]}",
            key=command_id,
            payload=slim.SerializeToString(),
        ).SerializeToString()
        encoder = protowire.CommandEvents()
        got = encoder.encode(record, body, encoder.time_field(ts))
        assert got == expected


# ------------------------------------------------------------------ size caps


def test_node_output_and_error_are_capped_and_flagged(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        cap = f.commands.settings.max_output_size
        await f.commands.submit(
            [spec(i, target_node="n1", max_attempts=1) for i in ("big", "small", "err")]
        )
        await wait_sent(s1, 3)
        f.succeed("n1", "big", output=b"o" * (cap * 3))
        f.succeed("n1", "small", output=b"o" * cap)
        # A 3-byte character straddles the cap: the cut lands on a character boundary.
        f.fail("n1", "err", error="x" + "\u20ac" * cap)
        await f.flush()
        for record in (f.commands.get("big"), f.stored("big")):
            assert record is not None
            assert record.output == b"o" * cap and record.output_truncated
        small = f.stored("small")
        assert small is not None and len(small.output) == cap and not small.output_truncated
        err = f.stored("err")
        assert err is not None and err.state == FAILED and err.error_truncated
        assert err.reason == "x" + "\u20ac" * ((cap - 1) // 3)
        assert not err.output_truncated
        await f.stop()

    run(main())


def test_list_commands_pages_end_before_the_byte_budget(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1", connect=False)
        ids = [f"c{i:02d}" for i in range(12)]
        await f.commands.submit(
            [spec(i, target_node="n1", payload=b"p" * 1000) for i in ids]
            + [spec("tiny", target_node="n1")]
        )
        one = f.commands.get("c00").ByteSize()
        f.commands.settings = dataclasses.replace(f.commands.settings, max_page_bytes=3 * one + 20)
        seen: list[str] = []
        token = ""
        while True:
            page, token = f.commands.list_commands(page_token=token)
            assert 1 <= len(page) <= 3, [r.id for r in page]
            assert sum(r.ByteSize() for r in page) <= 3 * one + 20
            seen += [r.id for r in page]
            if not token:
                break
        assert seen == [*ids, "tiny"]
        # A budget smaller than one record still makes progress, one record a page.
        f.commands.settings = dataclasses.replace(f.commands.settings, max_page_bytes=10)
        page, token = f.commands.list_commands(node_id="n1", page_token="c10")
        assert [r.id for r in page] == ["c11"] and token == "c11"
        await f.stop()

    run(main())
