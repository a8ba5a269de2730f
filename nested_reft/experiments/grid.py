"""A grid of runs (the paper's section 3): the grid file, its instances, and each instance's directory and config.

A grid file (`GridConfig`, YAML) names models, datasets, skip ratios x, mitigations m, the border b and
seeds. For every (model, dataset, seed) it yields one baseline (x = 0, b = 0, m = base: classical ReFT)
and |skip_ratios| x |mitigations| Nested-ReFT instances (b = border); with the paper's defaults that
is 1 + 4 x 3 = 13 runs, and 2 models x 3 datasets x 13 = 78 (section 3.1). `baseline_seeds` adds
baselines at more seeds, whose spread measures the run-to-run noise the deltas should be read against.

An instance's id is its run directory relative to the grid's `output_dir`, `<model-slug>/<dataset>/<name>`
with <name> `baseline-s<seed>` or `x<x>-b<b>-<m>-s<seed>`; the SFT warm-up its (model, dataset, seed)
shares is `<model-slug>/<dataset>/sft-s<seed>`. This module plans; running the instances is `sweep`'s work.

Warm-ups beside the grid's own (`warm_ups`, issue 22: a nested-aware warm-up with other `sft` options) each repeat
the grid's instances from their own model, under `<model-slug>/<dataset>/<label>/`: baseline, product and variants
against the baseline of the same warm-up (the effect of nesting), and each baseline against the plain warm-up's
(the warm-up's own effect).

The SFT warm-up runs once per (model, dataset, seed) and every instance of that triple starts from its
model with `sft.epochs = 0`. Two reasons: every instance, baseline included, then starts from the very
same weights, so the deltas measure the ReFT stage alone and not the noise of 13 separate warm-ups;
and the warm-up (E_sft = 2 epochs over the whole training set: 15k examples on GSM8k, 24k on Math12k)
is paid once instead of 13 times.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nested_reft.config import (
    MITIGATIONS, RESUMABLE_OPTIONS, TRAINING_SETS, ConfigError, EvalSettings, TrainConfig, check_option,
    check_path_component, config_differences, flat_options, from_dict, load_config, read_yaml_mapping, to_dict,
)
from nested_reft.tasks.data import DataError
from nested_reft.evaluation.evaluate import benchmark_names
from nested_reft.experiments.results import model_slug
from nested_reft.training.rundir import FINAL_MODEL_DIR

PAPER_SKIP_RATIOS = (0.0, 0.05, 0.10, 0.15)  # section 3: x in {5, 10, 15}% plus x = 0 at b = 1 (4 x 3 = 12)
BASELINE = dict(skip_ratio=0.0, border=0, mitigation="base")  # section 3: classical ReFT

# Options a grid sets per instance; `train:` may not set them.
PER_INSTANCE_OPTIONS = ("model", "dataset", "seed", "output_dir", "nesting.skip_ratio", "nesting.border",
                        "importance.mitigation")


# ----------------------------------------------------------------------------------------------------------
# The grid file
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridEvalSettings(EvalSettings):
    """How every instance is evaluated: EvalSettings (None leaves an option at its default; data_dir None is the
    train data_dir first), checked at grid load."""

    OMITTED_OPTIONS: ClassVar[tuple[str, ...]] = ("seed", "engine")  # each instance's own seed; the default engine
    # TRL's eval_steps: also evaluate the policy every `steps` ReFT steps before the last, with these settings
    # (`step_evals`: the points of pass@1 against rollout FLOPs in curve.csv); None: once trained only
    steps: int | None = None

    def __post_init__(self) -> None:
        """Every check runs here, at grid load, not when the first instance has trained for hours."""
        try:
            super().__post_init__()  # EvalConfig's own checks of the sampling options
            benchmark_names(self.benchmarks)
        except (DataError, ConfigError) as error:
            raise ConfigError(f"eval: {error}") from None
        check_option(len(set(self.benchmarks)) == len(self.benchmarks), "eval.benchmarks", self.benchmarks, "distinct")
        check_option(self.limit is None or self.limit >= 1, "eval.limit", self.limit, ">= 1 or null")
        check_option(self.steps is None or (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                            and self.steps >= 1), "eval.steps", self.steps, "an integer >= 1 or null")


# The eval options a grid file sets, as its instances' status.json records them: not `steps`, which adds evaluations
# beside a run's own and changes neither it nor its training
GRID_EVAL_OPTIONS = tuple(spec.name for spec in dataclasses.fields(GridEvalSettings)
                          if spec.name not in (*GridEvalSettings.OMITTED_OPTIONS, "steps"))


@dataclass(frozen=True)
class Variant:
    """An instance beside the grid's product of skip ratios and mitigations, run at every seed: one (x, m) pair
    (base at 30% where the product holds only retrace), or one with other options (nesting: an adaptive skip
    policy, its temperature or KL target, bridges; grpo and sampling: which rollouts teach, filter_groups and
    skip_predictable), which `label` then names."""

    skip_ratio: float
    mitigation: str = "retrace"
    label: str = ""  # required with nesting options: it names the run (x0.3-b1-retrace-<label>-s0)
    nesting: dict[str, Any] = field(default_factory=dict)  # NestingConfig options, e.g. {skip_policy: influence}
    grpo: dict[str, Any] = field(default_factory=dict)  # GRPOConfig options, e.g. {filter_groups: true}
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingConfig options, e.g. {skip_predictable: true}

    def __post_init__(self) -> None:
        if self.label != "":
            check_path_component(self.label, "variants.label")
        check_option(bool(self.label) or not self.sections(), "variants.label", self.label,
                     "given for a variant with nesting, grpo or sampling options (it names the run)")
        check_option(0.0 <= self.skip_ratio < 1.0, "variants.skip_ratio", self.skip_ratio, "in [0, 1)")
        check_option(self.mitigation in MITIGATIONS, "variants.mitigation", self.mitigation, f"one of {MITIGATIONS}")
        for section in ("nesting", "grpo", "sampling"):
            check_option(isinstance(getattr(self, section), dict), f"variants.{section}", getattr(self, section),
                         f"a mapping of {section} options")
        fixed = sorted({"skip_ratio", "border"} & set(self.nesting))
        check_option(not fixed, f"variants.nesting.{fixed[0] if fixed else ''}", self.nesting,
                     "free of skip_ratio and border (the variant's skip_ratio and the grid's border set them)")

    def sections(self) -> dict[str, dict[str, Any]]:
        """The variant's own options by config section (the sections it sets)."""
        return {name: options for name, options in (("nesting", self.nesting), ("grpo", self.grpo),
                                                    ("sampling", self.sampling)) if options}

    def overrides(self) -> dict[str, Any]:
        return {f"{section}.{key}": value for section, options in self.sections().items()
                for key, value in options.items()}


