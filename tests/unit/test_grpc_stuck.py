"""nexus_fast.api.grpc_stuck: peer parsing and finding this process's socket of a peer."""

from __future__ import annotations

import socket

from nexus_fast.api.grpc_stuck import parse_peer, shutdown_peer_socket


def test_parse_peer() -> None:
    assert parse_peer("ipv4:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_peer("ipv6:[::1]:443") == ("::1", 443)
    assert parse_peer("unix:/tmp/sock") is None
    assert parse_peer("ipv4:127.0.0.1") is None
    assert parse_peer("") is None


def test_shutdown_finds_only_the_accepted_socket_of_that_peer() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        other = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted_other, _ = listener.accept()
        peer = client.getsockname()
        # Not on a listed local port: nothing is touched.
        assert not shutdown_peer_socket(peer, frozenset({port + 1}))
        assert shutdown_peer_socket(peer, frozenset({port}))
        assert client.recv(1) == b""  # the server side was shut down: EOF
        other.sendall(b"x")
        first = accepted_other if accepted_other.getpeername() == other.getsockname() else accepted
        assert first.recv(1) == b"x"  # the other connection is untouched
        for s in (client, other, accepted, accepted_other):
            s.close()
