"""The k3 estimate of a KL divergence from samples (Schulman, "Approximating KL divergence", 2020).

For samples x ~ q and d = log p(x) - log q(x), KL(q || p) = E_q[k3(d)] with k3(d) = e^d - 1 - d: unbiased,
never negative, and lower in variance than -d. Both KL measurements use it: the penalty to the reference
(`grpo.kl_to_reference`, q = pi_theta, p = pi_ref, as TRL) and the behavior-target distance
(`importance.behavior_target_kl`, q = eta, p = pi_theta).
"""

from __future__ import annotations

import math

import torch


def k3(log_ratio: torch.Tensor, max_log_ratio: float = math.inf) -> torch.Tensor:
    """e^d - 1 - d per element, d = `log_ratio`, with e^d taken at min(d, `max_log_ratio`) (float32's exp
    overflows past 88.7). expm1 keeps the small values of near-equal models exact."""
    return torch.expm1(log_ratio.clamp(max=max_log_ratio)) - log_ratio
