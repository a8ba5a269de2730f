#!/usr/bin/env bash
# Study 4's pool check (docs/study-rollout-selection/README.md, "A pool the baseline learns from"): the x = 0
# baseline from the study's warm-up of SEED, ReFT over the first POOL training problems for STEPS steps (every other
# setting that of the study's baseline of SEED, its config.yaml), then its pass@1 on the study's 300 held-out problems.
# Needs that baseline's run directory and warm-up (scripts/study-rollout-selection.sh). Resumable: a finished run is
# only evaluated (again).
#
#   bash scripts/study-rollout-selection-pool.sh 24 24 0    # 2 epochs over 24 problems
#   bash scripts/study-rollout-selection-pool.sh 48 48 0    # 2 epochs over 48 (study 3's problems)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: bash scripts/study-rollout-selection-pool.sh POOL STEPS SEED" >&2; exit 2; }
pool=$1 steps=$2 seed=$3
runs=runs/sweeps/study-rollout-selection/smollm2-135m-instruct/arithmetic
out=runs/budget/pool$pool-steps$steps-s$seed
[ -d "$runs/sft-s$seed/model" ] || { echo "$(basename "$0"): no warm-up $runs/sft-s$seed/model: run the study first" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ ! -f "$out/summary.json" ]; then
    resume=()
    compgen -G "$out/checkpoint-*" > /dev/null && resume=(--resume)
    .venv/bin/nested-reft train --config "$runs/baseline-s$seed/config.yaml" --model "$runs/sft-s$seed/model" \
        --seed "$seed" --output-dir "$out" --train-problems "$pool" --rft-steps "$steps" "${resume[@]}"
fi
.venv/bin/nested-reft eval --model "$out/model" --benchmarks arithmetic --limit 300 --max-new-tokens 64 \
    --batch-size 50 --seed "$seed" --output-dir "$out/eval"
