#!/usr/bin/env bash
# A budget check for the study's calibration (docs/study-smollm2/README.md, "A budget for every seed"): the x = 0
# baseline trained from the study's warm-up of SEED with changed ReFT options, then its pass@1 on the study's 300
# held-out problems. The warm-ups and every other setting are the study's (its sweep directory; the study's own
# budget is 24 steps at 2e-5 decaying linearly, cut completions out of the loss). With TRAJECTORY=1 every
# checkpoint (each save_steps = 4 steps) is kept and evaluated too: held-out pass@1 along the run.
#
#   taskset -c 1 bash scripts/budget_check.sh runs/budget/study-s0 0                      # the study's baseline
#   TRAJECTORY=1 taskset -c 1 bash scripts/budget_check.sh runs/budget/constant-s0 0 --set grpo.lr_scheduler=constant
#   taskset -c 1 bash scripts/budget_check.sh runs/budget/first-s0 0 --rft-steps 16 \
#       --set grpo.lr_scheduler=constant --set grpo.mask_truncated_completions=false       # the first study's budget
#
# Resumable: a finished run is only evaluated (again), a killed one resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: [TRAJECTORY=1] bash scripts/budget_check.sh OUT SEED [nested-reft train options...]" >&2; exit 2; }
out=$1 seed=$2
shift 2
runs=runs/sweeps/study-smollm2/smollm2-135m-instruct/arithmetic
[ -d "$runs/sft-s$seed/model" ] || { echo "budget_check.sh: no warm-up $runs/sft-s$seed/model: run the study first" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
keep=()
[ "${TRAJECTORY:-0}" = 1 ] && keep=(--set save_total_limit=0)
if [ ! -f "$out/summary.json" ]; then
    resume=()
    compgen -G "$out/checkpoint-*" > /dev/null && resume=(--resume)
    .venv/bin/nested-reft train --config "$runs/baseline-s0/config.yaml" --model "$runs/sft-s$seed/model" \
        --seed "$seed" --output-dir "$out" "${resume[@]}" "${keep[@]}" "$@"
fi
evaluate() {  # MODEL_DIR OUTPUT_DIR
    .venv/bin/nested-reft eval --model "$1" --benchmarks arithmetic --limit 300 --max-new-tokens 64 \
        --batch-size 50 --seed "$seed" --output-dir "$2"
}
if [ "${TRAJECTORY:-0}" = 1 ]; then
    for checkpoint in $(ls -dv "$out"/checkpoint-*); do  # by step
        evaluate "$checkpoint" "$out/eval-${checkpoint##*/}"
    done
fi
evaluate "$out/model" "$out/eval"
