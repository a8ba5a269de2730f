# Sourced by the study runners (scripts/study-*.sh): emit a study's sweep commands, run them in the order the runner
# lists, in lanes, then copy the results (never weights) into the study's docs directory. The docs directory is the
# study's record across sessions: a session starts from a fresh checkout without runs/, so the instances recorded
# done there are neither run again nor lost (`sweep --merge`).

# emit_jobs GRID JOBS STUDY_DIR: one command per instance not recorded done in STUDY_DIR
emit_jobs() {
    local grid=$1 jobs=$2 study_dir=$3
    local merge=()
    [ -f "$study_dir/results.csv" ] && merge=(--merge "$study_dir")
    .venv/bin/nested-reft sweep "$grid" --emit-commands "$jobs" ${merge[@]+"${merge[@]}"}
}

# pick JOBS RUN SEED: the command of instance <model>/RUN-sSEED, if it is still to run
pick() {
    grep -- "/$2-s$3\$" "$1" || [ $? -eq 1 ]  # no line: done already; a missing file still fails
}

# run_in_lanes GRID JOBS ORDERED LANES SWEEP_DIR STUDY_DIR
run_in_lanes() {
    local grid=$1 jobs=$2 ordered=$3 lanes=$4 sweep_dir=$5 study_dir=$6
    [ "$(wc -l < "$ordered")" -eq "$(wc -l < "$jobs")" ] || { echo "$(basename "$0"): the run order misses runs of $grid" >&2; exit 1; }
    # a failed run is recorded in its status.json and its lane goes on (|| true)
    OMP_NUM_THREADS=1 xargs -P "$lanes" -d '\n' -I{} sh -c '{} || true' < "$ordered"
    local merge=()
    [ -f "$study_dir/results.csv" ] && merge=(--merge "$study_dir")
    .venv/bin/nested-reft sweep "$grid" --collect ${merge[@]+"${merge[@]}"}
    mkdir -p "$study_dir"
    cp "$sweep_dir"/results.csv "$sweep_dir"/steps.csv "$sweep_dir"/problems.csv "$sweep_dir"/curve.csv \
        "$sweep_dir"/run_settings.json "$study_dir"/
    # the grid's timing conditions, where it states them, so that `nested-reft report docs/NAME` writes the same report
    if [ -f "$sweep_dir/conditions.txt" ]; then cp "$sweep_dir/conditions.txt" "$study_dir"/; fi
}

# run_study NAME LANES ORDER: the study NAME (configs/grids/NAME.yaml, runs/sweeps/NAME, docs/NAME) in LANES lanes, its
# runs in the order the shell function ORDER prints them (each with `pick "$jobs" RUN SEED`), then its report
run_study() {
    local name=$1 lanes=$2 order=$3
    local grid=configs/grids/$name.yaml sweep_dir=runs/sweeps/$name study_dir=docs/$name
    jobs=$(mktemp)  # global: ORDER reads it, and the trap removes it when the script exits
    trap 'rm -f "$jobs" "$jobs.ordered"' EXIT
    emit_jobs "$grid" "$jobs" "$study_dir"
    "$order" > "$jobs.ordered"
    run_in_lanes "$grid" "$jobs" "$jobs.ordered" "$lanes" "$sweep_dir" "$study_dir"
    .venv/bin/nested-reft report "$sweep_dir" --output-dir "$study_dir"
}
