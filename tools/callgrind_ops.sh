#!/usr/bin/env bash
# User-space instructions the gateway spends per login or per relayed command, counted
# exactly by callgrind (whatever else the machine does, unlike CPU time).
#
#   tools/callgrind_ops.sh GATEWAY_BINARY login|latency [COUNT]
#
# Uses the configuration and the Dovecots that scripts/bench.sh leaves in BENCH_DIR (run it
# once first, any scenario); starts the two Dovecots if they are not running and stops what
# it started. Runs the gateway under valgrind --tool=callgrind (apt-get install valgrind),
# warms it up, zeroes the counters, drives COUNT operations (default 2000) with 8 clients of
# tools/loadgen, dumps and prints the total and the instructions per operation.
set -euo pipefail
BIN=$(realpath "${1:?gateway binary}")
SCENARIO=${2:?login or latency}
COUNT=${3:-2000}
case $SCENARIO in login | latency) ;; *) echo "scenario: login or latency" >&2; exit 2 ;; esac
BENCH_DIR=${BENCH_DIR:-/var/tmp/imap-gateway-bench}
BENCH_PORT=${BENCH_PORT:-21140}
REPO=$(cd "$(dirname "$0")/.." && pwd)
LOADGEN=$REPO/target/release/loadgen
PORT=$((BENCH_PORT + 3))
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 1; }
[ -x "$LOADGEN" ] || { echo "build loadgen first: cargo build --release --workspace" >&2; exit 1; }
[ -f "$BENCH_DIR/gateway.toml" ] || { echo "no $BENCH_DIR/gateway.toml: run scripts/bench.sh once" >&2; exit 1; }

OUT=$(mktemp -d)
started=()
cleanup() {
  [ -n "${VG:-}" ] && kill "$VG" 2>/dev/null && wait "$VG" 2>/dev/null
  for p in "${started[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] && echo "kept $OUT" || rm -rf "$OUT"
}
trap cleanup EXIT
for d in bench-a bench-b; do
  if ! pgrep -f "dovecot -F -c $BENCH_DIR/$d/dovecot.conf" >/dev/null; then
    setsid /usr/sbin/dovecot -F -c "$BENCH_DIR/$d/dovecot.conf" </dev/null >"$OUT/$d.out" 2>&1 &
    started+=($!)
  fi
done
sleep 2

cd "$BENCH_DIR"
valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "$BIN" run --config gateway.toml \
  >"$OUT/gateway.log" 2>&1 &
VG=$!
for _ in $(seq 120); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.5
done
kill -0 "$VG" 2>/dev/null || { cat "$OUT/gateway.log" >&2; echo "the gateway did not start" >&2; exit 1; }
load() {
  "$LOADGEN" --target "127.0.0.1:$PORT" --scenario "$SCENARIO" --clients 8 --count "$1" \
    --user-count 2000 --password benchpw
}
load 300 >/dev/null
callgrind_control -z "$VG" >/dev/null 2>&1
load "$COUNT" >"$OUT/loadgen.json"
callgrind_control -d "$VG" >/dev/null 2>&1
sleep 1
dump=$(ls -t "$OUT"/cg.out.* | head -1)
total=$(grep -E '^(summary|totals):' "$dump" | head -1 | awk '{print $2}')
errors=$(grep -o '"errors":{"count":[0-9]*' "$OUT/loadgen.json" | grep -o '[0-9]*$')
[ "$errors" = 0 ] || { head -c 600 "$OUT/loadgen.json" >&2; echo; echo "loadgen saw $errors errors" >&2; exit 1; }
echo "$SCENARIO: $COUNT operations, $errors errors, $total instructions, $((total / COUNT)) per operation"
