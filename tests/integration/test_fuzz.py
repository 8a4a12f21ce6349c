"""Fuzz the real server: every gRPC request message and the WebSocket protocol.

gRPC: for every method of every service the server registers (read from the service
descriptors, so a new method is covered without touching this file), hypothesis builds
request messages field by field (random values, out-of-range numbers, huge strings and
bytes, unknown enum values, nested messages) and also sends raw mutated bytes through a
bytes serializer. WebSocket: random JSON ops, random text (invalid UTF-8), raw bytes that
are not frames, fragmented floods and control-frame abuse, over a raw socket.

Every input must get a typed answer: a gRPC status other than UNKNOWN/INTERNAL with a
message, or a WebSocket ``error`` frame (code + message) or close frame (code + reason);
the server never crashes, and a rejected input changes nothing (a digest of the store's
tables and the last event index is the same before and after). Inputs that once failed
are kept under ``tests/fuzz_corpus/`` and replayed first. ``NEXUS_FUZZ_EXAMPLES`` sets
the examples per method and per WebSocket case (``make fuzz``: 2000).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pd
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_fast.pb import fabric_pb2 as pb

from .conftest import HOST, REPO, ServerProcess

EXAMPLES = int(os.environ.get("NEXUS_FUZZ_EXAMPLES", "5"))
CORPUS = REPO / "tests" / "fuzz_corpus"
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
UNTYPED = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def _methods() -> list[pd.MethodDescriptor]:
    found = []
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            found.extend(service.methods)
    return found


METHODS = {f"{m.containing_service.full_name}/{m.name}": m for m in _methods()}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module (the fuzzers run many examples against it)."""
    root = tmp_path_factory.mktemp("fuzz")
    # Nodes that fuzzed Register calls create never heartbeat: with the default 30 s timeout
    # they would go down (an event) in the middle of a later check, which is not the input's.
    server = ServerProcess(root / "data", root / "server.log", NEXUS_NODE_TIMEOUT="1h").start()
    yield server
    server.kill()


def digest(server: ServerProcess) -> str:
    """The store's table sizes (audit aside: refusals are audited) and last event index."""
    _, body, _ = server.http("/health/detailed")
    store = json.loads(body)["components"]["store"]
    entries = {k: v for k, v in store.get("entries", {}).items() if k != "audit"}
    return json.dumps([entries, store["last_event_index"]], sort_keys=True)


def keep(kind: str, name: str, data: bytes) -> Path:
    """Save an input that failed, so the corpus replays it first from now on."""
    folder = CORPUS / kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('/', '~')}-{hashlib.sha256(data).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ gRPC strategies

_INT_RANGES = {
    pd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    pd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    pd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_HUGE = 512 * 1024  # a huge field, under the 4 MB message limit (that one has its test)


def _scalar(field: pd.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, -1 if lo else 2]))
    if t in (pd.FieldDescriptor.TYPE_FLOAT, pd.FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == pd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pd.FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 40)  # open enums: unknown values reach the server
    if t == pd.FieldDescriptor.TYPE_STRING:
        return st.one_of(
            st.text(max_size=40),
            st.sampled_from(["", "node-00000", "a" * 129, "../etc/passwd", "\x00", "x" * _HUGE]),
        )
    return st.one_of(st.binary(max_size=64), st.just(b"\xff" * _HUGE))


