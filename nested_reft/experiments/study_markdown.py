"""The study's Markdown section of the report: the table of configurations, the figures, the timing conditions,
the warm-ups' own effect and their break-even, the runs and what their closeness decided (from `study`'s rows)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nested_reft.experiments.formatting import MISSING, interval_cell, number, percent, seeds_text, tera
from nested_reft.experiments.stats import BOOTSTRAP_SAMPLES, CONFIDENCE
from nested_reft.experiments.study import REACH_TOLERANCE, closeness_rows


def render_study(table: Sequence[dict], runs: Sequence[dict], figures: Sequence[str], conditions: str,
                 warm_ups: Sequence[dict] = (), break_even: Sequence[dict] = (), cost: Sequence[dict] = ()) -> str:
    """The study's Markdown section: the table of configurations, the figures, the timing conditions, the warm-ups'
    own effect and their break-even (where there are named warm-ups), pass@1 against rollout compute (where runs
    were evaluated during training), the runs, what their closeness decided (where there are nested runs) and their
    rollout selection (where runs selected)."""
    lines = _table(
        "## The study: accuracy with confidence intervals, diagnostics, learning curves",
        f"Δ acc is pass@1 minus the baseline's (of the same warm-up), in points, with a {CONFIDENCE:.0%} percentile "
        f"bootstrap interval over seeds and problems ({BOOTSTRAP_SAMPLES} replicates, problems paired across the "
        "arms); an interval that contains 0 is no resolvable difference. Seeds: the mean of each seed's own Δ (the "
        f"run minus the baseline of its seed), with its {CONFIDENCE:.0%} Student t interval over the seeds (n − 1 "
        "degrees of freedom; – for one seed). Before: pass@1 of the SFT warm-ups the runs start from. U, KL, ESS "
        "and truncated are means over the runs' steps; KL first/last ¼: over the first and the last quarter of "
        "the steps (does the closeness a run starts with last?).",
        ("model", "dataset", "configuration", "seeds", "before", "after", "Δ acc [95% CI]", "Δ acc, seeds [95% t CI]",
         "U", "KL", "KL first ¼", "KL last ¼", "ESS", "truncated", "gen tok/s", "rollout TFLOPs"),
        ((e["model"], e["dataset"], e["label"], e["seeds"], percent(e["accuracy_before"]), percent(e["accuracy"]),
          interval_cell(e["delta"], scale=100), seeds_text(e), number(e["skipped_layers"], ".2f"),
          number(e["kl_behavior_target"], ".3f"), number(e["kl_first_quarter"], ".3f"),
          number(e["kl_last_quarter"], ".3f"), number(e["h_ess"], ".3f"), number(e["h_truncated"], ".3f"),
          number(e["gen_tokens_per_s"], ".1f"), tera(e["rollout_flops"], ".1f")) for e in table),
    )
    lines.append(f"Wall-clock figures (gen tok/s) were measured under: {conditions or 'conditions not stated'}. "
                 "Rollout FLOPs come from the model's shapes and the skipped layers and do not depend on the load.\n")
    lines += [f"![{name}]({name})\n" for name in figures]
    lines += render_warm_ups(warm_ups) if warm_ups else []
    lines += render_break_even(break_even) if break_even else []
    lines += render_cost(cost) if cost else []
    lines += render_runs(runs)
    closeness = closeness_rows(runs)
    lines += render_closeness(closeness) if closeness else []
    selecting = [run for run in runs if run["groups_sampled"] is not None]
    lines += render_selection(selecting) if selecting else []
    return "\n".join(lines) + "\n"


def render_warm_ups(rows: Sequence[dict]) -> list[str]:
    """The table of `warm_up_rows`: what a named warm-up does to pass@1 on its own, before and after ReFT."""
    return _table(
        "### The warm-ups' own effect: each named warm-up's baseline against the plain warm-up's",
        "Per seed, the baselines (x = 0) ReFT trained from the two warm-ups of that seed, then over the seeds both "
        "have. Before: pass@1 of the warm-ups; after: of the baselines. Δ after: the named warm-up's baseline "
        f"minus the plain one's, in points, with a {CONFIDENCE:.0%} bootstrap interval over problems (paired) and, "
        "over several seeds, seeds; seeds: the mean of each seed's own Δ with its t interval.",
        ("model", "dataset", "warm-up", "seeds", "before: plain → warm-up", "after: plain → warm-up",
         "Δ after [95% CI]", "Δ after, seeds [95% t CI]"),
        ((r["model"], r["dataset"], r["warm_up"], r["seeds"],
          f"{percent(r['accuracy_before_plain'])} → {percent(r['accuracy_before'])}",
          f"{percent(r['accuracy_plain'])} → {percent(r['accuracy'])}", interval_cell(r["delta"], scale=100),
          seeds_text(r)) for r in rows),
    )


def render_break_even(rows: Sequence[dict]) -> list[str]:
    """The table of `break_even_rows`: does the rollout saving pay for a named warm-up, and after how many steps."""
    columns = ("model", "dataset", "configuration", "extra warm-up TFLOPs", "rollout TFLOPs saved per step",
               "break-even steps")
    return _table(
        "### Break-even: after how many ReFT steps the rollout saving pays for the warm-up",
        "Extra warm-up: the named warm-up's FLOPs minus the plain one's (same seeds). Saved per step: the baseline's "
        "rollout FLOPs minus the nested run's (same warm-up and seed), over its ReFT steps, measured (a nested "
        "model that stops later generates more). Break-even: extra warm-up / saved per step; never where nothing "
        "was saved.",
        columns,
        ((r["model"], r["dataset"], r["label"], tera(r["extra_warm_up_flops"], ".1f"),
          tera(r["saving_per_step"], ".4f"), _break_even(r)) for r in rows),
    )


def _break_even(row: dict) -> str:
    saving = row["saving_per_step"]
    return "never" if saving is not None and saving <= 0 else number(row["break_even_steps"], ".0f")


def render_cost(rows: Sequence[dict]) -> list[str]:
    """The table of `cost_rows`: what each configuration's pass@1 cost in rollout FLOPs."""
    return _table(
        "### Pass@1 against rollout compute",
        "From curve.csv: pass@1 at step 0 (the warm-up), at the evaluations during training (the grid's eval.steps) "
        "and after the last step, beside the rollout FLOPs spent by then (dropped groups included); means over the "
        "seeds, the baseline's over the same seeds. Saving: the baseline's total rollout FLOPs over the "
        "configuration's. Per point: total TFLOPs over the "
        "gain from the warm-up, in points. Reaches the baseline: the first evaluated step at which the mean is "
        f"within {100 * REACH_TOLERANCE:.0f} points of the baseline's final mean, the TFLOPs spent by then, and the "
        "baseline's total over them (> 1: it got there for less).",
        ("model", "dataset", "configuration", "seeds", "pass@1 by step", "rollout TFLOPs", "saving",
         "TFLOPs per point gained", "reaches the baseline at step", "TFLOPs by then", "saving there"),
        ((r["model"], r["dataset"], r["label"], r["seeds"],
          ", ".join(f"{p['step']}: {percent(p['accuracy'])}" for p in r["curve"]), tera(r["total_flops"], ".1f"),
          _times(r["saving"]), tera(r["flops_per_point"], ".2f"),
          "never" if r["reached_step"] is None else r["reached_step"], tera(r["reached_flops"], ".1f"),
          _times(r["reached_saving"])) for r in rows),
    )


