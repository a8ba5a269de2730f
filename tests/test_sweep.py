"""sweep: grid validation, instance enumeration, scheduler commands, skip/retry/isolate logic, one real sweep."""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import multiprocessing
import os
import shlex
import sys
import weakref
from pathlib import Path

import pytest
import yaml

from nested_reft.experiments import sweep
from nested_reft.cli import main
from nested_reft.config import ConfigError, save_config
from nested_reft.evaluation.evaluate import DEFAULT_BENCHMARKS, EvalConfig, evaluate_model
from nested_reft.experiments.grid import (
    EvalSettings, GridConfig, changed_settings, enumerate_instances, eval_record, instance_config, load_grid,
    run_directory, sft_config,
)
from nested_reft.experiments.results import STEP_COLUMNS, ResultsError
from nested_reft.training.rundir import CONFIG_FILE
from nested_reft.experiments.collect import collect_results
from nested_reft.experiments.report import write_report
from nested_reft.experiments.step_evals import StepEvaluator, curve_rows, step_eval_directory
from nested_reft.experiments.sweep import read_status, run_sweep, sweep_main

REPO = Path(__file__).resolve().parents[1]


def write_grid(tmp_path: Path, **options) -> Path:
    values = {"name": "test", "output_dir": str(tmp_path / "sweep"), "models": ["tiny-llama"],
              "datasets": ["arithmetic"], "skip_ratios": [0.2], "mitigations": ["retrace"],
              "train": {"sft": {"epochs": 1}}, "eval": {"benchmarks": ["arithmetic"], "limit": 2}}
    values.update(options)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ----------------------------------------------------------------------------------------------------------
# Validation and enumeration
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, named",
    [
        ({"skip_ratio": [0.1]}, "skip_ratio"),  # typo of skip_ratios
        ({"eval": {"benchmarks": ["arithmetic"], "limt": 3}}, "eval.limt"),
        ({"train": {"grpo": {"num_generatons": 2}}}, "grpo.num_generatons"),
        ({"train": {"sampling.max_new_token": 2}}, "sampling.max_new_token"),
        ({"datasets": ["arithmetc"]}, "arithmetc"),
        ({"mitigations": ["retrace", "retrace-lambda"]}, "retrace-lambda"),
        ({"eval": {"benchmarks": ["aime2024"]}}, "aime2024"),
        ({"skip_ratios": [1.5]}, "skip_ratios"),
        ({"train": {"nesting": {"skip_ratio": 0.1}}}, "train.nesting.skip_ratio"),
        ({"train": {"grpo": {"num_generations": 1}}}, "grpo.num_generations"),
        ({"train": {"sampling": {"max_new_tokens": 4, "min_new_tokens": 8}}}, "min_new_tokens"),
        ({"eval": {"benchmarks": ["arithmetic"], "top_p": 0}}, "top_p"),
        ({"eval": {"benchmarks": ["arithmetic"], "max_new_tokens": 0}}, "max_new_tokens"),
        ({"eval": {"benchmarks": ["arithmetic"], "limit": 0}}, "eval.limit"),
        ({"eval": {"benchmarks": ["arithmetic"], "steps": 0}}, "eval.steps"),
        ({"eval": {"benchmarks": ["arithmetic"], "steps": 1.5}}, "eval.steps"),
        ({"eval": {"benchmarks": ["arithmetic"], "steps": 16}, "train": {"rft_steps": 16}}, "eval.steps"),
        ({"eval": {"benchmarks": ["arithmetic", "arithmetic"]}}, "eval.benchmarks"),
        ({"eval": {"benchmarks": ["arithmetic"], "seed": 3}}, "eval.seed"),  # each instance's own
        ({"eval": {"benchmarks": ["arithmetic"], "engine": "compiled"}}, "eval.engine"),
        ({"warm_ups": [{"label": "a", "sft": {"layer_drop": 0.1}}] * 2}, "warm_ups.label"),
        ({"warm_ups": [{"label": "a/b", "sft": {"layer_drop": 0.1}}]}, "warm_ups.label"),
        ({"warm_ups": [{"label": "a", "sft": {}}]}, "warm_ups.sft"),
        ({"warm_ups": [{"label": "a", "sft": {"layer_dorp": 0.1}}]}, "sft.layer_dorp"),
        ({"warm_ups": [{"label": "a", "sft": {"distill_nested": 1.0}}]}, "sft.distill_ratio"),  # x = 0 in a warm-up
        ({"warm_ups": [{"label": "a", "sft": {"layer_drop": 0.1}}], "train": {"sft": {"epochs": 0}}}, "warm_ups"),
    ],
)
def test_bad_grid_is_rejected_naming_the_option(tmp_path, options, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_grid(write_grid(tmp_path, **options))


def test_eval_settings_fill_in_the_eval_config_defaults():
    config = EvalSettings(benchmarks=("arithmetic",), max_new_tokens=8).config(seed=3)
    assert config == EvalConfig(max_new_tokens=8, seed=3)  # temperature 0.6 and top-p 0.95: the paper's
    assert EvalSettings().benchmarks == DEFAULT_BENCHMARKS
    assert EvalSettings(temperature=None, benchmarks=None, limit=None) == EvalSettings()  # null: the default


def test_an_eval_record_that_left_an_option_at_its_default_as_null_is_unchanged(tmp_path):
    grid = load_grid(write_grid(tmp_path, eval={"benchmarks": ["arithmetic"], "limit": 2, "temperature": 0.6}))
    (instance,) = [instance for instance in enumerate_instances(grid) if instance.skip_ratio == 0]
    record = {**eval_record(grid), "temperature": None, "top_p": None, "max_new_tokens": None, "batch_size": None}
    assert changed_settings(grid, instance, None, record) == []
    assert changed_settings(grid, instance, None, {**record, "limit": None}) == ["eval.limit: None -> 2"]


@pytest.mark.parametrize("benchmarks", ["arithmetic,gsm8k", ["arithmetic, gsm8k"], ["arithmetic", "gsm8k"]])
def test_eval_benchmarks_are_listed_with_commas_or_as_a_list(tmp_path, benchmarks):
    grid = load_grid(write_grid(tmp_path, eval={"benchmarks": benchmarks}))
    assert grid.eval.benchmarks == ("arithmetic", "gsm8k")
    with pytest.raises(ConfigError, match=r"eval\.benchmarks"):
        load_grid(write_grid(tmp_path, eval={"benchmarks": "arithmetic,gsm8k,arithmetic"}))


def test_missing_required_option_is_named(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "datasets": ["gsm8k"]}))
    with pytest.raises(ConfigError, match="models"):
        load_grid(path)


