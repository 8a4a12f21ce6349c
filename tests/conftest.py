"""Shared fixtures: every behavioural test of a hot path runs against both twins.

``ring_impl`` / ``queue_impl`` / ``scoring_impl`` are parametrised over ``"c"`` and ``"py"``
and yield the twin module (``nexus_fast._ring_c`` / ``nexus_fast._ring_py``, ...). With
``NEXUS_NO_EXTENSIONS=1`` only ``"py"`` is generated. Otherwise a missing compiled twin
FAILS the ``"c"`` tests (build it with ``make install``): never a silent skip.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from hypothesis import settings

from nexus_fast._compat import NO_EXTENSIONS, REQUIRE_EXTENSIONS

# Shared CI machines are slow and noisy: no per-example deadline.
settings.register_profile("nexus", deadline=None)
settings.load_profile("nexus")

IMPLEMENTATIONS: list[str] = ["py"] if NO_EXTENSIONS else ["c", "py"]


def _load_twin(hot_path: str, impl: str) -> ModuleType:
    name = f"nexus_fast._{hot_path}_{impl}"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        why = "NEXUS_REQUIRE_EXTENSIONS=1 is set" if REQUIRE_EXTENSIONS else "it is not built"
        pytest.fail(
            f"compiled twin {name} cannot be imported ({exc}) and {why}; "
            "run `make install`, or set NEXUS_NO_EXTENSIONS=1 to test the pure twins only",
            pytrace=False,
        )


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def ring_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The EventRing twin module under test (``_ring_c`` or ``_ring_py``)."""
    return _load_twin("ring", request.param)


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def queue_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The CommandQueue twin module under test (``_queue_c`` or ``_queue_py``)."""
    return _load_twin("queue", request.param)


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def scoring_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The node-scoring twin module under test (``_scoring_c`` or ``_scoring_py``)."""
    return _load_twin("scoring", request.param)


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def eventlog_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The stored-event reader twin under test (``_eventlog_c`` or ``_eventlog_py``)."""
    return _load_twin("eventlog", request.param)
