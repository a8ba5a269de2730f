"""Adaptive skip sets: Block Influence read by hooks, influence-weighted draws, the KL-target controller, and
the policy's state across a checkpoint."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from conftest import chi_square_critical_p001

from nested_reft.config import NestingConfig
from nested_reft.nesting.influence import InfluenceMeter
from nested_reft.nesting.layers import (
    decoder_layers,
    draw_uniform,
    draw_weighted,
    influence_probabilities,
    kl_controlled_count,
    num_skipped_layers,
)
from nested_reft.nesting.skip_policy import SkipPolicy
from nested_reft.models.tiny import tiny_model

# --- Block Influence ---------------------------------------------------------------------------------------


def direct_influence(model, input_ids, attention_mask, completion_mask) -> list[float]:
    """1 - cos(h_in, h_out) per block from `output_hidden_states`, over the completion tokens. The last entry of
    hidden_states is the final norm's output, so it is read with the final norm replaced by the identity."""
    length = completion_mask.shape[1]
    parent, name, layers = decoder_layers(model)
    norm_owner = next(module for module in model.modules() if any(child is layers for child in module.children()))
    norm_name = next(n for n in ("norm", "ln_f", "final_layer_norm", "final_layernorm") if hasattr(norm_owner, n))
    norm = getattr(norm_owner, norm_name)
    setattr(norm_owner, norm_name, torch.nn.Identity())
    try:
        with torch.no_grad():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    finally:
        setattr(norm_owner, norm_name, norm)
    mask = completion_mask.bool()
    return [
        float((1 - torch.nn.functional.cosine_similarity(hidden[i][:, -length:], hidden[i + 1][:, -length:], dim=-1))[mask].mean())
        for i in range(len(layers))
    ]


@pytest.mark.parametrize("architecture", ["llama", "gemma2", "gpt2", "opt"])
def test_influence_read_by_hooks_equals_the_direct_computation(architecture):
    model, _ = tiny_model(architecture, num_layers=4, seed=1)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 200, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded prompt
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])  # the last 4 positions
    meter = InfluenceMeter(model)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)  # outside `measuring`: not counted
        with meter.measuring(completion_mask):
            model(input_ids=input_ids, attention_mask=attention_mask)
    measured = meter.take()
    expected = direct_influence(model, input_ids, attention_mask, completion_mask)
    assert measured == pytest.approx(expected, abs=1e-5)
    assert all(value > 1e-4 for value in measured)  # random blocks do turn the stream: not a trivial zero
    assert meter.take() is None  # taken: the next step starts over


def test_influence_of_two_forwards_is_the_token_weighted_mean():
    model, _ = tiny_model("llama", num_layers=3, seed=2)
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    masks = [torch.tensor([[1, 1, 1], [1, 0, 0]]), torch.tensor([[1, 1, 0], [0, 0, 0]])]
    meter = InfluenceMeter(model)
    singles = []
    for mask in masks:
        with meter.measuring(mask), torch.no_grad():
            model(input_ids=ids)
        singles.append(meter.take())
    for mask in masks:
        with meter.measuring(mask), torch.no_grad():
            model(input_ids=ids)
    both = meter.take()
    weights = [4, 2]  # tokens in each mask
    expected = [(weights[0] * a + weights[1] * b) / 6 for a, b in zip(*singles)]
    assert both == pytest.approx(expected, abs=1e-9)


# --- influence-weighted draws ------------------------------------------------------------------------------


def successive_sampling_probabilities(p: list[float], count: int) -> dict[tuple[int, ...], float]:
    """Exact probability of each set under successive draws without replacement, each proportional to p among
    the layers left: the sum over the set's orders of the product of the conditional probabilities."""
    sets = {}
    for subset in itertools.combinations([i for i, value in enumerate(p) if value > 0], count):
        total = 0.0
        for order in itertools.permutations(subset):
            probability, left = 1.0, 1.0
            for layer in order:
                probability *= p[layer] / left
                left -= p[layer]
            total += probability
        sets[subset] = total
    return sets


def draw_frequencies(probabilities: torch.Tensor, count: int, draws: int) -> dict[tuple[int, ...], int]:
    generator = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(draws):
        drawn = draw_weighted(probabilities, count, generator)
        counts[drawn] = counts.get(drawn, 0) + 1
    return counts


