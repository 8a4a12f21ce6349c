#!/bin/bash
# Instructions per command of the core (bench/core_commands.py) under valgrind, whose counts
# do not depend on what else the machine runs: (I(TOTAL=3000) - I(TOTAL=1000)) / 2000, so
# start-up cancels out. Modes: before (BEFORE=<dir> holding the tree to compare against, run
# with the same script), TRACE=off, carry, on at 1% and on at 100% (spans to an OTLP sink).
#   BEFORE=/tmp/base bash bench/tracing_instructions.sh     # MODES="off on1" for some only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
SINK_PORT=${SINK_PORT:-43171}
export NEXUS_REQUIRE_EXTENSIONS=1 BATCH=100 NODES=100 TRACE_ENDPOINT=http://127.0.0.1:$SINK_PORT
$PY bench/otlp_sink.py --port "$SINK_PORT" & sink=$!
trap 'kill $sink' EXIT
sleep 1
kill -0 $sink  # the sink is listening (else its port is taken: set SINK_PORT)
irefs() {  # $1 dir, $2 TOTAL; rest: env
  local dir=$1 total=$2; shift 2
  (cd "$dir" && env PYTHONPATH="$dir" TOTAL="$total" "$@" valgrind --tool=cachegrind \
    --cache-sim=no --cachegrind-out-file=/dev/null "$PY" bench/core_commands.py 2>&1 \
    | sed -n 's/.*I *refs: *//p' | tr -d ,)
}
run() {  # $1 label, $2 dir; rest: env
  local label=$1 dir=$2; shift 2
  local small big
  small=$(irefs "$dir" 1000 "$@"); big=$(irefs "$dir" 3000 "$@")
  echo "$label: $(( (big - small) / 2000 )) instructions per command"
}
for mode in ${MODES:-before off carry on1 on100}; do
  case $mode in
    before) [ -n "${BEFORE:-}" ] && run before "$BEFORE" TRACE=off ;;
    off) run "off" "$PWD" TRACE=off ;;
    carry) run "carry" "$PWD" TRACE=carry ;;
    on1) run "on 1%" "$PWD" TRACE=on TRACE_RATIO=0.01 ;;
    on100) run "on 100%" "$PWD" TRACE=on TRACE_RATIO=1 ;;
  esac
done
