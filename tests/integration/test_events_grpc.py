"""ControlService.WatchEvents against the real server process."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import AUTH_MODES, ServerProcess, wait_for
from .events_util import (
    Activity,
    GrpcWatcher,
    assert_exactly_once_in_order,
    last_event_index,
    stored_events,
)

T = TypeVar("T")
pytestmark = [pytest.mark.integration, AUTH_MODES]


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_watch_batches_bookmarks_and_filters(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_EVENTS_BOOKMARK_INTERVAL="0.3s").start()
    Activity(server, workers=2, nodes_per_worker=4).run(10, limit_per_worker=300)
    end = last_event_index(server)

    async def body() -> None:
        everything = GrpcWatcher(server, after_index=0)
        systems = GrpcWatcher(server, topics=["system"], after_index=0)
        stream = await everything.until(end)
        assert_exactly_once_in_order(stream.indices, 0, end, "grpc")
        assert everything.batches <= end // 100  # many events per message
        sys_stream = await systems.until(end)  # a bookmark carries it past the node events
        assert [e["type"] for e in sys_stream.events] == ["system.started"]
        assert sys_stream.bookmark == end
        # Idle: bookmarks keep coming (0.3 s apart; 20 intervals allowed), with the latest index.
        marks = everything.stream.bookmarks
        await everything.until_bookmarks(marks + 2, timeout=20 * 0.3)
        assert everything.stream.bookmark == end
        for w in (everything, systems):
            await w.close()

    run(body())


def test_watch_errors(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_EVENTS_RETENTION_COUNT="5").start()
    Activity(server, workers=1, nodes_per_worker=2).run(5, limit_per_worker=30)
    end = last_event_index(server)
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)

        def first_error(request: pb.WatchEventsRequest) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as info:
                for _ in control.WatchEvents(request, timeout=5):
                    pass
            return info.value

        err = first_error(pb.WatchEventsRequest(topics=["node", "nodes"]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nodes" in err.details()
        err = first_error(pb.WatchEventsRequest(after_index=end + 100))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The pruner runs every pruning_interval (0.2s here).
        wait_for(lambda: stored_events(server) == 5, 5, message="retention applied")
        err = first_error(pb.WatchEventsRequest(after_index=1))
        oldest = int(dict(err.trailing_metadata() or ())["nexus-oldest-index"])
        assert oldest == end - 4
        assert err.code() == grpc.StatusCode.OUT_OF_RANGE
        assert f"oldest event kept is {oldest}" in err.details()
        # Resuming from the oldest kept works, and after_index=0 starts there too.
        for after in (oldest - 1, 0):
            call = control.WatchEvents(pb.WatchEventsRequest(after_index=after), timeout=5)
            got: list[int] = []
            for batch in call:
                got.extend(e.index for e in batch.events)
                if got and got[-1] >= end:
                    call.cancel()
                    break
            assert_exactly_once_in_order(got, oldest - 1, end, f"after_index={after}")


def test_shutdown_ends_watches_after_system_stopping(server_factory: type) -> None:
    server: ServerProcess = server_factory.create().start()

    async def body() -> None:
        watcher = GrpcWatcher(server, topics=["system"])
        await asyncio.sleep(0.3)
        # stop() gives up after 20 s, the drain deadline is 30 s: the watch must not hold it.
        assert await asyncio.to_thread(server.stop) == 0
        while not watcher._task.done():
            await asyncio.sleep(0.05)
        assert [e["type"] for e in watcher.stream.events] == ["system.stopping"]
        assert watcher.error is not None and watcher.error.code() == grpc.StatusCode.UNAVAILABLE
        await watcher.close()

    run(body())


def test_watch_catches_up_from_the_log_older_than_the_ring(server_factory: type) -> None:
    """A ring of 16 events: watchers from index 0 read nearly everything from the durable log
    (zero-copy batches), then switch to the ring; every event exactly once, intact, and the
    filters hold on both paths."""
    server: ServerProcess = server_factory.create(NEXUS_EVENT_BUFFER_SIZE="16").start()
    Activity(server, workers=2, nodes_per_worker=3).run(10, limit_per_worker=150)
    end = last_event_index(server)
    assert end > 200

    def watch(request: pb.WatchEventsRequest, until: int) -> list[pb.Event]:
        got: list[pb.Event] = []
        with server.channel() as channel:
            call = pb_grpc.ControlServiceStub(channel).WatchEvents(request, timeout=10)
            for batch in call:
                got.extend(batch.events)
                if (got and got[-1].index >= until) or batch.bookmark_index >= until:
                    call.cancel()
                    break
        return got

    everything = watch(pb.WatchEventsRequest(after_index=0), end)
    assert_exactly_once_in_order([e.index for e in everything], 0, end, "from the log")
    for e in everything:  # each stored body framed intact, with its index set
        assert e.topic in {"node", "system"} and e.type.startswith(e.topic + ".") and e.time_ms
        if e.topic == "node":
            assert pb.Node.FromString(e.payload).id == e.key
    key = everything[-1].key
    assert key.startswith("act-")
    keyed = watch(pb.WatchEventsRequest(after_index=0, keys=[key], topics=["node"]), end)
    assert [e.SerializeToString() for e in keyed] == [
        e.SerializeToString() for e in everything if e.key == key and e.topic == "node"
    ]
    middle = everything[len(everything) // 2].index
    rest = watch(pb.WatchEventsRequest(after_index=middle), end)
    assert [e.SerializeToString() for e in rest] == [
        e.SerializeToString() for e in everything if e.index > middle
    ]