def test_paper_defaults_give_one_baseline_and_twelve_instances():
    grid = GridConfig(name="paper", models=("Qwen/Qwen2.5-Math-1.5B-Instruct",), datasets=("gsm8k",))
    instances = enumerate_instances(grid)
    assert len(instances) == 13
    baselines = [i for i in instances if i.role == "baseline"]
    assert [(b.skip_ratio, b.border, b.mitigation) for b in baselines] == [(0.0, 0, "base")]
    nested = {(i.skip_ratio, i.border, i.mitigation) for i in instances if i.role == "nested"}
    assert nested == {(x, 1, m) for x in (0.0, 0.05, 0.10, 0.15) for m in ("base", "practical", "retrace")}
    assert len({i.id for i in instances}) == 13
    assert instances[0].id == "qwen2.5-math-1.5b-instruct/gsm8k/baseline-s0"
    assert "qwen2.5-math-1.5b-instruct/gsm8k/x0.05-b1-practical-s0" in {i.id for i in instances}


def test_extra_baseline_seeds_and_seeds_multiply():
    grid = GridConfig(name="g", models=("a", "b"), datasets=("gsm8k", "svamp", "math12k"), seeds=(0, 1),
                      baseline_seeds=(1, 2, 3))
    instances = enumerate_instances(grid)
    assert len(instances) == 2 * 3 * (4 + 2 * 12)  # baselines at seeds 0-3, 12 instances per seed
    group = [i for i in instances if i.group == "a/gsm8k" and i.role == "baseline"]
    assert [i.seed for i in group] == [0, 1, 2, 3]


def test_shipped_grids_load():
    paper = load_grid(REPO / "configs" / "grids" / "paper.yaml")
    assert len(enumerate_instances(paper)) == 78
    config = instance_config(paper, enumerate_instances(paper)[5])
    assert (config.rft_steps, config.batch_size, config.grpo.num_generations, config.dtype) == (99, 16, 8, "bfloat16")
    assert config.sampling.min_new_tokens == config.sampling.max_new_tokens == 256
    assert config.sft.epochs == 0 and config.model.endswith("sft-s0/model")
    assert sft_config(paper, enumerate_instances(paper)[5]).sft.epochs == 2
    assert (paper.eval.temperature, paper.eval.top_p) == (0.6, 0.95)
    assert paper.eval.benchmarks == ("aime24", "amc", "math500", "minerva", "olympiadbench")
    cpu = load_grid(REPO / "configs" / "grids" / "smollm2-cpu.yaml")
    assert len(enumerate_instances(cpu)) == 2 * (2 + 12)
    assert cpu.eval.limit >= 300


def test_the_nested_warm_up_study_repeats_its_instances_from_each_warm_up_at_the_first_studys_budget():
    grid = load_grid(REPO / "configs" / "grids" / "study-nested-warmup.yaml")
    instances = enumerate_instances(grid)
    group = "smollm2-135m-instruct/arithmetic"
    runs = ("baseline", "x0.05-b1-retrace", "x0.15-b1-retrace", "x0.3-b1-retrace", "x0.3-b1-retrace-kl-target")
    expected = {f"{group}/{prefix}{run}-s{seed}" for prefix in ("", "distill-256/") for run in runs
                for seed in range(5)}
    assert len(instances) == len(expected) == 50 and {i.id for i in instances} == expected
    assert len({i.sft_id for i in instances}) == 10  # one warm-up per seed and label
    by_label = {i.warm_up.label if i.warm_up else "plain": i for i in instances if i.seed == 1}
    sft = {label: sft_config(grid, instance).sft for label, instance in by_label.items()}
    assert (sft["plain"].layer_drop, sft["plain"].distill_nested, sft["plain"].max_examples) == (0.0, 0.0, 64)
    distill = sft["distill-256"]
    assert (distill.distill_nested, distill.nested_ratio(0.0), distill.max_examples) == (1.0, 0.15, 256)
    config = instance_config(grid, by_label["distill-256"])
    assert config.model.endswith(f"{group}/distill-256/sft-s1/model") and config.sft.epochs == 0
    first = load_grid(REPO / "configs" / "grids" / "study-smollm2.yaml")
    assert grid.train == first.train and grid.eval == first.eval  # the same calibrated task and ReFT budget


