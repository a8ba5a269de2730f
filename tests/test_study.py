"""The study: the bootstrap against a hand computation, configurations from the tables, and a tiny study end to end."""

from __future__ import annotations

import csv
import json
import math
import statistics

import numpy as np
import pytest
import yaml

from nested_reft.experiments.grid import enumerate_instances, load_grid, run_directory
from nested_reft.experiments.report import write_report
from nested_reft.experiments.results import OPTIONAL_STEP_COLUMNS, PROBLEMS_FILE, STEP_COLUMNS, STEPS_FILE, ResultsError, read_table
from nested_reft.experiments import study, study_figures
from nested_reft.experiments.plots import series_style
from nested_reft.experiments.stats import (
    SEED_COLUMNS, Interval, bootstrap_delta, bootstrap_replicates, seed_summary, t_interval, t_quantile,
)
from nested_reft.experiments.study import (
    closeness_rows, kl_quarters, learning_curves, quarter_means, run_rows, study_rows, warm_up_rows,
)
from nested_reft.experiments.study_markdown import (
    render_break_even, render_cost, render_runs, render_study, render_warm_ups,
)
from nested_reft.training.rundir import METRICS_FILE, read_metrics
from nested_reft.experiments.sweep import sweep_main


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


def rows_and_problems(scores: dict | None = None, warm_up: str = "", before: float = 0.25):
    """Runs scored on four problems, by (role, seed): by default two seeds of a baseline and of a nested
    configuration, from the plain warm-up ("") or the one named `warm_up` (then under `m/d/<warm_up>/`)."""
    rows, problems = [], []
    scores = scores or {("baseline", 0): [1, 0, 0, 0], ("baseline", 1): [1, 1, 0, 0],
                        ("nested", 0): [1, 1, 1, 0], ("nested", 1): [1, 1, 0, 1]}
    for (role, seed), correct in scores.items():
        instance = f"m/d/{warm_up + '/' if warm_up else ''}{role}-s{seed}"
        rows.append({"model": "m", "dataset": "d", "instance": instance, "role": role, "status": "done",
                     "skip_ratio": 0.0 if role == "baseline" else 0.3, "border": 0 if role == "baseline" else 1,
                     "mitigation": "base" if role == "baseline" else "retrace", "variant": "", "seed": seed,
                     "accuracy": sum(correct) / 4, "accuracy_before": before, "skipped_layers": 0 if role == "baseline" else 9,
                     "kl_behavior_target": 0.0, "h_ess": 1.0, "h_truncated": 0.0, "gen_tokens_per_s": 10.0,
                     "rollout_flops": 1e12, "warm_up": warm_up})
        problems += [{"instance": instance, "benchmark": "b", "problem": str(i), "correct": c} for i, c in enumerate(correct)]
    return rows, problems


def two_warm_ups():
    """rows_and_problems' plain runs (nested - baseline: +0.5 at seed 0, +0.25 at seed 1) and distill's, which start
    higher (before 0.5) and whose baselines score 1.0 and 0.75, their nested runs 0.5 and 0.25 (-0.5 at both seeds)."""
    plain_rows, plain_problems = rows_and_problems()
    distill_rows, distill_problems = rows_and_problems(
        {("baseline", 0): [1, 1, 1, 1], ("baseline", 1): [1, 1, 1, 0],
         ("nested", 0): [1, 1, 0, 0], ("nested", 1): [1, 0, 0, 0]}, warm_up="distill", before=0.5)
    return plain_rows + distill_rows, plain_problems + distill_problems


def test_study_rows_average_seeds_and_give_the_delta_against_the_baseline():
    rows, problems = rows_and_problems()
    table = {entry["role"]: entry for entry in study_rows(rows, problems)}
    assert table["nested"]["seeds"] == 2 and table["nested"]["accuracy"] == pytest.approx(0.75)
    assert table["baseline"]["accuracy"] == pytest.approx(0.375) and table["nested"]["skipped_layers"] == 9
    delta = table["nested"]["delta"]
    assert delta.mean == pytest.approx(0.375) and delta.low <= delta.mean <= delta.high
    assert table["baseline"]["delta"].mean == 0.0  # the baseline against itself


