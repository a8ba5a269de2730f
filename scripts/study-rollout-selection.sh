#!/usr/bin/env bash
# The study of docs/study-rollout-selection/ (configs/grids/study-rollout-selection.yaml): its 30 runs in two lanes,
# one core and one torch thread each, seed by seed: the baseline, the baseline with filter_groups and with
# skip_predictable, and x = 15% bridged with filter_groups; then x = 15% removed, the nested run without either, and
# the baseline with both options;
# then the results (never weights) are copied to docs/study-rollout-selection with its report. Resumable: finished
# runs are skipped (those recorded in docs/study-rollout-selection too, so a fresh checkout continues), a killed run
# resumes from its last checkpoint, a failed one is retried; rerun it in a later session to continue.
# Usage: bash scripts/study-rollout-selection.sh [LANES]   (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/study-lanes.sh
order() {
    for seed in 0 1 2 3 4; do
        for run in baseline x0-b1-base-filter-groups x0-b1-base-skip-predictable x0.15-b1-retrace-bridged-filter-groups; do
            pick "$jobs" "arithmetic/$run" "$seed"
        done
    done
    for seed in 0 1 2 3 4; do
        for run in x0.15-b1-retrace x0-b1-base-filter-groups-skip-predictable; do
            pick "$jobs" "arithmetic/$run" "$seed"
        done
    done
}
run_study study-rollout-selection "${1:-2}" order
