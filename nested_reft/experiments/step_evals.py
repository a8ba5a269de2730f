"""Evaluations during training (a grid's `eval.steps`, TRL's eval_steps): the points of a run's cost curve.

A run evaluated once trained says where it got, not what it spent on the way; whether skipped prompts or filtered
groups reach the baseline's accuracy for fewer rollout FLOPs (issue 32) needs the policy's accuracy along the way.
With eval.steps = N the sweep evaluates the live policy after every N-th ReFT step before the last (the last is the
run's own evaluation, step 0 its warm-up's), with the grid's evaluation settings, into <run>/eval-steps/step-<s>/
(eval.json and the per-problem records, resumed as any evaluation). `curve_rows` makes a run's rows of curve.csv:
pass@1 at each evaluated step beside the rollout FLOPs its steps had spent by then.

The policy is evaluated in the training process (`trainer.StepCallback`), as it leaves the step: in float32 the
same numbers as the saved model's evaluation; under bfloat16, the float32 master weights under the run's autocast
(the final evaluation loads the saved model in the run's dtype). One process: the sweep trains in its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nested_reft.config import TrainConfig
from nested_reft.evaluation.evaluate import evaluate, print_progress
from nested_reft.evaluation.records import EVAL_FILE
from nested_reft.experiments.grid import EvalSettings
from nested_reft.store.files import read_json

STEP_EVALS_DIR = "eval-steps"


def evaluated_steps(every: int | None, rft_steps: int) -> list[int]:
    """The ReFT steps evaluated during training: every `every`-th before the last (None: none)."""
    return [] if every is None else list(range(every, rft_steps, every))


def step_eval_directory(run_directory: Path, step: int) -> Path:
    return Path(run_directory) / STEP_EVALS_DIR / f"step-{step}"


@dataclass(frozen=True)
class StepEvaluator:
    """The sweep's `StepCallback`: pass@1 of the policy after each of `evaluated_steps`, at the instance's seed.

    A step whose eval.json exists is not evaluated again: a run resumed from an earlier checkpoint repeats the step
    and its policy exactly. Dropout is off while evaluating, as in a loaded model, and the mode is put back."""

    run_directory: Path
    settings: EvalSettings
    train_config: TrainConfig
    every: int

    def __call__(self, step: int, policy: torch.nn.Module, tokenizer) -> None:
        output = step_eval_directory(self.run_directory, step)
        if step not in evaluated_steps(self.every, self.train_config.rft_steps) or (output / EVAL_FILE).is_file():
            return
        training = policy.training
        policy.eval()
        try:
            evaluate(policy, tokenizer, self.settings.benchmarks, output, self.settings.config(self.train_config.seed),
                     data_dir=self.settings.data_dir or self.train_config.data_dir, limit=self.settings.limit,
                     model_name=f"{self.run_directory} after ReFT step {step}", progress=print_progress)
        finally:
            policy.train(training)


def curve_rows(run_id: str, run_directory: Path, config: TrainConfig, every: int | None, steps: list[dict],
               warm_up_eval: Path | None, final_eval: Path) -> list[dict]:
    """A run's rows of curve.csv: its warm-up's pass@1 at step 0 (`warm_up_eval`, an eval.json; None: not
    evaluated), each finished evaluation during training (every `every` steps) and its own after its last step
    (`final_eval`), each beside the rollout FLOPs of the steps up to it (`steps`: its metrics.jsonl records); none
    before its first step."""
    if not steps:
        return []
    spent = _cumulative_flops(steps)
    points = [(0, warm_up_eval)] if warm_up_eval is not None else []
    points += [(step, step_eval_directory(run_directory, step) / EVAL_FILE)
               for step in evaluated_steps(every, config.rft_steps) if step in spent]
    points.append((config.rft_steps, final_eval))
    return [{"instance": run_id, "step": step, "accuracy": read_json(path)["average"],
             "rollout_flops": spent.get(step, 0.0)} for step, path in points if path.is_file()]


def _cumulative_flops(steps: list[dict]) -> dict[int, float]:
    """step -> the rollout FLOPs of the steps up to and including it."""
    total, spent = 0.0, {}
    for record in steps:
        total += record.get("rollout_flops") or 0.0
        spent[record["step"]] = total
    return spent