@dataclass(frozen=True)
class WarmUp:
    """A warm-up beside the grid's own: `sft` options over `train.sft`'s (a nested-aware warm-up: layer_drop,
    distill_nested), run at every seed; the grid's instances run again from its model, under a directory `label`."""

    label: str
    sft: dict[str, Any] = field(default_factory=dict)  # SFTConfig options, e.g. {layer_drop: 0.15}

    def __post_init__(self) -> None:
        check_path_component(self.label, "warm_ups.label")
        check_option(isinstance(self.sft, dict) and bool(self.sft), "warm_ups.sft", self.sft,
                     "a non-empty mapping of sft options (what makes this warm-up another)")

    def overrides(self) -> dict[str, Any]:
        return {f"sft.{key}": value for key, value in self.sft.items()}


@dataclass(frozen=True)
class GridConfig:
    """A sweep: models x datasets x seeds x (1 baseline + skip_ratios x mitigations + variants) runs."""

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
    keep_models: bool = True  # False: a run's model/ is deleted once evaluated (results.csv is then its record; a
    # 135M model in fp32 is 0.54 GB, and study 2's 50 runs beside study 1's filled the disk); warm-ups are kept
    eval: GridEvalSettings = field(default_factory=GridEvalSettings)
    variants: tuple[Variant, ...] = ()  # instances past the paper's product (adaptive skip policies, ...)
    evaluate_warm_up: bool = False  # also evaluate each SFT warm-up: the accuracy before ReFT, per seed
    conditions: str = ""  # how the runs were timed (machine, lanes side by side): printed beside wall-clock times
    warm_ups: tuple[WarmUp, ...] = ()  # warm-ups beside train.sft's, each with the grid's instances again

    def __post_init__(self) -> None:
        check_path_component(self.name, "name")
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
        object.__setattr__(self, "train", flat_options(self.train))
        set_by_grid = sorted(set(self.train) & set(PER_INSTANCE_OPTIONS))
        if set_by_grid:
            raise ConfigError(
                f"train.{set_by_grid[0]} is set per instance by the grid (models, datasets, seeds, skip_ratios, "
                "border, mitigations, output_dir); remove it from train"
            )
        object.__setattr__(self, "variants", tuple(_variant(value) for value in self.variants or ()))
        runs = [(ratio, mitigation, "") for ratio in self.skip_ratios for mitigation in self.mitigations]
        runs += [(variant.skip_ratio, variant.mitigation, variant.label) for variant in self.variants]
        check_option(len(set(runs)) == len(runs), "variants", [r for r in runs if runs.count(r) > 1],
                     "runs the product of skip_ratios and mitigations does not hold already, each once")
        steps = self.base_config(self.models[0], self.datasets[0], self.seeds[0]).rft_steps  # validates every option
        check_option(self.eval.steps is None or self.eval.steps < steps, "eval.steps", self.eval.steps,
                     f"under train.rft_steps={steps} (the last step is evaluated anyway), or null")
        for variant in self.variants:  # and every variant's nesting options
            self.base_config(self.models[0], self.datasets[0], self.seeds[0],
                             {"nesting.skip_ratio": variant.skip_ratio, **variant.overrides()})
        self._check_warm_ups()
        _check_distinct_directories(self, enumerate_instances(self))

    def _check_warm_ups(self) -> None:
        """Warm-ups with distinct labels, each a valid SFT config, in a grid that warms up at all."""
        object.__setattr__(self, "warm_ups", tuple(_warm_up(value) for value in self.warm_ups or ()))
        labels = [warm_up.label for warm_up in self.warm_ups]
        check_option(len(set(labels)) == len(labels), "warm_ups.label", labels, "distinct")
        check_option(not self.warm_ups or self.warm_up, "warm_ups", labels, "given only with train.sft.epochs > 0")
        for warm_up in self.warm_ups:
            try:
                self.base_config(self.models[0], self.datasets[0], self.seeds[0], warm_up.overrides())
            except ConfigError as error:
                raise ConfigError(f"warm_ups {warm_up.label}: {error}") from None

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


