"""The study's statistics and figures: accuracy deltas with bootstrap confidence intervals, learning curves
against steps and against rollout FLOPs, and the off-policy diagnostics against the skip ratio.

Read from the results tables only (results.csv, steps.csv, problems.csv; `results`). A configuration is
(model, dataset, x, b, m, variant); its seeds replicate it.

The interval of a configuration's Delta accuracy (its mean pass@1 minus the baseline's, over seeds and the
held-out problems) is a percentile bootstrap over seeds and problems: each replicate draws the seeds of
each arm with replacement and one set of problems with replacement, the same problems for both arms (the
arms answer the same problems, so the comparison is paired), and takes the difference of the means. It
measures both sources of noise this setting has: which seed (warm-up, data order, sampling) and which
problems happen to be in the held-out set.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nested_reft.plots import pyplot, save_figure
from nested_reft.results import model_slug

BOOTSTRAP_SAMPLES = 4000
CONFIDENCE = 0.95
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


def configuration_key(row: dict) -> tuple:
    return (row["model"], row["dataset"], row["skip_ratio"], row["border"], row["mitigation"], row.get("variant", ""))


def configuration_label(row: dict) -> str:
    """How a configuration is named in tables and legends: baseline, or x, mitigation and variant."""
    if row["role"] == "baseline":
        return "baseline (x = 0, b = 0)"
    variant = f" {row['variant']}" if row.get("variant") else ""
    return f"x = {100 * row['skip_ratio']:g}%, {row['mitigation']}{variant}"


def study_rows(rows: Sequence[dict], problems: Sequence[dict]) -> list[dict]:
    """One row per finished configuration of each (model, dataset): seeds, accuracy before and after ReFT, the
    Delta accuracy to the baseline with its bootstrap interval, and the runs' mean diagnostics."""
    scores = _scores_by_run(problems)
    done = [row for row in rows if row["status"] == "done"]
    groups: dict[tuple, list[dict]] = {}
    for row in done:
        groups.setdefault(configuration_key(row) + (row["role"],), []).append(row)
    baselines = {key[:2]: members for key, members in groups.items() if key[-1] == "baseline"}
    table = []
    for key, members in groups.items():
        entry: dict[str, Any] = {"model": key[0], "dataset": key[1], "label": configuration_label(members[0]),
                                 "role": key[-1], "skip_ratio": key[2], "mitigation": key[4], "variant": key[5],
                                 "seeds": len(members)}
        for column in ("accuracy", "accuracy_before", "gen_tokens_per_s", "rollout_flops", *DIAGNOSTICS):
            values = [row[column] for row in members if row.get(column) is not None]
            entry[column] = statistics.fmean(values) if values else None
        entry["delta"] = _delta(members, baselines.get(key[:2], []), scores)
        table.append(entry)
    return table


def run_rows(rows: Sequence[dict], steps: Sequence[dict]) -> list[dict]:
    """One row per finished run, by model, dataset and seed: its configuration, pass@1 before and after, its
    mean diagnostics, in how many of its ReFT steps the batch reward was 0 (every advantage 0), and in how many
    the loss had a gradient (None where steps.csv predates `grad_norm`): a rewarded batch gives none either when
    every completion with a nonzero advantage was cut and `grpo.mask_truncated_completions` drops it."""
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
        table.append({**{column: row.get(column) for column in columns},
                      "label": configuration_label(row), "steps": len(run),
                      "zero_reward_steps": sum(reward == 0 for reward in run),
                      "gradient_steps": _gradient_steps(gradients.get(row["instance"], []))})
    return sorted(table, key=lambda entry: (entry["model"], entry["dataset"], entry["seed"], entry["role"] != "baseline"))


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
    """Per (model, dataset) and configuration label: the mean over seeds, step by step, of the batch reward
    and of the cumulative rollout FLOPs (lists aligned on the steps every seed reached)."""
    by_run: dict[str, list[dict]] = {}
    for step in steps:
        by_run.setdefault(step["instance"], []).append(step)
    curves: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        run = sorted(by_run.get(row["instance"], []), key=lambda step: step["step"])
        if row["status"] != "done" or not run:
            continue
        seeds = curves.setdefault((row["model"], row["dataset"]), {}).setdefault(configuration_label(row), [])
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


