"""The study's statistics and figures: accuracy deltas with bootstrap and seed confidence intervals, learning
curves against steps and against rollout FLOPs, the off-policy diagnostics against the skip ratio, and the
warm-ups' own effect.

Read from the results tables only (results.csv, steps.csv, problems.csv; `results`). A group is (model, dataset,
warm-up): the runs that start from one kind of warm-up and share its baselines. A configuration is a group's
(x, b, m, variant); its seeds replicate it. A nested configuration compares with the baselines of its own group
(the effect of nesting, not of the warm-up); a named warm-up's baselines compare with the plain warm-up's (the
warm-up's own effect). Where the results hold several warm-ups, tables and legends name each configuration's.

The interval of a configuration's Delta accuracy (its mean pass@1 minus the baseline's, over seeds and the
held-out problems) is a percentile bootstrap over seeds and problems: each replicate draws the seeds of
each arm with replacement and one set of problems with replacement, the same problems for both arms (the
arms answer the same problems, so the comparison is paired), and takes the difference of the means. It
measures both sources of noise this setting has: which seed (warm-up, data order, sampling) and which
problems happen to be in the held-out set.

Beside it, the interval the seeds alone give: each seed's paired delta (the run minus the baseline of the same
seed and warm-up, which started from the very same weights), their mean and its Student t interval (n seeds,
n - 1 degrees of freedom; none for one seed). It asks whether the effect repeats from seed to seed, where the
bootstrap also asks whether it would hold on other problems.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nested_reft.experiments.plots import pyplot, save_figure, series_style
from nested_reft.experiments.results import mean_of_measured, model_slug

BOOTSTRAP_SAMPLES = 4000
CONFIDENCE = 0.95
PLAIN_WARM_UP = "plain"  # how tables and legends name the grid's own warm-up (train.sft; results.csv's "")
# A configuration's seeds' own paired deltas (`seed_summary`): how many seeds pair, their mean, its t interval.
SEED_COLUMNS = ("seeds_paired", "delta_abs_accuracy_seeds_mean", "delta_abs_accuracy_seeds_t_low",
                "delta_abs_accuracy_seeds_t_high")
DIAGNOSTICS = {"kl_behavior_target": "KL(behavior || target) per token", "h_ess": "effective sample size (fraction)",
               "h_truncated": "fraction of tokens truncated", "skipped_layers": "layers skipped (U)"}


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided confidence interval."""

    mean: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_delta(nested: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Interval:
    """Mean accuracy of `nested` minus `baseline`, each a list of seeds' per-problem scores (seed x problem, the
    problems in the same order in every list), with a percentile bootstrap interval over seeds and problems."""
    deltas = bootstrap_replicates(nested, baseline, samples, seed)
    tail = (1 - CONFIDENCE) / 2
    point = float(np.mean(nested) - np.mean(baseline))
    return Interval(point, float(np.quantile(deltas, tail)), float(np.quantile(deltas, 1 - tail)))


def bootstrap_replicates(nested: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                         samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """The `samples` bootstrap replicates of the Delta of means (see the module docstring for the scheme)."""
    arms = [np.asarray(arm, dtype=np.float64) for arm in (nested, baseline)]
    problems = {arm.shape[1] for arm in arms if arm.ndim == 2}
    if any(arm.ndim != 2 or arm.shape[0] == 0 for arm in arms) or len(problems) != 1:
        raise ValueError("both arms need at least one seed, each scored on the same problems")
    (count,) = problems
    generator = np.random.default_rng(seed)
    picked = generator.integers(0, count, size=(samples, count))  # one problem resample per replicate, both arms
    means = []
    for arm in arms:
        seeds = generator.integers(0, arm.shape[0], size=(samples, arm.shape[0]))
        per_seed = arm[:, picked].mean(axis=2)  # (seeds, replicates)
        means.append(np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1))
    return means[0] - means[1]


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile (above 1/2) of Student's t with `df` degrees of freedom, by bisection on its
    distribution function: scipy is not a dependency, and a table would cover only the levels it lists."""
    if not 0.5 <= probability < 1 or df < 1:
        raise ValueError(f"need 0.5 <= probability < 1 and df >= 1, got {probability} and {df}")
    level = 2 * probability - 1  # P(|T| <= t)
    low, high = 0.0, 1.0
    while _t_central(high, df) < level:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central(middle, df) < level else (low, middle)
    return (low + high) / 2


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer `df`: the finite series of Abramowitz and Stegun 26.7.3-4, exact
    up to rounding (theta = atan(t / sqrt(df)); a sum of powers of cos^2 theta, odd df adding theta itself)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    term = total = 1.0
    if df % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... up to cos^(df - 2))
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ... to cos^(df - 3)))
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """The mean of `values` (one per seed) with its Student t interval, mean +- t_{(1 + c)/2, n - 1} s / sqrt(n);
    None for fewer than two values, whose spread says nothing."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def seed_summary(deltas: Sequence[float]) -> dict[str, Any]:
    """SEED_COLUMNS of the seeds' own paired deltas: their number, mean and t interval (None where undefined)."""
    interval = t_interval(deltas)
    bounds = (None, None) if interval is None else (interval.low, interval.high)
    return dict(zip(SEED_COLUMNS, (len(deltas), statistics.fmean(deltas) if deltas else None, *bounds)))


def paired_deltas(runs: Iterable[dict], references: Iterable[dict], column: str = "accuracy") -> dict[int, float]:
    """Seed -> a run's `column` minus that of the reference run of the same seed, for the seeds both have: the two
    started from warm-ups of one seed, so the seed's own luck cancels."""
    reference = {row["seed"]: row[column] for row in references if row.get(column) is not None}
    return {row["seed"]: row[column] - reference[row["seed"]] for row in runs
            if row.get(column) is not None and row["seed"] in reference}


def warm_up(row: dict) -> str:
    """The label of the warm-up a run started from; "" for the grid's own (and in results from before `warm_ups`)."""
    return row.get("warm_up") or ""


def group_key(row: dict) -> tuple[str, str, str]:
    """(model, dataset, warm-up): the runs a baseline is compared with."""
    return (row["model"], row["dataset"], warm_up(row))


def configuration_key(row: dict) -> tuple:
    return group_key(row) + (row["skip_ratio"], row["border"], row["mitigation"], row.get("variant", ""))


def several_warm_ups(labels: Iterable[str]) -> bool:
    """Whether runs of several warm-ups are shown together (then their labels name the warm-up)."""
    return len(set(labels)) > 1


def named(text: str, label: str, several: bool) -> str:
    """`text` after its warm-up's name (`distill-256/...`, `plain/...`) where several are shown together; alone
    otherwise, so the report of a one-warm-up sweep reads as before."""
    return f"{label or PLAIN_WARM_UP}/{text}" if several else text


def configuration_label(row: dict, several: bool = False) -> str:
    """How a configuration is named in tables and legends: baseline, or x, mitigation and variant; after its
    warm-up's name where `several` warm-ups are shown."""
    if row["role"] == "baseline":
        return named("baseline (x = 0, b = 0)", warm_up(row), several)
    variant = f" {row['variant']}" if row.get("variant") else ""
    return named(f"x = {100 * row['skip_ratio']:g}%, {row['mitigation']}{variant}", warm_up(row), several)


def configurations(rows: Iterable[dict]) -> list[tuple[list[dict], list[dict]]]:
    """The finished runs by configuration (baselines apart from any nested run that shares x, b and m), each with
    the finished baselines of its group, in first-seen order: [(runs, baselines)]."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault(configuration_key(row) + (row["role"],), []).append(row)
    baselines = {group_key(members[0]): members for members in groups.values() if members[0]["role"] == "baseline"}
    return [(members, baselines.get(group_key(members[0]), [])) for members in groups.values()]


def study_rows(rows: Sequence[dict], problems: Sequence[dict], steps: Sequence[dict] = ()) -> list[dict]:
    """One row per finished configuration of each group: seeds, accuracy before and after ReFT, the Delta accuracy
    to the group's baseline with its bootstrap interval and its seeds' t interval, the runs' mean diagnostics, and
    their KL over the first and the last quarter of their steps (does the closeness they start with last?)."""
    scores = _scores_by_run(problems)
    quarters = kl_quarters(steps)
    several = several_warm_ups(warm_up(row) for row in rows)
    table = []
    for members, baselines in configurations(rows):
        first = members[0]
        entry: dict[str, Any] = {"model": first["model"], "dataset": first["dataset"], "warm_up": warm_up(first),
                                 "label": configuration_label(first, several), "role": first["role"],
                                 "skip_ratio": first["skip_ratio"], "mitigation": first["mitigation"],
                                 "variant": first.get("variant", ""), "seeds": len(members)}
        for column in ("accuracy", "accuracy_before", "gen_tokens_per_s", "rollout_flops", *DIAGNOSTICS):
            entry[column] = mean_of_measured(row.get(column) for row in members)
        entry["delta"] = _delta(members, baselines, scores)
        against_itself = first["role"] == "baseline"  # a baseline's seeds pair with themselves: no interval to give
        entry.update(seed_summary([] if against_itself else list(paired_deltas(members, baselines).values())))
        runs = [quarters[row["instance"]] for row in members if row["instance"] in quarters]
        entry["kl_first_quarter"] = mean_of_measured(first_quarter for first_quarter, _ in runs)
        entry["kl_last_quarter"] = mean_of_measured(last_quarter for _, last_quarter in runs)
        table.append(entry)
    return table


def kl_quarters(steps: Sequence[dict]) -> dict[str, tuple[float | None, float | None]]:
    """Per run: its mean KL(behavior || target) over the first and over the last quarter of its steps, of the steps
    that measured it (None where a step sampled no token)."""
    runs = _steps_by_run(steps)
    return {instance: quarter_means([step.get("kl_behavior_target") for step in run]) for instance, run in runs.items()}


def quarter_means(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """The means of the first and of the last quarter of a run's per-step values (a quarter is at least one step;
    None values, steps that did not measure it, are left out): where training starts and where it ends."""
    quarter = max(1, len(values) // 4)
    return mean_of_measured(values[:quarter]), mean_of_measured(values[-quarter:])


def warm_up_rows(rows: Sequence[dict], problems: Sequence[dict]) -> list[dict]:
    """Each named warm-up's baselines against the plain warm-up's of the same (model, dataset): the warm-up's own
    effect on pass@1, before ReFT (the warm-ups) and after (the baselines). One row per seed both have, its
    bootstrap over problems alone, then one over those seeds, with the seeds' t interval."""
    scores = _scores_by_run(problems)
    baselines = {group_key(runs[0]): runs for runs, _ in configurations(rows) if runs[0]["role"] == "baseline"}
    table = []
    for (model, dataset, label), runs in baselines.items():
        plain = baselines.get((model, dataset, ""))
        if label and plain:
            table += _warm_up_comparison(runs, plain, scores)
    return table