def test_a_grid_runs_its_instances_over_a_fixed_pool_of_problems_with_rollout_selection(tmp_path):
    """Several epochs over a fixed set (issue 32): train_problems and the selection options pass through `train:`."""
    grid = load_grid(write_grid(tmp_path, train={"train_problems": 16, "sft": {"epochs": 1},
                                                 "grpo": {"filter_groups": True, "generation_batch_size": 4},
                                                 "sampling": {"skip_predictable": True}}))
    instance = enumerate_instances(grid)[1]
    config = instance_config(grid, instance)
    assert config.train_problems == 16 and config.grpo.filter_groups and config.grpo.generation_batch_size == 4
    assert config.sampling.skip_predictable
    assert sft_config(grid, instance).train_problems is None  # the warm-up reads the whole set


def test_emit_commands_one_per_instance(tmp_path):
    grid_path = write_grid(tmp_path, skip_ratios=[0.1, 0.2], mitigations=["base", "retrace"])
    jobs = tmp_path / "jobs.txt"
    assert main(["sweep", str(grid_path), "--emit-commands", str(jobs)]) == 0
    lines = jobs.read_text().splitlines()
    ids = [i.id for i in enumerate_instances(load_grid(grid_path))]
    assert len(lines) == len(ids) == 5
    for line, instance_id in zip(lines, ids):
        words = shlex.split(line)
        assert words[:3] == ["cd", str(Path.cwd()), "&&"] and words[4:7] == ["-m", "nested_reft.cli", "sweep"]
        assert words[7] == str(grid_path.resolve()) and words[-2:] == ["--only", instance_id]
    assert not (tmp_path / "sweep").exists()  # nothing ran


# ----------------------------------------------------------------------------------------------------------
# Skip finished, retry failed, isolate failures (train and evaluation replaced by instant fakes)
# ----------------------------------------------------------------------------------------------------------


class FakeRuns:
    """Instant stand-ins for training and evaluation that record their calls and can be told to fail."""

    def __init__(self, monkeypatch):
        self.trained: list[str] = []
        self.evaluated: list[str] = []
        self.fail_train: set[str] = set()
        monkeypatch.setattr(sweep, "ensure_trained", self.train)
        monkeypatch.setattr(sweep, "evaluate_instance", self.evaluate)

    def train(self, config, callbacks=()):
        """As `ensure_trained`: a finished run is returned as it is, without training."""
        output = Path(config.output_dir)
        if (output / "summary.json").is_file() and (output / "model").is_dir():
            return json.loads((output / "summary.json").read_text())
        self.trained.append(output.name)
        if output.name in self.fail_train:
            raise RuntimeError(f"boom in {output.name}")
        if config.rft_steps > 0:
            assert config.sft.epochs == 0 and config.model.endswith(f"sft-s{config.seed}/model")
        (output / "model").mkdir(parents=True, exist_ok=True)
        save_config(config, output / CONFIG_FILE)  # as the trainer does
        summary = {"token_speed": 100.0 * (1 + config.nesting.skip_ratio), "total_runtime_s": 10.0}
        (output / "summary.json").write_text(json.dumps(summary))
        return summary

    def evaluate(self, model_dir, output_dir, settings, train_config, seed):
        self.evaluated.append(Path(output_dir).parent.name)
        result = {"benchmarks": {name: {"accuracy": 0.25, "n": 4} for name in settings.benchmarks}, "average": 0.25}
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "eval.json").write_text(json.dumps(result))
        return result


def results(grid) -> dict[str, dict]:
    with (grid.root / "results.csv").open() as stream:
        return {row["instance"].rsplit("/", 1)[1]: row for row in csv.DictReader(stream)}


def test_skip_done_retry_failed_and_one_failure_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    fake = FakeRuns(monkeypatch)
    grid_path = write_grid(tmp_path, skip_ratios=[0.1, 0.2], mitigations=["base", "retrace"], baseline_seeds=[0, 1])
    grid = load_grid(grid_path)
    fake.fail_train = {"x0.1-b1-retrace-s0"}

    assert sweep_main(str(grid_path), log=lambda line: None) == 1
    assert "x0.1-b1-retrace-s0: RuntimeError: boom" in capsys.readouterr().err
    assert fake.trained.count("sft-s0") == 1 and fake.trained.count("sft-s1") == 1  # one warm-up per seed, shared
    table = results(grid)
    assert len(table) == 6
    assert table["x0.1-b1-retrace-s0"]["status"] == "failed" and "boom" in table["x0.1-b1-retrace-s0"]["error"]
    assert table["x0.1-b1-retrace-s0"]["accuracy"] == ""
    done = [name for name, row in table.items() if row["status"] == "done"]
    assert len(done) == 5  # the instance after the failure ran too
    assert table["x0.2-b1-base-s0"]["accuracy_arithmetic"] == "0.25"
    assert float(table["x0.2-b1-base-s0"]["token_speed"]) == pytest.approx(120.0)
    failed = grid.root / "tiny-llama" / "arithmetic" / "x0.1-b1-retrace-s0"
    status = read_status(failed)
    assert status["status"] == "failed" and "Traceback" in status["traceback"] and status["attempts"] == 1

    fake.trained.clear(), fake.evaluated.clear()
    fake.fail_train = set()
    assert sweep_main(str(grid_path), log=lambda line: None) == 0
    assert fake.trained == ["x0.1-b1-retrace-s0"]  # only the failed one; its warm-up is done
    assert fake.evaluated == ["x0.1-b1-retrace-s0"]
    assert {row["status"] for row in results(grid).values()} == {"done"}
    status = read_status(failed)
    assert status["attempts"] == 2 and status["error"] is None and status["finished_at"]


