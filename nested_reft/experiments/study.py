"""The study's tables, computed from the results tables: accuracy deltas with bootstrap and seed confidence
intervals, diagnostics, the warm-ups' own effect and their break-even, the runs, and the learning curves.

Read from the results tables only (results.csv, steps.csv, problems.csv; `results`). A group is (model, dataset,
warm-up): the runs that start from one kind of warm-up and share its baselines. A configuration is a group's
(x, b, m, variant); its seeds replicate it. A nested configuration compares with the baselines of its own group
(the effect of nesting, not of the warm-up); a named warm-up's baselines compare with the plain warm-up's (the
warm-up's own effect). Where the results hold several warm-ups, tables and legends name each configuration's.

The intervals are `stats`' (a bootstrap over seeds and problems, and the seeds' own t interval); the figures are
drawn by `study_figures`, the Markdown section written by `study_markdown`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from nested_reft.experiments.results import mean_of_measured
from nested_reft.experiments.stats import Interval, bootstrap_delta, paired_deltas, seed_summary

# what a run with rollout selection (grpo.filter_groups, sampling.skip_predictable) records per step in steps.csv
SELECTION_COUNTS = ("groups_sampled", "groups_kept", "prompts_skipped")
PLAIN_WARM_UP = "plain"  # how tables and legends name the grid's own warm-up (train.sft; results.csv's "")
DIAGNOSTICS = {"kl_behavior_target": "KL(behavior || target) per token", "h_ess": "effective sample size (fraction)",
               "h_truncated": "fraction of tokens truncated", "skipped_layers": "layers skipped (U)"}


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
    every completion with a nonzero advantage was cut and `grpo.mask_truncated_completions` drops it; and, for a
    run with rollout selection (issue 32), its `SELECTION_COUNTS` summed over its steps (None without)."""
    several = several_warm_ups(warm_up(row) for row in rows)
    by_run: dict[str, list[dict]] = {}
    for step in steps:
        by_run.setdefault(step["instance"], []).append(step)
    table = []
    for row in rows:
        if row["status"] != "done":
            continue
        run = by_run.get(row["instance"], [])
        columns = ("model", "dataset", "seed", "role", "accuracy", "accuracy_before", *DIAGNOSTICS)
        table.append({**{column: row.get(column) for column in columns}, "warm_up": warm_up(row),
                      "label": configuration_label(row, several), "steps": len(run),
                      "zero_reward_steps": sum(step["reward_mean"] == 0 for step in run),
                      "gradient_steps": _gradient_steps([step.get("grad_norm") for step in run]),
                      **_selection_totals(run)})
    return sorted(table, key=lambda entry: (entry["model"], entry["dataset"], entry["seed"], entry["warm_up"],
                                            entry["role"] != "baseline"))


def closeness_rows(runs: Sequence[dict]) -> list[dict]:
    """Per model and dataset, over the nested runs of `run_rows` with a KL, gradient steps and a baseline of their
    seed and warm-up: Pearson's r of log KL(behavior || target) with gradient steps, of gradient steps with Δ pass@1
    (points, against that baseline), and of log KL with Δ: which link of closeness -> gradient steps -> accuracy
    holds, where a study asks why a closer behavior model does not keep more of what ReFT learns."""
    baselines = {(run["model"], run["dataset"], run["warm_up"], run["seed"]): run["accuracy"]
                 for run in runs if run["role"] == "baseline"}
    points: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
    for run in runs:
        reference = baselines.get((run["model"], run["dataset"], run["warm_up"], run["seed"]))
        kl = run["kl_behavior_target"]
        if run["role"] == "baseline" or reference is None or run["gradient_steps"] is None or kl is None \
                or not math.isfinite(kl) or kl <= 0:
            continue
        points.setdefault((run["model"], run["dataset"]), []).append(
            (math.log(kl), run["gradient_steps"], 100 * (run["accuracy"] - reference)))
    table = []
    for (model, dataset), group in points.items():
        log_kl, gradient_steps, deltas = zip(*group)
        table.append({"model": model, "dataset": dataset, "runs": len(group),
                      "kl_gradient": _correlation(log_kl, gradient_steps),
                      "gradient_delta": _correlation(gradient_steps, deltas), "kl_delta": _correlation(log_kl, deltas)})
    return table


