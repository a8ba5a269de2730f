"""Nested-ReFT, Algorithm 1 of the paper: SFT warm-up, then S GRPO steps on rollouts from nested models.

How Nested-ReFT differs from plain GRPO (TRL's GRPOTrainer), each marked where it happens:
  [N1] every step draws a skip set S_s = f_{x,b}(eta_s): U_x random valid layers;
  [N2] the G completions per prompt come from the nested behavior model eta'_s = nested(pi_theta, S_s),
       the same weights with those layers skipped, and their log-probs are recorded while sampling;
  [N3] the off-policy gap is corrected by a detached importance weight h_m(pi_theta, eta'_s);
  [N4] each token's clipped GRPO term is multiplied by h_m.
With x = 0, b = 0 and m = base the loop is classical ReFT (h = 1 up to rounding).

The engines live elsewhere (nesting, rollout, importance, grpo, sft, checkpoint); this module is the
loop, the bookkeeping a run leaves behind (metrics.jsonl, summary.json, checkpoints) and the
distribution over processes through `accelerate` (each rank samples for its share of the prompts;
DDP averages the gradients).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from nested_reft.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_model,
)
from nested_reft.config import ConfigError, GRPOConfig, TrainConfig, save_config, to_dict
from nested_reft.data import Problem
from nested_reft.grpo import group_advantages, grpo_loss
from nested_reft.importance import importance_statistics, importance_weights
from nested_reft.models import load_model
from nested_reft.nesting import num_decoder_layers, sample_skip_set
from nested_reft.policy import completion_logprobs
from nested_reft.rollout import Rollouts, generate_rollouts, seeded_generator
from nested_reft.sft import sft_warmup
from nested_reft.tasks import Task

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
FINAL_MODEL_DIR = "model"


@dataclass
class StepMetrics:
    """One line of metrics.jsonl."""

    step: int
    skip_set: list[int]
    skipped_layers: int
    reward_mean: float
    reward_std: float
    fraction_correct: float
    completion_length: float
    generation_time_s: float
    scoring_time_s: float
    training_time_s: float
    step_time_s: float
    tokens_generated: int
    tokens_processed: int
    gen_tokens_per_s: float
    h_mean: float
    h_min: float
    h_max: float
    h_truncated: float
    h_ess: float
    kl_behavior_target: float
    loss: float
    grad_norm: float
    learning_rate: float
    update_skipped: bool


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    finite: bool
    logp_old: torch.Tensor = field(repr=False)


@dataclass
class RunTotals:
    """Cumulative counters of the ReFT phase, kept in checkpoints so a resumed run's summary is whole."""

    runtime_s: float = 0.0
    generation_time_s: float = 0.0
    tokens_processed: int = 0
    tokens_generated: int = 0
    nonfinite_updates: int = 0
    sft_runtime_s: float = 0.0


