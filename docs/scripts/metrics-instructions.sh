#!/usr/bin/env bash
# What counting costs, in instructions: the server (default features,
# metrics on, served and scraped once a second) runs `chat-load fanout
# -n 100` under valgrind's callgrind, and the share of its user-space
# instructions spent in the counting code and the exporter is read off
# the same run. Unlike timing runs this does not depend on what else the
# machine does. Under valgrind the server is ~50x slower, so a scrape a
# second is ~50x more scrapes per delivery than natively (conservative),
# and the writes carry more messages each than natively (see
# ARCHITECTURE.md, "What counting costs", for the per-write bound).
# Usage: docs/scripts/metrics-instructions.sh [ROUNDS] [MESSAGES]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
messages=${2:-200}
out=target/metrics-overhead
mkdir -p "$out"
cargo build --release -p chat-server -p chat-load
server=target/release/chat-server
load=target/release/chat-load
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
for round in $(seq "$rounds"); do
    profile="$out/callgrind.$round"
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$profile" "$server" \
        --threads 1 --addr 127.0.0.1:0 --max-clients-per-ip 0 --flood-lines 0 --flood-bytes 0 \
        --metrics-addr "127.0.0.1:$metrics_port" > "$out/banner" 2>"$out/valgrind.log" &
    pid=$!
    for _ in $(seq 300); do grep -q listening "$out/banner" && break; sleep 0.1; done
    addr=$(sed -E 's/.*listening on ([^ ]+).*/\1/' "$out/banner")
    (while true; do curl -s "127.0.0.1:$metrics_port/metrics" > /dev/null; sleep 1; done) &
    scraper=$!
    "$load" fanout --addr "$addr" -n 100 -m "$messages" --threads 1 --duration 600 -q --json \
        > "$out/fanout.$round.json"
    kill "$scraper"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$profile" > "$out/inclusive.$round"
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$profile" > "$out/exclusive.$round"
    python3 - "$out/inclusive.$round" "$out/exclusive.$round" "$out/fanout.$round.json" <<'PY'
import json, re, sys
def rows(path):
    for line in open(path):
        m = re.match(r'\s*([\d,]+)\s+\([^)]*\)\s+(\S.*)$', line)
        if m:
            yield int(m.group(1).replace(',', '')), m.group(2)
inclusive, exclusive, fanout = sys.argv[1:]
total = next(n for n, name in rows(exclusive) if 'PROGRAM TOTALS' in name)
# The counting entry points, with everything they call (thread-locals, maps).
roots = re.compile(r'chat_server::metrics::Metrics::(delivered|lines_received|register|unregister)\b')
counting = {}
for n, name in rows(inclusive):
    m = roots.search(name)
    if m:
        counting[m.group(1)] = max(counting.get(m.group(1), 0), n)
# The exporter: hyper, prometheus-client, and our collector, wherever they run.
exporter = sum(n for n, name in rows(exclusive)
               if re.search(r'hyper::|prometheus_client::|metrics::exporter::', name))
delivered = json.load(open(fanout))["deliveries"]["delivered"]
share = (sum(counting.values()) + exporter) / total
print(f"{delivered} deliveries, {total} server instructions ({total / delivered:.1f} per delivery); "
      + ", ".join(f"{k} {v}" for k, v in sorted(counting.items()))
      + f", exporter {exporter}; counting and exporting: {share * 100:.3f} % of the instructions")
PY
done
