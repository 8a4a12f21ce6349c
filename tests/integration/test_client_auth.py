"""Client credentials of nexus-node and nexus-bench: TLS, mTLS and the bearer token.

The server does not check tokens yet, so that the token is sent is observed on a test
peer of our own: a tiny grpc.aio NodeService whose server interceptor records the
``authorization`` metadata of every call. TLS and mTLS run against the real server.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from nexus_fast.benchmark.common import NodePool
from nexus_fast.benchmark.procs import free_ports
from nexus_fast.node import ClientAuth, parse_args, run_fleet
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from tests.pki import Pki, write_pki

from .conftest import ServerProcess, list_all_nodes, run_module, wait_for

pytestmark = pytest.mark.integration

TOKEN = "test-token.abc.def"


class _Recorder(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Notes (method, authorization metadata) of every call the peer receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        metadata = dict(details.invocation_metadata or ())
        self.calls.append((details.method, metadata.get("authorization")))
        return await continuation(details)


class _NodePeer(pb_grpc.NodeServiceServicer):  # type: ignore[misc]
    """Just enough NodeService for a node to register and hold its stream."""

    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterResponse:
        return pb.RegisterResponse(session_epoch=1, config=pb.NodeConfig(heartbeat_interval_ms=200))

    async def Connect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for _ in request_iterator:  # until the node half-closes or cancels
            pass
        return
        yield  # a stream handler


async def _peer(pki: Pki | None) -> tuple[grpc.aio.Server, _Recorder, str]:
    recorder = _Recorder()
    server = grpc.aio.server(interceptors=[recorder])
    pb_grpc.add_NodeServiceServicer_to_server(_NodePeer(), server)
    (port,) = free_ports(1)
    target = f"127.0.0.1:{port}"
    if pki is None:
        server.add_insecure_port(target)
    else:
        creds = grpc.ssl_server_credentials(
            [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
            root_certificates=pki.ca.read_bytes(),
            require_client_auth=True,
        )
        server.add_secure_port(target, creds)
    await server.start()
    return server, recorder, target


def _fleet_against_peer(pki: Pki | None, argv: list[str]) -> _Recorder:
    """Run the nexus-node fleet with ARGV against a recording peer (until it exits, 0)."""

    async def scenario() -> _Recorder:
        server, recorder, target = await _peer(pki)
        try:
            assert await run_fleet(parse_args(["--target", target, *argv])) == 0
        finally:
            await server.stop(None)
        return recorder

    return asyncio.run(scenario())


def _methods(recorder: _Recorder) -> set[str]:
    return {method.rsplit("/", 1)[-1] for method, _ in recorder.calls}


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mtls"])
def test_nexus_node_sends_the_token_on_every_call(
    tls: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = write_pki(tmp_path / "pki") if tls else None
    monkeypatch.setenv("NEXUS_TOKEN", TOKEN)  # the variable, not the flag

    argv = ["--nodes", "3", "--duration", "1", "--status-interval", "0"]
    if pki is not None:
        argv += ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)]
        argv += ["--tls-key", str(pki.client_key), "--deregister-on-exit"]
    recorder = _fleet_against_peer(pki, argv)
    assert {"Register", "Connect"} <= _methods(recorder)
    assert recorder.calls and all(auth == f"Bearer {TOKEN}" for _, auth in recorder.calls)


def test_without_a_token_no_authorization_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NEXUS_TOKEN", raising=False)

    recorder = _fleet_against_peer(
        None, ["--nodes", "1", "--duration", "0.5", "--status-interval", "0"]
    )
    assert recorder.calls and all(auth is None for _, auth in recorder.calls)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mtls"])
def test_nexus_bench_nodes_send_the_token(tls: bool, tmp_path: Path) -> None:
    pki = write_pki(tmp_path / "pki") if tls else None
    auth = ClientAuth(
        tls_ca=str(pki.ca) if pki else None,
        tls_cert=str(pki.client_cert) if pki else None,
        tls_key=str(pki.client_key) if pki else None,
        token=TOKEN,
    )

    async def scenario() -> _Recorder:
        server, recorder, target = await _peer(pki)
        pool = NodePool(target, 2, auth, prefix="auth-")
        try:
            await pool.start()
            await pool.nodes[0].heartbeat()  # a write on the (intercepted) stream works
            # The write is queued client-side: wait (bounded) until the peer saw the
            # stream open, or a loaded machine closes the pool before it arrives.
            for _ in range(100):
                if "Connect" in _methods(recorder):
                    break
                await asyncio.sleep(0.1)
        finally:
            await pool.close()
            await server.stop(None)
        return recorder

    recorder = asyncio.run(scenario())
    assert _methods(recorder) == {"Register", "Connect"}
    assert len(recorder.calls) == 4
    assert all(auth == f"Bearer {TOKEN}" for _, auth in recorder.calls)


def test_worker_spec_keeps_the_token_out_of_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = ClientAuth(tls_ca="ca.pem", token=TOKEN)
    spec = json.dumps(auth.to_dict())
    assert TOKEN not in spec
    monkeypatch.setenv("NEXUS_TOKEN", auth.env()["NEXUS_TOKEN"])  # what the worker inherits
    assert ClientAuth.from_dict(json.loads(spec)) == auth


# ------------------------------------------------------------------ the real server, mTLS


def _mtls_server(server_factory: type, pki: Pki) -> ServerProcess:
    server: ServerProcess = server_factory.create(
        NEXUS_TLS_ENABLED="true",
        NEXUS_TLS_CERT_FILE=str(pki.server_cert),
        NEXUS_TLS_KEY_FILE=str(pki.server_key),
        NEXUS_TLS_CA_FILE=str(pki.ca),
    )
    return server.start()


def _tls_flags(pki: Pki) -> list[str]:
    return [
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.client_cert),
        "--tls-key",
        str(pki.client_key),
    ]


def test_nexus_node_and_bench_over_mtls(
    tmp_path: Path, server_factory: type, fleet_factory: type
) -> None:
    pki = write_pki(tmp_path / "pki")
    server = _mtls_server(server_factory, pki)
    fleet = fleet_factory.create(server.grpc_target, 5, *_tls_flags(pki), "--token", TOKEN)
    creds = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    with grpc.secure_channel(server.grpc_target, creds) as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(
            lambda: sum(n.connected for n in list_all_nodes(control, (pb.NODE_STATUS_READY,))) == 5,
            30,
            0.2,
            "the mTLS fleet is ready:\n" + fleet.log(),
        )
    assert fleet.stop() == 0

    out = tmp_path / "bench.json"
    proc = run_module(
        "nexus_fast.benchmark.cli",
        "dispatch",
        "--target",
        server.grpc_target,
        "--http",
        str(server.http_port),
        *_tls_flags(pki),
        "--duration",
        "1",
        "--nodes",
        "5",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    ours = json.loads(out.read_text())["results"][0]
    assert ours["errors"] == 0 and ours["count"] > 0


def test_nexus_node_without_client_certificate_cannot_register(
    tmp_path: Path, server_factory: type, fleet_factory: type
) -> None:
    pki = write_pki(tmp_path / "pki")
    server = _mtls_server(server_factory, pki)
    fleet = fleet_factory.create(server.grpc_target, 1, "--tls-ca", str(pki.ca), "--duration", "2")
    assert fleet.proc.wait(30) == 0
    log = fleet.log()
    # "Register at <target> failed (UNAVAILABLE ...)": the node names the target it tried.
    assert re.search(r"Register at \S+ failed \(UNAVAILABLE", log) and "registered=0" in log, log


def test_nexus_bench_websocket_subscribers_send_the_token() -> None:
    """The events scenario's subscribers put the token in the upgrade's Authorization."""
    from picows import WSListener, WSMsgType, ws_create_server

    from nexus_fast.benchmark.scenarios.events import FanoutStats, connect_subscribers

    seen: list[str | None] = []

    class Peer(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == WSMsgType.TEXT:  # a subscribe op
                transport.send(WSMsgType.TEXT, b'{"type":"subscribed"}')

    def factory(request: Any) -> Peer:
        seen.append(request.headers.get("Authorization"))
        return Peer()

    async def scenario(auth: ClientAuth) -> None:
        server = await ws_create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/v1/events"
        try:
            transports = await connect_subscribers(url, 3, FanoutStats(), auth=auth)
            for transport in transports:
                transport.disconnect()
        finally:
            server.close()

    asyncio.run(scenario(ClientAuth(token=TOKEN)))
    assert seen == [f"Bearer {TOKEN}"] * 3
    seen.clear()
    asyncio.run(scenario(ClientAuth()))
    assert seen == [None] * 3
