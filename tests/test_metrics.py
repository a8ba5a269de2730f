"""Rollout FLOPs from a model's shapes: the 2N rule plus attention against the KV cache, skipped blocks free."""

from __future__ import annotations

import pytest
import torch

from nested_reft.metrics import ModelShapes, rollout_flops
from nested_reft.tiny import tiny_model


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
