"""Running a grid (`nested_reft.experiments.grid`): one directory per instance, resumable, ending in results.csv.

Layout, under the grid's `output_dir`:

    <model-slug>/<dataset>/sft-s<seed>/          the shared SFT warm-up (status.json + a train output)
    <model-slug>/<dataset>/<instance>/           one run: status.json, the train output
        status.json                              pending | running | done | failed, error, timestamps
        config.yaml metrics.jsonl summary.json model/     (nested_reft.training.trainer; its checkpoint-N/ is
                                                 removed once trained, unless keep_checkpoints; model/ once
                                                 evaluated, where keep_models is false)
        eval/eval.json, eval/<benchmark>.jsonl   (nested_reft.evaluation.evaluate)
        eval-steps/step-<s>/                     the evaluations during training, with eval.steps (`step_evals`)
    results.csv                                  one row per instance (nested_reft.experiments.results; with
                                                 steps.csv, problems.csv and curve.csv the only input of `report`)
    run_settings.json                            each done run's settings, which `--merge` compares (`collect`)
    .sweep.lock, <model-slug>/<dataset>/<instance or sft-s<seed>>.lock     one writer each (see `run_sweep`)

Rerunning a sweep skips instances whose status is done, retries failed or interrupted ones (a run left
"running" by a killed process counts as interrupted; the trainer resumes from its last checkpoint, and a
run trained but not evaluated is only evaluated), and records a failure without stopping the others;
`run_sweep` returns what failed so the command can exit non-zero listing them. `emit_commands` writes
one self-contained shell line per instance (`... sweep GRID --only ID`) for a Slurm job array or any
scheduler; jobs of the same (model, dataset, seed) that start together wait on a file lock for the one
that runs their SFT warm-up.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nested_reft.training.checkpoint import checkpoints
from nested_reft.config import ConfigError, TrainConfig, config_differences, load_config
from nested_reft.experiments.collect import EVAL_DIR, collect_results, recorded_done, run_status
from nested_reft.evaluation.records import EVAL_FILE
from nested_reft.evaluation.evaluate import evaluate_model, print_progress
from nested_reft.store.files import (
    LockHeldError, atomic_write_json, atomic_write_text, check_output_directory, check_output_file, exclusive_lock,
    read_json,
)
from nested_reft.experiments.grid import (
    EvalSettings, GridConfig, Instance, changed_settings, enumerate_instances, eval_record, instance_config, load_grid,
    run_directory, select_instances, sft_config, sft_directory,
)
from nested_reft.experiments.results import RESULTS_FILE
from nested_reft.training.rundir import CONFIG_FILE, FINAL_MODEL_DIR, SUMMARY_FILE, RunState, run_state
from nested_reft.experiments.status import STATUS_FILE, read_status, write_status
from nested_reft.experiments.step_evals import StepEvaluator, clear_step_evals
from nested_reft.training.trainer import ensure_trained

SWEEP_LOCK_FILE = ".sweep.lock"  # in output_dir, held by a sweep of the whole grid
# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)  # ids run to done in this call
    skipped: list[str] = field(default_factory=list)  # ids already done
    failed: dict[str, str] = field(default_factory=dict)  # id -> error
    in_use: dict[str, str] = field(default_factory=dict)  # id -> the refusal naming the process running it


def evaluate_instance(model_dir: Path, output_dir: Path, settings: EvalSettings, train_config: TrainConfig,
                      seed: int) -> dict:
    """Evaluate a trained model on the grid's benchmarks at pass@1 (in the training dtype, on the GPU where
    there is one); writes <output_dir>/eval.json and returns it. A rerun resumes a partial evaluation."""
    return evaluate_model(
        str(model_dir), settings.benchmarks, output_dir, settings.config(seed),
        data_dir=settings.data_dir_in_grid(train_config.data_dir), limit=settings.limit, dtype=train_config.dtype,
        progress=print_progress,
    )


def run_sweep(grid: GridConfig, only: str | None = None, log: Callable[[str], None] = print,
              recorded: str | Path | None = None) -> SweepOutcome:
    """Run every instance that is not done (or just `only`), then rewrite results.csv; never stops early.
    Instances done in the `recorded` results directory count as done (`collect_results` merges their rows).

    One writer per thing, so that no instance is ever trained twice at once: a sweep of the whole grid
    holds the grid's lock (a second one is refused with LockHeldError naming the first), and every
    instance is run under a lock of its own, so that the jobs of a job array (`--only`, one instance
    each) run side by side. An instance that another process is running is refused too: with `--only`
    the refusal is raised, in a whole-grid sweep it is reported in `in_use` and the sweep goes on.
    """
    instances = select_instances(grid, only)
    check_output_directory(grid.root, "output_dir")
    done_there = recorded_done(recorded, grid)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_older_objects_frozen())
        if only is None:
            stack.enter_context(exclusive_lock(grid.root / SWEEP_LOCK_FILE, f"the sweep of grid {grid.name!r} "
                                                                           f"(output_dir {grid.root})"))
        _mark_pending(grid, instances)
        outcome = SweepOutcome(skipped=[instance.id for instance in instances if instance.id in done_there])
        failed_warm_ups: dict[str, str] = {}
        for number, instance in enumerate(instances, start=1):
            if instance.id in done_there:
                continue
            try:
                with instance_lock(grid, instance):
                    _run_unless_done(grid, instance, f"[{number}/{len(instances)}]", outcome, failed_warm_ups, log)
            except LockHeldError as refusal:
                if only is not None:
                    raise
                outcome.in_use[instance.id] = str(refusal)
                log(f"skipped {instance.id}: {refusal}")
            _free_memory()
        collect_results(grid, recorded)
    return outcome


def instance_lock(grid: GridConfig, instance: Instance) -> contextlib.AbstractContextManager:
    """The instance's own lock, refused (LockHeldError) while another process holds it."""
    return exclusive_lock(_lock_file(run_directory(grid, instance)), f"instance {instance.id} of grid {grid.name!r}")


