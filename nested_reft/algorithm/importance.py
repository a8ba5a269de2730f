"""Importance weights h_m that correct for sampling from the nested behavior model (section 2.2).

With r = pi_theta / eta (target over behavior, computed in log space):
    base       h = r                          the plain importance ratio
    practical  h = 1                          ignore the off-policyness
    retrace    h = lambda * min(1, r)         Retrace(lambda), Munos et al. 2016
at token level (one r per token) or sequence level (r = the product over the completion's tokens).
The weights are detached: they scale each token's GRPO term but carry no gradient. Pure tensor
functions, no model and no I/O.

Shapes: logp_old, logp_behavior, mask are (B, T); token-level weights are (B, T), sequence-level (B, 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nested_reft.algorithm.kl import k3
from nested_reft.config import ImportanceConfig

# exp() of float32 overflows past ~88.7; a sequence-level log-ratio sums up to 256 token terms, so the
# base ratio is computed from a log-ratio clipped here, which keeps it finite (and is counted as truncated).
MAX_LOG_WEIGHT = 80.0


def base_weights(log_ratio: torch.Tensor, lam: float) -> torch.Tensor:
    """h_base = pi/eta."""
    return torch.exp(log_ratio.clamp(max=MAX_LOG_WEIGHT))


def practical_weights(log_ratio: torch.Tensor, lam: float) -> torch.Tensor:
    """h_1 = 1: trust SGD to absorb the off-policyness."""
    return torch.ones_like(log_ratio)


def retrace_weights(log_ratio: torch.Tensor, lam: float) -> torch.Tensor:
    """h_lambda = lambda * min(1, pi/eta), i.e. lambda * exp(min(0, log r))."""
    return lam * torch.exp(log_ratio.clamp(max=0.0))


@dataclass(frozen=True)
class Mitigation:
    """A weight function h(log r, lambda) and the log-ratio above which it cuts the ratio (None: never)."""

    weights: Callable[[torch.Tensor, float], torch.Tensor]
    truncates_above: float | None


MITIGATION_TABLE: dict[str, Mitigation] = {  # the mitigations config.MITIGATIONS names
    "base": Mitigation(base_weights, truncates_above=MAX_LOG_WEIGHT),
    "practical": Mitigation(practical_weights, truncates_above=None),
    "retrace": Mitigation(retrace_weights, truncates_above=0.0),
}

# The levels config.LEVELS names: whether each weighs a whole completion (its tokens' log-ratios summed), not a token
PER_COMPLETION: dict[str, bool] = {"token": False, "sequence": True}


def log_importance_ratio(
    logp_old: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """log(pi_theta/eta) per token (B, T), or summed over each completion's tokens (B, 1), in float32."""
    log_ratio = (logp_old.float() - logp_behavior.float()) * mask
    if PER_COMPLETION[level]:
        return log_ratio.sum(dim=-1, keepdim=True)
    return log_ratio


def importance_weights(
    logp_old: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor, config: ImportanceConfig
) -> torch.Tensor:
    """The detached weights h_m of `config` (mitigation, lambda, level; validated when it was built): (B, T) at
    token level (0 at masked positions), (B, 1) at sequence level."""
    log_ratio = log_importance_ratio(logp_old.detach(), logp_behavior.detach(), mask, config.level)
    weights = MITIGATION_TABLE[config.mitigation].weights(log_ratio, config.retrace_lambda)
    return weights if PER_COMPLETION[config.level] else weights * mask


@dataclass(frozen=True)
class ImportanceStats:
    """What the weights did: mean/min/max of h over valid positions; truncated: fraction of positions where the
    weight function cut the ratio (retrace: r > 1; base: r beyond exp(MAX_LOG_WEIGHT)); ess: effective sample
    size of the raw ratios r as a fraction of the positions, (sum r)^2 / (n sum r^2), 1 when on-policy.
    Every field None when no position is valid (a step whose loss counts no token): nothing was weighted, and
    a made-up 1.0 would pull a run's mean towards on-policy."""

    mean: float | None
    min: float | None
    max: float | None
    truncated: float | None
    ess: float | None


NOT_WEIGHTED = ImportanceStats(None, None, None, None, None)


def importance_statistics(
    logp_old: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor, config: ImportanceConfig
) -> ImportanceStats:
    """Diagnostics of the weights `importance_weights` returns for the same arguments."""
    with torch.no_grad():
        weights = importance_weights(logp_old, logp_behavior, mask, config)
        log_ratio = log_importance_ratio(logp_old, logp_behavior, mask, config.level)
        valid = mask.sum(-1, keepdim=True) > 0 if PER_COMPLETION[config.level] else mask.bool()
        if not valid.any():
            return NOT_WEIGHTED
        h, log_r = weights[valid], log_ratio[valid]
        ratio = torch.exp(log_r.clamp(max=MAX_LOG_WEIGHT))
        return ImportanceStats(
            mean=h.mean().item(),
            min=h.min().item(),
            max=h.max().item(),
            truncated=_truncated_fraction(log_r, config.mitigation),
            ess=(ratio.sum() ** 2 / (ratio.numel() * (ratio**2).sum())).item(),
        )


def behavior_target_kl(logp_target: torch.Tensor, logp_behavior: torch.Tensor, mask: torch.Tensor) -> float | None:
    """KL(eta || pi_theta) per token over the masked tokens: the k3 estimate E_eta[r - 1 - log r] on the behavior
    model's own samples, r = pi_theta / eta. None without a token.

    A distance between the two models, not a statistic of the loss: it reads every sampled token, cut
    completions too (they are samples of eta like any other), so a step whose loss masks all its completions
    still measures it and the kl_target policy never sees a made-up 0."""
    with torch.no_grad():
        token_log_ratio = log_importance_ratio(logp_target, logp_behavior, mask, "token")[mask.bool()]
        if token_log_ratio.numel() == 0:
            return None
        return k3(token_log_ratio, MAX_LOG_WEIGHT).mean().item()


def _truncated_fraction(log_ratio: torch.Tensor, method: str) -> float:
    """The share of positions whose ratio the weight function changed."""
    threshold = MITIGATION_TABLE[method].truncates_above
    return 0.0 if threshold is None else (log_ratio > threshold).float().mean().item()
