"""nexus-node, the reference node proxy: a fleet of simulated nodes for a nexus_fast server.

Layout, from the bottom up: ``spec`` (parsing, node specs, spec files), ``policy`` (a
node's pure decisions: backoff, stream-end actions, de-dup, usage), ``dedup`` (the durable
de-dup record of ``--state-dir``: exactly once per node across restarts), ``channel`` (TLS and
token client connections, shared with nexus-bench), ``sim`` (one node and its narrow
``NodeContext``), ``fleet`` (channels, counters, status, shutdown), ``cli`` (``nexus-node``);
``targets`` (several server addresses and failing over between them, shared with nexusctl
and nexus-bench).
"""

from nexus_fast.node.channel import ClientAuth, open_channel
from nexus_fast.node.cli import build_parser, main, parse_args, run_fleet
from nexus_fast.node.fleet import Fleet, StatusSnapshot, default_channels, format_status
from nexus_fast.node.policy import (
    Action,
    DedupCache,
    agent_id_from_payload,
    backoff_delay,
    classify_stream_end,
    jittered,
    register_error_is_fatal,
    simulate_usage,
)
from nexus_fast.node.sim import NodeContext, NodeSim, Stats
from nexus_fast.node.spec import (
    DEFAULT_CAPACITY,
    GIB,
    RESOURCE_KEYS,
    NodeSpec,
    build_node_specs,
    parse_capacity,
    parse_cpu,
    parse_exec_duration,
    parse_labels,
    parse_size,
)
from nexus_fast.node.targets import TargetList, leader_hint, parse_targets

__all__ = [
    "DEFAULT_CAPACITY",
    "GIB",
    "RESOURCE_KEYS",
    "Action",
    "ClientAuth",
    "DedupCache",
    "Fleet",
    "NodeContext",
    "NodeSim",
    "NodeSpec",
    "Stats",
    "StatusSnapshot",
    "TargetList",
    "agent_id_from_payload",
    "backoff_delay",
    "build_node_specs",
    "build_parser",
    "classify_stream_end",
    "default_channels",
    "format_status",
    "jittered",
    "leader_hint",
    "main",
    "open_channel",
    "parse_args",
    "parse_capacity",
    "parse_cpu",
    "parse_exec_duration",
    "parse_labels",
    "parse_size",
    "parse_targets",
    "register_error_is_fatal",
    "run_fleet",
    "simulate_usage",
]
