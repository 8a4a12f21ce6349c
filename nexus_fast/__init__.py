"""nexus_fast: the control plane of a compute fabric."""

from __future__ import annotations

import importlib

# The one version source: pyproject.toml reads it (dynamic = ["version"]).
__version__ = "0.1.0"

__all__ = ("HOT_PATHS", "__version__", "implementation")

# Selector modules (``nexus_fast.<name>``) of the hot paths that have a compiled twin.
# Each exposes ``IMPLEMENTATION = "c" | "py"``; add a name here when a new trio lands.
HOT_PATHS: tuple[str, ...] = ("ring", "queue", "scoring", "eventlog", "commands")


def implementation() -> dict[str, str]:
    """Say which twin runs for each hot path, e.g. ``{"ring": "c", "queue": "c"}``.

    Imports the selector modules lazily, so importing ``nexus_fast`` stays cheap.
    """
    return {
        name: str(importlib.import_module(f"{__name__}.{name}").IMPLEMENTATION)
        for name in HOT_PATHS
    }
