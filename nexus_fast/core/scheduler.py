"""Scheduler: filter and score placements over a feature-major node matrix.

Layout. Every node has a dense slot (a column); the data the scorer reads are one float32
row per feature (``nexus_fast.scoring``: per resource unreserved, available and total
capacity; the task count), a float64 row of last heartbeats and a bool row "schedulable".
Arrays grow by doubling; a removed node's slot goes on a free list and is reused.
Everything is updated INCREMENTALLY, in O(1) per heartbeat, reservation or release; nothing
is rebuilt per decision.

Score on reservations, filter on max(usage, reserved). Per resource, clamped to
``[0, capacity]``:

- free (``ROW_FREE``, scored) = capacity - reserved, the scheduler's own bookkeeping (the sum
  of the requests placed on the node and not released), exact at every placement;
- available (``ROW_AVAIL``, filtered) = capacity - max(reported usage, reserved).

Why not score on usage: usage reports lag placements (heartbeats come every 0.5-5 s; a task
placed a moment ago is not in the node's last report yet), so a usage-based score ranks a
node by what it looked like at its last heartbeat, and every placement until the next one
herds onto the node that looked emptiest then. This is the herd effect: in an end-to-end
test 10,000 zero-request placements on 100 identical nodes landed 23..225 per node instead
of ~100. Kubernetes and Nomad score on allocations (requests), not live usage, for the same
reason. Usage still guards feasibility: a node whose own report shows a resource exhausted
(load from outside the fabric, tasks using more than they asked for) takes no new work that
needs it. Usage and reservations describe the same load once the report catches up, so
they are not added (that would count every task twice): the larger one wins. Since a
placement needs ``available >= request`` and ``available <= capacity - reserved``,
reservations never exceed capacity: a batch never over-commits a node.

Filter: schedulable (ready, eligible, not draining: the caller decides and says so with
``set_schedulable``), labels match the selector, not excluded, ``available >= request`` on
every requested resource. Label matching never scans dicts per node: each (key, value) pair
has a bool mask over the slots, updated on upsert and removal, and a selector is an AND of
masks. Score and tie-break: ``nexus_fast.scoring`` (formulas in ``nexus_fast._scoring_py``):
least-allocated, most-allocated (bin-packing) and balanced allocation on the free
(unreserved) capacity and the task count, spread by a label key and heartbeat freshness,
weighted by ``SchedulerConfig``, ties broken by ``rng``.

Spread: for a spread key ``k`` the scheduler counts, per node, the reserved tasks placed with
that key, and per value of label ``k`` the sum over the nodes carrying it; a node's spread
count is its value's sum. Nodes without label ``k`` form one group of their own. The index
for a key is built on its first use and then maintained incrementally like the rest.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from nexus_fast.config import SchedulerConfig
from nexus_fast.core.slots import NodeSlots
from nexus_fast.errors import NodeNotFound
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.scoring import (
    N_RESOURCES,
    N_ROWS,
    RESOURCE_NAMES,
    ROW_AVAIL,
    ROW_CAP,
    ROW_FREE,
    ROW_TASKS,
    PlaceRun,
    Query,
    pick_best,
)

__all__ = ("Placement", "PlacementRequest", "Scheduler")

# Capacity stored for an absent resource (and free slots): free/cap is then 0/tiny = 0,
# never 0/0, and such a resource can only satisfy a zero request.
CAP_FLOOR: Final = 1e-6
INITIAL_SLOTS: Final = 64
NOT_SCHEDULABLE: Final = "not schedulable (draining, not ready or ineligible)"

Vec = tuple[float, float, float, float]
_INF: Final = math.inf
_ZERO: Final[Vec] = (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """What to place: a resource request and where it may go."""

    request: pb.Resources = field(default_factory=pb.Resources)
    label_selector: Mapping[str, str] = field(default_factory=dict)
    # Anti-affinity: prefer nodes whose value of this label holds the fewest such tasks.
    spread_key: str = ""
    # If set, only this node is considered (it must still pass the filter).
    target_node: str = ""
    # Nodes of earlier failed attempts.
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Placement:
    """The chosen node, or ``node_id=None`` and the reason nothing fits."""

    node_id: str | None
    reason: str = ""
    # The node's slot in the shared NodeSlots (-1 when not placed): its queue lane is slot + 1.
    slot: int = -1

    @property
    def placed(self) -> bool:
        return self.node_id is not None


def _node_vec(res: pb.Resources) -> Vec:
    """A node's capacity/usage: non-finite or negative readings count as 0."""
    return (
        _clean(res.cpu),
        _clean(res.memory),
        _clean(res.gpu),
        _clean(res.disk),
    )


