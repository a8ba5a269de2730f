"""Calibrate a small-CPU experiment for SmolLM2-135M-Instruct on generated arithmetic problems.

For each seed: an SFT warm-up on the training problems, a pass@1 evaluation of the warmed-up model on a
held-out set, then the x = 0 baseline (classical ReFT: nesting.skip_ratio=0, nesting.border=0,
importance.mitigation=base) from that model, and a pass@1 evaluation of its final model. Everything goes
through the library (`nested_reft.training.trainer.train` with a custom `Task`, the library's evaluation loop), and
every stage is skipped when its output already exists, so a rerun resumes.

Output, under --output-dir (default runs/<tag>, the tag built from the settings):

    settings.json                       the resolved settings of this command
    sft-s<seed>/                        train() output with rft_steps=0: model/, sft_metrics.jsonl, summary.json
    sft-s<seed>/eval/eval.json          pass@1 of the warmed-up model on the held-out set
    reft-s<seed>/                       train() output of the baseline: metrics.jsonl, summary.json, model/
    reft-s<seed>/eval/eval.json         pass@1 after ReFT
    results.json, results.md            per seed: accuracies, gain, zero-reward fraction, timings; criteria

Run pinned to one core with one thread; the runs that decided the study's task (docs/study-smollm2/README.md):

    run="taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python scripts/calibrate_smollm2.py --difficulty 1 --sft-examples 64
         --sft-batch-size 8 --batch-size 2 --num-generations 4 --micro-batch-size 8 --lr-scheduler constant
         --max-new-tokens 64 --eval-batch-size 50"
    $run --steps 0 --difficulty 2 --n-eval 100               # warm-up too weak at difficulty 2
    $run --steps 8 --lr 2e-5                                 # and --lr 3e-5, 5e-5, 1e-5 --steps 24; --num-generations 8
    $run --steps 16 --lr 2e-5 --temperature 0.7              # the study's setting
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from nested_reft.config import GRPOConfig, ImportanceConfig, NestingConfig, SamplingConfig, SFTConfig, TrainConfig
from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.tasks.problems import Problem
from nested_reft.evaluation.evaluate import EvalConfig
from nested_reft.models.loading import load_model
from nested_reft.tasks.task import Task
from nested_reft.training.rundir import FINAL_MODEL_DIR, METRICS_FILE, SUMMARY_FILE
from nested_reft.training.trainer import train

# ----------------------------------------------------------------------------------------------------------
# Data: disjoint training and held-out arithmetic problems
# ----------------------------------------------------------------------------------------------------------


def arithmetic_sets(difficulties: list[int], n_train: int, n_eval: int, train_seed: int, eval_seed: int
                    ) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): `n_eval` problems per the `eval_seed` generator and `n_train` from `train_seed`,
    split evenly over `difficulties`, with every training question that also appears held out dropped (as
    `nested_reft.tasks.data._arithmetic` does). Both lists are interleaved over the difficulties."""
    held_out_parts, train_parts = [], []
    for index, difficulty in enumerate(difficulties):
        share_eval = n_eval // len(difficulties) + (index < n_eval % len(difficulties))
        share_train = n_train // len(difficulties) + (index < n_train % len(difficulties))
        held = generate_arithmetic(share_eval, seed=eval_seed, difficulty=difficulty)
        questions = {p.question for p in held}
        candidates = generate_arithmetic(share_train + share_eval, seed=train_seed, difficulty=difficulty)
        kept = [p for p in candidates if p.question not in questions][:share_train]
        if len(kept) < share_train:
            raise ValueError(f"difficulty {difficulty}: only {len(kept)} distinct training problems")
        held_out_parts.append(held)
        train_parts.append(kept)
    train_set, held_out = _interleave(train_parts), _interleave(held_out_parts)
    assert not {p.question for p in train_set} & {p.question for p in held_out}
    return train_set, held_out


def _interleave(parts: list[list[Problem]]) -> list[Problem]:
    out = []
    for row in range(max(len(p) for p in parts)):
        out.extend(part[row] for part in parts if row < len(part))
    return out


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def base_config(args, seed: int, output_dir: Path) -> TrainConfig:
    """The run's TrainConfig: the baseline's nesting/importance, the calibrated sizes."""
    return TrainConfig(
        model=args.model,
        dataset="arithmetic",  # only validated; the problems come from the Task passed to train()
        output_dir=str(output_dir),
        seed=seed,
        rft_steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        save_steps=max(args.steps, 1),  # one checkpoint at the end
        nesting=NestingConfig(skip_ratio=0.0, border=0),
        importance=ImportanceConfig(mitigation="base"),
        sampling=SamplingConfig(temperature=args.temperature, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.min_new_tokens),
        grpo=GRPOConfig(num_generations=args.num_generations, learning_rate=args.lr,
                        lr_scheduler=args.lr_scheduler),
        sft=SFTConfig(epochs=args.sft_epochs, learning_rate=args.sft_lr, batch_size=args.sft_batch_size,
                      max_length=256, max_examples=args.sft_examples),
    )


