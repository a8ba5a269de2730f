"""Bridges through the compiled engine (issue 31): a run of skipped blocks composed into one map, the bridged
nested model sampled as the eager engine samples it, and no recompilation for a new skip set of the same size.

As in test_decoding, most checks trace with dynamo's "eager" backend (the same graphs, guards and recompilations,
`torch.cond` included) and one module-scoped Inductor decoder checks the numerics.
"""

from __future__ import annotations

import pytest
import torch
from conftest import fitted_bridges
from torch._dynamo.utils import counters

from nested_reft.config import SamplingConfig
from nested_reft.engines.compiled import CompiledDecoder, default_compiled_mode
from nested_reft.engines.eager import EagerDecoder
from nested_reft.engines.rollout import generate_rollouts
from nested_reft.models.loading import load_model
from nested_reft.models.tiny import tiny_model
from nested_reft.nesting import static_bridges
from nested_reft.nesting.bridges import Bridges
from nested_reft.nesting.static_bridges import composed_bridges, composed_run, runs_by_position

PROMPTS = ["a longer prompt to pad against", "hi", "what is 2 + 3?"]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=10, min_new_tokens=0)
SAMPLED = SamplingConfig(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=10, min_new_tokens=10)
# a run of two, an isolated block, a run at the start, a run at the end (border 0), a run of three
SKIP_SETS = [(1, 2), (2,), (0, 3), (4, 5), (1, 3, 4), (2, 3, 4)]


def random_bridges(num_layers: int, hidden_size: int, seed: int = 3) -> Bridges:
    """Bridges of every block, far from the identity (a removed block and its bridge sample differently)."""
    generator = torch.Generator().manual_seed(seed)
    return Bridges(tuple(range(num_layers)),
                   0.1 * torch.randn(num_layers, hidden_size, hidden_size, generator=generator),
                   0.1 * torch.randn(num_layers, hidden_size, generator=generator))


def rollouts(model, tokenizer, config, skip_set, decoder, bridges=None, seed=0):
    return generate_rollouts(model, tokenizer, PROMPTS, 1, config, skip_set, torch.Generator().manual_seed(seed),
                             decoder, bridges)


def assert_same_rollouts(ours, theirs):
    """The tolerance of test_decoding's compiled-against-eager checks."""
    width = min(ours.completion_ids.shape[1], theirs.completion_ids.shape[1])
    assert torch.equal(ours.completion_ids[:, :width], theirs.completion_ids[:, :width])
    assert torch.equal(ours.completion_mask[:, :width], theirs.completion_mask[:, :width])
    torch.testing.assert_close(ours.behavior_logprobs[:, :width], theirs.behavior_logprobs[:, :width], atol=1e-4,
                               rtol=0)


def test_a_composed_run_equals_its_bridges_applied_in_sequence():
    generator = torch.Generator().manual_seed(0)
    weight, bias = 0.3 * torch.randn(3, 16, 16, generator=generator), torch.randn(3, 16, generator=generator)
    hidden = torch.randn(5, 16, generator=generator)
    expected = hidden
    for step_weight, step_bias in zip(weight, bias):
        expected = expected + expected @ step_weight + step_bias
    composed_weight, composed_bias = composed_run(weight, bias)
    torch.testing.assert_close(hidden + hidden @ composed_weight + composed_bias, expected, atol=1e-5, rtol=1e-5)
    single = composed_run(weight[:1], bias[:1])
    assert torch.equal(single[0], weight[0]) and torch.equal(single[1], bias[0])


def test_runs_sit_at_the_nested_models_positions():
    """Of 8 blocks without 0, 3, 4 and 7 the nested model keeps 1, 2, 5, 6: block 0 runs before kept block 0 (its
    position 0), 3 and 4 before kept block 2, 7 after the last kept block (position 4, before the final norm)."""
    assert runs_by_position((0, 3, 4, 7), 8) == [(0,), (), (3, 4), (), (7,)]
    composed = composed_bridges(random_bridges(8, 4), (0, 3, 4, 7), 8)
    assert composed.positions == (0, 2, 4) and composed.num_positions == 5
    assert composed.weight.shape == (3, 4, 4) and composed.weight.dtype == torch.float32
    assert composed_bridges(None, (1,), 8) is None and composed_bridges(random_bridges(8, 4), (), 8) is None


def test_a_skipped_block_without_a_bridge_is_refused_by_name():
    with pytest.raises(ValueError, match=r"blocks \[0\] are skipped but have no bridge"):
        composed_bridges(Bridges.identity(range(1, 5), 4), (0, 2), 6)