class Cycle:
    """A reference cycle: freed by a collection only, never by reference counting."""

    def __init__(self):
        self.me = self


def test_each_instance_s_garbage_is_collected_before_the_next_starts_and_the_collector_is_left_as_found(
        tmp_path, monkeypatch):
    fake = FakeRuns(monkeypatch)
    grid_path = write_grid(tmp_path, skip_ratios=[0.1, 0.2], mitigations=["retrace"])
    left_behind: list[weakref.ref] = []
    fake.fail_train = {"x0.2-b1-retrace-s0"}

    def train_leaving_a_cycle(config, callbacks=()):
        if config.rft_steps > 0:  # an instance's own run (its warm-up is trained within the same instance)
            assert all(ref() is None for ref in left_behind), "the last instance's garbage outlived it"
            left_behind.append(weakref.ref(Cycle()))
        return FakeRuns.train(fake, config, callbacks)

    monkeypatch.setattr(sweep, "ensure_trained", train_leaving_a_cycle)
    automatic = gc.isenabled()
    gc.disable()  # so that only the sweep's own collections free the cycles
    try:
        assert sweep_main(str(grid_path), log=lambda line: None) == 1  # one failed instance: the sweep goes on
    finally:
        if automatic:
            gc.enable()
    assert len(left_behind) == 3 and left_behind[-1]() is None  # the baseline and the two nested runs
    assert gc.get_freeze_count() == 0  # nothing the sweep froze stays out of later collections


def test_a_done_instance_the_grid_now_sets_otherwise_is_kept_and_the_change_named(tmp_path, monkeypatch):
    FakeRuns(monkeypatch)
    grid_path = write_grid(tmp_path)
    assert sweep_main(str(grid_path), log=lambda line: None) == 0
    lines: list[str] = []
    assert sweep_main(str(grid_path), log=lines.append) == 0
    assert not any(line.startswith("warning") for line in lines)  # the same grid: nothing changed

    changed = yaml.safe_load(grid_path.read_text())
    changed["train"].update({"save_steps": 7, "grpo": {"learning_rate": 3e-6}})  # save_steps shapes no result
    changed["eval"]["limit"] = 3
    grid_path.write_text(yaml.safe_dump(changed))
    lines.clear()
    assert sweep_main(str(grid_path), log=lines.append) == 0
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 2  # the baseline and the nested instance, neither rerun
    assert all("grpo.learning_rate: 1e-06 -> 3e-06" in line and "eval.limit: 2 -> 3" in line
               and "save_steps" not in line for line in warnings)

    saved = run_directory(load_grid(grid_path), enumerate_instances(load_grid(grid_path))[0]) / CONFIG_FILE
    saved.write_text(saved.read_text() + "an_option_since_removed: 1\n")  # written by another version
    lines.clear()
    assert sweep_main(str(grid_path), log=lines.append) == 0
    assert any("no longer loads" in line and "an_option_since_removed" in line for line in lines)


def test_evaluation_failure_is_retried_without_retraining(tmp_path, monkeypatch):
    fake = FakeRuns(monkeypatch)
    grid = load_grid(write_grid(tmp_path))
    calls = {"n": 0}
    evaluate = fake.evaluate

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        return evaluate(*args)

    monkeypatch.setattr(sweep, "evaluate_instance", flaky)
    outcome = run_sweep(grid, log=lambda line: None)
    assert list(outcome.failed) == ["tiny-llama/arithmetic/baseline-s0"] and len(outcome.ran) == 1
    fake.trained.clear()
    outcome = run_sweep(grid, log=lambda line: None)
    assert outcome.ran == ["tiny-llama/arithmetic/baseline-s0"] and fake.trained == []


def test_failed_warm_up_fails_its_instances_once(tmp_path, monkeypatch):
    fake = FakeRuns(monkeypatch)
    fake.fail_train = {"sft-s0"}
    grid = load_grid(write_grid(tmp_path, mitigations=["base", "retrace"]))
    outcome = run_sweep(grid, log=lambda line: None)
    assert len(outcome.failed) == 3 and all("SFT" in e or "boom" in e for e in outcome.failed.values())
    assert fake.trained == ["sft-s0"]  # not retried for every instance
    assert read_status(grid.root / "tiny-llama" / "arithmetic" / "sft-s0")["status"] == "failed"


