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
import statistics
import warnings
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from nested_reft.config import GRPOConfig, TrainConfig
from nested_reft.algorithm.grpo import LossScale, clipped_tokens, grpo_loss, kl_to_reference
from nested_reft.algorithm.importance import importance_weights
from nested_reft.nesting.bridges import Bridges
from nested_reft.nesting.influence import InfluenceMeter
from nested_reft.engines.logprobs import completion_logprobs, training_backward
from nested_reft.engines.rollout import Rollouts
from nested_reft.training.bridging import BridgeTraining
from nested_reft.training.sharding import FSDP2, deferred_gradient_sync


@dataclass
class TrainingState:
    """What an update needs: the (accelerate-prepared or sharded) model, its optimizer and schedule, the
    accelerator, the frozen reference model of the KL penalty (None when grpo.beta = 0), the meter that reads
    each layer's influence off the training forward (None when the skip policy does not use it), the run's
    sharding (None: the model is whole on every rank), and its bridges, whose normal equations the first pass's
    forward feeds (None: skipped blocks are removed)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Accelerator
    reference: torch.nn.Module | None = None
    influence: InfluenceMeter | None = None
    fsdp2: FSDP2 | None = None
    bridging: BridgeTraining | None = None

    @property
    def policy(self) -> torch.nn.Module:
        """The model itself, outside any DDP wrapper: what samples and what is saved."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def bridges(self) -> Bridges | None:
        """The bridges the step's rollouts run in place of the skipped blocks (None: removed, the paper)."""
        return self.bridging.bridges if self.bridging is not None else None

    def gathered_for_generation(self, skip_set) -> contextlib.AbstractContextManager[int]:
        """The weights a step's generation reads, gathered once for it (FSDP2; else nothing to gather): a
        context yielding the bytes each rank gathered."""
        if self.fsdp2 is None:
            return contextlib.nullcontext(0)
        return self.fsdp2.gathered_for_generation(self.policy, skip_set)


@dataclass
class UpdateResult:
    """An update over the batch, one pass or the step's mu (then the passes' mean loss, gradient norm, KL to the
    reference and clipped fraction, whether every pass was finite, and the first pass's log pi_old (N, T))."""

    loss: float
    grad_norm: float
    finite: bool
    logp_old: torch.Tensor = field(repr=False)
    kl: float | None = None  # mean k3 KL to the reference over all ranks' tokens; None without a reference
    clip_fraction: float = 0.0  # share of tokens whose ratio pi_theta / pi_old the clip cut (0 when mu = 1)


def policy_update(state: TrainingState, rollouts: Rollouts, advantages: torch.Tensor, config: TrainConfig) -> UpdateResult:
    """Update on the batch `grpo.num_iterations` (mu) times, each pass accumulating the Nested-ReFT loss's
    gradients over the micro-batches, then clipping and stepping (if finite).

    pi_old is the model that sampled the batch. With mu = 1 it is the model being updated, so its log-probs
    are the detached ones of the training forward itself (as TRL does: no extra pass, and the clipped ratio is
    1). With mu > 1 they come from one no-grad forward before the first pass, the clipped ratio is
    pi_theta / pi_old, and h_m = h(pi_old, eta'_s) stays the same in every pass. With a reference model
    (beta > 0) each token's loss gets beta x TRL's k3 estimate of KL(pi_theta || pi_ref).
    """
    state.model.train()
    batch = _Batch.of(rollouts, advantages, config, state.accelerator)
    logp_old = None if config.grpo.num_iterations == 1 else _old_logprobs(state, batch, config)
    passes = [_one_pass(state, batch, config, logp_old, first=index == 0) for index in range(config.grpo.num_iterations)]
    kls = [one.kl for one in passes if one.kl is not None]
    return UpdateResult(
        loss=statistics.fmean(one.loss for one in passes),
        grad_norm=statistics.fmean(one.grad_norm for one in passes),
        finite=all(one.finite for one in passes),
        logp_old=passes[0].logp_old,
        kl=statistics.fmean(kls) if kls else None,
        clip_fraction=statistics.fmean(one.clip_fraction for one in passes),
    )


def no_update(state: TrainingState, rollouts: Rollouts, config: TrainConfig) -> UpdateResult:
    """A step with no group to train on (rollout selection at its round limit, `rollout_selection`): no forward, no
    gradient, no optimizer step. The schedule still advances, as the rate is a function of the step: later steps
    train at the rates they would have had."""
    with warnings.catch_warnings():  # a first step without an update has not stepped the optimizer yet
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range(config.grpo.num_iterations):
            state.scheduler.step()
    empty = torch.zeros_like(rollouts.behavior_logprobs).cpu()  # (0, T): no row, no log-prob
    return UpdateResult(loss=0.0, grad_norm=0.0, finite=True, logp_old=empty)