@pytest.fixture(scope="module")
def traced():
    """One dynamo-traced decoder (backend "eager") for the module: its graphs are shared by the tests."""
    return CompiledDecoder(backend="eager")


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("skip_set", SKIP_SETS)
def test_the_compiled_engine_samples_the_bridged_model_the_eager_engine_samples(traced, architecture, skip_set):
    """Greedy tokens equal, and at temperature 0.7 the same seed draws the same tokens with the same behavior
    log-probs; the bridges are not the removed blocks (the rollouts differ from those without them)."""
    model, tokenizer = tiny_model(architecture, num_layers=6)
    bridges = random_bridges(6, model.config.hidden_size)
    for config in (GREEDY, SAMPLED):
        ours = rollouts(model, tokenizer, config, skip_set, traced, bridges)
        assert_same_rollouts(ours, rollouts(model, tokenizer, config, skip_set, EagerDecoder(), bridges))
        assert ours.bridged
    removed = rollouts(model, tokenizer, SAMPLED, skip_set, traced)
    assert not torch.allclose(ours.behavior_logprobs, removed.behavior_logprobs, atol=1e-3)


@pytest.mark.parametrize("branching", [True, False], ids=["cond", "where"])
def test_a_new_skip_set_of_the_same_size_does_not_recompile_the_bridged_step(monkeypatch, branching):
    """Skip sets of 2 of 8 blocks with their runs at other positions (a run of two, two isolated blocks, the first
    and the last block) share one graph and one set of static buffers, filled in place; the graph without bridges
    is another, and each still samples what the eager engine samples after the other ran. Both forms of a position
    without a run: `torch.cond` (CPUs) and `torch.where` (CUDA graphs)."""
    original = static_bridges.StaticBridges.__init__
    monkeypatch.setattr(static_bridges.StaticBridges, "__init__",
                        lambda self, *args, **kwargs: original(self, *args, **kwargs, branching=branching))
    decoder = CompiledDecoder(backend="eager")
    model, tokenizer = tiny_model("llama", num_layers=8)
    bridges = random_bridges(8, model.config.hidden_size)
    graphs, addresses = [], set()
    for skip_set in [(1, 2), (2, 5), (0, 7), (3, 4), (1, 6)]:
        assert_same_rollouts(rollouts(model, tokenizer, SAMPLED, skip_set, decoder, bridges, seed=1),
                             rollouts(model, tokenizer, SAMPLED, skip_set, EagerDecoder(), bridges, seed=1))
        assert_same_rollouts(rollouts(model, tokenizer, SAMPLED, skip_set, decoder, seed=1),
                             rollouts(model, tokenizer, SAMPLED, skip_set, EagerDecoder(), seed=1))
        graphs.append(counters["stats"]["unique_graphs"])
        addresses.update(static.weight.data_ptr() for static in decoder._bridges.values())
    assert graphs[1:] == [graphs[0]] * 4  # the bridged graph and the plain one, made for the first skip set only
    assert len(addresses) == 1  # the same buffers every time: a CUDA graph reads them where it was captured


def test_inductor_numerics_of_bridged_decoding_match_the_eager_engine_without_recompiling():
    """Inductor compiles the bridged step once (`torch.cond` on a CPU): three skip sets of the same size, with a run
    of two, the first block and the last, sample what the eager engine samples."""
    decoder = CompiledDecoder(mode=default_compiled_mode())
    model, tokenizer = tiny_model("llama", num_layers=6)
    bridges = random_bridges(6, model.config.hidden_size)
    graphs = []
    for skip_set in [(1, 2), (0, 3), (2, 5)]:
        for config in (GREEDY, SAMPLED):
            assert_same_rollouts(rollouts(model, tokenizer, config, skip_set, decoder, bridges),
                                 rollouts(model, tokenizer, config, skip_set, EagerDecoder(), bridges))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 2


@pytest.mark.integration
def test_bridged_rollouts_of_smollm2_through_the_compiled_engine_equal_the_eager_engines(traced):
    """SmolLM2-135M with bridges fitted to it: greedy and sampled tokens and behavior log-probs as the eager engine's,
    for a run of three skipped blocks and for isolated ones."""
    model, tokenizer = load_model("smollm2-135m-instruct")
    bridges = fitted_bridges(model, tokenizer, PROMPTS)
    for skip_set in [(7, 19), (1, 12, 13, 14, 28)]:
        for config in (GREEDY, SAMPLED):
            ours = rollouts(model, tokenizer, config, skip_set, traced, bridges)
            assert_same_rollouts(ours, rollouts(model, tokenizer, config, skip_set, EagerDecoder(), bridges))