def eval_config(args) -> EvalConfig:
    return EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------


def run_sft(args, seed: int, task: Task, out: Path) -> Path:
    """The seed's SFT warm-up (train() with rft_steps = 0); returns the warmed-up model's directory."""
    model_dir = out / FINAL_MODEL_DIR
    if not model_dir.is_dir():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted warm-up starts over (it is not resumable)
        config = dataclasses.replace(base_config(args, seed, out), rft_steps=0, save_steps=1)
        train(config, task=task)
    return model_dir


def run_reft(args, seed: int, task: Task, sft_model: Path, out: Path) -> Path:
    """The x = 0 baseline from the warmed-up model (no second warm-up); resumes from its checkpoint."""
    model_dir = out / FINAL_MODEL_DIR
    if not (out / SUMMARY_FILE).exists():
        base = base_config(args, seed, out)
        config = dataclasses.replace(base, model=str(sft_model), sft=dataclasses.replace(base.sft, epochs=0))
        train(config, task=task, resume=(out / METRICS_FILE).exists())
    return model_dir


def run_eval(args, model_dir: Path, held_out: Task, out: Path) -> dict:
    """pass@1 on the held-out problems through the library's evaluation loop (the one `nested-reft eval`
    runs), which takes Task objects; resumable like it."""
    from nested_reft.evaluation.records import EVAL_FILE
    from nested_reft.evaluation.evaluate import evaluate_tasks

    done = out / EVAL_FILE
    if done.exists():
        return json.loads(done.read_text())
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32, device="cpu")
    return evaluate_tasks(model, tokenizer, [held_out], out, eval_config(args), None, None,
                           str(model_dir.resolve()), None)


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


