#!/usr/bin/env bash
# What `--history` costs, per model, alternating history on and off in one
# sitting (ARCHITECTURE.md, "What was said: room history"). Server on core 0
# with one worker, the load tool on core 1 with one thread.
#   fanout:  chat-load fanout -n 100 -m 1000 (and --window 1 -m 300), --history 1000 against 0:
#            deliveries per server CPU-second
#   churn:   after 2,000 lines said, chat-load churn --duration 3 with --history 0, 100, 1000:
#            join latency to the greeting and joins+leaves per second
#   join:    after 2,000 lines said, 300 sequential joins timed until the end of the
#            history block (docs/scripts/history-join-latency.py)
#   bytes:   server RSS after 50,000 one-line messages, --history 50000 against 0
# Usage: docs/scripts/history-cost.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-2}
B=target/release
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -p chat-server -p chat-load
out=target/history-cost
mkdir -p "$out"
start() {  # model history [extra flags...]: starts a server, sets S and ADDR
    local model=$1 history=$2; shift 2
    taskset -c 0 $B/chat-server --addr 127.0.0.1:0 --threads 1 --model "$model" \
        --max-clients-per-ip 0 --flood-lines 0 --flood-bytes 0 --history "$history" "$@" > "$out/banner" 2> "$out/log" &
    S=$!
    for _ in $(seq 100); do grep -q listening "$out/banner" 2>/dev/null && break; sleep 0.1; done
    ADDR=$(sed -n 's/chat-server listening on \([^ ]*\) .*/\1/p' "$out/banner")
}
load() { taskset -c 1 $B/chat-load "$@" --threads 1 --json -q; }
field() { python3 -c "import json,sys; r=json.load(sys.stdin); print($1)"; }
for round in $(seq "$rounds"); do
    for model in sharded broadcaster locked broadcast; do
        for h in 0 1000; do
            start "$model" "$h"
            echo "fanout $round $model history=$h deliveries/cpu-s=$(load fanout --addr "$ADDR" -n 100 -m 1000 --server-pid $S | field 'round(r["server"]["deliveries_per_cpu_s"]/1e6,2)')M"
            kill $S; wait $S 2>/dev/null || true
            start "$model" "$h"
            echo "fanout-w1 $round $model history=$h deliveries/cpu-s=$(load fanout --addr "$ADDR" -n 100 -m 300 --window 1 --server-pid $S | field 'round(r["server"]["deliveries_per_cpu_s"]/1e6,2)')M"
            kill $S; wait $S 2>/dev/null || true
        done
        for h in 0 100 1000; do
            start "$model" "$h"
            load fanout --addr "$ADDR" -n 10 -m 200 > /dev/null
            echo "churn $round $model history=$h $(load churn --addr "$ADDR" --server-pid $S --duration 3 | field '"p50=%sus p99=%sus joins/s=%.0f" % (r["latency_us"]["p50"], r["latency_us"]["p99"], r["churn"]["per_s"])')"
            echo "join $round $model history=$h $(taskset -c 1 python3 docs/scripts/history-join-latency.py "$ADDR" "$h" 300)"
            kill $S; wait $S 2>/dev/null || true
        done
    done
    for h in 0 50000; do
        start sharded "$h" --history-bytes 100000000
        load fanout --addr "$ADDR" -n 1 -m 50000 --window 1 > /dev/null
        sleep 1.5
        echo "bytes $round history=$h rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$S/status)"
        kill $S; wait $S 2>/dev/null || true
    done
done
