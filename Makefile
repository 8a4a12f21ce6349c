# nexus_fast developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.nexus-install-stamp
# Anything that changes what `pip install -e .` produces (metadata, extensions, protobufs).
BUILD_INPUTS := pyproject.toml setup.py $(wildcard _ext/*.pyx _ext/*.pxd) \
                $(shell find proto -name '*.proto' 2>/dev/null)
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: venv install run run-cluster test lint docs bench bench-short bench-e2e chaos chaos-cluster profile promtool chromium etcd screenshot clean soak fuzz

venv install: $(STAMP)

# Build without isolation: the build requirements (read from pyproject.toml, the single
# source of truth) go into the venv first, then the editable install reuses them. Faster
# and more predictable than an isolated build env re-fetched on every change.
$(STAMP): $(BUILD_INPUTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) $$($(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
	$(PIP) install $(PIP_FLAGS) --no-build-isolation -e '.[dev]'
	@touch $@

run: install
	$(VENV)/bin/nexus-fast --config configs/development.toml

lint: install promtool
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict nexus_fast
	$(PY) scripts/gen_api_docs.py --check
	promtool check rules deploy/prometheus-rules.yml
	promtool test rules deploy/prometheus-rules.test.yml
	promtool check config examples/monitoring/prometheus.yml

# docs/api.md from the comments in proto/ (lint fails when it is stale).
docs: install
	$(PY) scripts/gen_api_docs.py

# Both twins: once with the compiled hot paths required, once pure Python. Tests marked
# `once` (long process-level runs: crash loops, soak, failover rounds) run in the compiled
# pass only; `make chaos` runs their long versions.
test: install promtool chromium etcd
	$(MAKE) --no-print-directory lint
	@rc=0; \
	echo "== tests, compiled twins (NEXUS_REQUIRE_EXTENSIONS=1)"; \
	NEXUS_REQUIRE_EXTENSIONS=1 $(PY) -m pytest tests -q || rc=1; \
	echo "== tests, pure-Python twins (NEXUS_NO_EXTENSIONS=1)"; \
	NEXUS_NO_EXTENSIONS=1 $(PY) -m pytest tests -q -m "not once" || rc=1; \
	echo "== benchmark suites, each run once untimed (make bench times them)"; \
	NEXUS_REQUIRE_EXTENSIONS=1 $(PY) -m pytest bench -q --benchmark-disable || rc=1; \
	exit $$rc

# promtool checks the /metrics exposition and the alert rules; the prometheus server (same
# Debian package) runs in tests/integration/test_prometheus.py. Best effort, never fails here.
promtool:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (Debian package prometheus)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 \
	         && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
	    || echo "WARNING: could not install promtool; the /metrics test will fail"; \
	  else \
	    echo "WARNING: promtool not found and cannot apt-get install it; the /metrics test will fail"; \
	  fi; \
	fi

# The dashboard's browser test drives Debian's chromium through chromium-driver (selenium);
# nothing downloads a browser of its own. Best effort here: the test fails, saying what is
# missing, if they are still absent.
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver (Debian packages)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 \
	         && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } \
	    || echo "WARNING: could not install chromium; the dashboard browser test will fail"; \
	  else \
	    echo "WARNING: chromium/chromedriver not found and cannot apt-get install them; the dashboard browser test will fail"; \
	  fi; \
	fi

# Cluster mode's tests start real etcd members on loopback (nexus_fast/cluster/etcd_procs.py)
# from Debian's etcd-server package. Best effort here: those tests fail, naming the package,
# when it is still absent.
etcd:
	@if [ ! -x /usr/bin/etcd ] && ! command -v etcd >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing etcd (Debian package etcd-server)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq --no-install-recommends etcd-server >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 \
	         && apt-get install -y -qq --no-install-recommends etcd-server >/dev/null 2>&1; } \
	    || echo "WARNING: could not install etcd-server; the cluster tests will fail"; \
	  else \
	    echo "WARNING: etcd not found and cannot apt-get install it; the cluster tests will fail"; \
	  fi; \
	fi

# Three replicas on a 3-member etcd on loopback (docs/cluster.md); Ctrl-C stops them all.
run-cluster: install etcd
	$(PY) scripts/run_cluster.py

# docs/img/dashboard.png: the browser test's last view of the page (README's picture).
screenshot: install chromium
	@mkdir -p docs/img
	NEXUS_DASHBOARD_SCREENSHOT=$(CURDIR)/docs/img/dashboard.png \
	  $(PY) -m pytest tests/integration/test_dashboard_browser.py -q

bench: install
	NEXUS_REQUIRE_EXTENSIONS=1 $(PY) -m pytest bench --benchmark-only -q

# Quick CI mode: few rounds, no warm-up, just proves the suites run.
bench-short: install
	NEXUS_REQUIRE_EXTENSIONS=1 $(PY) -m pytest bench --benchmark-only -q \
	  --benchmark-min-rounds=3 --benchmark-max-time=0.05 --benchmark-warmup=off

# End-to-end figures with their baselines (nexus-bench, docs/performance.md).
SCENARIO ?= dispatch
DURATION ?= 10
bench-e2e: install
	@for s in dispatch heartbeat events; do \
	  NEXUS_REQUIRE_EXTENSIONS=1 $(VENV)/bin/nexus-bench $$s --spawn --baseline --duration $(DURATION) || exit 1; \
	done
	NEXUS_REQUIRE_EXTENSIONS=1 $(VENV)/bin/nexus-bench state --baseline --duration $(DURATION)
	NEXUS_REQUIRE_EXTENSIONS=1 $(VENV)/bin/nexus-bench micro --duration $(DURATION)

# The long crash loop (docs/reliability.md): ROUNDS server kills, SIGKILL and every crash
# failpoint; writes its figures to docs/chaos-figures.json and docs/reliability.md.
# CI runs 50 rounds (tests/integration/test_crash_loop.py). CHAOS_ARGS e.g. "--seed 7".
ROUNDS ?= 1000
chaos: install
	NEXUS_REQUIRE_EXTENSIONS=1 $(PY) scripts/chaos.py --rounds $(ROUNDS) --progress 50 \
	  --json docs/chaos-figures.json --docs docs/reliability.md $(CHAOS_ARGS)

# The cluster's crash loop (docs/cluster.md): a real 3-member etcd, three replicas, the
# leader killed (SIGKILL) under load every round; failover times and the checks of `make
# chaos` go to docs/chaos-cluster-figures.json. CI runs 3 rounds (20 in the `once` pass,
# tests/integration/test_cluster.py). Needs etcd (Debian package etcd-server).
# ROUNDS defaults to 200 here (`make chaos-cluster ROUNDS=20` for fewer).
chaos-cluster: ROUNDS = 200
chaos-cluster: install
	NEXUS_REQUIRE_EXTENSIONS=1 $(PY) scripts/chaos_cluster.py --rounds $(ROUNDS) \
	  --progress 10 --json docs/chaos-cluster-figures.json $(CHAOS_ARGS)

# The server under scalene while nexus-bench drives it; prints where the profile went.
profile: install
	DURATION=$(DURATION) profiling/run.sh $(SCENARIO)

# Soak: 10 minutes at half the measured maximum rate; figures in soak.json (docs/reliability.md).
SOAK_MINUTES ?= 10
soak: install
	NEXUS_REQUIRE_EXTENSIONS=1 $(PY) scripts/soak.py --minutes $(SOAK_MINUTES) --json soak.json --check

# Fuzz: the gRPC and WebSocket fuzzers with many more examples than CI runs.
FUZZ_EXAMPLES ?= 2000
fuzz: install
	NEXUS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) NEXUS_REQUIRE_EXTENSIONS=1 $(PY) -m pytest tests/integration/test_fuzz.py -q

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
	rm -f _ext/*.c _ext/*.html nexus_fast/*.so $(STAMP)
	rm -f nexus_fast/pb/*_pb2.py nexus_fast/pb/*_pb2.pyi nexus_fast/pb/*_pb2_grpc.py
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
