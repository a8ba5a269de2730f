"""What a run measures: one `StepMetrics` per ReFT step (a line of metrics.jsonl), the run's cumulative
`RunTotals` (kept in checkpoints) and the summary written to summary.json.

Over several processes: counts (tokens) are summed over ranks; rewards, completion lengths, h statistics and
KLs are computed on the gathered batch; times are the slowest rank's, since the step waits for it.

With rollout selection (`grpo.filter_groups`, `sampling.skip_predictable`; `rollout_selection`) a step samples more
than it trains on: its tokens, rollout FLOPs, generation time, rewards and completion lengths are those of every
completion it sampled (every round, dropped groups included: what the step spent, and what the policy does on the
prompts it met); its h statistics, KLs and loss those of the batch it trained on. Its records then also hold the
selection's counts (`SELECTION_FIELDS`), which the records of a run without selection leave out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from nested_reft.config import TrainConfig
from nested_reft.algorithm.importance import behavior_target_kl, importance_statistics
from nested_reft.nesting.layers import decoder_layers
from nested_reft.engines.rollout import Rollouts
from nested_reft.training.bridging import FitCost
from nested_reft.training.rollout_selection import SelectionCounts
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
    # Rollout selection (issue 32), None without it (and then not written): groups of G completions sampled over
    # the step's generation rounds and kept to train (0: no gradient step); the rounds; whether the step stopped at
    # grpo.filter_max_rounds short of batch_size informative groups; prompts of the data order skipped before
    # sampling and prompts sampled again after a skip; the exploration probability e the skips used
    groups_sampled: int | None = None
    groups_kept: int | None = None
    generation_rounds: int | None = None
    round_limit_hit: bool | None = None
    prompts_skipped: int | None = None
    prompts_returned: int | None = None
    skip_exploration: float | None = None


SELECTION_FIELDS = ("groups_sampled", "groups_kept", "generation_rounds", "round_limit_hit", "prompts_skipped",
                    "prompts_returned", "skip_exploration")


def metrics_record(metrics: StepMetrics) -> dict:
    """The line of metrics.jsonl: every field, but the selection's counts only in a run that selects."""
    record = asdict(metrics)
    if metrics.groups_sampled is None:
        for name in SELECTION_FIELDS:
            del record[name]
    return record


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
    selection: SelectionCounts | None = None  # what the step's rollout selection sampled and kept, if it selects


def step_metrics(result: StepResult, config: TrainConfig, accelerator, shapes: ModelShapes) -> StepMetrics:
    """The step's metrics over all ranks (see `StepMetrics`)."""
    rollouts, update, times, selection = result.rollouts, result.update, result.times, result.selection
    sampled = _Sampled.of(result, accelerator)
    flops = rollout_flops(shapes, rollouts.skip_set, sampled.prompt_lengths, sampled.completion_lengths,
                          rollouts.bridged)
    flops = float(accelerator.reduce(torch.tensor(flops, dtype=torch.float64, device=accelerator.device), "sum"))
    generation_s, scoring_s, training_s, step_s = _slowest_rank(
        accelerator, [sampled.generation_time_s, times.scored - times.generated, times.updated - times.scored,
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
        reward_mean=sampled.rewards.mean().item(),
        reward_std=sampled.rewards.std().item() if sampled.rewards.numel() > 1 else 0.0,
        fraction_correct=(sampled.rewards >= 1.0).float().mean().item(),
        completion_length=mask.sum(-1).mean().item() if selection is None else sampled.completion_length,
        generation_time_s=generation_s,
        scoring_time_s=scoring_s,
        training_time_s=training_s,
        step_time_s=step_s,
        tokens_generated=sampled.completion_tokens,
        tokens_processed=sampled.completion_tokens + sampled.prompt_tokens,
        rollout_flops=flops,
        gen_tokens_per_s=sampled.completion_tokens / max(generation_s, 1e-9),
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
        **_selection_counts(selection),
    )


@dataclass(frozen=True)
class _Sampled:
    """What the step sampled, over all ranks (token counts, rewards, the mean completion length), and this rank's
    rows' lengths and generation time: the trained batch's, or with rollout selection every round's."""

    prompt_lengths: torch.Tensor
    completion_lengths: torch.Tensor
    generation_time_s: float
    rewards: torch.Tensor
    prompt_tokens: int
    completion_tokens: int
    completion_length: float | None

    @classmethod
    def of(cls, result: StepResult, accelerator) -> _Sampled:
        rollouts, selection = result.rollouts, result.selection
        if selection is None:
            lengths = (rollouts.prompt_mask.sum(-1), rollouts.completion_mask.sum(-1))
            seconds, rewards = rollouts.generation_time_s, result.all_rewards
        else:
            lengths = (selection.prompt_lengths, selection.completion_lengths)
            seconds, rewards = selection.generation_time_s, selection.sampled_rewards
        device = accelerator.device
        prompts, completions = (int(accelerator.reduce(torch.tensor(int(value), device=device), "sum"))
                                for value in (lengths[0].sum(), lengths[1].sum()))
        length = None  # the trained batch's mean completion length is read off its gathered mask (`step_metrics`)
        if selection is not None:  # every rank samples as many rows
            every = accelerator.gather(lengths[1].to(device)).float()
            length = every.mean().item() if every.numel() else 0.0
        return cls(*lengths, seconds, rewards, prompts, completions, length)


def _selection_totals(rows: list[dict]) -> dict:
    """The selection's counts summed over a run's records (none for a run without selection)."""
    if not rows or rows[0].get("groups_sampled") is None:
        return {}
    totals = {name: sum(row[name] for row in rows)
              for name in ("groups_sampled", "groups_kept", "prompts_skipped", "prompts_returned")}
    return {**totals, "steps_without_update": sum(row["groups_kept"] == 0 for row in rows),
            "steps_at_round_limit": sum(bool(row["round_limit_hit"]) for row in rows)}


def _selection_counts(selection: SelectionCounts | None) -> dict:
    """The selection's counts as StepMetrics fields (none without selection)."""
    if selection is None:
        return {}
    return {"groups_sampled": selection.groups_sampled, "groups_kept": selection.groups_kept,
            "generation_rounds": selection.generation_rounds, "round_limit_hit": selection.round_limit_hit,
            "prompts_skipped": selection.prompts_skipped, "prompts_returned": selection.prompts_returned,
            "skip_exploration": selection.skip_exploration}


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
    With rollout selection, the run's groups sampled and kept, its steps without a gradient step (no group kept)
    and at the round limit, and its prompts skipped and returned, summed over the steps.
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
        **_selection_totals(rows),
        "skip_ratio": config.nesting.skip_ratio,
        "border": config.nesting.border,
        "mitigation": config.importance.mitigation,
        "seed": config.seed,
    }