def seed_result(seed: int, sft_dir: Path, reft_dir: Path | None, sft_eval: dict, reft_eval: dict | None) -> dict:
    sft_summary = json.loads((sft_dir / SUMMARY_FILE).read_text())
    sft_steps = [json.loads(line) for line in (sft_dir / "sft_metrics.jsonl").read_text().splitlines()]
    result = {
        "seed": seed,
        "sft_accuracy": sft_eval["average"],
        "sft_runtime_s": sft_summary["sft_runtime_s"],
        "sft_steps": len(sft_steps),
        "sft_final_loss": sft_steps[-1]["loss"] if sft_steps else None,
        "sft_eval_wall_s": sft_eval["timing"]["wall_time_s"],
        "sft_eval_tokens": _eval_tokens(sft_eval),
    }
    if reft_dir is not None and reft_eval is not None:
        rows = [json.loads(line) for line in (reft_dir / METRICS_FILE).read_text().splitlines()]
        reft_summary = json.loads((reft_dir / SUMMARY_FILE).read_text())
        zero = sum(1 for row in rows if row["reward_mean"] == 0.0)
        result.update(
            reft_accuracy=reft_eval["average"],
            gain_points=100 * (reft_eval["average"] - sft_eval["average"]),
            reft_steps=len(rows),
            zero_reward_steps=zero,
            zero_reward_fraction=zero / max(len(rows), 1),
            reward_first_quarter=statistics.mean(r["reward_mean"] for r in rows[: max(1, len(rows) // 4)]),
            reward_last_quarter=statistics.mean(r["reward_mean"] for r in rows[-max(1, len(rows) // 4):]),
            reft_runtime_s=reft_summary["total_runtime_s"],
            step_s_median=statistics.median(r["step_time_s"] for r in rows),
            generation_s_median=statistics.median(r["generation_time_s"] for r in rows),
            training_s_median=statistics.median(r["training_time_s"] for r in rows),
            completion_length_mean=statistics.mean(r["completion_length"] for r in rows),
            reft_eval_wall_s=reft_eval["timing"]["wall_time_s"],
            reft_eval_tokens=_eval_tokens(reft_eval),
            reft_plus_eval_s=reft_summary["total_runtime_s"] + reft_eval["timing"]["wall_time_s"],
        )
    return result


def _eval_tokens(result: dict) -> float:
    (summary,) = result["benchmarks"].values()
    return summary["mean_completion_tokens"]


def criteria(result: dict, args) -> dict:
    checks = {"sft_accuracy_in_15_50": 0.15 <= result["sft_accuracy"] <= 0.50}
    if "gain_points" in result:
        checks["zero_reward_below_20pct"] = result["zero_reward_fraction"] < 0.20
        checks["gain_at_least_10_points"] = result["gain_points"] >= 10.0
        checks["reft_plus_eval_within_budget"] = result["reft_plus_eval_s"] <= args.budget_s
    return checks


def write_results(out: Path, results: list[dict], args) -> None:
    payload = {"settings": vars(args), "seeds": results,
               "criteria": {str(r["seed"]): criteria(r, args) for r in results}}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    columns = ["seed", "sft_accuracy", "reft_accuracy", "gain_points", "zero_reward_fraction", "sft_runtime_s",
               "sft_eval_wall_s", "reft_runtime_s", "step_s_median", "reft_eval_wall_s", "reft_plus_eval_s",
               "reward_first_quarter", "reward_last_quarter", "completion_length_mean"]
    lines = ["| " + " | ".join(columns) + " | criteria met |", "|---" * (len(columns) + 1) + "|"]
    for r in results:
        cells = [_fmt(r.get(c)) for c in columns]
        checks = criteria(r, args)
        lines.append("| " + " | ".join(cells) + f" | {sum(checks.values())}/{len(checks)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--difficulty", type=int, nargs="+", default=[2], help="generator difficulties (mixed evenly)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--train-seed", type=int, default=0, help="generator seed of the training problems")
    p.add_argument("--eval-seed", type=int, default=1, help="generator seed of the held-out problems")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (each with its own warm-up)")
    p.add_argument("--sft-epochs", type=int, default=1)
    p.add_argument("--sft-examples", type=int, default=256, help="first N training problems used by SFT")
    p.add_argument("--sft-lr", type=float, default=2e-5)
    p.add_argument("--sft-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=16, help="ReFT steps (0: SFT and its evaluation only)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per ReFT step")
    p.add_argument("--num-generations", type=int, default=8, help="G")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5, help="ReFT learning rate")
    p.add_argument("--lr-scheduler", default="linear")
    p.add_argument("--max-new-tokens", type=int, default=128, help="training and evaluation")
    p.add_argument("--temperature", type=float, default=1.0, help="training sampling temperature")
    p.add_argument("--min-new-tokens", type=int, default=0, help="training sampling (0: stop at EOS)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--budget-s", type=float, default=900.0, help="ReFT + its evaluation, seconds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default=None)
    return p.parse_args(argv)


def default_tag(args) -> str:
    d = "-".join(map(str, args.difficulty))
    return (f"d{d}-sft{args.sft_examples}x{args.sft_epochs}-slr{args.sft_lr:g}-b{args.batch_size}g{args.num_generations}"
            f"-lr{args.lr:g}-{args.lr_scheduler}-s{args.steps}-t{args.max_new_tokens}m{args.min_new_tokens}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir or Path("runs/calibration") / default_tag(args))
    out.mkdir(parents=True, exist_ok=True)
    import nested_reft

    settings = dict(vars(args), nested_reft=str(Path(nested_reft.__file__).parent), torch=torch.__version__)
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    train_problems, held_out_problems = arithmetic_sets(
        args.difficulty, args.n_train, args.n_eval, args.train_seed, args.eval_seed
    )
    train_task = Task(name="arithmetic-train", problems=train_problems)
    held_out = Task(name="heldout", problems=held_out_problems)
    results = []
    for seed in args.seeds:
        started = time.perf_counter()
        sft_dir = out / f"sft-s{seed}"
        sft_model = run_sft(args, seed, train_task, sft_dir)
        sft_eval = run_eval(args, sft_model, held_out, sft_dir / "eval")
        print(f"[seed {seed}] post-SFT pass@1 {sft_eval['average']:.3f}", flush=True)
        reft_dir = reft_eval = None
        if args.steps > 0:
            reft_dir = out / f"reft-s{seed}"
            reft_model = run_reft(args, seed, train_task, sft_model, reft_dir)
            reft_eval = run_eval(args, reft_model, held_out, reft_dir / "eval")
            print(f"[seed {seed}] after ReFT pass@1 {reft_eval['average']:.3f}", flush=True)
            for checkpoint in reft_dir.glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)  # keep only the final model
        results.append(seed_result(seed, sft_dir, reft_dir, sft_eval, reft_eval))
        print(f"[seed {seed}] done in {time.perf_counter() - started:.0f}s", flush=True)
        write_results(out, results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
