"""Per-run step times of a sweep, from each run's metrics.jsonl: a speed measure that a few disturbed steps
do not move, beside the paper's token speed (total tokens / total runtime), which they do.

For every finished run: the median step time and median generation tokens/s over its steps, the ratio of
its slowest to its fastest step (near 1 when the machine was steady during the run, 2 when other work
shared the cores for part of it), the change of the median step time against the mean over the
baseline runs of the same model and dataset whose steps were steady, and how many of its steps had a
batch reward of 0 (no learning signal at all: every group's advantages are 0).

    python scripts/sweep_step_times.py runs/sweeps/smollm2-cpu [--steady 1.3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def run_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for metrics_path in sorted(sweep_dir.glob("*/*/*/metrics.jsonl")):
        run = metrics_path.parent
        status = json.loads((run / "status.json").read_text()) if (run / "status.json").is_file() else {}
        if status.get("status") != "done" or run.name.startswith("sft-"):
            continue
        steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        times = [step["step_time_s"] for step in steps]
        rows.append({
            "group": f"{run.parent.parent.name}/{run.parent.name}",
            "run": run.name,
            "baseline": run.name.startswith("baseline-"),
            "skipped": steps[0]["skipped_layers"],
            "median_step_s": statistics.median(times),
            "median_gen_tok_s": statistics.median(step["gen_tokens_per_s"] for step in steps),
            "spread": max(times) / min(times),
            "zero_reward_steps": sum(step["reward_mean"] == 0 for step in steps),
            "steps": len(steps),
        })
    return rows


def print_table(rows: list[dict], steady: float) -> None:
    print("| model/dataset | run | layers skipped | median step (s) | median gen tok/s | slowest/fastest step "
          "| Δ median step vs steady baselines (%) | steps with reward 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for group in sorted({row["group"] for row in rows}):
        members = [row for row in rows if row["group"] == group]
        references = [row["median_step_s"] for row in members if row["baseline"] and row["spread"] <= steady]
        reference = statistics.mean(references) if references else None
        for row in members:
            delta = "–" if reference is None else f"{100 * (row['median_step_s'] - reference) / reference:+.1f}"
            print(f"| {group} | {row['run']} | {row['skipped']} | {row['median_step_s']:.2f} | "
                  f"{row['median_gen_tok_s']:.1f} | {row['spread']:.2f} | {delta} | "
                  f"{row['zero_reward_steps']}/{row['steps']} |")
    zero, total = sum(row["zero_reward_steps"] for row in rows), sum(row["steps"] for row in rows)
    print(f"\nSteps with a batch reward of 0: {zero} of {total}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--steady", type=float, default=1.3,
                        help="a baseline whose slowest/fastest step ratio exceeds this is not a reference")
    args = parser.parse_args()
    print_table(run_rows(args.sweep_dir), args.steady)


if __name__ == "__main__":
    main()