def _lock_file(directory: Path) -> Path:
    """`<directory>.lock`, beside the run directory and not in it: the trainer locks its run directory with a
    file inside (rundir.LOCK_FILE), and two flock locks on one file exclude each other even in one process."""
    return directory.with_name(directory.name + ".lock")


def _mark_pending(grid: GridConfig, instances: list[Instance]) -> None:
    """A status file for every selected run that has none; an instance another process holds is its to write."""
    for instance in instances:
        with contextlib.suppress(LockHeldError), instance_lock(grid, instance):
            if not (run_directory(grid, instance) / STATUS_FILE).is_file():
                write_status(run_directory(grid, instance), "pending", instance=instance.id)


def _run_unless_done(grid: GridConfig, instance: Instance, label: str, outcome: SweepOutcome,
                     failed_warm_ups: dict[str, str], log: Callable[[str], None]) -> None:
    """Run one instance (its lock held) unless its status says done; record what happened in `outcome`."""
    directory = run_directory(grid, instance)
    status = run_status(directory)
    if status.get("status") == "done":
        outcome.skipped.append(instance.id)
        _warn_if_changed(grid, instance, status, log)
        return
    lost = read_status(directory).get("status") == "done"  # done, its evaluation since lost: evaluated again
    log(f"{label} {instance.id}" + (f" ({status['error']}: evaluating it again)" if lost else ""))
    error = run_instance(grid, instance, failed_warm_ups)
    if error is None:
        outcome.ran.append(instance.id)
    else:
        outcome.failed[instance.id] = error
        log(f"FAILED {instance.id}: {error}")


def _warn_if_changed(grid: GridConfig, instance: Instance, status: dict, log: Callable[[str], None]) -> None:
    """Name what the grid now sets otherwise than a done instance ran with; the run is kept either way."""
    directory = run_directory(grid, instance)
    saved = directory / CONFIG_FILE
    try:
        changes = changed_settings(grid, instance, load_config(saved) if saved.is_file() else None,
                                   status.get("eval"))
    except ConfigError as error:  # saved by a version whose options this one no longer has
        changes = [f"its {CONFIG_FILE} no longer loads: {error}"]
    if changes:
        log(f"warning: {instance.id} is done with other settings than the grid's now ({'; '.join(changes)}); "
            f"delete {directory} to rerun it")


