#!/usr/bin/env bash
# Server CPU per delivery at `chat-load fanout -n 100`, for builds that
# differ only in features, alternating them in one sitting: `metrics`
# (compiled in, served and scraped once a second) against `off` (compiled
# out); `default` (metrics and cluster, as `cargo run` builds it, not
# clustered) is there to show what the cluster feature costs when unused.
# Server on core 0 with one worker, the load tool on core 1 with one
# thread. Prints one line per run and the medians, means and minima.
# Usage: docs/scripts/metrics-overhead.sh [ROUNDS] [VARIANTS...]
#   e.g. docs/scripts/metrics-overhead.sh 8 metrics off
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-8}
shift || true
variants=("${@:-metrics off default}")
read -r -a variants <<< "${variants[*]}"
out=target/metrics-overhead
mkdir -p "$out"
features_of() {
    case "$1" in
        metrics) echo "cli,metrics" ;;
        off) echo "cli" ;;
        default) echo "cli,metrics,cluster" ;;
        *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}
if [ -z "${SKIP_BUILD:-}" ]; then  # SKIP_BUILD=1 reuses the builds of an earlier run
    cargo build --release -p chat-load
    for variant in "${variants[@]}"; do
        cargo build --release -p chat-server --no-default-features --features "$(features_of "$variant")"
        cp target/release/chat-server "$out/chat-server-$variant"
    done
fi
load=target/release/chat-load
results="$out/runs.txt"
: > "$results"
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
for round in $(seq "$rounds"); do
    for variant in "${variants[@]}"; do
        args=(--threads 1 --addr 127.0.0.1:0 --max-clients-per-ip 0 --flood-lines 0 --flood-bytes 0)
        metrics_port=""
        if [ "$variant" != off ]; then
            metrics_port=$(free_port)
            args+=(--metrics-addr "127.0.0.1:$metrics_port")
        fi
        : > "$out/banner"
        RUST_LOG=warn taskset -c 0 "$out/chat-server-$variant" "${args[@]}" > "$out/banner" 2>/dev/null &
        pid=$!
        for _ in $(seq 50); do grep -q listening "$out/banner" && break; sleep 0.1; done
        addr=$(sed -E 's/.*listening on ([^ ]+).*/\1/' "$out/banner")
        scraper=""
        if [ -n "$metrics_port" ]; then
            (while true; do curl -s "127.0.0.1:$metrics_port/metrics" > /dev/null; sleep 1; done) &
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
runs = {}
for line in open(sys.argv[1]):
    variant, js = line.split(" ", 1)
    runs.setdefault(variant, []).append(json.loads(js)["server"]["cpu_ns_per_delivery"])
for variant, xs in runs.items():
    print(f"{variant}: {len(xs)} runs, ns per delivery median {statistics.median(xs):.1f}, "
          f"mean {statistics.mean(xs):.1f}, min {min(xs):.1f}")
PY
