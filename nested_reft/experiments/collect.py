"""Gathering a grid's runs into the results tables (`results`): what each run directory holds, as rows.

Reads each instance's status.json (`status`), summary.json and metrics.jsonl (`rundir`), eval/eval.json and the
per-problem JSONL files (`evaluate`), its evaluations during training (`step_evals`), and its warm-up's evaluation
for the accuracy before ReFT.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from nested_reft.evaluation.records import EVAL_FILE, read_records
from nested_reft.config import ConfigError, load_config
from nested_reft.store.files import atomic_write_json, atomic_write_text, read_json, read_json_object
from nested_reft.experiments.grid import (
    GridConfig, Instance, enumerate_instances, instance_config, eval_record, run_directory, run_settings,
    settings_differences, sft_directory,
)
from nested_reft.experiments.results import (
    CONDITIONS_FILE, CURVE_COLUMNS, CURVE_FILE, PROBLEM_COLUMNS, PROBLEMS_FILE, RESULTS_FILE, STEP_COLUMNS, STEPS_FILE,
    ResultsError, accuracy_column, mean_of_measured, read_results, table_rows, write_results, write_table,
)
from nested_reft.experiments.step_evals import curve_rows
from nested_reft.training.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics
from nested_reft.experiments.status import read_status

EVAL_DIR = "eval"
RUN_MEANS = ("skipped_layers", "kl_behavior_target", "h_ess", "h_truncated")  # averaged over a run's steps
RUN_SETTINGS_FILE = "run_settings.json"  # each done run's settings (`grid.run_settings`), which --merge compares


def collect_results(grid: GridConfig, recorded: str | Path | None = None) -> Path:
    """(Re)write results.csv, steps.csv, problems.csv and curve.csv under the grid's output_dir; returns results.csv.

    `recorded`: a results directory (another sweep's output_dir, a study's docs directory) whose done instances
    fill in those not done here, their steps and problems with them: a study continued in a later session, on a
    fresh checkout, or split across machines reports as one grid. The tables are merged row by row with what is on
    disk: the rows of runs this grid does not have (a larger version of it, run before on the same output_dir)
    are kept as they are, so a smaller grid never deletes another instance's results.
    """
    instances = enumerate_instances(grid)
    rows = {instance.id: result_row(grid, instance) for instance in instances}
    steps = {instance.id: step_rows(grid, instance) for instance in instances}
    curves = {instance.id: run_curve(grid, instance) for instance in instances}
    evaluated = {instance.id: run_directory(grid, instance) for instance in instances}
    if grid.evaluate_warm_up:
        evaluated.update({instance.sft_id: sft_directory(grid, instance) for instance in instances})
    problems = {run_id: problem_rows(grid, run_id, directory) for run_id, directory in evaluated.items()}
    settings = {run_id: directory_settings(grid.root, run_id) for run_id, row in rows.items() if row["status"] == "done"}
    if recorded is not None:
        merge_recorded(grid, Path(recorded), rows, steps, problems, settings, curves)
    kept = {name: [row for row in table_rows(grid.root / name) if row["instance"] not in ours]
            for name, ours in ((RESULTS_FILE, rows), (STEPS_FILE, steps), (PROBLEMS_FILE, problems),
                               (CURVE_FILE, curves))}
    settings.update({run_id: entry for run_id, entry in recorded_settings(grid.root).items() if run_id not in rows})
    atomic_write_json(grid.root / RUN_SETTINGS_FILE, {run_id: entry for run_id, entry in settings.items() if entry})
    write_results(grid.root / RESULTS_FILE, grid.eval.benchmarks, [*rows.values(), *kept[RESULTS_FILE]])
    write_table(grid.root / STEPS_FILE, STEP_COLUMNS, [row for run in steps.values() for row in run] + kept[STEPS_FILE])
    write_table(grid.root / PROBLEMS_FILE, PROBLEM_COLUMNS,
                [row for run in problems.values() for row in run] + kept[PROBLEMS_FILE])
    write_table(grid.root / CURVE_FILE, CURVE_COLUMNS, [row for run in curves.values() for row in run] + kept[CURVE_FILE])
    if grid.conditions:
        atomic_write_text(grid.root / CONDITIONS_FILE, grid.conditions.strip() + "\n")
    return grid.root / RESULTS_FILE


def recorded_done(recorded: str | Path | None, grid: GridConfig) -> set[str]:
    """The instances the results directory `recorded` holds as done (results.csv, checked as `report` reads it),
    which `grid` counts as done; none without a record. Each must be the grid's instance as the grid sets it now:
    its settings there (`run_settings.json`, else its run directory's config.yaml and status.json) are compared
    with the grid's, and a difference is refused naming the instance and the options (a record of neither, tables
    written before them, is not checked). Refused too (ResultsError): a recorded instance the grid does not have
    (its rows would be lost when the tables are copied back), and a results.csv without an accuracy column of one
    of the grid's benchmarks."""
    if recorded is None:
        return set()
    recorded = Path(recorded)
    rows = read_results(recorded / RESULTS_FILE)
    instances = {instance.id: instance for instance in enumerate_instances(grid)}
    foreign = sorted({row["instance"] for row in rows} - set(instances))
    if foreign:
        raise ResultsError(f"{recorded / RESULTS_FILE} records instance(s) the grid does not have "
                           f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): merge it into the grid "
                           "it was run from")
    missing = [accuracy_column(name) for name in grid.eval.benchmarks if rows and accuracy_column(name) not in rows[0]]
    if missing:
        raise ResultsError(f"{recorded / RESULTS_FILE} lacks column(s) {', '.join(missing)} of this grid's benchmarks "
                           "(were its runs evaluated on other benchmarks?)")
    done = {row["instance"] for row in rows if row["status"] == "done"}
    saved = recorded_settings(recorded)
    for run_id in sorted(done):
        there = saved.get(run_id) or directory_settings(recorded, run_id)
        now = run_settings(run_id, instance_config(grid, instances[run_id]), eval_record(grid))
        differences = settings_differences(there, now) if there else []
        if differences:
            raise ResultsError(f"{recorded}: instance {run_id} is done there with other settings than the grid gives "
                               f"it now ({'; '.join(differences)}): it is not this grid's run; merge it into the grid "
                               "it was run from, or use another output_dir")
    return done


