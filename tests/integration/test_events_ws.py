"""The WebSocket event stream (and gRPC alongside it) against the real server process.

Covers issue 4's acceptance: exactly once and in order under concurrent node activity
for picows, `websockets` and gRPC clients; resume with after_index, also across a
restart; reset for an index older than retention; a stalled subscriber cut off with 4008
and its index while another keeps its rate and latency; bad input.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pytest
import websockets
from picows import WSMsgType

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import AUTH_MODES, ServerProcess, wait_for
from .events_util import (
    Activity,
    GrpcWatcher,
    PicowsClient,
    WebsocketsClient,
    assert_exactly_once_in_order,
    filtered,
    last_event_index,
    metric,
    stored_events,
    submit_commands,
    websockets_connect,
)

T = TypeVar("T")
pytestmark = [pytest.mark.integration, AUTH_MODES]


def run(coro: Coroutine[Any, Any, T], timeout: float = 25.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def settled_last_index(
    server: ServerProcess, quiet: float = 0.7, timeout: float = 8.0
) -> int:
    """The server's last event index once it stopped moving for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last = await asyncio.to_thread(last_event_index, server)
    since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = await asyncio.to_thread(last_event_index, server)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
    return last


def test_exactly_once_in_order_for_picows_websockets_and_grpc(
    server_factory: type, fleet_factory: type
) -> None:
    server: ServerProcess = server_factory.create(NEXUS_EVENTS_BOOKMARK_INTERVAL="0.3s").start()
    keys = ["act-0-1", "act-2-3"]

    async def body() -> None:
        start = await asyncio.to_thread(last_event_index, server)
        pic = await PicowsClient.connect(server)
        all_p = await pic.subscribe(after_index=0)
        some_p = await pic.subscribe(topics=["node"], keys=keys, after_index=start)
        wsl = await WebsocketsClient.connect(server)
        all_w = await wsl.subscribe(after_index=start)
        node_w = await wsl.subscribe(topics=["node", "command"])  # live only
        grpc_all = GrpcWatcher(server, after_index=0)
        grpc_some = GrpcWatcher(server, topics=["node"], keys=keys, after_index=start)
        # Concurrent publishers: a 20-node fleet joining, three churn threads, commands.
        fleet = fleet_factory.create(server, 20, "--ramp", "0.5")
        activity = Activity(server, workers=3, nodes_per_worker=5)
        churn = asyncio.ensure_future(activity.run_async(2.0))
        await asyncio.sleep(0.8)
        accepted = await asyncio.to_thread(submit_commands, server, 200, 50)
        await churn
        end = await settled_last_index(server)
        assert end - start > 300, "too little activity to prove anything"
        assert accepted == 200

        p_all = await pic.rec.until(all_p, end)
        p_some = await pic.rec.until(some_p, end)
        w_all = await wsl.rec.until(all_w, end)
        w_node = await wsl.rec.until(node_w, end)
        g_all = await grpc_all.until(end)
        g_some = await grpc_some.until(end)

        assert_exactly_once_in_order(p_all.indices, 0, end, "picows after_index=0")
        assert_exactly_once_in_order(w_all.indices, start, end, "websockets")
        assert_exactly_once_in_order(g_all.indices, 0, end, "grpc after_index=0")
        # Three independent clients saw the same events (index, topic, type, key).
        assert p_all.keys() == g_all.keys()
        assert p_all.keys()[start:] == w_all.keys()
        types = {e["type"] for e in w_all.events}
        assert {"node.registered", "node.drain", "node.eligibility"} <= types, types
        assert any(t.startswith("command.") for t in types), types
        # Filters: exactly the matching subset of the unfiltered stream.
        want_some = filtered(w_all.events, lambda e: e["topic"] == "node" and e["key"] in keys)
        assert want_some and p_some.indices == want_some and g_some.indices == want_some
        first_live = w_node.events[0]["index"] if w_node.events else end
        want_node = filtered(
            w_all.events, lambda e: e["topic"] in ("node", "command") and e["index"] >= first_live
        )
        assert w_node.indices == want_node
        # Payloads are the entity as JSON.
        node_event = next(e for e in p_all.events if e["topic"] == "node")
        assert node_event["payload"]["id"] == node_event["key"]
        # Idle streams get bookmarks with the latest index.
        assert p_some.bookmark == end and g_some.bookmark == end
        assert grpc_all.batches < len(g_all.events)  # batched on the wire
        fleet.stop()
        for client in (pic, wsl, grpc_all, grpc_some):
            await client.close()

    run(body(), 40)


