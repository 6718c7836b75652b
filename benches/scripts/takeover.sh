#!/usr/bin/env bash
# How long a takeover takes: node `a` (cluster mode, every region, the
# drivers of the generated set of DRIVERS that fall in the region
# polygons, from --load-drivers, snapshotted at start)
# and node `b` on standby share a private Redis; `a` is killed (SIGKILL)
# and the script times until `b` serves every region, and prints the
# restore time `b` logged. Client tokens and the cluster secret are on.
#
#   bash benches/scripts/takeover.sh                  # 2.6M generated (~1M in the polygons), 10 s lease
#   DRIVERS=200000 TTL_MS=3000 bash benches/scripts/takeover.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/scripts/lib.sh
DRIVERS="${DRIVERS:-2600000}"
TTL_MS="${TTL_MS:-10000}"
OUT=target/takeover
build_bins
driver_set "$OUT" "$DRIVERS"
dir="$(mktemp -d)"
redis=$(free_port 17500 17550)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM
redis-server --port "$redis" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    >/dev/null 2>&1 &
pids+=($!)
until redis-cli -p "$redis" ping >/dev/null 2>&1; do sleep 0.1; done
export HEXMATCH_CLUSTER_SECRET=takeover-bench-secret-0123456789
token=takeover-bench-token
node() { # node ID PORT OWN LOG [extra flags]
    local id=$1 port=$2 own=$3 log=$4
    shift 4
    "$BIN" serve --bind "127.0.0.1:$port" --api-tokens "$token" --cluster true \
        --node-id "$id" --redis-url "redis://127.0.0.1:$redis" --redis-prefix takeover \
        --regions data/chicago_community_areas.geojson --resolution 8 \
        --lease-ttl-ms "$TTL_MS" --snapshot-interval-ms 600000 --driver-ttl-s 0 \
        --ingest-stream false ${own:+--own-regions "$own"} "$@" >/dev/null 2>"$log" &
    pids+=($!)
}
ready() { # ready PORT
    until curl -sf "http://127.0.0.1:$1/readyz" >/dev/null; do sleep 0.2; done
}
serving() { # serving PORT: regions the node serves now
    curl -sf -H "authorization: Bearer $token" "http://127.0.0.1:$1/v1/cluster" \
        | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("serving", [])))' 2>/dev/null \
        || echo 0
}
pa=$(free_port 17551 17600)
node a "$pa" '*' "$dir/a.log" --load-drivers "$csv"
ready "$pa"
a_pid=${pids[-1]}
regions=$(serving "$pa")
pb=$(free_port $((pa + 1)) 17650)
node b "$pb" '' "$dir/b.log"
ready "$pb"
held=$(curl -sf -H "authorization: Bearer $token" "http://127.0.0.1:$pa/v1/regions" \
    | python3 -c 'import json,sys; print(sum(r["drivers"] for r in json.load(sys.stdin)))')
echo "node a holds $held of the $DRIVERS drivers (those in its $regions regions); lease $TTL_MS ms; killing a"
start=$(date +%s%N)
kill -9 "$a_pid"
wait "$a_pid" 2>/dev/null || true
until [ "$(serving "$pb")" = "$regions" ]; do sleep 0.05; done
end=$(date +%s%N)
restore=$(grep -o 'restore_ms=[0-9]*' "$dir/b.log" | cut -d= -f2 | sort -n | tail -1)
drivers=$(grep 'took region' "$dir/b.log" | grep -o ' drivers=[0-9]*' | cut -d= -f2 | awk '{s += $1} END {print s + 0}')
# Of the restore: reading (snapshots, journals, match records; decoded and
# replayed) and loading into the engine.
read_ms=$(grep 'regions restored' "$dir/b.log" | grep -o 'read_ms=[0-9]*' | cut -d= -f2 | sort -n | tail -1)
load_ms=$(grep 'regions restored' "$dir/b.log" | grep -o 'load_ms=[0-9]*' | cut -d= -f2 | sort -n | tail -1)
fetch_ms=$(grep 'regions restored' "$dir/b.log" | grep -o 'fetch_ms=[0-9]*' | cut -d= -f2 | sort -n | tail -1)
echo "b serves every region $(( (end - start) / 1000000 )) ms after the kill (lease $TTL_MS ms); restore of $drivers drivers: ${restore:-?} ms (read ${read_ms:-?} ms, of which fetching and decoding ${fetch_ms:-?} ms; load ${load_ms:-?} ms)"
