#!/usr/bin/env bash
# Server instructions per HTTP request, counted by callgrind: the real
# `hexmatch serve` under valgrind, N keep-alive requests from curl on one
# connection; the counters are zeroed once the server is ready and dumped
# after the last response, so they hold the whole process's work for those
# requests (the background loops' few wake-ups included; with driver TTL
# off the sweep scans nothing). TOGGLE='*fn*' counts only inside matching
# functions instead. Stable from run to run, so an A/B of two builds shows
# a change of a few percent.
#
#   bash benches/scripts/callgrind_http.sh
#   HEXMATCH_BIN=path/to/old/hexmatch bash benches/scripts/callgrind_http.sh
#   DRIVERS=100000 REQUESTS=2000 TOKEN=t bash benches/scripts/callgrind_http.sh
#
# Prints instructions per `GET /v1/drivers/nearest` (k = 10, the clustered
# Chicago set and its jittered pickups from `gen_drivers`). With TOKEN set,
# the server checks a bearer token and curl sends it.
set -euo pipefail
cd "$(dirname "$0")/../.."

DRIVERS="${DRIVERS:-100000}"
REQUESTS="${REQUESTS:-2000}"
K="${K:-10}"
TOGGLE="${TOGGLE:-}"
OUT=target/callgrind-http
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install -y valgrind)" >&2; exit 1; }
source benches/scripts/lib.sh
build_bins
driver_set "$OUT" "$DRIVERS"
port=$(free_port 18200 18300)
base="http://127.0.0.1:$port"
auth=()
token_args=()
if [ -n "${TOKEN:-}" ]; then
    auth=(-H "Authorization: Bearer $TOKEN")
    token_args=(--api-tokens "$TOKEN")
fi

rm -f "$OUT"/callgrind.out.*
toggle=()
[ -n "$TOGGLE" ] && toggle=(--toggle-collect="$TOGGLE")
valgrind --tool=callgrind "${toggle[@]}" \
    --callgrind-out-file="$OUT/callgrind.out.%p" \
    "$BIN" serve --bind "127.0.0.1:$port" --load-drivers "$csv" --driver-ttl-s 0 \
    --workers 1 "${token_args[@]}" >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
deadline=$((SECONDS + 600))
until curl -sf "$base/readyz" >/dev/null 2>&1; do
    kill -0 "$server" 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
    [ $SECONDS -lt $deadline ] || { echo "not ready within 600 s" >&2; exit 1; }
    sleep 1
done

# One curl, one keep-alive connection, REQUESTS nearest queries.
config="$OUT/curl.cfg"
head -n "$REQUESTS" "$pickups" | awk -F, -v b="$base" -v k="$K" \
    '{ printf "url = \"%s/v1/drivers/nearest?lat=%s&lon=%s&k=%d\"\noutput = /dev/null\n", b, $1, $2, k }' >"$config"
n=$(grep -c '^url' "$config")
# A first request warms the connection's buffers; then zero the counters.
curl -s "${auth[@]}" -o /dev/null "$base/v1/drivers/nearest?lat=41.88&lon=-87.63&k=$K"
callgrind_control -z "$server" >/dev/null
curl -s "${auth[@]}" --config "$config"
callgrind_control -d "$server" >/dev/null
dump=$(ls -t "$OUT"/callgrind.out.* | head -1)
total=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p; s/^totals: *\([0-9]*\).*/\1/p' "$dump" | head -1)
awk -v t="$total" -v n="$n" -v b="$BIN" -v d="$DRIVERS" 'BEGIN {
    printf "%s: %d nearest requests, %d instructions = %.0f per request (%d drivers, valgrind)\n", b, n, t, t / n, d }'
