"""Benchmark fixtures: the twin modules of each hot path, looked up by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import pytest


def _load_twin(hot_path: str, impl: str) -> ModuleType:
    name = f"nexus_fast._{hot_path}_{impl}"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"{name} is not built ({exc}); run `make install`", pytrace=False)


@pytest.fixture(scope="session")
def load_twin() -> Callable[[str, str], ModuleType]:
    """``load_twin("ring", "c")`` -> ``nexus_fast._ring_c``; fails if it is not built."""
    return _load_twin