def test_t_quantile_matches_the_published_table():
    for df, value in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.95, 1) == pytest.approx(6.3138, abs=1e-4) and t_quantile(0.5, 7) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_t_interval_against_a_hand_computation():
    """1, 2, 6: mean 3, sd sqrt(7), so 3 +- t_{0.975, 2} sqrt(7) / sqrt(3); one value has no interval."""
    half = 4.302652729911275 * math.sqrt(7) / math.sqrt(3)
    interval = t_interval([1.0, 2.0, 6.0])
    assert interval.mean == pytest.approx(3.0)
    assert (interval.low, interval.high) == pytest.approx((3.0 - half, 3.0 + half))
    assert t_interval([1.0]) is None
    assert seed_summary([0.5]) == dict(zip(SEED_COLUMNS, (1, 0.5, None, None)))


def test_study_rows_compare_each_warm_up_with_its_own_baselines():
    rows, problems = two_warm_ups()
    table = {entry["label"]: entry for entry in study_rows(rows, problems)}
    assert list(table) == ["plain/baseline (x = 0, b = 0)", "plain/x = 30%, retrace",
                           "distill/baseline (x = 0, b = 0)", "distill/x = 30%, retrace"]
    distilled, plain = table["distill/x = 30%, retrace"], table["plain/x = 30%, retrace"]
    assert distilled["delta"].mean == pytest.approx(0.375 - 0.875)  # against all baselines it would be -0.25
    assert plain["delta"].mean == pytest.approx(0.375)
    baseline = table["plain/baseline (x = 0, b = 0)"]
    assert baseline["seeds_paired"] == 0 and baseline["delta_abs_accuracy_seeds_mean"] is None  # not "+0.0 [+0.0, +0.0]"
    assert distilled["delta_abs_accuracy_seeds_mean"] == pytest.approx(-0.5)
    assert (distilled["delta_abs_accuracy_seeds_t_low"], distilled["delta_abs_accuracy_seeds_t_high"]) == \
        pytest.approx((-0.5, -0.5))  # the same delta at both seeds
    half = 12.706204736174707 * statistics.stdev([0.5, 0.25]) / math.sqrt(2)  # t_{0.975, 1}
    assert plain["delta_abs_accuracy_seeds_t_low"] == pytest.approx(0.375 - half)
    assert "| +37.5 [" in render_study(list(table.values()), [], [], "") and f"{100 * (0.375 + half):+.1f}]" in \
        render_study(list(table.values()), [], [], "")


def test_warm_up_rows_pair_the_baselines_by_seed():
    rows, problems = two_warm_ups()
    comparison = warm_up_rows(rows, problems)
    assert [entry["seeds"] for entry in comparison] == ["0", "1", "mean of 2"]
    seed_0, seed_1, both = comparison
    assert seed_0["delta"].mean == pytest.approx(1.0 - 0.25) and seed_1["delta"].mean == pytest.approx(0.75 - 0.5)
    assert seed_0["delta"].low <= 0.75 <= seed_0["delta"].high  # over the problems alone
    assert (seed_0["accuracy_before_plain"], seed_0["accuracy_before"]) == (0.25, 0.5)
    assert both["delta"].mean == pytest.approx(0.5) and both["delta_abs_accuracy_seeds_mean"] == pytest.approx(0.5)
    half = 12.706204736174707 * statistics.stdev([0.75, 0.25]) / math.sqrt(2)
    assert both["delta_abs_accuracy_seeds_t_high"] == pytest.approx(0.5 + half)
    assert seed_0["delta_abs_accuracy_seeds_t_low"] is None
    text = "\n".join(render_warm_ups(comparison))
    assert "| m | d | distill | mean of 2 | 25.0% → 50.0% | 37.5% → 87.5% | +50.0 [" in text
    assert warm_up_rows(rows_and_problems()[0], []) == []  # no named warm-up, nothing to compare


def test_kl_quarter_means_leave_out_steps_that_measured_none():
    """Eight steps: quarters of two. Step 2 measured no KL (None): step 1 alone is the first quarter. At U = 0 a KL
    of 0 is a measurement."""
    kls = [4.0, None, 3.0, 3.0, 2.0, 2.0, 1.0, 2.0]
    steps = [{"instance": "m/d/nested-s0", "step": step, "kl_behavior_target": kl, "skipped_layers": 5}
             for step, kl in zip(range(8, 0, -1), reversed(kls))]  # in any order
    steps += [{"instance": "m/d/baseline-s0", "step": step, "kl_behavior_target": 0.0, "skipped_layers": 0}
              for step in (1, 2, 3, 4)]
    assert kl_quarters(steps) == {"m/d/nested-s0": (4.0, 1.5), "m/d/baseline-s0": (0.0, 0.0)}
    assert quarter_means([1.0, None, 3.0]) == (1.0, 3.0) and quarter_means([]) == (None, None)
    rows, problems = rows_and_problems()
    nested = {entry["role"]: entry for entry in study_rows(rows, problems, steps)}["nested"]
    assert (nested["kl_first_quarter"], nested["kl_last_quarter"]) == (4.0, 1.5)  # seed 1 has no steps


