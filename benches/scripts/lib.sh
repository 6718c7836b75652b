# Shared by the bench scripts: `source benches/scripts/lib.sh`.

# free_port FROM TO: prints the first loopback port in FROM..TO that nothing
# answers on, or fails.
free_port() {
    local p
    for p in $(seq "$1" "$2"); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port in $1-$2" >&2
    return 1
}

# driver_set DIR DRIVERS: writes the clustered Chicago set of DRIVERS
# drivers and the jittered pickups under DIR (once), and sets `csv` and
# `pickups` to their paths. Needs target/release/gen_drivers.
driver_set() {
    mkdir -p "$1"
    csv="$1/drivers-$2.csv"
    pickups="$1/pickups.csv"
    # A set written before the CSV had its capabilities column is rewritten.
    if [ ! -s "$csv" ] || [ ! -s "$pickups" ] || ! head -n1 "$csv" | grep -q capabilities; then
        echo "writing $csv and $pickups" >&2
        target/release/gen_drivers --drivers "$2" --out "$csv" --pickups "$pickups"
    fi
}

# build_bins: sets BIN to $HEXMATCH_BIN, or builds and uses
# target/release/hexmatch; builds gen_drivers either way.
build_bins() {
    BIN="${HEXMATCH_BIN:-target/release/hexmatch}"
    if [ -z "${HEXMATCH_BIN:-}" ]; then
        cargo build --release -q -p hexmatch-server --bin hexmatch
    fi
    cargo build --release -q -p hexmatch-benches --bin gen_drivers
}

# ensure_wrk: installs wrk with apt when it is missing.
ensure_wrk() {
    if ! command -v wrk >/dev/null; then
        echo "installing wrk" >&2
        if [ "$(id -u)" = 0 ]; then
            apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
        else
            sudo apt-get install -y -q wrk >/dev/null
        fi
    fi
}