def _clean(v: float) -> float:
    return v if v > 0.0 and math.isfinite(v) else 0.0


def _request_vec(res: pb.Resources) -> Vec:
    vec = (res.cpu, res.memory, res.gpu, res.disk)
    # One chained test per value (NaN fails every comparison); this runs per placement.
    c, m, g, d = vec
    if 0.0 <= c < _INF and 0.0 <= m < _INF and 0.0 <= g < _INF and 0.0 <= d < _INF:
        return vec
    for name, v in zip(RESOURCE_NAMES, vec):
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"request.{name} must be a finite number >= 0, got {v}")
    return vec  # pragma: no cover - the fast test above accepts every valid vector


class _SpreadIndex:
    """Per-value task counts for one spread key (group 0: nodes without the label)."""

    __slots__ = ("group", "group_count", "groups", "node_count")

    def __init__(self, slots: int) -> None:
        self.group = np.zeros(slots, np.int32)  # slot -> group id
        self.group_count = np.zeros(8, np.float32)  # group id -> tasks with this key
        self.groups: dict[str, int] = {}  # label value -> group id (>= 1)
        self.node_count: dict[int, int] = {}  # slot -> tasks with this key on it

    def group_of(self, value: str | None) -> int:
        if value is None:
            return 0
        gid = self.groups.get(value)
        if gid is None:
            gid = self.groups[value] = len(self.groups) + 1
            if gid >= self.group_count.shape[0]:
                grown = np.zeros(gid * 2, np.float32)
                grown[: self.group_count.shape[0]] = self.group_count
                self.group_count = grown
        return gid

    def move(self, slot: int, value: str | None) -> None:
        """Slot's label value changed (or the slot was filled/emptied)."""
        old = int(self.group[slot])
        new = self.group_of(value)
        if new != old:
            count = self.node_count.get(slot, 0)
            self.group_count[old] -= count
            self.group_count[new] += count
            self.group[slot] = new

    def add(self, slot: int, delta: int) -> None:
        count = self.node_count.get(slot, 0)
        delta = max(delta, -count)
        if count + delta:
            self.node_count[slot] = count + delta
        else:
            self.node_count.pop(slot, None)
        self.group_count[self.group[slot]] += delta