@dataclass
class _Batch:
    """The step's rollouts on the device, cut into micro-batches, with the counts that normalise the loss."""

    inputs: list[torch.Tensor]  # prompt ids, prompt mask, completion ids, completion mask
    behavior_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor  # completion mask, float
    scale: LossScale
    chunks: list[slice]

    @classmethod
    def of(cls, rollouts: Rollouts, advantages: torch.Tensor, config: TrainConfig, accelerator) -> _Batch:
        device = accelerator.device
        mask = loss_mask(rollouts, config.grpo).to(device)
        scale = LossScale(
            tokens=accelerator.reduce(mask.sum(), reduction="sum").item() / accelerator.num_processes,
            rows=mask.shape[0],
            max_length=config.sampling.max_new_tokens,
        )
        size = config.micro_batch_size
        return cls(
            inputs=[t.to(device) for t in (rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                           rollouts.completion_mask)],
            behavior_logprobs=rollouts.behavior_logprobs.to(device), advantages=advantages.to(device), mask=mask,
            scale=scale, chunks=[slice(start, start + size) for start in range(0, scale.rows, size)],
        )


def loss_mask(rollouts: Rollouts, grpo: GRPOConfig) -> torch.Tensor:
    """(N, T) float: the completion tokens the loss counts. With `grpo.mask_truncated_completions` (TRL's) the
    completions cut at max_new_tokens leave it; the step's h statistics read the same tokens."""
    mask = rollouts.completion_mask.float()
    return mask * rollouts.finished[:, None] if grpo.mask_truncated_completions else mask


def _old_logprobs(state: TrainingState, batch: _Batch, config: TrainConfig) -> torch.Tensor:
    """log pi_old of the batch (N, T): the model before this step's first pass, no gradient."""
    with torch.no_grad(), state.accelerator.autocast():
        return torch.cat([completion_logprobs(state.model, *[t[rows] for t in batch.inputs],
                                              config.sampling.temperature) for rows in batch.chunks])


def _one_pass(state: TrainingState, batch: _Batch, config: TrainConfig, logp_old: torch.Tensor | None,
              first: bool) -> UpdateResult:
    """One forward/backward over the micro-batches, then one optimizer step (if finite). The taps on the blocks
    (influence, bridges) read the forwards; the bridges only the first pass's, whose model is pi_old."""
    accelerator, device = state.accelerator, state.accelerator.device
    total_loss, kl_sum, clipped, old_parts = 0.0, 0.0, 0.0, []
    for index, rows in enumerate(batch.chunks):
        inputs = [t[rows] for t in batch.inputs]
        last = index == len(batch.chunks) - 1
        sync = contextlib.nullcontext() if last else deferred_gradient_sync(state.model, accelerator)
        with sync:
            with accelerator.autocast(), _tapped(state, inputs, first):
                logp = completion_logprobs(state.model, *inputs, config.sampling.temperature)
                ref_logp = _reference_logprobs(state.reference, inputs, config)
            old = logp.detach() if logp_old is None else logp_old[rows]
            # [N3] h_m(pi_old, eta'_s), detached
            weights = importance_weights(old, batch.behavior_logprobs[rows], batch.mask[rows], config.importance)
            loss = grpo_loss(  # [N4] h_m x clipped surrogate (+ beta KL), this micro-batch's share of the step's
                logp, old, batch.advantages[rows], batch.mask[rows], weights,
                epsilon_low=config.grpo.epsilon, epsilon_high=config.grpo.clip_high, loss_type=config.grpo.loss_type,
                scale=batch.scale, ref_logp=ref_logp, beta=config.grpo.beta,
            )
            training_backward(accelerator, loss)
        total_loss += loss.item()
        clipped += float(clipped_tokens(logp.detach(), old, batch.advantages[rows], batch.mask[rows],
                                        config.grpo.epsilon, config.grpo.clip_high))
        if ref_logp is not None:
            kl_sum += float((kl_to_reference(logp.detach(), ref_logp) * batch.mask[rows]).sum())
        old_parts.append(old)
    # the whole step's loss (the mean over ranks), so every rank takes the same step-or-skip decision
    total_loss = accelerator.reduce(torch.tensor(total_loss, device=device), reduction="mean").item()
    grad_norm, finite = _step_if_finite(state, total_loss, config.grpo.max_grad_norm)
    all_tokens = max(batch.scale.tokens * accelerator.num_processes, 1.0)
    clip_fraction = accelerator.reduce(torch.tensor(clipped, device=device), reduction="sum").item() / all_tokens
    kl = None
    if state.reference is not None:
        kl = accelerator.reduce(torch.tensor(kl_sum, device=device), reduction="sum").item() / all_tokens
    return UpdateResult(total_loss, grad_norm, finite, torch.cat(old_parts).cpu(), kl, clip_fraction)


def _tapped(state: TrainingState, inputs: list[torch.Tensor], first: bool) -> contextlib.ExitStack:
    """The taps a micro-batch's forward feeds: the influence meter (completion tokens) and, in the first pass, the
    bridges' normal equations (prompt and completion tokens)."""
    stack = contextlib.ExitStack()
    if state.influence is not None:
        stack.enter_context(state.influence.measuring(inputs[3]))
    if state.bridging is not None and first:
        stack.enter_context(state.bridging.recording(inputs[1], inputs[3]))
    return stack


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