def train(config: TrainConfig, task: Task | None = None, resume: bool = False) -> dict:
    """Run SFT (if sft.epochs > 0) and ReFT for `config`; return the summary written to summary.json."""
    accelerator = Accelerator(log_with=list(config.report_to) or None, project_dir=config.output_dir)
    output = Path(config.output_dir)
    _check_world(accelerator)
    checkpoint = _checkpoint_to_resume(output, resume)
    accelerator.wait_for_everyone()  # every rank decides fresh/resume before the main process writes anything
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=accelerator.device)
    task = task or Task.load(config.dataset, "train", config.data_dir)
    if accelerator.is_main_process:
        save_config(config, output / CONFIG_FILE)
    totals = RunTotals()
    if checkpoint is None and config.sft.epochs > 0:
        start = time.perf_counter()
        sft_warmup(model, tokenizer, task.problems, config.sft, config.micro_batch_size, config.seed)
        totals.sft_runtime_s = time.perf_counter() - start
    optimizer, scheduler = make_optimizer(model, config.grpo, config.rft_steps)
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        start_step, totals = state["step"], RunTotals(**state["totals"])
    _keep_metrics_up_to(output / METRICS_FILE, start_step, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.report_to:
        accelerator.init_trackers("nested-reft", config=_flat(to_dict(config)))
    reft(config, task, model, tokenizer, optimizer, scheduler, accelerator, start_step, totals)
    summary = summarize(output / METRICS_FILE, totals, config)
    if accelerator.is_main_process:
        save_model(output / FINAL_MODEL_DIR, accelerator.unwrap_model(model), tokenizer)
        atomic_write_json(output / SUMMARY_FILE, summary)
    accelerator.end_training()
    return summary


def reft(config, task, model, tokenizer, optimizer, scheduler, accelerator, start_step, totals) -> None:
    """Algorithm 1, step 2: for s = 1..S, sample a nested model, roll out, score, update."""
    policy = accelerator.unwrap_model(model)
    num_layers = num_decoder_layers(policy)
    G = config.grpo.num_generations
    with _progress(accelerator, config.rft_steps, start_step) as advance:
        for step in range(start_step + 1, config.rft_steps + 1):
            started = time.perf_counter()
            problems = batch_for_step(task.problems, config, step, accelerator)  # line 7
            skip_set = sample_skip_set(  # [N1] line 9: f_{x,b}(eta_s), the same draw on every rank
                num_layers, config.nesting.skip_ratio, config.nesting.border, _generator(config.seed, step, "skip")
            )
            rollouts = generate_rollouts(  # [N2] lines 8, 10, 11: eta'_s = pi_{theta_{s-1}} without S_s
                policy, tokenizer, task.prompts(tokenizer, problems), G, config.sampling, skip_set,
                _generator(config.seed, step, f"sample-{accelerator.process_index}", accelerator.device),
            )
            scored = time.perf_counter()
            completions = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
            golds = [problem.answer for problem in problems for _ in range(G)]
            rewards = torch.tensor(task.score(completions, golds), dtype=torch.float32)  # line 12
            advantages = group_advantages(rewards, G, config.grpo.scale_rewards)
            trained = time.perf_counter()
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step's update uses (logged as such)
            update = policy_update(model, optimizer, scheduler, rollouts, advantages, config, accelerator)  # 13-14
            finished = time.perf_counter()
            metrics = _step_metrics(
                step, skip_set, rollouts, rewards, update, config, accelerator, learning_rate,
                timings=(started, scored, trained, finished),
            )
            _accumulate(totals, metrics)
            totals.nonfinite_updates += int(not update.finite)
            _log(metrics, config, accelerator)
            advance(metrics)
            if not update.finite and 0 < config.max_nonfinite_steps <= totals.nonfinite_updates:
                raise FloatingPointError(
                    f"{totals.nonfinite_updates} updates had a non-finite loss or gradient "
                    f"(max_nonfinite_steps={config.max_nonfinite_steps}); last at step {step}"
                )
            if step % config.save_steps == 0 or step == config.rft_steps:
                _checkpoint(config, model, tokenizer, optimizer, scheduler, accelerator, step, totals)


def policy_update(model, optimizer, scheduler, rollouts: Rollouts, advantages, config, accelerator) -> UpdateResult:
    """One forward and backward pass of the full target model over the batch, then one optimizer step.

    With one update per batch, pi_old is the current policy, so logp_old is the detached log-prob of
    the training forward itself (as TRL does): no extra forward pass.
    """
    model.train()
    grpo, device = config.grpo, accelerator.device
    mask = rollouts.completion_mask.to(device).float()
    num_tokens = accelerator.reduce(mask.sum(), reduction="sum").item() / accelerator.num_processes
    micro = config.micro_batch_size
    chunks = range(0, mask.shape[0], micro)
    total_loss, logp_old_parts = 0.0, []
    for index, start in enumerate(chunks):
        rows = slice(start, start + micro)
        sync = contextlib.nullcontext() if index == len(chunks) - 1 else accelerator.no_sync(model)
        with sync:
            logp = completion_logprobs(
                model, rollouts.prompt_ids[rows].to(device), rollouts.prompt_mask[rows].to(device),
                rollouts.completion_ids[rows].to(device), rollouts.completion_mask[rows].to(device),
                config.sampling.temperature,
            )
            logp_old = logp.detach()
            weights = importance_weights(  # [N3] h_m(pi_theta, eta'_s), detached
                logp_old, rollouts.behavior_logprobs[rows].to(device), mask[rows],
                config.importance.mitigation, config.importance.retrace_lambda, config.importance.level,
            )
            loss = grpo_loss(  # [N4] h_m x clipped surrogate
                logp, logp_old, advantages[rows].to(device), mask[rows], weights,
                epsilon_low=grpo.epsilon, epsilon_high=grpo.epsilon_high, loss_type=grpo.loss_type,
                num_tokens=num_tokens, max_length=config.sampling.max_new_tokens,
            )
            if grpo.loss_type != "dapo":  # per-micro-batch means: average them over the accumulation
                loss = loss / len(chunks)
            accelerator.backward(loss)
        total_loss += loss.item()
        logp_old_parts.append(logp_old)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grpo.max_grad_norm)
    grad_norm = float(grad_norm)
    # the whole step's loss (the mean over ranks), so every rank takes the same step-or-skip decision
    total_loss = accelerator.reduce(torch.tensor(total_loss, device=device), reduction="mean").item()
    finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateResult(total_loss, grad_norm, finite, torch.cat(logp_old_parts).cpu())


