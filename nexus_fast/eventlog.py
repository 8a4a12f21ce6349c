"""Stored-event reader selector: the compiled twin unless NEXUS_NO_EXTENSIONS=1 (see STYLE.md).

``event_head`` reads the bus's fields of a serialized event without building a message;
``collect_batch`` joins a catch-up batch straight from LMDB's zero-copy views (see
``nexus_fast._eventlog_py``, the typed source of truth).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._compat import NO_EXTENSIONS, REQUIRE_EXTENSIONS

__all__ = ("IMPLEMENTATION", "MalformedEvent", "collect_batch", "event_head")

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._eventlog_py import MalformedEvent, collect_batch, event_head

    IMPLEMENTATION = "py"
else:
    try:
        from ._eventlog_c import MalformedEvent, collect_batch, event_head

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover - depends on the build
        if REQUIRE_EXTENSIONS:
            raise
        from ._eventlog_py import MalformedEvent, collect_batch, event_head

        IMPLEMENTATION = "py"