def run_instance(grid: GridConfig, instance: Instance, failed_warm_ups: dict[str, str] | None = None) -> str | None:
    """SFT warm-up if missing, train (resuming), evaluate; record the status. Returns the error or None.

    The caller holds the instance's lock (`instance_lock`), as `run_sweep` does.
    """
    failed_warm_ups = {} if failed_warm_ups is None else failed_warm_ups
    directory = run_directory(grid, instance)
    write_status(directory, "running", instance=instance.id, eval=eval_record(grid))
    try:
        if grid.warm_up:
            if instance.sft_id in failed_warm_ups:
                raise RuntimeError(f"SFT warm-up {instance.sft_id} failed: {failed_warm_ups[instance.sft_id]}")
            try:
                ensure_warm_up(grid, instance)
            except Exception as error:
                failed_warm_ups[instance.sft_id] = _describe(error)
                raise
        config = instance_config(grid, instance)
        if run_state(directory) is not RunState.FINISHED and not checkpoints(directory):
            clear_step_evals(directory)  # it starts afresh: another trajectory's points are not its own
        evaluations = [StepEvaluator(directory, grid.eval, config, grid.eval.steps)] if grid.eval.steps else []
        ensure_trained(config, callbacks=evaluations)  # resumes from the last checkpoint; starts afresh where none
        if not grid.keep_checkpoints:  # trained: model/ is the result, the checkpoint only served resuming
            for checkpoint in checkpoints(directory):
                shutil.rmtree(checkpoint, ignore_errors=True)
        evaluate_instance(trained_model(directory, instance.id), directory / EVAL_DIR, grid.eval, config,
                          instance.seed)
    except KeyboardInterrupt:
        write_status(directory, "failed", error="interrupted")
        raise
    except Exception as error:  # recorded, reported at the end; the sweep goes on with the next instance
        write_status(directory, "failed", error=_describe(error), traceback=traceback.format_exc())
        return _describe(error)
    write_status(directory, "done")
    if not grid.keep_models:  # after "done": a run killed in between keeps its model rather than losing its status
        shutil.rmtree(directory / FINAL_MODEL_DIR, ignore_errors=True)
    return None


def ensure_warm_up(grid: GridConfig, instance: Instance) -> Path:
    """The shared SFT model of `instance`'s (model, dataset, seed), trained first if it is not there yet.

    A lock file serialises concurrent jobs of the same triple (a job array): the first trains, the others
    wait and then find it done. With `evaluate_warm_up` the warm-up model is also evaluated (once), for the
    accuracy before ReFT.
    """
    directory = sft_directory(grid, instance)
    with exclusive_lock(_lock_file(directory), f"SFT warm-up {instance.sft_id}", wait=True):
        _check_warm_up_settings(grid, instance)
        if read_status(directory).get("status") != "done" or not (directory / FINAL_MODEL_DIR).is_dir():
            write_status(directory, "running", instance=instance.sft_id)
            try:
                ensure_trained(sft_config(grid, instance))
            except Exception as error:
                write_status(directory, "failed", error=_describe(error), traceback=traceback.format_exc())
                raise
            write_status(directory, "done")
        model = trained_model(directory, f"SFT warm-up {instance.sft_id}")
        if grid.evaluate_warm_up and not (directory / EVAL_DIR / EVAL_FILE).is_file():  # the accuracy before ReFT
            evaluate_instance(model, directory / EVAL_DIR, grid.eval, sft_config(grid, instance), instance.seed)
    return model


