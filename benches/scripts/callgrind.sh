#!/usr/bin/env bash
# Instructions per engine operation, counted by callgrind: stable on a
# noisy machine (the count does not depend on what else runs), so a
# regression of a few percent shows.
#
#   bash benches/scripts/callgrind.sh            # 100k drivers, 20k nearest, 20k moves
#   DRIVERS=1000000 OPS=50000 bash benches/scripts/callgrind.sh
#   CAPS=wheelchair bash benches/scripts/callgrind.sh   # filtered nearest
#   VEHICLE=walker CAPS=large_items MODES=nearest bash benches/scripts/callgrind.sh
#   KEEP=target/callgrind bash benches/scripts/callgrind.sh   # then:
#   callgrind_annotate target/callgrind/nearest.out | head -40
#
# Each mode of `icount` builds the same deterministic engine, query list
# and moves, then runs OPS operations. Only the operation itself is
# counted (`--toggle-collect` on icount's never-inlined loops):
# instructions/op = Ir / OPS. (Subtracting a `baseline` run, as this
# script did before 2026-11-26 02:20 UTC, is off by up to ±1.7k per op
# since the bulk load became multi-threaded: the set-up's count varies
# from run to run with the threads' interleaving, malloc arenas included.)
set -euo pipefail
cd "$(dirname "$0")/../.."

DRIVERS="${DRIVERS:-100000}"
OPS="${OPS:-20000}"
K="${K:-10}"
CAPS="${CAPS:-}"        # capabilities the nearest queries require
VEHICLE="${VEHICLE:-}"  # vehicle class the nearest queries require
MODES="${MODES:-nearest move}"

command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install -y valgrind)" >&2; exit 1; }
cargo build --release -q -p hexmatch-benches --bin icount
bin=target/release/icount
# KEEP=DIR keeps the callgrind.out files there (for callgrind_annotate).
if [ -n "${KEEP:-}" ]; then
    out="$KEEP"
    mkdir -p "$out"
else
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
fi

# Instructions ("Collected : N") inside the function $2 during one run.
count() {
    local mode="$1" func="$2"
    local filters=(--capabilities "$CAPS")
    if [ -n "$VEHICLE" ]; then filters+=(--vehicle "$VEHICLE"); fi
    valgrind --tool=callgrind --callgrind-out-file="$out/$mode.out" \
        --toggle-collect="$func" \
        "$bin" "$mode" --drivers "$DRIVERS" --ops "$OPS" --k "$K" "${filters[@]}" \
        2>"$out/$mode.log" >/dev/null
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out/$mode.log"
}

printf '%-22s %14s %12s\n' operation instructions "instr/op"
filter=""
if [ -n "$VEHICLE" ]; then filter=" $VEHICLE"; fi
if [ -n "$CAPS" ]; then filter="$filter $CAPS"; fi
for mode in $MODES; do
    case "$mode" in
        nearest) func='*run_queries*'; label="nearest k=$K$filter" ;;
        move) func='*run_moves*'; label=move ;;
    esac
    total=$(count "$mode" "$func")
    awk -v l="$label" -v t="$total" -v n="$OPS" \
        'BEGIN { printf "%-22s %14d %12.0f\n", l, t, t / n }'
done
echo "($DRIVERS clustered Chicago drivers, $OPS operations each, valgrind $(valgrind --version | sed 's/valgrind-//'))"
