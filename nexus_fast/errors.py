"""Error types raised by the core.

The core knows nothing of wire formats: it raises these, and each API adapter
maps them to its protocol in one table (``nexus_fast.api.status``).
"""

from __future__ import annotations


class NexusError(Exception):
    """Base of every error the core reports to clients."""


class InvalidArgument(NexusError):
    """A request field is malformed; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(NexusError):
    """The entity a request names does not exist."""


class NodeNotFound(NotFound):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id!r} not found")
        self.node_id = node_id


class StaleSession(NexusError):
    """A node spoke with a session epoch that is no longer current."""


class Superseded(NexusError):
    """A newer session or stream took over this node."""


class FailedPrecondition(NexusError):
    """The request is valid but the entity is in the wrong state for it."""


class ResourceExhausted(NexusError):
    """A bound was hit; ``retry_after`` (seconds) hints when to try again."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(NexusError):
    """The server cannot serve the request now (starting, stopping, store failure)."""
