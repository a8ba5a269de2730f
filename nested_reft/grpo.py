"""The GRPO objective as pure tensor functions (Shao et al. 2024, as implemented by TRL's GRPOTrainer).

Nested-ReFT changes one thing here: each token's clipped surrogate is multiplied by a detached
importance weight h_m (see `importance`). With h = 1 everything below is TRL's loss for the same
settings, which `tests/test_trl_peer.py` checks against TRL itself.

Shapes: N completions (B prompts x G generations, prompt-major), T completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ADVANTAGE_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Group-normalised advantages (N,) from rewards (N,): (r - group mean) / (group std + 1e-4).

    `scale_rewards` as in TRL: "group" divides by each group's std, "batch" by the batch std, "none"
    only centres. A group whose rewards are all equal gets advantage 0 (and never NaN); the std is the
    unbiased one, as in TRL.
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.float().view(-1, num_generations)
    if num_generations == 1:  # a group of one has nothing to compare against
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).flatten()
    elif scale_rewards == "batch":
        std = rewards.float().std().expand_as(centred)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return torch.nan_to_num(centred / (std + ADVANTAGE_EPS), nan=0.0)


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


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref), as TRL: exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def _dapo(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float, max_length: int) -> torch.Tensor:
    """Sum over tokens / active tokens of the whole (accumulated, all-process) batch (TRL default)."""
    return (per_token * mask).sum() / max(num_tokens, 1.0)


def _bnpo(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float, max_length: int) -> torch.Tensor:
    """Sum over tokens / active tokens of this micro-batch."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _grpo(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float, max_length: int) -> torch.Tensor:
    """Mean over completions of each completion's token mean (the original GRPO; length-biased)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _dr_grpo(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float, max_length: int) -> torch.Tensor:
    """Sum over tokens / (completions x max completion length) (Dr. GRPO)."""
    return (per_token * mask).sum() / (per_token.shape[0] * max_length)


LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float, int], torch.Tensor]] = {
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
    num_tokens: float | None = None,
    max_length: int | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """The Nested-ReFT loss: h_m x clipped surrogate (+ beta KL), aggregated as `loss_type`.

    logp: (N, T) log-probs of the completions under pi_theta, with gradient; logp_old: (N, T) the
    same detached (one update per batch); advantages: (N,); mask: (N, T); weights: the detached h_m,
    (N, T) or (N, 1); num_tokens: active tokens of the whole step for "dapo" (defaults to this batch's).
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_AGGREGATIONS)}, got {loss_type!r}")
    per_token = clipped_surrogate(logp, logp_old, advantages, epsilon_low, epsilon_high) * weights.detach()
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
        per_token = per_token + beta * kl_to_reference(logp, ref_logp)
    num_tokens = float(mask.sum()) if num_tokens is None else num_tokens
    return LOSS_AGGREGATIONS[loss_type](per_token, mask, num_tokens, max_length or mask.shape[1])
