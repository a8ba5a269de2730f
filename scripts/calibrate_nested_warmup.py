"""Probe nested-aware warm-ups before the study runs them (issue 22): how close does each warm-up bring
SmolLM2-135M-Instruct's nested models to the full one, at what cost, and what does it do to the full model.

Each warm-up is the study grid's (configs/grids/study-nested-warmup.yaml: its `train` section, seed 0) with the
`sft` options below, run by the trainer with no ReFT step (`nested-reft train --rft-steps 0`, which writes the
warm-up's runtime and FLOPs to summary.json), then probed (`nested-reft probe` at x = 5, 15, 30%: KL(behavior ||
target) per token, ESS, nested and full reward) and evaluated (`nested-reft eval`: pass@1 on the study's 300
held-out problems). Every stage is skipped when its output exists, so a rerun resumes; the lanes run the
warm-ups in parallel, one torch thread each.

    python scripts/calibrate_nested_warmup.py --lanes 2        # runs/calibrate-nested-warmup, then the table
    python scripts/calibrate_nested_warmup.py --only plain-64  # one warm-up
    python scripts/calibrate_nested_warmup.py --figure-only    # the figure again, from calibration.json

The table (Markdown, and calibration.json) and the figure (KL and pass@1 against the warm-up's cost) go to
docs/study-nested-warmup/calibration/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from nested_reft.experiments.plots import pyplot, save_figure

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs/grids/study-nested-warmup.yaml"
RATIOS = ("0.05", "0.15", "0.3")
FIGURE = "kl-against-warm-up-cost.png"
WARM_UPS = {  # label -> sft options over the grid's (1 epoch, batch 8); order: what decides most first
    "plain-64": {},
    "distill1-64": {"distill_nested": 1.0, "distill_ratio": 0.15},
    "distill1-256": {"distill_nested": 1.0, "distill_ratio": 0.15, "max_examples": 256},
    "plain-256": {"max_examples": 256},
    "distill4-256": {"distill_nested": 4.0, "distill_ratio": 0.15, "max_examples": 256},
    "layerdrop-256": {"layer_drop": 0.15, "max_examples": 256},
}


def nested_reft(*args: str) -> list[str]:
    return [str(ROOT / ".venv/bin/nested-reft"), *args]


def config_for(label: str, grid: dict, output: Path) -> dict:
    """The grid's train section at seed 0, no ReFT step, with the warm-up's sft options."""
    config = json.loads(json.dumps(grid["train"]))  # a deep copy
    config["sft"] = {**config.get("sft", {}), **WARM_UPS[label]}
    return {**config, "model": grid["models"][0], "dataset": grid["datasets"][0], "seed": 0, "rft_steps": 0,
            "output_dir": str(output)}


def run(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))


def warm_up_and_measure(label: str, grid: dict, root: Path) -> None:
    """The three stages of one warm-up, each skipped when done."""
    output = root / label
    output.mkdir(parents=True, exist_ok=True)
    log = output / "calibrate.log"
    if not (output / "summary.json").exists():
        config_file = output.with_suffix(".yaml")
        config_file.write_text(yaml.safe_dump(config_for(label, grid, output / "run")))
        run(nested_reft("train", "--config", str(config_file)), log)
        (output / "summary.json").write_text((output / "run" / "summary.json").read_text())
    model = str(output / "run" / "model")
    if not (output / "probe" / "probe.json").exists():
        run(nested_reft("probe", "--model", model, "--dataset", "arithmetic", "--skip-ratios", *RATIOS,
                        "--problems", "16", "--draws", "3", "--generations", "2", "--temperature", "0.7",
                        "--output-dir", str(output / "probe")), log)
    if not (output / "eval" / "eval.json").exists():
        evaluation = grid["eval"]
        run(nested_reft("eval", "--model", model, "--benchmarks", "arithmetic", "--limit", str(evaluation["limit"]),
                        "--max-new-tokens", str(evaluation["max_new_tokens"]), "--batch-size",
                        str(evaluation["batch_size"]), "--output-dir", str(output / "eval")), log)


def row(label: str, root: Path) -> dict | None:
    output = root / label
    files = [output / "summary.json", output / "probe" / "probe.json", output / "eval" / "eval.json"]
    if not all(f.exists() for f in files):
        return None
    summary, probe, evaluation = (json.loads(f.read_text()) for f in files)
    return {"warm_up": label, "sft": WARM_UPS[label], "sft_runtime_s": summary["sft_runtime_s"],
            "sft_flops": summary["sft_flops"], "probe": probe, "eval": evaluation}


def table(rows: list[dict]) -> str:
    lines = ["| warm-up | SFT options | runtime s | TFLOPs | pass@1 (300) | full reward | KL 5% | KL 15% | KL 30% | "
             "ESS 15% | nested reward 15% |", "|---" * 11 + "|"]
    for r in rows:
        by_x = {f"{x['skip_ratio']:g}": x for x in r["probe"]["ratios"]}
        accuracy = next(iter(r["eval"]["benchmarks"].values()))["accuracy"]
        lines.append(
            f"| {r['warm_up']} | {r['sft'] or '(the grid’s)'} | {r['sft_runtime_s']:.0f} | {r['sft_flops'] / 1e12:.1f} | "
            f"{100 * accuracy:.1f} | {by_x['0.15']['full_reward']:.3f} | "
            + " | ".join(f"{by_x[x]['kl_behavior_target']:.2f}" for x in ("0.05", "0.15", "0.3"))
            + f" | {by_x['0.15']['ess']:.3f} | {by_x['0.15']['nested_reward']:.3f} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path:
    """KL per token at each x, and the full model's pass@1, against the warm-up's FLOPs: how far each option
    moved the closeness, and what it cost the model."""
    plt = pyplot()
    fig, (distance, accuracy) = plt.subplots(1, 2, figsize=(11, 4.2))
    cost = [r["sft_flops"] / 1e12 for r in rows]
    kl = {x: [next(p for p in r["probe"]["ratios"] if f"{p['skip_ratio']:g}" == x)["kl_behavior_target"]
              for r in rows] for x in RATIOS}
    for x, marker in zip(RATIOS, "o^s"):
        distance.scatter(cost, kl[x], marker=marker, label=f"x = {float(x):.0%}")
    distance.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="target at x = 15%")
    passed = [100 * next(iter(r["eval"]["benchmarks"].values()))["accuracy"] for r in rows]
    accuracy.scatter(cost, passed, color="black")
    for axis, ys in ((distance, kl["0.15"]), (accuracy, passed)):
        for index, (r, x, y) in enumerate(zip(rows, cost, ys)):
            same_cost = sum(round(c) == round(x) for c in cost[:index])  # warm-ups of one cost: labels stacked
            axis.annotate(r["warm_up"], (x, y), textcoords="offset points", xytext=(4, 4 - 11 * same_cost),
                          fontsize=8)
        axis.set_xlabel("warm-up TFLOPs")
    distance.set_ylabel("KL(behavior || target), nats per token")
    distance.set_title("closeness bought by the warm-up (probe, seed 0)")
    distance.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.76, 0.84))
    accuracy.set_ylabel("full model's pass@1 on 300 problems (%)")
    accuracy.set_title("what it cost the full model")
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=WARM_UPS, default=list(WARM_UPS))
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs/calibrate-nested-warmup")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/study-nested-warmup/calibration")
    parser.add_argument("--model", default=None, help="instead of the grid's (a quick look: tiny-llama)")
    parser.add_argument("--figure-only", action="store_true", help="redraw the figure from the docs' calibration.json")
    args = parser.parse_args(argv)
    if args.figure_only:
        print(figure(json.loads((args.docs / "calibration.json").read_text()), args.docs / FIGURE))
        return
    grid = yaml.safe_load(GRID.read_text())
    grid["models"] = [args.model] if args.model else grid["models"]
    with concurrent.futures.ThreadPoolExecutor(args.lanes) as lanes:
        for label, future in [(label, lanes.submit(warm_up_and_measure, label, grid, args.output_dir))
                              for label in args.only]:
            try:
                future.result()
            except subprocess.CalledProcessError as error:
                print(f"{label}: {error} (see {args.output_dir / label / 'calibrate.log'})", file=sys.stderr)
    rows = [r for r in (row(label, args.output_dir) for label in WARM_UPS) if r]
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "calibration.json").write_text(json.dumps(rows, indent=1))
    (args.docs / "calibration.md").write_text(table(rows) + "\n")
    print(table(rows))
    figure(rows, args.docs / FIGURE)


if __name__ == "__main__":
    main()
