"""Rollouts: the sampler agrees with `generate`, records the behavior log-probs, honours its settings."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import chi_square_critical_p001
from transformers import DynamicCache

import nested_reft.engines.rollout as rollout_module
import nested_reft.engines.sampling as sampling_module
from nested_reft.nesting.layers import nested
from nested_reft.engines.rollout import (
    SamplingConfig, ended_with_eos, generate_rollouts, rollout_speedup, speedup_ratios,
)
from nested_reft.engines.sampling import draw, inverse_cdf_sample
from nested_reft.models.tiny import tiny_model

PROMPTS = ["what is two plus two?", "hi", "count to three"]


def recomputed_logprobs(model, rollouts, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled completions from a fresh full forward pass (the slow, obvious way)."""
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    prompt_length = rollouts.prompt_ids.shape[1]
    logits = logits[:, prompt_length - 1 : -1] / temperature
    logprobs = torch.log_softmax(logits, -1).gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)
    return logprobs * rollouts.completion_mask


@pytest.mark.parametrize("architecture", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("skip_set", [(), (0, 3), (2,)])
def test_behavior_logprobs_equal_a_recomputed_forward_of_the_nested_model(architecture, skip_set):
    model, tokenizer = tiny_model(architecture, num_layers=6)
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12, min_new_tokens=0)
    rollouts = generate_rollouts(
        model, tokenizer, PROMPTS, 3, sampling, skip_set, generator=torch.Generator().manual_seed(0)
    )
    with nested(model, skip_set):
        expected = recomputed_logprobs(model, rollouts, temperature=0.7)
    torch.testing.assert_close(rollouts.behavior_logprobs, expected, atol=1e-4, rtol=0)
    assert rollouts.behavior_logprobs.dtype == torch.float32
    if skip_set:  # and they are not the full model's log-probs
        assert not torch.allclose(recomputed_logprobs(model, rollouts, 0.7), expected, atol=1e-3)


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_rows_that_end_leave_the_batch_without_changing_the_others(architecture, monkeypatch):
    """With half the vocabulary ending a completion, rows end at different steps and the batch shrinks (their KV
    cache rows dropped); every row's tokens and log-probs still match a forward over the full batch, and each
    row ends at its first end token."""
    model, tokenizer = tiny_model(architecture, num_layers=4)
    compactions = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda cache, keep: compactions.append(len(keep)) or select(cache, keep))
    ending = list(range(0, tokenizer.vocab_size, 2))
    monkeypatch.setattr(rollout_module, "eos_token_ids", lambda model, tokenizer: ending)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, min_new_tokens=2)
    rollouts = generate_rollouts(model, tokenizer, PROMPTS, 4, sampling, (), torch.Generator().manual_seed(1))
    assert compactions and compactions == sorted(compactions, reverse=True)  # the batch shrank, step by step
    lengths = rollouts.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2 and lengths.min() >= 2  # rows ended at different steps, not before min
    for row, length in zip(rollouts.completion_ids, lengths.tolist()):
        ends = [i for i, token in enumerate(row[:length].tolist()) if token in set(ending)]
        assert ends in ([length - 1], [])  # the last kept token is the first end token (or the row ran to max)
        assert (row[length:] == tokenizer.pad_token_id).all()
    expected = recomputed_logprobs(model, rollouts, temperature=1.0)
    torch.testing.assert_close(rollouts.behavior_logprobs, expected, atol=1e-4, rtol=0)


def test_greedy_rollouts_equal_hugging_face_generate():
    model, tokenizer = tiny_model("qwen2", num_layers=4)
    rollouts = generate_rollouts(
        model, tokenizer, PROMPTS, 1, SamplingConfig(temperature=0, max_new_tokens=15, min_new_tokens=0)
    )
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    expected = model.generate(**batch, max_new_tokens=15, do_sample=False)[:, batch["input_ids"].shape[1] :]
    width = expected.shape[1]
    assert torch.equal(rollouts.completion_ids[:, :width], expected)


class FavourToken(torch.nn.Module):
    """An output head that adds a large logit to one token."""

    def __init__(self, head: torch.nn.Module, token: int):
        super().__init__()
        self.head, self.token = head, token

    def forward(self, hidden):
        logits = self.head(hidden).clone()
        logits[..., self.token] += 100.0
        return logits


def test_fixed_length_mode_never_stops_early():
    model, tokenizer = tiny_model("llama", num_layers=4)
    eos = tokenizer.eos_token_id
    model.lm_head = FavourToken(model.lm_head, eos)  # EOS is the most likely token everywhere
    stopping = generate_rollouts(model, tokenizer, PROMPTS, 2, SamplingConfig(max_new_tokens=8, min_new_tokens=0))
    assert stopping.completion_mask.sum(1).tolist() == [1] * 6  # EOS first, mask covers it, then padding
    assert (stopping.completion_ids[:, 0] == eos).all()
    fixed = generate_rollouts(model, tokenizer, PROMPTS, 2, SamplingConfig(max_new_tokens=8, min_new_tokens=8))
    assert fixed.completion_mask.sum(1).tolist() == [8] * 6
    assert not (fixed.completion_ids == eos).any()
    assert stopping.finished.all() and not fixed.finished.any()  # ended at EOS / cut at max_new_tokens


