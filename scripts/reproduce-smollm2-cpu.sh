#!/usr/bin/env bash
# The reproduction committed in docs/reproduction-smollm2-cpu/: the grid configs/grids/smollm2-cpu.yaml with
# its two training sets run side by side, one core each (torch on one thread per process), then the report.
# Rerunning skips finished runs and retries failed ones. Usage: bash scripts/reproduce-smollm2-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grid=configs/grids/smollm2-cpu.yaml
sweep_dir=runs/sweeps/smollm2-cpu
report_dir=docs/reproduction-smollm2-cpu
jobs=$(mktemp)
trap 'rm -f "$jobs"' EXIT
.venv/bin/nested-reft sweep "$grid" --emit-commands "$jobs"
for dataset in arithmetic svamp; do
    # one lane per dataset, the x = 0, b = 1 runs (closest to the baseline) last; a failed run is recorded
    # in its status.json and the lane goes on
    { grep "/$dataset/" "$jobs" | grep -v "/x0-b"; grep "/$dataset/x0-b" "$jobs"; } | OMP_NUM_THREADS=1 bash &
done
wait
.venv/bin/nested-reft sweep "$grid" --collect
.venv/bin/nested-reft report "$sweep_dir" --output-dir "$report_dir"
cp "$grid" "$sweep_dir/results.csv" "$report_dir/"
