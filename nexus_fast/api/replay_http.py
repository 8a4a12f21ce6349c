"""The read-only HTTP JSON API over a replayed snapshot (``nexus-fast replay --serve``).

Answers the live server's JSON shapes (``codec.json``: the same dicts, the same list
envelopes ``{"nodes": [...], "next_page_token": ""}``, the same error bodies), so a
dashboard or a script pointed at it reads the past like the present:

* ``GET /api/v1/nodes`` and ``/api/v1/nodes/{node_id}``
* ``GET /api/v1/commands`` (the live server lists commands over gRPC only) and
  ``/api/v1/commands/{command_id}``
* ``GET /api/v1/agents``
* ``GET /api/v1/replay``: which event the snapshot stands at (index and time)

Lists take ``limit`` (1..1000, default 100) and ``page_token``, in id order. Nothing here
writes; the snapshot is built before the listener opens. It has no authentication:
``nexus-fast replay`` binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web

from nexus_fast.codec.json import agent_to_dict, command_to_dict, node_to_dict
from nexus_fast.codec.tokens import decode_page_token, encode_page_token
from nexus_fast.core.replay import Snapshot
from nexus_fast.errors import InvalidArgument

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000

T = TypeVar("T")


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, parameter: str | None = None) -> web.Response:
    error: dict[str, str] = {"code": code, "message": message}
    if parameter is not None:
        error["parameter"] = parameter
    return _json({"error": error}, status)


def _page(
    request: web.Request, items: Mapping[str, T], to_dict: Callable[[T], Any], name: str
) -> web.Response:
    query = request.query
    for key in query:
        if key not in ("limit", "page_token"):
            return _error(400, "invalid_argument", f"unknown query parameter {key!r}", key)
    raw = query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        return _error(
            400, "invalid_argument", f"'limit' must be between 1 and {MAX_LIMIT}", "limit"
        )
    limit = int(raw)
    try:
        after = decode_page_token(query.get("page_token", ""))
    except InvalidArgument as exc:
        return _error(400, "invalid_argument", str(exc), "page_token")
    ids = sorted(i for i in items if i > after)
    page = ids[:limit]
    token = encode_page_token(page[-1]) if len(ids) > limit else ""
    return _json({name: [to_dict(items[i]) for i in page], "next_page_token": token})


def replay_app(snapshot: Snapshot) -> web.Application:
    """The aiohttp application serving ``snapshot``."""

    async def nodes(request: web.Request) -> web.Response:
        return _page(request, snapshot.nodes, node_to_dict, "nodes")

    async def commands(request: web.Request) -> web.Response:
        return _page(request, snapshot.commands, command_to_dict, "commands")

    async def agents(request: web.Request) -> web.Response:
        return _page(request, snapshot.agents, agent_to_dict, "agents")

    async def node(request: web.Request) -> web.Response:
        node_id = request.match_info["node_id"]
        found = snapshot.nodes.get(node_id)
        if found is None:
            return _error(404, "not_found", f"node {node_id!r} not found")
        return _json(node_to_dict(found))

    async def command(request: web.Request) -> web.Response:
        command_id = request.match_info["command_id"]
        found = snapshot.commands.get(command_id)
        if found is None:
            return _error(404, "not_found", f"command {command_id!r} not found")
        return _json(command_to_dict(found))

    async def about(request: web.Request) -> web.Response:
        return _json({"index": snapshot.index, "time_ms": snapshot.time_ms, "read_only": True})

    app = web.Application()
    app.router.add_get("/api/v1/nodes", nodes)
    app.router.add_get("/api/v1/nodes/{node_id}", node)
    app.router.add_get("/api/v1/commands", commands)
    app.router.add_get("/api/v1/commands/{command_id}", command)
    app.router.add_get("/api/v1/agents", agents)
    app.router.add_get("/api/v1/replay", about)
    return app