@st.composite
def messages(draw: st.DrawFn, desc: pd.Descriptor, depth: int = 0) -> Any:
    """A message of type ``desc`` with a random subset of its fields set."""
    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if not draw(st.booleans()):
            continue
        sub = field.message_type
        if sub is not None and sub.GetOptions().map_entry:
            key_f, value_f = sub.fields_by_name["key"], sub.fields_by_name["value"]
            target = getattr(msg, field.name)
            for _ in range(draw(st.integers(0, 3))):
                key = draw(_scalar(key_f))
                if value_f.message_type is not None:
                    if depth < 2:
                        target[key].CopyFrom(draw(messages(value_f.message_type, depth + 1)))
                else:
                    target[key] = draw(_scalar(value_f))
        elif field.is_repeated:
            target = getattr(msg, field.name)
            for _ in range(draw(st.integers(0, 3))):
                if sub is not None:
                    if depth < 2:
                        target.add().CopyFrom(draw(messages(sub, depth + 1)))
                else:
                    target.append(draw(_scalar(field)))
        elif sub is not None:
            if depth < 2:
                getattr(msg, field.name).CopyFrom(draw(messages(sub, depth + 1)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


@st.composite
def mutated(draw: st.DrawFn, desc: pd.Descriptor) -> bytes:
    """A valid encoding with bytes flipped, cut or inserted; or plain random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=256))
    data = bytearray(draw(messages(desc)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == 1:
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def call(channel: grpc.Channel, method: pd.MethodDescriptor, data: bytes) -> grpc.StatusCode:
    """Send ``data`` as the (first) request; the status the call ends with (OK if it did)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        # No serializers: the bytes go on the wire as they are.
        if method.client_streaming:
            responses = channel.stream_stream(path)(iter([data]), timeout=1.5)
            for _ in responses:
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(data, timeout=1.5):
                pass
        else:
            channel.unary_unary(path)(data, timeout=5)
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and (
            method.server_streaming or method.client_streaming
        ):
            return grpc.StatusCode.OK  # a stream it accepted and kept open until our deadline
        assert code not in UNTYPED, f"{path}: untyped {code.name}: {err.details()}"
        assert err.details(), f"{path}: {code.name} without a message"
        return code
    return grpc.StatusCode.OK


def check_grpc(server: ServerProcess, channel: grpc.Channel, name: str, data: bytes) -> None:
    """One input: typed answer, no crash, no state change when rejected (else kept)."""
    before = digest(server)
    try:
        code = call(channel, METHODS[name], data)
        assert server.proc is not None and server.proc.poll() is None, "server died"
        if code != grpc.StatusCode.OK:
            after = digest(server)
            assert after == before, (
                f"{name}: rejected ({code.name}) yet changed {before} -> {after}"
            )
    except AssertionError as exc:
        raise AssertionError(f"{exc} (kept as {keep('grpc', name, data)})") from None


def test_grpc_corpus_replays_first(fuzz_server: ServerProcess) -> None:
    files = sorted((CORPUS / "grpc").glob("*.bin"))
    assert files, "the corpus holds the inputs that once failed"
    with fuzz_server.channel() as channel:
        for path in files:
            name = path.name.rsplit("-", 1)[0].replace("~", "/")
            assert name in METHODS, f"{path.name}: unknown method {name}"
            check_grpc(fuzz_server, channel, name, path.read_bytes())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_grpc_method_fuzz(fuzz_server: ServerProcess, name: str) -> None:
    method = METHODS[name]
    with fuzz_server.channel() as channel:

        @FUZZ_SETTINGS
        @given(
            st.one_of(
                messages(method.input_type).map(lambda m: m.SerializeToString()),
                mutated(method.input_type),
            )
        )
        def one(data: bytes) -> None:
            check_grpc(fuzz_server, channel, name, data)

        one()


# ------------------------------------------------------------------ WebSocket


def ws_frame(
    opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One client frame (masked, as RFC 6455 requires of clients, unless ``mask=False``)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWs:
    """A WebSocket client on a plain socket: sends anything, records what comes back."""

    def __init__(self, server: ServerProcess) -> None:
        self.sock = socket.create_connection((HOST, server.ws_port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /v1/events HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "no handshake answer"
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False  # the server closed on us already: what it sent is read below

    def frames(self, quiet: float = 0.3) -> tuple[list[tuple[int, bytes]], bool]:
        """Frames received until ``quiet`` seconds pass without any, and whether it closed."""
        self.sock.settimeout(quiet)
        eof = False
        while True:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            self.buf += chunk
        out = []
        data = self.buf
        while len(data) >= 2:
            opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
            if n == 126:
                n, at = struct.unpack("!H", data[2:4])[0], 4
            elif n == 127:
                n, at = struct.unpack("!Q", data[2:10])[0], 10
            if len(data) < at + n:
                break
            out.append((opcode, data[at : at + n]))
            data = data[at + n :]
        return out, eof

    def close(self) -> None:
        self.sock.close()


def check_ws(server: ServerProcess, data: bytes, we_close: bool = False) -> None:
    """Send ``data`` after the handshake; every answer must be typed (else kept)."""
    before = digest(server)
    client = RawWs(server)
    try:
        client.send(data)
        frames, eof = client.frames()
        rejected = False
        for opcode, payload in frames:
            if opcode == 0x8:  # close: a code, and a reason unless it echoes ours
                assert len(payload) >= 2, "close frame without a code"
                code = struct.unpack("!H", payload[:2])[0]
                assert 1000 <= code < 5000 and code not in (1005, 1006), code
                assert we_close or payload[2:], f"close {code} without a reason"
                rejected = rejected or code != 1000
            elif opcode == 0x1:
                reply = json.loads(payload)
                assert "type" in reply, reply
                if reply["type"] == "error":
                    assert reply.get("code") and reply.get("message"), reply
                    rejected = True
        if eof and not any(op == 0x8 for op, _ in frames):
            raise AssertionError("connection dropped without a close frame")
        assert server.proc is not None and server.proc.poll() is None, "server died"
        if rejected:
            time.sleep(0.05)  # anything it wrongly did would be committed by now
            assert digest(server) == before, "a rejected WebSocket input changed state"
    except AssertionError as exc:
        raise AssertionError(f"{exc} (kept as {keep('ws', 'ws', data)})") from None
    finally:
        client.close()


def test_ws_corpus_replays_first(fuzz_server: ServerProcess) -> None:
    files = sorted((CORPUS / "ws").glob("*.bin"))
    assert files, "the corpus holds the inputs that once failed"
    for path in files:
        check_ws(fuzz_server, path.read_bytes())


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_ops = st.fixed_dictionaries(
    {"op": st.sampled_from(["subscribe", "unsubscribe", "submit", "", "SUBSCRIBE", "nope"])},
    optional={
        "id": _json_values,
        "topics": _json_values,
        "keys": _json_values,
        "after_index": st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
        "subscription": _json_values,
        "commands": st.lists(
            st.dictionaries(
                st.sampled_from(
                    [
                        "kind",
                        "payload",
                        "target_node",
                        "priority",
                        "timeout_ms",
                        "max_attempts",
                        "idempotency_key",
                    ]
                ),
                _json_values,
                max_size=5,
            ),
            max_size=3,
        ),
    },
)

WS_CASES: dict[str, tuple[st.SearchStrategy[bytes], bool]] = {
    # (strategy of the bytes sent after the handshake, whether it sends a close itself)
    "json_ops": (_ops.map(lambda op: ws_frame(0x1, json.dumps(op).encode())), False),
    "random_text": (st.binary(max_size=200).map(lambda b: ws_frame(0x1, b)), False),
    "invalid_utf8": (
        st.binary(max_size=50).map(lambda b: ws_frame(0x1, b + b"\xc3\x28\xff")),
        False,
    ),
    "not_frames": (st.binary(min_size=1, max_size=300), False),
    "binary_frames": (st.binary(max_size=100).map(lambda b: ws_frame(0x2, b)), False),
    # Just past the 4 MB message limit in many small fragments: closed 1009, never buffered.
    "fragment_flood": (
        st.sampled_from([4096, 16384, 65536]).map(
            lambda size: (
                ws_frame(0x1, b"[", fin=False)
                + b"".join(
                    ws_frame(0x0, b"1" * size, fin=False) for _ in range((4 << 20) // size + 2)
                )
            )
        ),
        False,
    ),
    "control_abuse": (
        st.one_of(
            st.binary(min_size=126, max_size=300).map(lambda b: ws_frame(0x9, b)),  # ping > 125
            st.binary(max_size=10).map(lambda b: ws_frame(0x9, b, fin=False)),  # fragmented ping
            st.just(ws_frame(0x8, b"\x03")),  # close with a 1-byte body
            st.integers(0, 999).map(lambda c: ws_frame(0x8, struct.pack("!H", c) + b"bad")),
            st.binary(max_size=20).map(lambda b: ws_frame(0x1, b, mask=False)),  # unmasked
            st.integers(1, 7).map(lambda r: ws_frame(0x1, b"{}", rsv=r)),  # reserved bits
            st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]).map(lambda o: ws_frame(o, b"x")),
            st.just(ws_frame(0x0, b"continuation of nothing")),
        ),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(WS_CASES))
def test_ws_fuzz(fuzz_server: ServerProcess, case: str) -> None:
    strategy, we_close = WS_CASES[case]
    # Each flood is 4 MB on the wire: a few make the point.
    examples = max(2, EXAMPLES // 100) if case == "fragment_flood" else EXAMPLES

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(strategy)
    def one(data: bytes) -> None:
        check_ws(fuzz_server, data, we_close)

    one()


def test_server_still_answers_after_the_fuzzing(fuzz_server: ServerProcess) -> None:
    assert fuzz_server.http("/live")[0] == 200
    log = fuzz_server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
