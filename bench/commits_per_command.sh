#!/usr/bin/env bash
# Durable commits and events per command on the embedded server (docs/performance.md,
# "Replicas on etcd"): in cluster mode each of these commits is one etcd transaction.
# Starts one server on free loopback ports, drives it with nexus-bench dispatch at fixed
# rates and one roundtrip run, reads nexus_db_operations_total{operation="commit"} and
# nexus_events_published_total from /metrics before and after, and the server's CPU from
# /proc. Usage: bash bench/commits_per_command.sh  (from the repository, after make install)
set -euo pipefail
D=$(mktemp -d /tmp/nexus-commits-XXXX)
read -r G W H < <(.venv/bin/python -c "from nexus_fast.benchmark.procs import free_ports; print(*free_ports(3))")
NEXUS_LOG_LEVEL=warning .venv/bin/python -m nexus_fast.cli --host 127.0.0.1 --grpc-port "$G" \
  --ws-port "$W" --http-port "$H" --db-path "$D/db" > "$D/server.log" 2>&1 &
PID=$!
trap 'kill "$PID"; wait "$PID" || true; rm -rf "$D"' EXIT
for _ in $(seq 150); do curl -sf "http://127.0.0.1:$H/ready" > /dev/null && break; sleep 0.2; done
scrape() {
  curl -s "http://127.0.0.1:$H/metrics" \
    | grep -E '^nexus_db_operations_total\{operation="commit"\}|^nexus_events_published_total' \
    | awk '{s[$1 ~ /db_op/ ? "c" : "e"] += $2} END {printf "%d %d\n", s["c"], s["e"]}'
}
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
for RATE in 5 20; do  # submits of 100 commands per second
  read -r C0 E0 < <(scrape); T0=$(ticks)
  .venv/bin/nexus-bench dispatch --target "127.0.0.1:$G" --http "$H" --rate "$RATE" \
    --batch-size 100 --nodes 100 --duration 15 --json "$D/d$RATE.json" > "$D/b$RATE.txt" 2>&1
  read -r C1 E1 < <(scrape); T1=$(ticks)
  .venv/bin/python - "$D/d$RATE.json" "$((C1 - C0))" "$((E1 - E0))" "$((T1 - T0))" <<'PY'
import json, os, sys
n = json.load(open(sys.argv[1]))["results"][0]["count"]
c, e, t = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) / os.sysconf("SC_CLK_TCK")
print(f"{n / 15:,.0f} commands/s: commits/command {c / n:.3f}, events/command {e / n:.2f}, "
      f"server CPU {t * 1e6 / n:.0f} us/command, commits/s {c / 15:.0f}")
PY
done
read -r C0 E0 < <(scrape)
.venv/bin/nexus-bench roundtrip --target "127.0.0.1:$G" --http "$H" --count 500 --warmup 0 \
  --duration 60 > "$D/rt.txt" 2>&1
read -r C1 E1 < <(scrape)
.venv/bin/python -c "print(f'roundtrip, one in flight: commits/round trip {($C1 - $C0) / 500:.2f}, \
events/round trip {($E1 - $E0) / 500:.2f}')"
