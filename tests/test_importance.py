"""h_m against slow, obvious per-element references, and their diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from nested_reft.config import ImportanceConfig
from nested_reft.algorithm.importance import MAX_LOG_WEIGHT, behavior_target_kl, importance_statistics, importance_weights


def random_logps(seed: int = 0, shape=(4, 7)):
    generator = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(shape, generator=generator) * 3
    logp_behavior = logp_old + torch.randn(shape, generator=generator) * 0.5
    mask = torch.ones(shape)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return logp_old, logp_behavior, mask


def reference_weight(old: float, behavior: float, method: str, lam: float) -> float:
    ratio = math.exp(old - behavior)
    return {"base": ratio, "practical": 1.0, "retrace": lam * min(1.0, ratio)}[method]


@pytest.mark.parametrize("method", ["base", "practical", "retrace"])
def test_token_level_weights_match_the_definitions(method):
    logp_old, logp_behavior, mask = random_logps()
    weights = importance_weights(logp_old, logp_behavior, mask, ImportanceConfig(method, retrace_lambda=0.8))
    assert weights.shape == (4, 7)
    for i in range(4):
        for t in range(7):
            expected = reference_weight(logp_old[i, t].item(), logp_behavior[i, t].item(), method, 0.8)
            assert weights[i, t].item() == pytest.approx(expected * mask[i, t].item(), rel=1e-5)


@pytest.mark.parametrize("method", ["base", "practical", "retrace"])
def test_sequence_level_weights_use_the_product_over_valid_tokens(method):
    logp_old, logp_behavior, mask = random_logps(1)
    weights = importance_weights(logp_old, logp_behavior, mask, ImportanceConfig(method, retrace_lambda=0.5, level="sequence"))
    assert weights.shape == (4, 1)
    for i in range(4):
        ratio = 1.0
        for t in range(7):
            if mask[i, t]:
                ratio *= math.exp(logp_old[i, t].item() - logp_behavior[i, t].item())
        expected = {"base": ratio, "practical": 1.0, "retrace": 0.5 * min(1.0, ratio)}[method]
        assert weights[i, 0].item() == pytest.approx(expected, rel=1e-4)


def test_masked_positions_are_ignored():
    logp_old, logp_behavior, mask = random_logps(2)
    garbage = logp_behavior.clone()
    garbage[mask == 0] = 1e4  # whatever sits under the mask must not matter
    for level in ("token", "sequence"):
        for method in ("base", "retrace"):
            config = ImportanceConfig(method, level=level)
            clean = importance_weights(logp_old, logp_behavior, mask, config)
            dirty = importance_weights(logp_old, garbage, mask, config)
            torch.testing.assert_close(clean, dirty)


def test_on_policy_weights_are_one_up_to_rounding():
    """x = 0, b = 0, base: behavior = target, so h = 1 (classical ReFT)."""
    logp, _, mask = random_logps(3)
    noisy = logp + torch.randn_like(logp) * 1e-7  # sampler vs training forward rounding
    for level in ("token", "sequence"):
        weights = importance_weights(logp, noisy, mask, ImportanceConfig("base", level=level))
        expected = mask if level == "token" else torch.ones(4, 1)
        torch.testing.assert_close(weights, expected, atol=1e-5, rtol=0)


def test_weights_are_detached_and_finite_for_huge_log_ratios():
    logp_old = torch.zeros(2, 300, requires_grad=True)
    logp_behavior = torch.full((2, 300), -1.0)  # sequence log-ratio 300: exp overflows float32
    mask = torch.ones(2, 300)
    base = ImportanceConfig("base", level="sequence")
    weights = importance_weights(logp_old, logp_behavior, mask, base)
    assert not weights.requires_grad
    assert torch.isfinite(weights).all()
    assert weights[0, 0].item() == pytest.approx(math.exp(MAX_LOG_WEIGHT), rel=1e-4)
    stats = importance_statistics(logp_old, logp_behavior, mask, base)
    assert stats.truncated == 1.0


def test_statistics_describe_the_weights():
    logp_old, logp_behavior, mask = random_logps(4)
    stats = importance_statistics(logp_old, logp_behavior, mask, ImportanceConfig("retrace", retrace_lambda=1.0))
    valid = mask.bool()
    ratio = torch.exp(logp_old - logp_behavior)[valid]
    h = torch.clamp(ratio, max=1.0)
    assert stats.mean == pytest.approx(h.mean().item(), rel=1e-5)
    assert stats.max <= 1.0 and stats.min == pytest.approx(h.min().item(), rel=1e-5)
    assert stats.truncated == pytest.approx((ratio > 1).float().mean().item())
    assert stats.ess == pytest.approx((ratio.sum() ** 2 / (len(ratio) * (ratio**2).sum())).item(), rel=1e-5)
    assert 0 < stats.ess < 1
    expected_kl = (ratio - 1 - torch.log(ratio)).mean().item()
    assert behavior_target_kl(logp_old, logp_behavior, mask) == pytest.approx(expected_kl, rel=1e-4)


def test_statistics_on_policy():
    logp, _, mask = random_logps(5)
    stats = importance_statistics(logp, logp, mask, ImportanceConfig("base"))
    assert stats.ess == pytest.approx(1.0) and behavior_target_kl(logp, logp, mask) == pytest.approx(0.0, abs=1e-7)
    assert stats.mean == pytest.approx(1.0) and stats.truncated == 0.0


def test_nothing_to_weight_is_not_reported_as_on_policy():
    """A step whose loss counts no token (every completion cut and masked) weighted nothing: no statistic, rather
    than an ESS of 1 that would pull a run's mean towards on-policy; the KL over no token is None too."""
    logp_old, logp_behavior, mask = random_logps(6)
    nothing = torch.zeros_like(mask)
    stats = importance_statistics(logp_old, logp_behavior, nothing, ImportanceConfig("retrace"))
    assert (stats.mean, stats.min, stats.max, stats.truncated, stats.ess) == (None,) * 5
    assert behavior_target_kl(logp_old, logp_behavior, nothing) is None