def test_resume_with_after_index_across_disconnect_and_restart(server_factory: type) -> None:
    server: ServerProcess = server_factory.create().start()
    activity = Activity(server, workers=2, nodes_per_worker=3)
    seen: list[int] = []

    async def first() -> int:
        client = await PicowsClient.connect(server)
        sid = await client.subscribe(after_index=0)
        await activity.run_async(0.5)
        end = await settled_last_index(server, quiet=0.3)
        stream = await client.rec.until(sid, end)
        await client.close()
        # Take only part of what arrived: as if the client crashed mid-stream.
        seen.extend(stream.indices[: len(stream.indices) // 2])
        await activity.run_async(0.3)  # more events while disconnected
        client = await PicowsClient.connect(server)
        sid = await client.subscribe(after_index=seen[-1])
        end = await settled_last_index(server, quiet=0.3)
        stream = await client.rec.until(sid, end)
        seen.extend(stream.indices)
        assert_exactly_once_in_order(seen, 0, end, "resumed")
        await client.close()
        return end

    end = run(first())
    assert server.stop() == 0
    restarted: ServerProcess = server_factory.create(data_dir=server.data_dir).start()

    async def second() -> None:
        client = await PicowsClient.connect(restarted)
        sid = await client.subscribe(after_index=seen[-1])
        watcher = GrpcWatcher(restarted, after_index=end - 5)
        await Activity(restarted, workers=1, nodes_per_worker=2).run_async(0.3)
        new_end = await settled_last_index(restarted, quiet=0.3)
        stream = await client.rec.until(sid, new_end)
        assert_exactly_once_in_order(seen + stream.indices, 0, new_end, "across restart")
        types = [e["type"] for e in stream.events]
        assert types[:2] == ["system.stopping", "system.started"], types[:5]
        g = await watcher.until(new_end)
        assert_exactly_once_in_order(g.indices, end - 5, new_end, "grpc across restart")
        await client.close()
        await watcher.close()

    run(second())


def test_after_index_older_than_retention_gets_reset(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_EVENTS_RETENTION_COUNT="5").start()
    Activity(server, workers=1, nodes_per_worker=2).run(5.0, limit_per_worker=30)
    end = last_event_index(server)

    async def body() -> None:
        client = await PicowsClient.connect(server)
        # The pruner runs every pruning_interval (0.2s here).
        await asyncio.to_thread(wait_for, lambda: stored_events(server) == 5, 5)
        client.send({"op": "subscribe", "after_index": 1, "id": "old"})
        reply = await client.rec.reply()
        assert reply["type"] == "reset" and reply["oldest_index"] == end - 4, reply
        assert reply == {
            "type": "reset",
            "after_index": 1,
            "oldest_index": reply["oldest_index"],
            "message": reply["message"],
            "id": "old",
        }
        assert f"oldest event kept is {reply['oldest_index']}" in reply["message"]
        # Re-list, then resume from the oldest kept: no error, contiguous to the end.
        sid = await client.subscribe(after_index=reply["oldest_index"] - 1)
        stream = await client.rec.until(sid, end)
        assert_exactly_once_in_order(stream.indices, reply["oldest_index"] - 1, end, "after reset")
        sid0 = await client.subscribe(after_index=0)
        assert (await client.rec.until(sid0, end)).indices[0] == reply["oldest_index"]
        await client.close()

    run(body())


def test_stalled_subscriber_is_cut_off_and_others_keep_their_pace(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_EVENTS_SUBSCRIBER_BUFFER="100").start()
    # 16 KB events: the stalled client's socket buffers (up to 4 MB on Linux) fill quickly.
    activity = Activity(server, workers=3, nodes_per_worker=4, big=True)

    async def burst(client: PicowsClient, sid: str, calls: int) -> None:
        """Publish ~3*calls events; return once ``sid`` has received all of them."""
        await activity.run_async(20, limit_per_worker=calls)
        await client.rec.until(sid, await settled_last_index(server, quiet=0.3))

    async def body() -> None:
        fast = await PicowsClient.connect(server)
        sid = await fast.subscribe()
        await burst(fast, sid, 200)

        slow = await PicowsClient.connect(server, rcvbuf=4096)
        slow_sid = await slow.subscribe()
        slow.pause_reading()  # stops reading: the server's socket fills, then it pauses
        # The fast subscriber gets the whole burst while its peer is stalled. (Its pace
        # against a no-stall baseline is a benchmark: bench/test_bench_fanout.py.)
        await burst(fast, sid, 200)
        wait_for(lambda: metric(server, "nexus_event_slow_consumer_disconnects_total") >= 1, 5)
        slow.resume_reading()
        code, reason = await asyncio.wait_for(slow.rec.closed, 5)
        assert code == 4008, (code, reason)
        match = re.fullmatch(r"slow consumer; resume after index (\d+)", reason)
        assert match, reason
        got = slow.rec.streams[slow_sid].indices
        assert got and int(match.group(1)) == got[-1]  # the last index it was sent
        # The fast subscriber is unaffected: everything, in order, and never cut off.
        end = last_event_index(server)
        fast_got = fast.rec.streams[sid].indices
        assert_exactly_once_in_order(fast_got, fast_got[0] - 1, end, "fast")
        assert not fast.rec.closed.done()
        assert metric(server, "nexus_event_slow_consumer_disconnects_total") == 1
        # The cut-off client resumes where it was told: no gap, no duplicate.
        again = await PicowsClient.connect(server)
        sid2 = await again.subscribe(after_index=int(match.group(1)))
        rest = await again.rec.until(sid2, end)
        assert_exactly_once_in_order(got + rest.indices, got[0] - 1, end, "slow resumed")
        for client in (fast, slow, again):
            await client.close()

    run(body(), 40)


def test_bad_input_gets_error_frames_or_close_codes(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(
        NEXUS_MAX_MESSAGE_SIZE="64KB",
        NEXUS_MAX_CONNECTIONS="12",
        NEXUS_EVENTS_MAX_SUBSCRIPTIONS="2",
    ).start()

    async def expect_error(client: PicowsClient, send: Any, code: str) -> None:
        send()
        reply = await client.rec.reply()
        assert reply["type"] == "error" and reply["code"] == code, reply

    async def expect_close(data: bytes, msg_type: WSMsgType, code: int, *more: bytes) -> None:
        client = await PicowsClient.connect(server)
        client.raw(msg_type, data, fin=not more)
        for i, chunk in enumerate(more):
            client.raw(WSMsgType.CONTINUATION, chunk, fin=i == len(more) - 1)
        got, _ = await asyncio.wait_for(client.rec.closed, 5)
        assert got == code, (msg_type, got)
        await client.close()

    async def body() -> None:
        observer = await PicowsClient.connect(server)
        obs = await observer.subscribe(after_index=0)
        bad = await PicowsClient.connect(server)
        await expect_error(
            bad, lambda: bad.raw(WSMsgType.TEXT, b'{"op": "subscribe",'), "bad_request"
        )
        await expect_error(bad, lambda: bad.raw(WSMsgType.TEXT, b"[1, 2]"), "bad_request")
        await expect_error(bad, lambda: bad.send({"no": "op"}), "bad_request")
        # With auth on, the op table is default deny and answers before the op is looked up.
        unknown = "unknown_op" if server.pki is None else "permission_denied"
        await expect_error(bad, lambda: bad.send({"op": "launch"}), unknown)
        await expect_error(
            bad, lambda: bad.send({"op": "subscribe", "topics": "node"}), "bad_request"
        )
        await expect_error(
            bad, lambda: bad.send({"op": "subscribe", "after_index": "7x"}), "bad_request"
        )
        await expect_error(bad, lambda: bad.send({"op": "subscribe", "keys": [1]}), "bad_request")
        await expect_error(
            bad, lambda: bad.send({"op": "unsubscribe", "subscription": 3}), "bad_request"
        )
        await expect_error(
            bad, lambda: bad.send({"op": "unsubscribe", "subscription": "s9"}), "not_found"
        )
        await expect_error(
            bad, lambda: bad.send({"op": "subscribe", "topics": ["nodes"]}), "invalid_argument"
        )
        await expect_error(
            bad, lambda: bad.send({"op": "subscribe", "after_index": 10**9}), "invalid_argument"
        )
        await expect_error(bad, lambda: bad.send({"op": "submit", "commands": "x"}), "bad_request")
        await expect_error(
            bad,
            lambda: bad.send({"op": "submit", "commands": [{"kind": 1, "bogus": 2}]}),
            "invalid_argument",
        )
        await bad.subscribe()
        await bad.subscribe()
        await expect_error(bad, lambda: bad.send({"op": "subscribe"}), "resource_exhausted")
        bad.send({"op": "ping", "id": 1})
        assert (await bad.rec.reply())["type"] == "pong"  # still serving after all that

        await expect_close(b"\x00\x01junk", WSMsgType.BINARY, 1003)
        await expect_close(b'{"op": "ping", "x": "\xff\xfe"}', WSMsgType.TEXT, 1007)
        await expect_close(b"x" * 100_000, WSMsgType.TEXT, 1009)
        await expect_close(b"[" * 10_000, WSMsgType.TEXT, 1009, *([b"[" * 10_000] * 10))
        await expect_close(b"{}", WSMsgType.CONTINUATION, 1002)

        # max_connections: the upgrade is refused with 503 while the others are fine.
        extra = [await PicowsClient.connect(server) for _ in range(10)]
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets_connect(server)
        assert info.value.response.status_code == 503
        for client in extra:
            await client.close()

        # The observer never noticed: it still gets every event, in order.
        start = observer.rec.streams[obs].position if obs in observer.rec.streams else 0
        await Activity(server, workers=1, nodes_per_worker=2).run_async(0.3)
        end = last_event_index(server)
        stream = await observer.rec.until(obs, end)
        assert_exactly_once_in_order(stream.indices, 0, end, "observer")
        assert start <= end
        assert server.http("/ready")[0] == 200
        await observer.close()
        await bad.close()

    run(body())


def test_submit_over_websocket_and_see_its_events(server_factory: type) -> None:
    server: ServerProcess = server_factory.create().start()

    async def body() -> None:
        client = await PicowsClient.connect(server)
        sid = await client.subscribe(topics=["command"])
        client.send(
            {
                "op": "submit",
                "id": "c",
                "commands": [{"idempotency_key": "ws-1", "kind": "echo", "payload": "aGk="}],
            }
        )
        reply = await client.rec.reply()
        assert reply["type"] == "submitted" and reply["id"] == "c", reply
        assert reply["results"][0]["id"] == "ws-1" and reply["index"] > 0
        stream = await client.rec.until(sid, reply["index"])
        assert stream.events and all(e["key"] == "ws-1" for e in stream.events)
        assert stream.events[-1]["index"] <= reply["index"]
        assert stream.events[0]["payload"]["spec"]["kind"] == "echo"
        client.send({"op": "submit", "id": "d", "commands": [{"kind": ""}]})
        reply = await client.rec.reply()
        assert reply["type"] == "error" and reply["code"] == "invalid_argument", reply
        await client.close()

    run(body())


def test_submit_payload_must_be_strict_base64(server_factory: type) -> None:
    """Issue 10 defect 4: "!!!" was stored as b'' (json_format drops what is not base64)."""
    server: ServerProcess = server_factory.create().start()

    async def body() -> None:
        client = await PicowsClient.connect(server)
        for payload in ["!!!", "aGk=!", "aGk==", "QR", "a", "ab-/", "aG k="]:
            client.send(
                {
                    "op": "submit",
                    "id": payload,
                    "commands": [
                        {"idempotency_key": "b64-bad", "kind": "echo", "payload": payload}
                    ],
                }
            )
            reply = await client.rec.reply()
            assert reply["type"] == "error" and reply["code"] == "invalid_argument", reply
            assert reply["id"] == payload, reply
            assert reply["message"].startswith("commands[0].payload: "), reply
        # Both proto3 JSON alphabets, padded or not, still work.
        for i, payload in enumerate(["aGk=", "aGk", "-_-_", "+/+/"]):
            key = f"b64-ok-{i}"
            client.send(
                {
                    "op": "submit",
                    "commands": [{"idempotency_key": key, "kind": "echo", "payload": payload}],
                }
            )
            reply = await client.rec.reply()
            assert reply["type"] == "submitted", reply
        await client.close()

    run(body())
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        assert control.GetCommand(pb.GetCommandRequest(id="b64-ok-0")).spec.payload == b"hi"
        assert control.GetCommand(pb.GetCommandRequest(id="b64-ok-1")).spec.payload == b"hi"
        assert (
            control.GetCommand(pb.GetCommandRequest(id="b64-ok-2")).spec.payload == b"\xfb\xff\xbf"
        )
        assert (
            control.GetCommand(pb.GetCommandRequest(id="b64-ok-3")).spec.payload == b"\xfb\xff\xbf"
        )
        with pytest.raises(grpc.RpcError) as info:
            control.GetCommand(pb.GetCommandRequest(id="b64-bad"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_frame_with_rsv_bits_closes_with_1002(server_factory: type) -> None:
    """Issue 10 defect 4: RSV bits without a negotiated extension are a protocol error."""
    server: ServerProcess = server_factory.create().start()

    async def body() -> None:
        for rsv in ({"rsv1": True}, {"rsv2": True}, {"rsv3": True}):
            client = await PicowsClient.connect(server)
            assert client.transport is not None
            client.transport.send(WSMsgType.TEXT, b'{"op": "ping", "id": 1}', True, **rsv)
            code, reason = await asyncio.wait_for(client.rec.closed, 5)
            assert (code, reason) == (1002, "RSV bits set"), rsv
            await client.close()
        # The same frame without RSV bits is fine.
        client = await PicowsClient.connect(server)
        client.send({"op": "ping", "id": 2})
        assert (await client.rec.reply())["type"] == "pong"
        await client.close()

    run(body())
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert log.count("bad websocket request from 127.0.0.1") == 1, log[-3000:]
    assert metric(server, "nexus_bad_requests_total") == 3