def chi_square(observed: dict, expected: dict, draws: int) -> tuple[float, int]:
    assert set(observed) <= set(expected), "a set with probability 0 was drawn"
    statistic = sum((observed.get(key, 0) - draws * p) ** 2 / (draws * p) for key, p in expected.items())
    return statistic, len(expected) - 1


INFLUENCE = [0.9, 0.05, 0.30, 0.10, 0.02, 0.20, 0.9]  # 7 layers; border 1 leaves layers 1..5


def test_draws_follow_the_stated_probabilities_and_never_touch_the_border():
    probabilities = influence_probabilities(INFLUENCE, border=1, temperature=0.1)
    assert probabilities[0] == probabilities[-1] == 0
    expected_p = torch.exp(-torch.tensor(INFLUENCE[1:6], dtype=torch.float64) / 0.1)
    assert probabilities[1:6].tolist() == pytest.approx((expected_p / expected_p.sum()).tolist())
    draws = 20_000
    observed = draw_frequencies(probabilities, 2, draws)
    expected = successive_sampling_probabilities(probabilities.tolist(), 2)
    statistic, df = chi_square(observed, expected, draws)
    assert statistic < chi_square_critical_p001(df)


def test_a_very_large_temperature_is_uniform_and_a_small_one_picks_the_least_influential():
    draws = 6_000
    flat = influence_probabilities(INFLUENCE, border=1, temperature=1e6)
    uniform_sets = {subset: 1 / 10 for subset in itertools.combinations(range(1, 6), 2)}
    statistic, df = chi_square(draw_frequencies(flat, 2, draws), uniform_sets, draws)
    assert statistic < chi_square_critical_p001(df)
    sharp = influence_probabilities(INFLUENCE, border=1, temperature=1e-3)
    assert set(draw_frequencies(sharp, 2, 200)) == {(1, 4)}  # BI 0.05 and 0.02: the two least influential


def test_uniform_policy_draws_exactly_the_papers_f_x_b():
    from nested_reft.nesting.layers import sample_skip_set

    policy = SkipPolicy.from_config(NestingConfig(skip_ratio=0.3, border=1), num_layers=12)
    for seed in range(5):
        assert policy.draw(torch.Generator().manual_seed(seed)) == sample_skip_set(
            12, 0.3, 1, torch.Generator().manual_seed(seed))
    assert not policy.measures_influence


def test_influence_policy_draws_uniformly_until_its_first_measurement():
    config = NestingConfig(skip_ratio=0.3, border=1, skip_policy="influence", influence_temperature=1e-3)
    policy = SkipPolicy.from_config(config, num_layers=7)
    assert policy.measures_influence and policy.draw(torch.Generator().manual_seed(3)) == draw_uniform(
        7, 2, 1, torch.Generator().manual_seed(3))
    policy.observe((2, 3), INFLUENCE, kl=0.1)
    assert policy.draw(torch.Generator().manual_seed(3)) == (1, 4)


def test_influence_is_smoothed_over_steps():
    policy = SkipPolicy.from_config(NestingConfig(skip_ratio=0.3, skip_policy="influence", smoothing=0.75), 4)
    policy.observe((1,), [0.4, 0.4, 0.4, 0.4], kl=0.0)
    policy.observe((1,), [0.0, 0.8, 0.4, 0.0], kl=0.0)
    assert policy.influence == pytest.approx([0.3, 0.5, 0.4, 0.3])


# --- the KL target -----------------------------------------------------------------------------------------


def test_kl_controlled_count_steps_down_over_the_target_and_up_under_it():
    assert kl_controlled_count(5, {5: 0.2}, target=0.1, max_count=9) == 4
    assert kl_controlled_count(5, {5: 0.05}, target=0.1, max_count=9) == 6
    assert kl_controlled_count(5, {5: 0.05, 6: 0.15}, target=0.1, max_count=9) == 5  # U + 1 known to be over
    assert kl_controlled_count(9, {9: 0.05}, target=0.1, max_count=9) == 9  # x is the upper bound
    assert kl_controlled_count(0, {0: 0.0}, target=0.1, max_count=9) == 1
    assert kl_controlled_count(0, {0: 0.3}, target=0.1, max_count=9) == 0


