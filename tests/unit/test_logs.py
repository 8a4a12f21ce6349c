"""Tests for nexus_fast.logs: JSON and text line shapes, extras, tracebacks, routing."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from nexus_fast.logs import ROOT_NAME, THIRD_PARTY_LOGGERS, configure_logging, get_logger

TS_RE = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    names = (ROOT_NAME, *THIRD_PARTY_LOGGERS)
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level,
            logging.getLogger(n).propagate)
        for n in names
    }  # fmt: skip
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines(stream)]


def test_get_logger_name() -> None:
    assert get_logger("grpc").name == "nexus.grpc"


def test_json_line_shape_and_extras() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    get_logger("grpc").info(
        "node %s registered",
        "n1",
        extra={"node_id": "n1", "count": 3, "tags": {"a": [1, 2]}, "obj": Opaque()},
    )
    [rec] = json_lines(out)
    assert rec["level"] == "info"
    assert rec["component"] == "grpc"
    assert rec["msg"] == "node n1 registered"
    assert re.fullmatch(TS_RE, rec["ts"])
    assert rec["node_id"] == "n1" and rec["count"] == 3
    assert rec["tags"] == {"a": [1, 2]}
    assert rec["obj"] == "opaque!"  # non-serializable -> str
    assert "exc" not in rec


def test_json_extra_cannot_clobber_core_fields() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    get_logger("ws").info("hi", extra={"level": "fake", "component": "x"})
    [rec] = json_lines(out)
    assert rec["level"] == "info" and rec["component"] == "ws"
    assert rec["extra.level"] == "fake"


def test_json_huge_int_does_not_break_logging() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    get_logger("x").info("big", extra={"n": 1 << 70})
    [rec] = json_lines(out)
    assert rec["n"] == str(1 << 70)


def test_json_exc_info() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("store").exception("commit failed", extra={"batch": 7})
    [rec] = json_lines(out)  # one line even with a traceback
    assert rec["level"] == "error"
    assert rec["msg"] == "commit failed"
    assert rec["batch"] == 7
    assert "Traceback (most recent call last)" in rec["exc"]
    assert "RuntimeError: boom" in rec["exc"]


def test_json_multiline_message_stays_one_line() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    get_logger("x").debug("a\nb")
    [rec] = json_lines(out)
    assert rec["msg"] == "a\nb" and rec["level"] == "debug"


def test_text_format_shape() -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    get_logger("grpc").info("message", extra={"key": "value", "key2": "two words", "n": 5})
    [line] = lines(out)
    assert re.fullmatch(TS_RE + r' INFO  grpc: message key=value key2="two words" n=5', line), line


def test_text_warning_and_traceback_indented() -> None:
    out = io.StringIO()
    configure_logging("info", "text", stream=out)
    get_logger("http").warning("slow\nrequest")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        get_logger("http").error("failed", exc_info=True)
    first, second, *trace = lines(out)
    assert re.fullmatch(TS_RE + r" WARNING http: slow\\nrequest", first), first
    assert re.fullmatch(TS_RE + r" ERROR http: failed", second), second
    assert trace and all(t.startswith("    ") for t in trace)
    assert trace[-1].strip() == "ZeroDivisionError: division by zero"


def test_level_filtering_and_validation() -> None:
    out = io.StringIO()
    configure_logging("WARNING", "json", stream=out)
    log = get_logger("x")
    log.info("hidden")
    log.warning("shown")
    assert [r["msg"] for r in json_lines(out)] == ["shown"]
    with pytest.raises(ValueError):
        configure_logging("verbose", "json", stream=out)
    with pytest.raises(ValueError):
        configure_logging("info", "xml", stream=out)


def test_idempotent_replaces_own_handler_only() -> None:
    foreign = logging.NullHandler()
    logging.getLogger(ROOT_NAME).addHandler(foreign)
    root_handlers = list(logging.getLogger().handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "text", stream=second)
    get_logger("x").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1
    assert foreign in logging.getLogger(ROOT_NAME).handlers
    assert logging.getLogger().handlers == root_handlers


def test_third_party_loggers_routed_at_warning() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    logging.getLogger("aiohttp.access").info("GET / 200")  # below WARNING: dropped
    logging.getLogger("asyncio").debug("noise")
    logging.getLogger("asyncio").warning("slow callback")
    logging.getLogger("grpc._cython").error("channel broke")
    recs = json_lines(out)
    assert [(r["component"], r["level"], r["msg"]) for r in recs] == [
        ("asyncio", "warning", "slow callback"),
        ("grpc._cython", "error", "channel broke"),
    ]