def test_only_runs_one_instance_and_its_warm_up(tmp_path, monkeypatch):
    fake = FakeRuns(monkeypatch)
    grid_path = write_grid(tmp_path, mitigations=["base", "retrace"])
    target = "tiny-llama/arithmetic/x0.2-b1-base-s0"
    assert main(["sweep", str(grid_path), "--only", target]) == 0
    assert fake.trained == ["sft-s0", "x0.2-b1-base-s0"]
    table = results(load_grid(grid_path))
    assert table["x0.2-b1-base-s0"]["status"] == "done" and table["baseline-s0"]["status"] == "pending"
    assert main(["sweep", str(grid_path), "--only", "tiny-llama/arithmetic/nope"]) == 2


def test_keep_models_false_deletes_each_run_model_once_evaluated_and_keeps_the_warm_up(tmp_path, monkeypatch):
    fake = FakeRuns(monkeypatch)
    grid = load_grid(write_grid(tmp_path, keep_models=False))
    assert not run_sweep(grid, log=lambda line: None).failed
    assert sorted(fake.evaluated) == ["baseline-s0", "x0.2-b1-retrace-s0"]  # evaluated before the deletion
    for instance in enumerate_instances(grid):
        directory = run_directory(grid, instance)
        assert read_status(directory)["status"] == "done" and not (directory / "model").exists()
        assert (directory / "eval" / "eval.json").is_file() and (directory / "summary.json").is_file()
    assert (grid.root / "tiny-llama" / "arithmetic" / "sft-s0" / "model").is_dir()  # the instances start from it
    fake.trained.clear()
    assert run_sweep(grid, log=lambda line: None).skipped and fake.trained == []  # done without its model: not rerun


