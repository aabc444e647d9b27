#!/usr/bin/env bash
# RSS per idle connection, every model: `chat-load idle -n N` against a
# one-worker release server, server and load tool on cores of their own
# (docs/results.md, "Memory per idle connection"). Prints one line per model
# and round: KiB per connection at the instant the arrival storm has been
# delivered (settled) and after holding the connections 1 s (held), and
# what the storm cost: server CPU per announcement, connections per second.
#
#   cargo build --release
#   docs/scripts/idle-memory.sh                 # 3 rounds, 5,000 connections
#   ROUNDS=1 N=2000 MAX_KIB=3 docs/scripts/idle-memory.sh
#
# MAX_KIB makes a held figure over it fail the run (`chat-load idle
# --max-kib-per-connection`). The live-heap figure, exact and the same on
# every run, is guarded by `cargo test --test memory`.
set -euo pipefail

BIN=${BIN:-target/release}
# The load tool, from BIN unless given: comparing two servers, keep one tool.
LOAD_BIN=${LOAD_BIN:-$BIN}
N=${N:-5000}
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-"sharded locked broadcaster broadcast"}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WORK=$(mktemp -d)
source "$(dirname "$0")/server-addr.sh"
pid=""
# A server left behind by a failed step is stopped too.
trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

ulimit -n $((2 * N + 256))
echo "# $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), n = $N"
status=0
for round in $(seq "$ROUNDS"); do
  for model in $MODELS; do
    taskset -c "$SERVER_CPU" "$BIN/chat-server" --addr 127.0.0.1:0 --model "$model" \
      --threads 1 --max-clients-per-ip 0 >"$WORK/out" 2>"$WORK/log" &
    pid=$!
    addr=$(server_addr "$WORK/out" "$WORK/log") || { echo "$model: the server did not start" >&2; exit 1; }
    gate=()
    [ -n "${MAX_KIB:-}" ] && gate=(--max-kib-per-connection "$MAX_KIB")
    if ! taskset -c "$LOAD_CPU" "$LOAD_BIN/chat-load" idle --addr "$addr" -n "$N" \
      --server-pid "$pid" --json "${gate[@]}" >"$WORK/report.json" 2>"$WORK/load.log"; then
      status=1
    fi
    if [ ! -s "$WORK/report.json" ]; then
      echo "$model round $round: chat-load idle gave no report: $(tail -1 "$WORK/load.log")" >&2
      status=1
      kill "$pid"
      wait "$pid" 2>/dev/null || true
      continue
    fi
    python3 - "$model" "$round" "$WORK/report.json" <<'EOF'
import json, sys
model, round_, path = sys.argv[1:]
report = json.load(open(path))
report = report[0] if isinstance(report, list) else report
idle = report["idle"]
server = report.get("server", {})
print(f"{model:12} round {round_}: settled {idle['per_connection_kib']:.2f} KiB, "
      f"held {idle['per_connection_held_kib']:.2f} KiB per idle connection; "
      f"storm: {server.get('cpu_ns_per_delivery', float('nan')):.0f} ns of server CPU "
      f"per announcement, {idle['connect_per_s']:.0f} connections/s")
EOF
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
done
exit $status
