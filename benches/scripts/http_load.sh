#!/usr/bin/env bash
# HTTP load on the real `hexmatch serve` with wrk, keep-alive, on loopback.
#
#   bash benches/scripts/http_load.sh
#   DRIVERS=100000 DURATION=5s THREADS=1 CONNS=16 bash benches/scripts/http_load.sh
#   WORKERS=0 THREADS=2 CONNS=32 bash benches/scripts/http_load.sh   # all cores each
#   HEXMATCH_BIN=path/to/hexmatch bash benches/scripts/http_load.sh  # another build (A/B)
#   FILTERS= bash benches/scripts/http_load.sh   # no filtered nearest runs
#
# 1. installs wrk (apt) if it is missing;
# 2. builds `hexmatch` and `gen_drivers` in release;
# 3. writes the clustered Chicago set (DRIVERS, default 1M) as CSV and the
#    jittered real pickups as query points, under target/http-load/;
# 4. starts `hexmatch serve --bind 127.0.0.1:PORT --load-drivers CSV
#    --driver-ttl-s 0` (memory only, default logging) and waits for /readyz;
# 5. runs wrk (THREADS, CONNS, DURATION; a short untimed warm-up first):
#    GET /v1/drivers/nearest cycling over the pickups, unfiltered, then
#    once per filter of FILTERS (each printed with its throughput as a
#    share of the unfiltered run's), then
#    POST /v1/matches + POST /v1/matches/{id}/release pairs;
# 6. prints req/s, latency percentiles, the server's CPU per request and
#    its resident memory, and stops the server (also on error or ^C).
#
# Target: nearest ≥ 40 000 req/s with p99 ≤ 1 ms. wrk and the
# server share the machine's 2 cores. By default each gets one: one server
# request thread (WORKERS=1) and one wrk thread (THREADS=1), 8 connections.
# With a thread of each on both cores (WORKERS=0 THREADS=2) throughput is
# about the same but the kernel time-slices the four threads, and a
# request that waits out a slice (milliseconds) sets the p99.
set -euo pipefail
cd "$(dirname "$0")/../.."

DRIVERS="${DRIVERS:-1000000}"
DURATION="${DURATION:-15s}"
WARMUP="${WARMUP:-3s}"
THREADS="${THREADS:-1}"
CONNS="${CONNS:-8}"
K="${K:-10}"
WORKERS="${WORKERS:-1}"   # the server's request threads; 0 = one per core
# Nearest filters, space-separated query strings: 1 % and 0.1 % of the
# drivers match the first two, nobody the last two.
FILTERS="${FILTERS-capabilities=wheelchair capabilities=refrigerated capabilities=hazmat vehicle=walker&capabilities=large_items}"
OUT=target/http-load

source benches/scripts/lib.sh
ensure_wrk
build_bins
driver_set "$OUT" "$DRIVERS"
# A free loopback port (nothing answers on it).
port=$(free_port 18080 18180)
base="http://127.0.0.1:$port"

"$BIN" serve --bind "127.0.0.1:$port" --load-drivers "$csv" --driver-ttl-s 0 \
    --workers "$WORKERS" >"$OUT/server.log" 2>&1 &
server=$!
stop_server() {
    if kill -0 "$server" 2>/dev/null; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
}
trap stop_server EXIT INT TERM

started=$(date +%s.%N)
deadline=$((SECONDS + 300))
until curl -sf "$base/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "the server exited; its log:" >&2
        cat "$OUT/server.log" >&2
        exit 1
    fi
    if [ $SECONDS -gt $deadline ]; then
        echo "the server was not ready within 300 s" >&2
        exit 1
    fi
    sleep 0.2
done
ready=$(date +%s.%N)
rss_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$server/status")
awk -v s="$started" -v r="$ready" -v kb="$rss_kb" -v n="$DRIVERS" 'BEGIN {
    printf "server ready in %.1f s (CSV parse + bulk load of %d drivers); RSS %.0f MB = %.0f bytes/driver\n",
        r - s, n, kb / 1024, kb * 1024 / n }'

clk_tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$server/stat"; }

# run NAME SCRIPT [FILTER]: a warm-up, then the timed run; prints the
# RESULT line plus the server's CPU time per request.
run() {
    local name="$1" script="$2"
    export HEXMATCH_FILTER="${3:-}"
    HEXMATCH_PICKUPS="$pickups" HEXMATCH_K="$K" \
        wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" -s "$script" "$base" >/dev/null
    local before after
    before=$(cpu_ticks)
    HEXMATCH_PICKUPS="$pickups" HEXMATCH_K="$K" \
        wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$script" "$base" >"$OUT/$name.txt"
    after=$(cpu_ticks)
    local line
    line=$(grep '^RESULT' "$OUT/$name.txt")
    echo "$name${HEXMATCH_FILTER:+ ($HEXMATCH_FILTER)}: ${line#RESULT }"
    echo "$line" | awk -v b="$before" -v a="$after" -v t="$clk_tck" '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "  server CPU %.1f s = %.1f µs/request (%.2f cores)\n",
            (a - b) / t, (a - b) / t * 1e6 / v["requests"], (a - b) / t / v["duration_s"] }'
}

echo "wrk -t$THREADS -c$CONNS -d$DURATION, keep-alive, $DRIVERS drivers, k=$K, server workers $WORKERS (0 = one per core)"
run nearest benches/scripts/wrk/nearest.lua
awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    ok = v["rps"] >= 40000 && v["p99_us"] <= 1000
    printf "  target: nearest >= 40000 req/s with p99 <= 1 ms: %s\n", ok ? "met" : "missed" }' \
    <<<"$(grep '^RESULT' "$OUT/nearest.txt")"
rps() { sed -n 's/^RESULT.* rps=\([0-9]*\).*/\1/p' "$1"; }
unfiltered=$(rps "$OUT/nearest.txt")
i=0
for filter in $FILTERS; do
    i=$((i + 1))
    run "nearest_filter$i" benches/scripts/wrk/nearest.lua "$filter"
    awk -v f="$filter" -v r="$(rps "$OUT/nearest_filter$i.txt")" -v u="$unfiltered" \
        'BEGIN { printf "  %s: %.2fx the unfiltered throughput\n", f, r / u }'
done
run matches benches/scripts/wrk/matches.lua
echo "full wrk output: $OUT/nearest*.txt $OUT/matches.txt; server log: $OUT/server.log"
