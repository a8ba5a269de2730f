"""The study: the bootstrap against a hand computation, configurations from the tables, and a tiny study end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from nested_reft.grid import enumerate_instances, load_grid, run_directory
from nested_reft.report import write_report
from nested_reft.results import OPTIONAL_STEP_COLUMNS, PROBLEMS_FILE, STEP_COLUMNS, STEPS_FILE, ResultsError, read_table
from nested_reft.study import (
    Interval, bootstrap_delta, bootstrap_replicates, learning_curves, render_runs, run_rows, study_rows,
)
from nested_reft.rundir import METRICS_FILE, read_metrics
from nested_reft.sweep import sweep_main


def test_bootstrap_over_problems_matches_the_enumerated_distribution():
    """One seed per arm and two problems: the four equally likely problem resamples give Delta 1 (problem 0
    twice), 0.5 (each once, two orders) and 0 (problem 1 twice)."""
    draws = 20_000
    interval = bootstrap_delta([[1, 0]], [[0, 0]], samples=draws)
    assert interval.mean == 0.5
    assert (interval.low, interval.high) == (0.0, 1.0)  # the 2.5% and 97.5% points of {0: 1/4, .5: 1/2, 1: 1/4}
    middle = bootstrap_delta([[1, 0]], [[0, 0]], samples=draws, seed=1)
    assert middle == Interval(0.5, 0.0, 1.0)


def test_bootstrap_over_seeds_matches_the_enumerated_distribution():
    """Two seeds of one problem (right, wrong) against a baseline that is always wrong: the seed resamples give
    Delta 1 (first seed twice), 0.5 and 0 with probabilities 1/4, 1/2, 1/4."""
    draws = 20_000
    assert bootstrap_delta([[1], [0]], [[0]], samples=draws) == Interval(0.5, 0.0, 1.0)
    values, counts = np.unique(bootstrap_replicates([[1], [0]], [[0]], samples=draws, seed=3), return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert counts / draws == pytest.approx([0.25, 0.5, 0.25], abs=0.015)


def test_bootstrap_over_problems_pairs_the_arms():
    """Arms that agree on every problem differ by 0 in every replicate (their problems are drawn together)."""
    assert set(bootstrap_replicates([[1, 0, 1, 1]], [[1, 0, 1, 1]], samples=500).tolist()) == {0.0}


def test_bootstrap_refuses_arms_scored_on_different_problems():
    with pytest.raises(ValueError, match="same problems"):
        bootstrap_delta([[1, 0, 1]], [[0, 0]])


def rows_and_problems():
    """Two seeds of a baseline and of a nested configuration, scored on four problems."""
    rows, problems = [], []
    scores = {("baseline", 0): [1, 0, 0, 0], ("baseline", 1): [1, 1, 0, 0],
              ("nested", 0): [1, 1, 1, 0], ("nested", 1): [1, 1, 0, 1]}
    for (role, seed), correct in scores.items():
        instance = f"m/d/{role}-s{seed}"
        rows.append({"model": "m", "dataset": "d", "instance": instance, "role": role, "status": "done",
                     "skip_ratio": 0.0 if role == "baseline" else 0.3, "border": 0 if role == "baseline" else 1,
                     "mitigation": "base" if role == "baseline" else "retrace", "variant": "", "seed": seed,
                     "accuracy": sum(correct) / 4, "accuracy_before": 0.25, "skipped_layers": 0 if role == "baseline" else 9,
                     "kl_behavior_target": 0.0, "h_ess": 1.0, "h_truncated": 0.0, "gen_tokens_per_s": 10.0,
                     "rollout_flops": 1e12})
        problems += [{"instance": instance, "benchmark": "b", "problem": str(i), "correct": c} for i, c in enumerate(correct)]
    return rows, problems


def test_study_rows_average_seeds_and_give_the_delta_against_the_baseline():
    rows, problems = rows_and_problems()
    table = {entry["role"]: entry for entry in study_rows(rows, problems)}
    assert table["nested"]["seeds"] == 2 and table["nested"]["accuracy"] == pytest.approx(0.75)
    assert table["baseline"]["accuracy"] == pytest.approx(0.375) and table["nested"]["skipped_layers"] == 9
    delta = table["nested"]["delta"]
    assert delta.mean == pytest.approx(0.375) and delta.low <= delta.mean <= delta.high
    assert table["baseline"]["delta"].mean == 0.0  # the baseline against itself


def test_learning_curves_average_seeds_on_the_steps_all_reached():
    rows, _ = rows_and_problems()
    steps = [{"instance": "m/d/nested-s0", "step": s, "reward_mean": r, "rollout_flops": 10.0}
             for s, r in ((1, 0.0), (2, 0.5), (3, 1.0))]
    steps += [{"instance": "m/d/nested-s1", "step": s, "reward_mean": r, "rollout_flops": 20.0}
              for s, r in ((1, 0.5), (2, 0.5))]
    curve = learning_curves(steps, rows)[("m", "d")]["x = 30%, retrace"]
    assert curve == {"step": [1, 2], "reward": [0.25, 0.5], "flops": [15.0, 30.0]}


def test_run_rows_list_each_seed_baseline_first_with_its_zero_reward_and_gradient_steps():
    rows, _ = rows_and_problems()
    # step 2 was rewarded but had no gradient (its rewarded completions cut and masked), step 4's was not finite
    steps = [{"instance": "m/d/nested-s0", "step": s, "reward_mean": r, "rollout_flops": 1.0, "grad_norm": g}
             for s, r, g in ((1, 0.0, 0.0), (2, 0.5, 0.0), (3, 0.5, 1.5), (4, 0.5, float("nan")))]
    runs = run_rows(list(reversed(rows)), steps)
    assert [(run["seed"], run["role"]) for run in runs] == [(0, "baseline"), (0, "nested"), (1, "baseline"),
                                                            (1, "nested")]
    assert (runs[1]["zero_reward_steps"], runs[1]["gradient_steps"], runs[1]["steps"]) == (1, 1, 4)
    assert runs[1]["label"] == "x = 30%, retrace" and runs[1]["accuracy"] == 0.75
    assert "| 1 of 4 | 1 of 4 |" in "\n".join(render_runs(runs))


def test_steps_written_before_grad_norm_read_as_unknown_gradient_steps(tmp_path):
    old = tmp_path / STEPS_FILE
    old.write_text("instance,step,reward_mean,skipped_layers,rollout_flops,kl_behavior_target,h_ess,h_truncated,"
                   "gen_tokens_per_s,step_time_s\nm/d/nested-s0,1,0.5,9,1.0,2.0,0.1,0.2,50.0,10.0\n")
    steps = read_table(old, STEP_COLUMNS, OPTIONAL_STEP_COLUMNS)
    assert steps[0]["grad_norm"] is None and steps[0]["reward_mean"] == 0.5
    rows, _ = rows_and_problems()
    assert run_rows(rows, steps)[1]["gradient_steps"] is None
    with pytest.raises(ResultsError, match="lacks column\\(s\\) loss;"):  # only optional columns may be absent
        read_table(old, [*STEP_COLUMNS, "loss"], OPTIONAL_STEP_COLUMNS)


def test_a_tiny_study_end_to_end(tmp_path, capsys):
    """Warm-up evaluated, a baseline and an influence variant, the tables, and the report's study section."""
    grid = {
        "name": "tiny-study", "output_dir": str(tmp_path / "sweep"), "models": ["tiny-llama"],
        "datasets": ["arithmetic"], "skip_ratios": [0.3], "mitigations": ["retrace"], "seeds": [0],
        "evaluate_warm_up": True, "conditions": "a CI runner, one process",
        "variants": [{"label": "influence", "skip_ratio": 0.3, "nesting": {"skip_policy": "influence"}}],
        "train": {"rft_steps": 2, "batch_size": 2, "micro_batch_size": 8, "save_steps": 1,
                  "sampling": {"max_new_tokens": 6, "min_new_tokens": 6},
                  "grpo": {"num_generations": 2}, "sft": {"epochs": 1, "max_examples": 4, "batch_size": 4}},
        "eval": {"benchmarks": ["arithmetic"], "limit": 3, "max_new_tokens": 6, "batch_size": 3},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert sweep_main(str(path), log=lambda line: None) == 0
    root = tmp_path / "sweep"
    with open(root / "results.csv") as stream:
        results = {row["instance"].rsplit("/", 1)[1]: row for row in csv.DictReader(stream)}
    assert set(results) == {"baseline-s0", "x0.3-b1-retrace-s0", "x0.3-b1-retrace-influence-s0"}
    assert results["x0.3-b1-retrace-influence-s0"]["variant"] == "influence"
    assert float(results["x0.3-b1-retrace-s0"]["skipped_layers"]) == 2  # 30% of 6 layers
    assert results["baseline-s0"]["accuracy_before"] == results["x0.3-b1-retrace-s0"]["accuracy_before"] != ""
    warm_up = json.loads((root / "tiny-llama" / "arithmetic" / "sft-s0" / "summary.json").read_text())
    for row in results.values():  # the warm-up's label ("" = the grid's own) and cost, beside every run it started
        assert row["warm_up"] == "" and float(row["sft_flops"]) == warm_up["sft_flops"] > 0
        assert float(row["sft_runtime_s"]) == pytest.approx(warm_up["sft_runtime_s"]) and warm_up["sft_runtime_s"] > 0
    with open(root / STEPS_FILE) as stream:
        steps = list(csv.DictReader(stream))
    assert len(steps) == 3 * 2 and all(float(step["rollout_flops"]) > 0 for step in steps)
    loaded = load_grid(path)
    for instance in enumerate_instances(loaded):  # each run's gradient norms, as its metrics.jsonl has them
        recorded = read_metrics(run_directory(loaded, instance) / METRICS_FILE)
        collected = [float(step["grad_norm"]) for step in steps if step["instance"] == instance.id]
        assert collected == pytest.approx([step["grad_norm"] for step in recorded]) and len(collected) == 2
    with open(root / PROBLEMS_FILE) as stream:
        problems = list(csv.DictReader(stream))
    assert len(problems) == 4 * 3  # three instances and the warm-up, three problems each
    report = write_report(root).read_text()
    assert "## The study" in report and "a CI runner, one process" in report
    assert "x = 30%, retrace influence" in report
    runs = report[report.index("### The runs"):].splitlines()
    assert sum(line.startswith("| tiny-llama | arithmetic | 0 |") for line in runs) == 3  # one row per run
    assert all(" of 2 | " in line and "–" not in line for line in runs if line.startswith("| tiny-llama"))
    assert (root / "report" / "curves-tiny-llama-arithmetic.png").is_file()
    assert (root / "report" / "diagnostics-tiny-llama-arithmetic.png").is_file()


def test_variants_add_pairs_and_labelled_policies_and_refuse_repeats():
    from nested_reft.config import ConfigError, from_dict
    from nested_reft.grid import GridConfig, enumerate_instances

    base = {"name": "g", "models": ["tiny-llama"], "datasets": ["arithmetic"], "skip_ratios": [0.0, 0.3],
            "mitigations": ["retrace"], "train": {"sft": {"epochs": 0}}}
    grid = from_dict(GridConfig, {**base, "variants": [
        {"skip_ratio": 0.3, "mitigation": "base"},
        {"skip_ratio": 0.3, "label": "influence", "nesting": {"skip_policy": "influence"}}]})
    names = [instance.name for instance in enumerate_instances(grid)]
    assert names == ["baseline-s0", "x0-b1-retrace-s0", "x0.3-b1-retrace-s0", "x0.3-b1-base-s0",
                     "x0.3-b1-retrace-influence-s0"]
    with pytest.raises(ConfigError, match="variants"):  # already in the product
        from_dict(GridConfig, {**base, "variants": [{"skip_ratio": 0.3, "mitigation": "retrace"}]})
    with pytest.raises(ConfigError, match="variants.label"):  # nesting options need a label to name the run
        from_dict(GridConfig, {**base, "variants": [{"skip_ratio": 0.3, "nesting": {"skip_policy": "influence"}}]})
    with pytest.raises(ConfigError, match="nesting.skip_polcy"):  # a typo in a variant's option, at grid load
        from_dict(GridConfig, {**base, "variants": [{"skip_ratio": 0.3, "label": "a", "nesting": {"skip_polcy": 1}}]})
