#!/usr/bin/env bash
# The study of docs/study-smollm2/ (configs/grids/study-smollm2.yaml): its 39 runs in two lanes, one core and one
# torch thread each: first the baseline, x = 30% and the adaptive policies at every seed, then kl_target with retries
# at every seed, then the other instances seed by seed, then the report. Resumable: finished runs are skipped (those
# recorded in docs/study-smollm2 too, so a fresh checkout continues), a killed run resumes from its last checkpoint, a
# failed one is retried; rerun it in a later session to continue.
# Usage: bash scripts/study-smollm2.sh [LANES]   (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/study-lanes.sh
# first the runs the comparisons at x = 30% need at every seed (baseline, uniform, the adaptive policies, kl_target with
# retries), then the rest
order() {
    for seed in 0 1 2; do
        for run in baseline x0.3-b1-retrace x0.3-b1-retrace-kl-target x0.3-b1-retrace-influence; do
            pick "$jobs" "$run" "$seed"
        done
    done
    for seed in 0 1 2; do
        for run in x0.3-b1-retrace-kl-target-retry; do
            pick "$jobs" "$run" "$seed"
        done
    done
    for seed in 0 1 2; do
        for run in x0.15-b1-retrace x0.45-b1-retrace x0.3-b1-base x0.3-b1-practical x0.05-b1-retrace x0.1-b1-retrace \
            x0.05-b1-base x0.05-b1-practical; do
            pick "$jobs" "$run" "$seed"
        done
    done
}
run_study study-smollm2 "${1:-2}" order
