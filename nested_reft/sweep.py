"""Sweeps: the paper's grid of runs (section 3), one directory per run, resumable, ending in results.csv.

A grid file (`GridConfig`, YAML) names models, datasets, skip ratios x, mitigations m, the border b and
seeds. For every (model, dataset, seed) it yields one baseline (x = 0, b = 0, m = base: classical ReFT)
and |skip_ratios| x |mitigations| Nested-ReFT instances (b = border); with the paper's defaults that
is 1 + 4 x 3 = 13 runs, and 2 models x 3 datasets x 13 = 78 (section 3.1). `baseline_seeds` adds
baselines at more seeds, whose spread measures the run-to-run noise the deltas should be read against.

Layout, under the grid's `output_dir`:

    <model-slug>/<dataset>/sft-s<seed>/          the shared SFT warm-up (status.json + a train output)
    <model-slug>/<dataset>/<instance>/           one run: status.json, the train output
        status.json                              pending | running | done | failed, error, timestamps
        config.yaml metrics.jsonl summary.json model/     (nested_reft.trainer; its checkpoint-N/ is
                                                 removed once trained, unless keep_checkpoints)
        eval/eval.json, eval/<benchmark>.jsonl   (nested_reft.evaluate)
    results.csv                                  one row per instance (the only input of `report`)

where <instance> is `baseline-s<seed>` or `x<x>-b<b>-<m>-s<seed>` and an instance's id is its path
relative to `output_dir` (`qwen2.5-math-1.5b-instruct/gsm8k/x0.05-b1-retrace-s0`).

The SFT warm-up runs once per (model, dataset, seed) and every instance of that triple starts from its
model with `sft.epochs = 0`. Two reasons: every instance, baseline included, then starts from the very
same weights, so the deltas measure the ReFT stage alone and not the noise of 13 separate warm-ups;
and the warm-up (E_sft = 2 epochs over the whole training set: 15k examples on GSM8k, 24k on Math12k)
is paid once instead of 13 times.

Rerunning a sweep skips instances whose status is done, retries failed or interrupted ones (a run left
"running" by a killed process counts as interrupted; the trainer resumes from its last checkpoint, and a
run trained but not evaluated is only evaluated), and records a failure without stopping the others;
`run_sweep` returns what failed so the command can exit non-zero listing them. `emit_commands` writes
one self-contained shell line per instance (`... sweep GRID --only ID`) for a Slurm job array or any
scheduler; jobs of the same (model, dataset, seed) that start together wait on a file lock for the one
that runs their SFT warm-up.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gc
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nested_reft.checkpoint import CHECKPOINT_PREFIX
from nested_reft.files import atomic_write_json, atomic_write_text, read_json
from nested_reft.config import (
    ConfigError, TrainConfig, check_option, from_dict, load_config, read_yaml_mapping, to_dict,
)
from nested_reft.data import TRAINING_SETS, DataError
from nested_reft.evaluate import (
    DEFAULT_BENCHMARKS,
    EVAL_FILE,
    EvalConfig,
    benchmark_names,
    eval_config,
    evaluate_model,
    print_progress,
)
from nested_reft.importance import MITIGATIONS
from nested_reft.results import RESULTS_FILE, accuracy_column, model_slug, write_results
from nested_reft.rundir import FINAL_MODEL_DIR, SUMMARY_FILE
from nested_reft.trainer import ensure_trained

PAPER_SKIP_RATIOS = (0.0, 0.05, 0.10, 0.15)  # section 3: x in {5, 10, 15}% plus x = 0 at b = 1 (4 x 3 = 12)
BASELINE = dict(skip_ratio=0.0, border=0, mitigation="base")  # section 3: classical ReFT

STATUS_FILE = "status.json"
EVAL_DIR = "eval"
STATUSES = ("pending", "running", "done", "failed")

# Options a grid sets per instance; `train:` may not set them.
PER_INSTANCE_OPTIONS = ("model", "dataset", "seed", "output_dir", "nesting.skip_ratio", "nesting.border",
                        "importance.mitigation")


# ----------------------------------------------------------------------------------------------------------
# The grid file
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How every instance is evaluated; None leaves an option at `nested_reft.evaluate.EvalConfig`'s default."""

    benchmarks: tuple[str, ...] = DEFAULT_BENCHMARKS
    limit: int | None = None  # first N problems of each benchmark (None = all)
    max_new_tokens: int | None = None
    batch_size: int | None = None
    temperature: float | None = None  # EvalConfig default is the paper's 0.6
    top_p: float | None = None  # EvalConfig default is the paper's 0.95
    data_dir: str | None = None  # None = the train data_dir, then $NESTED_REFT_DATA, then the hub

    def __post_init__(self) -> None:
        """Every check runs here, at grid load, not when the first instance has trained for hours."""
        _normalise(self, "benchmarks", str)
        try:
            benchmark_names(self.benchmarks)
            self.config(seed=0)  # EvalConfig's own checks of the sampling options
        except (DataError, ConfigError) as error:
            raise ConfigError(f"eval: {error}") from None
        check_option(len(set(self.benchmarks)) == len(self.benchmarks), "eval.benchmarks", self.benchmarks, "distinct")
        check_option(self.limit is None or self.limit >= 1, "eval.limit", self.limit, ">= 1 or null")

    def config(self, seed: int) -> EvalConfig:
        """The sampling settings of an instance's evaluation."""
        options = {key: getattr(self, key) for key in ("temperature", "top_p", "max_new_tokens", "batch_size")}
        return eval_config(seed=seed, **options)


