"""The GRPO objective as pure tensor functions (Shao et al. 2024, as implemented by TRL's GRPOTrainer).

Nested-ReFT changes one thing here: each token's clipped surrogate is multiplied by a detached
importance weight h_m (see `importance`). With h = 1 everything below is TRL's loss for the same
settings, which `tests/test_trl_peer.py` checks against TRL itself.

Shapes: N completions (B prompts x G generations, prompt-major), T completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nested_reft.algorithm.kl import k3

ADVANTAGE_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def _divide_by_group_std(centred: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    return centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)


def _divide_by_batch_std(centred: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    return centred / (grouped.std() + ADVANTAGE_EPS)


def _centred_only(centred: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    return centred


# TRL's scale_rewards: (centred (B, G), rewards (B, G)) -> advantages (B, G). The unbiased std, as TRL.
REWARD_SCALINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "group": _divide_by_group_std,
    "batch": _divide_by_batch_std,
    "none": _centred_only,
}


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Group-normalised advantages (N,) from rewards (N,): (r - group mean) / (group std + 1e-4).

    `scale_rewards` as in TRL (`REWARD_SCALINGS`): "group" divides by each group's std, "batch" by the batch
    std, "none" only centres. A group whose rewards are all equal gets advantage 0 (and never NaN).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    if scale_rewards not in REWARD_SCALINGS:
        raise ValueError(f"scale_rewards must be one of {tuple(REWARD_SCALINGS)}, got {scale_rewards!r}")
    grouped = rewards.float().view(-1, num_generations)
    if num_generations == 1:  # a group of one has nothing to compare against
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return torch.nan_to_num(REWARD_SCALINGS[scale_rewards](centred, grouped), nan=0.0).flatten()


def clipped_surrogate(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> torch.Tensor:
    """PPO's clipped per-token loss (N, T): -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = pi/pi_old."""
    ratio = torch.exp(logp - logp_old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    advantages = advantages[:, None]
    return -torch.min(ratio * advantages, clipped * advantages)


def clipped_tokens(
    logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    epsilon_low: float, epsilon_high: float,
) -> torch.Tensor:
    """How many valid tokens the clip cut (a scalar): ratio below 1 - eps_low with a negative advantage, or above
    1 + eps_high with a positive one (TRL's clip ratio). Always 0 when logp_old is logp (one update per batch)."""
    ratio = torch.exp(logp - logp_old)
    advantages = advantages[:, None]
    cut = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return (cut.float() * mask).sum()


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref), as TRL: exp(ref - logp) - (ref - logp) - 1."""
    return k3(ref_logp - logp)


@dataclass(frozen=True)
class LossScale:
    """The whole step's counts that a chunk's loss is normalised by, so that the chunks' losses add up to the
    step's loss however the step is cut into micro-batches.

    tokens: active completion tokens of the step (under DDP, all ranks' count / world size, since DDP averages
    the ranks' gradients); rows: completions of the step on this process; max_length: the completion budget.
    """

    tokens: float
    rows: int
    max_length: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> "LossScale":
        """The counts of `mask` (N, T) alone: a step of one chunk."""
        return cls(tokens=float(mask.sum()), rows=mask.shape[0], max_length=mask.shape[1])


def _dapo(per_token: torch.Tensor, mask: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """Sum over tokens / active tokens of the whole step (TRL's default)."""
    return (per_token * mask).sum() / max(scale.tokens, 1.0)


def _bnpo(per_token: torch.Tensor, mask: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """The token mean of each micro-batch, averaged over the micro-batches weighted by their rows (TRL averages
    the token means of its equal-sized accumulation steps)."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0) * (mask.shape[0] / scale.rows)


def _grpo(per_token: torch.Tensor, mask: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """Mean over the step's completions of each completion's token mean (the original GRPO; length-biased)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / scale.rows


def _dr_grpo(per_token: torch.Tensor, mask: torch.Tensor, scale: LossScale) -> torch.Tensor:
    """Sum over tokens / (the step's completions x max completion length) (Dr. GRPO)."""
    return (per_token * mask).sum() / (scale.rows * scale.max_length)


# TRL's loss_type: (per-token loss (n, T), mask (n, T), the step's counts) -> this chunk's share of the loss.
LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, LossScale], torch.Tensor]] = {
    "dapo": _dapo,
    "bnpo": _bnpo,
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
}


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    scale: LossScale | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """The Nested-ReFT loss: h_m x clipped surrogate (+ beta KL), aggregated as `loss_type`.

    logp: (N, T) log-probs of the completions under pi_theta, with gradient; logp_old: (N, T) the
    same detached (one update per batch); advantages: (N,); mask: (N, T); weights: the detached h_m,
    (N, T) or (N, 1); scale: the whole step's counts when these N rows are one micro-batch of it (default:
    this batch is the step).
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_AGGREGATIONS)}, got {loss_type!r}")
    per_token = clipped_surrogate(logp, logp_old, advantages, epsilon_low, epsilon_high) * weights.detach()
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
        per_token = per_token + beta * kl_to_reference(logp, ref_logp)
    return LOSS_AGGREGATIONS[loss_type](per_token, mask, scale or LossScale.of(mask))
