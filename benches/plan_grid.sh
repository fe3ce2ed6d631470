#!/usr/bin/env bash
# The planner against the counting allocator on a larger grid than CI's (tests/plan.rs):
# 3 model shapes × checkpointing off/on × micro-batch 1, 3, 4 × segments of 1024, 4096 and 8000
# samples, other source sets, gradient accumulation, EMA, and (built with MPI) ZeRO 0, 1, 2 on
# 2 and 4 ranks. Each point trains one optimizer step through the binary and compares
# `mem_peak_allocated` of metrics.jsonl with `sepdist plan`'s predicted peak; prints every
# point and the worst error. Not part of CI (about a minute after the build).
#
#   benches/plan_grid.sh [--no-mpi]
#
# Needs MPICH for the multi-rank points: launch/install-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."

features=(--features mpi)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-mpi) features=(); shift ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "plan_grid.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test "${features[@]}" --test plan -- --ignored --nocapture --exact larger_grid 2>&1 | tee "$log" \
    | grep -E "rank\(s\)|worst error" || true
grep -q "test larger_grid ... ok" "$log" || { echo "plan_grid.sh: a point exceeded the 10 % limit (see above)" >&2; exit 1; }