def test_a_completion_is_finished_when_its_last_generated_token_is_an_eos_token():
    tokens = torch.tensor([[5, 2, 0], [5, 6, 7], [5, 6, 3], [0, 0, 0], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 0]])
    # EOS mid-row; cut at the limit; EOS (a second EOS id) exactly at the limit; empty; EOS first
    assert ended_with_eos(tokens, mask, [2, 3]).tolist() == [True, False, True, False, True]


def test_sequences_stop_independently_and_are_padded_after_eos():
    model, tokenizer = tiny_model("llama", num_layers=4)
    rollouts = generate_rollouts(
        model, tokenizer, PROMPTS * 4, 2, SamplingConfig(temperature=2.0, max_new_tokens=40, min_new_tokens=0),
        generator=torch.Generator().manual_seed(1),
    )
    for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # a prefix mask
        assert (ids[length:] == tokenizer.pad_token_id).all()
        if length < ids.shape[0]:
            assert ids[length - 1] == tokenizer.eos_token_id
    lengths = rollouts.completion_mask.sum(1)
    assert rollouts.finished.tolist() == [bool(ids[n - 1] == tokenizer.eos_token_id)
                                          for ids, n in zip(rollouts.completion_ids, lengths)]
    assert rollouts.finished.any() and not rollouts.finished.all(), "the test needs both kinds of rows"
    assert (rollouts.behavior_logprobs[rollouts.completion_mask == 0] == 0).all()


def test_rollouts_are_reproducible_from_a_seed_and_grouped_by_prompt():
    model, tokenizer = tiny_model("llama", num_layers=4)
    sampling = SamplingConfig(max_new_tokens=10, min_new_tokens=10)

    def draw(seed):
        return generate_rollouts(model, tokenizer, PROMPTS, 4, sampling, (1,), torch.Generator().manual_seed(seed))

    start = time.perf_counter()
    first = draw(0)
    wall_time = time.perf_counter() - start
    second, other = draw(0), draw(1)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    assert first.completion_ids.shape == (12, 10)
    for prompt in range(3):  # completion i belongs to prompt i // G
        group = first.prompt_ids[prompt * 4 : (prompt + 1) * 4]
        assert (group == group[0]).all()
    own_lengths = [len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in PROMPTS]
    assert first.prompt_tokens == 4 * sum(own_lengths)  # each prompt's own tokens, G times, padding not counted
    assert first.completion_tokens == 120 and first.skip_set == (1,)
    assert 0 < first.generation_time_s <= wall_time  # seconds, and within the call that sampled


def test_top_k_one_is_greedy():
    model, tokenizer = tiny_model("llama", num_layers=4)
    top1 = generate_rollouts(
        model, tokenizer, PROMPTS, 2, SamplingConfig(top_k=1, max_new_tokens=10, min_new_tokens=10),
        generator=torch.Generator().manual_seed(3),
    )
    greedy = generate_rollouts(
        model, tokenizer, PROMPTS, 2, SamplingConfig(temperature=0, max_new_tokens=10, min_new_tokens=10)
    )
    assert torch.equal(top1.completion_ids, greedy.completion_ids)


def test_small_top_p_keeps_only_the_most_likely_token():
    model, tokenizer = tiny_model("llama", num_layers=4)
    nucleus = generate_rollouts(
        model, tokenizer, PROMPTS, 2, SamplingConfig(top_p=1e-6, max_new_tokens=10, min_new_tokens=10),
        generator=torch.Generator().manual_seed(5),
    )
    greedy = generate_rollouts(
        model, tokenizer, PROMPTS, 2, SamplingConfig(temperature=0, max_new_tokens=10, min_new_tokens=10)
    )
    assert torch.equal(nucleus.completion_ids, greedy.completion_ids)


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}  # chi-square critical values, p = 0.001