class Scheduler:
    """Places requests on nodes; see the module docstring for the model.

    ``last_heartbeat`` values and ``clock()`` must use the same clock (default:
    ``time.monotonic``, seconds, as ``core.fleet`` feeds it; freshness only needs ages).
    ``rng`` breaks ties (seed it for reproducible placements).
    """

    def __init__(
        self,
        weights: SchedulerConfig,
        node_timeout: float,
        rng: random.Random | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        slots: NodeSlots | None = None,
    ) -> None:
        self.reconfigure(weights, node_timeout)
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        size = INITIAL_SLOTS
        self._size = size
        self._n = 0  # high-water mark: slots [0, n) are scanned
        # Shared with the command queue (see core/slots.py); the scheduler holds the slot of
        # every node it knows, and _ids says which slots those are.
        self._slots = slots if slots is not None else NodeSlots()
        self._count = 0
        self._feat = np.zeros((N_ROWS, size), np.float32)
        self._feat[ROW_CAP : ROW_CAP + N_RESOURCES] = CAP_FLOOR
        self._heartbeat = np.full(size, np.inf, np.float64)
        self._schedulable = np.zeros(size, np.bool_)
        self._ids: list[str | None] = [None] * size
        self._labels: list[dict[str, str]] = [{} for _ in range(size)]
        self._why_not: list[str] = [""] * size
        self._capacity: list[Vec] = [_ZERO] * size
        self._usage: list[Vec] = [_ZERO] * size
        self._reserved: list[Vec] = [_ZERO] * size
        self._tasks: list[int] = [0] * size
        self._label_masks: dict[tuple[str, str], NDArray[np.bool_]] = {}
        self._label_nodes: dict[tuple[str, str], int] = {}
        self._spread: dict[str, _SpreadIndex] = {}
        # Number of live nodes per task count, to keep the fleet's max task count in O(1).
        self._task_hist: dict[int, int] = {}
        self._t_max = 0

    # ------------------------------------------------------------------ node data

    def reconfigure(self, weights: SchedulerConfig, node_timeout: float) -> None:
        """Score with these weights and this freshness horizon from the next placement on."""
        if not node_timeout > 0:
            raise ValueError("node_timeout must be > 0")
        self._weights = (
            float(weights.weight_least_allocated),
            float(weights.weight_most_allocated),
            float(weights.weight_balanced),
            float(weights.weight_spread),
            float(weights.weight_freshness),
        )
        self._timeout = float(node_timeout)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self._held(node_id) is not None

    @property
    def slots(self) -> NodeSlots:
        """The node -> slot index this scheduler numbers its columns by."""
        return self._slots

    def slot_of(self, node_id: str) -> int | None:
        return self._held(node_id)

    def node_at(self, slot: int) -> str:
        node_id = self._ids[slot] if 0 <= slot < self._n else None
        if node_id is None:
            raise IndexError(f"slot {slot} holds no node")
        return node_id

    def upsert_node(
        self,
        node_id: str,
        labels: Mapping[str, str],
        capacity: pb.Resources,
        usage: pb.Resources,
        schedulable: bool,
        last_heartbeat: float,
        *,
        reason: str = "",
    ) -> int:
        """Add a node or replace its data (reservations are kept); returns its slot.

        ``reason`` says why it is not schedulable (``"draining"``, ``"not ready"``, ...).
        """
        slot = self._held(node_id)
        if slot is None:
            slot = self._allocate(node_id)
        self._set_labels(slot, dict(labels))
        self._capacity[slot] = _node_vec(capacity)
        self._usage[slot] = _node_vec(usage)
        cap = self._capacity[slot]
        for j in range(N_RESOURCES):
            self._feat[ROW_CAP + j, slot] = max(cap[j], CAP_FLOOR)
        self._refresh(slot)
        self._heartbeat[slot] = last_heartbeat
        self._schedulable[slot] = schedulable
        self._why_not[slot] = "" if schedulable else (reason or NOT_SCHEDULABLE)
        return slot

    def update_usage(self, node_id: str, usage: pb.Resources, last_heartbeat: float) -> None:
        """The heartbeat path: new usage and heartbeat time, O(1)."""
        slot = self._slot(node_id)
        self._usage[slot] = _node_vec(usage)
        self._refresh(slot)
        self._heartbeat[slot] = last_heartbeat

    def set_schedulable(self, node_id: str, schedulable: bool, reason: str = "") -> None:
        """Ready, eligible and not draining (the caller decides); ``reason`` when not."""
        slot = self._slot(node_id)
        self._schedulable[slot] = schedulable
        self._why_not[slot] = "" if schedulable else (reason or NOT_SCHEDULABLE)

    def remove_node(self, node_id: str) -> bool:
        """Forget a node and its reservations; False if it was unknown."""
        slot = self._held(node_id)
        if slot is None:
            return False
        self._set_labels(slot, {})
        for index in self._spread.values():
            index.add(slot, -index.node_count.get(slot, 0))
            index.move(slot, None)
        self._set_tasks(slot, 0, removing=True)
        self._ids[slot] = None
        self._schedulable[slot] = False
        self._why_not[slot] = ""
        self._heartbeat[slot] = np.inf
        self._capacity[slot] = self._usage[slot] = self._reserved[slot] = _ZERO
        self._feat[:, slot] = 0.0
        self._feat[ROW_CAP : ROW_CAP + N_RESOURCES, slot] = CAP_FLOOR
        self._count -= 1
        self._slots.release(node_id)
        return True

    # ------------------------------------------------------------------ reservations

    def reserve(self, node_id: str, request: pb.Resources, spread_key: str = "") -> None:
        """Account a placement on the node: its request, one task, and its spread key."""
        self._reserve_slot(self._slot(node_id), _request_vec(request), spread_key)

    def release(self, node_id: str, request: pb.Resources, spread_key: str = "") -> bool:
        """Undo ``reserve`` (the task ended); False if the node is gone (nothing to do)."""
        slot = self._slots.get(node_id)  # _held(), inlined: once per finished command
        if slot is None or slot >= self._n or self._ids[slot] != node_id:
            return False
        req = _request_vec(request)
        tasks = self._tasks[slot] - 1 if self._tasks[slot] > 0 else 0
        if tasks == 0:
            self._reserved[slot] = _ZERO  # no float drift left behind
        else:
            r = self._reserved[slot]
            self._reserved[slot] = (
                max(r[0] - req[0], 0.0),
                max(r[1] - req[1], 0.0),
                max(r[2] - req[2], 0.0),
                max(r[3] - req[3], 0.0),
            )
        self._set_tasks(slot, tasks)
        if spread_key:
            index = self._spread.get(spread_key)
            if index is not None:
                index.add(slot, -1)
        self._refresh(slot)
        return True

    def tasks_of(self, node_id: str) -> int:
        return self._tasks[self._slot(node_id)]

    def reserved_of(self, node_id: str) -> dict[str, float]:
        return dict(zip(RESOURCE_NAMES, self._reserved[self._slot(node_id)]))

    def free_of(self, node_id: str) -> dict[str, float]:
        """Unreserved capacity, capacity - reserved, as the score sees it (float32, as stored)."""
        return self._row_of(node_id, ROW_FREE)

    def available_of(self, node_id: str) -> dict[str, float]:
        """Capacity - max(usage, reserved), as the filter sees it (float32, as stored)."""
        return self._row_of(node_id, ROW_AVAIL)

    def _row_of(self, node_id: str, row: int) -> dict[str, float]:
        slot = self._slot(node_id)
        return {name: float(self._feat[row + j, slot]) for j, name in enumerate(RESOURCE_NAMES)}

    # ------------------------------------------------------------------ placement

    def place(self, request: PlacementRequest, *, reserve: bool = True) -> Placement:
        """Choose a node for ``request``; on success reserve it there (unless told not to).

        The caller releases the reservation (``release``) when the task ends or the
        placement is abandoned.
        """
        req = _request_vec(request.request)
        if request.target_node:
            placement = self._check_target(request, req)
        else:
            placement = self._pick(request, req)
        if reserve and placement.slot >= 0:
            self._reserve_slot(placement.slot, req, request.spread_key)
        return placement

    def place_batch(self, requests: Sequence[PlacementRequest]) -> list[Placement]:
        """Place each request in order, reserving as it goes: a batch never over-commits.

        A run of the SAME request object (the caller shares one among like requests) with
        no target, selector, exclusion or spread goes through :meth:`_place_like`: the
        request check, the candidate mask and the clock read are made once for the run, and
        the fleet is scored once (``nexus_fast.scoring.PlaceRun``). Every pick is the one
        sequential placement would make at that clock reading (same scores, same random
        draws, same failures).
        """
        out: list[Placement] = []
        i, n = 0, len(requests)
        while i < n:
            request = requests[i]
            j = i + 1
            if not (
                request.target_node
                or request.label_selector
                or request.exclude
                or request.spread_key
            ):
                while j < n and requests[j] is request:
                    j += 1
            if j - i > 1:
                out.extend(self._place_like(request, j - i))
            else:
                out.append(self.place(request))
            i = j
        return out

    def _place_like(self, request: PlacementRequest, count: int) -> list[Placement]:
        """``count`` placements of one plain request (see :meth:`place_batch`).

        One ``PlaceRun``: the candidates are scored once, each pick is an argmax over the
        cached scores with a fresh random draw, and after each reservation only the reserved
        node is scored again (all of them when the fleet's largest task count moves).
        """
        req = _request_vec(request.request)
        n = self._n
        mask = self._candidates(request, n)
        if isinstance(mask, str):
            return [Placement(None, mask) for _ in range(count)]
        # One clock read for the run: the run is one loop turn, so no heartbeat lands between
        # its picks and every pick would see the same ages anyway.
        query = Query(req, self._weights, self._clock(), self._timeout, self._t_max)
        run = PlaceRun(self._feat, n, mask.view(np.uint8), self._heartbeat, query)
        best, rescore, draw = run.best, run.rescore, self._rng.getrandbits
        ids = self._ids
        out: list[Placement] = []
        failed: Placement | None = None
        for _ in range(count):
            slot = best(draw(62))  # a draw per pick, failed or not, as place() makes
            if slot < 0:
                # Nothing changes after a failed pick: the rest of the run fails alike.
                if failed is None:
                    failed = Placement(
                        None,
                        _no_match(request.label_selector)
                        if not mask.any()
                        else self._no_fit_reason(mask, n, req),
                    )
                out.append(failed)
                continue
            self._reserve_slot(slot, req, "")
            rescore(slot, self._t_max)
            out.append(Placement(ids[slot], "", slot))
        return out

    def _pick(self, request: PlacementRequest, req: Vec) -> Placement:
        n = self._n
        mask = self._candidates(request, n)
        if isinstance(mask, str):
            return Placement(None, mask)
        w = self._weights
        spread: NDArray[np.float32] | None = None
        s_max = 0.0
        if request.spread_key and w[3] != 0.0:
            index = self._spread_index(request.spread_key)
            spread = index.group_count[index.group[:n]]
            s_max = float(index.group_count.max())
        query = Query(
            req, w, self._clock(), self._timeout, self._t_max, s_max, self._rng.getrandbits(62)
        )
        slot = pick_best(self._feat, n, mask.view(np.uint8), self._heartbeat, query, spread)
        if slot < 0:
            # Why, worked out only now: an empty candidate set is rare, the check is not free.
            if not mask.any():
                return Placement(None, _no_match(request.label_selector))
            return Placement(None, self._no_fit_reason(mask, n, req))
        node_id = self._ids[slot]
        assert node_id is not None
        return Placement(node_id, "", slot)

    def _candidates(self, request: PlacementRequest, n: int) -> NDArray[np.bool_] | str:
        """Schedulable & label masks & not excluded, as a bool row over [0, n); or why not."""
        mask = self._schedulable[:n]
        selector = request.label_selector
        for key, value in selector.items():
            label_mask = self._label_masks.get((key, value))
            if label_mask is None:
                return _no_match(selector)
            mask = mask & label_mask[:n]  # a new array: the stored rows stay untouched
        if request.exclude:
            if not mask.any():
                return _no_match(selector)
            if not selector:
                mask = mask.copy()
            for node_id in request.exclude:
                slot = self._held(node_id)
                if slot is not None:
                    mask[slot] = False
            if not mask.any():
                where = f" matching labels {dict(selector)}" if selector else ""
                return (
                    f"every schedulable node{where} was excluded by earlier attempts "
                    f"({', '.join(sorted(request.exclude))})"
                )
        return mask

    def _no_fit_reason(self, mask: NDArray[np.bool_], n: int, req: Vec) -> str:
        """Why the filter found nothing: it reads availability (usage counts), so do we."""
        best = {
            j: float(self._feat[ROW_AVAIL + j, :n][mask].max())
            for j in range(N_RESOURCES)
            if req[j] > 0
        }
        short = [j for j, b in best.items() if b < np.float32(req[j])]
        if short:
            return "; ".join(
                f"no node has {req[j]:g} {RESOURCE_NAMES[j]} available (best: {best[j]:g})"
                for j in short
            )
        wanted = ", ".join(f"{req[j]:g} {RESOURCE_NAMES[j]}" for j in best)
        return f"no node has {wanted} available at once"

    def _check_target(self, request: PlacementRequest, req: Vec) -> Placement:
        node_id = request.target_node
        slot = self._held(node_id)
        if slot is None:
            return Placement(None, f"target node {node_id} is unknown")
        if node_id in request.exclude:
            return Placement(None, f"target node {node_id} was excluded by an earlier attempt")
        if not self._schedulable[slot]:
            return Placement(None, f"target node {node_id} is {self._why_not[slot]}")
        labels = self._labels[slot]
        selector = request.label_selector
        if any(labels.get(k) != v for k, v in selector.items()):
            return Placement(None, f"target node {node_id} does not match labels {dict(selector)}")
        for j in range(N_RESOURCES):
            avail = self._feat[ROW_AVAIL + j, slot]
            if req[j] > 0 and not avail >= np.float32(req[j]):
                return Placement(
                    None,
                    f"target node {node_id} has {float(avail):g} {RESOURCE_NAMES[j]} available, "
                    f"needs {req[j]:g}",
                )
        return Placement(node_id, "", slot)

    # ------------------------------------------------------------------ internals

    def _held(self, node_id: str) -> int | None:
        """The node's slot if this scheduler holds it (the index may list queue-only nodes)."""
        slot = self._slots.get(node_id)
        if slot is None or slot >= self._n or self._ids[slot] != node_id:
            return None
        return slot

    def _slot(self, node_id: str) -> int:
        slot = self._held(node_id)
        if slot is None:
            raise NodeNotFound(node_id)
        return slot

    def _allocate(self, node_id: str) -> int:
        slot = self._slots.acquire(node_id)
        while slot >= self._size:
            self._grow()
        if slot >= self._n:
            self._n = slot + 1
        self._count += 1
        self._ids[slot] = node_id
        self._tasks[slot] = 0
        self._reserved[slot] = _ZERO
        self._task_hist[0] = self._task_hist.get(0, 0) + 1
        return slot

    def _grow(self) -> None:
        old, size = self._size, self._size * 2

        def grown(a: NDArray[np.generic], fill: float | bool = 0) -> NDArray[np.generic]:
            b = np.full((*a.shape[:-1], size), fill, a.dtype)
            b[..., :old] = a
            return b

        feat = grown(self._feat)
        feat[ROW_CAP : ROW_CAP + N_RESOURCES, old:] = CAP_FLOOR
        self._feat = feat  # type: ignore[assignment]
        self._heartbeat = grown(self._heartbeat, np.inf)  # type: ignore[assignment]
        self._schedulable = grown(self._schedulable, False)  # type: ignore[assignment]
        for key, label_mask in self._label_masks.items():
            self._label_masks[key] = grown(label_mask, False)  # type: ignore[assignment]
        for index in self._spread.values():
            index.group = grown(index.group)  # type: ignore[assignment]
        extra = size - old
        self._ids.extend([None] * extra)
        self._labels.extend({} for _ in range(extra))
        self._why_not.extend([""] * extra)
        self._capacity.extend([_ZERO] * extra)
        self._usage.extend([_ZERO] * extra)
        self._reserved.extend([_ZERO] * extra)
        self._tasks.extend([0] * extra)
        self._size = size

    def _set_labels(self, slot: int, labels: dict[str, str]) -> None:
        old = self._labels[slot]
        if labels == old:
            return
        for pair in old.items() - labels.items():
            self._label_masks[pair][slot] = False
            left = self._label_nodes[pair] - 1
            if left:
                self._label_nodes[pair] = left
            else:  # forget empty pairs, so the dict tracks live labels only
                del self._label_nodes[pair], self._label_masks[pair]
        for pair in labels.items() - old.items():
            label_mask = self._label_masks.get(pair)
            if label_mask is None:
                label_mask = self._label_masks[pair] = np.zeros(self._size, np.bool_)
            label_mask[slot] = True
            self._label_nodes[pair] = self._label_nodes.get(pair, 0) + 1
        self._labels[slot] = labels
        for key, index in self._spread.items():
            index.move(slot, labels.get(key))

    def _spread_index(self, key: str) -> _SpreadIndex:
        index = self._spread.get(key)
        if index is None:
            index = self._spread[key] = _SpreadIndex(self._size)
            for slot, node_id in enumerate(self._ids[: self._n]):
                if node_id is not None:
                    index.move(slot, self._labels[slot].get(key))
        return index

    def _reserve_slot(self, slot: int, req: Vec, spread_key: str) -> None:
        r = self._reserved[slot]
        self._reserved[slot] = (r[0] + req[0], r[1] + req[1], r[2] + req[2], r[3] + req[3])
        self._set_tasks(slot, self._tasks[slot] + 1)
        if spread_key:
            self._spread_index(spread_key).add(slot, 1)
        self._refresh(slot)

    def _set_tasks(self, slot: int, tasks: int, *, removing: bool = False) -> None:
        """Change a slot's task count (or drop the slot) keeping ``_t_max`` exact in O(1)."""
        hist = self._task_hist
        old = self._tasks[slot]
        hist[old] -= 1
        if not hist[old]:
            del hist[old]
        if not removing:
            hist[tasks] = hist.get(tasks, 0) + 1
        self._tasks[slot] = tasks
        self._feat[ROW_TASKS, slot] = tasks
        if not removing and tasks > self._t_max:
            self._t_max = tasks
        while self._t_max > 0 and self._t_max not in hist:
            self._t_max -= 1  # one step per task released; removal may walk further

    def _refresh(self, slot: int) -> None:
        """Free = cap - reserved (scored), available = cap - max(usage, reserved) (filtered).

        Both are clamped to [0, capacity]; see the module docstring for why.
        """
        cap, use, res = self._capacity[slot], self._usage[slot], self._reserved[slot]
        col = self._feat[:, slot]
        for j in range(N_RESOURCES):
            free = cap[j] - res[j]
            col[ROW_FREE + j] = free if free > 0.0 else 0.0
            avail = cap[j] - (use[j] if use[j] > res[j] else res[j])
            col[ROW_AVAIL + j] = avail if avail > 0.0 else 0.0


def _no_match(selector: Mapping[str, str]) -> str:
    if selector:
        return f"no schedulable node matches labels {dict(selector)}"
    return "no schedulable node"