def _warm_up_comparison(runs: Sequence[dict], plain: Sequence[dict], scores: dict) -> list[dict]:
    """A named warm-up's baselines against the plain ones of the same seeds: each seed, then (over two or more) all."""
    reference = {row["seed"]: row for row in plain}
    pairs = [(row, reference[row["seed"]]) for row in sorted(runs, key=lambda row: row["seed"])
             if row["seed"] in reference]
    table = [_comparison(str(row["seed"]), [row], [base], scores) for row, base in pairs]
    if len(pairs) > 1:
        table.append(_comparison(f"mean of {len(pairs)}", [row for row, _ in pairs], [base for _, base in pairs],
                                 scores))
    return table


def _comparison(seeds: str, runs: list[dict], plain: list[dict], scores: dict) -> dict:
    """One row of `warm_up_rows`: `runs` (a named warm-up's baselines) against `plain`, seed by seed."""
    entry: dict[str, Any] = {"model": runs[0]["model"], "dataset": runs[0]["dataset"], "warm_up": warm_up(runs[0]),
                             "seeds": seeds, "delta": _delta(runs, plain, scores)}
    for column in ("accuracy_before", "accuracy"):
        entry[column] = mean_of_measured(row.get(column) for row in runs)
        entry[f"{column}_plain"] = mean_of_measured(row.get(column) for row in plain)
    entry.update(seed_summary(list(paired_deltas(runs, plain).values())))
    return entry