def _check_distinct_directories(grid: GridConfig, instances: list[Instance]) -> None:
    """Refuse two instances with one id, so one run directory: ids print x with %g, so skip ratios equal to six
    digits (0.1 and 0.1000001) collide, and the second would be taken for the first, done with its results. Then
    every run's directory (the instances' and their warm-ups') compared as the directory it resolves to: none may
    be another's, or lie inside another's (a label named like a run)."""
    first: dict[str, Instance] = {}
    for instance in instances:
        other = first.setdefault(instance.id, instance)
        if other is not instance:
            raise ConfigError(
                f"two instances share the id {instance.id} (one run directory): skip_ratio {other.skip_ratio!r} "
                f"and {instance.skip_ratio!r} ({instance.mitigation}); make the ratios differ in six digits"
            )
    runs = {instance.id: run_directory(grid, instance) for instance in instances}
    runs.update({instance.sft_id: sft_directory(grid, instance) for instance in instances if grid.warm_up})
    owners: dict[Path, str] = {}
    for run_id, directory in runs.items():
        resolved = Path(os.path.normpath(directory.absolute()))
        clash = next(((other, path) for path, other in owners.items()
                      if path == resolved or path in resolved.parents or resolved in path.parents), None)
        if clash is not None:
            raise ConfigError(f"runs {clash[0]} and {run_id} would share a directory ({clash[1]} and {resolved}, the "
                              "same or one inside the other): rename a warm_ups or variants label")
        owners[resolved] = run_id


def _variant(value: Any) -> Variant:
    return _entry(value, Variant, "variants")


def _warm_up(value: Any) -> WarmUp:
    return _entry(value, WarmUp, "warm_ups")


