#!/usr/bin/env bash
# The event feed under load, on the real `hexmatch serve`, loopback, wrk.
#
#   bash benches/scripts/events_load.sh
#   DRIVERS=1000000 DURATION=15s bash benches/scripts/events_load.sh
#   HEXMATCH_BIN=path/to/hexmatch bash benches/scripts/events_load.sh   # A/B
#   PHASES=stream bash benches/scripts/events_load.sh   # one phase (claims, stream)
#
# 1. The cost events add to a claim: wrk claim + release pairs
#    (wrk/matches.lua) on a memory-only server, three times:
#      off        --event-backlog 0 (events off)
#      on         events on (the default backlog), nobody listening
#      dead hook  events on, plus a --webhook at a port nobody answers
#    Each prints req/s and latency percentiles; the dead hook's drops and
#    failed POSTs are read from /metrics.
# 2. Throughput: a server with Redis (a private redis-server on a unix
#    socket, --save '') and one SSE client (`curl -N`, types
#    driver.status), while wrk sends the usual nearest load
#    (wrk/nearest.lua) and, on another connection, batches of status
#    changes (wrk/status_flips.lua: HEXMATCH_BATCH events a request).
#    Prints events published, received by the SSE client, appended to the
#    Redis stream, dropped, and gaps, each per second.
#
# wrk, curl, redis-server and the server share the machine; numbers
# compare runs on one machine, not machines.
set -euo pipefail
cd "$(dirname "$0")/../.."

DRIVERS="${DRIVERS:-100000}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CONNS="${CONNS:-8}"
K="${K:-10}"
WORKERS="${WORKERS:-1}"
export HEXMATCH_BATCH="${HEXMATCH_BATCH:-100}"
PHASES="${PHASES:-claims stream}"
OUT=target/events-load

source benches/scripts/lib.sh
ensure_wrk
command -v redis-server >/dev/null || { echo "install redis-server" >&2; exit 1; }
build_bins
driver_set "$OUT" "$DRIVERS"
secs=${DURATION%s}

server=""
redis=""
stop_all() {
    for pid in $server $redis; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    server=""
}
trap stop_all EXIT INT TERM

# start_server NAME ARGS...: a server on a free port with the driver set;
# sets `base`.
start_server() {
    local name="$1"
    shift
    local port
    port=$(free_port 18200 18300)
    base="http://127.0.0.1:$port"
    "$BIN" serve --bind "127.0.0.1:$port" --load-drivers "$csv" --driver-ttl-s 0 \
        --workers "$WORKERS" "$@" >"$OUT/server-$name.log" 2>&1 &
    server=$!
    local deadline=$((SECONDS + 300))
    until curl -sf "$base/readyz" >/dev/null 2>&1; do
        if ! kill -0 "$server" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
            echo "the server did not become ready; its log:" >&2
            cat "$OUT/server-$name.log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

# metric NAME [FILTER]: the sum of the series of NAME (whose labels match
# FILTER, a regex) in /metrics.
metric() {
    curl -sf "$base/metrics" | awk -v n="$1" -v f="${2:-}" '
        index($0, n) == 1 && (substr($0, length(n) + 1, 1) == "{" || substr($0, length(n) + 1, 1) == " ") && $0 ~ f { s += $NF }
        END { printf "%.0f\n", s }'
}

wrk_run() {
    local name="$1" script="$2" conns="$3" duration="$4"
    HEXMATCH_PICKUPS="$pickups" HEXMATCH_K="$K" \
        wrk -t1 -c"$conns" -d"$duration" --latency -s "$script" "$base" >"$OUT/$name.txt"
    grep '^RESULT' "$OUT/$name.txt" | sed 's/^RESULT //'
}

if [[ " $PHASES " == *" claims "* ]]; then
    echo "== claim + release pairs, wrk -t1 -c$CONNS -d$DURATION, $DRIVERS drivers, server workers $WORKERS"
    dead_port=$(free_port 18400 18500)
    for case in off on dead_hook; do
        case "$case" in
            off) start_server "$case" --event-backlog 0 ;;
            on) start_server "$case" ;;
            dead_hook) start_server "$case" --webhook "http://127.0.0.1:$dead_port/hook" \
                --webhook-secret bench-secret --webhook-queue 10000 ;;
        esac
        wrk_run "claims-$case-warmup" benches/scripts/wrk/matches.lua "$CONNS" "$WARMUP" >/dev/null
        echo "$case: $(wrk_run "claims-$case" benches/scripts/wrk/matches.lua "$CONNS" "$DURATION")"
        if [ "$case" = dead_hook ]; then
            echo "  events $(metric hexmatch_events_total), dropped by the hook's queue" \
                "$(metric hexmatch_events_dropped_total 'webhook-1')," \
                "failed POSTs $(metric hexmatch_webhook_failures_total)"
        fi
        stop_all
    done
fi

if [[ " $PHASES " != *" stream "* ]]; then
    exit 0
fi
echo "== events/s: nearest load (wrk -c$CONNS) + status flips (batches of $HEXMATCH_BATCH), one SSE client, Redis stream"
rdir="$PWD/$OUT/redis"
mkdir -p "$rdir"
rm -f "$rdir/redis.sock"
redis-server --port 0 --unixsocket "$rdir/redis.sock" --unixsocketperm 700 --save '' \
    --appendonly no --dir "$rdir" >"$rdir/redis.log" 2>&1 &
redis=$!
deadline=$((SECONDS + 30))
until redis-cli -s "$rdir/redis.sock" ping >/dev/null 2>&1; do
    if ! kill -0 "$redis" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
        echo "redis-server did not start; its log:" >&2
        cat "$rdir/redis.log" >&2
        exit 1
    fi
    sleep 0.1
done
start_server stream --redis-url "redis+unix://$rdir/redis.sock" --ingest-stream false \
    --snapshot-interval-ms 600000
curl -sN --max-time "$((secs + 2))" "$base/v1/events?types=driver.status" >"$OUT/sse.txt" 2>/dev/null &
sse=$!
sleep 0.5
published0=$(metric hexmatch_events_total)
appended0=$(metric hexmatch_event_stream_appended_total)
HEXMATCH_PICKUPS="$pickups" HEXMATCH_K="$K" \
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s benches/scripts/wrk/nearest.lua "$base" >"$OUT/nearest-under-events.txt" &
nearest=$!
flips=$(wrk_run status-flips benches/scripts/wrk/status_flips.lua 1 "$DURATION")
wait "$nearest"
wait "$sse" || true
published=$(($(metric hexmatch_events_total) - published0))
appended=$(($(metric hexmatch_event_stream_appended_total) - appended0))
received=$(grep -c '^event: driver.status' "$OUT/sse.txt" || true)
gaps=$(grep -c '^event: gap' "$OUT/sse.txt" || true)
echo "nearest: $(grep '^RESULT' "$OUT/nearest-under-events.txt" | sed 's/^RESULT //')"
echo "status flips: $flips"
awk -v p="$published" -v r="$received" -v a="$appended" -v g="$gaps" -v s="$secs" \
    -v d="$(metric hexmatch_events_dropped_total 'redis')" 'BEGIN {
    printf "events published %d (%.0f/s); SSE client received %d (%.0f/s), gaps %d; Redis stream appended %d (%.0f/s), dropped %d\n",
        p, p / s, r, r / s, g, a, a / s, d }'
echo "stream length: $(redis-cli -s "$rdir/redis.sock" XLEN hexmatch:events)"
echo "full output: $OUT/"