def plot_learning_curves(curves: dict, output_dir: Path) -> list[Path]:
    """One PNG per (model, dataset): reward against step, and against cumulative rollout FLOPs."""
    plt = pyplot()
    paths = []
    for (model, dataset), labels in curves.items():
        figure, (by_step, by_flops) = plt.subplots(1, 2, figsize=(12, 4.2))
        for label, curve in labels.items():
            by_step.plot(curve["step"], _smooth(curve["reward"]), label=label)
            by_flops.plot(curve["flops"], _smooth(curve["reward"]), label=label)
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
    the mean number of layers skipped, one line per mitigation and variant. U rather than x on the axis: an
    adaptive policy's x is only its bound, and its points belong where its nested models actually were."""
    plt = pyplot()
    paths = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in table:
        groups.setdefault((entry["model"], entry["dataset"]), []).append(entry)
    panels = {column: title for column, title in DIAGNOSTICS.items() if column != "skipped_layers"}
    for (model, dataset), entries in groups.items():
        figure, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.6))
        series: dict[str, list[dict]] = {}
        for entry in entries:
            name = "baseline" if entry["role"] == "baseline" else f"{entry['mitigation']} {entry['variant']}".strip()
            series.setdefault(name, []).append(entry)
        for name, members in series.items():
            members = sorted((e for e in members if e["skipped_layers"] is not None), key=lambda e: e["skipped_layers"])
            for axis, column in zip(axes, panels):
                points = [(e["skipped_layers"], e[column]) for e in members if e[column] is not None]
                if points:
                    axis.plot(*zip(*points), marker="o", label=name)
            deltas = [(e["skipped_layers"], e["delta"]) for e in members if e["delta"] is not None]
            if deltas:
                u, delta = zip(*deltas)
                centre = [100 * d.mean for d in delta]
                spread = [[c - 100 * d.low for c, d in zip(centre, delta)],
                          [100 * d.high - c for c, d in zip(centre, delta)]]
                axes[-1].errorbar(u, centre, yerr=spread, marker="o", capsize=3, label=name)
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


def render_study(table: Sequence[dict], runs: Sequence[dict], figures: Sequence[str], conditions: str) -> str:
    """The study's Markdown section: the table of configurations, the figures, the timing conditions, the runs."""
    lines = [
        "## The study: accuracy with confidence intervals, diagnostics, learning curves\n",
        f"Δ acc is pass@1 minus the baseline's, in points, with a {CONFIDENCE:.0%} percentile bootstrap interval "
        f"over seeds and problems ({BOOTSTRAP_SAMPLES} replicates, problems paired across the arms); an interval "
        "that contains 0 is no resolvable difference. Before: pass@1 of the SFT warm-ups the runs start from. "
        "U, KL, ESS and truncated are means over the runs' steps.\n",
        "| model | dataset | configuration | seeds | before | after | Δ acc [95% CI] | U | KL | ESS | truncated "
        "| gen tok/s | rollout TFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        delta = e["delta"]
        cell = "–" if delta is None else f"{100 * delta.mean:+.1f} [{100 * delta.low:+.1f}, {100 * delta.high:+.1f}]"
        lines.append(
            f"| {e['model']} | {e['dataset']} | {e['label']} | {e['seeds']} | {_percent(e['accuracy_before'])} "
            f"| {_percent(e['accuracy'])} | {cell} | {_number(e['skipped_layers'], '.2f')} "
            f"| {_number(e['kl_behavior_target'], '.3f')} | {_number(e['h_ess'], '.3f')} "
            f"| {_number(e['h_truncated'], '.3f')} | {_number(e['gen_tokens_per_s'], '.1f')} "
            f"| {_number(None if e['rollout_flops'] is None else e['rollout_flops'] / 1e12, '.1f')} |"
        )
    lines.append("")
    lines.append(f"Wall-clock figures (gen tok/s) were measured under: {conditions or 'conditions not stated'}. "
                 "Rollout FLOPs come from the model's shapes and the skipped layers and do not depend on the load.\n")
    lines += [f"![{name}]({name})\n" for name in figures]
    lines += render_runs(runs)
    return "\n".join(lines) + "\n"


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


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """A trailing moving average: a batch reward of a few prompts is noisy step to step."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