def break_even_rows(rows: Sequence[dict], steps: Sequence[dict]) -> list[dict]:
    """Per nested configuration of a named warm-up: what the warm-up cost beyond the plain one (FLOPs, the seeds
    both have), the rollout FLOPs its runs saved per ReFT step against their own baselines (same seeds; measured,
    so completions a nested model runs longer cost what they cost), and after how many ReFT steps that saving
    pays the extra warm-up back (None where the runs saved nothing)."""
    steps_per_run = {instance: len(run) for instance, run in _steps_by_run(steps).items()}
    groups = configurations(rows)
    plain = {group_key(runs[0]): runs for runs, _ in groups if runs[0]["role"] == "baseline" and not warm_up(runs[0])}
    table = []
    for members, baselines in groups:
        first = members[0]
        if first["role"] == "baseline" or not warm_up(first):
            continue
        plain_baselines = plain.get((first["model"], first["dataset"], ""), [])
        extra = mean_of_measured(paired_deltas(members, plain_baselines, "sft_flops").values())
        per_step = [{**row, "flops_per_step": row["rollout_flops"] / steps_per_run[row["instance"]]}
                    for row in [*members, *baselines]
                    if row.get("rollout_flops") is not None and steps_per_run.get(row["instance"])]
        nested_runs = [row for row in per_step if row["role"] != "baseline"]
        saving = mean_of_measured(-delta for delta in paired_deltas(
            nested_runs, [row for row in per_step if row["role"] == "baseline"], "flops_per_step").values())
        table.append({"model": first["model"], "dataset": first["dataset"], "label": configuration_label(first, True),
                      "extra_warm_up_flops": extra, "saving_per_step": saving,
                      "break_even_steps": max(extra, 0.0) / saving if extra is not None and saving and saving > 0
                      else None})
    return table