@pytest.mark.parametrize(
    "settings, banned, allowed",
    [
        (dict(), None, [0, 1, 2, 3, 4, 5]),
        (dict(), [0], [1, 2, 3, 4, 5]),  # min_new_tokens bans EOS: the others keep their odds
        (dict(top_k=3), None, [0, 1, 2]),
        (dict(top_k=3), [1], [0, 2, 3]),
        (dict(top_p=0.8), None, [0, 1, 2]),  # 0.55 + 0.20 < 0.8 <= 0.55 + 0.20 + 0.12
        (dict(temperature=2.0), None, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_draws_follow_the_filtered_renormalised_distribution(settings, banned, allowed):
    """Frequencies of 40k draws pass a chi-square test against softmax(logits / T) restricted to `allowed`."""
    config = SamplingConfig(**settings)
    draws = 40_000
    probs = torch.softmax(LOGITS / config.temperature, -1).expand(draws, -1).contiguous()
    banned_ids = None if banned is None else torch.tensor(banned)
    tokens = draw(probs, config, banned_ids, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=len(LOGITS))
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(allowed)
    expected = torch.softmax(LOGITS[allowed] / config.temperature, -1) * draws
    observed = counts[allowed].double()
    frequent = expected >= 5  # the chi-square approximation needs expected counts of at least 5
    chi2 = float(((observed[frequent] - expected[frequent]) ** 2 / expected[frequent]).sum())
    assert chi2 < CHI2_P001[int(frequent.sum()) - 1]


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_the_candidate_nucleus_equals_the_nucleus_of_the_sorted_vocabulary(top_p):
    """Peaked rows (the nucleus among the 16 candidates) and flat rows (not: sorted whole) in one batch."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 500, generator=generator) * torch.tensor([[8.0], [0.2], [6.0], [0.1], [12.0], [1.0]])
    probs = torch.softmax(logits, -1)
    probs[0, :3] = 0.0  # a banned token (min_new_tokens): unnormalised rows
    filtered = sampling_module.top_p_filter(probs, top_p, candidates=16)
    expected = sampling_module._top_p_by_sorting(probs, top_p)
    assert torch.equal(filtered > 0, expected > 0) and torch.equal(filtered, expected)
    kept = (filtered > 0).sum(-1)
    assert kept.min() < 16 < kept.max()  # both paths ran


def test_two_level_draws_follow_the_weights_across_blocks_with_zero_and_short_blocks():
    """37 tokens in blocks of 4 (the last block one token long), a whole block and single tokens at weight 0:
    the frequencies of 60k draws pass a chi-square test against the normalised weights."""
    weights = torch.rand(37, generator=torch.Generator().manual_seed(3)) + 0.1
    weights[[8, 9, 10, 11, 17, 36]] = 0.0
    draws = 60_000
    tokens = inverse_cdf_sample(weights.expand(draws, -1), torch.Generator().manual_seed(4), block=4)
    counts = torch.bincount(tokens, minlength=37).double()
    positive = weights > 0
    assert counts[~positive].sum() == 0
    expected = weights[positive].double() / weights.sum() * draws
    chi2 = float(((counts[positive] - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_critical_p001(int(positive.sum()) - 1)


@pytest.mark.parametrize("block", [256, 2, 1])
def test_draws_never_pick_a_zero_weight_token_even_at_the_top_of_the_unit_interval(block):
    weights = torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0]]).expand(4096, -1)
    generator = torch.Generator().manual_seed(1)
    assert set(inverse_cdf_sample(weights, generator, block).tolist()) == {1, 2}
    one_minus_eps = torch.full((1, 1), 1 - 2**-53, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:  # the largest uniform torch.rand can return
        patch.setattr(torch, "rand", lambda *args, **kwargs: one_minus_eps.expand(args[0], 1))
        assert set(inverse_cdf_sample(weights * 1e-3, None, block).tolist()) == {2}


def test_non_finite_logits_are_an_error_that_says_so():
    model, tokenizer = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        model.get_output_embeddings().weight[3].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        generate_rollouts(model, tokenizer, PROMPTS, 2, SamplingConfig(max_new_tokens=4, min_new_tokens=4))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=0, min_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
    ],
)
def test_bad_sampling_settings_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        SamplingConfig(**kwargs)


def test_rollouts_do_not_copy_parameters_and_leave_the_model_in_its_mode():
    model, tokenizer = tiny_model("llama", num_layers=6)
    pointers = [p.data_ptr() for p in model.parameters()]
    model.train()
    generate_rollouts(model, tokenizer, PROMPTS, 2, SamplingConfig(max_new_tokens=4, min_new_tokens=4), (2, 3))
    assert model.training
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_the_rollout_speedup_is_the_median_of_the_ratios_within_each_pair():
    """Three skip sets of true speedups 1.25, 1.5 and 2, timed while the machine ran at speeds 1, 1/4 and 1/2
    (every timing of a pair scaled alike): the ratios within the pairs are the true speedups whatever the drift,
    and their median is the middle one. A ratio of medians would pair the full model's median timing (2 s, the
    third pair) with the nested model's (1 s, also the third) and say 2; summed times would say 7 / 4.47 = 1.57."""
    pairs = [(1.0, 1.0 / 1.25), (4.0, 4.0 / 1.5), (2.0, 2.0 / 2.0)]
    assert speedup_ratios(pairs) == pytest.approx([1.25, 1.5, 2.0])
    assert rollout_speedup(pairs) == pytest.approx(1.5)
    assert rollout_speedup(iter(pairs)) == pytest.approx(1.5)  # any iterable of pairs, read once
    assert rollout_speedup([(3.0, 2.0), (1.0, 1.0)]) == pytest.approx(1.25)  # an even count: the mean of the middle two
    assert rollout_speedup([(0.5, 0.4)]) == pytest.approx(1.25)  # one pair: its ratio
    burst = [(1.0, 0.8), (1.0, 0.8), (1.0, 8.0)]  # load hit the third pair's nested timing tenfold
    assert rollout_speedup(burst) == pytest.approx(1.25)


@pytest.mark.parametrize("pairs", [[], [(1.0, 0.0)], [(0.0, 1.0)], [(1.0, -1.0)]])
def test_a_rollout_speedup_needs_positive_timings(pairs):
    with pytest.raises(ValueError):
        rollout_speedup(pairs)
