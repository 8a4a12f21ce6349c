"""nexus-bench pieces that need no sockets: histogram, schedule, report, CLI validation."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from nexus_fast.benchmark import cli, peers
from nexus_fast.benchmark.common import keep_alive
from nexus_fast.benchmark.histogram import (
    MAX_NS,
    N_BUCKETS,
    LatencyHistogram,
    bucket_bounds,
    bucket_index,
)
from nexus_fast.benchmark.procs import metric_sum, parse_metrics
from nexus_fast.benchmark.report import SCHEMA, Measurement, Ratio, Report, cpu_ratio
from nexus_fast.benchmark.runner import FixedRateSchedule, drive
from nexus_fast.benchmark.scenarios.dispatch import (
    PAYLOAD_SIZE,
    ArrivalClock,
    BatchEncoder,
    build_batch,
    payload_stamp,
    stamp_payload,
)
from nexus_fast.benchmark.workers import aggregate, split
from nexus_fast.pb import fabric_pb2 as pb

# ------------------------------------------------------------------ histogram


def test_buckets_are_contiguous_and_narrow() -> None:
    prev_high = -1
    for i in range(N_BUCKETS):
        low, high = bucket_bounds(i)
        assert low == prev_high + 1  # no gaps, no overlaps
        assert bucket_index(low) == i and bucket_index(high) == i
        if low >= 1000:  # from 1 us on: < 1% wide, i.e. ~2 significant digits
            assert (high - low + 1) / low < 0.01
        prev_high = high
    assert bucket_index(MAX_NS) == N_BUCKETS - 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_match_numpy_within_precision(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Log-normal latencies spanning ~10 us .. ~1 s, like a real run.
    data = np.exp(rng.normal(np.log(2e-3), 1.5, 50_000))
    data = np.clip(data, 1e-6, 59.0)
    hist = LatencyHistogram()
    hist.record_many(data.tolist())
    assert hist.count == len(data)
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        expected = float(np.percentile(data, q, method="inverted_cdf"))
        got = hist.percentile(q)
        assert got == pytest.approx(expected, rel=0.01), q
    assert hist.mean == pytest.approx(float(data.mean()), rel=1e-6)


def test_percentile_of_uniform_and_constant() -> None:
    hist = LatencyHistogram()
    for _ in range(1000):
        hist.record(0.005)
    assert hist.percentile(50) == pytest.approx(0.005, rel=0.005)
    assert hist.percentile(99.9) == pytest.approx(0.005, rel=0.005)
    hist = LatencyHistogram()
    values = [random.Random(7).uniform(0, 1) for _ in range(10_000)]
    hist.record_many(values)
    assert hist.percentile(50) == pytest.approx(float(np.median(values)), rel=0.01)


def test_clamping_merge_and_round_trip() -> None:
    a = LatencyHistogram()
    a.record(-1.0)  # clock skew: counted as 0
    a.record(120.0)  # beyond 60 s: clamped and flagged
    assert a.min_ns == 0 and a.max_ns == MAX_NS and a.saturated == 1
    b = LatencyHistogram()
    b.record_many([0.001, 0.002, 0.003])
    a.merge(b)
    assert a.count == 5
    c = LatencyHistogram.from_dict(json.loads(json.dumps(a.to_dict())))
    assert c.to_dict() == a.to_dict()
    assert c.percentile(50) == a.percentile(50)
    summary = c.summary_ms()
    assert set(summary) >= {"count", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms"}
    assert LatencyHistogram().percentile(99) == 0.0
    with pytest.raises(ValueError):
        c.percentile(101)


# ------------------------------------------------------------------ fixed-rate schedule


def test_fixed_rate_schedule_math() -> None:
    s = FixedRateSchedule(200.0, start=10.0)
    assert s.intended(0) == 10.0
    assert s.intended(200) == pytest.approx(11.0)
    assert s.due(9.99) == 0
    assert s.due(10.0) == 1  # operation 0 is due at the start
    assert s.due(10.004) == 1
    assert s.due(10.005) == 2
    assert s.due(11.0) == 201
    for i in range(1000):  # every op is due exactly from its intended time on
        assert s.due(s.intended(i)) >= i + 1
        assert s.due(s.intended(i) - 1e-6) <= i
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            FixedRateSchedule(bad, 0.0)


def test_fixed_rate_latency_counts_from_intended_time() -> None:
    """A stalled operation delays the ones behind it; their latency must show it.

    No wall-clock bounds on how many ran (that flaked under load): ``max_ops`` ends the
    run, the plan's times are checked exactly, and latencies only have a floor that
    load can raise but never lower.
    """

    async def main() -> tuple[int, list[float], list[float]]:
        intended_at: list[float] = []
        lat: list[float] = []
        lock = asyncio.Lock()

        async def op(intended: float) -> None:
            intended_at.append(intended)
            async with lock:  # a server that handles one request at a time
                if not lat:
                    await asyncio.sleep(0.2)  # the first request stalls 200 ms
                lat.append(time.perf_counter() - intended)

        res = await drive(op, duration=60.0, rate=100.0, max_ops=30)
        return res.started, intended_at, lat

    started, intended_at, lat = asyncio.run(main())
    assert started == len(intended_at) == len(lat) == 30
    # Each op is handed its planned start (start + i / rate), however late it really began.
    assert intended_at == sorted(intended_at)
    for i, at in enumerate(intended_at):
        assert at - intended_at[0] == pytest.approx(i / 100.0, abs=1e-9)
    # Requests planned during the stall waited for it: the 2nd..6th finished after 0.2 s,
    # planned at 0.01..0.05 s, so at least 0.15 s each (more under load, never less).
    assert sorted(lat)[-5] > 0.1


def test_closed_loop_drive_counts_errors() -> None:
    async def main() -> tuple[int, int, str]:
        n = [0]

        async def op(intended: float) -> None:
            n[0] += 1
            k = n[0]
            await asyncio.sleep(0)
            if k % 2:
                raise RuntimeError("boom")

        res = await drive(op, duration=5.0, concurrency=3, max_ops=10)
        return res.started, res.errors, res.last_error

    started, errors, last = asyncio.run(main())
    assert started == 10 and errors == 5 and "boom" in last


# ------------------------------------------------------------------ report


def test_json_report_schema(tmp_path: Path) -> None:
    report = Report(scenario="dispatch", config={"duration": 3.0, "batch_size": 100})
    ours = Measurement("commands", 1234.5, "commands/s", 3700, 3.0, errors=3)
    hist = LatencyHistogram()
    hist.record_many([0.001, 0.002])
    ours.add_latency("submit->node recv", hist)
    report.results.append(ours)
    report.baseline.append(Measurement("echo", 4000.0, "rpc/s", 12000, 3.0))
    report.ratios.append(Ratio("r", 0.3, "ours / base", ">= 0.5"))
    path = tmp_path / "out.json"
    report.write_json(path)
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA
    assert set(doc) >= {
        "scenario",
        "ok",
        "exit_code",
        "config",
        "environment",
        "results",
        "baseline",
        "ratios",
    }
    assert set(doc["environment"]) >= {"date", "python", "cpu_count", "platform"}
    m = doc["results"][0]
    assert set(m) >= {
        "name",
        "throughput",
        "unit",
        "count",
        "errors",
        "error_rate",
        "duration_s",
        "latency",
        "server_cpu",
        "client_cpu",
        "extra",
    }
    assert m["error_rate"] == pytest.approx(3 / 3703)
    assert m["latency"]["submit->node recv"]["count"] == 2
    assert doc["ratios"][0] == {
        "name": "r",
        "value": 0.3,
        "definition": "ours / base",
        "target": ">= 0.5",
    }
    table = report.table()
    assert "commands" in table and "baseline: echo" in table and "p99.9" in table


def test_plot_without_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="matplotlib"):
        Report(scenario="micro", config={}).plot(tmp_path / "x.png")


def test_metrics_parsing() -> None:
    text = (
        "# HELP x\n"
        'nexus_node_messages_total{kind="heartbeat"} 12.0\n'
        'nexus_node_messages_total{kind="ack"} 3.0\n'
        "process_cpu_seconds_total 1.5\n"
    )
    m = parse_metrics(text)
    assert metric_sum(m, "nexus_node_messages_total", kind="heartbeat") == 12.0
    assert metric_sum(m, "nexus_node_messages_total") == 15.0
    assert m["process_cpu_seconds_total"] == 1.5


def test_batch_encoder_matches_protobuf() -> None:
    enc = BatchEncoder("b1-0000002", 50)
    raw, ids = enc.encode(77)
    assert raw == build_batch("b1-0000002", 77, 50).SerializeToString()
    assert ids[0] == "b1-0000002-000000077" and len(ids) == 50
    stamp = 123_456_789_012_345
    raw, ids = enc.encode(77, stamp)
    assert raw == build_batch("b1-0000002", 77, 50, stamp).SerializeToString()
    # the stamp changes no size: same bytes per request whatever the submit time
    assert len(raw) == len(enc.encode(77)[0]) == len(enc.encode(77, 2**63 - 1)[0])
    parsed = pb.SubmitCommandsRequest.FromString(raw)
    assert [c.idempotency_key for c in parsed.commands] == ids
    assert {payload_stamp(c.payload) for c in parsed.commands} == {stamp}


def test_batch_encoder_selects_the_run_label() -> None:
    labels = {"nexus-bench-run": "a1b2c3d4e5f6"}
    enc = BatchEncoder("b1-0000002", 3, labels)
    raw, _ = enc.encode(5, 42)
    assert raw == build_batch("b1-0000002", 5, 3, 42, labels).SerializeToString()
    parsed = pb.SubmitCommandsRequest.FromString(raw)
    assert all(dict(c.placement.label_selector) == labels for c in parsed.commands)


def test_submit_stamp_round_trip() -> None:
    for ns in (0, 1, 987_654_321, 2**63 - 1, time.perf_counter_ns()):
        payload = stamp_payload(ns)
        assert len(payload) == PAYLOAD_SIZE and payload_stamp(payload) == ns
    assert payload_stamp(stamp_payload(-5)) == 0
    for other in (b"", b"x" * 32, b"t=12", b"t=" + b"1" * 19 + b"z" * 11):
        assert payload_stamp(other) is None


def test_arrival_clock_times_this_runs_first_attempts() -> None:
    clock = ArrivalClock("b9-")
    submit = 1_000_000_000
    commands = [
        pb.Command(id="b9-000000001", payload=stamp_payload(submit), attempt=1),
        pb.Command(id="b9-000000002", payload=stamp_payload(submit), attempt=2),  # redelivered
        pb.Command(id="other-1", payload=stamp_payload(submit), attempt=1),  # not this run
        pb.Command(id="b9-000000003", payload=b"x" * 32, attempt=1),  # no stamp
    ]
    clock.on_commands(None, commands, 1.25)  # type: ignore[arg-type]
    assert clock.received == 1 and clock.redelivered == 1
    assert clock.recv.count == 1 and clock.recv.percentile(50) == pytest.approx(0.25, rel=0.01)
    assert clock.first == clock.last == 1.25
    clock.on_commands(None, commands[:1], 2.0)  # type: ignore[arg-type]
    assert clock.received == 2 and (clock.first, clock.last) == (1.25, 2.0)


# ------------------------------------------------------------------ CLI validation


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dispatch"], "needs --target"),
        (["dispatch", "--spawn", "--target", "127.0.0.1:1"], "not allowed with"),
        (["dispatch", "--target", "nohostport"], "HOST:PORT"),
        (["dispatch", "--target", "10.1.2.3:50053"], "--allow-remote"),
        (["events", "--target", "127.0.0.1:50053"], "needs --ws"),
        (["state", "--spawn"], "unrecognized arguments: --spawn"),
        (["micro", "--nodes", "3"], "unrecognized arguments: --nodes"),
        (["dispatch", "--spawn", "--interval", "1"], "unrecognized arguments: --interval"),
        (["dispatch", "--target", "127.0.0.1:1", "--tls-ca", "/nonexistent.pem"], "readable"),
        (["dispatch", "--spawn", "--token", ""], "non-empty single line"),
        (["dispatch", "--spawn", "--duration", "0"], "positive"),
        (["dispatch", "--spawn", "--duration", "601"], "at most"),
        (["dispatch", "--spawn", "--batch-size", "0"], "positive integer"),
        (["dispatch", "--spawn", "--max-error-rate", "2"], "0..1"),
        (["heartbeat", "--spawn", "--interval", "1", "--rate", "5"], "give one"),
        (["dispatch", "--target", "127.0.0.1:1", "--tls-cert", "c.pem"], "go together"),
        (["dispatch", "--spawn", "--http", "8082"], "go with --target"),
        (["state", "--levels", "1,x"], "1,16,256"),
        (["nope"], "invalid choice"),
        (["state", "--client-procs", "2"], "unrecognized arguments: --client-procs"),
        (["dispatch", "--spawn", "--nodes", "3", "--client-procs", "4"], "more than --nodes"),
        (["heartbeat", "--spawn", "--nodes", "3", "--client-procs", "4"], "more than --nodes"),
        (["events", "--spawn", "--subscribers", "1", "--client-procs", "2"], "--subscribers"),
        (["heartbeat", "--spawn", "--client-procs", "0"], "positive integer"),
        (["roundtrip"], "needs --target"),
        (["roundtrip", "--spawn", "--peers", "ray,dask"], "subset of ray,celery"),
        (["roundtrip", "--spawn", "--rate", "5"], "unrecognized arguments: --rate"),
        (["heartbeat", "--spawn", "--peers", "ray"], "unrecognized arguments: --peers"),
        (["roundtrip", "--spawn", "--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_cli_rejects(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_accepts_and_fills_defaults() -> None:
    args = cli.parse_args(
        ["dispatch", "--target", "127.0.0.1:50053", "--http", "8082", "--ws", "8081"]
    )
    assert args.http_url == "http://127.0.0.1:8082" and args.ws_url == "ws://127.0.0.1:8081"
    assert args.nodes == 100 and args.batch_size == 100 and args.duration == 10.0
    args = cli.parse_args(["heartbeat", "--spawn", "--nodes", "10000", "--commands", "5"])
    assert args.nodes == 10000 and args.count == 5
    args = cli.parse_args(["state", "--levels", "1,8"])
    assert args.levels == [1, 8]
    args = cli.parse_args(["dispatch", "--target", "localhost:1", "--http", "http://localhost:2/"])
    assert args.http_url == "http://localhost:2"
    assert args.client_procs == 1
    args = cli.parse_args(["heartbeat", "--spawn", "--nodes", "10", "--client-procs", "2"])
    assert args.client_procs == 2 and cli._config(args)["client_procs"] == 2
    args = cli.parse_args(["dispatch", "--spawn", "--client-procs", "2"])
    assert args.client_procs == 2 and args.nodes == 100


def test_scenario_help_shows_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["dispatch", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--batch-size" in text and "--final-every" in text and "--token" in text
    assert "nexus-bench-run=<random>" in text  # says its commands go to its own nodes
    assert "--levels" not in text and "--interval" not in text and "--subscribers" not in text
    with pytest.raises(SystemExit):
        cli.parse_args(["state", "--help"])
    text = capsys.readouterr().out
    assert "--levels" in text and "--target" not in text and "--batch-size" not in text


def test_report_config_never_holds_the_token() -> None:
    args = cli.parse_args(["dispatch", "--spawn", "--token", "s3cret-token"])
    assert args.token == "s3cret-token"
    config = cli._config(args)
    assert config["token"] == "(set)" and "s3cret" not in repr(config)
    assert cli._config(cli.parse_args(["state"]))["token"] is None


def test_benchmark_output_has_no_internal_wording() -> None:
    """Figures and help speak to users: no references to our issue tracker."""
    import pathlib

    import nexus_fast.benchmark as bench_pkg

    root = pathlib.Path(bench_pkg.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text().lower()
        assert "the issue" not in text and "issue's" not in text, path


# ------------------------------------------------------------------ client workers


def test_split_is_even_and_covers_everything() -> None:
    assert split(10_000, 2) == [(0, 5000), (5000, 5000)]
    assert split(7, 3) == [(0, 3), (3, 2), (5, 2)]
    for total, k in ((1, 1), (100, 7), (10_001, 4)):
        parts = split(total, k)
        assert sum(n for _, n in parts) == total
        assert [off for off, _ in parts] == [sum(n for _, n in parts[:i]) for i in range(k)]
        assert max(n for _, n in parts) - min(n for _, n in parts) <= 1


def test_aggregate_sums_counts_and_merges_histograms() -> None:
    rng = random.Random(7)
    values = [[rng.uniform(1e-5, 0.2) for _ in range(1000)] for _ in range(3)]
    whole = LatencyHistogram()
    results = []
    for i, vals in enumerate(values):
        part = LatencyHistogram()
        part.record_many(vals)
        whole.record_many(vals)
        # through JSON, as a worker's result line travels
        doc = {
            "counts": {"events": 100 * (i + 1), "closed": i % 2},
            "hists": {"recv": part.to_dict()},
            "cpu": 0.5 + i,
            "elapsed": 2.0 + i / 10,
            "first": 10.0 + i,
            "last": 20.0 - i,
            "extra": {"template": "x"} if i == 0 else {},
        }
        results.append(json.loads(json.dumps(doc)))
    agg = aggregate(results)
    assert agg.counts == {"events": 600, "closed": 1}
    assert agg.cpu == pytest.approx(4.5) and agg.cpu_per_proc == [0.5, 1.5, 2.5]
    assert agg.elapsed == pytest.approx(2.2)
    assert (agg.first, agg.last) == (10.0, 20.0)
    assert agg.extras[0] == {"template": "x"}
    merged = agg.hists["recv"]
    assert merged.count == whole.count == 3000
    assert merged.to_dict() == whole.to_dict()
    assert merged.summary_ms() == whole.summary_ms()
    empty = aggregate([])
    assert empty.counts == {} and empty.hists == {} and empty.cpu == 0.0


def test_keep_alive_spreads_heartbeats_over_the_period() -> None:
    """Every node beats each period, a few at a time: no burst of the whole fleet at once."""

    class Node:
        interval = 0.2  # beats every 0.1 s
        error = ""

        def __init__(self) -> None:
            self.beats = 0

        async def heartbeat(self) -> None:
            self.beats += 1
            in_flight.append(self)
            await asyncio.sleep(0)
            bursts.append(len(in_flight))
            in_flight.remove(self)

    class Pool:
        nodes = [Node() for _ in range(100)]

    in_flight: list[Node] = []
    bursts: list[int] = []

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(keep_alive(Pool(), stop, slices=50))  # type: ignore[arg-type]
        await asyncio.sleep(0.25)
        stop.set()
        await asyncio.wait_for(task, 1.0)

    asyncio.run(main())
    assert all(node.beats >= 1 for node in Pool.nodes)
    assert max(bursts) == 2  # 100 nodes / 50 slices


def test_cpu_ratio_compares_throughput_per_server_cpu_second() -> None:
    ours = Measurement(name="ours", throughput=900.0, unit="messages/s", count=9000, duration_s=10)
    ours.server_cpu = {"seconds": 5.0, "percent": 50.0}  # 1,800 per CPU-second
    base = Measurement(
        name="echo", throughput=1200.0, unit="messages/s", count=12000, duration_s=10
    )
    base.server_cpu = {"seconds": 8.0, "percent": 80.0}  # 1,500 per CPU-second
    r = cpu_ratio("x / y", ours, base, "t")
    assert r.name == "x / y, per server CPU" and r.value == 1.2
    assert "1,800 / 1,500 messages per server CPU-second" in r.definition
    base.server_cpu = None
    assert cpu_ratio("x / y", ours, base, "t").value is None


def test_roundtrip_defaults_and_peer_parsing() -> None:
    args = cli.parse_args(["roundtrip", "--spawn"])
    assert (args.concurrency, args.warmup, args.before, args.peers) == (1, 50, False, None)
    assert peers.parse_peers("celery, ray,celery") == ["celery", "ray"]


def test_missing_peers_name_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever this machine has installed: a missing module names `pip install '.[peers]'`,
    a missing redis-server names the Debian package."""
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    why = peers.missing(["ray", "celery"])
    assert why is not None and "pip install '.[peers]'" in why
    assert "missing: ray, celery, redis" in why
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    why = peers.missing(["celery"])
    assert why is not None and "apt-get install redis-server" in why
    assert peers.missing(["ray"]) is None


def test_peers_without_the_extra_exit_2_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    for scenario in ("roundtrip", "dispatch"):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args([scenario, "--spawn", "--peers", "ray"])
        assert exc.value.code == 2
        assert "pip install '.[peers]'" in capsys.readouterr().err