def run_rows(rows: Sequence[dict], steps: Sequence[dict]) -> list[dict]:
    """One row per finished run, by model, dataset and seed: its configuration, pass@1 before and after, its
    mean diagnostics, in how many of its ReFT steps the batch reward was 0 (every advantage 0), and in how many
    the loss had a gradient (None where steps.csv predates `grad_norm`): a rewarded batch gives none either when
    every completion with a nonzero advantage was cut and `grpo.mask_truncated_completions` drops it."""
    several = several_warm_ups(warm_up(row) for row in rows)
    rewards: dict[str, list[float]] = {}
    gradients: dict[str, list[float | None]] = {}
    for step in steps:
        rewards.setdefault(step["instance"], []).append(step["reward_mean"])
        gradients.setdefault(step["instance"], []).append(step.get("grad_norm"))
    table = []
    for row in rows:
        if row["status"] != "done":
            continue
        run = rewards.get(row["instance"], [])
        columns = ("model", "dataset", "seed", "role", "accuracy", "accuracy_before", *DIAGNOSTICS)
        table.append({**{column: row.get(column) for column in columns}, "warm_up": warm_up(row),
                      "label": configuration_label(row, several), "steps": len(run),
                      "zero_reward_steps": sum(reward == 0 for reward in run),
                      "gradient_steps": _gradient_steps(gradients.get(row["instance"], []))})
    return sorted(table, key=lambda entry: (entry["model"], entry["dataset"], entry["seed"], entry["warm_up"],
                                            entry["role"] != "baseline"))


