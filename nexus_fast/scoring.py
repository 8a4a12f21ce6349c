"""Node scoring selector: the compiled kernel when it is built, numpy otherwise.

Both twins (``_scoring_c`` and ``_scoring_py``) implement the same ``Query``,
``pick_best(feat, n, mask, heartbeat, query, spread=None)`` and ``PlaceRun`` (a run of like
placements: one scan, then an argmax per pick and a re-score of the reserved node) with the
same arithmetic, so they choose the same node on the same input (tests/unit/test_scoring.py,
tests/unit/test_place_run.py);
the formulas are documented in ``nexus_fast/_scoring_py.py``. The compiled kernel has almost
no per-call cost and runs SIMD over blocks of nodes in one pass; numpy pays ~25 array
operations of fixed overhead per call and then several passes over whole rows and their
temporaries. The compiled twin is faster at every fleet size measured (figures below), so it
serves whenever it is built; with ``NEXUS_NO_EXTENSIONS=1`` (or no compiled build) numpy does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray

from ._compat import NO_EXTENSIONS, REQUIRE_EXTENSIONS
from ._scoring_py import (
    N_RESOURCES,
    N_ROWS,
    N_WEIGHTS,
    RESOURCE_NAMES,
    ROW_AVAIL,
    ROW_CAP,
    ROW_FREE,
    ROW_TASKS,
)
from ._scoring_py import pick_best as _numpy_pick

__all__ = (
    "IMPLEMENTATION",
    "N_RESOURCES",
    "N_ROWS",
    "N_WEIGHTS",
    "RESOURCE_NAMES",
    "ROW_AVAIL",
    "ROW_CAP",
    "ROW_FREE",
    "ROW_TASKS",
    "PlaceRun",
    "Query",
    "pick_best",
)

# Measured with bench/test_bench_scoring.py's fleet on the reference machine (2-core Xeon VM):
# compiled 1.2 us @ 100, 4.6 us @ 1k, 39 us @ 10k, 0.64 ms @ 100k, 7.3 ms @ 1M nodes; numpy
# 29 us @ 100, 37 us @ 1k, 80 us @ 10k, 1.2 ms @ 100k, 19 ms @ 1M. The compiled kernel wins at
# every size, so there is no crossover (before the blocked kernel the two met at ~6k nodes).
_UINT8: Final = np.dtype(np.uint8)

# ``Query`` is the compiled twin's when it is built (its kernel reads the C fields of that
# class only); the numpy twin reads the fields of either.
_compiled_pick: Callable[..., int] | None
if TYPE_CHECKING or NO_EXTENSIONS:
    from ._scoring_py import PlaceRun, Query

    _compiled_pick = None
    IMPLEMENTATION = "py"
else:
    try:
        from ._scoring_c import PlaceRun, Query
        from ._scoring_c import pick_best as _compiled_pick

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover - depends on the build
        if REQUIRE_EXTENSIONS:
            raise
        from ._scoring_py import PlaceRun, Query

        _compiled_pick = None
        IMPLEMENTATION = "py"


def pick_best(
    feat: NDArray[np.float32],
    n: int,
    mask: NDArray[np.uint8] | NDArray[np.bool_],
    heartbeat: NDArray[np.float64],
    query: Query,
    spread: NDArray[np.float32] | None = None,
) -> int:
    """Index (< n) of the best feasible node, or -1.

    ``mask`` is uint8 (0/1); a bool array is viewed as uint8 for the compiled twin.
    ``query`` is a ``Query`` of this module. Arguments and formulas: see
    ``nexus_fast._scoring_py``.
    """
    pick = _compiled_pick if _compiled_pick is not None else _numpy_pick
    dtype = mask.dtype
    if dtype is not _UINT8 and dtype == np.bool_:  # identity first: `==` costs ~70 ns a call
        mask = mask.view(np.uint8)
    return pick(feat, n, mask, heartbeat, query, spread)
