"""Bridges (issue 31): the ridge fit against hand computations, the bridged nested forward against a model built
by hand with those blocks replaced, the fit read off a forward equal to a separate calibration pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from test_trainer import PROBLEMS, lowercase_share

from nested_reft.config import ConfigError, SamplingConfig, load_config
from nested_reft.engines import choice
from nested_reft.engines.compiled import CompiledDecoder
from nested_reft.engines.rollout import generate_rollouts
from nested_reft.models.tiny import tiny_model
from nested_reft.nesting.bridges import (
    BridgeFitter,
    Bridges,
    NormalEquations,
    fit_bridges,
    nested_bridged,
)
from nested_reft.nesting.layers import decoder_layers, nested
from nested_reft.nesting import bridges as bridges_module
from nested_reft.training import bridging as bridging_module
from nested_reft.training.metrics import ModelShapes, rollout_flops
from nested_reft.tasks.task import Task
from nested_reft.training.trainer import train


def linear_block_states(weight: torch.Tensor, bias: torch.Tensor, tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden_in = torch.randn(tokens, weight.shape[0], generator=generator)
    return hidden_in, hidden_in + hidden_in @ weight + bias


def test_a_bridge_fitted_on_a_block_that_is_itself_linear_recovers_it():
    generator = torch.Generator().manual_seed(1)
    weight, bias = 0.3 * torch.randn(8, 8, generator=generator), torch.randn(8, generator=generator)
    equations = NormalEquations.zeros((3,), 8)
    for seed in range(3):  # accumulated over three batches, as over a step's micro-batches
        equations.add(3, *linear_block_states(weight, bias, 50, seed))
    bridges = fit_bridges(equations, ridge=0.0)
    torch.testing.assert_close(bridges.weight[0], weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bridges.bias[0], bias, atol=1e-5, rtol=1e-5)
    assert equations.tokens.tolist() == [150.0]


def test_the_ridge_fit_equals_the_closed_form_by_hand_and_shrinks_w_not_c():
    hidden_in, hidden_out = linear_block_states(torch.eye(4), torch.ones(4), 20)
    hidden_out = hidden_out + 0.1 * torch.randn(20, 4, generator=torch.Generator().manual_seed(2))
    equations = NormalEquations.zeros((0,), 4)
    equations.add(0, hidden_in, hidden_out)
    x = torch.cat([hidden_in.double(), torch.ones(20, 1, dtype=torch.float64)], 1)
    delta = (hidden_out - hidden_in).double()
    scale = (x[:, :4] ** 2).sum(0).mean()
    penalty = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    expected = torch.linalg.solve(x.T @ x + 0.5 * scale * penalty, x.T @ delta)
    bridges = fit_bridges(equations, ridge=0.5)
    torch.testing.assert_close(bridges.weight[0].double(), expected[:4], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bridges.bias[0].double(), expected[4], atol=1e-6, rtol=1e-6)
    assert bridges.weight[0].abs().sum() < fit_bridges(equations, ridge=0.0).weight[0].abs().sum()


def test_a_block_that_saw_no_token_keeps_the_identity_bridge():
    equations = NormalEquations.zeros((1, 2), 4)
    equations.add(1, *linear_block_states(torch.eye(4), torch.zeros(4), 10))
    bridges = fit_bridges(equations, ridge=1e-3)
    assert bridges.weight[1].eq(0).all() and bridges.bias[1].eq(0).all() and bridges.weight[0].abs().sum() > 0


def test_decay_weights_old_sums_and_sums_of_other_blocks_do_not_join():
    equations = NormalEquations.zeros((0,), 2)
    equations.add(0, torch.ones(3, 2), 2 * torch.ones(3, 2))
    total = equations.scaled(0.5).plus(equations)
    assert total.tokens.item() == 4.5 and torch.equal(total.gram, 1.5 * equations.gram)
    with pytest.raises(ValueError, match=r"blocks \(1,\) cannot join those of \(0,\)"):
        total.plus(NormalEquations.zeros((1,), 2))


class HandBridge(nn.Module):
    """A block replaced by its bridge, in the model itself: what `nested_bridged` must equal."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + hidden_states @ self.weight + self.bias