def _gradient_steps(norms: Sequence[float | None]) -> int | None:
    """How many steps' loss had a finite nonzero gradient; None where a step did not record its norm."""
    if not norms or any(norm is None for norm in norms):
        return None
    return sum(math.isfinite(norm) and norm > 0 for norm in norms)


def _scores_by_run(problems: Iterable[dict]) -> dict[str, dict[tuple[str, str], float]]:
    runs: dict[str, dict[tuple[str, str], float]] = {}
    for row in problems:
        runs.setdefault(row["instance"], {})[(row["benchmark"], row["problem"])] = row["correct"]
    return runs


def _delta(members: list[dict], baselines: list[dict], scores: dict) -> Interval | None:
    """The bootstrap Delta of `members` against the baselines, over the problems every run of both answered."""
    runs = [scores.get(row["instance"]) for row in members + baselines]
    if not baselines or any(run is None for run in runs):
        return None
    shared = sorted(set.intersection(*(set(run) for run in runs)))
    if not shared:
        return None
    arm = lambda group: [[scores[row["instance"]][problem] for problem in shared] for row in group]  # noqa: E731
    return bootstrap_delta(arm(members), arm(baselines))


def learning_curves(steps: Sequence[dict], rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """Per (model, dataset) and configuration label (naming the warm-up where there are several): the mean over
    seeds, step by step, of the batch reward and of the cumulative rollout FLOPs (lists aligned on the steps every
    seed reached)."""
    by_run = _steps_by_run(steps)
    several = several_warm_ups(warm_up(row) for row in rows)
    curves: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        run = by_run.get(row["instance"], [])
        if row["status"] != "done" or not run:
            continue
        label = configuration_label(row, several)
        seeds = curves.setdefault((row["model"], row["dataset"]), {}).setdefault(label, [])
        seeds.append((
            [step["reward_mean"] for step in run],
            list(np.cumsum([step["rollout_flops"] or 0.0 for step in run])),
        ))
    averaged: dict[tuple[str, str], dict[str, dict]] = {}
    for group, labels in curves.items():
        for label, seeds in labels.items():
            length = min(len(reward) for reward, _ in seeds)
            averaged.setdefault(group, {})[label] = {
                "step": list(range(1, length + 1)),
                "reward": [statistics.fmean(reward[i] for reward, _ in seeds) for i in range(length)],
                "flops": [statistics.fmean(flops[i] for _, flops in seeds) for i in range(length)],
            }
    return averaged


def _steps_by_run(steps: Iterable[dict]) -> dict[str, list[dict]]:
    """steps.csv's rows by run, in step order."""
    by_run: dict[str, list[dict]] = {}
    for step in steps:
        by_run.setdefault(step["instance"], []).append(step)
    return {instance: sorted(run, key=lambda step: step["step"]) for instance, run in by_run.items()}


def plot_learning_curves(curves: dict, output_dir: Path) -> list[Path]:
    """One PNG per (model, dataset): reward against step, and against cumulative rollout FLOPs."""
    plt = pyplot()
    paths = []
    for (model, dataset), labels in curves.items():
        figure, (by_step, by_flops) = plt.subplots(1, 2, figsize=(12, 4.2))
        for index, (label, curve) in enumerate(labels.items()):
            by_step.plot(curve["step"], _smooth(curve["reward"]), label=label, **series_style(index))
            by_flops.plot(curve["flops"], _smooth(curve["reward"]), label=label, **series_style(index))
        by_step.set(xlabel="ReFT step", ylabel="batch reward (mean of seeds, 5-step moving average)",
                    title="Reward against step")
        by_flops.set(xlabel="cumulative rollout FLOPs", ylabel="batch reward", title="Reward against rollout compute")
        by_step.legend(fontsize=7)
        figure.suptitle(f"{model} on {dataset}")
        figure.tight_layout()
        paths.append(save_figure(figure, Path(output_dir) / f"curves-{model_slug(model)}-{dataset}.png"))
    return paths


def plot_diagnostics(table: Sequence[dict], output_dir: Path) -> list[Path]:
    """One PNG per (model, dataset): each off-policy diagnostic, and the Delta accuracy with its interval, against
    the mean number of layers skipped, one line per mitigation and variant (and warm-up, where there are several).
    U rather than x on the axis: an adaptive policy's x is only its bound, and its points belong where its nested
    models actually were."""
    plt = pyplot()
    paths = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in table:
        groups.setdefault((entry["model"], entry["dataset"]), []).append(entry)
    panels = {column: title for column, title in DIAGNOSTICS.items() if column != "skipped_layers"}
    several = several_warm_ups(warm_up(entry) for entry in table)
    for (model, dataset), entries in groups.items():
        figure, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.6))
        series: dict[str, list[dict]] = {}
        for entry in entries:
            name = "baseline" if entry["role"] == "baseline" else f"{entry['mitigation']} {entry['variant']}".strip()
            series.setdefault(named(name, warm_up(entry), several), []).append(entry)
        for index, (name, members) in enumerate(series.items()):
            members = sorted((e for e in members if e["skipped_layers"] is not None), key=lambda e: e["skipped_layers"])
            for axis, column in zip(axes, panels):
                points = [(e["skipped_layers"], e[column]) for e in members if e[column] is not None]
                if points:
                    axis.plot(*zip(*points), marker="o", label=name, **series_style(index))
            deltas = [(e["skipped_layers"], e["delta"]) for e in members if e["delta"] is not None]
            if deltas:
                u, delta = zip(*deltas)
                centre = [100 * d.mean for d in delta]
                spread = [[c - 100 * d.low for c, d in zip(centre, delta)],
                          [100 * d.high - c for c, d in zip(centre, delta)]]
                axes[-1].errorbar(u, centre, yerr=spread, marker="o", capsize=3, label=name, **series_style(index))
        for axis, title in zip(axes, [*panels.values(), "Δ pass@1 vs baseline, points [95% CI]"]):
            axis.set(xlabel="layers skipped U (mean over steps)", title=title)
            axis.grid(alpha=0.3)
        axes[-1].axhline(0, color="grey", linewidth=0.8)
        axes[0].legend(fontsize=7)
        figure.suptitle(f"Off-policy diagnostics and accuracy against the layers skipped, {model} on {dataset} "
                        "(means over steps and seeds)")
        figure.tight_layout()
        paths.append(save_figure(figure, Path(output_dir) / f"diagnostics-{model_slug(model)}-{dataset}.png"))
    return paths