def test_every_series_gets_its_own_colour(tmp_path, monkeypatch):
    import matplotlib

    styles = [series_style(index) for index in range(40)]
    assert len({style["color"] for style in styles[:13]}) == 13
    assert len({(style["color"], style["linestyle"]) for style in styles}) == 40
    assert [style["color"] for style in styles[:10]] == list(matplotlib.colormaps["tab10"].colors)  # as before
    plotted = []
    save = study_figures.save_figure
    monkeypatch.setattr(study_figures, "save_figure", lambda figure, path: plotted.append(
        [(line.get_color(), line.get_linestyle()) for line in figure.axes[0].get_lines()]) or save(figure, path))
    curves = {f"configuration {index}": {"step": [1, 2], "reward": [0.0, 1.0], "flops": [1.0, 2.0]}
              for index in range(13)}
    study_figures.plot_learning_curves({("m", "d"): curves}, tmp_path)
    assert len(plotted[0]) == 13 and len({colour for colour, _ in plotted[0]}) == 13


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


def test_a_selecting_run_s_groups_and_skips_are_summed_and_tabled_and_a_run_without_selection_has_none():
    rows, _ = rows_and_problems()
    # the nested run of seed 0 filtered groups: 3 rounds of 2 then 1 round at its limit with nothing kept
    steps = [{"instance": "m/d/nested-s0", "step": s, "reward_mean": 0.5, "rollout_flops": 1.0, "grad_norm": 1.0,
              "groups_sampled": sampled, "groups_kept": kept, "prompts_skipped": skipped}
             for s, sampled, kept, skipped in ((1, 6, 2, 1), (2, 2, 0, 0))]
    steps += [{"instance": "m/d/baseline-s0", "step": s, "reward_mean": 0.5, "rollout_flops": 1.0, "grad_norm": 1.0,
               "groups_sampled": None, "groups_kept": None, "prompts_skipped": None} for s in (1, 2)]
    runs = {(run["role"], run["seed"]): run for run in run_rows(rows, steps)}
    assert (runs["nested", 0]["groups_sampled"], runs["nested", 0]["groups_kept"],
            runs["nested", 0]["prompts_skipped"]) == (8, 2, 1)
    assert runs["baseline", 0]["groups_sampled"] is None and runs["nested", 1]["groups_sampled"] is None  # no steps
    text = render_study([], list(runs.values()), [], "")
    assert "### Rollout selection" in text
    assert "| m | d | 0 | x = 30%, retrace | 8 | 4.00 | 2 | 1.00 | 1 |" in text
    assert text.count("| m | d | ") == 4 + 1  # the four runs, one of them selecting
    assert "### Rollout selection" not in render_study([], [runs["baseline", 0]], [], "")