@dataclass(frozen=True)
class GridConfig:
    """A sweep: models x datasets x seeds x (1 baseline + skip_ratios x mitigations) runs."""

    name: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    output_dir: str | None = None  # None = runs/sweeps/<name>
    skip_ratios: tuple[float, ...] = PAPER_SKIP_RATIOS
    mitigations: tuple[str, ...] = MITIGATIONS  # paper: base, practical, retrace
    border: int = 1  # paper: b = 1 (first and last layers never skipped)
    seeds: tuple[int, ...] = (0,)
    baseline_seeds: tuple[int, ...] | None = None  # baselines run at seeds + these; None = seeds only
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig options, nested or dotted
    keep_checkpoints: bool = False  # a finished run needs only model/; a 7B checkpoint with Adam states is ~40 GB
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        check_option(isinstance(self.name, str) and bool(re.fullmatch(r"[\w.-]+", self.name)), "name", self.name,
               "a non-empty name of letters, digits, '.', '_' or '-'")
        for option, kind in (("models", str), ("datasets", str), ("skip_ratios", float), ("mitigations", str),
                             ("seeds", int), ("baseline_seeds", int)):
            _normalise(self, option, kind)
        for option in ("models", "datasets", "skip_ratios", "mitigations", "seeds"):
            values = getattr(self, option)
            check_option(len(values) > 0, option, values, "a non-empty list")
            check_option(len(set(values)) == len(values), option, values, "a list without repeats")
        for dataset in self.datasets:
            check_option(dataset in TRAINING_SETS, "datasets", dataset, f"one of {TRAINING_SETS}")
        for mitigation in self.mitigations:
            check_option(mitigation in MITIGATIONS, "mitigations", mitigation, f"one of {MITIGATIONS}")
        for ratio in self.skip_ratios:
            check_option(0.0 <= ratio < 1.0, "skip_ratios", ratio, "in [0, 1)")
        check_option(isinstance(self.border, int) and self.border >= 0, "border", self.border, "an integer >= 0")
        slugs = [model_slug(model) for model in self.models]
        check_option(len(set(slugs)) == len(slugs), "models", self.models, f"models with distinct slugs (got {slugs})")
        if not isinstance(self.train, dict):
            raise ConfigError(f"train must be a mapping of TrainConfig options, got {type(self.train).__name__}")
        object.__setattr__(self, "train", flatten_options(self.train))
        set_by_grid = sorted(set(self.train) & set(PER_INSTANCE_OPTIONS))
        if set_by_grid:
            raise ConfigError(
                f"train.{set_by_grid[0]} is set per instance by the grid (models, datasets, seeds, skip_ratios, "
                "border, mitigations, output_dir); remove it from train"
            )
        self.base_config(self.models[0], self.datasets[0], self.seeds[0])  # validates every train option now

    @property
    def root(self) -> Path:
        return Path(self.output_dir or f"runs/sweeps/{self.name}")

    @property
    def all_baseline_seeds(self) -> tuple[int, ...]:
        extra = [seed for seed in self.baseline_seeds or () if seed not in self.seeds]
        return tuple(self.seeds) + tuple(extra)

    def base_config(self, model: str, dataset: str, seed: int, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The TrainConfig of `train:` for one (model, dataset, seed), plus dotted `overrides`."""
        options = {**self.train, "model": model, "dataset": dataset, "seed": seed, **(overrides or {})}
        try:
            return load_config(None, options)
        except ValueError as error:  # a ConfigError, or a plain ValueError from an engine's config (SamplingConfig)
            raise ConfigError(f"train: {error}") from None

    @property
    def warm_up(self) -> bool:
        """Whether instances start from a shared SFT warm-up (train.sft.epochs > 0, the paper's E_sft = 2)."""
        return self.base_config(self.models[0], self.datasets[0], self.seeds[0]).sft.epochs > 0


def load_grid(path: str | os.PathLike) -> GridConfig:
    """Read and validate a grid file; every error is a ConfigError naming the option, before any work."""
    values = read_yaml_mapping(path, "grid file")
    try:
        return from_dict(GridConfig, values)
    except ConfigError as error:
        raise ConfigError(f"grid file {path}: {error}") from None


def flatten_options(options: dict, prefix: str = "") -> dict[str, Any]:
    """{"grpo": {"beta": 0}, "sft.epochs": 2} -> {"grpo.beta": 0, "sft.epochs": 2}."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_options(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _normalise(config: Any, option: str, kind: type) -> None:
    """Make a list option a tuple of `kind` (YAML gives 0 for 0.0), naming the option on a bad element."""
    values = getattr(config, option)
    if values is None:
        return
    if isinstance(values, (str, int, float)):
        values = (values,)
    try:
        converted = tuple(kind(value) for value in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} must be a list of {kind.__name__}, got {values!r}") from None
    if kind is int and any(isinstance(v, float) and v != int(v) for v in values):
        raise ConfigError(f"{option} must be a list of int, got {values!r}")
    object.__setattr__(config, option, converted)


# ----------------------------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One run of the grid."""

    model: str
    dataset: str
    seed: int
    skip_ratio: float
    border: int
    mitigation: str
    role: str  # "baseline" | "nested"

    @property
    def group(self) -> str:
        """<model-slug>/<dataset>: the instances a baseline is compared with."""
        return f"{model_slug(self.model)}/{self.dataset}"

    @property
    def name(self) -> str:
        if self.role == "baseline":
            return f"baseline-s{self.seed}"
        return f"x{self.skip_ratio:g}-b{self.border}-{self.mitigation}-s{self.seed}"

    @property
    def id(self) -> str:
        """Stable and unique in a grid; also the run directory relative to output_dir."""
        return f"{self.group}/{self.name}"

    @property
    def sft_id(self) -> str:
        return f"{self.group}/sft-s{self.seed}"


def enumerate_instances(grid: GridConfig) -> list[Instance]:
    """Per (model, dataset): baselines at every baseline seed, then per seed the skip_ratios x mitigations."""
    instances = []
    for model in grid.models:
        for dataset in grid.datasets:
            for seed in grid.all_baseline_seeds:
                instances.append(Instance(model, dataset, seed, role="baseline", **BASELINE))
            for seed in grid.seeds:
                for ratio in grid.skip_ratios:
                    for mitigation in grid.mitigations:
                        instances.append(Instance(model, dataset, seed, ratio, grid.border, mitigation, "nested"))
    return instances


def run_directory(grid: GridConfig, instance: Instance) -> Path:
    return grid.root / instance.id


def sft_directory(grid: GridConfig, instance: Instance) -> Path:
    return grid.root / instance.sft_id


def sft_config(grid: GridConfig, instance: Instance) -> TrainConfig:
    """The warm-up shared by `instance`'s (model, dataset, seed): the train options with no ReFT step."""
    overrides = {"output_dir": str(sft_directory(grid, instance)), "rft_steps": 0}
    return grid.base_config(instance.model, instance.dataset, instance.seed, overrides)


def instance_config(grid: GridConfig, instance: Instance) -> TrainConfig:
    """The instance's ReFT run, from the shared SFT model (sft.epochs = 0) when the grid warms up."""
    overrides: dict[str, Any] = {
        "output_dir": str(run_directory(grid, instance)),
        "nesting.skip_ratio": instance.skip_ratio,
        "nesting.border": instance.border,
        "importance.mitigation": instance.mitigation,
    }
    if grid.warm_up:
        overrides.update({"model": str(sft_directory(grid, instance) / FINAL_MODEL_DIR), "sft.epochs": 0})
    return grid.base_config(instance.model, instance.dataset, instance.seed, overrides)


def fingerprint(grid: GridConfig, instance: Instance) -> str:
    """A hash of what determines an instance's result (train and eval settings), kept in its status."""
    values = {"train": to_dict(instance_config(grid, instance)), "eval": dataclasses.asdict(grid.eval)}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Status files
# ----------------------------------------------------------------------------------------------------------


def read_status(directory: Path) -> dict:
    """The status record of a run directory; {"status": "pending"} where there is none (or it is unreadable)."""
    return read_json(Path(directory) / STATUS_FILE) or {"status": "pending"}


def write_status(directory: Path, status: str, **fields: Any) -> dict:
    """Update the status record atomically, keeping earlier fields (started_at, attempts) not given."""
    assert status in STATUSES, status
    record = read_status(directory)
    now = _now()
    record.update(fields, status=status, updated_at=now)
    if status == "running":
        record["attempts"] = record.get("attempts", 0) + 1
        record["started_at"] = now
        record.pop("finished_at", None)
        record.update(error=None, traceback=None)
    if status in ("done", "failed"):
        record["finished_at"] = now
    atomic_write_json(Path(directory) / STATUS_FILE, record)
    return record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)  # ids run to done in this call
    skipped: list[str] = field(default_factory=list)  # ids already done
    failed: dict[str, str] = field(default_factory=dict)  # id -> error


def evaluate_instance(model_dir: Path, output_dir: Path, settings: EvalSettings, train_config: TrainConfig,
                      seed: int) -> dict:
    """Evaluate a trained model on the grid's benchmarks at pass@1 (in the training dtype, on the GPU where
    there is one); writes <output_dir>/eval.json and returns it. A rerun resumes a partial evaluation."""
    return evaluate_model(
        str(model_dir), settings.benchmarks, output_dir, settings.config(seed),
        data_dir=settings.data_dir or train_config.data_dir, limit=settings.limit, dtype=train_config.dtype,
        progress=print_progress,
    )


def select(grid: GridConfig, only: str | None) -> list[Instance]:
    """Every instance, or the one whose id is `only`."""
    instances = enumerate_instances(grid)
    if only is None:
        return instances
    chosen = [instance for instance in instances if instance.id == only.strip("/")]
    if not chosen:
        sample = ", ".join(instance.id for instance in instances[:3])
        raise ConfigError(f"--only {only!r} is not an instance of grid {grid.name!r} (ids look like: {sample}, ...)")
    return chosen


def run_sweep(grid: GridConfig, only: str | None = None, log: Callable[[str], None] = print) -> SweepOutcome:
    """Run every instance that is not done (or just `only`), then rewrite results.csv; never stops early."""
    instances = select(grid, only)
    outcome = SweepOutcome()
    for instance in instances:  # a status file for every selected run (an existing one is left as it is)
        if not (run_directory(grid, instance) / STATUS_FILE).is_file():
            write_status(run_directory(grid, instance), "pending", instance=instance.id)
    failed_warm_ups: dict[str, str] = {}
    for number, instance in enumerate(instances, start=1):
        directory = run_directory(grid, instance)
        status = read_status(directory)
        if status.get("status") == "done":
            outcome.skipped.append(instance.id)
            if status.get("fingerprint") not in (None, fingerprint(grid, instance)):
                log(f"warning: {instance.id} is done with other settings than the grid's now; "
                    f"delete {directory} to rerun it")
            continue
        log(f"[{number}/{len(instances)}] {instance.id}")
        error = run_instance(grid, instance, failed_warm_ups)
        if error is None:
            outcome.ran.append(instance.id)
        else:
            outcome.failed[instance.id] = error
            log(f"FAILED {instance.id}: {error}")
        _free_memory()
    collect_results(grid)
    return outcome


def run_instance(grid: GridConfig, instance: Instance, failed_warm_ups: dict[str, str] | None = None) -> str | None:
    """SFT warm-up if missing, train (resuming), evaluate; record the status. Returns the error or None."""
    failed_warm_ups = {} if failed_warm_ups is None else failed_warm_ups
    directory = run_directory(grid, instance)
    write_status(directory, "running", instance=instance.id, fingerprint=fingerprint(grid, instance))
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
        ensure_trained(config)  # resumes from the last checkpoint; starts afresh where there is none
        if not grid.keep_checkpoints:  # trained: model/ is the result, the checkpoint only served resuming
            for checkpoint in directory.glob(f"{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
        evaluate_instance(directory / FINAL_MODEL_DIR, directory / EVAL_DIR, grid.eval, config, instance.seed)
    except KeyboardInterrupt:
        write_status(directory, "failed", error="interrupted")
        raise
    except Exception as error:  # recorded, reported at the end; the sweep goes on with the next instance
        write_status(directory, "failed", error=_describe(error), traceback=traceback.format_exc())
        return _describe(error)
    write_status(directory, "done")
    return None


def ensure_warm_up(grid: GridConfig, instance: Instance) -> Path:
    """The shared SFT model of `instance`'s (model, dataset, seed), trained first if it is not there yet.

    A lock file serialises concurrent jobs of the same triple (a job array): the first trains, the others
    wait and then find it done.
    """
    directory = sft_directory(grid, instance)
    with _locked(directory.with_name(directory.name + ".lock")):
        if read_status(directory).get("status") == "done" and (directory / FINAL_MODEL_DIR).is_dir():
            return directory / FINAL_MODEL_DIR
        write_status(directory, "running", instance=instance.sft_id)
        try:
            ensure_trained(sft_config(grid, instance))
        except Exception as error:
            write_status(directory, "failed", error=_describe(error), traceback=traceback.format_exc())
            raise
        write_status(directory, "done")
    return directory / FINAL_MODEL_DIR


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_memory() -> None:
    """Let the next instance start with the memory of the last one returned (GPU caches included)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------------------
# Commands for a scheduler, and the results table
# ----------------------------------------------------------------------------------------------------------


def emit_commands(grid: GridConfig, grid_path: str | os.PathLike, path: str | os.PathLike) -> list[str]:
    """Write one self-contained shell command per instance to `path` (line i = job array task i).

    Each line changes to the current directory (so a relative output_dir resolves as here) and runs this
    Python on `--only <id>`; an instance already done exits at once, so the file can be resubmitted.
    """
    prefix = f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m nested_reft.cli sweep"
    grid_file = shlex.quote(str(Path(grid_path).resolve()))
    lines = [f"{prefix} {grid_file} --only {shlex.quote(instance.id)}" for instance in enumerate_instances(grid)]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return lines


def result_row(grid: GridConfig, instance: Instance) -> dict[str, Any]:
    """One row of results.csv from the run directory's status.json, summary.json and eval/eval.json."""
    directory = run_directory(grid, instance)
    status = read_status(directory)
    row: dict[str, Any] = {
        "model": instance.model, "dataset": instance.dataset, "instance": instance.id, "role": instance.role,
        "skip_ratio": instance.skip_ratio, "border": instance.border, "mitigation": instance.mitigation,
        "seed": instance.seed, "status": status.get("status", "pending"),
        "error": (status.get("error") or "").splitlines()[0][:300] if status.get("error") else "",
    }
    evaluation = read_json(directory / EVAL_DIR / EVAL_FILE)
    benchmarks = evaluation.get("benchmarks", {})
    for name in grid.eval.benchmarks:
        row[accuracy_column(name)] = benchmarks.get(name, {}).get("accuracy")
    row["accuracy"] = evaluation.get("average")
    summary = read_json(directory / SUMMARY_FILE)
    row["token_speed"] = summary.get("token_speed")
    row["total_runtime_s"] = summary.get("total_runtime_s")
    return row


def collect_results(grid: GridConfig) -> Path:
    """(Re)write <output_dir>/results.csv from the run directories; empty cells where an instance is not done."""
    rows = [result_row(grid, instance) for instance in enumerate_instances(grid)]
    return write_results(grid.root / RESULTS_FILE, grid.eval.benchmarks, rows)


def sweep_main(grid_path: str, only: str | None = None, emit: str | None = None, collect: bool = False,
               log: Callable[[str], None] = print) -> int:
    """The `nested-reft sweep` command: 0 when every selected instance is done, 1 when any failed."""
    grid = load_grid(grid_path)
    if emit is not None:
        lines = emit_commands(grid, grid_path, emit)
        log(f"wrote {len(lines)} commands to {emit}")
        return 0
    if collect:
        log(f"wrote {collect_results(grid)}")
        return 0
    outcome = run_sweep(grid, only=only, log=log)
    log(f"{len(outcome.ran)} run, {len(outcome.skipped)} already done, {len(outcome.failed)} failed; "
        f"results: {grid.root / RESULTS_FILE}")
    if outcome.failed:
        print("failed instances (see their status.json; rerun the sweep to retry them):", file=sys.stderr)
        for instance_id, error in outcome.failed.items():
            print(f"  {instance_id}: {error}", file=sys.stderr)
        return 1
    return 0
