"""GRPO advantages and loss against loop-by-loop references."""

from __future__ import annotations

import statistics

import pytest
import torch

from nested_reft.algorithm.grpo import LossScale, group_advantages, grpo_loss
from nested_reft.algorithm.kl import k3


def test_group_advantages_match_a_loop_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(rewards, num_generations=4)
    for group in range(2):
        values = rewards[group * 4 : (group + 1) * 4].tolist()
        mean, std = statistics.mean(values), statistics.stdev(values)
        for i, value in enumerate(values):
            assert advantages[group * 4 + i].item() == pytest.approx((value - mean) / (std + 1e-4), rel=1e-5)


def test_groups_with_equal_rewards_get_zero_advantage_without_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5])
    advantages = group_advantages(rewards, num_generations=3)
    assert torch.isfinite(advantages).all()
    assert advantages[:6].abs().max() == 0
    assert advantages[6:].abs().sum() > 0
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))


def test_scale_options():
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 2, "none"), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    batch = group_advantages(rewards, 2, "batch")
    torch.testing.assert_close(batch, torch.tensor([1.0, -1.0, 0.0, 0.0]) / (rewards.std() + 1e-4))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 2, "rank")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def reference_loss(logp, logp_old, advantages, mask, weights, eps, loss_type):
    """Token by token, the clipped surrogate times h, then the aggregation, in plain Python."""
    terms = []
    for i in range(logp.shape[0]):
        row = []
        for t in range(logp.shape[1]):
            ratio = torch.exp(logp[i, t] - logp_old[i, t])
            a = advantages[i]
            surrogate = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
            h = weights[i, t] if weights.shape[1] > 1 else weights[i, 0]
            row.append(surrogate * h * mask[i, t])
        terms.append(row)
    if loss_type == "dapo":
        return sum(sum(r) for r in terms) / mask.sum()
    return sum(sum(r) / mask[i].sum() for i, r in enumerate(terms)) / len(terms)  # "grpo"


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("weight_shape", [(3, 5), (3, 1)])
def test_loss_and_gradient_match_the_reference(loss_type, weight_shape):
    generator = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(3, 5, generator=generator)
    logp = (logp_old + torch.randn(3, 5, generator=generator) * 0.3).requires_grad_()
    advantages = torch.tensor([1.0, -0.5, 0.2])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    weights = torch.rand(weight_shape, generator=generator) + 0.5
    loss = grpo_loss(logp, logp_old, advantages, mask, weights, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, logp)
    logp_ref = logp.detach().clone().requires_grad_()
    expected = reference_loss(logp_ref, logp_old, advantages, mask, weights, 0.2, loss_type)
    (expected_grad,) = torch.autograd.grad(expected, logp_ref)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad)


def test_on_policy_loss_gradient_is_the_policy_gradient():
    """With logp_old = logp (detached) and h = 1, d loss / d logp = -A / num_tokens on valid tokens."""
    logp = torch.randn(2, 3).requires_grad_()
    advantages = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    loss = grpo_loss(logp, logp.detach(), advantages, mask, torch.ones(2, 3))
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -advantages[:, None] * mask / 5)


def test_weights_carry_no_gradient_and_scale_the_loss():
    logp = torch.randn(2, 3).requires_grad_()
    mask = torch.ones(2, 3)
    advantages = torch.tensor([1.0, -1.0])
    weights = torch.full((2, 3), 0.5, requires_grad=True)
    half = grpo_loss(logp, logp.detach(), advantages, mask, weights)
    full = grpo_loss(logp, logp.detach(), advantages, mask, torch.ones(2, 3))
    assert half.item() == pytest.approx(0.5 * full.item())
    half.backward()
    assert weights.grad is None


def test_kl_term_and_dapo_normaliser():
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    loss = grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), torch.ones(1, 2), ref_logp=ref, beta=0.1)
    kl = (0.5 - torch.log(torch.tensor(0.5)) - 1).item()
    assert loss.item() == pytest.approx(0.1 * kl)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), torch.ones(1, 2), beta=0.1)
    scaled = grpo_loss(logp, logp.detach(), torch.ones(1), torch.ones(1, 2), torch.ones(1, 2),
                       scale=LossScale(tokens=8.0, rows=1, max_length=2))
    assert scaled.item() == pytest.approx(-2 / 8)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, logp.detach(), torch.ones(1), torch.ones(1, 2), torch.ones(1, 2), loss_type="sum")


def test_k3_averaged_under_q_is_the_exact_kl_and_its_cap_keeps_it_finite():
    """E_q[k3(log p - log q)] = sum_x q (p/q - 1 - log p/q) = KL(q || p) exactly, for any two distributions."""
    generator = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(10, generator=generator, dtype=torch.float64), 0)
    p = torch.softmax(torch.randn(10, generator=generator, dtype=torch.float64), 0)
    assert (q * k3(p.log() - q.log())).sum().item() == pytest.approx((q * (q / p).log()).sum().item(), rel=1e-12)
    assert k3(torch.zeros(3)).eq(0).all()
    assert torch.isinf(k3(torch.tensor([100.0]))).all() and torch.isfinite(k3(torch.tensor([100.0]), 80.0)).all()
