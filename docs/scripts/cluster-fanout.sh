#!/bin/sh
# Fanout across three nodes against one node, in the same run (issue 18):
# one chat-server alone, then three chat-servers joined through a 3-server
# JetStream cluster (nats-server 2.9, routes, a store each; the room's
# stream at R3, the default there), ROUNDS rounds each. Servers on CPU 0,
# chat-load on CPU 1 (taskset), everything on loopback.
#
# Usage: docs/scripts/cluster-fanout.sh [ROUNDS] [N] [M]
# NATS=1 runs one JetStream server instead (the stream at one replica).
# Needs a release build: cargo build --release -p chat-server -p chat-load
set -eu
ROUNDS=${1:-3}
N=${2:-300}
M=${3:-100}
BIN=${BIN:-target/release}
D=$(mktemp -d)
SERVERS=0
LOAD=1
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; rm -rf "$D"; }
trap cleanup EXIT INT TERM

# Three routed JetStream servers (fixed local ports for this script only).
ROUTES="nats://127.0.0.1:26248,nats://127.0.0.1:26249,nats://127.0.0.1:26250"
if [ "${NATS:-3}" = 1 ]; then
  taskset -c $SERVERS nats-server -a 127.0.0.1 -p 24222 -js -sd "$D/n0" -m 28222 \
    > "$D/nats0.log" 2>&1 &
  pids="$pids $!"
  URLS="nats://127.0.0.1:24222"
else
  for i in 0 1 2; do
    taskset -c $SERVERS nats-server -a 127.0.0.1 -p $((24222 + i)) -js -sd "$D/n$i" \
      --server_name "n$i" --cluster_name fanout --cluster "nats://127.0.0.1:$((26248 + i))" \
      --routes "$ROUTES" -m $((28222 + i)) > "$D/nats$i.log" 2>&1 &
    pids="$pids $!"
  done
  URLS="nats://127.0.0.1:24222,nats://127.0.0.1:24223,nats://127.0.0.1:24224"
fi
NATS_PIDS=$pids
sleep 5 # the meta leader's election (the servers log it; a demo script, not a test)

taskset -c $SERVERS "$BIN/chat-server" --addr 127.0.0.1:28100 --threads 1 --max-clients-per-ip 0 &
ONE=$!
pids="$pids $ONE"
NODE_PIDS=""
for p in 28101 28102 28103; do
  taskset -c $SERVERS "$BIN/chat-server" --addr 127.0.0.1:$p --threads 1 --max-clients-per-ip 0 \
    --cluster "$URLS" &
  NODE_PIDS="$NODE_PIDS $!"
  pids="$pids $!"
done
sleep 5 # the nodes make the stream and join the room
echo "the room's stream: $(curl -s 'http://127.0.0.1:28222/jsz?accounts=true&streams=true&config=true' |
  grep -o '"num_replicas": *[0-9]*' | head -1)"

server_pids() { for p in $NATS_PIDS $NODE_PIDS; do printf -- '--server-pid %s ' "$p"; done; }
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round: one node"
  taskset -c $LOAD "$BIN/chat-load" fanout --addr 127.0.0.1:28100 -n "$N" -m "$M" --threads 1 \
    --server-pid $ONE
  echo "== round $round: three nodes, ${NATS:-3} JetStream server(s)"
  # shellcheck disable=SC2046
  taskset -c $LOAD "$BIN/chat-load" fanout \
    --addr 127.0.0.1:28101,127.0.0.1:28102,127.0.0.1:28103 -n "$N" -m "$M" --threads 1 \
    $(server_pids)
done
