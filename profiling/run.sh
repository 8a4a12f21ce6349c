#!/usr/bin/env bash
# Profile the server under load: nexus-fast runs under scalene while nexus-bench drives it.
#
#   profiling/run.sh [SCENARIO] [extra nexus-bench args...]     (make profile SCENARIO=dispatch)
#
# Environment: DURATION (seconds of load, default 15), SCALENE_ARGS (extra scalene flags,
# default "--cpu-only"; e.g. "--memory" for allocations too), PROFILE_ONLY (comma-separated
# path fragments to keep, default "nexus_fast,grpc,google/protobuf,picows,lmdb,aiohttp").
# Writes profiling/out/<timestamp>-<scenario>/{profile.json,profile.html,profile.txt,
# bench.json,bench.txt,server.log} and prints that directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
SCENARIO="${1:-dispatch}"
shift || true
DURATION="${DURATION:-15}"
SCALENE_ARGS="${SCALENE_ARGS:---cpu-only}"
PROFILE_ONLY="${PROFILE_ONLY:-nexus_fast,grpc,google/protobuf,picows,lmdb,aiohttp}"

case "$SCENARIO" in
  heartbeat|dispatch|events) ;;
  *) echo "profile: SCENARIO must be heartbeat, dispatch or events (got '$SCENARIO')" >&2; exit 2 ;;
esac

if ! "$PY" -c 'import scalene' 2>/dev/null; then
  echo "profile: installing scalene into $(dirname "$(dirname "$PY")")" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check scalene
fi

OUT="$ROOT/profiling/out/$(date +%Y%m%d-%H%M%S)-$SCENARIO"
mkdir -p "$OUT"
DATA="$(mktemp -d -t nexus-profile-data-XXXXXX)"
read -r GRPC WS HTTP < <("$PY" - <<'PYEOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PYEOF
)

SERVER_PID=""
PROGRAM_PID=""
cleanup() {
  # The profiled program is scalene's child: never leave it running without its parent.
  for pid in $PROGRAM_PID $SERVER_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$DATA"
}
trap cleanup EXIT
trap 'echo "profile: interrupted" >&2; exit 130' INT TERM

# `scalene run` starts the program as its child process. SIGINT must go to that child: the
# server's handler stops gracefully and returns from main(), then scalene writes the
# profile (a signal to the scalene parent ends both without one).
(
  cd "$OUT"
  NEXUS_LOG_LEVEL=warning exec "$PY" -m scalene run $SCALENE_ARGS \
    --profile-only "$PROFILE_ONLY" --program-path "$ROOT" -o "$OUT/profile.json" \
    "$ROOT/profiling/serve.py" --- \
    --host 127.0.0.1 --grpc-port "$GRPC" --ws-port "$WS" --http-port "$HTTP" --db-path "$DATA/db"
) >"$OUT/server.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 600); do
  if "$PY" -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$HTTP/ready', timeout=1).status != 200)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "profile: the server exited during start-up; see $OUT/server.log" >&2
    tail -20 "$OUT/server.log" >&2
    exit 1
  fi
  sleep 0.1
done

PROGRAM_PID="$(pgrep -P "$SERVER_PID" | head -1 || true)"
echo "profile: server pid ${PROGRAM_PID:-$SERVER_PID} under scalene; nexus-bench $SCENARIO for ${DURATION}s" >&2
set +e
"$PY" -m nexus_fast.benchmark.cli "$SCENARIO" --target "127.0.0.1:$GRPC" --http "$HTTP" \
  --ws "$WS" --duration "$DURATION" --json "$OUT/bench.json" "$@" | tee "$OUT/bench.txt"
BENCH_RC=${PIPESTATUS[0]}
set -e

kill -INT "${PROGRAM_PID:-$SERVER_PID}"
for _ in $(seq 1 600); do
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.1
done
wait "$SERVER_PID" || true
SERVER_PID=""
PROGRAM_PID=""

if [[ ! -s "$OUT/profile.json" ]]; then
  echo "profile: scalene wrote no profile; see $OUT/server.log" >&2
  exit 1
fi
(cd "$OUT" && "$PY" -m scalene view --standalone "$OUT/profile.json" >/dev/null 2>&1 \
  && mv -f scalene-profile.html profile.html) || echo "profile: HTML rendering failed" >&2
(cd "$OUT" && NO_COLOR=1 TERM=dumb COLUMNS=160 "$PY" -m scalene view --cli --reduced "$OUT/profile.json" >profile.txt 2>&1) || true

echo "profile: $OUT"
echo "  profile.json  scalene profile (JSON)"
echo "  profile.html  self-contained report: open it in a browser"
echo "  profile.txt   the same, reduced, as text"
echo "  bench.json    the load that was applied (nexus-bench --json)"
exit "$BENCH_RC"
