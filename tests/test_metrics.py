"""Rollout FLOPs from a model's shapes: the 2N rule plus attention against the KV cache, skipped blocks free;
a step's importance-weight statistics over the tokens of its loss."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from nested_reft.config import load_config
from nested_reft.training.metrics import ModelShapes, StepResult, StepTimes, rollout_flops, step_metrics
from nested_reft.engines.rollout import Rollouts
from nested_reft.training.update import UpdateResult
from nested_reft.models.tiny import tiny_model


def test_rollout_flops_by_hand():
    shapes = ModelShapes(block_parameters=(10, 20, 30), head_parameters=5, hidden_size=2)
    # kept blocks 0 and 2 (40 parameters), one row: a prompt of 2 tokens and a completion of 3
    # linear: 2 x 40 x 5 tokens + 2 x 5 x 3 completion tokens = 430
    # context positions: prefill 1 + 2 = 3, completion 3 + 4 + 5 = 12, sum 15; attention 4 x 2 x 2 blocks x 15 = 240
    assert rollout_flops(shapes, (1,), torch.tensor([2]), torch.tensor([3])) == 670.0
    assert rollout_flops(shapes, (), torch.tensor([2, 2]), torch.tensor([3, 3])) == 2 * (2 * 60 * 5 + 30 + 4 * 2 * 3 * 15)


def test_shapes_of_a_model_count_its_blocks_and_head():
    model, _ = tiny_model("llama", num_layers=3, seed=0)
    shapes = ModelShapes.of(model)
    assert len(shapes.block_parameters) == 3 and len(set(shapes.block_parameters)) == 1
    assert shapes.head_parameters == model.lm_head.weight.numel() and shapes.hidden_size == 32
    everything = sum(p.numel() for p in model.parameters())
    embeddings = model.model.embed_tokens.weight.numel() + model.model.norm.weight.numel()
    assert sum(shapes.block_parameters) + shapes.head_parameters + embeddings == everything


@pytest.mark.parametrize("skipped", [1, 2])
def test_skipping_blocks_saves_their_share_of_the_flops(skipped):
    shapes = ModelShapes(block_parameters=(100,) * 4, head_parameters=0, hidden_size=1)
    full = rollout_flops(shapes, (), torch.tensor([0]), torch.tensor([1]))
    assert rollout_flops(shapes, tuple(range(skipped)), torch.tensor([0]), torch.tensor([1])) == full * (4 - skipped) / 4


@pytest.mark.parametrize("mask_truncated, h_max", [(True, 1.0), (False, 2.0)])
def test_importance_statistics_cover_the_tokens_of_the_loss(mask_truncated, h_max):
    """Cut completions masked out of the loss are left out of h's statistics too: here only they are off-policy."""
    finished = torch.tensor([True, False, True, False])
    behavior = torch.full((4, 3), -1.0)
    logp_old = behavior + (~finished)[:, None] * torch.log(torch.tensor(2.0))  # r = 2 on the cut rows, else 1
    rollouts = Rollouts(prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_mask=torch.ones(4, 2),
                        completion_ids=torch.ones(4, 3, dtype=torch.long), completion_mask=torch.ones(4, 3),
                        behavior_logprobs=behavior, finished=finished, skip_set=(),
                        generation_time_s=1.0)
    config = load_config(None, {"grpo.mask_truncated_completions": mask_truncated, "sampling.max_new_tokens": 3,
                                "sampling.min_new_tokens": 0, "importance.mitigation": "base"})
    update = UpdateResult(loss=0.0, grad_norm=0.0, finite=True, logp_old=logp_old)
    result = StepResult(1, rollouts, torch.zeros(4), update, 1e-6, StepTimes(0.0, 1.0, 2.0, 3.0))
    metrics = step_metrics(result, config, Accelerator(cpu=True), ModelShapes((1,), 1, 1))
    assert metrics.h_max == pytest.approx(h_max) and metrics.h_min == pytest.approx(1.0)
    assert metrics.h_ess == pytest.approx(1.0 if mask_truncated else 0.9)  # (1.5)^2 / 2.5 over mixed rows
    assert metrics.completion_length == 3.0  # the cut completions still count in the length
    # the KL is a distance between the models, not a statistic of the loss: it reads the cut completions too
    assert metrics.kl_behavior_target == pytest.approx(0.5 * (2 - 1 - math.log(2)), rel=1e-5)


def test_a_step_whose_loss_counts_no_token_still_measures_the_distance():
    """Every completion cut and masked: h's statistics are None (nothing weighted), the KL is measured on the
    sampled tokens (before, both read the loss's empty mask and a study logged KL 0 and ESS 1 on such steps,
    and the kl_target policy would have taken the 0 for a close skip set)."""
    finished = torch.zeros(2, dtype=torch.bool)
    behavior = torch.full((2, 3), -1.0)
    rollouts = Rollouts(prompt_ids=torch.ones(2, 2, dtype=torch.long), prompt_mask=torch.ones(2, 2),
                        completion_ids=torch.ones(2, 3, dtype=torch.long), completion_mask=torch.ones(2, 3),
                        behavior_logprobs=behavior, finished=finished, skip_set=(1,), generation_time_s=1.0)
    config = load_config(None, {"grpo.mask_truncated_completions": True, "sampling.max_new_tokens": 3,
                                "sampling.min_new_tokens": 0})
    update = UpdateResult(loss=0.0, grad_norm=0.0, finite=True, logp_old=behavior + math.log(2))
    result = StepResult(1, rollouts, torch.zeros(2), update, 1e-6, StepTimes(0.0, 1.0, 2.0, 3.0))
    metrics = step_metrics(result, config, Accelerator(cpu=True), ModelShapes((1,), 1, 1))
    assert (metrics.h_mean, metrics.h_ess, metrics.h_truncated) == (None, None, None)
    assert metrics.kl_behavior_target == pytest.approx(2 - 1 - math.log(2), rel=1e-5)
