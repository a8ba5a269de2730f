# Sourced by the study runners (scripts/study-*.sh): run a study's sweep commands in the order the runner listed,
# in lanes, then copy the results (never weights) into the study's docs directory.
# run_in_lanes GRID JOBS ORDERED LANES SWEEP_DIR STUDY_DIR
run_in_lanes() {
    local grid=$1 jobs=$2 ordered=$3 lanes=$4 sweep_dir=$5 study_dir=$6
    [ "$(wc -l < "$ordered")" -eq "$(wc -l < "$jobs")" ] || { echo "$(basename "$0"): the run order misses runs of $grid" >&2; exit 1; }
    # a failed run is recorded in its status.json and its lane goes on (|| true)
    OMP_NUM_THREADS=1 xargs -P "$lanes" -d '\n' -I{} sh -c '{} || true' < "$ordered"
    .venv/bin/nested-reft sweep "$grid" --collect
    mkdir -p "$study_dir"
    cp "$sweep_dir"/results.csv "$sweep_dir"/steps.csv "$sweep_dir"/problems.csv "$study_dir"/
}
