#!/usr/bin/env bash
# Resident memory of `hexmatch serve` while a fleet comes and goes: DRIVERS
# drivers arrive over HTTP (POST /v1/locations, 10,000 per request), stay
# until the TTL expires them, and the server is left with none. Prints the
# RSS before, with the fleet loaded, when the last one expired, and 1, 3
# and 8 s later (freed memory goes back to the system on a delay).
#
#   bash benches/scripts/rss_churn.sh            # 1,000,000 drivers
#   DRIVERS=200000 bash benches/scripts/rss_churn.sh
#   HEXMATCH_BIN=path/to/old/hexmatch bash benches/scripts/rss_churn.sh
#
# Extra environment for the server (e.g. MIMALLOC_PURGE_DELAY=0) passes
# through.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benches/scripts/lib.sh
DRIVERS="${DRIVERS:-1000000}"
TTL_S="${TTL_S:-4}"
build_bins
port="$(free_port 18600 18700)"
log="$(mktemp)"
"$BIN" serve --bind "127.0.0.1:$port" --driver-ttl-s "$TTL_S" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.1
done
rss() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status"; }
drivers() {
    curl -sf "http://127.0.0.1:$port/metrics" |
        awk '/^hexmatch_drivers[{ ]/ {s += $NF} END {printf "%d", s}'
}
echo "before: $(rss) MB"
python3 - "$port" "$DRIVERS" <<'PY'
import json, math, sys, urllib.request
port, n = int(sys.argv[1]), int(sys.argv[2])
url = f"http://127.0.0.1:{port}/v1/locations"
for start in range(0, n, 10_000):
    items = []
    for i in range(start, min(n, start + 10_000)):
        # A Chicago-sized spread: 0.5 degrees square.
        a = (i * 0.6180339887) % 1.0
        b = (i * 0.7548776662) % 1.0
        items.append({"driver_id": f"c{i:07d}", "lat": 41.6 + 0.5 * a, "lon": -87.9 + 0.5 * b})
    req = urllib.request.Request(url, data=json.dumps(items).encode(),
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req).read()
PY
echo "loaded: $(rss) MB, $(drivers) drivers"
for _ in $(seq 200); do
    [ "$(drivers)" = "0" ] && break
    sleep 0.2
done
echo "expired: $(rss) MB, $(drivers) drivers"
for t in 1 3 8; do
    sleep "$((t - ${prev:-0}))"
    prev="$t"
    echo "  ${t} s later: $(rss) MB"
done