def trained_model(directory: Path, what: str) -> Path:
    """The model/ of the finished run in `directory`; a ConfigError naming `what` where it was deleted after the run
    finished (a finished run is not trained again, so nothing can be evaluated or started from it)."""
    model = directory / FINAL_MODEL_DIR
    if not model.is_dir():
        raise ConfigError(f"{what} is trained ({SUMMARY_FILE}) but its {FINAL_MODEL_DIR}/ is gone (keep_models: false "
                          f"deletes it once evaluated), so it cannot be evaluated or started from: delete {directory} "
                          "to run it again")
    return model


def _check_warm_up_settings(grid: GridConfig, instance: Instance) -> None:
    """Refuse a warm-up trained with other settings than the grid's now (its config.yaml against `sft_config`):
    instances started from it would record the new options and train from the old model."""
    directory = sft_directory(grid, instance)
    saved = directory / CONFIG_FILE
    if saved.is_file():
        differences = config_differences(load_config(saved), sft_config(grid, instance))
        if differences:
            raise ConfigError(f"SFT warm-up {instance.sft_id} was trained with other settings than the grid's now "
                              f"({'; '.join(differences)}); delete {directory} to train it again")


def _free_memory() -> None:
    """Let the next instance start with the memory of the last one returned (GPU caches included)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Keep the objects alive before the sweep out of its collections, and give them back after.

    They are not an instance's garbage, and over a large heap (a notebook's, a test session's after compiled
    graphs) each full collection in `_free_memory` took seconds; frozen, it scans only what the instances made.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------------------
# Commands for a scheduler
# ----------------------------------------------------------------------------------------------------------


def emit_commands(grid: GridConfig, grid_path: str | os.PathLike, path: str | os.PathLike,
                  recorded: str | Path | None = None) -> list[str]:
    """Write one self-contained shell command per instance to `path` (line i = job array task i).

    Each line changes to the current directory (so a relative output_dir resolves as here) and runs this
    Python on `--only <id>`; an instance already done exits at once, so the file can be resubmitted. Instances
    done in the `recorded` results directory get no line, and the others' collect merges its rows.
    """
    prefix = f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m nested_reft.cli sweep"
    grid_file = shlex.quote(str(Path(grid_path).resolve()))
    merge = f" --merge {shlex.quote(str(Path(recorded).resolve()))}" if recorded is not None else ""
    done_there = recorded_done(recorded, grid)
    check_output_file(path, "--emit-commands")
    lines = [f"{prefix} {grid_file}{merge} --only {shlex.quote(instance.id)}" for instance in enumerate_instances(grid)
             if instance.id not in done_there]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return lines


def sweep_main(grid_path: str, only: str | None = None, emit: str | None = None, collect: bool = False,
               log: Callable[[str], None] = print, merge: str | None = None) -> int:
    """The `nested-reft sweep` command: 0 when every selected instance is done, 1 when any failed or another
    process is running it; a sweep or `--only` instance another process holds is refused (LockHeldError).
    `merge`: a results directory whose done instances count as done (`collect_results`'s `recorded`)."""
    grid = load_grid(grid_path)
    if emit is not None:
        lines = emit_commands(grid, grid_path, emit, merge)
        log(f"wrote {len(lines)} commands to {emit}")
        return 0
    if collect:
        check_output_directory(grid.root, "output_dir")
        log(f"wrote {collect_results(grid, merge)}")
        return 0
    outcome = run_sweep(grid, only=only, log=log, recorded=merge)
    in_use = f", {len(outcome.in_use)} in use by other processes" if outcome.in_use else ""
    log(f"{len(outcome.ran)} run, {len(outcome.skipped)} already done, {len(outcome.failed)} failed{in_use}; "
        f"results: {grid.root / RESULTS_FILE}")
    unfinished = (("failed instances (see their status.json; a rerun retries them, and fails the same way until "
                   "the input or setting named is fixed):", outcome.failed),
                  ("instances other processes are running (rerun the sweep once they are done):", outcome.in_use))
    for heading, reasons in unfinished:
        if reasons:
            print(heading, file=sys.stderr)
            for instance_id, reason in reasons.items():
                print(f"  {instance_id}: {reason}", file=sys.stderr)
    return 1 if outcome.failed or outcome.in_use else 0
