"""f_{x,b} and running a model without layers: counts, sampling, equivalence to a truncated copy."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers
from conftest import truncated_copy

from nested_reft.nesting.layers import (
    decoder_layers,
    nested,
    num_decoder_layers,
    num_skipped_layers,
    sample_skip_set,
    valid_layers,
)
from nested_reft.models.tiny import TINY_ARCHITECTURES, tiny_model


@pytest.mark.parametrize(
    "num_layers, ratio, expected",
    [
        (28, 0.05, 1),  # Table 1 of the paper
        (28, 0.10, 3),
        (28, 0.15, 4),
        (28, 0.0, 0),
        (30, 0.15, 5),  # 4.5 rounds half up (decimal arithmetic, not 4.4999...)
        (30, 0.05, 2),  # 1.5 -> 2
        (30, 0.10, 3),
        (30, 0.25, 8),  # 7.5 -> 8
        (6, 0.01, 1),  # any x > 0 skips at least one layer
        (24, 0.5, 12),
    ],
)
def test_num_skipped_layers_follows_table_1(num_layers, ratio, expected):
    assert num_skipped_layers(num_layers, ratio) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=str(ratio)):
        num_skipped_layers(28, ratio)


def test_border_rule():
    assert valid_layers(6, 0) == [0, 1, 2, 3, 4, 5]
    assert valid_layers(6, 1) == [1, 2, 3, 4]
    assert valid_layers(6, 2) == [2, 3]
    assert valid_layers(28, 1) == list(range(1, 27))
    with pytest.raises(ValueError, match="border"):
        valid_layers(6, -1)


def test_skip_set_respects_count_and_border():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        skip = sample_skip_set(28, 0.15, 1, generator)
        assert len(skip) == 4 and len(set(skip)) == 4
        assert list(skip) == sorted(skip)
        assert all(1 <= i <= 26 for i in skip)


def test_skip_set_larger_than_valid_set_is_rejected():
    with pytest.raises(ValueError, match="only 2 valid layers"):
        sample_skip_set(6, 0.5, 2)


def test_skip_set_is_uniform_over_valid_layers():
    """Chi-square test of the per-layer frequency: each valid layer is skipped with probability U/|V|."""
    generator = torch.Generator().manual_seed(123)
    draws = 6000
    counts = Counter(i for _ in range(draws) for i in sample_skip_set(12, 0.25, 1, generator))
    assert set(counts) == set(range(1, 11))
    expected = draws * 3 / 10
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(1, 11))
    assert chi2 < 27.88  # chi-square critical value, 9 degrees of freedom, p = 0.001


def test_skip_set_is_reproducible_from_a_seed():
    first = [sample_skip_set(28, 0.1, 1, torch.Generator().manual_seed(7)) for _ in range(3)]
    second = [sample_skip_set(28, 0.1, 1, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert first == second
    different = {sample_skip_set(28, 0.1, 1, torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(different) > 1


# Every valid S class that matters: layer 0 and the last layer (b = 0), several at once, and for Gemma2
# (sliding, full, sliding, ...) the first layer of each attention type.
SKIP_SETS = [(0,), (4,), (1, 3), (0, 1), (2,)]


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_nested_model_equals_truncated_copy(architecture):
    model, tokenizer = tiny_model(architecture, num_layers=5)
    batch = tokenizer(["a longer prompt to pad against", "hi"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # left padding is exercised
    for skip in SKIP_SETS:
        reference = truncated_copy(model, skip)
        with nested(model, skip):
            logits = model(**batch).logits
            greedy = model.generate(**batch, max_new_tokens=12, do_sample=False)
        torch.testing.assert_close(logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(greedy, reference.generate(**batch, max_new_tokens=12, do_sample=False)), skip


def test_nested_shares_weights_and_restores_the_model():
    model, tokenizer = tiny_model("gemma2", num_layers=6)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    layer_types = list(model.config.layer_types)
    batch = tokenizer(["restore me"], return_tensors="pt")
    before = model(**batch).logits
    with nested(model, (0, 2, 5)):
        assert num_decoder_layers(model) == 3
        assert model.config.num_hidden_layers == 3
        inside = {name: p.data_ptr() for name, p in model.named_parameters()}
        assert set(inside.values()) <= set(pointers.values())  # the same storage, no copy
        assert not torch.allclose(model(**batch).logits, before)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert model.config.num_hidden_layers == 6 and model.config.layer_types == layer_types
    torch.testing.assert_close(model(**batch).logits, before, atol=0, rtol=0)


def test_model_is_restored_after_an_exception_inside_the_context():
    model, tokenizer = tiny_model("llama", num_layers=6)
    layers = decoder_layers(model)[2]
    layer_indices = [block.self_attn.layer_idx for block in layers]
    with pytest.raises(RuntimeError, match="boom"):
        with nested(model, (1, 4)):
            raise RuntimeError("boom")
    assert decoder_layers(model)[2] is layers
    assert [block.self_attn.layer_idx for block in layers] == layer_indices
    assert model.config.num_hidden_layers == 6
    with nested(model, (2,)):  # usable again
        pass


def test_empty_skip_set_runs_the_full_model():
    model, _ = tiny_model("llama", num_layers=4)
    layers = decoder_layers(model)[2]
    with nested(model, ()):
        assert decoder_layers(model)[2] is layers


@pytest.mark.parametrize(
    "skip, message",
    [((6,), "out of range"), ((-1,), "out of range"), ((1, 1), "repeats"), ((0, 1, 2, 3, 4, 5), "all 6")],
)
def test_bad_skip_sets_are_rejected(skip, message):
    model, _ = tiny_model("llama", num_layers=6)
    with pytest.raises(ValueError, match=message):
        with nested(model, skip):
            pass
    assert num_decoder_layers(model) == 6


def test_nesting_a_nested_model_is_refused():
    model, _ = tiny_model("llama", num_layers=6)
    with nested(model, (1,)):
        with pytest.raises(RuntimeError, match="already nested"):
            with nested(model, (2,)):
                pass


def test_model_without_a_block_list_gets_a_clear_error():
    class NotATransformer(torch.nn.Module):
        config = transformers.LlamaConfig(num_hidden_layers=3)

    with pytest.raises(ValueError, match="NotATransformer"):
        decoder_layers(NotATransformer())