def _correlation(first: Sequence[float], second: Sequence[float]) -> float | None:
    """Pearson's r; None under 3 points or where either side does not vary."""
    if len(first) < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return None
    return float(np.corrcoef(first, second)[0, 1])


def _selection_totals(steps: Sequence[dict]) -> dict[str, float | None]:
    """A run's `SELECTION_COUNTS` summed over its steps; None where a step did not record one (no selection)."""
    return {column: None if not steps or any(step.get(column) is None for step in steps)
            else sum(step[column] for step in steps) for column in SELECTION_COUNTS}


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


REACH_TOLERANCE = 0.02  # "reaches the baseline's final pass@1": within 2 points of it (issue 32's target)


def cost_rows(rows: Sequence[dict], curve: Sequence[dict]) -> list[dict]:
    """Per finished configuration with points in curve.csv: what its pass@1 cost in rollout FLOPs.

    Its mean curve: at each step every seed evaluated, the seeds' mean pass@1 and cumulative rollout FLOPs; the
    baseline's, over the same seeds. Total: the last point's FLOPs, and the baseline's total over it (> 1: it spent
    less). Per point gained: the total over
    the gain from step 0 (its warm-up) to the last point, in points (– where it gained nothing). Reaching the
    baseline: the first evaluated step at which its mean is within REACH_TOLERANCE of the baseline's final mean, the
    FLOPs spent by then and the baseline's total over them (> 1: it got there for less)."""
    by_run = _curves_by_run(curve)
    several = several_warm_ups(warm_up(row) for row in rows)
    table = []
    for members, baselines in configurations(rows):
        mean = _mean_curve([by_run[row["instance"]] for row in members if row["instance"] in by_run])
        seeds = {row["seed"] for row in members if row["instance"] in by_run}
        reference = _mean_curve([by_run[row["instance"]] for row in baselines
                                 if row["instance"] in by_run and row["seed"] in seeds])
        if not mean:
            continue
        first = members[0]
        total, gain = mean[-1]["flops"], (mean[-1]["accuracy"] - mean[0]["accuracy"] if mean[0]["step"] == 0 else None)
        target = reference[-1]["accuracy"] - REACH_TOLERANCE if reference else None
        reached = next((point for point in mean if target is not None and point["accuracy"] >= target), None)
        base_total = reference[-1]["flops"] if reference else None
        table.append({
            "model": first["model"], "dataset": first["dataset"], "label": configuration_label(first, several),
            "seeds": sum(row["instance"] in by_run for row in members), "curve": mean, "total_flops": total,
            "saving": base_total / total if base_total and total else None,
            "flops_per_point": total / (100 * gain) if total is not None and gain and gain > 0 else None,
            "reached_step": reached["step"] if reached else None, "reached_flops": reached["flops"] if reached else None,
            "reached_saving": base_total / reached["flops"] if reached and reached["flops"] and base_total else None,
        })
    return table


def _curves_by_run(curve: Iterable[dict]) -> dict[str, dict[int, dict]]:
    """curve.csv's points by run and step."""
    runs: dict[str, dict[int, dict]] = {}
    for point in curve:
        runs.setdefault(point["instance"], {})[int(point["step"])] = point
    return runs


def _mean_curve(runs: Sequence[dict[int, dict]]) -> list[dict]:
    """At each step every run has a point at, the runs' mean pass@1 and cumulative rollout FLOPs (None where a run's
    are not known), in step order."""
    if not runs:
        return []
    shared = sorted(set.intersection(*(set(run) for run in runs)))
    return [{"step": step, "accuracy": statistics.fmean(run[step]["accuracy"] for run in runs),
             "flops": mean_of_measured(run[step]["rollout_flops"] for run in runs)
             if all(run[step]["rollout_flops"] is not None for run in runs) else None} for step in shared]
