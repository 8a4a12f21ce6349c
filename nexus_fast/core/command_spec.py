"""What a command may carry: the limits of a ``CommandSpec``, checked up front, the cap
on what a node reports back (``commands.max_output_size``), and the placement request of
each command of a batch."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final

from nexus_fast.core.nodes import validate_labels, validate_resources
from nexus_fast.core.scheduler import PlacementRequest
from nexus_fast.errors import InvalidArgument
from nexus_fast.pb import fabric_pb2 as pb

MAX_PRIORITY: Final = 2
MAX_TIMEOUT_MS: Final = 24 * 3600 * 1000
MAX_ATTEMPTS: Final = 100
MAX_KIND_LEN: Final = 128
MAX_ID_LEN: Final = 128

_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
_NO_LABELS: Final[Mapping[str, str]] = MappingProxyType({})


def validate_spec(spec: pb.CommandSpec, at: str, max_payload_size: int) -> None:
    """Raise ``InvalidArgument`` naming the field (under ``at``) that breaks a limit.

    The target node's existence is the caller's check (it needs the registry).
    """
    key = spec.idempotency_key
    if key and (len(key) > MAX_ID_LEN or not _ID_RE.match(key)):
        raise InvalidArgument(
            f"{at}.idempotency_key",
            f"must be 1..{MAX_ID_LEN} characters of letters, digits and . _ : / @ -",
        )
    if not spec.kind or len(spec.kind) > MAX_KIND_LEN:
        raise InvalidArgument(f"{at}.kind", f"must be 1..{MAX_KIND_LEN} characters")
    if len(spec.payload) > max_payload_size:
        raise InvalidArgument(
            f"{at}.payload",
            f"{len(spec.payload)} bytes exceeds the limit of {max_payload_size}",
        )
    if spec.priority > MAX_PRIORITY:
        raise InvalidArgument(f"{at}.priority", f"must be 0..{MAX_PRIORITY}")
    if spec.timeout_ms > MAX_TIMEOUT_MS:
        raise InvalidArgument(f"{at}.timeout_ms", f"must be at most {MAX_TIMEOUT_MS} (24h)")
    if spec.max_attempts > MAX_ATTEMPTS:
        raise InvalidArgument(f"{at}.max_attempts", f"must be at most {MAX_ATTEMPTS}")
    placement = spec.placement
    validate_labels(placement.label_selector, f"{at}.placement.label_selector")
    validate_resources(placement.request, f"{at}.placement.request")
    if placement.spread_key:
        validate_labels({placement.spread_key: ""}, f"{at}.placement.spread_key")


def cap_result(record: pb.CommandRecord, result: pb.CommandResult, cap: int) -> str:
    """Put ``result.output`` on ``record``, cut to ``cap`` bytes and flagged if it was longer;
    return ``result.error`` cut the same way (at a UTF-8 boundary), flagging the record."""
    output = result.output
    record.output_truncated = len(output) > cap
    record.output = output[:cap] if record.output_truncated else output
    error = result.error
    raw = error.encode() if len(error) * 4 > cap else b""  # short text: under the cap for sure
    record.error_truncated = len(raw) > cap
    return raw[:cap].decode("utf-8", "ignore") if record.error_truncated else error


def same_spec(stored: pb.CommandSpec, spec: pb.CommandSpec) -> bool:
    """Whether ``spec`` resubmits ``stored``: equal, with 0 (server default) matching the
    timeout_ms and max_attempts the server filled in."""
    if spec.timeout_ms and spec.max_attempts:
        return stored == spec
    probe = pb.CommandSpec()
    probe.CopyFrom(spec)
    probe.timeout_ms = spec.timeout_ms or stored.timeout_ms
    probe.max_attempts = spec.max_attempts or stored.max_attempts
    return stored == probe


def placement_requests(
    items: Sequence[tuple[pb.CommandRecord, frozenset[str]]],
) -> list[PlacementRequest]:
    """The scheduler's request for each (record, nodes to avoid) of a batch.

    Like requests (resources only, the same ones) share ONE ``PlacementRequest`` object:
    the scheduler places a run of it through its batch path (``Scheduler.place_batch``).
    """
    requests = []
    plain: dict[tuple[float, float, float, float], PlacementRequest] = {}
    for r, exclude in items:
        spec = r.spec
        placement = spec.placement
        selector = placement.label_selector
        if not (exclude or spec.target_node or placement.spread_key or len(selector)):
            res = placement.request
            like = (res.cpu, res.memory, res.gpu, res.disk)
            request = plain.get(like)
            if request is None:
                request = plain[like] = PlacementRequest(request=res)
            requests.append(request)
            continue
        requests.append(
            PlacementRequest(
                request=placement.request,
                # dict() of a protobuf map costs ~3 us even when it is empty
                label_selector=dict(selector) if len(selector) else _NO_LABELS,
                spread_key=placement.spread_key,
                target_node=spec.target_node,
                exclude=exclude,
            )
        )
    return requests
