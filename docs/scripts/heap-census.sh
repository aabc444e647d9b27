#!/usr/bin/env bash
# Where an idle server's heap lives after an arrival storm: which pages
# hold a live block (what the allocator cannot give back), the peak of the
# live heap during the storm, and the allocations made, by size
# (docs/results.md, "Memory per idle connection"). Diagnostic: the shim
# (heap-census.c) takes one lock per malloc and free, so the storm runs
# slower than without it, and RSS under it is not the figure to quote.
#
#   cargo build --release
#   docs/scripts/heap-census.sh                    # sharded, 5,000 connections
#   MODELS="sharded broadcaster" N=2000 docs/scripts/heap-census.sh
#   KEEP=/tmp/census docs/scripts/heap-census.sh   # keeps the raw census too
set -euo pipefail

BIN=${BIN:-target/release}
# The load tool, from BIN unless given: comparing two servers, keep one tool.
LOAD_BIN=${LOAD_BIN:-$BIN}
N=${N:-5000}
MODELS=${MODELS:-sharded}
WORK=$(mktemp -d)
source "$(dirname "$0")/server-addr.sh"
pid=""
# A server left behind by a failed step is stopped too.
trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT

cc -O2 -shared -fPIC -o "$WORK/census.so" "$(dirname "$0")/heap-census.c" -lpthread
ulimit -n $((2 * N + 256))
echo "# $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), n = $N"
for model in $MODELS; do
  CENSUS_OUT="$WORK/census" CENSUS_TRIGGER="$WORK/go" LD_PRELOAD="$WORK/census.so" \
    taskset -c 0 "$BIN/chat-server" --addr 127.0.0.1:0 --model "$model" \
    --threads 1 --max-clients-per-ip 0 >"$WORK/out" 2>"$WORK/log" &
  pid=$!
  addr=$(server_addr "$WORK/out" "$WORK/log") || { echo "$model: the server did not start" >&2; exit 1; }
  # Held long enough for the census to be taken while every client is
  # connected and the trim after the storm has run (the accept loop's
  # 250 ms housekeeping).
  taskset -c 1 "$LOAD_BIN/chat-load" idle --addr "$addr" -n "$N" --hold 5 -q \
    --server-pid "$pid" --json >"$WORK/report.json" &
  load=$!
  port=${addr##*:}
  for _ in $(seq 1200); do
    [ "$(ss -Htn state established "( sport = :$port )" | wc -l)" -ge "$N" ] && break
    sleep 0.5
  done
  sleep 3
  touch "$WORK/go"
  while [ -e "$WORK/go" ] || [ ! -s "$WORK/census" ]; do sleep 0.2; done
  sleep 0.5
  wait "$load" || true
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && cp "$WORK/census" "$KEEP/census-$model"
  python3 - "$model" "$N" "$WORK/census" "$pid" <<'PY'
import collections, sys
model, n, path, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
PAGE = 4096
blocks, made, peak = [], {}, 0
for line in open(path):
    f = line.split()
    if f[0] == "A":
        made[int(f[1])] = int(f[2])
    elif f[0] == "P":
        peak = int(f[1])
    else:
        blocks.append((int(f[0], 16), int(f[1]), int(f[3]) if len(f) > 3 else 0))
live = sum(size for _, size, _ in blocks)
used = collections.Counter()
owners = collections.defaultdict(set)
for addr, size, tid in blocks:
    if size >= 128 * 1024:  # glibc maps those on their own
        continue
    at = addr
    while at < addr + size:
        end = min(addr + size, (at // PAGE + 1) * PAGE)
        used[at // PAGE] += end - at
        owners[tid].add(at // PAGE)
        at = end
sparse = sum(1 for bytes_ in used.values() if bytes_ < PAGE // 2)
print(f"{model:12} live {live / 1e6:.2f} MB ({live / n / 1024:.2f} KiB per connection), "
      f"pages holding a live block {len(used) * PAGE / 1e6:.2f} MB "
      f"({len(used) * PAGE / n / 1024:.2f} KiB per connection, {sparse} under half full), "
      f"peak live {peak / 1e6:.1f} MB, {sum(made.values()) / 1e6:.2f} M allocations")
# Which thread allocated what (each thread allocates from its own glibc
# arena; the main thread's is the process's `brk` heap).
by_thread = collections.Counter()
for _, size, tid in blocks:
    by_thread[tid] += size
for tid, bytes_ in by_thread.most_common(4):
    name = "main" if tid == pid else f"thread {tid}"
    print(f"  allocated by {name}: live {bytes_ / 1e6:.2f} MB, "
          f"pages holding them {len(owners[tid]) * PAGE / 1e6:.2f} MB")
top = sorted(made.items(), key=lambda item: -item[1])[:12]
print("  most made: " + ", ".join(f"{size} B x{count}" for size, count in top))
PY
done
