"""The ``nexusctl`` command: operate a nexus_fast server over gRPC (kubectl/nomad habits)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem, get_completion_class
from tabulate import tabulate

import nexus_fast
from nexus_fast.config import parse_duration
from nexus_fast.ctl import render
from nexus_fast.ctl.client import (
    EXIT_NOT_SUCCEEDED,
    Client,
    NotSucceeded,
    ServerError,
    follow_events,
    health_detailed,
    new_idempotency_key,
    run,
)
from nexus_fast.ctl.cluster_cmd import cluster_group
from nexus_fast.ctl.config import (
    CONTEXT_KEYS,
    SETTING_NAMES,
    Connection,
    CtlConfig,
    Settings,
    config_path,
    resolve,
)
from nexus_fast.node.spec import parse_cpu, parse_size
from nexus_fast.pb import fabric_pb2 as pb

F = TypeVar("F", bound=Callable[..., Any])

PROG = "nexusctl"
EXIT_CODES = """\b
Exit codes:
  0  success
  1  a command failed, timed out or was cancelled (or --wait ran out)
  2  usage error (bad flag, bad config file or context)
  3  server or connection error: the message names the server, the gRPC status and
     the server's message"""

NODE_STATUSES = ("ready", "draining", "down", "removed")
COMMAND_STATES = (
    "pending",
    "placed",
    "dispatched",
    "acked",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
)
AGENT_STATES = ("pending", "running", "stopped", "failed", "lost")
FINAL_OK = pb.COMMAND_STATE_SUCCEEDED
FINAL_STATES = frozenset(
    {
        pb.COMMAND_STATE_SUCCEEDED,
        pb.COMMAND_STATE_FAILED,
        pb.COMMAND_STATE_TIMED_OUT,
        pb.COMMAND_STATE_CANCELLED,
    }
)


# ---------------------------------------------------------------- shared options


