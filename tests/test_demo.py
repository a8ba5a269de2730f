"""The demo on a tiny model: one shared SFT warm-up, a baseline and a Nested-ReFT run, each evaluated on the same
held-out problems before and after, the speedups timed side by side, the table and the plot."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from nested_reft.experiments import demo
from nested_reft.evaluation import evaluate
from nested_reft.training import trainer
from nested_reft.config import ConfigError, ImportanceConfig
from nested_reft.experiments.demo import (
    DemoSettings,
    calibrated_config,
    cut_from_study,
    demo_configs,
    measure_speedups,
    paired_timings,
    run_demo,
    runs,
)
from nested_reft.experiments.grid import enumerate_instances, instance_config, load_grid
from nested_reft.nesting.layers import num_skipped_layers
from nested_reft.training.rundir import CONFIG_FILE, FINAL_MODEL_DIR, METRICS_FILE, SFT_METRICS_FILE
from nested_reft.experiments.stats import bootstrap_delta

REPO = Path(__file__).resolve().parents[1]
STUDY = load_grid(REPO / "configs" / "grids" / "study-smollm2.yaml")
SETTINGS = DemoSettings(steps=2, eval_problems=6, speed_prompts=2, speed_tokens=4, lanes=1)


def scores(eval_dir: Path) -> list[float]:
    """Per-problem pass@1 of an evaluation, from its records file alone, in the held-out order."""
    return [float(json.loads(line)["correct"]) for line in (eval_dir / "arithmetic.jsonl").read_text().splitlines()]


def cells(table: str, label_start: str) -> list[str]:
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {label_start}")]
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


@pytest.mark.parametrize("lanes", [1, 3])  # in this process; in spawned processes side by side (the default)
def test_demo_compares_baseline_and_nested_from_one_warm_up(tmp_path, lanes, capsys):
    table = run_demo(output_dir=tmp_path, model="tiny-llama", settings=dataclasses.replace(SETTINGS, lanes=lanes))

    assert (tmp_path / "comparison.md").read_text() == table
    assert table in capsys.readouterr().out
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert [path.parent.name for path in tmp_path.rglob(SFT_METRICS_FILE)] == ["sft"]  # one SFT warm-up, shared
    shared = str(tmp_path / "sft" / FINAL_MODEL_DIR)
    for name, (nesting, importance) in runs(SETTINGS).items():
        config = yaml.safe_load((tmp_path / name / CONFIG_FILE).read_text())
        assert config["model"] == shared and config["sft"]["epochs"] == 0 and config["seed"] == 0
        assert config["nesting"] == dataclasses.asdict(nesting)
        assert config["importance"] == dataclasses.asdict(importance)
        assert config["rft_steps"] == 2
    assert cells(table, "|") == ["baseline (x = 0)", "nested (x = 15%, uniform, retrace)"]  # the header

    before = scores(tmp_path / "eval-warm-up")
    assert len(before) == SETTINGS.eval_problems
    assert cells(table, "pass@1 of the warm-up") == [f"{100 * statistics.fmean(before):.1f}%"] * 2
    for column, name in enumerate(("baseline", "nested")):
        after = scores(tmp_path / name / "eval")
        assert cells(table, "pass@1 after 2 ReFT steps")[column] == f"{100 * statistics.fmean(after):.1f}%"
        gain = bootstrap_delta([after], [before])  # paired over the same problems
        assert cells(table, "gain, points")[column] == (
            f"{100 * gain.mean:+.1f} [{100 * gain.low:+.1f}, {100 * gain.high:+.1f}]")
        steps = [json.loads(line) for line in (tmp_path / name / METRICS_FILE).read_text().splitlines()]
        assert cells(table, "batch reward")[column] == f"{statistics.fmean(s['reward_mean'] for s in steps):.3f}"
        assert cells(table, "rollout TFLOPs")[column] == f"{sum(s['rollout_flops'] for s in steps) / 1e12:.2f}"
    cost = bootstrap_delta([scores(tmp_path / "nested" / "eval")], [scores(tmp_path / "baseline" / "eval")])
    assert cells(table, "against the baseline") == ["", f"{100 * cost.mean:+.1f} [{100 * cost.low:+.1f}, "
                                                        f"{100 * cost.high:+.1f}]"]
    nested_steps = [json.loads(line) for line in (tmp_path / "nested" / METRICS_FILE).read_text().splitlines()]
    assert {step["skipped_layers"] for step in nested_steps} == {num_skipped_layers(6, 0.15)}  # uniform: U_x, always
    assert cells(table, "layers skipped per step") == ["0", "1.00"]
    assert float(cells(table, "rollout speedup of the run's 2 skip sets")[1]) > 0  # each step's set, timed
    assert "rollout speedup at U_x" not in table  # a uniform run's own skip sets are the draws at the bound


def test_a_rerun_of_the_demo_resumes_without_training_or_evaluating_again(tmp_path, monkeypatch):
    first = run_demo(output_dir=tmp_path, model="tiny-llama", settings=SETTINGS)
    monkeypatch.setattr(trainer, "_train_model", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(evaluate, "generate_rollouts", lambda *a, **k: pytest.fail("a finished evaluation ran again"))
    second = run_demo(output_dir=tmp_path, model="tiny-llama", settings=SETTINGS)
    strip_speed = lambda table: [line for line in table.splitlines() if "speedup" not in line]  # noqa: E731
    assert strip_speed(second) == strip_speed(first)  # the speedups are timed afresh, the rest is read back


def test_paired_timings_time_each_skip_set_against_the_full_model(monkeypatch):
    """(t(full), t(nested)) of fixed-length rollouts, after one untimed warm-up, the order alternating."""
    calls = []

    def rollouts(model, tokenizer, prompts, generations, sampling, skip_set, generator):
        calls.append((tuple(skip_set), generations, sampling.min_new_tokens, sampling.max_new_tokens))
        return SimpleNamespace(generation_time_s=10.0 - len(skip_set))  # each skipped layer saves 1 s of 10

    monkeypatch.setattr(demo, "generate_rollouts", rollouts)
    pairs = paired_timings(None, None, ["1 + 1 ="], [(), (1,), (1, 2)], tokens=3)
    assert pairs == [(1.0, 1.0), (10.0, 9.0), (10.0, 8.0)]  # nothing skipped: a speedup of 1, not timed
    assert [call[0] for call in calls] == [(), (1,), (), (), (1, 2)]  # warm-up; nested first, then full first
    assert {call[1:] for call in calls} == {(1, 3, 3)}  # one completion per prompt, EOS banned to the end


def study_run(name: str):
    """The TrainConfig of the study's instance `name` (e.g. x0.15-b1-retrace-s0)."""
    (instance,) = [instance for instance in enumerate_instances(STUDY) if instance.name == name]
    return instance_config(STUDY, instance)


