#!/usr/bin/env bash
# Server CPU per delivery at `chat-load fanout -n 100`, with the metrics
# feature compiled in (and served, scraped once a second) against compiled
# out, alternating the two in one sitting. Server on core 0 with one worker,
# the load tool on core 1 with one thread. Prints one line per run and the
# medians, means and minima. Usage: docs/scripts/metrics-overhead.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-8}
out=target/metrics-overhead
mkdir -p "$out"
cargo build --release -p chat-server -p chat-load
cp target/release/chat-server "$out/chat-server-metrics"
cargo build --release -p chat-server --no-default-features --features cli
cp target/release/chat-server "$out/chat-server-nometrics"
load=target/release/chat-load
results="$out/runs.txt"
: > "$results"
for round in $(seq "$rounds"); do
    for variant in on off; do
        if [ "$variant" = on ]; then
            taskset -c 0 "$out/chat-server-metrics" --threads 1 --addr 127.0.0.1:0 \
                --metrics-addr 127.0.0.1:9109 > "$out/banner" 2>/dev/null &
        else
            taskset -c 0 "$out/chat-server-nometrics" --threads 1 --addr 127.0.0.1:0 \
                > "$out/banner" 2>/dev/null &
        fi
        pid=$!
        for _ in $(seq 50); do grep -q listening "$out/banner" && break; sleep 0.1; done
        addr=$(sed -E 's/.*listening on ([^ ]+).*/\1/' "$out/banner")
        scraper=""
        if [ "$variant" = on ]; then
            (while true; do curl -s 127.0.0.1:9109/metrics > /dev/null; sleep 1; done) &
            scraper=$!
        fi
        line=$(taskset -c 1 "$load" fanout --addr "$addr" -n 100 -m 6000 --threads 1 \
            --server-pid "$pid" --json -q)
        [ -n "$scraper" ] && kill "$scraper"
        kill "$pid"; wait "$pid" 2>/dev/null || true
        echo "$variant $line" >> "$results"
        echo "$round $variant $(echo "$line" | grep -o '"cpu_ns_per_delivery":[0-9.]*')"
    done
done
python3 - "$results" <<'PY'
import json, statistics, sys
runs = {"on": [], "off": []}
for line in open(sys.argv[1]):
    variant, js = line.split(" ", 1)
    runs[variant].append(json.loads(js)["server"]["cpu_ns_per_delivery"])
for variant, xs in runs.items():
    print(f"metrics {variant}: {len(xs)} runs, ns per delivery median {statistics.median(xs):.1f}, "
          f"mean {statistics.mean(xs):.1f}, min {min(xs):.1f}")
PY
