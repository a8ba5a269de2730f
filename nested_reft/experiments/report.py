"""The sweep's figures and tables (section 3.1 of the paper), computed from results.csv and nothing else.

`nested-reft report SWEEP_DIR` reads SWEEP_DIR/results.csv (one row per instance, written by `sweep`) and
writes into SWEEP_DIR/report/:

* `deltas.csv`: per finished instance, each metric z (average accuracy a, token speed, total runtime), the
  baseline's z (the mean over the baseline seeds of the same model, dataset and warm-up) and its spread, and
  Delta(z) = 100 (z - z_base) / z_base and Delta_abs(z) = z - z_base; then the accuracy of the baseline of its own
  seed and warm-up, Delta_abs to it, and over its configuration's seeds the mean of those with its t interval
  (`stats.SEED_COLUMNS`);
* `figure1-<model>-<dataset>[-<warm-up>].png`: Figure 1, three panels (Delta accuracy %, Delta tok/s %, Delta
  runtime %) against the skip ratio x, one line per mitigation, the baseline's seed spread as a grey band; the
  smallest value of a panel is annotated in red, the largest in green, as in the paper;
* `report.md`: the baselines and their spread, Table 2 (best and worst Delta_abs accuracy per dataset and
  their mean absolute value per model), the best/worst/neutral counts per mitigation, the linear fits of
  Delta tok/s and Delta runtime against x with R^2, the per-instance deltas, and links to the figures.

Instances that differ only by seed are averaged before Table 2, the counts, the fits and the figure (an
"instance" of the paper is a configuration (x, b, m); seeds replicate it). Runs from different warm-ups (a grid's
`warm_ups`) are kept apart: each compares with its own warm-up's baselines, and the tables name the warm-up where
there are several. The computations are small pure functions over rows (dicts), so they test without files.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nested_reft.store.files import atomic_write_text, check_output_directory, written_on_success
from nested_reft.experiments import study, study_figures
from nested_reft.experiments.formatting import number, seeds_text
from nested_reft.experiments.plots import pyplot, save_figure, series_style
from nested_reft.experiments.results import (
    CONDITIONS_FILE, CURVE_COLUMNS, CURVE_FILE, METRIC_COLUMNS, OPTIONAL_STEP_COLUMNS, PROBLEM_COLUMNS, PROBLEMS_FILE,
    RESULTS_FILE, STEP_COLUMNS, STEPS_FILE, ResultsError, csv_text, model_slug, read_results, read_table,
)
from nested_reft.experiments.stats import SEED_COLUMNS, paired_deltas, seed_summary
from nested_reft.experiments.study_markdown import render_study

# metric column -> label in figures and tables. Accuracy and tok/s are to maximise, runtime to minimise.
METRICS = dict(zip(METRIC_COLUMNS, ("accuracy", "tok/s", "runtime")))
REPORT_DIR = "report"
TIE = 1e-12  # Delta_abs accuracies closer than this count as the same value (a tie for best or worst)


# ----------------------------------------------------------------------------------------------------------
# Deltas to the baseline
# ----------------------------------------------------------------------------------------------------------


def relative_delta(value: float, baseline: float) -> float | None:
    """Delta(z) = 100 (z - z_base) / z_base; None where z_base = 0 (undefined)."""
    return None if baseline == 0 else 100.0 * (value - baseline) / baseline


def baseline_summary(rows: Iterable[dict]) -> dict[tuple[str, str, str], dict]:
    """Per (model, dataset, warm-up): the number of finished baseline seeds and each metric's mean, std, min, max."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row["role"] == "baseline" and row["status"] == "done":
            groups[study.group_key(row)].append(row)
    summary = {}
    for key, members in groups.items():
        entry: dict[str, Any] = {"n": len(members), "seeds": sorted(row["seed"] for row in members)}
        for metric in METRICS:
            values = [row[metric] for row in members]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{metric}_min"], entry[f"{metric}_max"] = min(values), max(values)
        summary[key] = entry
    return summary


