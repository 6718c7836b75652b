#!/usr/bin/env bash
# The fault-injection test of server/tests/cluster.rs (20 s in `cargo
# test`), run long: three `hexmatch serve --cluster` nodes on a local
# Redis Cluster (three masters, one replica each, started and stopped by
# the test), client tokens and the cluster secret on, clients claiming,
# confirming, releasing, completing and moving any driver (in a match or
# not, often across region borders) while Redis masters are killed (and
# come back as replicas), a node is paused past its lease, and a node is
# killed. Prints the operations, the faults and the longest
# unavailability per fault.
#
#   bash benches/scripts/fault_injection.sh              # 180 s
#   SECS=600 bash benches/scripts/fault_injection.sh
#   NODE_LOG=debug bash benches/scripts/fault_injection.sh   # the nodes' logs
#       # too, with every order record, match record and journal entry written
set -euo pipefail
cd "$(dirname "$0")/../.."
export HEXMATCH_FAULT_SECS="${SECS:-180}"
if [ -n "${NODE_LOG:-}" ]; then
    export HEXMATCH_TEST_LOG=1
    export HEXMATCH_TEST_RUST_LOG="info,hexmatch_server::persist=${NODE_LOG},hexmatch_server::service=${NODE_LOG}"
fi
run() {
    cargo test -p hexmatch-server --test cluster -- \
        faults_never_double_book_and_lose_nothing_acknowledged --exact --nocapture 2>&1
}
if [ -n "${NODE_LOG:-}" ]; then
    run
else
    run | grep -E '^(fault injection|test |thread|assertion|  left|  right)|panicked|lost|two live|served by|unserved|its operations'
fi