def make_optimizer(model, config: GRPOConfig, total_steps: int):
    """AdamW with TrainingArguments' defaults and a linear/cosine/constant schedule over the ReFT steps."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon, weight_decay=config.weight_decay,
    )
    warmup = int(config.warmup_ratio * total_steps)
    decay = max(total_steps - warmup, 1)
    shapes = {
        "constant": lambda progress: 1.0,
        "linear": lambda progress: 1.0 - progress,
        "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    }
    shape = shapes[config.lr_scheduler]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return shape(min((step - warmup) / decay, 1.0))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_for_step(problems: Sequence[Problem], config: TrainConfig, step: int, accelerator) -> list[Problem]:
    """This rank's share of the step's prompts: a seeded shuffle per epoch, read in order (resumable by step).

    A fraction of an epoch uses a proportional subset of the shuffled set, as in the paper (appendix F).
    """
    size, world = config.batch_size, accelerator.num_processes
    if size % world:
        raise ConfigError(f"batch_size={size} must be divisible by the number of processes ({world})")
    first = (step - 1) * size
    indices = [_shuffled_index(len(problems), config.seed, position) for position in range(first, first + size)]
    share = size // world
    mine = indices[accelerator.process_index * share : (accelerator.process_index + 1) * share]
    return [problems[i] for i in mine]


def _shuffled_index(length: int, seed: int, position: int) -> int:
    epoch, offset = divmod(position, length)
    order = torch.randperm(length, generator=_generator(seed, epoch, "data"))
    return int(order[offset])


def _generator(seed: int, step: int, purpose: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, step, purpose), so a resumed run draws what the original did."""
    return seeded_generator(f"{seed}:{step}:{purpose}", device)


def _step_metrics(
    step, skip_set, rollouts, rewards, update, config, accelerator, learning_rate, timings
) -> StepMetrics:
    started, scored, trained, finished = timings
    all_rewards = accelerator.gather(rewards.to(accelerator.device)).float()
    generated = int(accelerator.reduce(torch.tensor(rollouts.completion_tokens, device=accelerator.device), "sum"))
    prompts = int(accelerator.reduce(torch.tensor(rollouts.prompt_tokens, device=accelerator.device), "sum"))
    stats = importance_statistics(
        update.logp_old, rollouts.behavior_logprobs, rollouts.completion_mask.float(),
        config.importance.mitigation, config.importance.retrace_lambda, config.importance.level,
    )
    lengths = rollouts.completion_mask.sum(-1).float()
    return StepMetrics(
        step=step,
        skip_set=list(skip_set),
        skipped_layers=len(skip_set),
        reward_mean=all_rewards.mean().item(),
        reward_std=all_rewards.std().item() if all_rewards.numel() > 1 else 0.0,
        fraction_correct=(all_rewards >= 1.0).float().mean().item(),
        completion_length=lengths.mean().item(),
        generation_time_s=rollouts.generation_time_s,
        scoring_time_s=trained - scored,
        training_time_s=finished - trained,
        step_time_s=finished - started,
        tokens_generated=generated,
        tokens_processed=generated + prompts,
        gen_tokens_per_s=generated / max(rollouts.generation_time_s, 1e-9),
        h_mean=stats.mean,
        h_min=stats.min,
        h_max=stats.max,
        h_truncated=stats.truncated,
        h_ess=stats.ess,
        kl_behavior_target=stats.kl_behavior_target,
        loss=update.loss,
        grad_norm=update.grad_norm,
        learning_rate=learning_rate,
        update_skipped=not update.finite,
    )


