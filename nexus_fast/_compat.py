"""The one place that reads the hot-path switches (see STYLE.md).

``NEXUS_NO_EXTENSIONS=1`` forces the pure-Python twins everywhere.
``NEXUS_REQUIRE_EXTENSIONS=1`` turns a failed import of a compiled twin into an error
instead of a fallback (production images and benchmarks set it).
"""

from __future__ import annotations

import os

__all__ = ("NO_EXTENSIONS", "REQUIRE_EXTENSIONS")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


NO_EXTENSIONS: bool = _env_flag("NEXUS_NO_EXTENSIONS")
REQUIRE_EXTENSIONS: bool = _env_flag("NEXUS_REQUIRE_EXTENSIONS") and not NO_EXTENSIONS