def test_the_demos_nested_run_is_the_papers_uniform_skip_sets_at_15_percent_with_retrace():
    """Issue 22: the demo shows a nested run that saves (the paper's f_{x,b}, x = 15%, border 1, retrace at the
    default lambda) beside the baseline, each the study's seed-0 instance, both from the shared warm-up."""
    warm_up, arms = demo_configs(Path("out"), "smollm2-135m-instruct", DemoSettings())
    nested = arms["nested"]
    assert (nested.nesting.skip_policy, nested.nesting.skip_ratio, nested.nesting.border) == ("uniform", 0.15, 1)
    assert nested.importance == ImportanceConfig(mitigation="retrace")  # lambda: the config's default
    for name, study_name in (("nested", "x0.15-b1-retrace-s0"), ("baseline", "baseline-s0")):
        study = study_run(study_name)
        assert (arms[name].nesting, arms[name].importance) == (study.nesting, study.importance), name
        assert arms[name].model == str(Path("out") / "sft" / FINAL_MODEL_DIR) and arms[name].sft.epochs == 0
    assert warm_up.rft_steps == 0 and warm_up.sft.epochs == 1


def test_the_demo_trains_with_the_studys_calibrated_settings():
    """One calibration (docs/study-smollm2): the demo may cut steps and problems, not change the task."""
    study = STUDY.base_config("smollm2-135m-instruct", "arithmetic", 0)
    ours = calibrated_config("smollm2-135m-instruct", Path("out"), steps=study.rft_steps)
    for field in ("dataset", "batch_size", "micro_batch_size", "sampling", "grpo", "sft", "dtype", "rft_steps"):
        assert getattr(ours, field) == getattr(study, field), field
    assert (study.rft_steps, STUDY.eval.limit) == (demo.STUDY_STEPS, demo.STUDY_PROBLEMS)
    assert STUDY.eval.benchmarks == (demo.TASK,)
    assert (STUDY.eval.max_new_tokens, STUDY.eval.batch_size) == (demo.EVAL.max_new_tokens, demo.EVAL.batch_size)
    assert STUDY.eval.config(seed=0) == dataclasses.replace(demo.EVAL, seed=0)


