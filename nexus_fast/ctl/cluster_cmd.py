"""``nexusctl cluster status``: the cluster as the target replica sees it (docs/cluster.md).

Kept out of ``ctl/cli.py`` (near its size limit). ``cli.py`` adds the group built here,
handing over its option decorator and context accessors (no import back: no cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from google.protobuf import json_format
from tabulate import tabulate

from nexus_fast.ctl import render
from nexus_fast.ctl.client import ServerError, run
from nexus_fast.ctl.config import Connection
from nexus_fast.pb import fabric_pb2 as pb

__all__ = ["cluster_group"]


def cluster_group(
    leaf: Callable[[Callable[..., Any]], Callable[..., Any]],
    connection: Callable[[], Connection],
    output: Callable[[], str],
) -> click.Group:
    """The ``cluster`` group with ``leaf`` (the common options) on its commands."""

    @click.group()
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
            click.echo(render.render_doc(doc, fmt))
        else:
            click.echo(tabulate(_head(conn, answer), tablefmt="plain", disable_numparse=True))
            if answer.replicas:
                rows = [
                    (r.name, r.role, r.state or "-", r.advertise, r.applied_seq, r.http or "-")
                    for r in answer.replicas
                ]
                headers = ("REPLICA", "ROLE", "STATE", "ADVERTISE", "APPLIED-SEQ", "HTTP")
                click.echo("\n" + tabulate(rows, headers, tablefmt="plain", disable_numparse=True))
        if not answer.ready:
            raise ServerError(f"{conn.target}: replica not ready ({answer.role})")

    return cluster


def _head(conn: Connection, answer: pb.ClusterStatus) -> list[tuple[str, str]]:
    leader = f"{answer.leader_name} ({answer.leader_advertise})" if answer.leader_name else "-"
    etcd = ", ".join(f"{e.endpoint}={'ok' if e.ok else e.error}" for e in answer.etcd)
    return [
        ("TARGET", conn.target),
        ("NAME", answer.name or "-"),
        ("ROLE", answer.role),
        ("STATE", answer.state or "-"),
        ("LEADER", leader),
        ("TERM", str(answer.term)),
        ("APPLIED-SEQ", str(answer.applied_seq)),
        ("ETCD", etcd or "-"),
    ]