def plot_delta_against_kl(rows: Sequence[dict], output_dir: Path) -> list[Path]:
    """One PNG per (model, dataset): each nested run's pass@1 minus its own baseline's (same warm-up and seed)
    against its KL(behavior || target) per token, one series per configuration: does a closer behavior model
    keep more of what ReFT learns, and how close would it have to be?"""
    plt = pyplot()
    several = several_warm_ups(warm_up(row) for row in rows)
    groups: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    for members, baselines in configurations(rows):
        first = members[0]
        if first["role"] == "baseline":
            continue
        deltas = paired_deltas(members, baselines)
        points = [(row["kl_behavior_target"], 100 * deltas[row["seed"]]) for row in members
                  if row["seed"] in deltas and row.get("kl_behavior_target") is not None]
        if points:
            groups.setdefault((first["model"], first["dataset"]), {})[configuration_label(first, several)] = points
    paths = []
    for (model, dataset), series in groups.items():
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, (label, points) in enumerate(series.items()):
            style = series_style(index)
            axis.scatter(*zip(*points), color=style["color"], label=label,
                         marker="os^Dv"[(index // 10) % 5])
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set(xlabel="KL(behavior || target) per token, mean over the run's steps",
                 ylabel="Δ pass@1 vs its own baseline, points", title=f"Each nested run, {model} on {dataset}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        paths.append(save_figure(figure, Path(output_dir) / f"delta-against-kl-{model_slug(model)}-{dataset}.png"))
    return paths


def render_study(table: Sequence[dict], runs: Sequence[dict], figures: Sequence[str], conditions: str,
                 warm_ups: Sequence[dict] = (), break_even: Sequence[dict] = ()) -> str:
    """The study's Markdown section: the table of configurations, the figures, the timing conditions, the warm-ups'
    own effect and their break-even (where there are named warm-ups), the runs."""
    lines = [
        "## The study: accuracy with confidence intervals, diagnostics, learning curves\n",
        f"Δ acc is pass@1 minus the baseline's (of the same warm-up), in points, with a {CONFIDENCE:.0%} percentile "
        f"bootstrap interval over seeds and problems ({BOOTSTRAP_SAMPLES} replicates, problems paired across the "
        "arms); an interval that contains 0 is no resolvable difference. Seeds: the mean of each seed's own Δ (the "
        f"run minus the baseline of its seed), with its {CONFIDENCE:.0%} Student t interval over the seeds (n − 1 "
        "degrees of freedom; – for one seed). Before: pass@1 of the SFT warm-ups the runs start from. U, KL, ESS "
        "and truncated are means over the runs' steps; KL first/last ¼: over the first and the last quarter of "
        "the steps (does the closeness a run starts with last?).\n",
        "| model | dataset | configuration | seeds | before | after | Δ acc [95% CI] | Δ acc, seeds [95% t CI] | U "
        "| KL | KL first ¼ | KL last ¼ | ESS | truncated | gen tok/s | rollout TFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['model']} | {e['dataset']} | {e['label']} | {e['seeds']} | {_percent(e['accuracy_before'])} "
            f"| {_percent(e['accuracy'])} | {bootstrap_text(e['delta'])} | {seeds_text(e)} "
            f"| {_number(e['skipped_layers'], '.2f')} | {_number(e['kl_behavior_target'], '.3f')} "
            f"| {_number(e['kl_first_quarter'], '.3f')} | {_number(e['kl_last_quarter'], '.3f')} "
            f"| {_number(e['h_ess'], '.3f')} | {_number(e['h_truncated'], '.3f')} "
            f"| {_number(e['gen_tokens_per_s'], '.1f')} "
            f"| {_tera(e['rollout_flops'], '.1f')} |"
        )
    lines.append("")
    lines.append(f"Wall-clock figures (gen tok/s) were measured under: {conditions or 'conditions not stated'}. "
                 "Rollout FLOPs come from the model's shapes and the skipped layers and do not depend on the load.\n")
    lines += [f"![{name}]({name})\n" for name in figures]
    lines += render_warm_ups(warm_ups) if warm_ups else []
    lines += render_break_even(break_even) if break_even else []
    lines += render_runs(runs)
    return "\n".join(lines) + "\n"


def render_warm_ups(rows: Sequence[dict]) -> list[str]:
    """The table of `warm_up_rows`: what a named warm-up does to pass@1 on its own, before and after ReFT."""
    lines = [
        "### The warm-ups' own effect: each named warm-up's baseline against the plain warm-up's\n",
        "Per seed, the baselines (x = 0) ReFT trained from the two warm-ups of that seed, then over the seeds both "
        "have. Before: pass@1 of the warm-ups; after: of the baselines. Δ after: the named warm-up's baseline "
        f"minus the plain one's, in points, with a {CONFIDENCE:.0%} bootstrap interval over problems (paired) and, "
        "over several seeds, seeds; seeds: the mean of each seed's own Δ with its t interval.\n",
        "| model | dataset | warm-up | seeds | before: plain → warm-up | after: plain → warm-up "
        "| Δ after [95% CI] | Δ after, seeds [95% t CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['warm_up']} | {r['seeds']} "
            f"| {_percent(r['accuracy_before_plain'])} → {_percent(r['accuracy_before'])} "
            f"| {_percent(r['accuracy_plain'])} → {_percent(r['accuracy'])} | {bootstrap_text(r['delta'])} "
            f"| {seeds_text(r)} |"
        )
    return lines + [""]


def render_break_even(rows: Sequence[dict]) -> list[str]:
    """The table of `break_even_rows`: does the rollout saving pay for a named warm-up, and after how many steps."""
    lines = [
        "### Break-even: after how many ReFT steps the rollout saving pays for the warm-up\n",
        "Extra warm-up: the named warm-up's FLOPs minus the plain one's (same seeds). Saved per step: the baseline's "
        "rollout FLOPs minus the nested run's (same warm-up and seed), over its ReFT steps, measured (a nested "
        "model that stops later generates more). Break-even: extra warm-up / saved per step; never where nothing "
        "was saved.\n",
        "| model | dataset | configuration | extra warm-up TFLOPs | rollout TFLOPs saved per step | break-even steps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        saving = r["saving_per_step"]
        steps = "never" if saving is not None and saving <= 0 else _number(r["break_even_steps"], ".0f")
        lines.append(f"| {r['model']} | {r['dataset']} | {r['label']} | {_tera(r['extra_warm_up_flops'], '.1f')} "
                     f"| {_tera(saving, '.4f')} | {steps} |")
    return lines + [""]


def bootstrap_text(delta: Interval | None) -> str:
    """A bootstrap Delta in points: `mean [low, high]`, – where there is none."""
    return "–" if delta is None else interval_text(delta.mean, delta.low, delta.high, "+.1f", 100)


def seeds_text(entry: dict, spec: str = "+.1f", scale: float = 100) -> str:
    """The SEED_COLUMNS of `entry`: the mean of the seeds' own deltas and its t interval (points by default)."""
    return interval_text(*(entry[column] for column in SEED_COLUMNS[1:]), spec, scale)


def interval_text(mean: float | None, low: float | None, high: float | None, spec: str, scale: float = 1) -> str:
    """`mean [low, high]` times `scale`; `mean [–]` without bounds (one seed), – without a mean."""
    if mean is None:
        return "–"
    bounds = "–" if low is None or high is None else f"{format(scale * low, spec)}, {format(scale * high, spec)}"
    return f"{format(scale * mean, spec)} [{bounds}]"


def render_runs(runs: Sequence[dict]) -> list[str]:
    """The table of `run_rows`: each seed's runs, the gain over the warm-up each started from."""
    lines = [
        "### The runs\n",
        "Gain: pass@1 after ReFT minus the run's warm-up, in points. Zero-reward steps: batches with no rewarded "
        "completion, whose GRPO advantages are all 0. Gradient steps: steps whose loss had a nonzero gradient (none "
        "where the reward was 0, or where every completion with an advantage was cut and "
        "`grpo.mask_truncated_completions` left it out of the loss).\n",
        "| model | dataset | seed | configuration | before | after | gain | zero-reward steps | gradient steps | U "
        "| KL | ESS | truncated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        gain = None if r["accuracy"] is None or r["accuracy_before"] is None else r["accuracy"] - r["accuracy_before"]
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['seed']} | {r['label']} | {_percent(r['accuracy_before'])} "
            f"| {_percent(r['accuracy'])} | {_number(None if gain is None else 100 * gain, '+.1f')} "
            f"| {r['zero_reward_steps']} of {r['steps']} | {_of(r['gradient_steps'], r['steps'])} "
            f"| {_number(r['skipped_layers'], '.2f')} "
            f"| {_number(r['kl_behavior_target'], '.2f')} | {_number(r['h_ess'], '.3f')} "
            f"| {_number(r['h_truncated'], '.3f')} |"
        )
    return lines + [""]


def _of(count: int | None, total: int) -> str:
    return "–" if count is None else f"{count} of {total}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _tera(value: float | None, spec: str) -> str:
    return _number(None if value is None else value / 1e12, spec)


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """A trailing moving average: a batch reward of a few prompts is noisy step to step."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
