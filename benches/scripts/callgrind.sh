#!/usr/bin/env bash
# Instructions per engine operation, counted by callgrind: stable on a
# noisy machine (the count does not depend on what else runs), so a
# regression of a few percent shows.
#
#   bash benches/scripts/callgrind.sh            # 100k drivers, 20k nearest, 20k moves
#   DRIVERS=1000000 OPS=50000 bash benches/scripts/callgrind.sh
#   KEEP=target/callgrind bash benches/scripts/callgrind.sh   # then:
#   callgrind_annotate target/callgrind/nearest.out | head -40
#
# Each mode of `icount` builds the same deterministic engine, query list
# and moves; `baseline` stops there. instructions/op =
# (Ir(mode) - Ir(baseline)) / OPS.
set -euo pipefail
cd "$(dirname "$0")/../.."

DRIVERS="${DRIVERS:-100000}"
OPS="${OPS:-20000}"
K="${K:-10}"

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

# Total instructions ("Collected : N") of one run under callgrind.
count() {
    local mode="$1"
    shift
    valgrind --tool=callgrind --callgrind-out-file="$out/$mode.out" \
        "$bin" "$mode" --drivers "$DRIVERS" --ops "$OPS" --k "$K" "$@" \
        2>"$out/$mode.log" >/dev/null
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out/$mode.log"
}

base=$(count baseline)
printf '%-22s %14s %12s\n' operation instructions "instr/op"
printf '%-22s %14s %12s\n' "baseline (set-up)" "$base" "-"
for mode in nearest move; do
    total=$(count "$mode")
    label="$mode"
    [ "$mode" = nearest ] && label="nearest k=$K"
    awk -v l="$label" -v t="$total" -v b="$base" -v n="$OPS" \
        'BEGIN { printf "%-22s %14d %12.0f\n", l, t - b, (t - b) / n }'
done
echo "($DRIVERS clustered Chicago drivers, $OPS operations each, valgrind $(valgrind --version | sed 's/valgrind-//'))"