def recorded_settings(directory: Path) -> dict[str, dict]:
    """The run settings a results directory records (`run_settings.json`), by instance; {} where it has none."""
    path = Path(directory) / RUN_SETTINGS_FILE
    return read_json_object(path) if path.is_file() else {}


def directory_settings(root: Path, run_id: str) -> dict | None:
    """`run_settings` of the run `run_id` under the grid output_dir `root`, from its config.yaml and status.json;
    None where it has no config.yaml, or one that no longer loads (options this version does not have)."""
    directory = Path(root) / run_id
    try:
        config = load_config(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else None
    except ConfigError:
        return None
    return None if config is None else run_settings(run_id, config, read_status(directory).get("eval"))


def merge_recorded(grid: GridConfig, recorded: Path, rows: dict[str, dict], steps: dict[str, list],
                   problems: dict[str, list], settings: dict[str, dict | None], curves: dict[str, list]) -> None:
    """Take into `rows`, `steps`, `problems`, `settings` and `curves` (by instance id) what `recorded` holds for the
    instances done there (`recorded_done`, which checks them) and not here, and its warm-ups' problems where this
    grid's warm-up has no finished evaluation; the recorded cells are copied as written, so merging changes no
    figure."""
    done_there = recorded_done(recorded, grid)
    recorded_rows = {row["instance"]: row for row in table_rows(recorded / RESULTS_FILE)}
    recorded_steps = _by_instance(table_rows(recorded / STEPS_FILE))
    recorded_problems = _by_instance(table_rows(recorded / PROBLEMS_FILE))
    recorded_curves = _by_instance(table_rows(recorded / CURVE_FILE))
    saved = recorded_settings(recorded)
    for run_id, row in rows.items():
        if row["status"] != "done" and run_id in done_there:
            rows[run_id] = recorded_rows[run_id]
            steps[run_id] = recorded_steps.get(run_id, [])
            problems[run_id] = recorded_problems.get(run_id, [])
            curves[run_id] = recorded_curves.get(run_id, [])
            settings[run_id] = saved.get(run_id) or directory_settings(recorded, run_id)
    for run_id in set(problems) - set(rows):  # this grid's warm-ups (evaluate_warm_up)
        if not problems[run_id]:
            problems[run_id] = recorded_problems.get(run_id, [])


def _by_instance(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault(row["instance"], []).append(row)
    return grouped


def run_status(directory: Path) -> dict:
    """A run directory's status record as the sweep and the results count it: "done" needs the run's evaluation
    (eval/eval.json) too, so a done run whose evaluation is gone (deleted, or lost beside a model that
    `keep_models: false` deleted) is failed, with what is missing named."""
    status = read_status(directory)
    if status.get("status") == "done" and not (directory / EVAL_DIR / EVAL_FILE).is_file():
        return {**status, "status": "failed", "error": f"done, but its evaluation {EVAL_DIR}/{EVAL_FILE} is missing"}
    return status


def result_row(grid: GridConfig, instance: Instance) -> dict[str, Any]:
    """One row of results.csv from the run directory's status, summary, metrics and evaluation."""
    directory = run_directory(grid, instance)
    status = run_status(directory)
    row: dict[str, Any] = {
        "model": instance.model, "dataset": instance.dataset, "instance": instance.id, "role": instance.role,
        "skip_ratio": instance.skip_ratio, "border": instance.border, "mitigation": instance.mitigation,
        "variant": instance.variant.label if instance.variant else "", "seed": instance.seed,
        "status": status.get("status", "pending"),
        "error": (status.get("error") or "").splitlines()[0][:300] if status.get("error") else "",
    }
    evaluation = read_json(directory / EVAL_DIR / EVAL_FILE)
    for name in grid.eval.benchmarks:
        row[accuracy_column(name)] = evaluation.get("benchmarks", {}).get(name, {}).get("accuracy")
    row["accuracy"] = evaluation.get("average")
    row["accuracy_before"] = read_json(sft_directory(grid, instance) / EVAL_DIR / EVAL_FILE).get("average")
    row["warm_up"] = instance.warm_up.label if instance.warm_up else ""
    warm_up = read_json(sft_directory(grid, instance) / SUMMARY_FILE)  # what the warm-up cost (issue 22)
    row["sft_runtime_s"], row["sft_flops"] = warm_up.get("sft_runtime_s"), warm_up.get("sft_flops")
    summary = read_json(directory / SUMMARY_FILE)
    row["token_speed"] = summary.get("token_speed")
    row["total_runtime_s"] = summary.get("total_runtime_s")
    steps = read_metrics(directory / METRICS_FILE)
    if steps:
        row.update({name: mean_of_measured(step[name] for step in steps) for name in RUN_MEANS})
        row["gen_tokens_per_s"] = statistics.median(step["gen_tokens_per_s"] for step in steps)
        row["rollout_flops"] = sum(step.get("rollout_flops") or 0.0 for step in steps) or None
    return row


def step_rows(grid: GridConfig, instance: Instance) -> list[dict[str, Any]]:
    """The rows of steps.csv for one instance: its metrics.jsonl, the learning curve's columns."""
    steps = read_metrics(run_directory(grid, instance) / METRICS_FILE)
    return [{"instance": instance.id, **{column: step.get(column) for column in STEP_COLUMNS[1:]}} for step in steps]


def run_curve(grid: GridConfig, instance: Instance) -> list[dict[str, Any]]:
    """The rows of curve.csv for one instance (`step_evals.curve_rows`)."""
    directory = run_directory(grid, instance)
    warm_up = sft_directory(grid, instance) / EVAL_DIR / EVAL_FILE if grid.evaluate_warm_up else None
    return curve_rows(instance.id, directory, read_metrics(directory / METRICS_FILE), warm_up,
                      directory / EVAL_DIR / EVAL_FILE)


def problem_rows(grid: GridConfig, run_id: str, directory: Path) -> list[dict[str, Any]]:
    """The rows of problems.csv for one evaluated run: each problem of each benchmark, correct 1 or 0; none until
    its evaluation has finished (eval.json written)."""
    if not (directory / EVAL_DIR / EVAL_FILE).is_file():
        return []
    return [
        {"instance": run_id, "benchmark": benchmark, "problem": record["id"], "correct": int(bool(record["correct"]))}
        for benchmark in grid.eval.benchmarks
        for record in read_records(directory / EVAL_DIR / f"{benchmark}.jsonl").values()
    ]
