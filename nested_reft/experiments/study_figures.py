"""The study's figures: learning curves against steps and against rollout FLOPs, the off-policy diagnostics and
the Delta accuracy against the layers skipped, each nested run's Delta against its KL, and pass@1 against the rollout
FLOPs spent (from `study`'s rows)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from nested_reft.experiments.plots import pyplot, save_figure, series_style
from nested_reft.experiments.results import model_slug
from nested_reft.experiments.stats import paired_deltas
from nested_reft.experiments.study import (
    DIAGNOSTICS, configuration_label, configurations, named, several_warm_ups, warm_up,
)


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


def plot_cost_curves(rows: Sequence[dict], curve: Sequence[dict], cost: Sequence[dict], output_dir: Path
                     ) -> list[Path]:
    """One PNG per (model, dataset) with points in curve.csv: each run's pass@1 against the rollout FLOPs it had
    spent (thin), and each configuration's mean over its seeds (`cost`, thick, with markers)."""
    plt = pyplot()
    several = several_warm_ups(warm_up(row) for row in rows)
    runs: dict[str, list[dict]] = {}
    for point in curve:
        runs.setdefault(point["instance"], []).append(point)
    figures: dict[tuple[str, str], object] = {}
    for index, entry in enumerate(cost):
        if (entry["model"], entry["dataset"]) not in figures:
            figures[(entry["model"], entry["dataset"])] = plt.subplots(figsize=(8, 5))
        _, axis = figures[(entry["model"], entry["dataset"])]
        style = series_style(index)
        for row in rows:
            if row["status"] == "done" and row["model"] == entry["model"] and row["dataset"] == entry["dataset"] \
                    and configuration_label(row, several) == entry["label"] and row["instance"] in runs:
                points = sorted((point for point in runs[row["instance"]] if point["rollout_flops"] is not None),
                                key=lambda point: point["step"])
                axis.plot([p["rollout_flops"] / 1e12 for p in points], [100 * p["accuracy"] for p in points],
                          alpha=0.3, linewidth=0.8, **style)
        known = [point for point in entry["curve"] if point["flops"] is not None]
        axis.plot([p["flops"] / 1e12 for p in known], [100 * p["accuracy"] for p in known],
                  marker="o", linewidth=2, label=f"{entry['label']} (mean of {entry['seeds']})", **style)
    paths = []
    for (model, dataset), (figure, axis) in figures.items():
        axis.set(xlabel="cumulative rollout TFLOPs", ylabel="pass@1 (%)",
                 title=f"pass@1 against rollout compute, {model} on {dataset} (thin: each run)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        paths.append(save_figure(figure, Path(output_dir) / f"cost-{model_slug(model)}-{dataset}.png"))
    return paths


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """A trailing moving average: a batch reward of a few prompts is noisy step to step."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
