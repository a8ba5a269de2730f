#!/usr/bin/env bash
# The study of docs/study-bridged-nesting/ (configs/grids/study-bridged-nesting.yaml): its 45 runs in two lanes, one
# core and one torch thread each, seed by seed: first the pair that answers issue 31's target (the baseline and
# x = 15% bridged), then x = 15% removed, x = 30% bridged and removed, and the influence-policy runs; then the results
# (never weights) are copied to docs/study-bridged-nesting with its report. Resumable: finished runs are skipped
# (those recorded in docs/study-bridged-nesting too, so a fresh checkout continues), a killed run resumes from its
# last checkpoint, a failed one is retried; rerun it in a later session to continue.
# Usage: bash scripts/study-bridged-nesting.sh [LANES]   (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/study-lanes.sh
order() {
    for seed in 0 1 2 3 4; do
        for run in baseline x0.15-b1-retrace-bridged x0.15-b1-retrace; do
            pick "$jobs" "arithmetic/$run" "$seed"
        done
    done
    for seed in 0 1 2 3 4; do
        for run in x0.3-b1-retrace-bridged x0.3-b1-retrace x0.15-b1-retrace-influence-bridged \
            x0.3-b1-retrace-influence-bridged x0.15-b1-retrace-influence x0.3-b1-retrace-influence; do
            pick "$jobs" "arithmetic/$run" "$seed"
        done
    done
}
run_study study-bridged-nesting "${1:-2}" order
