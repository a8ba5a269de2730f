#!/usr/bin/env bash
# A budget check for the study's calibration (docs/study-smollm2/README.md, "A budget for every seed"): the x = 0
# baseline trained from the study's warm-up of SEED with changed ReFT options, then its pass@1 on the study's 300
# held-out problems. The warm-ups and every other setting are the finished study's (its sweep directory).
#
#   taskset -c 1 bash scripts/budget_check.sh runs/budget/b4-s0 0 --batch-size 4 --micro-batch-size 16
#   taskset -c 1 bash scripts/budget_check.sh runs/budget/m24-s0 0 --rft-steps 24 \
#       --set grpo.mask_truncated_completions=true
#
# Resumable: a finished run is only evaluated (again), a killed one resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash scripts/budget_check.sh OUT SEED [nested-reft train options...]" >&2; exit 2; }
out=$1 seed=$2
shift 2
runs=runs/sweeps/study-smollm2/smollm2-135m-instruct/arithmetic
[ -d "$runs/sft-s$seed/model" ] || { echo "budget_check.sh: no warm-up $runs/sft-s$seed/model: run the study first" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ ! -f "$out/summary.json" ]; then
    resume=()
    compgen -G "$out/checkpoint-*" > /dev/null && resume=(--resume)
    .venv/bin/nested-reft train --config "$runs/baseline-s0/config.yaml" --model "$runs/sft-s$seed/model" \
        --seed "$seed" --output-dir "$out" "${resume[@]}" "$@"
fi
.venv/bin/nested-reft eval --model "$out/model" --benchmarks arithmetic --limit 300 --max-new-tokens 64 \
    --batch-size 50 --seed "$seed" --output-dir "$out/eval"
