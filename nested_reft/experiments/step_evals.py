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

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nested_reft.config import ConfigError, TrainConfig
from nested_reft.evaluation.evaluate import evaluate, print_progress
from nested_reft.evaluation.records import EVAL_FILE
from nested_reft.experiments.grid import EvalSettings
from nested_reft.store.files import read_json

STEP_EVALS_DIR = "eval-steps"
_STEP = re.compile(r"step-([0-9]+)")


def evaluated_steps(every: int | None, rft_steps: int) -> list[int]:
    """The ReFT steps evaluated during training: every `every`-th before the last (None: none)."""
    return [] if every is None else list(range(every, rft_steps, every))


def step_eval_directory(run_directory: Path, step: int) -> Path:
    return Path(run_directory) / STEP_EVALS_DIR / f"step-{step}"


@dataclass(frozen=True)
class StepEvaluator:
    """The sweep's `StepCallback`: pass@1 of the policy after each of `evaluated_steps`, at the instance's seed.

    A step evaluated to the end with these settings is not evaluated again: a run resumed from an earlier checkpoint
    repeats the step and its policy exactly. One evaluated otherwise (the grid's eval settings changed), or cut off,
    is evaluated afresh. Dropout is off while evaluating, as in a loaded model, and the mode is put back. One
    process: every rank would evaluate into the same directory."""

    run_directory: Path
    settings: EvalSettings
    train_config: TrainConfig
    every: int

    def __call__(self, step: int, policy: torch.nn.Module, tokenizer) -> None:
        if step not in evaluated_steps(self.every, self.train_config.rft_steps):
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ConfigError("eval.steps evaluates during training in one process; run the sweep's instances "
                              "in one process each, or set eval.steps: null")
        output = step_eval_directory(self.run_directory, step)
        if self._evaluated(output):
            return
        shutil.rmtree(output, ignore_errors=True)
        training = policy.training
        policy.eval()
        try:
            evaluate(policy, tokenizer, self.settings.benchmarks, output, self._config(),
                     data_dir=self.settings.data_dir_in_grid(self.train_config.data_dir), limit=self.settings.limit,
                     model_name=f"{self.run_directory} after ReFT step {step}", progress=print_progress)
        finally:
            policy.train(training)

    def _config(self):
        return self.settings.config(self.train_config.seed)

    def _evaluated(self, output: Path) -> bool:
        """Whether `output` holds a finished evaluation with these settings."""
        if not (output / EVAL_FILE).is_file():
            return False
        done = read_json(output / EVAL_FILE)
        return (done.get("config") == dataclasses.asdict(self._config()) and done.get("limit") == self.settings.limit
                and sorted(done.get("benchmarks", {})) == sorted(self.settings.benchmarks))


def clear_step_evals(run_directory: Path) -> None:
    """Remove a run's evaluations during training: a run that starts afresh does not keep another run's points."""
    shutil.rmtree(Path(run_directory) / STEP_EVALS_DIR, ignore_errors=True)


def curve_rows(run_id: str, run_directory: Path, steps: list[dict], warm_up_eval: Path | None, final_eval: Path
               ) -> list[dict]:
    """A run's rows of curve.csv: its warm-up's pass@1 at step 0 (`warm_up_eval`, an eval.json; None: not
    evaluated), each finished evaluation during training found in its directory, and its own after its last step
    (`final_eval`, where it exists), each beside the rollout FLOPs of the steps up to it (`steps`: its metrics.jsonl
    records, 1..n; None where a step recorded none). No rows for a run whose records are not steps 1..n (lines
    lost): its FLOPs by step are not known."""
    if not steps or [record["step"] for record in steps] != list(range(1, len(steps) + 1)):
        return []
    spent = _cumulative_flops(steps)
    points = {0: warm_up_eval} if warm_up_eval is not None else {}
    points.update({step: step_eval_directory(run_directory, step) / EVAL_FILE
                   for step in _step_evals_on_disk(run_directory) if step <= len(steps)})
    if final_eval.is_file():  # the run's own, after its last step
        points[len(steps)] = final_eval
    return [{"instance": run_id, "step": step, "accuracy": read_json(path)["average"], "rollout_flops": spent[step]}
            for step, path in sorted(points.items()) if path.is_file()]


def _step_evals_on_disk(run_directory: Path) -> list[int]:
    """The steps of a run's evaluations during training, in order."""
    directory = Path(run_directory) / STEP_EVALS_DIR
    if not directory.is_dir():
        return []
    return sorted(int(match.group(1)) for path in directory.iterdir() if (match := _STEP.fullmatch(path.name)))


def _cumulative_flops(steps: list[dict]) -> dict[int, float | None]:
    """step -> the rollout FLOPs of the steps up to and including it (0 at step 0; None from a step that recorded
    none on)."""
    total: float | None = 0.0
    spent: dict[int, float | None] = {0: 0.0}
    for record in steps:
        flops = record.get("rollout_flops")
        total = None if total is None or flops is None else total + flops
        spent[record["step"]] = total
    return spent
