"""What a run measures: one `StepMetrics` per ReFT step (a line of metrics.jsonl), the run's cumulative
`RunTotals` (kept in checkpoints) and the summary written to summary.json.

Over several processes: counts (tokens) are summed over ranks; rewards, completion lengths, h statistics and
KLs are computed on the gathered batch; times are the slowest rank's, since the step waits for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nested_reft.config import TrainConfig
from nested_reft.algorithm.importance import behavior_target_kl, importance_statistics
from nested_reft.nesting.layers import decoder_layers
from nested_reft.engines.rollout import Rollouts
from nested_reft.training.bridging import FitCost
from nested_reft.training.update import UpdateResult, loss_mask


@dataclass
class StepMetrics:
    """One line of metrics.jsonl, over all processes.

    gen_tokens_per_s = all ranks' generated tokens / the longest generation time of any rank.
    `kl` is the masked mean of TRL's k3 estimate of KL(pi_theta || pi_ref), None when beta = 0 (no reference).
    The h statistics cover the loss's tokens (`update.loss_mask`): with grpo.mask_truncated_completions, not those
    of cut completions, and they are None on a step whose loss counts no token. kl_behavior_target, a distance
    between the models rather than a statistic of the loss, covers every sampled token.
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
    rollout_flops: float  # the rollout's forward FLOPs over all ranks, from the model's shapes (see `rollout_flops`)
    gen_tokens_per_s: float
    h_mean: float | None
    h_min: float | None
    h_max: float | None
    h_truncated: float | None
    h_ess: float | None
    kl_behavior_target: float | None
    kl: float | None
    loss: float
    grad_norm: float
    clip_fraction: float
    learning_rate: float
    update_skipped: bool
    layer_influence: list[float] | None  # each block's Block Influence this step, when the skip policy measures it
    gathered_weight_bytes: int = 0  # FSDP2: whole weights each rank gathered to generate (skipped layers are not)
    # sampling.engine = vllm: mean and max |vLLM's behavior log-prob - ours| over the sampled tokens, both under
    # the step's nested model (the training-inference mismatch TRL and verl monitor); None for our own engines
    engine_logprob_diff_mean: float | None = None
    engine_logprob_diff_max: float | None = None
    # nesting.bridge = linear: the wall time and FLOPs of folding this step's normal equations in and solving the
    # bridges when the step refits them (a fresh run's first step includes the calibration's); None without bridges
    bridge_fit_time_s: float | None = None
    bridge_fit_flops: float | None = None


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
    sft_flops: float = 0.0  # the warm-up's training FLOPs, its second forwards included (`sft.warm_up_flops`)
    bridge_fit_time_s: float = 0.0  # nesting.bridge = linear: the calibration (not in runtime_s) and the steps' fits
    bridge_fit_flops: float = 0.0

    def add_fit(self, cost: FitCost) -> None:
        self.bridge_fit_time_s += cost.time_s
        self.bridge_fit_flops += cost.flops

    def add(self, metrics: StepMetrics) -> None:
        if metrics.bridge_fit_time_s is not None:
            self.add_fit(FitCost(metrics.bridge_fit_time_s, metrics.bridge_fit_flops))
        self.runtime_s += metrics.step_time_s
        self.generation_time_s += metrics.generation_time_s
        self.tokens_processed += metrics.tokens_processed
        self.tokens_generated += metrics.tokens_generated
        self.nonfinite_updates += int(metrics.update_skipped)


@dataclass(frozen=True)
class ModelShapes:
    """What a forward pass costs per token: each block's parameters, the output head's, the hidden size."""

    block_parameters: tuple[int, ...]
    head_parameters: int
    hidden_size: int

    @classmethod
    def of(cls, model) -> ModelShapes:
        _, _, layers = decoder_layers(model)
        head = model.get_output_embeddings()
        return cls(
            block_parameters=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
            head_parameters=head.weight.numel(),
            hidden_size=model.config.get_text_config().hidden_size,
        )


def rollout_flops(shapes: ModelShapes, skip_set: Sequence[int], prompt_lengths: torch.Tensor,
                  completion_lengths: torch.Tensor, bridged: bool = False) -> float:
    """Forward FLOPs of sampling completions of `completion_lengths` after prompts of `prompt_lengths` (per row)
    with the blocks of `skip_set` skipped: 2 x (kept blocks' + head parameters) per token processed (the 2N
    rule; the head only at the positions that produce a token), plus attention's 4 x hidden x context per
    token and kept block (QK^T and AV against a KV cache). Machine-independent, unlike wall time, so curves
    against it compare runs made under any load. The embedding lookup and norms are not counted. With `bridged`,
    each skipped block's bridge costs its 2 (d^2 + d) per token processed (`nesting.bridges`)."""
    kept = [count for index, count in enumerate(shapes.block_parameters) if index not in set(skip_set)]
    prompts, completions = prompt_lengths.double(), completion_lengths.double()
    tokens = float((prompts + completions).sum())
    linear = 2.0 * sum(kept) * tokens + 2.0 * shapes.head_parameters * float(completions.sum())
    # context summed over positions: the prompt's causal prefill, then each new token sees all before it
    contexts = float((prompts * (prompts + 1) / 2 + completions * prompts + completions * (completions + 1) / 2).sum())
    bridges = 2.0 * (shapes.hidden_size**2 + shapes.hidden_size) * len(set(skip_set)) * tokens if bridged else 0.0
    return linear + bridges + 4.0 * shapes.hidden_size * len(kept) * contexts