def test_kl_target_policy_follows_a_scripted_kl_sequence():
    """A KL that grows with U by 0.03 per layer and a target of 0.1: the policy settles on U = 3."""
    config = NestingConfig(skip_ratio=0.3, border=1, skip_policy="kl_target", kl_target=0.1, smoothing=0.0,
                           kl_retry_steps=0)
    policy = SkipPolicy.from_config(config, num_layers=30)
    assert policy.max_count == num_skipped_layers(30, 0.3) == 9 and policy.count == 4
    counts = []
    for step in range(8):
        skip_set = policy.draw(torch.Generator().manual_seed(step))
        counts.append(len(skip_set))
        policy.observe(skip_set, None, kl=0.03 * len(skip_set))
    assert counts == [4, 3, 3, 3, 3, 3, 3, 3]  # 0.12 > 0.1: down to 3 (0.09), and 4 is known to be over

    policy = SkipPolicy.from_config(config, num_layers=30)
    counts = []
    for step in range(8):
        skip_set = policy.draw(torch.Generator().manual_seed(step))
        counts.append(len(skip_set))
        policy.observe(skip_set, None, kl=0.005 * len(skip_set))  # always under: up to x's bound, then stay
    assert counts == [4, 5, 6, 7, 8, 9, 9, 9]


def scripted_counts(config: NestingConfig, kl_of_count, steps: int) -> list[int]:
    policy = SkipPolicy.from_config(config, num_layers=30)
    counts = []
    for step in range(steps):
        skip_set = policy.draw(torch.Generator().manual_seed(step))
        counts.append(len(skip_set))
        policy.observe(skip_set, None, kl=kl_of_count(len(skip_set)))
    return counts


def test_kl_target_retries_a_count_once_its_measurement_is_old():
    """One bad draw at U = 1 (the study's seed 0) no longer ends the nesting: U = 1 is tried again every
    `kl_retry_steps` steps, and kept once it measures under the target."""
    config = NestingConfig(skip_ratio=0.1, border=1, skip_policy="kl_target", kl_target=1.0, smoothing=0.0,
                           kl_retry_steps=3)
    assert SkipPolicy.from_config(config, num_layers=30).count == 1
    bad_once = iter([3.3])  # the first draw at U = 1 is far over, later ones are under
    counts = scripted_counts(config, lambda count: next(bad_once, 0.5) if count else 0.0, steps=8)
    assert counts == [1, 0, 0, 0, 1, 2, 3, 3]  # U_x = 3 for x = 10% of 30 layers
    never = dataclasses.replace(config, kl_retry_steps=0)
    bad_once = iter([3.3])
    assert scripted_counts(never, lambda count: next(bad_once, 0.5) if count else 0.0, steps=8) == [1] + [0] * 7


def test_the_policy_state_survives_a_json_round_trip():
    import json

    config = NestingConfig(skip_ratio=0.3, skip_policy="kl_target", kl_target_layers="influence")
    policy = SkipPolicy.from_config(config, num_layers=10)
    policy.observe((2, 5), [0.1 * i for i in range(10)], kl=0.02)
    restored = SkipPolicy.from_config(config, num_layers=10)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored == policy
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert restored.draw(generator()) == policy.draw(generator())
    assert not math.isnan(sum(restored.influence))


def test_kl_target_policy_ignores_a_step_that_measured_no_kl():
    """kl None (no sampled token) is no measurement: the count stays and nothing is recorded, where a 0 would
    have read as a perfectly close skip set."""
    config = NestingConfig(skip_ratio=0.3, border=1, skip_policy="kl_target", kl_target=0.1, smoothing=0.0,
                           kl_retry_steps=0)
    policy = SkipPolicy.from_config(config, num_layers=30)
    policy.observe(policy.draw(torch.Generator().manual_seed(0)), None, kl=None)
    assert policy.count == 4 and policy.kl_by_count == {}
    policy.observe(policy.draw(torch.Generator().manual_seed(1)), None, kl=0.0)
    assert policy.kl_by_count == {4: 0.0}