@pytest.mark.parametrize("policy, label", [("influence", "influence"), ("kl_target", "kl-target")])
def test_an_adaptive_policy_runs_with_the_studys_options_for_it(policy, label):
    (variant,) = [variant for variant in STUDY.variants if variant.label == label]
    nested, importance = runs(DemoSettings(skip_ratio=variant.skip_ratio, skip_policy=policy))["nested"]
    study = study_run(f"x{variant.skip_ratio:g}-b1-retrace-{label}-s0")
    assert (nested, importance) == (study.nesting, study.importance)
    assert variant.nesting == {"skip_policy": policy, **demo.POLICY_OPTIONS[policy]}


def test_the_speedup_is_timed_for_every_skip_set_the_nested_run_drew(monkeypatch):
    """A uniform run's skip sets are all timed, and are the draws at U_x; an adaptive policy's, which may be
    smaller (or empty), are timed beside uniform draws of U_x layers."""
    timed = []

    def timings(model, tokenizer, prompts, skip_sets, tokens):
        timed.append([tuple(skip_set) for skip_set in skip_sets])
        return [(1.0 + len(skip_set), 1.0) for skip_set in skip_sets]

    monkeypatch.setattr(demo, "paired_timings", timings)
    drawn = [(1,), (4,), (2,)]
    speed = measure_speedups(Path("tiny-llama"), drawn, SETTINGS)
    assert timed == [drawn] and speed.run == [(2.0, 1.0)] * 3 and speed.at_bound == []
    adaptive = dataclasses.replace(SETTINGS, skip_ratio=0.5, skip_policy="kl_target")
    speed = measure_speedups(Path("tiny-llama"), [(), (1,)], adaptive)
    assert timed[1][:2] == [(), (1,)] and len(timed[1]) == 2 + adaptive.uniform_draws
    assert {len(skip_set) for skip_set in timed[1][2:]} == {speed.bound_layers} == {3}
    assert speed.run == [(1.0, 1.0), (2.0, 1.0)] and speed.at_bound == [(4.0, 1.0)] * adaptive.uniform_draws


def test_the_table_says_what_cutting_the_studys_steps_or_problems_hides():
    assert cut_from_study(DemoSettings()) == ""  # the defaults are the study's own
    both = cut_from_study(SETTINGS)
    assert "2 steps cannot yet make" in both and "6 problems cannot resolve" in both
    assert "steps" not in cut_from_study(dataclasses.replace(SETTINGS, steps=demo.STUDY_STEPS))


@pytest.mark.parametrize("options, option", [
    ({"steps": 0}, "demo steps"), ({"eval_problems": 0}, "demo eval_problems"), ({"lanes": 0}, "demo lanes"),
    ({"skip_ratio": 1.5}, "nesting.skip_ratio"), ({"skip_policy": "greedy"}, "nesting.skip_policy"),
])
def test_bad_demo_settings_are_refused_naming_the_option(options, option):
    with pytest.raises(ConfigError, match=option):
        DemoSettings(**options)
