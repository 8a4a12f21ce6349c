"""nexusctl's side of the wire: one grpc.aio channel per invocation, errors as exit codes.

Every gRPC failure becomes :class:`ServerError` (exit 3) with one line naming the server,
the status code and the server's message, never a traceback.

With several targets (replicas: ``--target h1:p1,h2:p2``) a call answered ``UNAVAILABLE``
(replica down or restarting, no leader elected yet) is tried again on the next target, or
on the leader the server names in ``nexus-leader``, within the request timeout. Every
ControlService call nexusctl makes is safe to repeat: reads, set-state writes, and
``SubmitCommands`` always carries an idempotency key then (one is generated per
invocation when none is given), so a retry after an unknown outcome finds the first
command instead of creating a second.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import click
import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_fast.ctl.config import Connection
from nexus_fast.node.channel import open_channel
from nexus_fast.node.targets import TargetList, fails_over, leader_hint
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

T = TypeVar("T")

# `submit --wait` asks the submit reply to wait this long at most (the server's cap on
# SubmitCommandsRequest.wait_ms); a longer wait goes on with WaitCommands.
SUBMIT_WAIT_S = 30.0

EXIT_OK = 0
EXIT_NOT_SUCCEEDED = 1  # the command failed, timed out, was cancelled, or the wait ended
EXIT_USAGE = 2  # click's own code for usage errors
EXIT_SERVER = 3  # the server refused the request or could not be reached

# Trailers the server sets on some errors (nexus_fast/api/status.py): worth showing.
_TRAILERS = ("nexus-oldest-index", "retry-after-ms", "nexus-resume-after-index")
_RESUME_TRAILER = "nexus-resume-after-index"
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Fail fast on a dead target instead of grpc's long default reconnect backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class ServerError(click.ClickException):
    """The server answered with an error status, or could not be reached (exit 3)."""

    exit_code = EXIT_SERVER


class NotSucceeded(click.ClickException):
    """A command ended failed, timed out or cancelled, or a wait ran out (exit 1)."""

    exit_code = EXIT_NOT_SUCCEEDED


def describe(target: str, err: grpc.aio.AioRpcError) -> str:
    """``<target>: NOT_FOUND: node 'x' not found`` (+ useful trailers), on one line."""
    details = " ".join((err.details() or "").split())
    line = f"{target}: {err.code().name}: {details or '(no message)'}"
    extras = [
        f"{key}={value}"
        for key, value in (err.trailing_metadata() or ())
        if key in _TRAILERS and isinstance(value, str)
    ]
    return line + (f" ({', '.join(extras)})" if extras else "")


class Client:
    """The ControlService and Health stubs on one channel (to the current target of
    ``conn.targets``); use as ``async with``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.targets = TargetList(conn.targets)
        self.channel: grpc.aio.Channel | None = None
        self.control: pb_grpc.ControlServiceStub
        self.health: health_pb2_grpc.HealthStub

    @property
    def target(self) -> str:
        """The target the channel goes to now."""
        return self.targets.current

    def _open(self) -> None:
        self.channel = open_channel(self.target, self.conn.auth, _CHANNEL_OPTIONS)
        # The generated stub class is untyped; through Any it adds no strict-mode error.
        stub: Any = pb_grpc.ControlServiceStub
        self.control = stub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> Client:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def fail_over(self, err: grpc.aio.AioRpcError, started: float) -> bool:
        """After ``err``: move to the next target and return True when the call should be
        tried again there (UNAVAILABLE, several targets, time left of the request timeout
        counted from ``started``, at most three passes over the targets)."""
        if len(self.targets.targets) < 2 or not fails_over(err.code()):
            return False
        if self.targets.failures >= 3 * len(self.targets.targets):
            return False
        delay = self.targets.next(leader_hint(err.trailing_metadata()))
        if time.monotonic() + delay - started > self.timeout:
            return False
        await asyncio.sleep(delay)
        await self._reopen()
        return True

    async def _reopen(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        self._open()

    async def rotate(self, err: grpc.aio.AioRpcError) -> None:
        """Move to the next target now (a long-running stream's own backoff waits)."""
        if len(self.targets.targets) > 1 and fails_over(err.code()):
            self.targets.next(leader_hint(err.trailing_metadata()))
            await self._reopen()

    async def retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` (which must read ``self.control``/``self.health`` when called), tried
        again on the next target while :meth:`fail_over` says so."""
        started = time.monotonic()
        while True:
            try:
                result = await call()
            except grpc.aio.AioRpcError as err:
                if not await self.fail_over(err, started):
                    raise
                continue
            self.targets.ok()
            return result

    @property
    def timeout(self) -> float:
        """The deadline of one unary call (``--request-timeout``)."""
        return self.conn.request_timeout

    async def unary(self, method: str, request: Any) -> Any:
        """Call a unary ControlService method by name with the request deadline."""

        async def once() -> Any:
            call: Callable[..., Awaitable[Any]] = getattr(self.control, method)
            return await call(request, timeout=self.timeout)

        return await self.retrying(once)

    async def pages(self, method: str, request: Any, field: str, limit: int) -> list[Any]:
        """Every item of a paginated List* call (up to ``limit``; 0 = all)."""
        out: list[Any] = []
        while True:
            response = await self.unary(method, request)
            out.extend(getattr(response, field))
            if (limit and len(out) >= limit) or not response.next_page_token:
                return out[:limit] if limit else out
            request.page_token = response.next_page_token

    async def wait(self, ids: list[str], timeout: float) -> list[pb.CommandRecord]:
        """The records of ``ids`` in that order: final ones as WaitCommands streamed them,
        and, for those still running when ``timeout`` ran out, their current record."""
        ids = list(dict.fromkeys(ids))
        request = pb.WaitCommandsRequest(ids=ids, timeout_ms=int(timeout * 1000))
        # The server ends the stream at timeout_ms; the call deadline only backs that up.
        deadline = timeout + self.timeout if timeout else None
        # A timeout ends the stream with a marker (empty id, wait_timed_out_ids): skipped,
        # the ids it lists are read below like any other that did not finish.

        async def stream() -> dict[str, pb.CommandRecord]:
            call = self.control.WaitCommands(request, timeout=deadline)
            return {r.id: r async for r in call if r.id}

        final = await self.retrying(stream)
        out = []
        for cid in ids:
            record = final.get(cid)
            if record is None:
                record = await self.unary("GetCommand", pb.GetCommandRequest(id=cid))
            out.append(record)
        return out

    async def submit_and_wait(
        self, request: pb.SubmitCommandsRequest, timeout: float | None
    ) -> tuple[pb.SubmitResult, list[pb.CommandRecord]]:
        """Submit one command and wait for its final record (``timeout`` None: no limit).

        One RPC (``wait_ms``) when it finishes within the server's cap; a command still
        running when the reply comes (or a server that ignores ``wait_ms``) is then waited
        for with WaitCommands, within what is left of ``timeout``.
        """
        started = time.monotonic()
        budget = SUBMIT_WAIT_S if timeout is None else min(timeout, SUBMIT_WAIT_S)
        request.wait_ms = max(1, int(budget * 1000))
        response = await self.retrying(
            lambda: self.control.SubmitCommands(request, timeout=self.timeout + budget)
        )
        result = response.results[0]
        if response.final:
            return result, list(response.final)
        if timeout is None:
            return result, await self.wait([result.id], 0)
        left = max(timeout - (time.monotonic() - started), 0.001)
        return result, await self.wait([result.id], left)

    async def serving(self) -> str:
        """The gRPC health status of the server as a whole (``SERVING``, ...)."""
        response = await self.retrying(
            lambda: self.health.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def run(conn: Connection, action: Callable[[Client], Awaitable[T]]) -> T:
    """Run ``action`` with a connected :class:`Client`; gRPC errors become exit 3."""

    client = Client(conn)

    async def main() -> T:
        async with client:
            return await action(client)

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as err:
        raise ServerError(describe(client.target, err) + _tried(client)) from None
    except BrokenPipeError:
        raise  # stdout closed (`| head`): click exits quietly
    except (OSError, ssl.SSLError) as err:  # e.g. an unreadable TLS file
        raise ServerError(f"{client.target}: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def new_idempotency_key() -> str:
    """A key for one ``commands submit`` invocation (it becomes the command id)."""
    return f"ctl-{uuid.uuid4().hex}"


def _tried(client: Client) -> str:
    """`` (after failing over N times; targets a, b)`` when the client moved, else ``""``."""
    if not client.targets.failovers:
        return ""
    targets = ", ".join(client.targets.targets)
    return f" (after failing over {client.targets.failovers} times; targets {targets})"


# ---------------------------------------------------------------- events


async def follow_events(
    client: Client,
    request: pb.WatchEventsRequest,
    *,
    follow: bool,
    idle: float,
    on_event: Callable[[pb.Event], None],
    on_reconnect: Callable[[str], None],
) -> None:
    """Feed every event of a WatchEvents stream to ``on_event``, in index order, once.

    Without ``follow``: stop at the first bookmark (the server has nothing newer that
    matches) or after ``idle`` seconds without a batch. With ``follow``: run until
    interrupted; when the stream breaks with UNAVAILABLE (server restart, network) or the
    server cuts it off as a slow consumer, open it again with ``after_index`` = the last
    index printed (or the last bookmark, which also covers events the filter skipped), so
    nothing is missed or printed twice.
    """
    resume: int | None = request.after_index if request.HasField("after_index") else None
    failures = 0
    while True:
        if resume is not None:
            request.after_index = resume
        try:
            async for batch in _batches(client, request, None if follow else idle):
                failures = 0
                client.targets.ok()
                if batch is None:  # quiet for `idle` seconds: caught up
                    return
                for event in batch.events:
                    if resume is not None and event.index <= resume:
                        continue  # defensive: never print an index twice
                    on_event(event)
                    resume = event.index
                if not batch.events:
                    resume = max(resume or 0, batch.bookmark_index)
                    if not follow:
                        return
            if not follow:
                return
            reason = "stream ended"
        except grpc.aio.AioRpcError as err:
            reason = describe(client.target, err)
            if await client.fail_over(err, time.monotonic()):
                on_reconnect(f"{reason}; resuming on {client.target}")
                continue  # another replica: resume there after the same index
            if not follow or not _resumable(err):
                raise
            await client.rotate(err)
        # Full-jitter backoff, 0.2 s doubling to 5 s: a restarting server is back quickly.
        delay = random.uniform(0, min(5.0, 0.2 * 2**failures))
        failures += 1
        on_reconnect(
            f"{reason}; reconnecting in {delay:.1f}s, resuming after index {resume or 'now'}"
        )
        await asyncio.sleep(delay)


def _resumable(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE (restart, network), or cut off as a slow consumer (RESOURCE_EXHAUSTED
    with a resume index): reconnecting and resuming by index loses nothing."""
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    trailers = {key for key, _ in (err.trailing_metadata() or ())}
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _RESUME_TRAILER in trailers


async def _batches(
    client: Client, request: pb.WatchEventsRequest, idle: float | None
) -> AsyncIterator[pb.EventBatch | None]:
    """The stream's batches; ``None`` once ``idle`` seconds pass without one (the first
    batch gets the request timeout: connecting and a first bookmark take longer)."""
    call = client.control.WatchEvents(request)
    try:
        iterator = call.__aiter__()
        wait = max(idle, client.timeout) if idle is not None else None
        while True:
            try:
                if wait is None:
                    batch = await iterator.__anext__()
                else:
                    batch = await asyncio.wait_for(iterator.__anext__(), wait)
                    wait = idle
            except StopAsyncIteration:
                return
            except TimeoutError:
                yield None
                return
            yield batch
    finally:
        call.cancel()


# ---------------------------------------------------------------- HTTP health


def health_detailed(conn: Connection) -> dict[str, Any]:
    """GET ``<http>/health/detailed`` (blocking; run outside the event loop)."""
    assert conn.http is not None
    url = conn.http + "/health/detailed"
    context = conn.auth.ssl_context() if url.startswith("https://") else None
    request = urllib.request.Request(url, headers=conn.auth.http_headers())
    try:
        with urllib.request.urlopen(request, timeout=conn.request_timeout, context=context) as r:
            body = r.read()
    except urllib.error.HTTPError as err:
        body = err.read()  # 503 still carries the detail
        if err.code != 503:
            raise ServerError(f"{url}: HTTP {err.code}: {body[:200]!r}") from None
    except (OSError, ValueError) as err:
        raise ServerError(f"{url}: {getattr(err, 'reason', err)}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise ServerError(f"{url}: not JSON: {body[:200]!r}") from None
    if not isinstance(doc, dict):
        raise ServerError(f"{url}: unexpected answer {doc!r:.200}")
    return doc