def _accumulate(totals: RunTotals, metrics: StepMetrics) -> None:
    totals.runtime_s += metrics.step_time_s
    totals.generation_time_s += metrics.generation_time_s
    totals.tokens_processed += metrics.tokens_processed
    totals.tokens_generated += metrics.tokens_generated


def _log(metrics: StepMetrics, config: TrainConfig, accelerator) -> None:
    if accelerator.is_main_process:
        with open(Path(config.output_dir) / METRICS_FILE, "a") as stream:
            stream.write(json.dumps(asdict(metrics)) + "\n")
    if config.report_to:
        scalars = {k: v for k, v in asdict(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log(scalars, step=metrics.step)


def summarize(metrics_path: Path, totals: RunTotals, config: TrainConfig) -> dict:
    """The run's headline numbers; token speed = tokens processed / total runtime (the paper's metric)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    tail = rows[-max(1, len(rows) // 10) :] if rows else []
    return {
        "steps": len(rows),
        "total_runtime_s": totals.runtime_s,
        "token_speed": totals.tokens_processed / max(totals.runtime_s, 1e-9),
        "generation_share": totals.generation_time_s / max(totals.runtime_s, 1e-9),
        "tokens_processed": totals.tokens_processed,
        "tokens_generated": totals.tokens_generated,
        "final_reward": sum(r["reward_mean"] for r in tail) / len(tail) if tail else None,
        "nonfinite_updates": totals.nonfinite_updates,
        "sft_runtime_s": totals.sft_runtime_s,
        "skip_ratio": config.nesting.skip_ratio,
        "border": config.nesting.border,
        "mitigation": config.importance.mitigation,
        "seed": config.seed,
    }


def _checkpoint(config, model, tokenizer, optimizer, scheduler, accelerator, step, totals) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(config.output_dir)
        previous = latest_checkpoint(output)
        state = {"step": step, "totals": asdict(totals)}
        save_checkpoint(checkpoint_path(output, step), accelerator.unwrap_model(model), tokenizer, optimizer,
                        scheduler, state)
        if previous is not None and previous != checkpoint_path(output, step):
            shutil.rmtree(previous, ignore_errors=True)  # keep the newest complete checkpoint only
    accelerator.wait_for_everyone()


def _check_world(accelerator) -> None:
    """Refuse a multi-process launch that `accelerate` does not see (each rank would run, and write, alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"{launched} processes were launched (WORLD_SIZE) but accelerate runs {accelerator.num_processes}: "
            "on CPU launch with `accelerate launch --cpu` or set ACCELERATE_USE_CPU=1"
        )


def _checkpoint_to_resume(output: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a finished or started run."""
    if resume:
        return latest_checkpoint(output)
    if (output / METRICS_FILE).exists() or latest_checkpoint(output) is not None:
        raise ConfigError(f"output_dir {output} already holds a run: pass --resume, or choose another --output-dir")
    return None


def _keep_metrics_up_to(path: Path, step: int, accelerator) -> None:
    """On resume, drop metric lines past the checkpoint (they are recomputed); on a fresh run, start empty."""
    if not accelerator.is_main_process:
        return
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


@contextlib.contextmanager
def _progress(accelerator, total: int, done: int) -> Iterator:
    """A live progress bar (main process only) showing reward and generation tokens/s."""
    if not accelerator.is_main_process or total == 0:
        yield lambda metrics: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("ReFT"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("reft", total=total, completed=done, status="")

        def advance(metrics: StepMetrics) -> None:
            status = f"reward {metrics.reward_mean:.3f}  gen {metrics.gen_tokens_per_s:.0f} tok/s  skip {metrics.skip_set}"
            progress.update(bar, advance=1, status=status)

        yield advance
