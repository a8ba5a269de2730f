"""Nested-ReFT, Algorithm 1 of the paper: SFT warm-up, then S GRPO steps on rollouts from nested models.

How Nested-ReFT differs from plain GRPO (TRL's GRPOTrainer), each marked where it happens:
  [N1] every step draws a skip set S_s = f_{x,b}(eta_s): U_x random valid layers;
  [N2] the G completions per prompt come from the nested behavior model eta'_s = nested(pi_theta, S_s),
       the same weights with those layers skipped, and their log-probs are recorded while sampling;
  [N3] the off-policy gap is corrected by a detached importance weight h_m(pi_theta, eta'_s);
  [N4] each token's clipped GRPO term is multiplied by h_m.
With x = 0, b = 0 and m = base the loop is classical ReFT (h = 1 up to rounding).

The engines live elsewhere (nesting, rollout, importance, grpo, sft, checkpoint); this module is the
loop, the bookkeeping a run leaves behind (metrics.jsonl, sft_metrics.jsonl, summary.json,
checkpoints) and the distribution over processes through `accelerate` (each rank samples for its share
of the prompts; DDP averages the gradients).

Randomness: `accelerate.utils.set_seed(seed)` at start; every sampling decision (data order, skip set,
tokens) comes from a generator seeded by (seed, step, purpose) alone (`_generator`), so a checkpoint's
step is the state of that randomness, and a resumed run draws what the uninterrupted one did. The
global torch RNG, still consumed in training mode (dropout when enabled), is saved in checkpoints.

Precision: weights and AdamW stay float32; `dtype` bfloat16/float16 runs every forward pass (rollouts,
training, reference, SFT) under accelerate's autocast (`Accelerator(mixed_precision=...)`).

Reference model (only when grpo.beta > 0, as in TRL): a frozen copy of the model ReFT starts from,
i.e. after the SFT warm-up; that model is saved to OUTPUT/sft-model so a resumed run reloads the same
reference (with sft.epochs = 0 the reference is `config.model` itself).
"""

from __future__ import annotations

import contextlib
import copy
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
from accelerate.utils import gather_object, set_seed

from nested_reft.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_states,
    rng_states_of_rank,
    save_checkpoint,
    save_model,
    verify_checkpoint,
)
from nested_reft.config import (
    RESUMABLE_OPTIONS,
    ConfigError,
    GRPOConfig,
    TrainConfig,
    config_differences,
    flat_options,
    load_config,
    save_config,
    to_dict,
)
from nested_reft.data import Problem
from nested_reft.grpo import group_advantages, grpo_loss, kl_to_reference
from nested_reft.importance import importance_statistics, importance_weights
from nested_reft.models import load_model
from nested_reft.nesting import (
    num_decoder_layers,
    num_skipped_layers,
    sample_skip_set,
    valid_layers,
)
from nested_reft.optim import lr_scheduler
from nested_reft.policy import completion_logprobs
from nested_reft.rollout import Rollouts, generate_rollouts, seeded_generator
from nested_reft.sft import SFTStep, sft_warmup
from nested_reft.tasks import Task

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
FINAL_MODEL_DIR = "model"
SFT_MODEL_DIR = "sft-model"  # the post-SFT model, kept only when beta > 0: the reference of a resumed run
SFT_METRICS_FILE = "sft_metrics.jsonl"
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}  # config.dtype -> accelerate


@dataclass
class StepMetrics:
    """One line of metrics.jsonl, over all processes.

    Counts (tokens) are summed over ranks, and rewards, completion lengths, h statistics and KLs are
    computed on the gathered batch. Times are the slowest rank's, since the step waits for it:
    gen_tokens_per_s = all ranks' generated tokens / the longest generation time of any rank.
    `kl` is the masked mean of TRL's k3 estimate of KL(pi_theta || pi_ref), None when beta = 0 (no reference).
    """

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
    kl: float | None
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
    kl: float | None = None  # mean k3 KL to the reference over all ranks' tokens; None without a reference


@dataclass
class RunTotals:
    """Cumulative counters of the ReFT phase, kept in checkpoints so a resumed run's summary is whole.

    runtime_s sums the ReFT steps' step_time_s: SFT (sft_runtime_s, apart), model loading and checkpoint
    writing are not in it, as the paper's runtime is the ReFT stage's.
    """

    runtime_s: float = 0.0
    generation_time_s: float = 0.0
    tokens_processed: int = 0
    tokens_generated: int = 0
    nonfinite_updates: int = 0
    sft_runtime_s: float = 0.0