@dataclass(frozen=True)
class StepTimes:
    """perf_counter() readings at a step's phase boundaries on this rank."""

    started: float
    generated: float
    scored: float
    updated: float


@dataclass(frozen=True)
class StepResult:
    """What one ReFT step produced on this rank, as `step_metrics` reads it."""

    step: int
    rollouts: Rollouts
    all_rewards: torch.Tensor  # every rank's rewards, already gathered
    update: UpdateResult
    learning_rate: float  # the rate the update used
    times: StepTimes
    layer_influence: list[float] | None = None  # each block's influence, when the skip policy measures it
    gathered_weight_bytes: int = 0  # FSDP2: the whole weights this rank gathered to generate
    bridge_fit: FitCost | None = None  # the step's bridge fitting (nesting.bridge = linear)


def step_metrics(result: StepResult, config: TrainConfig, accelerator, shapes: ModelShapes) -> StepMetrics:
    """The step's metrics over all ranks (see `StepMetrics`)."""
    rollouts, update, times, all_rewards = result.rollouts, result.update, result.times, result.all_rewards
    device = accelerator.device
    generated = int(accelerator.reduce(torch.tensor(rollouts.completion_tokens, device=device), "sum"))
    prompts = int(accelerator.reduce(torch.tensor(rollouts.prompt_tokens, device=device), "sum"))
    flops = rollout_flops(shapes, rollouts.skip_set, rollouts.prompt_mask.sum(-1), rollouts.completion_mask.sum(-1),
                          rollouts.bridged)
    flops = float(accelerator.reduce(torch.tensor(flops, dtype=torch.float64, device=device), "sum"))
    generation_s, scoring_s, training_s, step_s = _slowest_rank(
        accelerator, [rollouts.generation_time_s, times.scored - times.generated, times.updated - times.scored,
                      times.updated - times.started],
    )
    mask = _gather_rows(accelerator, rollouts.completion_mask.float())
    logp_old = _gather_rows(accelerator, update.logp_old)
    logp_behavior = _gather_rows(accelerator, rollouts.behavior_logprobs)
    stats = importance_statistics(  # over the loss's tokens: masked cut completions are not weighted
        logp_old, logp_behavior, _gather_rows(accelerator, loss_mask(rollouts, config.grpo)), config.importance)
    return StepMetrics(
        step=result.step,
        skip_set=list(rollouts.skip_set),
        skipped_layers=len(rollouts.skip_set),
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
        rollout_flops=flops,
        gen_tokens_per_s=generated / max(generation_s, 1e-9),
        h_mean=stats.mean,
        h_min=stats.min,
        h_max=stats.max,
        h_truncated=stats.truncated,
        h_ess=stats.ess,
        kl_behavior_target=behavior_target_kl(logp_old, logp_behavior, mask),
        kl=update.kl,
        loss=update.loss,
        grad_norm=update.grad_norm,
        clip_fraction=update.clip_fraction,
        learning_rate=result.learning_rate,
        update_skipped=not update.finite,
        layer_influence=result.layer_influence,
        gathered_weight_bytes=result.gathered_weight_bytes,
        **_engine_mismatch(rollouts),
        bridge_fit_time_s=result.bridge_fit.time_s if result.bridge_fit else None,
        bridge_fit_flops=result.bridge_fit.flops if result.bridge_fit else None,
    )


def _engine_mismatch(rollouts: Rollouts) -> dict[str, float]:
    """The engine's log-prob mismatch as StepMetrics fields (this rank's: the vLLM engine runs on one process)."""
    if rollouts.logprob_mismatch is None:
        return {}
    mean, largest = rollouts.logprob_mismatch
    return {"engine_logprob_diff_mean": mean, "engine_logprob_diff_max": largest}


def _slowest_rank(accelerator, seconds: list[float]) -> list[float]:
    """Each duration's maximum over the ranks (the step waits for the slowest one)."""
    gathered = accelerator.gather(torch.tensor([seconds], dtype=torch.float64, device=accelerator.device))
    return gathered.max(dim=0).values.tolist()


def _gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' (rows, T) tensors stacked on the CPU, zero-padded to the longest T (masked out there)."""
    padded = accelerator.pad_across_processes(tensor.to(accelerator.device), dim=1, pad_index=0)
    return accelerator.gather(padded).cpu()


def summarize(rows: list[dict], totals: RunTotals, config: TrainConfig) -> dict:
    """The run's headline numbers from its metrics records and totals, as written to summary.json.

    total_runtime_s: the ReFT stage's runtime, the sum of the steps' step_time_s (the paper's runtime);
    SFT is apart (sft_runtime_s, and its training FLOPs sft_flops), model loading and checkpoint writing are in
    neither.
    token_speed: tokens processed (prompt + completion, all ranks) / total_runtime_s (the paper's metric).
    final_reward: the mean of reward_mean over the last 10% of the steps (at least one step), which
    smooths the step-to-step noise of a single batch.
    """
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
        "sft_flops": totals.sft_flops,
        **({"bridge_fit_time_s": totals.bridge_fit_time_s, "bridge_fit_flops": totals.bridge_fit_flops}
           if config.nesting.bridge != "none" else {}),
        "skip_ratio": config.nesting.skip_ratio,
        "border": config.nesting.border,
        "mitigation": config.importance.mitigation,
        "seed": config.seed,
    }
