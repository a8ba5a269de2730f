"""One ReFT step, phase by phase, at x = 0 and x = 15% (retrace), beside TRL's `GRPOTrainer`, in one process.

Both engines train the same model (their own copy of it) on the same prompts with the same settings: B prompts
x G completions of exactly T tokens (min = max), temperature 1, no KL (beta = 0, no reference model), one update
per batch (TRL: num_iterations = 1, one micro-batch of B x G, so no extra forward for old log-probs), float32,
AdamW at TRL's learning rate, transformers' own generation for TRL (no vLLM).

- Our step is composed from the library's public pieces, in the order of `nested_reft.training.trainer.reft`:
  `sample_skip_set` + `generate_rollouts` (generation), decode + `Task.score` + `group_advantages` (scoring),
  `policy_update` (training).
- TRL's step is its real training loop, `trainer.train()`, timed by a callback from `on_step_begin` to
  `on_step_end` (generation, scoring, loss, backward, clipping, optimizer step). TRL's own phase timers
  (`profiling_context`) only report to wandb/mlflow/trackio, so its generation time is the time spent in the
  model's `generate` and its scoring time the time spent in the reward function (the same `math_reward`);
  its training time is the rest of the step (padding, decoding, advantages, loss, backward, optimizer step).

Order is interleaved: after each TRL step the callback runs our two steps, alternating which goes first, so
machine noise hits all engines alike. The first round is a warm-up and is dropped; each column is the median
over the repeats (so a row's phases need not add up exactly to its step). On CPU torch runs one thread unless
--threads says otherwise (see its help). Progress goes to stderr, the table to stdout.

Reading the training column on CPU: TRL 1.16 computes its log-probs with a fused, chunked LM head that, without
Triton (CPU), scores every position of prompt + completion and recomputes the head's tiles in the backward pass,
and it also computes per-token entropies; we take log-probs of the completion positions only
(`logits_to_keep`). So TRL's CPU training time is not what it would be on a GPU.

    python bench/step.py                                  # SmolLM2-135M-Instruct, 4 prompts x G 4, 64 tokens
    python bench/step.py --prompts 8 --generations 8 --tokens 128 --repeats 5
    python bench/step.py --model tiny-llama --tokens 16 --repeats 1     # a quick look at the plumbing
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.config import GRPOConfig, ImportanceConfig, NestingConfig, TrainConfig
from nested_reft.tasks.data import Problem
from nested_reft.algorithm.grpo import group_advantages
from nested_reft.models.loading import load_model
from nested_reft.nesting.layers import num_decoder_layers, sample_skip_set
from nested_reft.training.optim import make_optimizer
from nested_reft.engines.rollout import SamplingConfig, generate_rollouts
from nested_reft.tasks.task import Task
from nested_reft.training.update import TrainingState, policy_update

RATIOS = (0.0, 0.15)
MITIGATION = {0.0: "base", 0.15: "retrace"}  # x = 0 is classical ReFT (h = 1); x > 0 uses the paper's retrace


@dataclass
class Timing:
    generation: float
    scoring: float
    training: float
    step: float


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class OurStep:
    """One Nested-ReFT step on `model` from the library's pieces; one optimizer across both ratios (one model)."""

    def __init__(self, model, tokenizer, task: Task, args, device: torch.device):
        self.model, self.tokenizer, self.task, self.device = model, tokenizer, task, device
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.configs = {
            ratio: TrainConfig(
                model=args.model,
                batch_size=args.prompts,
                micro_batch_size=args.prompts * args.generations,  # one micro-batch, as TRL below
                nesting=NestingConfig(skip_ratio=ratio, border=1 if ratio else 0),
                importance=ImportanceConfig(mitigation=MITIGATION[ratio]),
                sampling=SamplingConfig(temperature=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens),
                grpo=GRPOConfig(num_generations=args.generations),
            )
            for ratio in RATIOS
        }
        grpo = self.configs[0.0].grpo
        optimizer, scheduler = make_optimizer(model, grpo, total_steps=len(RATIOS) * (args.repeats + 1))
        self.state = TrainingState(model, optimizer, scheduler, self.accelerator)
        self.num_layers = num_decoder_layers(model)
        self.skip_sets: dict[float, list[tuple[int, ...]]] = {ratio: [] for ratio in RATIOS}

    def __call__(self, ratio: float, problems: list[Problem], seed: int) -> Timing:
        config, G = self.configs[ratio], self.configs[ratio].grpo.num_generations
        started = clock(self.device)
        skip_set = sample_skip_set(self.num_layers, ratio, config.nesting.border, torch.Generator().manual_seed(seed))
        rollouts = generate_rollouts(
            self.model, self.tokenizer, self.task.prompts(self.tokenizer, problems), G, config.sampling, skip_set,
            torch.Generator().manual_seed(seed),
        )
        scored = clock(self.device)
        completions = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        golds = [problem.answer for problem in problems for _ in range(G)]
        rewards = torch.tensor(self.task.score(completions, golds), dtype=torch.float32)
        advantages = group_advantages(rewards, G, config.grpo.scale_rewards)
        trained = clock(self.device)
        policy_update(self.state, rollouts, advantages, config)
        finished = clock(self.device)
        self.skip_sets[ratio].append(skip_set)
        return Timing(scored - started, trained - scored, finished - trained, finished - started)


