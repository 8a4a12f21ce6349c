"""``nexusctl cluster status``: the cluster as the target replica sees it (docs/cluster.md).

Kept out of ``ctl/cli.py`` (near its size limit); registered on the ``cli`` group there.
"""

from __future__ import annotations

from google.protobuf import json_format
from tabulate import tabulate

from nexus_fast.ctl import render
from nexus_fast.ctl.cli import cli, connection, echo, leaf, output
from nexus_fast.ctl.client import ServerError, run
from nexus_fast.pb import fabric_pb2 as pb

__all__ = ["cluster"]


@cli.group()
def cluster() -> None:
    """Cluster mode: replicas, their roles and the leader."""


@cluster.command("status")
@leaf
def cluster_status() -> None:
    """Role, leader, term and applied log position of every replica (GetClusterStatus).

    Exit 3 when the target replica is not ready (no leader known, or the leader is still
    catching up). In embedded mode the role is "standalone".
    """
    conn = connection()
    answer: pb.ClusterStatus = run(
        conn, lambda c: c.unary("GetClusterStatus", pb.GetClusterStatusRequest())
    )
    fmt = output()
    if fmt in ("json", "yaml"):
        doc = json_format.MessageToDict(
            answer, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        )
        echo(render.render_doc(doc, fmt))
    else:
        head = [
            ("TARGET", conn.target),
            ("NAME", answer.name or "-"),
            ("ROLE", answer.role),
            ("LEADER", f"{answer.leader_name} ({answer.leader_advertise})" if answer.leader_name else "-"),
            ("TERM", str(answer.term)),
            ("APPLIED-SEQ", str(answer.applied_seq)),
            ("ETCD", ", ".join(f"{e.endpoint}={'ok' if e.ok else e.error}" for e in answer.etcd) or "-"),
        ]  # fmt: skip
        echo(tabulate(head, tablefmt="plain", disable_numparse=True))
        if answer.replicas:
            rows = [
                (r.name, r.role, r.advertise, r.applied_seq, r.http or "-") for r in answer.replicas
            ]
            headers = ("REPLICA", "ROLE", "ADVERTISE", "APPLIED-SEQ", "HTTP")
            echo("\n" + tabulate(rows, headers, tablefmt="plain", disable_numparse=True))
    if not answer.ready:
        raise ServerError(f"{conn.target}: replica not ready ({answer.role})")
