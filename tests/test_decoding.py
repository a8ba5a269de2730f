"""The compiled decoding engine: the eager engine's semantics through a static cache and a compiled decode step,
and no recompilation when the skip set changes.

Compiling with Inductor takes a minute on a CPU core, so most checks trace with dynamo's "eager" backend (the
same graphs, guards and recompilations, run by ATen) and one module-scoped Inductor decoder checks the numerics.

NESTED_REFT_TEST_DEVICE=cuda runs them on a GPU (bench/gpu.sh does), where the Inductor decoder is the one
training uses there: its decode step captured as a CUDA graph, which must never replay another skip set.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import truncated_copy
from torch._dynamo.utils import counters

from nested_reft.config import SamplingConfig
from nested_reft.engines.compiled import CompiledDecoder, default_compiled_mode
from nested_reft.engines.eager import EagerDecoder
from nested_reft.nesting.layers import nested
from nested_reft.models.tiny import tiny_model

PROMPTS = ["a longer prompt to pad against", "hi", "what is 2 + 3?"]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=10, min_new_tokens=0)
SAMPLED = SamplingConfig(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=10, min_new_tokens=10)
EAGER = EagerDecoder()
DEVICE = torch.device(os.environ.get("NESTED_REFT_TEST_DEVICE", "cpu"))


def model_on_device(architecture: str, num_layers: int = 6):
    model, tokenizer = tiny_model(architecture, num_layers=num_layers)
    return model.to(DEVICE), tokenizer


def batch(tokenizer):
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False).to(DEVICE)
    assert encoded["attention_mask"][1, 0] == 0  # left padding is exercised
    return encoded["input_ids"], encoded["attention_mask"]


def run(sample, model, tokenizer, config, seed=0):
    ids, mask = batch(tokenizer)
    return sample(model, ids, mask, config, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                  torch.Generator(device=DEVICE).manual_seed(seed))


def assert_same_samples(ours, theirs):
    width = min(ours.tokens.shape[1], theirs.tokens.shape[1])
    assert torch.equal(ours.tokens[:, :width], theirs.tokens[:, :width])
    assert torch.equal(ours.mask[:, :width], theirs.mask[:, :width])
    torch.testing.assert_close(ours.logprobs[:, :width], theirs.logprobs[:, :width], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def traced():
    """One dynamo-traced decoder (backend "eager") for the module: its graphs are shared by the tests."""
    return CompiledDecoder(backend="eager")


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "phi3", "gemma2"])
@pytest.mark.parametrize("skip_set", [(), (0, 3), (2,)])
def test_the_compiled_engine_samples_what_the_eager_engine_samples(traced, architecture, skip_set):
    """Greedy tokens equal; at temperature 0.7 with top-k and top-p the same seed draws the same tokens with the
    same log-probs (so they pass the eager engine's chi-square tests); layer 0 and Gemma2's first sliding and
    first full layer skipped included."""
    model, tokenizer = model_on_device(architecture)
    with nested(model, skip_set):
        for config in (GREEDY, SAMPLED):
            assert_same_samples(run(traced.sample, model, tokenizer, config), run(EAGER.sample, model, tokenizer, config))


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_nested_equals_a_truncated_model_through_the_compiled_engine(traced, architecture):
    model, tokenizer = model_on_device(architecture)
    for skip_set in [(1, 4), (0, 5)]:
        with nested(model, skip_set):
            ours = run(traced.sample, model, tokenizer, SAMPLED, seed=3)
        assert_same_samples(ours, run(traced.sample, truncated_copy(model, skip_set).to(DEVICE), tokenizer, SAMPLED, seed=3))


def test_a_new_skip_set_of_the_same_size_does_not_recompile():
    decoder = CompiledDecoder(backend="eager")
    model, tokenizer = model_on_device("llama", num_layers=8)
    graphs = []
    for skip_set in [(1, 3), (2, 5), (1, 6), (3, 4), (2, 7)]:
        with nested(model, skip_set):
            reference = run(EAGER.sample, model, tokenizer, SAMPLED, seed=1)
            assert_same_samples(run(decoder.sample, model, tokenizer, SAMPLED, seed=1), reference)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 4  # the weights are graph inputs: one graph serves every skip set


def test_hybrid_attention_compiles_once_per_pattern_of_kept_layer_types():
    """Gemma2 alternates sliding and full attention: skip sets that keep the same sequence of types share a
    graph; another sequence is another computation and compiles its own."""
    decoder = CompiledDecoder(backend="eager")
    model, tokenizer = model_on_device("gemma2", num_layers=8)
    counts = []
    for skip_set in [(0, 1), (2, 3), (4, 5), (1, 3)]:  # the first three keep (s, f) x 3; the last s, s, s, f, s, f
        with nested(model, skip_set):
            run(decoder.sample, model, tokenizer, SAMPLED)
        counts.append(counters["stats"]["unique_graphs"])
    assert counts[0] == counts[1] == counts[2] < counts[3]


@pytest.fixture(scope="module")
def inductor():
    """One Inductor-compiled decoder and its model for the module (the compile is the minute)."""
    model, tokenizer = model_on_device("llama")
    return CompiledDecoder(mode=default_compiled_mode()), model, tokenizer


@pytest.mark.parametrize("skip_set", [(1, 2), (3, 4), (2, 5), (3,)])
def test_inductor_numerics_match_the_eager_engine(inductor, skip_set):
    decoder, model, tokenizer = inductor
    with nested(model, skip_set):
        for config in (GREEDY, SAMPLED):
            assert_same_samples(run(decoder.sample, model, tokenizer, config),
                                run(EAGER.sample, model, tokenizer, config))


def test_packed_gqa_attention_equals_attention_over_repeated_heads():
    """One query token per row on 2 key/value heads of 3 query heads each, a padding mask: the packed
    computation equals sdpa over the key/value heads repeated to every query head (what transformers does
    under torch.compile)."""
    from types import SimpleNamespace

    from nested_reft.engines.compiled import packed_gqa_sdpa

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 6, 1, 8, generator=generator)
    key, value = (torch.randn(3, 2, 7, 8, generator=generator) for _ in range(2))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    module = SimpleNamespace(num_key_value_groups=3, training=False)
    ours, _ = packed_gqa_sdpa(module, query, key, value, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ours, expected.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_compiled_decoding_leaves_the_models_attention_as_it_was(traced):
    model, tokenizer = model_on_device("llama")
    assert model.config._attn_implementation == "sdpa"
    run(traced.sample, model, tokenizer, GREEDY)
    assert model.config._attn_implementation == "sdpa"  # training forwards still use transformers' sdpa


def ending_tokens(model, tokenizer) -> list[int]:
    """Tokens that end the greedy completions of `PROMPTS` at different steps (a random tiny model rarely draws its
    own EOS): the rows' third, sixth and eighth tokens."""
    free = run(EAGER.sample, model, tokenizer, GREEDY)
    return [int(free.tokens[0, 2]), int(free.tokens[1, 5]), int(free.tokens[2, 7])]


@pytest.mark.parametrize("sync_every", [2, 3, 8])
def test_looking_for_ended_rows_less_often_changes_nothing_but_the_syncs(traced, sync_every):
    """Rows that end between two looks are masked as they end: the same tokens, masks, log-probs and width as
    looking every token, through both engines (the eager one drops ended rows later, the result is the same)."""
    model, tokenizer = model_on_device("llama")
    ids, mask = batch(tokenizer)
    eos = ending_tokens(model, tokenizer)
    for engine in (EagerDecoder, lambda sync_every: CompiledDecoder(backend="eager", sync_every=sync_every)):
        every_token, every_k = (engine(sync_every=k).sample(model, ids, mask, GREEDY, eos, tokenizer.pad_token_id)
                                for k in (1, sync_every))
        assert every_token.tokens.shape[1] < GREEDY.max_new_tokens  # every row ended early
        assert every_k.tokens.shape == every_token.tokens.shape
        assert_same_samples(every_k, every_token)


def test_the_compiled_engine_keeps_a_bounded_number_of_caches():
    """An adaptive policy changes U from step to step; each static cache holds a batch's keys and values."""
    decoder = CompiledDecoder(backend="eager", max_caches=2)
    model, tokenizer = model_on_device("llama", num_layers=8)
    live = []
    for skip_set in [(), (1,), (1, 2), (1, 2, 3), (1, 2), (4, 5)]:
        with nested(model, skip_set):
            run(decoder.sample, model, tokenizer, GREEDY)
        live.append(decoder.live_caches)
    assert live == [1, 2, 2, 2, 2, 2]
    cache = decoder._cache(model, 3, 64)  # the full model's shape again: a fresh cache, the oldest dropped
    assert decoder.live_caches == 2 and decoder._cache(model, 3, 64) is cache  # the same shape reuses it
