"""Every Prometheus metric the server exports, defined in one place.

Components import the objects they update; the HTTP adapter renders the default
registry. Names follow Prometheus conventions (base units, ``_total`` counters).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

# Latency buckets tuned for a loopback control plane: 50us .. 10s.
_LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

VERSION_INFO = Info("nexus_version", "Version of nexus-fast and of the libraries it runs on.")
UPTIME_SECONDS = Gauge("nexus_uptime_seconds", "Seconds since the server process started.")


class CountsCollector(Collector):
    """A ``name{label}`` family read from a callback at scrape time, exported twice.

    ``name`` (e.g. ``nexus_nodes_total``) is exported untyped: it is the spec's name and
    users' dashboards use it, and promtool's lint rejects a gauge ending in ``_total`` but
    accepts an untyped one. ``gauge_name`` (``nexus_nodes``) carries the same samples as a
    typed gauge, for tools that want the type.
    """

    def __init__(self, name: str, gauge_name: str, documentation: str, label: str) -> None:
        self.name = name
        self.gauge_name = gauge_name
        self.documentation = documentation
        self.label = label
        self.source: Callable[[], Mapping[str, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        untyped = UnknownMetricFamily(self.name, self.documentation, labels=[self.label])
        gauge = GaugeMetricFamily(self.gauge_name, self.documentation, labels=[self.label])
        for value, count in (self.source() if self.source else {}).items():
            untyped.add_metric([value], count)
            gauge.add_metric([value], count)
        yield untyped
        yield gauge


class _LoopMetric(Collector):
    """A metric updated only on the event loop, with at most one label.

    prometheus_client guards every value with a mutex (~0.4 us an ``inc``, ~1 us a
    histogram ``observe``). The per-command, per-message and per-frame metrics are updated
    many times per operation on the one loop thread, where the lock buys nothing: these
    are plain additions. A scrape from another thread reads plain numbers, at worst one
    update late.
    """

    def __init__(
        self, name: str, documentation: str, label: str | None, registry: CollectorRegistry | None
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._children: dict[str, Any] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, **label: str) -> Any:
        """The child for ``label=value`` (look it up once, then update it)."""
        if self.label is None or label.keys() != {self.label}:
            raise ValueError(f"{self.name}: expected the label {self.label!r}, got {label}")
        value = label[self.label]
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._child()
        return child

    def _child(self) -> Any:
        raise NotImplementedError

    def _samples(self) -> list[tuple[list[str], Any]]:
        if self.label is None:
            return [([], self)]
        return [([value], child) for value, child in list(self._children.items())]


class LoopCounter(_LoopMetric):
    """A counter (see :class:`_LoopMetric`): ``inc`` is one addition."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str | None = None,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.value = 0  # before registering: the registry collects once to learn the names
        super().__init__(name.removesuffix("_total"), documentation, label, registry)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def _child(self) -> LoopCounter:
        return LoopCounter(self.name, self.documentation, registry=None)

    def collect(self) -> Iterator[Metric]:
        labels = [self.label] if self.label else []
        family = CounterMetricFamily(self.name, self.documentation, labels=labels)
        for values, child in self._samples():
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(_LoopMetric):
    """A histogram (see :class:`_LoopMetric`): ``observe`` is a bisect and two additions.

    Buckets are ``le`` upper bounds, as in Prometheus (a value equal to a bound counts in
    that bucket).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        label: str | None = None,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._bounds = [*buckets, float("inf")]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        super().__init__(name, documentation, label, registry)

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def _child(self) -> LoopHistogram:
        return LoopHistogram(self.name, self.documentation, self._bounds[:-1], registry=None)

    def collect(self) -> Iterator[Metric]:
        labels = [self.label] if self.label else []
        family = HistogramMetricFamily(self.name, self.documentation, labels=labels)
        for values, child in self._samples():
            cumulative, running = [], 0
            for bound, count in zip(child._bounds, list(child._counts), strict=True):
                running += count
                cumulative.append((_le(bound), running))
            family.add_metric(values, cumulative, child._sum)
        yield family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


NODES = CountsCollector("nexus_nodes_total", "nexus_nodes", "Known nodes by status.", "status")
REGISTRY.register(NODES)

GRPC_REQUESTS = Counter(
    "nexus_grpc_requests_total",
    "gRPC calls finished, by method and status code.",
    ["method", "status"],
)
GRPC_REQUEST_DURATION = Histogram(
    "nexus_grpc_request_duration_seconds",
    "gRPC call duration (for streams: the stream's lifetime).",
    ["method"],
    buckets=_LATENCY_BUCKETS,
)
GRPC_CONNECTIONS_ACTIVE = Gauge(
    "nexus_grpc_connections_active",
    "Open long-lived gRPC streams (node Connect streams and event watchers).",
)
NODE_MESSAGES = LoopCounter(
    "nexus_node_messages_total", "Messages received on node Connect streams.", label="kind"
)
# Cluster mode: node streams relayed from followers to the leader (cluster/relay.py).
RELAY_NODE_STREAMS = Gauge(
    "nexus_relay_node_streams", "Node streams this follower holds and relays to the leader."
)
RELAY_CONNECTS = Counter(
    "nexus_relay_connects_total",
    "Relay streams this follower opened to a leader (one per leader change or broken relay).",
)
RELAY_SESSIONS = Gauge(
    "nexus_relay_sessions", "Node sessions this leader serves through followers' relay streams."
)
RELAY_UP_BATCH_FRAMES = LoopHistogram(
    "nexus_relay_up_batch_frames",
    "Frames per RelayUp message this follower wrote to the leader (node messages, opens, closes).",
    (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 20000),
)

DB_OPERATIONS = Counter(
    "nexus_db_operations_total", "State store operations, by operation.", ["operation"]
)
DB_OPERATION_DURATION = Histogram(
    "nexus_db_operation_duration_seconds",
    "State store operation duration, by operation (commit includes the fsync).",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
)
DB_SIZE_BYTES = Gauge("nexus_db_size_bytes", "Bytes used in the LMDB data file.")
DB_HEALTHY = Gauge(
    "nexus_db_healthy",
    "1 while the state store takes writes; 0 while they fail (store full, a write error, "
    "the writer thread dead): /health/detailed says why.",
)

WEBSOCKET_CONNECTIONS = Counter(
    "nexus_websocket_connections_total", "WebSocket connections accepted since start."
)
WEBSOCKET_CONNECTIONS_ACTIVE = Gauge(
    "nexus_websocket_connections_active", "Open WebSocket connections."
)
WEBSOCKET_REJECTED = Counter(
    "nexus_websocket_rejected_total", "WebSocket upgrades refused, by reason.", ["reason"]
)
WEBSOCKET_MESSAGES_RECEIVED = LoopCounter(
    "nexus_websocket_messages_received_total", "WebSocket data frames received."
)
WEBSOCKET_MESSAGES_SENT = LoopCounter(
    "nexus_websocket_messages_sent_total", "WebSocket data frames sent."
)

HTTP_CONNECTIONS_REFUSED = Counter(
    "nexus_http_connections_refused_total",
    "HTTP connections refused on connect, by reason (per_ip: server.http_max_connections_per_ip).",
    ["reason"],
)
HTTP_REQUESTS = Counter(
    "nexus_http_requests_total", "HTTP requests on the health/metrics port.", ["path", "status"]
)

COMMANDS_PROCESSED = LoopCounter(
    "nexus_commands_processed_total",
    "Commands that reached a final state, by state.",
    label="status",
)
COMMAND_RETRIES = Counter("nexus_command_retries_total", "Command attempts retried.")
STALE_REPORTS = Counter(
    "nexus_command_stale_reports_total",
    "Acks/results ignored because the command is final or no longer on that node.",
    ["kind"],
)
COMMAND_QUEUE_DEPTH = Gauge(
    "nexus_command_queue_depth", "Commands queued (waiting for a node or for dispatch)."
)
COMMAND_SUBMIT_TO_DISPATCH = LoopHistogram(
    "nexus_command_submit_to_dispatch_seconds",
    "Time from submission to the first dispatch to a node.",
    _LATENCY_BUCKETS,
)
COMMAND_SUBMIT_TO_FINAL = LoopHistogram(
    "nexus_command_submit_to_final_seconds",
    "Time from submission to a final state.",
    _LATENCY_BUCKETS,
)


AGENTS = CountsCollector("nexus_agents_total", "nexus_agents", "Agents by state.", "status")
REGISTRY.register(AGENTS)

# Event bus (nexus_fast/core/events.py) and its streams.
EVENTS_PUBLISHED = Counter(
    "nexus_events_published_total", "Events committed and published to subscribers.", ["type"]
)
EVENTS_PRUNED = Counter(
    "nexus_events_pruned_total", "Events deleted from the durable log by retention."
)
EVENTS_DELIVERED = LoopCounter(
    "nexus_events_delivered_total", "Events sent to subscribers, by transport.", label="transport"
)
EVENT_SUBSCRIPTIONS_ACTIVE = Gauge(
    "nexus_event_subscriptions_active", "Open event subscriptions, by transport.", ["transport"]
)
EVENT_SUBSCRIBER_LAG = LoopHistogram(
    "nexus_event_subscriber_lag_events",
    "Events a subscriber was behind the newest one when it read (sampled per read).",
    (0, 1, 10, 100, 500, 1000, 5000, 10000, 50000, 100000, 1000000),
    label="transport",
)
EVENT_SLOW_CONSUMERS = Counter(
    "nexus_event_slow_consumer_disconnects_total",
    "Subscribers cut off for falling more than events.subscriber_buffer behind.",
    ["transport"],
)
