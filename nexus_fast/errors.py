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


class AlreadyExists(NexusError):
    """The entity exists with different content (an idempotency key reused with another spec).

    ``existing_id`` names the entity that holds the key.
    """

    def __init__(self, message: str, existing_id: str = "") -> None:
        super().__init__(message)
        self.existing_id = existing_id


class StaleSession(NexusError):
    """A node spoke with a session epoch that is no longer current."""


class Superseded(NexusError):
    """A newer session or stream took over this node."""


class PermissionDenied(NexusError):
    """The caller may not do this (e.g. take over a node stream another principal holds)."""


class Unauthenticated(NexusError):
    """The call carries no credential, or one that does not verify."""


class FailedPrecondition(NexusError):
    """The request is valid but the entity is in the wrong state for it."""


class ResourceExhausted(NexusError):
    """A bound was hit; ``retry_after`` (seconds) hints when to try again."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(NexusError):
    """The server cannot serve the request now (starting, stopping, store failure)."""


class LeaderElsewhere(Unavailable):
    """Cluster mode: this replica is not the leader and cannot serve the call itself.

    ``leader_advertise`` is the leader's gRPC address (``cluster.advertise``), or "" while
    no leader is known; clients retry there, or here after ``retry_after`` seconds.
    """

    def __init__(self, message: str, leader_advertise: str = "", retry_after: float = 0.5) -> None:
        super().__init__(message)
        self.leader_advertise = leader_advertise
        self.retry_after = retry_after


class QueueFull(ResourceExhausted):
    """The command queue holds as many active commands as it may; retry later."""


class StoreFull(ResourceExhausted):
    """The store cannot take more writes (map at its ceiling, or the disk is full).

    Reads keep serving; health reports it until a write succeeds again.
    """

    def __init__(self, message: str = "store full", retry_after: float = 5.0) -> None:
        super().__init__(message, retry_after)


class EventIndexTooOld(NexusError):
    """``after_index`` is older than retention: the events after it are gone.

    ``oldest_index`` is the oldest index still kept; the client must re-list the state it
    follows and resume with ``after_index = oldest_index - 1`` (or live).
    """

    def __init__(self, after_index: int, oldest_index: int) -> None:
        super().__init__(
            f"after_index {after_index} is older than retention: the oldest event kept is "
            f"{oldest_index}; re-list and resume from after_index {oldest_index - 1}"
        )
        self.after_index = after_index
        self.oldest_index = oldest_index


class SlowConsumer(NexusError):
    """The subscriber fell more than ``subscriber_buffer`` events behind while not reading.

    ``last_index`` is the index up to which it was served; resume with
    ``after_index = last_index``.
    """

    def __init__(self, last_index: int, lag: int) -> None:
        super().__init__(f"slow consumer; resume after index {last_index}")
        self.last_index = last_index
        self.lag = lag


class UndecodableRequest(NexusError):
    """The request bytes are not a valid ``message`` (protobuf that does not parse).

    Raised at the API edge before any core code runs; the peer sent junk or speaks
    another schema, so it is answered without a traceback in the log.
    """

    def __init__(self, message_name: str) -> None:
        super().__init__(f"request is not a valid {message_name}")
        self.message_name = message_name