def _entry(value: Any, cls: type, option: str) -> Any:
    """One entry of a grid's list `option` of `cls` records, from a mapping of its fields."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{option} must be a list of mappings ({fields}), got {value!r}")
    return from_dict(cls, value, f"{option}.")


def load_grid(path: str | os.PathLike) -> GridConfig:
    """Read and validate a grid file; every error is a ConfigError naming the option, before any work."""
    values = read_yaml_mapping(path, "grid file")
    try:
        return from_dict(GridConfig, values)
    except ConfigError as error:
        raise ConfigError(f"grid file {path}: {error}") from None


def _normalise(config: Any, option: str, kind: type) -> None:
    """Make a list option a tuple of `kind` (YAML gives 0 for 0.0), naming the option on a bad element."""
    values = getattr(config, option)
    if values is None:
        return
    if isinstance(values, (str, int, float)):
        values = (values,)
    if any(isinstance(value, bool) for value in values):  # int(True) is 1: `seeds: [true]` would be seed 1
        raise ConfigError(f"{option} must be a list of {kind.__name__}, got {values!r}")
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
    variant: Variant | None = None  # past the paper: its label names the run, its nesting options apply
    warm_up: WarmUp | None = None  # None: the grid's own warm-up (train.sft); else one of warm_ups

    @property
    def group(self) -> str:
        """<model-slug>/<dataset>: the instances a baseline is compared with."""
        return f"{model_slug(self.model)}/{self.dataset}"

    @property
    def name(self) -> str:
        if self.role == "baseline":
            return f"baseline-s{self.seed}"
        label = f"-{self.variant.label}" if self.variant and self.variant.label else ""
        return f"x{self.skip_ratio:g}-b{self.border}-{self.mitigation}{label}-s{self.seed}"

    @property
    def id(self) -> str:
        """Stable and unique in a grid; also the run directory relative to output_dir."""
        return f"{self._warm_up_group}/{self.name}"

    @property
    def sft_id(self) -> str:
        return f"{self._warm_up_group}/sft-s{self.seed}"

    @property
    def _warm_up_group(self) -> str:
        """<model-slug>/<dataset>, and /<label> for a warm-up of `warm_ups`: its warm-ups and instances."""
        return f"{self.group}/{self.warm_up.label}" if self.warm_up else self.group


def enumerate_instances(grid: GridConfig) -> list[Instance]:
    """Per (model, dataset) and warm-up (the grid's own, then `warm_ups`): baselines at every baseline seed, then
    per seed the skip_ratios x mitigations and the variants."""
    instances = []
    for model in grid.models:
        for dataset in grid.datasets:
            for warm_up in (None, *grid.warm_ups):
                for seed in grid.all_baseline_seeds:
                    instances.append(Instance(model, dataset, seed, role="baseline", warm_up=warm_up, **BASELINE))
                for seed in grid.seeds:
                    for ratio in grid.skip_ratios:
                        for mitigation in grid.mitigations:
                            instances.append(Instance(model, dataset, seed, ratio, grid.border, mitigation, "nested",
                                                      warm_up=warm_up))
                    for variant in grid.variants:
                        instances.append(Instance(model, dataset, seed, variant.skip_ratio, grid.border,
                                                  variant.mitigation, "nested", variant, warm_up))
    return instances


def run_directory(grid: GridConfig, instance: Instance) -> Path:
    return grid.root / instance.id


def sft_directory(grid: GridConfig, instance: Instance) -> Path:
    return grid.root / instance.sft_id


def sft_config(grid: GridConfig, instance: Instance) -> TrainConfig:
    """The warm-up shared by `instance`'s (model, dataset, seed): the train options with no ReFT step."""
    overrides = {"output_dir": str(sft_directory(grid, instance)), "rft_steps": 0,
                 "train_problems": None,  # ReFT's pool: the warm-up reads the whole set (one warm-up for every pool)
                 **(instance.warm_up.overrides() if instance.warm_up else {})}
    return grid.base_config(instance.model, instance.dataset, instance.seed, overrides)


def instance_config(grid: GridConfig, instance: Instance) -> TrainConfig:
    """The instance's ReFT run, from the shared SFT model (sft.epochs = 0) when the grid warms up."""
    overrides: dict[str, Any] = {
        "output_dir": str(run_directory(grid, instance)),
        "nesting.skip_ratio": instance.skip_ratio,
        "nesting.border": instance.border,
        "importance.mitigation": instance.mitigation,
        **(instance.variant.overrides() if instance.variant else {}),
    }
    if grid.warm_up:  # no warm-up of its own: its options, which would do nothing, are the defaults
        overrides.update({"model": str(sft_directory(grid, instance) / FINAL_MODEL_DIR), "sft.epochs": 0,
                          "sft.layer_drop": 0.0, "sft.distill_nested": 0.0, "sft.distill_ratio": None})
    return grid.base_config(instance.model, instance.dataset, instance.seed, overrides)


def eval_record(grid: GridConfig) -> dict[str, Any]:
    """The grid's evaluation settings as its instances' status.json records them (JSON types: lists, not tuples),
    so that a finished instance tells which settings its evaluation ran with."""
    return _eval_options(grid.eval)


def _eval_options(settings: EvalSettings) -> dict[str, Any]:
    return json.loads(json.dumps({name: getattr(settings, name) for name in GRID_EVAL_OPTIONS}))


def changed_settings(grid: GridConfig, instance: Instance, saved: TrainConfig | None, evaluated: dict | None
                     ) -> list[str]:
    """What the grid now sets otherwise than the instance's finished run was trained with (`saved`, its
    config.yaml; options of RESUMABLE_OPTIONS, which do not shape a result, aside) and evaluated with
    (`evaluated`, its status's record), as "option: then -> now"; unknown (None) compares as unchanged."""
    changes = [] if saved is None else config_differences(saved, instance_config(grid, instance))
    return changes + _eval_changes(evaluated, eval_record(grid))


def _eval_changes(evaluated: dict | None, now: dict, ignored: tuple[str, ...] = ()) -> list[str]:
    """The evaluation options of `now` that `evaluated` (a status's record) set otherwise, "eval.option: then -> now";
    None (unknown) compares as unchanged."""
    if evaluated is None:
        return []
    # Records written before EvalSettings filled in its defaults hold None for an option left at its default.
    defaults = _eval_options(GridEvalSettings())
    return [f"eval.{name}: {evaluated.get(name)!r} -> {now[name]!r}" for name in sorted(now) if name not in ignored
            and (defaults[name] if evaluated.get(name) is None else evaluated.get(name)) != now[name]]


OUTPUT_DIR = "$output_dir"  # how run settings write a path under the grid's output_dir (`run_settings`)


def run_settings(run_id: str, config: TrainConfig, evaluated: dict | None) -> dict[str, Any]:
    """What the run `run_id` is, as a results directory records it for `--merge` to compare (`settings_differences`):
    its train options `config`, dotted, outside RESUMABLE_OPTIONS (where files are, how the run was logged), a model
    under its grid's output_dir (the run directory, config.output_dir, less `run_id`) written from there
    ($output_dir/...: another machine's output_dir compares equal), and its evaluation's options `evaluated` (its
    status's record)."""
    options = {name: value for name, value in flat_options(to_dict(config)).items() if name not in RESUMABLE_OPTIONS}
    directory, model = os.path.normpath(config.output_dir), os.path.normpath(options["model"])
    root = directory[: -len(os.path.normpath(run_id))] if directory.endswith(os.sep + os.path.normpath(run_id)) else None
    if root and model.startswith(root):
        options["model"] = f"{OUTPUT_DIR}/{Path(model[len(root):]).as_posix()}"
    return {"train": options, "eval": evaluated}


def settings_differences(recorded: dict, now: dict) -> list[str]:
    """What `now` (`run_settings` of the grid's instance) sets otherwise than `recorded`, "option: then -> now";
    where the data and how many prompts a batch holds are aside (neither changes what an evaluation draws from)."""
    before, after = recorded.get("train") or {}, now["train"]
    changes = [f"{name}: {before.get(name)!r} -> {after.get(name)!r}" for name in sorted(set(before) | set(after))
               if before.get(name) != after.get(name)]
    return changes + _eval_changes(recorded.get("eval"), now["eval"], ignored=("data_dir", "batch_size"))


def select_instances(grid: GridConfig, only: str | None) -> list[Instance]:
    """Every instance, or the one whose id is `only`."""
    instances = enumerate_instances(grid)
    if only is None:
        return instances
    chosen = [instance for instance in instances if instance.id == only.strip("/")]
    if not chosen:
        sample = ", ".join(instance.id for instance in instances[:3])
        raise ConfigError(f"--only {only!r} is not an instance of grid {grid.name!r} (ids look like: {sample}, ...)")
    return chosen