def _store(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    """A callback saving a flag in the shared :class:`Settings` (one object for the whole
    invocation, so a flag works before the subcommand or after it; the later one wins)."""
    assert name in SETTING_NAMES

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if isinstance(value, tuple):  # a repeatable flag: "" when not given
            value = ",".join(value) or None
        if value is not None:
            setattr(ctx.ensure_object(Settings), name, value)

    return callback


def _complete_context(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    try:
        names = CtlConfig.load().contexts
    except click.UsageError:
        return []
    return [CompletionItem(n) for n in sorted(names) if n.startswith(incomplete)]


def _opt(*decls: str, name: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*decls, callback=_store(name), expose_value=False, **kw)


def connection_options(f: F) -> F:
    """``--context/--target/--http``, the TLS files, ``--token`` and ``--request-timeout``."""
    options = [
        _opt(
            "--context",
            name="context",
            metavar="NAME",
            shell_complete=_complete_context,
            help="Context from the config file (default: its current_context).",
        ),
        _opt(
            "--target",
            name="target",
            metavar="HOST:PORT",
            multiple=True,
            help="gRPC address of the server (env NEXUS_TARGET; default 127.0.0.1:50053). "
            "Replicas: several, comma separated or repeated; UNAVAILABLE moves to the next.",
        ),
        _opt(
            "--http",
            name="http",
            metavar="URL|PORT",
            help="HTTP base of the server for `status` (env NEXUS_HTTP; a bare port means "
            "the target's host).",
        ),
        _opt("--tls-ca", name="tls_ca", metavar="FILE", help="PEM root certificates (TLS)."),
        _opt("--tls-cert", name="tls_cert", metavar="FILE", help="PEM client certificate (mTLS)."),
        _opt("--tls-key", name="tls_key", metavar="FILE", help="PEM client key (mTLS)."),
        _opt(
            "--tls-server-name", name="tls_server_name", metavar="NAME", help="TLS name override."
        ),
        _opt(
            "--token",
            name="token",
            metavar="TOKEN",
            help="Bearer token (prefer env NEXUS_TOKEN or the context's token_file).",
        ),
        _opt(
            "--request-timeout",
            name="request_timeout",
            type=click.FloatRange(min=0.1),
            metavar="SECONDS",
            help="Deadline of each request (default 10).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def output_option(f: F) -> F:
    """``-o table|wide|json|yaml``."""
    return _opt(
        "-o",
        "--output",
        name="output",
        type=click.Choice(render.FORMATS),
        help="Output format (default table).",
    )(f)


def leaf(f: F) -> F:
    """Options every subcommand takes."""
    return connection_options(output_option(f))


def settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


def connection() -> Connection:
    return resolve(settings())


def output() -> str:
    return settings().output or "table"


def echo(textout: str) -> None:
    click.echo(textout)


def parse_labels(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, str]:
    """``--label k=v`` (repeatable; ``k=v,k2=v2`` also accepted) into a dict."""
    out: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            key, sep, val = item.partition("=")
            if not sep or not key.strip():
                raise click.BadParameter(f"{item!r} is not key=value", ctx, param)
            out[key.strip()] = val.strip()
    return out


def read_bytes(value: str | None, what: str) -> bytes:
    """``@file`` reads a file, ``-`` reads stdin, anything else is the literal (UTF-8)."""
    if value is None:
        return b""
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        try:
            with open(value[1:], "rb") as fp:
                return fp.read()
        except OSError as err:
            raise click.BadParameter(
                f"{value[1:]}: {err.strerror or err}", param_hint=what
            ) from None
    return value.encode()


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``30``, ``30s``, ``500ms``, ``2m`` -> seconds."""
    if value is None:
        return None
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else parse_duration(value)
    except (TypeError, ValueError) as err:
        raise click.BadParameter(str(err), ctx, param) from None


def _enum(prefix: str, names: Sequence[str]) -> list[Any]:
    """``("ready",)`` -> ``["NODE_STATUS_READY"]`` (protobuf takes enum names)."""
    return [prefix + n.upper() for n in names]


# ---------------------------------------------------------------- the root


@click.group(
    name=PROG,
    epilog=EXIT_CODES,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(nexus_fast.__version__, prog_name=PROG)
@leaf
def cli() -> None:
    """Operate a nexus_fast control plane: nodes, commands, agents, events, health.

    \b
    Connection: --target (or NEXUS_TARGET, or a context in the config file
    $NEXUSCTL_CONFIG, default ~/.config/nexus/config.toml); TLS and token flags as
    nexus-node; the token also from NEXUS_TOKEN. Global flags go before or after the
    subcommand.

    \b
    Examples:
      nexusctl nodes ls -o wide
      nexusctl commands submit --kind echo --payload @job.json --label zone=a --wait
      nexusctl events tail --after 0 --topic command --follow
      nexusctl --context prod status
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name=PROG)


# ---------------------------------------------------------------- nodes


@cli.group()
def nodes() -> None:
    """List, inspect, drain, mark (in)eligible and remove nodes."""


@nodes.command("ls")
@click.option("--status", "statuses", multiple=True, type=click.Choice(NODE_STATUSES))
@click.option("--label", "labels", multiple=True, callback=parse_labels, metavar="K=V")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most this many (0 = all).")
@leaf
def nodes_ls(statuses: tuple[str, ...], labels: dict[str, str], limit: int) -> None:
    """List nodes (filter by --status and --label)."""
    request = pb.ListNodesRequest(
        statuses=_enum("NODE_STATUS_", statuses),
        label_selector=labels,
        page_size=min(limit or 500, 500),
    )
    found = run(connection(), lambda c: c.pages("ListNodes", request, "nodes", limit))
    echo(render.render(found, render.NODE_COLUMNS, output(), many=True))


@nodes.command("get")
@click.argument("node_ids", nargs=-1, required=True, metavar="NODE_ID...")
@leaf
def nodes_get(node_ids: tuple[str, ...]) -> None:
    """Show nodes by id."""

    async def action(c: Client) -> list[pb.Node]:
        return [await c.unary("GetNode", pb.GetNodeRequest(node_id=i)) for i in node_ids]

    found = run(connection(), action)
    echo(render.render(found, render.NODE_COLUMNS, output(), many=len(node_ids) > 1))


@nodes.command("drain")
@click.argument("node_id")
@click.option("--reason", default="", help="Why (kept on the node).")
@click.option("--disable", is_flag=True, help="Lift the drain instead.")
@leaf
def nodes_drain(node_id: str, reason: str, disable: bool) -> None:
    """Drain a node: it takes no new work (--disable lifts the drain)."""
    request = pb.DrainNodeRequest(node_id=node_id, drain=not disable, reason=reason)
    node = run(connection(), lambda c: c.unary("DrainNode", request))
    echo(render.render([node], render.NODE_COLUMNS, output(), many=False))


@nodes.command("eligibility")
@click.argument("node_id")
@click.option("--enable/--disable", "eligible", default=None, help="Required: one or the other.")
@leaf
def nodes_eligibility(node_id: str, eligible: bool | None) -> None:
    """Mark a node (in)eligible for scheduling."""
    if eligible is None:
        raise click.UsageError("give --enable or --disable")
    request = pb.SetNodeEligibilityRequest(node_id=node_id, eligible=eligible)
    node = run(connection(), lambda c: c.unary("SetNodeEligibility", request))
    echo(render.render([node], render.NODE_COLUMNS, output(), many=False))


@nodes.command("rm")
@click.argument("node_ids", nargs=-1, required=True, metavar="NODE_ID...")
@leaf
def nodes_rm(node_ids: tuple[str, ...]) -> None:
    """Remove nodes (their streams are closed; in-flight work is re-queued)."""

    async def action(c: Client) -> None:
        for node_id in node_ids:
            await c.unary("RemoveNode", pb.RemoveNodeRequest(node_id=node_id))

    run(connection(), action)
    fmt = output()
    if fmt in ("json", "yaml"):
        echo(render.render_doc({"removed": list(node_ids)}, fmt))
    else:
        for node_id in node_ids:
            echo(f"node/{node_id} removed")


# ---------------------------------------------------------------- commands


@cli.group()
def commands() -> None:
    """Submit, inspect, list, wait for and cancel commands."""


def _print_records(records: Sequence[pb.CommandRecord], many: bool) -> None:
    echo(render.render(records, render.COMMAND_COLUMNS, output(), many=many))


def _fail_unless_succeeded(records: Sequence[pb.CommandRecord]) -> None:
    bad = []
    for record in records:
        state = render.command_state(record).upper()
        if record.state not in FINAL_STATES:
            bad.append(f"{record.id}: still {state} (not final when the wait ended)")
        elif record.state != FINAL_OK:
            bad.append(f"{record.id}: {state}" + (f": {record.reason}" if record.reason else ""))
    if bad:
        raise NotSucceeded("; ".join(bad))


@commands.command("submit", epilog=EXIT_CODES)
@click.option("--kind", required=True, help="Command kind, handed to the node.")
@click.option("--payload", metavar="@FILE|-|TEXT", help="Payload: @file, - for stdin, or text.")
@click.option("--target-node", metavar="NODE_ID", help="Run on this node ...")
@click.option(
    "--label",
    "labels",
    multiple=True,
    callback=parse_labels,
    metavar="K=V",
    help="... or on a node whose labels match every K=V (repeatable).",
)
@click.option("--spread-key", default="", metavar="LABEL", help="Spread over this label's values.")
@click.option("--priority", type=click.IntRange(0, 2), default=None, help="0 (low) .. 2 (high).")
@click.option("--timeout", callback=duration, metavar="DURATION", help="Per attempt (30s, 2m).")
@click.option("--max-attempts", type=click.IntRange(min=1), default=None)
@click.option("--idempotency-key", default="", help="Becomes the id; a repeat returns the first.")
@click.option("--wait", is_flag=True, help="Wait until final and print the record.")
@click.option(
    "--wait-timeout",
    callback=duration,
    metavar="DURATION",
    help="Give up waiting after this long (exit 1; default: no limit).",
)
@leaf
def commands_submit(
    kind: str,
    payload: str | None,
    target_node: str | None,
    labels: dict[str, str],
    spread_key: str,
    priority: int | None,
    timeout: float | None,
    max_attempts: int | None,
    idempotency_key: str,
    wait: bool,
    wait_timeout: float | None,
) -> None:
    """Submit one command; with --wait, print its final record (exit 1 unless SUCCEEDED)."""
    if target_node and labels:
        raise click.UsageError("--target-node and --label are exclusive")
    spec = pb.CommandSpec(
        idempotency_key=idempotency_key,
        kind=kind,
        payload=read_bytes(payload, "--payload"),
        target_node=target_node or "",
        placement=pb.Placement(label_selector=labels, spread_key=spread_key),
        priority=priority or 0,
        timeout_ms=int((timeout or 0) * 1000),
        max_attempts=max_attempts or 0,
    )
    request = pb.SubmitCommandsRequest(commands=[spec])

    async def action(c: Client) -> tuple[pb.SubmitResult, list[pb.CommandRecord]]:
        if not request.commands[0].idempotency_key and len(c.targets.targets) > 1:
            request.commands[0].idempotency_key = new_idempotency_key()  # retries find it
        if not wait:
            response = await c.unary("SubmitCommands", request)
            return response.results[0], []
        return await c.submit_and_wait(request, wait_timeout)

    result, records = run(connection(), action)
    if not wait:
        echo(render.render([result], render.SUBMIT_COLUMNS, output(), many=False))
        return
    _print_records(records, many=False)
    _fail_unless_succeeded(records)


@commands.command("get")
@click.argument("ids", nargs=-1, required=True, metavar="COMMAND_ID...")
@leaf
def commands_get(ids: tuple[str, ...]) -> None:
    """Show commands by id."""

    async def action(c: Client) -> list[pb.CommandRecord]:
        return [await c.unary("GetCommand", pb.GetCommandRequest(id=i)) for i in ids]

    _print_records(run(connection(), action), many=len(ids) > 1)


@commands.command("ls")
@click.option("--state", "states", multiple=True, type=click.Choice(COMMAND_STATES))
@click.option("--node", "node_id", default="", metavar="NODE_ID", help="Only this node's.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most this many (0 = all).")
@leaf
def commands_ls(states: tuple[str, ...], node_id: str, limit: int) -> None:
    """List commands (filter by --state and --node)."""
    request = pb.ListCommandsRequest(
        states=_enum("COMMAND_STATE_", states),
        node_id=node_id,
        page_size=min(limit or 500, 500),
    )
    found = run(connection(), lambda c: c.pages("ListCommands", request, "commands", limit))
    _print_records(found, many=True)


@commands.command("wait", epilog=EXIT_CODES)
@click.argument("ids", nargs=-1, required=True, metavar="COMMAND_ID...")
@click.option("--timeout", callback=duration, metavar="DURATION", help="Default: no limit.")
@leaf
def commands_wait(ids: tuple[str, ...], timeout: float | None) -> None:
    """Wait until commands are final; exit 1 unless all SUCCEEDED."""
    records = run(connection(), lambda c: c.wait(list(ids), timeout or 0))
    _print_records(records, many=len(records) > 1)
    _fail_unless_succeeded(records)


@commands.command("cancel")
@click.argument("ids", nargs=-1, required=True, metavar="COMMAND_ID...")
@leaf
def commands_cancel(ids: tuple[str, ...]) -> None:
    """Cancel commands (a final one is FAILED_PRECONDITION, exit 3)."""

    async def action(c: Client) -> list[pb.CommandRecord]:
        return [await c.unary("CancelCommand", pb.CancelCommandRequest(id=i)) for i in ids]

    _print_records(run(connection(), action), many=len(ids) > 1)


# ---------------------------------------------------------------- agents


@cli.group()
def agents() -> None:
    """Deploy, list, inspect and stop agents (long-running workloads)."""


def _resource(
    parser: Callable[[str], float],
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> float:
        if value is None:
            return 0.0
        try:
            return float(parser(value))
        except ValueError as err:
            raise click.BadParameter(str(err), ctx, param) from None

    return callback


@agents.command("deploy")
@click.option("--name", required=True, help="Agent name; replicas are <name>-<n>.")
@click.option("--spec", "spec", metavar="@FILE|-|TEXT", help="Opaque spec handed to the node.")
@click.option("--replicas", type=click.IntRange(min=1), default=1)
@click.option("--cpu", callback=_resource(parse_cpu), help="Cores per replica (0.5, 500m).")
@click.option("--memory", callback=_resource(parse_size), help="Bytes per replica (512MB).")
@click.option("--gpu", callback=_resource(float), help="GPUs per replica.")
@click.option("--label", "labels", multiple=True, callback=parse_labels, metavar="K=V")
@click.option("--spread-key", default="", metavar="LABEL")
@leaf
def agents_deploy(
    name: str,
    spec: str | None,
    replicas: int,
    cpu: float,
    memory: float,
    gpu: float,
    labels: dict[str, str],
    spread_key: str,
) -> None:
    """Deploy an agent: each replica is placed by the scheduler and started on its node."""
    agent_spec = pb.AgentSpec(
        name=name,
        spec=read_bytes(spec, "--spec"),
        request=pb.Resources(cpu=cpu, memory=memory, gpu=gpu),
        placement=pb.Placement(label_selector=labels, spread_key=spread_key),
        replicas=replicas,
    )
    response = run(
        connection(), lambda c: c.unary("DeployAgent", pb.DeployAgentRequest(spec=agent_spec))
    )
    echo(render.render(response.agents, render.AGENT_COLUMNS, output(), many=True))


@agents.command("ls")
@click.option("--name", default="", help="Only this agent's replicas.")
@click.option("--state", "states", multiple=True, type=click.Choice(AGENT_STATES))
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most this many (0 = all).")
@leaf
def agents_ls(name: str, states: tuple[str, ...], limit: int) -> None:
    """List agent replicas."""
    request = pb.ListAgentsRequest(
        name=name,
        states=_enum("AGENT_STATE_", states),
        page_size=min(limit or 500, 500),
    )
    found = run(connection(), lambda c: c.pages("ListAgents", request, "agents", limit))
    echo(render.render(found, render.AGENT_COLUMNS, output(), many=True))


@agents.command("get")
@click.argument("ids", nargs=-1, required=True, metavar="AGENT_ID...")
@leaf
def agents_get(ids: tuple[str, ...]) -> None:
    """Show agent replicas by id (<name>-<replica>)."""

    async def action(c: Client) -> list[pb.Agent]:
        return [await c.unary("GetAgent", pb.GetAgentRequest(id=i)) for i in ids]

    echo(
        render.render(run(connection(), action), render.AGENT_COLUMNS, output(), many=len(ids) > 1)
    )


@agents.command("stop")
@click.argument("name")
@leaf
def agents_stop(name: str) -> None:
    """Stop every replica of an agent."""
    response = run(connection(), lambda c: c.unary("StopAgent", pb.StopAgentRequest(name=name)))
    echo(render.render(response.agents, render.AGENT_COLUMNS, output(), many=True))


# ---------------------------------------------------------------- events


@cli.group()
def events() -> None:
    """Read the event stream."""


@events.command("tail")
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=None,
    metavar="INDEX",
    help="Events with a larger index (default: all kept, or only new ones with --follow).",
)
@click.option(
    "--topic", "topics", multiple=True, type=click.Choice(("node", "command", "agent", "system"))
)
@click.option("--key", "keys", multiple=True, metavar="KEY", help="Only events about this id.")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming; reconnect and resume by index.")
@click.option(
    "--idle",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Without --follow: stop after this long with nothing new.",
)
@leaf
def events_tail(
    after: int | None, topics: tuple[str, ...], keys: tuple[str, ...], follow: bool, idle: float
) -> None:
    """Print events, one per line (-o json: JSON Lines; -o yaml: YAML documents).

    Without --follow it prints what the server has (from --after, default from the
    oldest kept) and stops when the server says it is caught up. With --follow it runs
    until interrupted; when the connection drops (UNAVAILABLE) it reconnects and resumes
    after the last index it printed: no gap, no duplicate.
    """
    request = pb.WatchEventsRequest(topics=topics, keys=keys)
    if after is not None:
        request.after_index = after
    elif not follow:
        request.after_index = 0
    fmt = output()
    # The header waits for the first event: a failed connection prints nothing on stdout.
    header = [render.EVENT_HEADER + ("  SUMMARY" if fmt == "wide" else "")]
    if fmt not in ("table", "wide"):
        header.clear()

    def on_event(event: pb.Event) -> None:
        if header:
            click.echo(header.pop())
        click.echo(render.event_line(event, fmt))
        sys.stdout.flush()

    def on_reconnect(message: str) -> None:
        click.echo(f"{PROG}: {message}", err=True)

    run(
        connection(),
        lambda c: follow_events(
            c, request, follow=follow, idle=idle, on_event=on_event, on_reconnect=on_reconnect
        ),
    )


# ---------------------------------------------------------------- status


@cli.command("status")
@leaf
def status() -> None:
    """Show server health (gRPC health; more with --http).

    With --http (or NEXUS_HTTP, or the context's http) also the state, version,
    implementation (compiled or pure twins) and, with -o wide/json/yaml, the components
    from /health/detailed. LEADER is "single" until replicas exist. Exit 3 unless the
    server is SERVING.
    """
    conn = connection()
    serving = run(conn, lambda c: c.serving())
    doc: dict[str, Any] = {"target": conn.target, "grpc_health": serving, "leader": "single"}
    if conn.http:
        detail = health_detailed(conn)
        doc.update(
            http=conn.http,
            status=detail.get("status"),
            state=detail.get("state"),
            version=detail.get("version"),
            uptime_seconds=detail.get("uptime_seconds"),
            implementation=detail.get("implementation"),
            components=detail.get("components"),
        )
    fmt = output()
    if fmt in ("json", "yaml"):
        echo(render.render_doc(doc, fmt))
    else:
        rows = [
            (k.upper().replace("_", "-"), _cell(v))
            for k, v in doc.items()
            if fmt == "wide" or k != "components"
        ]
        echo(tabulate(rows, tablefmt="plain", disable_numparse=True))
    if serving != "SERVING":
        raise ServerError(f"{conn.target}: health {serving}")


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return render.pairs({str(k): _cell(v) for k, v in value.items()})
    return "-" if value is None else str(value)


# ---------------------------------------------------------------- config


@cli.group("config")
def config_group() -> None:
    """Contexts in the config file ($NEXUSCTL_CONFIG or ~/.config/nexus/config.toml)."""


@config_group.command("get-contexts")
@output_option
def config_get_contexts() -> None:
    """List contexts (* marks the current one)."""
    cfg = CtlConfig.load()
    fmt = output()
    if fmt in ("json", "yaml"):
        echo(
            render.render_doc(
                {"current_context": cfg.current_context, "contexts": cfg.contexts}, fmt
            )
        )
        return
    rows = [
        (
            "*" if name == cfg.current_context else "",
            name,
            ctx.get("target", "-"),
            ctx.get("http", "-"),
        )
        for name, ctx in sorted(cfg.contexts.items())
    ]
    if not rows:
        echo(f"No contexts in {cfg.path}.")
        return
    echo(tabulate(rows, headers=["CURRENT", "NAME", "TARGET", "HTTP"], tablefmt="plain"))


@config_group.command("current-context")
def config_current_context() -> None:
    """Print the current context's name."""
    cfg = CtlConfig.load()
    if not cfg.current_context:
        raise click.UsageError(f"no current_context in {cfg.path}")
    echo(cfg.current_context)


@config_group.command("use-context")
@click.argument("name", shell_complete=_complete_context)
def config_use_context(name: str) -> None:
    """Make NAME the current context."""
    cfg = CtlConfig.load()
    cfg.context(name)  # unknown name: a usage error naming the known ones
    cfg.current_context = name
    cfg.save()
    echo(f"Switched to context {name!r}.")


@config_group.command("set-context")
@click.argument("name")
@click.option("--target", metavar="HOST:PORT")
@click.option("--http", metavar="URL")
@click.option("--tls-ca", metavar="FILE")
@click.option("--tls-cert", metavar="FILE")
@click.option("--tls-key", metavar="FILE")
@click.option("--tls-server-name", metavar="NAME")
@click.option("--token-file", metavar="FILE")
def config_set_context(name: str, **values: str | None) -> None:
    """Create or update a context (only the given keys change)."""
    cfg = CtlConfig.load()
    ctx = cfg.contexts.setdefault(name, {})
    for key in CONTEXT_KEYS:
        value = values.get(key)
        if value is not None:
            ctx[key] = value
    if not cfg.current_context:
        cfg.current_context = name
    cfg.save()
    echo(f"Context {name!r} saved in {config_path()}.")


# ---------------------------------------------------------------- completion


@cli.command("completion")
@click.argument("shell", type=click.Choice(("bash", "zsh", "fish")))
def completion(shell: str) -> None:
    """Print the shell completion script.

    \b
    bash:  source <(nexusctl completion bash)       # or add it to ~/.bashrc
    zsh:   source <(nexusctl completion zsh)
    fish:  nexusctl completion fish > ~/.config/fish/completions/nexusctl.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None  # the Choice above only allows shells click knows
    root = click.get_current_context().find_root()
    echo(cls(cli, {}, root.info_name or PROG, "_NEXUSCTL_COMPLETE").source())


__all__ = ["EXIT_NOT_SUCCEEDED", "cli", "main"]


cli.add_command(cluster_group(leaf, connection, output))  # nexusctl cluster (ctl/cluster_cmd.py)
