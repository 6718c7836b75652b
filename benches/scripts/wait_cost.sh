#!/usr/bin/env bash
# What `--redis-replicas 1` (WAIT for one replica before a durable write
# counts) costs a claim: HTTP claim + release pairs with wrk against
# `hexmatch serve` on a Redis master with one replica (two redis-server on
# loopback, persistence off), once with --redis-replicas 0 and once with 1,
# side by side. Prints wrk's RESULT line (p50/p99 in µs) for each.
#
#   bash benches/scripts/wait_cost.sh
#   DRIVERS=200000 DURATION=20s bash benches/scripts/wait_cost.sh
#   HEXMATCH_BIN=path/to/hexmatch bash benches/scripts/wait_cost.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/scripts/lib.sh
ensure_wrk
DRIVERS="${DRIVERS:-100000}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-8}"
OUT=target/wait-cost
build_bins
driver_set "$OUT" "$DRIVERS"
dir="$(mktemp -d)"
master=$(free_port 17400 17450)
replica=$(free_port $((master + 1)) 17460)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM
redis-server --port "$master" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    >/dev/null 2>&1 &
pids+=($!)
redis-server --port "$replica" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --replicaof 127.0.0.1 "$master" --repl-diskless-sync-delay 0 >/dev/null 2>&1 &
pids+=($!)
until [ "$(redis-cli -p "$master" info replication 2>/dev/null | tr -d '\r' | grep -c 'state=online')" = 1 ]; do
    sleep 0.2
done
echo "wrk -t1 -c$CONNS -d$DURATION, claim + release pairs, $DRIVERS drivers, Redis master + 1 replica on loopback"
for replicas in 0 1; do
    port=$(free_port 18200 18300)
    "$BIN" serve --bind "127.0.0.1:$port" --load-drivers "$csv" --driver-ttl-s 0 --workers 1 \
        --redis-url "redis://127.0.0.1:$master" --redis-prefix "waitcost$replicas" \
        --redis-replicas "$replicas" --snapshot-interval-ms 600000 --ingest-stream false \
        >"$OUT/server-$replicas.log" 2>&1 &
    server=$!
    pids+=($server)
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do sleep 0.2; done
    HEXMATCH_PICKUPS="$pickups" wrk -t1 -c"$CONNS" -d3s -s benches/scripts/wrk/matches.lua \
        "http://127.0.0.1:$port" >/dev/null
    HEXMATCH_PICKUPS="$pickups" wrk -t1 -c"$CONNS" -d"$DURATION" --latency \
        -s benches/scripts/wrk/matches.lua "http://127.0.0.1:$port" >"$OUT/wrk-$replicas.txt"
    echo "--redis-replicas $replicas: $(grep '^RESULT' "$OUT/wrk-$replicas.txt" | sed 's/^RESULT //')"
    kill -TERM "$server"
    wait "$server" 2>/dev/null || true
done