def _times(ratio: float | None) -> str:
    """A ratio as `1.32x`; – where there is none."""
    return MISSING if ratio is None else f"{ratio:.2f}x"


def render_runs(runs: Sequence[dict]) -> list[str]:
    """The table of `run_rows`: each seed's runs, the gain over the warm-up each started from."""
    return _table(
        "### The runs",
        "Gain: pass@1 after ReFT minus the run's warm-up, in points. Zero-reward steps: batches with no rewarded "
        "completion, whose GRPO advantages are all 0. Gradient steps: steps whose loss had a nonzero gradient (none "
        "where the reward was 0, or where every completion with an advantage was cut and "
        "`grpo.mask_truncated_completions` left it out of the loss).",
        ("model", "dataset", "seed", "configuration", "before", "after", "gain", "zero-reward steps",
         "gradient steps", "U", "KL", "ESS", "truncated"),
        ((r["model"], r["dataset"], r["seed"], r["label"], percent(r["accuracy_before"]), percent(r["accuracy"]),
          number(_gain(r), "+.1f"), f"{r['zero_reward_steps']} of {r['steps']}", _of(r["gradient_steps"], r["steps"]),
          number(r["skipped_layers"], ".2f"), number(r["kl_behavior_target"], ".2f"), number(r["h_ess"], ".3f"),
          number(r["h_truncated"], ".3f")) for r in runs),
    )


def render_closeness(rows: Sequence[dict]) -> list[str]:
    """The table of `closeness_rows`: what a nested run's closeness decided, over each model and dataset's runs."""
    return _table(
        "### What the closeness decides",
        "Over the nested runs above, one point a run against the baseline of its seed and warm-up: Pearson's r "
        "between log KL(behavior || target) per token and the gradient steps taken, between the gradient steps and "
        "Δ pass@1, and between log KL and Δ pass@1 (– under 3 runs, or where a side does not vary).",
        ("model", "dataset", "nested runs", "r(log KL, gradient steps)", "r(gradient steps, Δ acc)",
         "r(log KL, Δ acc)"),
        ((r["model"], r["dataset"], r["runs"], number(r["kl_gradient"], "+.2f"), number(r["gradient_delta"], "+.2f"),
          number(r["kl_delta"], "+.2f")) for r in rows),
    )


def render_selection(runs: Sequence[dict]) -> list[str]:
    """What the rollout selection of each run that had one did (`run_rows`' sums of steps.csv's counts)."""
    return _table(
        "### Rollout selection",
        "Runs with grpo.filter_groups or sampling.skip_predictable. Groups sampled: every group the run's rounds "
        "sampled, those dropped by the filter included; kept: the groups it trained on; both also per step. "
        "Prompts skipped: passed over before sampling (a skipped prompt's place goes to the next of the order).",
        ("model", "dataset", "seed", "configuration", "groups sampled", "per step", "groups kept", "per step",
         "prompts skipped"),
        ((r["model"], r["dataset"], r["seed"], r["label"], number(r["groups_sampled"], ".0f"),
          number(r["groups_sampled"] / r["steps"], ".2f"), number(r["groups_kept"], ".0f"),
          number(r["groups_kept"] / r["steps"], ".2f"), number(r["prompts_skipped"], ".0f")) for r in runs),
    )


def _gain(run: dict) -> float | None:
    """A run's pass@1 after ReFT minus its warm-up's, in points."""
    if run["accuracy"] is None or run["accuracy_before"] is None:
        return None
    return 100 * (run["accuracy"] - run["accuracy_before"])


def _of(count: int | None, total: int) -> str:
    return "–" if count is None else f"{count} of {total}"


def _table(heading: str, explanation: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A section: its heading, what its columns mean, and its Markdown table, one line per row and a blank line
    after it."""
    cells = lambda values: "| " + " | ".join(str(value) for value in values) + " |"  # noqa: E731
    return [f"{heading}\n", f"{explanation}\n", cells(columns), "|---" * len(columns) + "|",
            *(cells(row) for row in rows), ""]