def random_bridges(layers, hidden_size: int, seed: int = 3) -> Bridges:
    generator = torch.Generator().manual_seed(seed)
    return Bridges(tuple(layers), 0.05 * torch.randn(len(layers), hidden_size, hidden_size, generator=generator),
                   0.05 * torch.randn(len(layers), hidden_size, generator=generator))


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("skip_set", [(2,), (1, 2), (0, 3), (4, 5), (1, 3, 5)])
def test_a_bridged_nested_forward_equals_a_model_built_by_hand_with_those_blocks_replaced(architecture, skip_set):
    model, _ = tiny_model(architecture, num_layers=6)
    hidden_size = model.config.get_text_config().hidden_size
    bridges = random_bridges(range(6), hidden_size)
    input_ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    by_hand = copy.deepcopy(model)
    parent, name, layers = decoder_layers(by_hand)
    for index in skip_set:
        layers[index] = HandBridge(bridges.weight[index], bridges.bias[index])
    expected = by_hand(input_ids=input_ids, use_cache=False).logits
    with nested_bridged(model, skip_set, bridges) as nested_model:
        got = nested_model(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with nested(model, skip_set):  # the bridges' hooks are gone with the context: plain nesting again
        removed = model(input_ids=input_ids, use_cache=False).logits
    assert not torch.allclose(removed, expected, atol=1e-4)


def test_identity_bridges_are_the_papers_nested_model():
    model, _ = tiny_model("llama", num_layers=6)
    input_ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with nested(model, (2, 4)):
        removed = model(input_ids=input_ids).logits
    with nested_bridged(model, (2, 4), Bridges.identity(range(1, 5), model.config.hidden_size)):
        identity = model(input_ids=input_ids).logits
    torch.testing.assert_close(identity, removed)


def test_a_skipped_block_without_a_bridge_is_refused_by_name():
    model, _ = tiny_model("llama", num_layers=6)
    with pytest.raises(ValueError, match=r"blocks \[0\] are skipped but have no bridge"):
        with nested_bridged(model, (0, 2), Bridges.identity(range(1, 5), model.config.hidden_size)):
            pass


def test_the_fit_recorded_on_a_forward_equals_a_separate_calibration_pass_on_the_same_tokens():
    """The fitter's hooks on the update's forward read each block's states at the masked positions: the sums equal
    those of a pass that collects every block's input and output with output_hidden_states."""
    model, _ = tiny_model("llama", num_layers=6)
    fitter = BridgeFitter(model, layers=range(1, 5), decay=1.0)
    input_ids = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    with fitter.recording(mask):
        model(input_ids=input_ids, use_cache=False)
    fitter.end_step()
    states = model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    expected = NormalEquations.zeros(range(1, 5), model.config.hidden_size)
    for layer in range(1, 5):
        expected.add(layer, states[layer][:, -4:][mask], states[layer + 1][:, -4:][mask])  # not the last block
    torch.testing.assert_close(fitter.total.gram, expected.gram)
    torch.testing.assert_close(fitter.total.cross, expected.cross)
    assert fitter.total.tokens.tolist() == [10.0] * 4
    model(input_ids=input_ids)  # outside `recording` the hooks do nothing
    fitter.end_step()
    torch.testing.assert_close(fitter.total.gram, expected.gram)



@pytest.mark.parametrize("skip_set", [(1,), (2, 3), (1, 4)])
def test_bridged_rollouts_sample_what_the_model_built_by_hand_samples(skip_set):
    """The eager engine through `generate_rollouts`: the bridged nested model's greedy completions and behavior
    log-probs are those of the hand-built model run whole."""
    model, tokenizer = tiny_model("llama", num_layers=6)
    bridges = random_bridges(range(1, 5), model.config.hidden_size)
    by_hand = copy.deepcopy(model)
    _, _, layers = decoder_layers(by_hand)
    for index in skip_set:
        layers[index] = HandBridge(bridges.weight[bridges.layers.index(index)], bridges.bias[bridges.layers.index(index)])
    config = SamplingConfig(temperature=0.0, max_new_tokens=10, min_new_tokens=0)
    prompts = ["2 + 3 =", "seven times six"]
    bridged = generate_rollouts(model, tokenizer, prompts, 2, config, skip_set, bridges=bridges)
    whole = generate_rollouts(by_hand, tokenizer, prompts, 2, config, ())
    removed = generate_rollouts(model, tokenizer, prompts, 2, config, skip_set)
    assert torch.equal(bridged.completion_ids, whole.completion_ids)
    torch.testing.assert_close(bridged.behavior_logprobs, whole.behavior_logprobs, atol=1e-5, rtol=1e-5)
    assert bridged.bridged and not removed.bridged
    assert not torch.allclose(bridged.behavior_logprobs, removed.behavior_logprobs, atol=1e-3)


def test_a_bridge_costs_its_d_squared_in_the_rollout_flops():
    model, _ = tiny_model("llama", num_layers=6)
    shapes = ModelShapes.of(model)
    prompts, completions = torch.tensor([5, 7]), torch.tensor([3, 4])
    removed = rollout_flops(shapes, (1, 2), prompts, completions)
    bridged = rollout_flops(shapes, (1, 2), prompts, completions, bridged=True)
    d = model.config.hidden_size
    assert bridged - removed == pytest.approx(2 * (d * d + d) * 2 * 19)
    assert rollout_flops(shapes, (), prompts, completions, bridged=True) == rollout_flops(shapes, (), prompts, completions)


def bridged_config(output_dir, **overrides):
    values = {"model": "tiny-llama", "dataset": "arithmetic", "output_dir": str(output_dir), "rft_steps": 2,
              "batch_size": 2, "micro_batch_size": 2, "grpo.num_generations": 2, "sampling.max_new_tokens": 6,
              "sampling.min_new_tokens": 0, "nesting.skip_ratio": 0.3, "sft.epochs": 0, "nesting.bridge": "linear"}
    return load_config(None, {**values, **overrides})


def test_a_bridged_run_calibrates_refits_and_logs_what_fitting_cost(tmp_path, monkeypatch):
    fits = []
    original = bridges_module.fit_bridges
    monkeypatch.setitem(bridges_module.BRIDGE_FITS, "linear", lambda *a, **k: fits.append(a[0].tokens.clone()) or original(*a, **k))
    summary = train(bridged_config(tmp_path / "run", rft_steps=3, **{"nesting.bridge_refit_steps": 2}))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(fits) == 2  # the calibration before step 1, then step 2's refit (not steps 1 and 3)
    assert 0 < fits[0][0] < 64 * 400  # the calibration read bridge_calibration (64) problems' tokens
    # step 2's refit: the calibration decayed twice (0.8^2), step 1's tokens once, step 2's (every prompt and
    # completion token of the update forward: tokens_processed)
    expected = 0.64 * fits[0][0] + 0.8 * rows[0]["tokens_processed"] + rows[1]["tokens_processed"]
    assert fits[1][0].item() == pytest.approx(expected.item())
    assert all(row["bridge_fit_flops"] > 0 and row["bridge_fit_time_s"] >= 0 for row in rows)
    assert rows[1]["bridge_fit_flops"] > rows[0]["bridge_fit_flops"]  # step 2 also solved the bridges
    assert summary["bridge_fit_flops"] > sum(row["bridge_fit_flops"] for row in rows)  # plus the calibration


def test_the_bridges_read_only_the_first_of_mu_passes(tmp_path, monkeypatch):
    recorded = []
    original = bridging_module.BridgeTraining.recording
    monkeypatch.setattr(bridging_module.BridgeTraining, "recording",
                        lambda self, *a: recorded.append(a) or original(self, *a))
    train(bridged_config(tmp_path / "run", rft_steps=1, micro_batch_size=4, **{"grpo.num_iterations": 2, "grpo.epsilon": 0.2}))
    assert len(recorded) == 1  # one micro-batch, first pass only


def test_a_bridged_run_through_the_compiled_engine_trains_as_through_the_eager_one(tmp_path, monkeypatch):
    """The trainer hands its bridges to the compiled engine (static buffers, tests/test_compiled_bridges.py): the
    same rollouts, behavior log-probs and updates as the eager engine's, step by step (traced by dynamo without
    Inductor, which tests/test_compiled_bridges.py covers)."""
    monkeypatch.setitem(choice.ENGINE_FACTORIES, "compiled", lambda: CompiledDecoder(backend="eager"))
    monkeypatch.setattr(choice, "_DECODERS", {})
    runs = {}
    for engine in ("eager", "compiled"):
        train(bridged_config(tmp_path / engine, rft_steps=3, **{"sampling.engine": engine,
                                                                "sampling.min_new_tokens": 6}),
              Task("tiny", list(PROBLEMS), reward=lowercase_share))  # a reward a random model earns now and then
        runs[engine] = [json.loads(line) for line in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
    for eager, compiled in zip(runs["eager"], runs["compiled"], strict=True):
        assert compiled["skip_set"] == eager["skip_set"] and compiled["reward_mean"] == eager["reward_mean"]
        for key in ("kl_behavior_target", "h_mean", "loss", "grad_norm"):
            assert compiled[key] == pytest.approx(eager[key], abs=1e-4), (eager["step"], key)
    assert any(row["grad_norm"] > 0 for row in runs["eager"]) and all(row["skip_set"] for row in runs["eager"])


def test_bridges_where_no_block_is_skipped_are_refused_as_doing_nothing():
    with pytest.raises(ConfigError, match=r"nesting\.bridge must be none while nesting\.skip_ratio = 0"):
        bridged_config("unused", **{"nesting.skip_ratio": 0.0})


@pytest.mark.parametrize("option, value, expected", [
    ("nesting.bridge", "cubic", "one of"), ("nesting.bridge_ridge", -1.0, ">= 0"),
    ("nesting.bridge_decay", 1.5, r"in \[0, 1\]"), ("nesting.bridge_refit_steps", 0, ">= 1"),
])
def test_bridge_options_are_checked_at_start_up(option, value, expected):
    with pytest.raises(ConfigError, match=rf"{option} must be {expected}"):
        load_config(None, {option: value})