def train(config: TrainConfig, task: Task | None = None, resume: bool = False) -> dict:
    """Run SFT (if sft.epochs > 0) and ReFT for `config`; return the summary written to summary.json."""
    accelerator = _accelerator(config)
    set_seed(config.seed)
    output = Path(config.output_dir)
    _check_world(accelerator)
    checkpoint = _checkpoint_to_resume(output, resume)
    if resume:
        _check_resumed_config(config, output / CONFIG_FILE)
    accelerator.wait_for_everyone()  # every rank decides fresh/resume before the main process writes anything
    model, tokenizer = load_model(config.model, dtype=torch.float32, device=accelerator.device)  # fp32 master weights
    check_fits_model(config, num_decoder_layers(model), accelerator.num_processes)
    task = task or Task.load(config.dataset, "train", config.data_dir)
    if accelerator.is_main_process:
        save_config(config, output / CONFIG_FILE)
    totals = RunTotals()
    if checkpoint is None and config.sft.epochs > 0:
        totals.sft_runtime_s = _warm_up(config, model, tokenizer, task, accelerator)
    if config.grpo.disable_dropout:
        disable_dropout(model)
    reference = reference_model(config, model, accelerator, resumed=checkpoint is not None)
    optimizer, scheduler = make_optimizer(model, config.grpo, config.rft_steps)
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        start_step, totals = state["step"], RunTotals(**state["totals"])
    _keep_metrics_up_to(output / METRICS_FILE, start_step, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    if config.report_to:
        accelerator.init_trackers("nested-reft", config=_flat(to_dict(config)))
    if checkpoint is not None:  # last, so that nothing above (loading, copying) moves the restored states
        restore_rng_states(checkpoint, accelerator.process_index)
    reft(config, task, model, tokenizer, optimizer, scheduler, accelerator, start_step, totals, reference)
    summary = summarize(output / METRICS_FILE, totals, config)
    if accelerator.is_main_process:
        save_model(output / FINAL_MODEL_DIR, accelerator.unwrap_model(model), tokenizer)
        atomic_write_json(output / SUMMARY_FILE, summary)
    # Every rank returns once the final model exists, and the ranks destroy the process group together:
    # a rank that destroys it while another still writes can hang the launch (pytorch/pytorch#75097).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _accelerator(config: TrainConfig) -> Accelerator:
    """The run's Accelerator, its mixed precision set by `config.dtype` (the one place that decides it)."""
    try:
        return Accelerator(
            mixed_precision=MIXED_PRECISION[config.dtype], log_with=list(config.report_to) or None,
            project_dir=config.output_dir,
        )
    except ValueError as error:  # accelerate's state is per process: its first precision stays
        raise ConfigError(f"dtype={config.dtype!r} cannot be used in this process: {error}") from error


def check_fits_model(config: TrainConfig, num_layers: int, world: int) -> None:
    """Start-up checks that need the model or the launch: refused before SFT, not after an hour of it.

    The micro-batch size need not divide a rank's completions: `policy_update` weights each chunk.
    """
    if config.batch_size % world:
        raise ConfigError(f"batch_size={config.batch_size} must be divisible by the number of processes ({world})")
    skipped = num_skipped_layers(num_layers, config.nesting.skip_ratio)
    valid = len(valid_layers(num_layers, config.nesting.border))
    if skipped > valid:
        raise ConfigError(
            f"nesting.skip_ratio={config.nesting.skip_ratio} skips {skipped} of the model's {num_layers} layers, but "
            f"nesting.border={config.nesting.border} leaves only {valid} valid layers: lower one of them"
        )


def _warm_up(config: TrainConfig, model, tokenizer, task: Task, accelerator) -> float:
    """Algorithm 1, step 1: the SFT warm-up, its steps logged to sft_metrics.jsonl; returns its runtime.

    With beta > 0 the warmed-up model is also saved to OUTPUT/sft-model: it is the reference model,
    which a resumed run (that skips SFT) reloads from there.
    """
    output = Path(config.output_dir)
    log = _jsonl_writer(output / SFT_METRICS_FILE, accelerator)
    start = time.perf_counter()
    with accelerator.autocast():
        sft_warmup(model, tokenizer, task.problems, config.sft, config.micro_batch_size, config.seed, on_step=log)
    elapsed = time.perf_counter() - start
    if config.grpo.beta > 0 and accelerator.is_main_process:
        save_model(output / SFT_MODEL_DIR, model, tokenizer)
    accelerator.wait_for_everyone()
    return elapsed


def _jsonl_writer(path: Path, accelerator):
    """An `on_step` callback appending each SFT step to `path` (main process), which starts empty."""
    if accelerator.is_main_process:
        atomic_write_text(path, "")

    def write(step: SFTStep) -> None:
        if accelerator.is_main_process:
            with open(path, "a") as stream:
                stream.write(json.dumps(asdict(step)) + "\n")

    return write


def disable_dropout(model) -> None:
    """Dropout off everywhere, as TRL's `disable_dropout` (nn.Dropout p = 0), and also in modules that keep
    their probability as a float attribute (Llama/OPT attention_dropout, OPT dropout and layerdrop)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name == "layerdrop") and isinstance(value, float):
                setattr(module, name, 0.0)


def reference_model(config: TrainConfig, model, accelerator, resumed: bool):
    """The frozen pi_ref of the KL penalty, or None when beta = 0 (then no reference is loaded at all).

    A fresh run copies the model it starts ReFT from; a resumed one reloads it: OUTPUT/sft-model after
    an SFT warm-up, else `config.model`.
    """
    if config.grpo.beta == 0:
        return None
    if not resumed:
        reference = copy.deepcopy(model)
    else:
        source = Path(config.output_dir) / SFT_MODEL_DIR if config.sft.epochs > 0 else config.model
        if config.sft.epochs > 0:
            verify_checkpoint(source)  # a missing or damaged sft-model is a CheckpointError, not another reference
        reference, _ = load_model(str(source), dtype=torch.float32, device=accelerator.device)
    reference.eval()  # no dropout in the reference, whatever grpo.disable_dropout says
    reference.requires_grad_(False)
    return reference


def reft(config, task, model, tokenizer, optimizer, scheduler, accelerator, start_step, totals, reference=None) -> None:
    """Algorithm 1, step 2: for s = 1..S, sample a nested model, roll out, score, update."""
    policy = accelerator.unwrap_model(model)
    num_layers = num_decoder_layers(policy)
    G = config.grpo.num_generations
    with _progress(accelerator, config.rft_steps, start_step) as advance:
        for step in range(start_step + 1, config.rft_steps + 1):
            started_at = time.perf_counter()
            problems = batch_for_step(task.problems, config, step, accelerator)  # line 7
            skip_set = sample_skip_set(  # [N1] line 9: f_{x,b}(eta_s), the same draw on every rank
                num_layers, config.nesting.skip_ratio, config.nesting.border, _generator(config.seed, step, "skip")
            )
            with accelerator.autocast():
                rollouts = generate_rollouts(  # [N2] lines 8, 10, 11: eta'_s = pi_{theta_{s-1}} without S_s
                    policy, tokenizer, task.prompts(tokenizer, problems), G, config.sampling, skip_set,
                    _generator(config.seed, step, f"sample-{accelerator.process_index}", accelerator.device),
                )
            generated_at = time.perf_counter()
            completions = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
            golds = [problem.answer for problem in problems for _ in range(G)]
            rewards = torch.tensor(task.score(completions, golds), dtype=torch.float32)  # line 12
            all_rewards, advantages = _advantages(rewards, config, accelerator)
            scored_at = time.perf_counter()
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step's update uses (logged as such)
            update = policy_update(  # lines 13-14
                model, optimizer, scheduler, rollouts, advantages, config, accelerator, reference=reference
            )
            updated_at = time.perf_counter()
            metrics = _step_metrics(
                step, skip_set, rollouts, all_rewards, update, config, accelerator, learning_rate,
                timings=(started_at, generated_at, scored_at, updated_at),
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


def _advantages(rewards: torch.Tensor, config: TrainConfig, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(all ranks' rewards, this rank's advantages), normalised over the whole batch as TRL does.

    Groups never straddle ranks, so "group" scaling is the same either way; "batch" needs the global std.
    """
    all_rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()  # rank-major = prompt-major
    advantages = group_advantages(all_rewards, config.grpo.num_generations, config.grpo.scale_rewards)
    rows = rewards.shape[0]
    return all_rewards, advantages[accelerator.process_index * rows : (accelerator.process_index + 1) * rows]


def policy_update(
    model, optimizer, scheduler, rollouts: Rollouts, advantages, config, accelerator, reference=None
) -> UpdateResult:
    """One forward and backward pass of the full target model over the batch, then one optimizer step.

    With one update per batch, pi_old is the current policy, so logp_old is the detached log-prob of
    the training forward itself (as TRL does): no extra forward pass. The batch is processed in chunks
    of `micro_batch_size` rows with accumulated gradients; every aggregation but "dapo" (already divided
    by the step's token count) is a mean over rows, so each chunk's loss is weighted by its share of the
    rows, which keeps a last, smaller chunk from being over-weighted. With `reference` (beta > 0) each
    token's loss gets beta x TRL's k3 estimate of KL(pi_theta || pi_ref).
    """
    model.train()
    grpo, device = config.grpo, accelerator.device
    mask = rollouts.completion_mask.to(device).float()
    num_tokens = accelerator.reduce(mask.sum(), reduction="sum").item() / accelerator.num_processes
    rows, micro = mask.shape[0], config.micro_batch_size
    chunks = range(0, rows, micro)
    total_loss, kl_sum, logp_old_parts = 0.0, 0.0, []
    for index, start in enumerate(chunks):
        part = slice(start, start + micro)
        inputs = [t[part].to(device) for t in (rollouts.prompt_ids, rollouts.prompt_mask,
                                                rollouts.completion_ids, rollouts.completion_mask)]
        sync = contextlib.nullcontext() if index == len(chunks) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                logp = completion_logprobs(model, *inputs, config.sampling.temperature)
                ref_logp = _reference_logprobs(reference, inputs, config)
            logp_old = logp.detach()
            weights = importance_weights(  # [N3] h_m(pi_theta, eta'_s), detached
                logp_old, rollouts.behavior_logprobs[part].to(device), mask[part],
                config.importance.mitigation, config.importance.retrace_lambda, config.importance.level,
            )
            loss = grpo_loss(  # [N4] h_m x clipped surrogate (+ beta KL)
                logp, logp_old, advantages[part].to(device), mask[part], weights,
                epsilon_low=grpo.epsilon, epsilon_high=grpo.clip_high, loss_type=grpo.loss_type,
                num_tokens=num_tokens, max_length=config.sampling.max_new_tokens, ref_logp=ref_logp, beta=grpo.beta,
            )
            if grpo.loss_type != "dapo":  # a mean over this chunk's rows: weight it by its share of the rows
                loss = loss * (mask[part].shape[0] / rows)
            accelerator.backward(loss)
        total_loss += loss.item()
        if ref_logp is not None:
            kl_sum += float((kl_to_reference(logp_old, ref_logp) * mask[part]).sum())
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
    kl = None
    if reference is not None:
        kl = accelerator.reduce(torch.tensor(kl_sum, device=device), reduction="sum").item()
        kl /= max(num_tokens * accelerator.num_processes, 1.0)
    return UpdateResult(total_loss, grad_norm, finite, torch.cat(logp_old_parts).cpu(), kl)


def _reference_logprobs(reference, inputs: list[torch.Tensor], config: TrainConfig) -> torch.Tensor | None:
    """log pi_ref of the completions (no gradient), or None without a reference model (beta = 0)."""
    if reference is None:
        return None
    with torch.no_grad():
        return completion_logprobs(reference, *inputs, config.sampling.temperature)


def make_optimizer(model, config: GRPOConfig, total_steps: int):
    """AdamW with TrainingArguments' defaults and a linear/cosine/constant schedule over the ReFT steps."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon, weight_decay=config.weight_decay,
    )
    warmup = int(config.warmup_ratio * total_steps)
    return optimizer, lr_scheduler(optimizer, config.lr_scheduler, total_steps, warmup)


def batch_for_step(problems: Sequence[Problem], config: TrainConfig, step: int, accelerator) -> list[Problem]:
    """This rank's share of the step's prompts: a seeded shuffle per epoch, read in order (resumable by step).

    A fraction of an epoch uses a proportional subset of the shuffled set, as in the paper (appendix F).
    """
    size, world = config.batch_size, accelerator.num_processes  # size % world == 0: `check_fits_model`
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
    step, skip_set, rollouts, all_rewards, update, config, accelerator, learning_rate, timings
) -> StepMetrics:
    """The step's metrics over all ranks (see `StepMetrics`); `all_rewards` are already gathered."""
    started_at, generated_at, scored_at, updated_at = timings
    device = accelerator.device
    generated = int(accelerator.reduce(torch.tensor(rollouts.completion_tokens, device=device), "sum"))
    prompts = int(accelerator.reduce(torch.tensor(rollouts.prompt_tokens, device=device), "sum"))
    generation_s, scoring_s, training_s, step_s = _slowest_rank(
        accelerator, [rollouts.generation_time_s, scored_at - generated_at, updated_at - scored_at,
                      updated_at - started_at],
    )
    mask = _gather_rows(accelerator, rollouts.completion_mask.float())
    stats = importance_statistics(
        _gather_rows(accelerator, update.logp_old), _gather_rows(accelerator, rollouts.behavior_logprobs), mask,
        config.importance.mitigation, config.importance.retrace_lambda, config.importance.level,
    )
    return StepMetrics(
        step=step,
        skip_set=list(skip_set),
        skipped_layers=len(skip_set),
        reward_mean=all_rewards.mean().item(),
        reward_std=all_rewards.std().item() if all_rewards.numel() > 1 else 0.0,
        fraction_correct=(all_rewards >= 1.0).float().mean().item(),
        completion_length=mask.sum(-1).mean().item(),
        generation_time_s=generation_s,
        scoring_time_s=scoring_s,
        training_time_s=training_s,
        step_time_s=step_s,
        tokens_generated=generated,
        tokens_processed=generated + prompts,
        gen_tokens_per_s=generated / max(generation_s, 1e-9),
        h_mean=stats.mean,
        h_min=stats.min,
        h_max=stats.max,
        h_truncated=stats.truncated,
        h_ess=stats.ess,
        kl_behavior_target=stats.kl_behavior_target,
        kl=update.kl,
        loss=update.loss,
        grad_norm=update.grad_norm,
        learning_rate=learning_rate,
        update_skipped=not update.finite,
    )


def _slowest_rank(accelerator, seconds: list[float]) -> list[float]:
    """Each duration's maximum over the ranks (the step waits for the slowest one)."""
    gathered = accelerator.gather(torch.tensor([seconds], dtype=torch.float64, device=accelerator.device))
    return gathered.max(dim=0).values.tolist()


def _gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' (rows, T) tensors stacked on the CPU, zero-padded to the longest T (masked out there)."""
    padded = accelerator.pad_across_processes(tensor.to(accelerator.device), dim=1, pad_index=0)
    return accelerator.gather(padded).cpu()


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
    """The run's headline numbers, as written to summary.json.

    total_runtime_s: the ReFT stage's runtime, the sum of the steps' step_time_s (the paper's runtime);
    SFT is apart (sft_runtime_s), model loading and checkpoint writing are in neither.
    token_speed: tokens processed (prompt + completion, all ranks) / total_runtime_s (the paper's metric).
    final_reward: the mean of reward_mean over the last 10% of the steps (at least one step), which
    smooths the step-to-step noise of a single batch.
    """
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
    """Save the newest checkpoint (main process), with every rank's global RNG states."""
    rng_states = {}
    for states in gather_object([rng_states_of_rank(accelerator.process_index)]):
        rng_states.update(states)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output = Path(config.output_dir)
        previous = latest_checkpoint(output)
        state = {"step": step, "totals": asdict(totals)}
        save_checkpoint(checkpoint_path(output, step), accelerator.unwrap_model(model), tokenizer, optimizer,
                        scheduler, state, rng_states)
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


def _check_resumed_config(config: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume with a config that differs from the run's saved one beyond RESUMABLE_OPTIONS."""
    if not saved_path.exists():
        return
    differences = config_differences(load_config(saved_path), config)
    if differences:
        raise ConfigError(
            f"--resume: the run in {saved_path.parent} was started with another config; differing options: "
            f"{'; '.join(differences)}. Resume with the saved config ({saved_path}) or start a new --output-dir "
            f"(only {', '.join(RESUMABLE_OPTIONS)} may change on resume)"
        )


def _keep_metrics_up_to(path: Path, step: int, accelerator) -> None:
    """On resume, drop metric lines past the checkpoint (they are recomputed); on a fresh run, start empty."""
    if not accelerator.is_main_process:
        return
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _flat(values: dict) -> dict:
    """The config as tracker hyperparameters: dotted names, non-scalar values as strings."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flat_options(values).items()}


@contextlib.contextmanager
def _progress(accelerator, total: int, done: int) -> Iterator:
    """A live progress bar (main process only) showing reward and generation tokens/s."""
    if not accelerator.is_main_process or total == 0:
        yield lambda metrics: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("ReFT"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("reft", total=total, completed=done, status="")

        def advance(metrics: StepMetrics) -> None:
            status = f"reward {metrics.reward_mean:.3f}  gen {metrics.gen_tokens_per_s:.0f} tok/s  skip {metrics.skip_set}"
            progress.update(bar, advance=1, status=status)

        yield advance
