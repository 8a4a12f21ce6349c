"""Prometheus: the metric catalogue, the alert rules and a real Prometheus scraping the server.

A real ``nexus-fast`` with a ``nexus-node`` fleet runs real commands; the Debian ``prometheus``
binary (installed by ``make test``'s promtool target) scrapes it every second on a free
loopback port with its own temporary storage, and is stopped by pid at teardown.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from tests.integration.conftest import HOST, REPO, ServerProcess, http_get, wait_for

METRICS_MD = REPO / "docs" / "metrics.md"
RULES = REPO / "deploy" / "prometheus-rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus-rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
NODES = 3
COMMANDS = 7


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: `make promtool` installs the Debian package prometheus"
    return path


def exported_families(text: str) -> dict[str, str]:
    """``{family: type}`` from ``# TYPE`` lines, without prometheus_client's ``_created``."""
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    return {
        name: kind
        for name, kind in families.items()
        if not (name.endswith("_created") and kind == "gauge")
    }


def documented_families(markdown: str) -> dict[str, tuple[str, str]]:
    """``{family: (type, labels cell)}`` from the catalogue tables of docs/metrics.md."""
    rows = re.findall(
        r"^\| `([a-z_]+)` \| (counter|gauge|histogram|untyped) \|([^|]*)\|", markdown, re.M
    )
    return {name: (kind, labels) for name, kind, labels in rows}


def exported_labels(text: str, family: str) -> set[str]:
    labels: set[str] = set()
    for match in re.finditer(rf"^{family}(?:_bucket|_count|_sum)?\{{([^}}]*)\}}", text, re.M):
        labels |= {part.split("=", 1)[0] for part in re.findall(r'(\w+)="', match.group(1))}
    return labels - {"le"}


def run_commands(server: ServerProcess, count: int) -> list[pb.CommandRecord]:
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(
            lambda: (
                len(control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes) == NODES
                and all(
                    n.connected for n in control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
                )
            ),
            30,
            message="fleet connected",
        )
        specs = [pb.CommandSpec(kind="echo", payload=b"x") for _ in range(count)]
        submitted = control.SubmitCommands(pb.SubmitCommandsRequest(commands=specs), timeout=10)
        ids = [r.id for r in submitted.results]
        return list(
            control.WaitCommands(pb.WaitCommandsRequest(ids=ids, timeout_ms=30_000), timeout=40)
        )


@pytest.fixture
def busy_server(server: ServerProcess, fleet_factory: type) -> Iterator[ServerProcess]:
    """A server whose fleet has run COMMANDS commands to SUCCEEDED."""
    fleet = fleet_factory.create(server.grpc_target, NODES)
    records = run_commands(server, COMMANDS)
    assert [r.state for r in records] == [pb.COMMAND_STATE_SUCCEEDED] * COMMANDS, fleet.log()
    yield server


def test_every_exported_family_is_documented_with_its_type_and_labels(
    busy_server: ServerProcess,
) -> None:
    status, body, _ = http_get(busy_server.http_base + "/metrics")
    assert status == 200
    text = body.decode()
    exported = exported_families(text)
    documented = documented_families(METRICS_MD.read_text())
    assert "nexus_commands_processed_total" in exported  # the scrape is the real one
    missing = sorted(set(exported) - set(documented))
    assert not missing, f"exported but not in docs/metrics.md: {missing}"
    gone = sorted(set(documented) - set(exported))
    assert not gone, f"in docs/metrics.md but no longer exported: {gone}"
    for name, kind in exported.items():
        assert documented[name][0] == kind, (
            f"{name}: exported as {kind}, documented as {documented[name][0]}"
        )
        for label in exported_labels(text, name):
            assert f"`{label}`" in documented[name][1], f"{name}: label {label!r} not documented"


def test_alert_rules_pass_promtool() -> None:
    promtool = _tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def scrape_config(target: str) -> str:
    """Scrape ``target`` every second as job nexus-fast, with the alert rules loaded."""
    return (
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: nexus-fast\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )


class Prometheus:
    """The Debian ``prometheus`` binary on a free loopback port with its own storage."""

    def __init__(self, tmp: Path, config_text: str) -> None:
        (self.port,) = free_ports(1)
        self.log_path = tmp / "prometheus.log"
        config = tmp / "prometheus.yml"
        config.write_text(config_text)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address={HOST}:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def api(self, path: str, **params: str) -> Any:
        url = f"http://{HOST}:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body, _ = http_get(url)
        assert status == 200, (status, body[:500])
        return json.loads(body)["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("/api/v1/query", query=expr)["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            return http_get(f"http://{HOST}:{self.port}/-/ready")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def prometheus(busy_server: ServerProcess, tmp_path: Path) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path, scrape_config(f"{HOST}:{busy_server.http_port}"))
    try:
        wait_for(prom.ready, 30, message="prometheus ready")
        yield prom
    finally:
        prom.stop()


def test_real_prometheus_scrapes_business_metrics(prometheus: Prometheus) -> None:
    wait_for(
        lambda: prometheus.value('up{job="nexus-fast"}') == 1.0,
        30,
        message="target scraped and up",
    )
    wait_for(
        lambda: (
            prometheus.value('nexus_commands_processed_total{job="nexus-fast",status="succeeded"}')
            == COMMANDS
        ),
        30,
        message="commands counter through Prometheus",
    )
    assert prometheus.value('sum(nexus_nodes_total{job="nexus-fast",status="ready"})') == NODES
    # Node results arrived through the Connect streams: one per command.
    assert prometheus.value('nexus_node_messages_total{job="nexus-fast",kind="result"}') == COMMANDS
    # The alert rules load into the real Prometheus and evaluate without error.
    wait_for(
        lambda: (
            [r["health"] for g in prometheus.api("/api/v1/rules")["groups"] for r in g["rules"]]
            == ["ok"] * 8
        ),
        30,
        message="8 alert rules evaluated healthy",
    )
    firing = [a["labels"]["alertname"] for a in prometheus.api("/api/v1/alerts")["alerts"]]
    assert firing == [], f"alerts fire on a healthy server: {firing}"


def test_grafana_dashboard_queries_run_on_real_prometheus(prometheus: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 20
    documented = documented_families(METRICS_MD.read_text())
    wait_for(lambda: prometheus.value('up{job="nexus-fast"}') == 1.0, 30, message="scraped")
    for expr in exprs:
        for name in re.findall(r"\b((?:nexus|process)_[a-z_]+?)(?:_bucket)?\b[{(\[]", expr):
            assert name in documented, f"dashboard uses {name}, which docs/metrics.md does not list"
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$job", "nexus-fast")
        )
        # An invalid expression answers 400 here (http_get asserts 200).
        prometheus.query(concrete)
    # A panel shows what it says: the node count by status reaches Grafana's datasource.
    nodes = prometheus.query(
        'sum by (status) (nexus_nodes_total{job="nexus-fast", instance=~".*"})'
    )
    assert {r["metric"]["status"]: float(r["value"][1]) for r in nodes}["ready"] == NODES
