"""The one error table (api/status.py): every core error has a row, and rows say the same
thing the documentation and the adapters' constants say."""

from __future__ import annotations

import inspect

import grpc
import pytest

from nexus_fast import errors
from nexus_fast.api import bad_input, status
from nexus_fast.api.ws_server import CLOSE_SLOW_CONSUMER


def _error_classes() -> list[type[errors.NexusError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.NexusError) and cls is not errors.NexusError
    ]


def _instance(cls: type[errors.NexusError]) -> errors.NexusError:
    samples: dict[type[errors.NexusError], errors.NexusError] = {
        errors.InvalidArgument: errors.InvalidArgument("field", "bad"),
        errors.NodeNotFound: errors.NodeNotFound("n1"),
        errors.ResourceExhausted: errors.ResourceExhausted("full", retry_after=2.5),
        errors.QueueFull: errors.QueueFull("queue full", retry_after=0.25),
        errors.StoreFull: errors.StoreFull(),
        errors.EventIndexTooOld: errors.EventIndexTooOld(3, 10),
        errors.SlowConsumer: errors.SlowConsumer(41, 5000),
        errors.UndecodableRequest: errors.UndecodableRequest("nexus.fabric.v1.NodeMessage"),
    }
    return samples.get(cls) or cls("message")


def test_every_error_class_has_its_own_row() -> None:
    classes = _error_classes()
    assert len(classes) >= 13  # guards the discovery itself
    rows = {row.error for row in status.TABLE}
    missing = [cls.__name__ for cls in classes if cls not in rows]
    assert not missing, f"add a row to nexus_fast/api/status.py for: {missing}"


def test_rows_are_ordered_subclasses_first() -> None:
    # Each error must land on its own row, not on an earlier base class's.
    for cls in _error_classes():
        assert status.row(_instance(cls)).error is cls, cls


@pytest.mark.parametrize(
    ("error", "code", "frame", "http"),
    [
        (errors.InvalidArgument("f", "m"), grpc.StatusCode.INVALID_ARGUMENT, "error", 400),
        (errors.UndecodableRequest("X"), grpc.StatusCode.INVALID_ARGUMENT, "error", 400),
        (errors.NodeNotFound("n"), grpc.StatusCode.NOT_FOUND, "error", 404),
        (errors.AlreadyExists("k", "k"), grpc.StatusCode.ALREADY_EXISTS, "error", 409),
        (errors.EventIndexTooOld(1, 9), grpc.StatusCode.OUT_OF_RANGE, "reset", 410),
        (errors.SlowConsumer(7, 1), grpc.StatusCode.RESOURCE_EXHAUSTED, "close", 429),
        (errors.QueueFull("q"), grpc.StatusCode.RESOURCE_EXHAUSTED, "error", 429),
        (errors.StoreFull(), grpc.StatusCode.RESOURCE_EXHAUSTED, "error", 507),
        (errors.Unavailable("u"), grpc.StatusCode.UNAVAILABLE, "error", 503),
    ],
)
def test_documented_mappings(
    error: errors.NexusError, code: grpc.StatusCode, frame: str, http: int
) -> None:
    assert status.grpc_status(error) == code
    assert status.row(error).ws_frame == frame
    assert status.http_status(error) == http


def test_unknown_nexus_error_is_internal() -> None:
    class Odd(errors.NexusError):
        pass

    assert status.grpc_status(Odd()) == grpc.StatusCode.INTERNAL
    assert status.error_code(Odd()) == "internal"
    assert status.http_status(Odd()) == 500


def test_error_codes_and_close_codes() -> None:
    assert status.error_code(errors.QueueFull("q")) == "resource_exhausted"
    assert status.error_code(errors.NotFound("x")) == "not_found"
    assert status.error_code(errors.UndecodableRequest("X")) == "bad_request"
    assert status.ws_close_code(errors.SlowConsumer(7, 1)) == CLOSE_SLOW_CONSUMER == 4008
    assert status.ws_close_code(errors.QueueFull("q")) is None
    close_rows = [row for row in status.TABLE if row.ws_frame == "close"]
    assert all(row.ws_close is not None for row in close_rows)


def test_trailers_and_headers_carry_the_numbers() -> None:
    assert status.grpc_trailers(errors.QueueFull("q", retry_after=0.25)) == (
        ("retry-after-ms", "250"),
    )
    assert status.grpc_trailers(errors.EventIndexTooOld(3, 10)) == (("nexus-oldest-index", "10"),)
    assert status.grpc_trailers(errors.SlowConsumer(41, 1)) == (("nexus-resume-after-index", "41"),)
    assert status.grpc_trailers(errors.NodeNotFound("n")) == ()
    assert status.http_headers(errors.QueueFull("q", retry_after=0.25)) == {"Retry-After": "1"}
    assert status.http_headers(errors.StoreFull()) == {"Retry-After": "5"}
    assert status.http_headers(errors.NotFound("x")) == {}


def test_undecodable_request_message() -> None:
    assert str(errors.UndecodableRequest("nexus.fabric.v1.RegisterRequest")) == (
        "request is not a valid nexus.fabric.v1.RegisterRequest"
    )


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:50123", "127.0.0.1"),
        ("ipv6:[::1]:50123", "::1"),
        ("10.0.0.2:8081", "10.0.0.2"),
        ("10.0.0.2", "10.0.0.2"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
        ("", ""),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert bad_input.peer_host(peer) == host


def test_bad_input_logs_once_per_peer_and_stays_bounded(caplog: pytest.LogCaptureFixture) -> None:
    bad_input._last.clear()
    with caplog.at_level("WARNING", logger="nexus.bad_input"):
        for _ in range(100):
            bad_input.report("grpc", "undecodable", "ipv4:10.1.1.1:1", "junk")
        bad_input.report("grpc", "undecodable", "ipv4:10.1.1.2:1", "junk")
    assert len(caplog.records) == 2
    for i in range(bad_input.MAX_PEERS + 10):
        bad_input.report("http", "bad_status_line", f"10.2.{i // 256}.{i % 256}", "junk")
    assert len(bad_input._last) <= bad_input.MAX_PEERS
    bad_input._last.clear()
