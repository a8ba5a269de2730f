"""The ReFT update (Algorithm 1, lines 13-14): one forward and backward pass of the full target model over
the step's rollouts, weighted by h_m, then one optimizer step.

With one update per batch, pi_old is the current policy, so logp_old is the detached log-prob of the
training forward itself (as TRL does): no extra forward pass. The batch is processed in micro-batches of
`micro_batch_size` rows with accumulated gradients; `grpo.LossScale` carries the whole step's counts, so
every loss aggregation weights its own micro-batches and their losses add up to the step's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from nested_reft.config import TrainConfig
from nested_reft.grpo import LossScale, grpo_loss, kl_to_reference
from nested_reft.importance import importance_weights
from nested_reft.influence import InfluenceMeter
from nested_reft.policy import completion_logprobs
from nested_reft.rollout import Rollouts


@dataclass
class TrainingState:
    """What an update needs: the (accelerate-prepared) model, its optimizer and schedule, the accelerator,
    the frozen reference model of the KL penalty (None when grpo.beta = 0), and the meter that reads each
    layer's influence off the training forward (None when the skip policy does not use it)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    reference: torch.nn.Module | None = None
    influence: InfluenceMeter | None = None

    @property
    def policy(self) -> torch.nn.Module:
        """The model itself, outside any DDP wrapper: what samples and what is saved."""
        return self.accelerator.unwrap_model(self.model)


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    finite: bool
    logp_old: torch.Tensor = field(repr=False)
    kl: float | None = None  # mean k3 KL to the reference over all ranks' tokens; None without a reference


def policy_update(state: TrainingState, rollouts: Rollouts, advantages: torch.Tensor, config: TrainConfig) -> UpdateResult:
    """Accumulate the Nested-ReFT loss's gradients over the micro-batches, then clip and step (if finite).

    With a reference model (beta > 0) each token's loss gets beta x TRL's k3 estimate of KL(pi_theta || pi_ref).
    """
    accelerator, device = state.accelerator, state.accelerator.device
    state.model.train()
    mask = rollouts.completion_mask.to(device).float()
    scale = LossScale(
        tokens=accelerator.reduce(mask.sum(), reduction="sum").item() / accelerator.num_processes,
        rows=mask.shape[0],
        max_length=config.sampling.max_new_tokens,
    )
    chunks = [slice(start, start + config.micro_batch_size) for start in range(0, scale.rows, config.micro_batch_size)]
    total_loss, kl_sum, logp_old_parts = 0.0, 0.0, []
    for index, rows in enumerate(chunks):
        inputs = [t[rows].to(device) for t in (rollouts.prompt_ids, rollouts.prompt_mask,
                                               rollouts.completion_ids, rollouts.completion_mask)]
        sync = contextlib.nullcontext() if index == len(chunks) - 1 else accelerator.no_sync(state.model)
        measure = state.influence.measuring(inputs[3]) if state.influence else contextlib.nullcontext()
        with sync:
            with accelerator.autocast(), measure:
                logp = completion_logprobs(state.model, *inputs, config.sampling.temperature)
                ref_logp = _reference_logprobs(state.reference, inputs, config)
            logp_old = logp.detach()
            weights = importance_weights(  # [N3] h_m(pi_theta, eta'_s), detached
                logp_old, rollouts.behavior_logprobs[rows].to(device), mask[rows],
                config.importance.mitigation, config.importance.retrace_lambda, config.importance.level,
            )
            loss = grpo_loss(  # [N4] h_m x clipped surrogate (+ beta KL), this micro-batch's share of the step's
                logp, logp_old, advantages[rows].to(device), mask[rows], weights,
                epsilon_low=config.grpo.epsilon, epsilon_high=config.grpo.clip_high, loss_type=config.grpo.loss_type,
                scale=scale, ref_logp=ref_logp, beta=config.grpo.beta,
            )
            accelerator.backward(loss)
        total_loss += loss.item()
        if ref_logp is not None:
            kl_sum += float((kl_to_reference(logp_old, ref_logp) * mask[rows]).sum())
        logp_old_parts.append(logp_old)
    # the whole step's loss (the mean over ranks), so every rank takes the same step-or-skip decision
    total_loss = accelerator.reduce(torch.tensor(total_loss, device=device), reduction="mean").item()
    grad_norm, finite = _step_if_finite(state, total_loss, config.grpo.max_grad_norm)
    kl = None
    if state.reference is not None:
        kl = accelerator.reduce(torch.tensor(kl_sum, device=device), reduction="sum").item()
        kl /= max(scale.tokens * accelerator.num_processes, 1.0)
    return UpdateResult(total_loss, grad_norm, finite, torch.cat(logp_old_parts).cpu(), kl)


def _step_if_finite(state: TrainingState, loss: float, max_grad_norm: float) -> tuple[float, bool]:
    """Clip the accumulated gradients, step optimizer and schedule unless the loss or the norm is not finite
    (a skipped update, counted by the trainer), and clear the gradients. Returns (grad norm, finite)."""
    grad_norm = float(state.accelerator.clip_grad_norm_(state.model.parameters(), max_grad_norm))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        state.optimizer.step()
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _reference_logprobs(reference, inputs: list[torch.Tensor], config: TrainConfig) -> torch.Tensor | None:
    """log pi_ref of the completions (no gradient), or None without a reference model (beta = 0)."""
    if reference is None:
        return None
    with torch.no_grad():
        return completion_logprobs(reference, *inputs, config.sampling.temperature)