def compute_deltas(rows: Sequence[dict]) -> list[dict]:
    """Every finished instance (baselines too) against the mean of its group's finished baselines (same model,
    dataset and warm-up), and against the baseline of its own seed in that group (`seed_deltas`).

    Instances of a group with no finished baseline are left out (the report lists them).
    """
    baselines = baseline_summary(rows)
    paired = seed_deltas(rows)
    deltas = []
    for row in rows:
        base = baselines.get(study.group_key(row))
        if row["status"] != "done" or base is None:
            continue
        entry = {key: row[key] for key in ("model", "dataset", "instance", "role", "skip_ratio", "border",
                                           "mitigation", "seed")}
        entry["variant"] = row.get("variant", "")  # optional: results.csv files from before variants have none
        entry["warm_up"] = study.warm_up(row)
        entry["baseline_n"] = base["n"]
        for metric in METRICS:
            entry[metric] = row[metric]
            entry[f"{metric}_baseline"] = base[metric]
            entry[f"{metric}_baseline_std"] = base[f"{metric}_std"]
            entry[f"delta_{metric}"] = relative_delta(row[metric], base[metric])
            entry[f"delta_abs_{metric}"] = row[metric] - base[metric]
        deltas.append({**entry, **paired[row["instance"]]})
    return deltas


def seed_deltas(rows: Sequence[dict]) -> dict[str, dict]:
    """Per finished instance: the accuracy of its group's baseline of the same seed (the one that started from the
    same warm-up), its Delta_abs accuracy to it (None where that baseline did not finish), and its configuration's
    SEED_COLUMNS: the mean of its seeds' such deltas and their t interval."""
    paired = {}
    for runs, baselines in study.configurations(rows):
        deltas = paired_deltas(runs, baselines)
        summary = seed_summary(list(deltas.values()))
        reference = {row["seed"]: row["accuracy"] for row in baselines}
        for row in runs:
            paired[row["instance"]] = {"accuracy_seed_baseline": reference.get(row["seed"]),
                                       "delta_abs_accuracy_seed": deltas.get(row["seed"]), **summary}
    return paired


def series(row: dict) -> str:
    """A mitigation, or a mitigation and a variant (`retrace+influence`): the lines of Figure 1 and the counts."""
    return f"{row['mitigation']}+{row['variant']}" if row.get("variant") else row["mitigation"]


def instance_means(deltas: Iterable[dict]) -> list[dict]:
    """Nested instances averaged over seeds: one point per (model, dataset, warm-up, x, b, m and variant), in
    first-seen order, with its seeds' SEED_COLUMNS; a variant's mitigation is reported as `series` names it."""
    groups: dict[tuple, list[dict]] = {}
    for row in deltas:
        if row["role"] == "nested":
            groups.setdefault(study.configuration_key(row), []).append(row)
    points = []
    for members in groups.values():
        first = members[0]
        point: dict[str, Any] = dict(model=first["model"], dataset=first["dataset"], warm_up=study.warm_up(first),
                                     skip_ratio=first["skip_ratio"], border=first["border"], mitigation=series(first),
                                     n_seeds=len(members), **{column: first[column] for column in SEED_COLUMNS})
        for metric in METRICS:
            for prefix in ("delta_", "delta_abs_"):
                values = [row[prefix + metric] for row in members if row[prefix + metric] is not None]
                point[prefix + metric] = statistics.fmean(values) if values else None
        points.append(point)
    return points


# ----------------------------------------------------------------------------------------------------------
# Table 2, the best/worst/neutral counts, the linear fits
# ----------------------------------------------------------------------------------------------------------


