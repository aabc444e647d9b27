#!/usr/bin/env bash
# The WebSocket framing comparison of docs/websocket-crates.md: one minimal
# room (crates/ws-compare) served through our framing and through three
# crates, plus the real server's web port (`chat-server --web-addr`,
# sharded) for context, each measured with `chat-load --protocol ws`:
#   fanout: deliveries per second and per server CPU-second
#           (-n 100 -m 1000, 16 in flight, 64-byte payloads: 10 M deliveries)
#   idle:   server RSS per idle connection (-n 5000, settled and 1 s later)
# (IDLE_N below). A fresh server per run, on core 0 with one worker; chat-load on core 1
# with one thread. Rounds alternate the implementations, the order rotated
# each round. Raw JSON lines go to target/ws-compare/runs.jsonl; a table of
# medians (and min-max) is printed at the end.
# Usage: docs/scripts/ws-compare.sh [ROUNDS] [IMPLS...]
#   IMPLS from: ours tungstenite tungstenite-4k tokio-websockets fastwebsockets server
#   SKIP_BUILD=1 reuses the release builds of an earlier run;
#   SCENARIOS="fanout" (or "idle") runs only one of the two;
#   IDLE_N=2000 sets idle's connection count (default 5000: 12.5 M arrival
#   announcements per run, minutes each on a busy 2-core machine);
#   RESULTS=FILE writes the JSON lines there instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
shift || true
impls=("$@")
if [ ${#impls[@]} -eq 0 ]; then
    impls=(ours tungstenite tungstenite-4k tokio-websockets fastwebsockets server)
fi
scenarios=${SCENARIOS:-fanout idle}
out=target/ws-compare
mkdir -p "$out"
if [ -z "${SKIP_BUILD:-}" ]; then
    # Two builds: the server binary exactly as `cargo build --release`
    # makes it, and ws-compare (whose chat-server library has test-util).
    nice -n 19 cargo build --release -p chat-server -p chat-load
    nice -n 19 cargo build --release -p ws-compare
fi
ulimit -n "$(ulimit -Hn)"
load=target/release/chat-load
results=${RESULTS:-$out/runs.jsonl}
idle_n=${IDLE_N:-5000}
: > "$results"
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
start() {  # start IMPL: sets pid and addr
    : > "$out/banner"
    if [ "$1" = server ]; then
        local port
        port=$(free_port)
        RUST_LOG=warn taskset -c 0 target/release/chat-server --model sharded --threads 1 \
            --addr 127.0.0.1:0 --web-addr "127.0.0.1:$port" \
            --max-clients-per-ip 0 --flood-lines 0 --flood-bytes 0 > "$out/banner" 2>/dev/null &
        pid=$!
        addr="127.0.0.1:$port"
    else
        taskset -c 0 target/release/ws-compare --impl "$1" --threads 1 > "$out/banner" 2>/dev/null &
        pid=$!
        addr=""
    fi
    for _ in $(seq 100); do grep -q listening "$out/banner" && break; sleep 0.1; done
    if [ -z "$addr" ]; then
        addr=$(sed -E 's/.*listening on ([^ ]+).*/\1/' "$out/banner")
    fi
}
for round in $(seq "$rounds"); do
    # Rotate the order so that no implementation always runs first.
    n=${#impls[@]}
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${impls[$(((i + round - 1) % n))]}"); done
    for scenario in $scenarios; do
        for impl in "${order[@]}"; do
            start "$impl"
            case $scenario in
                fanout) args=(fanout -n 100 -m 1000) ;;
                idle) args=(idle -n "$idle_n") ;;
            esac
            line=$(taskset -c 1 "$load" "${args[@]}" --addr "$addr" --protocol ws --threads 1 \
                --server-pid "$pid" --json -q) || line='{"failed":true}'
            kill "$pid"; wait "$pid" 2>/dev/null || true
            echo "{\"round\":$round,\"impl\":\"$impl\",\"scenario\":\"$scenario\",\"report\":$line}" >> "$results"
            echo "round $round $scenario $impl done" >&2
        done
    done
done
python3 docs/scripts/ws-compare-table.py "$results"
