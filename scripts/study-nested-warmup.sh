#!/usr/bin/env bash
# The study of docs/study-nested-warmup/ (configs/grids/study-nested-warmup.yaml): its 50 runs in two lanes, one core
# and one torch thread each, seed by seed: first the pair that answers issue 22's target (each warm-up's baseline and
# x = 15% retrace), then x = 5%, 30% and kl_target from both warm-ups; then the results (never weights) are copied to
# docs/study-nested-warmup with its report. Resumable: finished runs are skipped (those recorded in
# docs/study-nested-warmup too, so a fresh checkout continues), a killed run resumes from its last checkpoint, a failed
# one is retried; rerun it in a later session to continue.
# Usage: bash scripts/study-nested-warmup.sh [LANES]   (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/study-lanes.sh
order() {
    for seed in 0 1 2 3 4; do
        for run in baseline distill-256/baseline x0.15-b1-retrace distill-256/x0.15-b1-retrace; do
            pick "$jobs" "arithmetic/$run" "$seed"
        done
    done
    for seed in 0 1 2 3 4; do
        for run in x0.05-b1-retrace distill-256/x0.05-b1-retrace x0.3-b1-retrace distill-256/x0.3-b1-retrace \
            x0.3-b1-retrace-kl-target distill-256/x0.3-b1-retrace-kl-target; do
            pick "$jobs" "arithmetic/$run" "$seed"
        done
    done
}
run_study study-nested-warmup "${1:-2}" order