def test_closeness_rows_correlate_each_nested_run_s_kl_gradient_steps_and_delta_against_its_own_baseline():
    def run(role, seed, accuracy, kl=None, gradient_steps=20, warm_up="", dataset="d"):
        return {"model": "m", "dataset": dataset, "role": role, "seed": seed, "warm_up": warm_up, "accuracy": accuracy,
                "kl_behavior_target": kl, "gradient_steps": gradient_steps, "label": role, "groups_sampled": None,
                "accuracy_before": 0.5, "steps": 24, "zero_reward_steps": 0, "skipped_layers": 1, "h_ess": 1.0,
                "h_truncated": 0.0}
    baselines = [run("baseline", seed, accuracy) for seed, accuracy in ((0, 0.5), (1, 0.6), (2, 0.7))]
    nested = [run("nested", 0, 0.5, kl=math.e, gradient_steps=4),  # log KL 1, Δ 0
              run("nested", 1, 0.4, kl=math.e ** 2, gradient_steps=2),  # log KL 2, Δ -20
              run("nested", 2, 0.6, kl=math.e ** 3, gradient_steps=3)]  # log KL 3, Δ -10
    left_out = [run("nested", 3, 0.9, kl=0.5),  # no baseline of its seed
                run("nested", 0, 0.1, kl=0.5, warm_up="distill"),  # none of its warm-up
                run("nested", 1, 0.9, kl=float("nan")), run("nested", 2, 0.9, kl=0.5, gradient_steps=None),
                run("baseline", 0, 0.5, dataset="other"), run("nested", 0, 0.5, kl=1.0, dataset="other")]  # one run: no r
    rows = {(row["dataset"], row["runs"]): row for row in closeness_rows(baselines + nested + left_out)}
    assert set(rows) == {("d", 3), ("other", 1)}
    expected = {"kl_gradient": np.corrcoef([1, 2, 3], [4, 2, 3])[0, 1],
                "gradient_delta": np.corrcoef([4, 2, 3], [0, -20, -10])[0, 1],
                "kl_delta": np.corrcoef([1, 2, 3], [0, -20, -10])[0, 1]}
    assert rows["d", 3]["kl_gradient"] == pytest.approx(-0.5) and rows["d", 3]["gradient_delta"] == pytest.approx(1.0)
    assert {key: rows["d", 3][key] for key in expected} == pytest.approx(expected)
    assert rows["other", 1]["kl_delta"] is None
    text = render_study([], baselines + nested, [], "")
    assert "### What the closeness decides" in text
    assert f"| m | d | 3 | -0.50 | +1.00 | {expected['kl_delta']:+.2f} |" in text
    assert "### What the closeness decides" not in render_study([], baselines, [], "")


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
    """Warm-up evaluated, a baseline and an influence variant, from the grid's warm-up and a named one, the tables,
    and the report's study section with the warm-ups' own effect and their break-even."""
    grid = {
        "name": "tiny-study", "output_dir": str(tmp_path / "sweep"), "models": ["tiny-llama"],
        "datasets": ["arithmetic"], "skip_ratios": [0.3], "mitigations": ["retrace"], "seeds": [0],
        "evaluate_warm_up": True, "conditions": "a CI runner, one process",
        "variants": [{"label": "influence", "skip_ratio": 0.3, "nesting": {"skip_policy": "influence"}}],
        "warm_ups": [{"label": "distill", "sft": {"distill_nested": 1.0, "distill_ratio": 0.3}}],
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
        results = {row["instance"].split("/", 2)[2]: row for row in csv.DictReader(stream)}
    own = {"baseline-s0", "x0.3-b1-retrace-s0", "x0.3-b1-retrace-influence-s0"}
    assert set(results) == own | {f"distill/{run}" for run in own}
    assert results["x0.3-b1-retrace-influence-s0"]["variant"] == "influence"
    assert float(results["x0.3-b1-retrace-s0"]["skipped_layers"]) == 2  # 30% of 6 layers
    assert results["baseline-s0"]["accuracy_before"] == results["x0.3-b1-retrace-s0"]["accuracy_before"] != ""
    warm_up = json.loads((root / "tiny-llama" / "arithmetic" / "sft-s0" / "summary.json").read_text())
    distill = json.loads((root / "tiny-llama" / "arithmetic" / "distill" / "sft-s0" / "summary.json").read_text())
    assert distill["sft_flops"] > warm_up["sft_flops"]  # the distillation's second forward
    for name, row in results.items():  # the warm-up's label ("" = the grid's own) and cost, beside every run it started
        label, summary = ("distill", distill) if name.startswith("distill/") else ("", warm_up)
        assert row["warm_up"] == label and float(row["sft_flops"]) == summary["sft_flops"] > 0
        assert float(row["sft_runtime_s"]) == pytest.approx(summary["sft_runtime_s"]) and summary["sft_runtime_s"] > 0
    with open(root / STEPS_FILE) as stream:
        steps = list(csv.DictReader(stream))
    assert len(steps) == 6 * 2 and all(float(step["rollout_flops"]) > 0 for step in steps)
    loaded = load_grid(path)
    for instance in enumerate_instances(loaded):  # each run's gradient norms, as its metrics.jsonl has them
        recorded = read_metrics(run_directory(loaded, instance) / METRICS_FILE)
        collected = [float(step["grad_norm"]) for step in steps if step["instance"] == instance.id]
        assert collected == pytest.approx([step["grad_norm"] for step in recorded]) and len(collected) == 2
    with open(root / PROBLEMS_FILE) as stream:
        problems = list(csv.DictReader(stream))
    assert len(problems) == 8 * 3  # six instances and the two warm-ups, three problems each
    report = write_report(root).read_text()
    assert "## The study" in report and "a CI runner, one process" in report and "| KL first ¼ | KL last ¼ |" in report
    assert "plain/x = 30%, retrace influence" in report and "distill/x = 30%, retrace influence" in report
    assert "| tiny-llama | arithmetic | distill | 0 |" in report  # the warm-ups' own effect, seed 0
    break_even = report[report.index("### Break-even"):report.index("### The runs")]
    assert "| distill/x = 30%, retrace |" in break_even and "plain/" not in break_even
    runs = report[report.index("### The runs"):report.index("### What the closeness decides")].splitlines()
    assert sum(line.startswith("| tiny-llama | arithmetic | 0 |") for line in runs) == 6  # one row per run
    assert all(" of 2 | " in line and "–" not in line for line in runs if line.startswith("| tiny-llama"))
    assert "| tiny-llama | arithmetic | 4 |" in report[report.index("### What the closeness decides"):]  # 4 nested
    assert (root / "report" / "curves-tiny-llama-arithmetic.png").is_file()
    assert (root / "report" / "diagnostics-tiny-llama-arithmetic.png").is_file()


def test_variants_add_pairs_and_labelled_policies_and_refuse_repeats():
    from nested_reft.config import ConfigError, from_dict
    from nested_reft.experiments.grid import GridConfig, enumerate_instances

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


def test_a_variant_sets_grpo_and_sampling_options_too():
    """Issue 32's study puts a run that filters groups and skips predictable prompts beside the plain one."""
    from nested_reft.config import ConfigError, from_dict
    from nested_reft.experiments.grid import GridConfig, enumerate_instances, instance_config

    base = {"name": "g", "models": ["tiny-llama"], "datasets": ["arithmetic"], "skip_ratios": [0.0, 0.3],
            "mitigations": ["retrace"], "train": {"sft": {"epochs": 0}}}
    grid = from_dict(GridConfig, {**base, "variants": [{"skip_ratio": 0.3, "label": "selective",
                                                        "grpo": {"filter_groups": True},
                                                        "sampling": {"skip_predictable": True}}]})
    (selective,) = [i for i in enumerate_instances(grid) if i.name == "x0.3-b1-retrace-selective-s0"]
    config = instance_config(grid, selective)
    assert config.grpo.filter_groups and config.sampling.skip_predictable and config.nesting.skip_ratio == 0.3
    plain = instance_config(grid, next(i for i in enumerate_instances(grid) if i.name == "x0.3-b1-retrace-s0"))
    assert not plain.grpo.filter_groups and not plain.sampling.skip_predictable
    with pytest.raises(ConfigError, match="variants.label"):
        from_dict(GridConfig, {**base, "variants": [{"skip_ratio": 0.3, "grpo": {"filter_groups": True}}]})
    with pytest.raises(ConfigError, match="grpo.filter_group"):
        from_dict(GridConfig, {**base, "variants": [{"skip_ratio": 0.3, "label": "a", "grpo": {"filter_group": 1}}]})


def test_break_even_divides_the_extra_warm_up_by_the_rollout_flops_saved_per_step():
    """distill's warm-up costs 26 TFLOPs more than the plain one; its nested runs saved 0.24 and 0.12 TFLOPs over
    their 4 steps against their own baselines (0.06 and 0.03 per step: 0.045 on average): 26 / 0.045 steps. A
    configuration that generated more than its baseline saved nothing: never. The plain warm-up's runs cost no
    extra and get no row."""
    rows, _ = two_warm_ups()
    for row in rows:
        row["sft_flops"] = 30e12 if row["warm_up"] else 4e12
        if row["warm_up"] and row["role"] == "nested":
            row["rollout_flops"] = 1e12 - (0.24e12 if row["seed"] == 0 else 0.12e12)
    longer = [{**row, "instance": row["instance"].replace("nested", "longer"), "skip_ratio": 0.15,
               "rollout_flops": 1.1e12} for row in rows if row["warm_up"] and row["role"] == "nested"]
    steps = [{"instance": row["instance"], "step": step} for row in rows + longer for step in range(1, 5)]
    table = {entry["label"]: entry for entry in study.break_even_rows(rows + longer, steps)}
    assert set(table) == {"distill/x = 30%, retrace", "distill/x = 15%, retrace"}
    saving = table["distill/x = 30%, retrace"]
    assert saving["extra_warm_up_flops"] == pytest.approx(26e12)
    assert saving["saving_per_step"] == pytest.approx(0.045e12)
    assert saving["break_even_steps"] == pytest.approx(26 / 0.045)
    assert table["distill/x = 15%, retrace"]["break_even_steps"] is None
    assert "| never |" in "\n".join(render_break_even(list(table.values())))


def test_delta_against_kl_plots_each_nested_run_against_its_own_baseline(tmp_path, monkeypatch):
    """One point per nested run: x its KL, y its pass@1 minus the baseline of its warm-up and seed (distill's
    nested runs: -50 points at both seeds; plain's: +50 and +25)."""
    rows, _ = two_warm_ups()
    for row in rows:
        row["kl_behavior_target"] = 0.0 if row["role"] == "baseline" else 1.0 + row["seed"] + (row["warm_up"] == "distill")
    plotted = {}
    save = study_figures.save_figure
    monkeypatch.setattr(study_figures, "save_figure", lambda figure, path: plotted.update(
        {collection.get_label(): collection.get_offsets().tolist() for collection in figure.axes[0].collections})
        or save(figure, path))
    paths = study_figures.plot_delta_against_kl(rows, tmp_path)
    assert [path.name for path in paths] == ["delta-against-kl-m-d.png"] and paths[0].is_file()
    assert plotted == {"plain/x = 30%, retrace": [[1.0, 50.0], [2.0, 25.0]],
                       "distill/x = 30%, retrace": [[2.0, -50.0], [3.0, -50.0]]}


def test_cost_rows_give_what_pass_at_1_cost_in_rollout_flops_against_the_baseline(tmp_path):
    """Baseline seeds (0.30 -> 0.40 -> 0.50 and 0.30 -> 0.44 -> 0.54 at 0, 4, 8 TFLOPs and 0, 5, 10): mean final
    0.52 at 9 TFLOPs. The nested runs (0.30 -> 0.52 -> 0.50 at 0, 3, 6 and 0, 3, 6, a third point only one seed has):
    mean 0.52 at step 2 (within 2 points of 0.52) after 3 TFLOPs: 3x less than the baseline's 9; total 6: 1.5x;
    gain 20 points for 6 TFLOPs: 0.3 per point. A configuration that never gets within 2 points says never."""
    rows, _ = rows_and_problems()
    curves = {("baseline", 0): [(0, 0.30, 0), (2, 0.40, 4), (4, 0.50, 8)],
              ("baseline", 1): [(0, 0.30, 0), (2, 0.44, 5), (4, 0.54, 10)],
              ("nested", 0): [(0, 0.30, 0), (2, 0.52, 3), (4, 0.50, 6), (6, 0.9, 7)],
              ("nested", 1): [(0, 0.30, 0), (2, 0.52, 3), (4, 0.50, 6)]}
    curve = [{"instance": f"m/d/{role}-s{seed}", "step": step, "accuracy": accuracy, "rollout_flops": tflops * 1e12}
             for (role, seed), points in curves.items() for step, accuracy, tflops in points]
    table = {entry["role"]: entry for entry in (
        {**entry, "role": "baseline" if entry["label"].startswith("baseline") else "nested"}
        for entry in study.cost_rows(rows, curve))}
    nested, baseline = table["nested"], table["baseline"]
    assert [point["step"] for point in nested["curve"]] == [0, 2, 4]  # the steps both seeds evaluated
    assert nested["total_flops"] == pytest.approx(6e12) and nested["saving"] == pytest.approx(1.5)
    assert nested["flops_per_point"] == pytest.approx(6e12 / 20)
    assert (nested["reached_step"], nested["reached_flops"]) == (2, pytest.approx(3e12))
    assert nested["reached_saving"] == pytest.approx(3.0)
    assert baseline["reached_step"] == 4 and baseline["saving"] == pytest.approx(1.0)
    lower = [{**point, "accuracy": point["accuracy"] - 0.1 if "nested" in point["instance"] and point["step"] else
              point["accuracy"]} for point in curve]
    assert {entry["label"]: entry["reached_step"] for entry in study.cost_rows(rows, lower)}["x = 30%, retrace"] is None
    text = "\n".join(render_cost(study.cost_rows(rows, lower)))
    assert "| never |" in text and "1.50x" in text
    one_seed = [point for point in curve if point["instance"] != "m/d/nested-s1"]  # against baseline seed 0 alone
    alone = {entry["label"]: entry for entry in study.cost_rows(rows, one_seed)}["x = 30%, retrace"]
    assert alone["seeds"] == 1 and alone["reached_saving"] == pytest.approx(8 / 3)  # seed 0's 8 TFLOPs over 3
    assert study_figures.plot_cost_curves(rows, curve, study.cost_rows(rows, curve), tmp_path)[0].is_file()
