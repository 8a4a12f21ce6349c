"""Structured logging for nexus_fast: one line per event, text or JSON.

Usage::

    configure_logging("info", "json")
    log = get_logger("grpc")
    log.info("node registered", extra={"node_id": "n1", "addr": "10.0.0.5:4000"})

JSON lines carry ``ts`` (RFC 3339 UTC, ms), ``level``, ``component``, ``msg``, every
``extra=`` field, and ``exc`` (formatted traceback) when ``exc_info`` is set. Records at
WARNING and above from the third-party ``grpc``, ``aiohttp``, ``asyncio`` and
``opentelemetry`` (span export) loggers go through the same handler with ``component`` set
to their logger name.
With a ``file`` the lines go to that file instead of stderr, rotated by size (the stdlib
``RotatingFileHandler``), daily, or not at all (an outside logrotate). The file is written
by a thread behind a queue, so a slow disk or a rotation never stalls the event loop.
Calling :func:`configure_logging` again swaps level, format and destination at once (hot
reload).
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import time
from typing import IO, Any, Final

import orjson

from nexus_fast.telemetry.trace_context import TraceIdFilter

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "get_logger"]

ROOT_NAME: Final = "nexus"
THIRD_PARTY_LOGGERS: Final = ("grpc", "aiohttp", "asyncio", "opentelemetry")

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_FORMATS: Final = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_KEYS: Final = frozenset({"ts", "level", "component", "msg", "exc", "stack"})
_HANDLER_MARK: Final = "_nexus_fast_handler"

_handler: logging.Handler | None = None
_listener: logging.handlers.QueueListener | None = None


def get_logger(component: str) -> logging.Logger:
    """Return the logger for a component, named ``nexus.<component>``."""
    return logging.getLogger(f"{ROOT_NAME}.{component}")


def _component(name: str) -> str:
    if name.startswith(ROOT_NAME + "."):
        return name[len(ROOT_NAME) + 1 :]
    return name


def _timestamp(created: float) -> str:
    # gmtime floors to whole seconds, matching how LogRecord derives msecs.
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """Formats a record as one orjson-encoded JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the JSON line (no trailing newline) for ``record``."""
        payload: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "component": _component(record.name),
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            # Never let a caller's extra clobber a core field; keep it under a prefixed key.
            payload[f"extra.{key}" if key in _CORE_KEYS else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return _dumps(payload)


def _dumps(payload: dict[str, Any]) -> str:
    try:
        return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        # orjson rejects some values without calling `default` (e.g. ints over 64 bits).
        safe = {k: v if isinstance(v, str) else str(v) for k, v in payload.items()}
        return orjson.dumps(safe).decode()


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    """Formats ``<ts> LEVEL component: msg key=value ...``; tracebacks indented below."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the text line for ``record`` (plus indented traceback lines, if any)."""
        # Escape newlines so each event stays on one line.
        msg = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        parts = [
            f"{_timestamp(record.created)} {record.levelname:<5} {_component(record.name)}: {msg}"
        ]
        parts.extend(f"{k}={_text_value(v)}" for k, v in _extras(record).items())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        trailer = record.exc_text or ""
        if record.stack_info:
            trailer = f"{trailer}\n{self.formatStack(record.stack_info)}".lstrip("\n")
        if trailer:
            line += "\n" + "\n".join("    " + t for t in trailer.splitlines())
        return line


class _ThirdPartyFilter(logging.Filter):
    """Passes all nexus records; only WARNING+ from the routed third-party loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == ROOT_NAME or record.name.startswith(ROOT_NAME + "."):
            return True
        return record.levelno >= logging.WARNING


def _file_handler(path: str, rotation: str, max_bytes: int, max_files: int) -> logging.Handler:
    """The handler writing ``path``; ``max_files`` counts the live file and rotated copies."""
    if rotation == "size":
        return logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=max_files - 1, encoding="utf-8"
        )
    if rotation == "daily":
        return logging.handlers.TimedRotatingFileHandler(
            path, when="midnight", backupCount=max_files - 1, encoding="utf-8", utc=True
        )
    # Rotated by someone else (logrotate): reopen when the file is moved away.
    return logging.handlers.WatchedFileHandler(path, encoding="utf-8")


def _stop_listener() -> None:
    """Flush and stop the file writer thread (at exit, or when the destination changes)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.close()
        _listener = None


atexit.register(_stop_listener)


def configure_logging(
    level: str,
    fmt: str,
    stream: IO[str] | None = None,
    *,
    file: str = "",
    rotation: str = "size",
    max_bytes: int = 100 * 1024 * 1024,
    max_files: int = 5,
) -> None:
    """Install (or replace) the nexus handler on the ``nexus`` logger hierarchy.

    Idempotent: a previous handler installed by this function is removed first. The root
    logger is not touched; ``nexus`` and the routed third-party loggers stop propagating so
    each event is written exactly once.

    Args:
        level: debug | info | warning | error | critical (case-insensitive).
        fmt: ``"text"`` or ``"json"``.
        stream: destination when there is no ``file``; defaults to ``sys.stderr``.
        file: a log file instead of the stream (empty: the stream).
        rotation: ``size`` (at ``max_bytes``), ``daily`` (at UTC midnight) or ``none``.
        max_files: the live file plus rotated copies kept (>= 2).

    Raises:
        ValueError: unknown level, format or rotation.
        OSError: the file cannot be opened (the previous handler then stays).
    """
    levelno = _LEVELS.get(level.lower())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}")
    if fmt.lower() not in _FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(_FORMATS)}")
    if rotation not in ("size", "daily", "none"):
        raise ValueError(f"unknown log rotation {rotation!r}; expected size, daily or none")

    global _handler, _listener
    formatter = JsonFormatter() if fmt.lower() == "json" else TextFormatter()
    handler: logging.Handler
    file_handler = None
    if file:
        file_handler = _file_handler(file, rotation, max_bytes, max(2, max_files))
        # The queue handler formats on the caller's thread (one line, extras intact); the
        # writer thread only writes that line and rotates.
        file_handler.setFormatter(logging.Formatter("%(message)s"))
        handler = logging.handlers.QueueHandler(queue.SimpleQueue())
    else:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    handler.addFilter(_ThirdPartyFilter())
    handler.addFilter(TraceIdFilter())  # trace_id=... on lines of a traced request
    setattr(handler, _HANDLER_MARK, True)

    for name in (ROOT_NAME, *THIRD_PARTY_LOGGERS):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if getattr(old, _HANDLER_MARK, False):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
        if name != ROOT_NAME:
            # Deterministic WARNING+ routing regardless of what the root level happens to be.
            logger.setLevel(logging.WARNING)
    logging.getLogger(ROOT_NAME).setLevel(levelno)
    if _handler is not None:
        _handler.close()  # StreamHandler.close does not close the underlying stream.
    _stop_listener()  # after the swap: lines logged before it are written, then the file closes
    _handler = handler
    if file_handler is not None:
        assert isinstance(handler, logging.handlers.QueueHandler)
        _listener = logging.handlers.QueueListener(handler.queue, file_handler)
        _listener.start()