class Stopwatch:
    """Adds up the time spent inside the functions it wraps (reset at each step)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def wrap(self, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = clock(self.device)
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += clock(self.device) - start

        return timed


def trl_trainer(args, task: Task, problems: list[Problem], device: torch.device, between_steps, output_dir: str):
    """A real GRPOTrainer on its own copy of the model, with a callback that times each step and then calls
    `between_steps(round)` (where our steps run)."""
    import datasets
    import trl
    from transformers import TrainerCallback

    model, tokenizer = load_model(args.model, device=device)
    generation, scoring = Stopwatch(device), Stopwatch(device)
    model.generate = generation.wrap(model.generate)  # TRL calls the (unwrapped) model's generate

    @scoring.wrap
    def reward(completions, answer, **kwargs):
        return task.score(completions, answer)

    timings: list[Timing] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, arguments, state, control, **kwargs):
            generation.seconds = scoring.seconds = 0.0
            self.started = clock(device)

        def on_step_end(self, arguments, state, control, **kwargs):
            step = clock(device) - self.started
            timings.append(Timing(generation.seconds, scoring.seconds, step - generation.seconds - scoring.seconds, step))
            progress(f"TRL step {state.global_step}", timings[-1])
            between_steps(state.global_step - 1)

    dataset = datasets.Dataset.from_dict(
        {"prompt": task.prompts(tokenizer, problems), "answer": [problem.answer for problem in problems]}
    )
    config = trl.GRPOConfig(
        output_dir=output_dir,
        report_to="none",
        use_cpu=device.type == "cpu",
        bf16=False,  # TRL 1.16 defaults to bf16 and activation checkpointing; both engines run plain float32
        activation_checkpointing=False,
        num_generations=args.generations,
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_steps=args.repeats + 1,
        max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens},  # min = max: every completion has T tokens
        temperature=1.0,
        beta=0.0,
        shuffle_dataset=False,  # round r sees prompts [rB, (r+1)B), as our steps do
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    return trainer, timings


def progress(label: str, timing: Timing) -> None:
    print(f"{label}: generation {timing.generation:.2f} s, scoring {timing.scoring:.3f} s, "
          f"training {timing.training:.2f} s, step {timing.step:.2f} s", file=sys.stderr, flush=True)


def median_timing(timings: list[Timing]) -> Timing:
    return Timing(*(statistics.median(getattr(t, f) for t in timings) for f in ("generation", "scoring", "training", "step")))


def run(args) -> dict[str, Timing]:
    device = torch.device(args.device)
    rounds = args.repeats + 1
    task = Task(name="arithmetic", problems=generate_arithmetic(args.prompts * rounds, seed=0))
    problems = task.problems
    model, tokenizer = load_model(args.model, device=device)
    ours = OurStep(model, tokenizer, task, args, device)
    our_timings: dict[float, list[Timing]] = {ratio: [] for ratio in RATIOS}

    def between_steps(round_index: int) -> None:
        batch = problems[round_index * args.prompts : (round_index + 1) * args.prompts]
        order = RATIOS if round_index % 2 == 0 else tuple(reversed(RATIOS))
        for ratio in order:
            our_timings[ratio].append(ours(ratio, batch, seed=round_index))
            progress(f"ours x={ratio:.0%} step {round_index + 1}", our_timings[ratio][-1])

    with tempfile.TemporaryDirectory() as output_dir:
        trainer, trl_timings = trl_trainer(args, task, problems, device, between_steps, output_dir)
        trainer.train()
    results = {"TRL GRPOTrainer": median_timing(trl_timings[1:])}
    for ratio in RATIOS:
        results[f"ours x={ratio:.0%}"] = median_timing(our_timings[ratio][1:])
    print_report(args, results, trl_timings, our_timings, ours)
    return results


def print_report(args, results, trl_timings, our_timings, ours: OurStep) -> None:
    import trl
    import transformers

    print(
        f"\nmodel {args.model} ({ours.num_layers} layers), {args.prompts} prompts x G {args.generations}, "
        f"{args.tokens} tokens (min = max), {args.repeats} repeats after 1 warm-up, device {args.device}, "
        f"{torch.get_num_threads()} torch threads; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}"
    )
    print(f"skip sets at x=15%: {ours.skip_sets[0.15][1:]}")
    reference = results["TRL GRPOTrainer"].step
    print("\n| engine | x | generation s | scoring s | training s | step s | step / TRL step |")
    print("|---|---|---|---|---|---|---|")
    for name, timing in results.items():
        engine, x = ("TRL GRPOTrainer", "0%") if name.startswith("TRL") else ("Nested-ReFT", name.split("=")[1])
        print(
            f"| {engine} | {x} | {timing.generation:.2f} | {timing.scoring:.3f} | {timing.training:.2f} | "
            f"{timing.step:.2f} | {timing.step / reference:.3f} |"
        )
    print("\nstep times per repeat (s):")
    print(f"  TRL      : {[round(t.step, 2) for t in trl_timings[1:]]}")
    for ratio in RATIOS:
        print(f"  ours {ratio:>4.0%}: {[round(t.step, 2) for t in our_timings[ratio][1:]]}")
    ratio_0 = results["ours x=0%"].step / reference
    ratio_15 = results["ours x=15%"].step / reference
    print(f"\ntarget x=0 step <= TRL step: {ratio_0:.3f} ({'met' if ratio_0 <= 1.0 else 'NOT met'})")
    print(f"target x=15% step <= 0.9 x TRL step: {ratio_15:.3f} ({'met' if ratio_15 <= 0.9 else 'NOT met'})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a load_model name (alias, path, hub id)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (B)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--tokens", type=int, default=64, help="completion length T (min = max)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per engine, after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads; default 1 on CPU: on a small shared machine several OpenMP threads wait on each "
        "other (a SmolLM2 decoding forward took 14x longer with 2 threads than with 1 on 2 busy cores)",
    )
    args = parser.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    run(args)


if __name__ == "__main__":
    main()