def test_a_study_recorded_elsewhere_continues_on_a_fresh_checkout(tmp_path, monkeypatch):
    """--merge: instances done in a recorded results directory are not run or emitted again, and their rows (results,
    steps, problems, their warm-ups' problems) are merged as written; the instances not done there run here."""
    fake = FakeRuns(monkeypatch)
    grid_path = write_grid(tmp_path, skip_ratios=[0.1, 0.2], evaluate_warm_up=True)
    grid = load_grid(grid_path)
    fake.fail_train = {"x0.2-b1-retrace-s0"}
    run_sweep(grid, log=lambda line: None)
    record = tmp_path / "record"  # a study's docs directory: the tables a session committed
    record.mkdir()
    group = "tiny-llama/arithmetic"
    with (grid.root / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        row["accuracy"] = "0.7500" if row["instance"] == f"{group}/baseline-s0" else row["accuracy"]
    with (record / "results.csv").open("w") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader(), writer.writerows(rows)
    other_columns = "," * (len(STEP_COLUMNS) - 3)  # the steps' other columns, empty: not measured
    (record / "steps.csv").write_text(",".join(STEP_COLUMNS) + "\n" f"{group}/baseline-s0,1,0.5{other_columns}\n"
                                      f"{group}/x0.2-b1-retrace-s0,1,0.9{other_columns}\n")
    (record / "problems.csv").write_text("instance,benchmark,problem,correct\n"
                                         f"{group}/baseline-s0,arithmetic,p1,1\n{group}/sft-s0,arithmetic,p1,0\n"
                                         f"{group}/x0.2-b1-retrace-s0,arithmetic,p1,1\n")
    fresh = tmp_path / "fresh"  # the next session's checkout: no runs/
    fresh.mkdir()
    grid_path = write_grid(fresh, skip_ratios=[0.1, 0.2], evaluate_warm_up=True)
    grid = load_grid(grid_path)

    jobs = fresh / "jobs.txt"
    assert main(["sweep", str(grid_path), "--emit-commands", str(jobs), "--merge", str(record)]) == 0
    (line,) = jobs.read_text().splitlines()
    assert shlex.split(line)[-4:] == ["--merge", str(record.resolve()), "--only", f"{group}/x0.2-b1-retrace-s0"]

    assert main(["sweep", str(grid_path), "--collect", "--merge", str(record)]) == 0  # nothing run yet
    assert {name: row["status"] for name, row in results(grid).items()} == {
        "baseline-s0": "done", "x0.1-b1-retrace-s0": "done", "x0.2-b1-retrace-s0": "pending"}

    fake.trained.clear(), fake.evaluated.clear()
    fake.fail_train = set()
    outcome = run_sweep(grid, log=lambda line: None, recorded=record)
    assert outcome.ran == [f"{group}/x0.2-b1-retrace-s0"] and len(outcome.skipped) == 2
    assert fake.trained == ["sft-s0", "x0.2-b1-retrace-s0"] and fake.evaluated == ["sft-s0", "x0.2-b1-retrace-s0"]
    table = results(grid)
    assert {row["status"] for row in table.values()} == {"done"}
    assert table["baseline-s0"]["accuracy"] == "0.7500"  # the recorded cell as written
    assert table["x0.2-b1-retrace-s0"]["accuracy"] == "0.25"  # measured here
    with (grid.root / "steps.csv").open() as stream:  # the failed run's recorded steps are not taken
        assert [(row["instance"], row["reward_mean"]) for row in csv.DictReader(stream)] == [
            (f"{group}/baseline-s0", "0.5")]
    with (grid.root / "problems.csv").open() as stream:
        assert sorted((row["instance"], row["correct"]) for row in csv.DictReader(stream)) == [
            (f"{group}/baseline-s0", "1"), (f"{group}/sft-s0", "0")]


def test_a_record_that_is_missing_or_of_another_grid_is_refused_naming_it(tmp_path, monkeypatch):
    FakeRuns(monkeypatch)
    grid_path = write_grid(tmp_path, skip_ratios=[0.1, 0.2])
    with pytest.raises(ResultsError, match=r"nowhere/results.csv does not exist"):
        sweep_main(str(grid_path), collect=True, merge=str(tmp_path / "nowhere"), log=lambda line: None)
    run_sweep(load_grid(grid_path), log=lambda line: None)
    record = tmp_path / "sweep"
    (tmp_path / "other").mkdir()
    smaller = write_grid(tmp_path / "other", skip_ratios=[0.1])
    with pytest.raises(ResultsError, match=r"records instance\(s\) the grid does not have \(tiny-llama/arithmetic/x0.2"):
        sweep_main(str(smaller), collect=True, merge=str(record), log=lambda line: None)
    other_benchmarks = write_grid(tmp_path / "other", skip_ratios=[0.1, 0.2], eval={"benchmarks": ["svamp"]})
    with pytest.raises(ResultsError, match=r"lacks column\(s\) accuracy_svamp"):
        sweep_main(str(other_benchmarks), collect=True, merge=str(record), log=lambda line: None)


def test_each_warm_up_trains_once_per_seed_and_its_instances_start_from_its_model(tmp_path, monkeypatch):
    trained = []
    fake = FakeRuns(monkeypatch)
    monkeypatch.setattr(sweep, "ensure_trained", lambda config, callbacks=(): (
        trained.append((Path(config.output_dir).relative_to(tmp_path / "sweep").as_posix(), config.model,
                        config.sft.layer_drop if config.rft_steps == 0 else None)),
        fake.train(config))[1])
    grid = load_grid(write_grid(tmp_path, warm_ups=[{"label": "drop", "sft": {"layer_drop": 0.3}}]))
    assert not run_sweep(grid, log=lambda line: None).failed
    runs = {path: (model, layer_drop) for path, model, layer_drop in trained}
    group = "tiny-llama/arithmetic"
    assert runs[f"{group}/sft-s0"] == ("tiny-llama", 0.0) and runs[f"{group}/drop/sft-s0"] == ("tiny-llama", 0.3)
    for prefix in ("", "drop/"):
        for run in ("baseline-s0", "x0.2-b1-retrace-s0"):
            assert runs[f"{group}/{prefix}{run}"][0] == str(tmp_path / "sweep" / group / f"{prefix}sft-s0" / "model")
    assert len(trained) == 6  # 2 warm-ups, each once, and 2 runs from each
    with (grid.root / "results.csv").open() as stream:
        assert {row["instance"] for row in csv.DictReader(stream)} == {
            f"{group}/baseline-s0", f"{group}/x0.2-b1-retrace-s0", f"{group}/drop/baseline-s0",
            f"{group}/drop/x0.2-b1-retrace-s0"}


def test_no_warm_up_when_sft_epochs_is_zero(tmp_path, monkeypatch):
    fake = FakeRuns(monkeypatch)
    monkeypatch.setattr(FakeRuns, "train", lambda self, config, callbacks=(): (
        self.trained.append((config.model, config.sft.epochs)),
        (Path(config.output_dir) / "model").mkdir(parents=True),
        (Path(config.output_dir) / "summary.json").write_text("{}"),
    ))
    monkeypatch.setattr(sweep, "ensure_trained", fake.train)
    grid = load_grid(write_grid(tmp_path, train={"sft": {"epochs": 0}}))
    assert not run_sweep(grid, log=lambda line: None).failed
    assert fake.trained == [("tiny-llama", 0), ("tiny-llama", 0)]


# ----------------------------------------------------------------------------------------------------------
# One writer per grid and per instance, tested with a second process
# ----------------------------------------------------------------------------------------------------------


def test_a_second_sweep_or_a_second_job_of_a_running_instance_is_refused_naming_the_first(
        tmp_path, monkeypatch, capsys):
    """A sweep in a forked process holds its grid and, inside the baseline's training, the baseline. Another
    sweep of the grid and a job of the baseline are refused (exit 2, the holder's pid named); a job of
    another instance runs beside it; in the end every run was trained exactly once."""
    fake = FakeRuns(monkeypatch)
    grid_path = write_grid(tmp_path, mitigations=["base", "retrace"])
    trainings = tmp_path / "trainings.log"
    fork = multiprocessing.get_context("fork")
    inside_baseline, release = fork.Event(), fork.Event()
    test_process = os.getpid()

    def train(config, callbacks=()):
        with trainings.open("a") as log:
            log.write(Path(config.output_dir).name + "\n")
        if Path(config.output_dir).name == "baseline-s0" and os.getpid() != test_process:
            inside_baseline.set()
            assert release.wait(120)
        return fake.train(config)

    monkeypatch.setattr(sweep, "ensure_trained", train)
    first = fork.Process(target=lambda: sys.exit(sweep_main(str(grid_path), log=lambda line: None)))
    first.start()
    try:
        assert inside_baseline.wait(120)
        capsys.readouterr()
        assert main(["sweep", str(grid_path)]) == 2
        assert main(["sweep", str(grid_path), "--only", "tiny-llama/arithmetic/baseline-s0"]) == 2
        refusals = capsys.readouterr().err.splitlines()
        assert len(refusals) == 2 and all(f"pid {first.pid} " in line for line in refusals), refusals
        assert "the sweep of grid 'test'" in refusals[0] and "instance tiny-llama/arithmetic/baseline-s0" in refusals[1]
        assert main(["sweep", str(grid_path), "--only", "tiny-llama/arithmetic/x0.2-b1-base-s0"]) == 0
    finally:
        release.set()
        first.join(120)
    assert first.exitcode == 0
    assert sorted(trainings.read_text().split()) == ["baseline-s0", "sft-s0", "x0.2-b1-base-s0", "x0.2-b1-retrace-s0"]
    assert {row["status"] for row in results(load_grid(grid_path)).values()} == {"done"}


def test_a_whole_grid_sweep_goes_on_past_an_instance_another_process_runs(tmp_path, monkeypatch, capsys):
    fake = FakeRuns(monkeypatch)
    grid = load_grid(write_grid(tmp_path, mitigations=["base", "retrace"]))
    busy = next(instance for instance in enumerate_instances(grid) if instance.name == "x0.2-b1-base-s0")
    fork = multiprocessing.get_context("fork")
    holding, release = fork.Event(), fork.Event()

    def hold_the_instance():
        with sweep.instance_lock(grid, busy):
            holding.set()
            release.wait(120)

    holder = fork.Process(target=hold_the_instance)
    holder.start()
    try:
        assert holding.wait(120)
        assert sweep_main(str(grid.root.parent / "grid.yaml"), log=lambda line: None) == 1
    finally:
        release.set()
        holder.join(120)
    assert fake.trained == ["sft-s0", "baseline-s0", "x0.2-b1-retrace-s0"]
    assert not (run_directory(grid, busy) / "status.json").exists()  # its holder's to write, not this sweep's
    assert f"x0.2-b1-base-s0: instance tiny-llama/arithmetic/x0.2-b1-base-s0 of grid 'test' is in use by pid " \
           f"{holder.pid} " in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# One real sweep: SFT, two trainings, evaluation, results.csv and the report
# ----------------------------------------------------------------------------------------------------------


def test_end_to_end_tiny_sweep(tmp_path, capsys):
    grid_path = write_grid(
        tmp_path,
        train={"rft_steps": 2, "batch_size": 2, "micro_batch_size": 4, "save_steps": 2,
               "grpo": {"num_generations": 2, "learning_rate": 1e-4},
               "sampling": {"max_new_tokens": 8, "min_new_tokens": 8},
               "sft": {"epochs": 1, "max_examples": 4, "batch_size": 2, "max_length": 64}},
        eval={"benchmarks": ["arithmetic"], "limit": 2, "max_new_tokens": 8, "batch_size": 2},
    )
    assert main(["sweep", str(grid_path)]) == 0
    grid = load_grid(grid_path)
    for instance in enumerate_instances(grid):
        directory = run_directory(grid, instance)
        assert read_status(directory)["status"] == "done"
        assert (directory / "model").is_dir() and (directory / "summary.json").is_file()
        assert not list(directory.glob("checkpoint-*"))  # removed once trained (keep_checkpoints: false)
        assert json.loads((directory / "eval" / "eval.json").read_text())["benchmarks"]["arithmetic"]["n"] == 2
    table = results(grid)
    assert set(table) == {"baseline-s0", "x0.2-b1-retrace-s0"}
    for name, row in table.items():  # each number as the run's own files give it
        run = grid.root / "tiny-llama" / "arithmetic" / name
        answers = [json.loads(line) for line in (run / "eval" / "arithmetic.jsonl").read_text().splitlines()]
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        correct_fraction = sum(answer["correct"] for answer in answers) / len(answers)
        assert float(row["accuracy_arithmetic"]) == float(row["accuracy"]) == correct_fraction
        assert float(row["total_runtime_s"]) == pytest.approx(sum(step["step_time_s"] for step in steps))
        tokens = sum(step["tokens_processed"] for step in steps)
        assert float(row["token_speed"]) == pytest.approx(tokens / float(row["total_runtime_s"]))
    capsys.readouterr()
    assert main(["sweep", str(grid_path)]) == 0  # everything done: nothing runs again
    assert "0 run, 2 already done" in capsys.readouterr().out
    assert main(["report", str(grid.root)]) == 0
    assert (grid.root / "report" / "figure1-tiny-llama-arithmetic.png").is_file()
    assert "Table 2" in (grid.root / "report" / "report.md").read_text()


def test_eval_steps_evaluate_the_policy_during_training_as_its_checkpoint_evaluates(tmp_path):
    """eval.steps: the live policy is evaluated after every N-th ReFT step before the last, with the same answers
    as its saved checkpoint gives; curve.csv holds the warm-up's, those and the run's own pass@1 beside the rollout
    FLOPs spent by then."""
    grid_path = write_grid(
        tmp_path, skip_ratios=[0.5], evaluate_warm_up=True, keep_checkpoints=True,
        train={"rft_steps": 3, "batch_size": 2, "micro_batch_size": 4, "save_steps": 1, "save_total_limit": 0,
               "grpo": {"num_generations": 2, "learning_rate": 1e-3},
               "sampling": {"max_new_tokens": 8, "min_new_tokens": 8},
               "sft": {"epochs": 1, "max_examples": 4, "batch_size": 2, "max_length": 64}},
        eval={"benchmarks": ["arithmetic"], "limit": 4, "max_new_tokens": 8, "batch_size": 4, "steps": 2,
              "temperature": 1.0},
    )
    grid = load_grid(grid_path)
    assert not run_sweep(grid, log=lambda line: None).failed
    with (grid.root / "curve.csv").open() as stream:
        curve = list(csv.DictReader(stream))
    for instance in enumerate_instances(grid):
        directory = run_directory(grid, instance)
        assert sorted(path.name for path in (directory / "eval-steps").iterdir()) == ["step-2"]
        during = [json.loads(line) for line in (directory / "eval-steps" / "step-2" / "arithmetic.jsonl").open()]
        evaluate_model(str(directory / "checkpoint-2"), ["arithmetic"], tmp_path / "check" / instance.id,
                       grid.eval.config(instance.seed), limit=4)
        saved = [json.loads(line) for line in (tmp_path / "check" / instance.id / "arithmetic.jsonl").open()]
        assert [r["completion"] for r in during] == [r["completion"] for r in saved]
        steps = [json.loads(line) for line in (directory / "metrics.jsonl").open()]
        evaluations = [directory.parent / f"sft-s{instance.seed}" / "eval", directory / "eval-steps" / "step-2",
                       directory / "eval"]
        expected = [(step, json.loads((path / "eval.json").read_text())["average"],
                     sum(record["rollout_flops"] for record in steps[:step]))
                    for step, path in zip((0, 2, 3), evaluations)]
        rows = [(int(r["step"]), float(r["accuracy"]), float(r["rollout_flops"])) for r in curve
                if r["instance"] == instance.id]
        assert rows == [(step, pytest.approx(accuracy), pytest.approx(flops)) for step, accuracy, flops in expected]
    assert len(curve) == 6  # 3 points each of the 2 runs
    assert "steps" not in read_status(directory)["eval"]  # no setting of the run's own evaluation
    collect_results(grid)  # again, over the tables it wrote: one row per run and step
    report = write_report(grid.root).read_text()
    assert "### Pass@1 against rollout compute" in report and (grid.root / "report" / "cost-tiny-llama-arithmetic.png").is_file()


def test_a_step_evaluation_is_kept_only_when_finished_with_the_grids_settings(tmp_path):
    grid = load_grid(write_grid(tmp_path, train={"rft_steps": 4}, eval={"benchmarks": ["arithmetic"], "limit": 4,
                                                                        "steps": 2}))
    instance = enumerate_instances(grid)[0]
    evaluator = StepEvaluator(run_directory(grid, instance), grid.eval, instance_config(grid, instance), 2)
    output = step_eval_directory(evaluator.run_directory, 2)
    output.mkdir(parents=True)
    done = {"config": dataclasses.asdict(grid.eval.config(instance.seed)), "limit": 4,
            "benchmarks": {"arithmetic": {}}, "average": 0.5}
    assert not evaluator._evaluated(output)  # cut off before eval.json
    (output / "eval.json").write_text(json.dumps(done))
    assert evaluator._evaluated(output)
    (output / "eval.json").write_text(json.dumps({**done, "limit": 8}))
    assert not evaluator._evaluated(output)


def test_the_curve_of_a_run_reads_its_evaluations_and_metrics(tmp_path):
    """Points at step 0, at each evaluation found (an unfinished run's last one included) and after the last step,
    the FLOPs cumulative; none where the metrics are not steps 1..n; None from a step without FLOPs on."""
    run = tmp_path / "run"
    for step, accuracy in ((2, 0.3), (4, 0.4)):
        (step_eval_directory(run, step)).mkdir(parents=True)
        (step_eval_directory(run, step) / "eval.json").write_text(json.dumps({"average": accuracy}))
    (tmp_path / "warm-up.json").write_text(json.dumps({"average": 0.2}))
    steps = [{"step": step, "rollout_flops": 10.0 * step} for step in range(1, 5)]
    rows = curve_rows("r", run, steps, tmp_path / "warm-up.json", run / "eval" / "eval.json")
    assert [(row["step"], row["accuracy"], row["rollout_flops"]) for row in rows] == [
        (0, 0.2, 0.0), (2, 0.3, 30.0), (4, 0.4, 100.0)]
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({"average": 0.5}))
    six = steps + [{"step": 5, "rollout_flops": None}, {"step": 6, "rollout_flops": 1.0}]
    rows = curve_rows("r", run, six, None, run / "eval" / "eval.json")
    assert [(row["step"], row["accuracy"], row["rollout_flops"]) for row in rows] == [
        (2, 0.3, 30.0), (4, 0.4, 100.0), (6, 0.5, None)]
    assert curve_rows("r", run, steps[:2] + steps[3:], None, run / "eval" / "eval.json") == []