def _configurations(points: Iterable[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """The points by group (model, dataset, warm-up): each group's deltas are to its own baseline."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for point in points:
        groups.setdefault(study.group_key(point), []).append(point)
    return groups


def _scope(dataset: str, warm_up: str, points: Iterable[dict]) -> str:
    """A group's column or row name in the tables: its dataset, after its warm-up where `points` have several."""
    return study.named(dataset, warm_up, study.several_warm_ups(study.warm_up(point) for point in points))


def table2(points: Sequence[dict]) -> dict[str, dict]:
    """Per model: the best and worst Delta_abs accuracy per dataset (per dataset and warm-up where there are
    several, `warm-up/dataset`), and the mean of their absolute values.

    {model: {"datasets": [...], "best": {dataset: value}, "worst": {...}, "best_mean_abs": v, "worst_mean_abs": v}}
    """
    table: dict[str, dict] = {}
    for (model, dataset, warm_up), members in _configurations(points).items():
        dataset = _scope(dataset, warm_up, points)
        values = [point["delta_abs_accuracy"] for point in members]
        entry = table.setdefault(model, {"datasets": [], "best": {}, "worst": {}})
        entry["datasets"].append(dataset)
        entry["best"][dataset], entry["worst"][dataset] = max(values), min(values)
    for entry in table.values():
        for row in ("best", "worst"):
            entry[f"{row}_mean_abs"] = statistics.fmean(abs(value) for value in entry[row].values())
    return table


def format_table2(table: dict[str, dict]) -> str:
    """Table 2 as Markdown: rows Best/Worst per model, one column per dataset, then the mean |Delta_abs|."""
    datasets = list(dict.fromkeys(dataset for entry in table.values() for dataset in entry["datasets"]))
    lines = ["| Model | Instance | " + " | ".join(datasets) + " | mean abs |", "|---" * (len(datasets) + 3) + "|"]
    for model, entry in table.items():
        for index, row in enumerate(("best", "worst")):
            cells = [f"{entry[row][d]:+.3f}" if d in entry[row] else "–" for d in datasets]
            label = model if index == 0 else ""
            mean_abs = entry[f"{row}_mean_abs"]
            lines.append(f"| {label} | {row.capitalize()} | " + " | ".join(cells) + f" | {mean_abs:.3f} |")
    return "\n".join(lines) + "\n"


def mitigation_counts(points: Sequence[dict]) -> dict[str, dict[str, int]]:
    """Over (model, dataset) configurations: how often each mitigation holds the best (max Delta accuracy)
    instance, the worst (min), or neither ("neutral"). A mitigation can be both best and worst in one
    configuration (then it is not neutral); ties count for every mitigation that attains the extreme.

    {mitigation: {"best": n, "worst": n, "neutral": n, "configurations": N}}
    """
    configurations = _configurations(points)
    mitigations = list(dict.fromkeys(point["mitigation"] for point in points))
    counts = {m: {"best": 0, "worst": 0, "neutral": 0, "configurations": 0} for m in mitigations}
    for members in configurations.values():
        values = [point["delta_abs_accuracy"] for point in members]
        high, low = max(values), min(values)
        best = {p["mitigation"] for p in members if p["delta_abs_accuracy"] >= high - TIE}
        worst = {p["mitigation"] for p in members if p["delta_abs_accuracy"] <= low + TIE}
        for mitigation in dict.fromkeys(point["mitigation"] for point in members):
            entry = counts[mitigation]
            entry["configurations"] += 1
            entry["best"] += mitigation in best
            entry["worst"] += mitigation in worst
            entry["neutral"] += mitigation not in best and mitigation not in worst
    return counts


@dataclass(frozen=True)
class LinearFit:
    """y = slope * x + intercept by least squares; r2 = 1 - SS_res / SS_tot."""

    slope: float
    intercept: float
    r2: float
    n: int


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """Least-squares line through (xs, ys); NaNs where the xs do not vary (no line is determined).

    When the ys do not vary, R^2 is 1 if the line fits them exactly (it does), by convention.
    """
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"{n} xs but {len(ys)} ys")
    if n < 2 or len(set(xs)) < 2:
        return LinearFit(math.nan, math.nan, math.nan, n)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LinearFit(slope, intercept, r2, n)


def efficiency_fits(points: Sequence[dict]) -> list[dict]:
    """Delta tok/s % and Delta runtime % against x: per (model, dataset, warm-up), then pooled over all of them."""
    scopes = [((model, _scope(dataset, warm_up, points)), members)
              for (model, dataset, warm_up), members in _configurations(points).items()]
    scopes.append((("all", "all"), list(points)))
    fits = []
    for (model, dataset), members in scopes:
        for metric in ("token_speed", "total_runtime_s"):
            pairs = [(p["skip_ratio"], p[f"delta_{metric}"]) for p in members if p[f"delta_{metric}"] is not None]
            fit = linear_fit([x for x, _ in pairs], [y for _, y in pairs])
            fits.append(dict(model=model, dataset=dataset, metric=metric, slope=fit.slope,
                             intercept=fit.intercept, r2=fit.r2, n=fit.n))
    return fits


# ----------------------------------------------------------------------------------------------------------
# Figure 1
# ----------------------------------------------------------------------------------------------------------


def figure_name(model: str, dataset: str, warm_up: str = "") -> str:
    """`figure1-<model-slug>-<dataset>.png`, the model named as the sweep names its directories, and
    `-<warm-up>` before `.png` for a named warm-up's runs, as their directories are named."""
    return f"figure1-{model_slug(model)}-{dataset}{f'-{warm_up}' if warm_up else ''}.png"


def plot_figure1(points: Sequence[dict], baselines: dict[tuple[str, str, str], dict], output_dir: Path) -> list[Path]:
    """One PNG per (model, dataset, warm-up): Delta accuracy %, Delta tok/s %, Delta runtime % against x."""
    plt = pyplot()
    paths = []
    for (model, dataset, warm_up), members in _configurations(points).items():
        figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        base = baselines.get((model, dataset, warm_up), {})
        for axis, metric in zip(axes, METRICS):
            _panel(axis, members, metric, base)
        axes[0].legend(title="mitigation", fontsize=8)
        start = f" from the {warm_up} warm-up" if warm_up else ""
        figure.suptitle(f"{model} fine-tuned on {dataset}{start}: deltas to the baseline (x = 0, b = 0, base)")
        figure.tight_layout()
        paths.append(save_figure(figure, Path(output_dir) / figure_name(model, dataset, warm_up)))
    return paths


def _panel(axis, members: Sequence[dict], metric: str, base: dict) -> None:
    key = f"delta_{metric}"
    axis.axhline(0.0, color="black", linewidth=0.8)
    spread = base.get(f"{metric}_std")
    if spread and base.get(metric):
        band = 100.0 * spread / abs(base[metric])
        axis.axhspan(-band, band, color="grey", alpha=0.2, label=f"baseline ±1 sd ({base['n']} seeds)")
    for index, mitigation in enumerate(dict.fromkeys(point["mitigation"] for point in members)):
        line = sorted((p["skip_ratio"], p[key]) for p in members if p["mitigation"] == mitigation)
        xs = [100 * x for x, _ in line]
        ys = [math.nan if y is None else y for _, y in line]
        axis.plot(xs, ys, marker="o", label=mitigation, **series_style(index))
    values = [(100 * p["skip_ratio"], p[key]) for p in members if p[key] is not None]
    if values:
        for (x, y), colour in ((min(values, key=lambda v: v[1]), "red"), (max(values, key=lambda v: v[1]), "green")):
            axis.annotate(f"{y:+.2f}", (x, y), color=colour, textcoords="offset points", xytext=(4, 4), fontsize=8)
    goal = "minimise" if metric == "total_runtime_s" else "maximise"
    axis.set(xlabel="skip ratio x (%)", ylabel=f"Δ {METRICS[metric]} (%)", title=f"Δ {METRICS[metric]} (%), {goal}")
    axis.grid(alpha=0.3)


# ----------------------------------------------------------------------------------------------------------
# Files: deltas.csv and report.md
# ----------------------------------------------------------------------------------------------------------

DELTA_COLUMNS = ["model", "dataset", "instance", "role", "skip_ratio", "border", "mitigation", "variant",
                 "warm_up", "seed", "baseline_n"] + [
    f"{prefix}{metric}{suffix}"
    for metric in METRICS
    for prefix, suffix in (("", ""), ("", "_baseline"), ("", "_baseline_std"), ("delta_", ""), ("delta_abs_", ""))
] + ["accuracy_seed_baseline", "delta_abs_accuracy_seed", *SEED_COLUMNS]


def deltas_csv(deltas: Sequence[dict]) -> str:
    return csv_text(DELTA_COLUMNS, deltas)


def write_report(sweep_dir: str | Path, output_dir: str | Path | None = None) -> Path:
    """Read SWEEP_DIR/results.csv only; write deltas.csv, the Figure 1 PNGs and report.md; return report.md.
    They are written under the output directory's lock and appear together, once all of them are made: a report
    refused midway (a damaged steps.csv) leaves none of them."""
    sweep_dir = Path(sweep_dir)
    output = Path(output_dir) if output_dir is not None else sweep_dir / REPORT_DIR
    check_output_directory(output, "--output-dir")
    rows = read_results(sweep_dir / RESULTS_FILE)
    if not any(row["status"] == "done" for row in rows):
        raise ResultsError(f"{sweep_dir / RESULTS_FILE} has no finished instance yet")
    with written_on_success(output, f"report directory {output}") as staging:
        baselines = baseline_summary(rows)
        deltas = compute_deltas(rows)
        points = instance_means(deltas)
        figures = plot_figure1(points, baselines, staging)
        atomic_write_text(staging / "deltas.csv", deltas_csv(deltas))
        text = render_markdown(rows, baselines, deltas, points, [path.name for path in figures])
        atomic_write_text(staging / "report.md", text + study_section(sweep_dir, rows, staging))
    return output / "report.md"


def study_section(sweep_dir: Path, rows: Sequence[dict], output: Path) -> str:
    """The study's part of the report (`study`, `study_figures`, `study_markdown`), where the sweep wrote steps.csv
    and problems.csv."""
    steps = read_table(sweep_dir / STEPS_FILE, STEP_COLUMNS, OPTIONAL_STEP_COLUMNS)
    problems = read_table(sweep_dir / PROBLEMS_FILE, PROBLEM_COLUMNS)
    if not steps and not problems:
        return ""
    table = study.study_rows(rows, problems, steps)
    figures = study_figures.plot_learning_curves(study.learning_curves(steps, rows), output)
    figures += study_figures.plot_diagnostics(table, output)
    figures += study_figures.plot_delta_against_kl(rows, output)
    conditions = (sweep_dir / CONDITIONS_FILE).read_text().strip() if (sweep_dir / CONDITIONS_FILE).is_file() else ""
    runs = study.run_rows(rows, steps)
    warm_ups = study.warm_up_rows(rows, problems)
    break_even = study.break_even_rows(rows, steps)
    curve = read_table(sweep_dir / CURVE_FILE, CURVE_COLUMNS)
    cost = study.cost_rows(rows, curve)
    if not any(len(entry["curve"]) > 2 for entry in cost):  # evaluated before and after only: the tables say it
        cost = []
    figures += study_figures.plot_cost_curves(rows, curve, cost, output) if cost else []
    return "\n" + render_study(table, runs, [path.name for path in figures], conditions, warm_ups, break_even, cost)


def render_markdown(rows, baselines, deltas, points, figure_files: Sequence[str]) -> str:
    done = sum(row["status"] == "done" for row in rows)
    parts = [
        "# Nested-ReFT sweep report\n",
        f"From `results.csv`: {len(rows)} instances, {done} done. Deltas are to the baseline (x = 0, b = 0, "
        "m = base) of the same model, dataset and warm-up, averaged over its seeds: Δ(z) = 100 (z − z_base) / "
        "z_base, Δ_abs(z) = z − z_base; accuracy is the average over the benchmarks (a fraction). Seeds of one "
        "configuration are averaged; Δ_abs acc, seeds: the mean of each seed's Δ_abs accuracy to the baseline of "
        "its own seed, with its 95% Student t interval over the seeds (– for one seed). Per-instance values: "
        "[deltas.csv](deltas.csv).\n",
        _not_done_section(rows, baselines),
        "## Baselines and their seed spread\n",
        _baseline_table(baselines),
    ]
    if points:
        parts += [
            "## Table 2: best and worst Δ_abs accuracy\n",
            "Max and min over the instances of each dataset; last column: mean absolute value across datasets.\n",
            format_table2(table2(points)),
            "## Best / worst / neutral counts per mitigation (section 3.1)\n",
            _counts_table(mitigation_counts(points)),
            "## Efficiency against the skip ratio: least-squares lines (Δ in %, x as a fraction)\n",
            _fits_table(efficiency_fits(points)),
            "## Figure 1\n",
            "".join(f"![{name}]({name})\n\n" for name in figure_files),
            "## Deltas per instance\n",
            _points_table(points),
        ]
    return "\n".join(part for part in parts if part)


def _not_done_section(rows: Sequence[dict], baselines: dict) -> str:
    lines = []
    pending = [row for row in rows if row["status"] != "done"]
    if pending:
        lines.append(f"Not done ({len(pending)}), left out:\n")
        lines += [f"- `{row['instance']}`: {row['status']}" + (f" ({row['error']})" if row.get("error") else "")
                  for row in pending]
    groups = {study.group_key(row) for row in rows if row["status"] == "done"}
    several = study.several_warm_ups(warm_up for _, _, warm_up in groups)
    orphans = sorted(groups - set(baselines))
    if orphans:
        lines.append("\nNo finished baseline, so no deltas, for: "
                     + ", ".join(f"{m} / {study.named(d, w, several)}" for m, d, w in orphans))
    return "\n".join(lines) + "\n" if lines else ""


def _baseline_table(baselines: dict) -> str:
    lines = ["| model | dataset | seeds | accuracy mean ± sd (min–max) | tok/s mean ± sd (rel. sd) | "
             "runtime s mean ± sd (rel. sd) |", "|---|---|---|---|---|---|"]
    several = study.several_warm_ups(warm_up for _, _, warm_up in baselines)
    for (model, dataset, warm_up), entry in baselines.items():
        dataset = study.named(dataset, warm_up, several)
        cells = [f"{number(entry['accuracy'], '.4f')} ± {number(entry['accuracy_std'], '.4f')} "
                 f"({entry['accuracy_min']:.4f}–{entry['accuracy_max']:.4f})"]
        for metric in ("token_speed", "total_runtime_s"):
            std = entry[f"{metric}_std"]
            relative = None if std is None or not entry[metric] else 100 * std / entry[metric]
            cells.append(f"{number(entry[metric], '.4g')} ± {number(std, '.3g')} ({number(relative, '.2f')}%)")
        lines.append(f"| {model} | {dataset} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _counts_table(counts: dict) -> str:
    lines = ["| mitigation | best | worst | neutral | configurations |", "|---|---|---|---|---|"]
    for mitigation, entry in counts.items():
        n = entry["configurations"]
        lines.append(f"| {mitigation} | {entry['best']}/{n} | {entry['worst']}/{n} | {entry['neutral']}/{n} | {n} |")
    return "\n".join(lines) + "\n"


def _fits_table(fits: Sequence[dict]) -> str:
    lines = ["| model | dataset | metric | slope (% per unit x) | intercept (%) | R² | points |",
             "|---|---|---|---|---|---|---|"]
    for fit in fits:
        lines.append(f"| {fit['model']} | {fit['dataset']} | Δ {METRICS[fit['metric']]} "
                     f"| {number(fit['slope'], '.2f')} | {number(fit['intercept'], '.2f')} "
                     f"| {number(fit['r2'], '.3f')} | {fit['n']} |")
    return "\n".join(lines) + "\n"


def _points_table(points: Sequence[dict]) -> str:
    lines = ["| model | dataset | x | b | mitigation | seeds | Δ acc % | Δ_abs acc | Δ_abs acc, seeds [95% t CI] "
             "| Δ tok/s % | Δ runtime % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['model']} | {_scope(p['dataset'], study.warm_up(p), points)} | {p['skip_ratio']:g} "
            f"| {p['border']} | {p['mitigation']} | {p['n_seeds']} "
            f"| {number(p['delta_accuracy'], '+.2f')} | {number(p['delta_abs_accuracy'], '+.4f')} "
            f"| {seeds_text(p, '+.4f', 1)} "
            f"| {number(p['delta_token_speed'], '+.2f')} | {number(p['delta_total_runtime_s'], '+.2f')} |"
        )
    return "\n".join(lines) + "\n"


def report_main(sweep_dir: str, output_dir: str | None = None) -> int:
    """The `nested-reft report` command."""
    path = write_report(sweep_dir, output_dir)
    print(f"wrote {path}")
    return 0
