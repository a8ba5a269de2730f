"""The SFT warm-up: its options (TRL SFTConfig's defaults) are honoured and its steps are logged; the nested-aware
options (sft.layer_drop, sft.distill_nested) compute what they say, checked against the nested model and a KL by
hand, and are off by default."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from accelerate import Accelerator

import nested_reft.training.sft as sft
from nested_reft.cli import build_parser, config_from_args
from nested_reft.config import ConfigError, NestingConfig, SFTConfig, load_config
from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.experiments.grid import enumerate_instances, instance_config, load_grid, sft_config
from nested_reft.models.loading import TINY_NUM_LAYERS, TINY_SEED
from nested_reft.tasks.task import Task
from nested_reft.models.tiny import tiny_model
from nested_reft.training.rundir import SFT_METRICS_FILE, SUMMARY_FILE
from nested_reft.training.metrics import ModelShapes, rollout_flops
from nested_reft.nesting.layers import draw_uniform, nested
from nested_reft.engines.logprobs import completion_logits, completion_logprobs
from nested_reft.store.seeding import step_generator
from nested_reft.training.startup import check_fits_model
from nested_reft.training.trainer import train

PROBLEMS = generate_arithmetic(8, seed=1)


def warm_up(config: SFTConfig, nesting: NestingConfig | None = None):
    """Run `sft_warmup` on a tiny llama; return (the losses, the SFTStep records `on_step` saw)."""
    model, tokenizer = tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED)
    steps = []
    records = sft.sft_warmup(model, tokenizer, PROBLEMS, config, micro_batch_size=4, seed=0,
                             accelerator=Accelerator(cpu=True), on_step=steps.append, nesting=nesting)
    assert records == steps
    return [record.loss for record in records], steps


def test_each_step_is_reported_with_its_epoch_and_rate():
    losses, steps = warm_up(SFTConfig(epochs=2, batch_size=4, learning_rate=1e-3, max_length=128))
    assert [s.step for s in steps] == [1, 2, 3, 4] and [s.epoch for s in steps] == [1, 1, 2, 2]
    assert [s.loss for s in steps] == losses and all(loss > 0 for loss in losses)
    # TRL SFTConfig's schedule: linear decay from the learning rate, no warm-up
    assert [s.learning_rate for s in steps] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_scheduler_clip_and_weight_decay_come_from_the_config(monkeypatch):
    clips, decays = [], []
    clip, adamw = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm, **kw: clips.append(norm) or clip(params, norm, **kw))
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: decays.append(k["weight_decay"]) or adamw(*a, **k))
    _, steps = warm_up(SFTConfig(epochs=1, batch_size=4, learning_rate=1e-3, max_length=128, lr_scheduler="constant",
                                 max_grad_norm=0.5, weight_decay=0.01))
    assert [s.learning_rate for s in steps] == [1e-3, 1e-3]
    assert clips == [0.5, 0.5] and decays == [0.01]


def test_a_run_writes_its_sft_losses_to_sft_metrics_jsonl(tmp_path):
    output = tmp_path / "run"
    overrides = {"model": "tiny-llama", "output_dir": str(output), "rft_steps": 0, "sft.epochs": 1,
                 "sft.batch_size": 4, "sft.max_length": 128, "micro_batch_size": 4}
    train(load_config(None, overrides), Task("tiny", list(PROBLEMS), reward=lambda completion, gold: 0.0))
    rows = [json.loads(line) for line in (output / SFT_METRICS_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert set(rows[0]) == {"step", "epoch", "loss", "learning_rate", "time_s", "flops"} and rows[0]["loss"] > 0
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["sft_flops"] == pytest.approx(sum(row["flops"] for row in rows)) and summary["sft_flops"] > 0
    assert summary["sft_runtime_s"] >= sum(row["time_s"] for row in rows) > 0


# ----------------------------------------------------------------------------------------------------------
# The nested-aware warm-up (issue 22)
# ----------------------------------------------------------------------------------------------------------


def tiny_batch():
    """A tiny llama of 6 layers in eval mode (no dropout noise) and one micro-batch of 3 examples."""
    model, tokenizer = tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED)
    model.eval()
    return model, sft.tokenize_examples(tokenizer, PROBLEMS[:3], 96, "cpu")


def paper_loss(model, batch, num_tokens: float) -> torch.Tensor:
    """The warm-up's loss before issue 22: summed NLL of the solution tokens over the batch's token count."""
    logp = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    return -(logp * batch.completion_mask).sum() / num_tokens


def test_by_default_the_warm_up_loss_is_the_papers_cross_entropy():
    model, batch = tiny_batch()
    warm_up = sft.NestedWarmUp.of(SFTConfig(), NestingConfig(skip_ratio=0.3), TINY_NUM_LAYERS)
    skip_set, distill_set = warm_up.skip_sets(0, 1, "0-0")
    assert skip_set == () and distill_set is None  # neither option is on: nothing is drawn
    loss, forwards = sft.sft_loss(model, batch, 50.0, skip_set, None)
    assert loss.item() == pytest.approx(paper_loss(model, batch, 50.0).item(), rel=1e-6)
    assert forwards == [sft.Forward((), True)]  # one forward with a gradient, as before


def test_layer_drop_runs_the_nested_model_of_a_skip_set_drawn_as_reft_draws_them():
    model, batch = tiny_batch()
    nesting = NestingConfig(skip_ratio=0.15, border=1)
    warm_up = sft.NestedWarmUp.of(SFTConfig(layer_drop=0.5), nesting, TINY_NUM_LAYERS)
    skip_set, distill_set = warm_up.skip_sets(0, 1, "0-0")
    assert distill_set is None
    # ReFT's uniform f_{x,b} at x = 0.5: U = 3 valid layers (border 1 of 6), from this micro-batch's own generator
    assert skip_set == draw_uniform(TINY_NUM_LAYERS, 3, 1, step_generator(0, 1, "sft-layer-drop-0-0"))
    assert warm_up.skip_sets(0, 1, "0-0") == (skip_set, None)  # reproducible
    assert len({warm_up.skip_sets(0, step, "0-0")[0] for step in range(1, 9)}) > 1  # re-drawn per micro-batch
    loss, forwards = sft.sft_loss(model, batch, 50.0, skip_set, None)
    with nested(model, skip_set):
        expected = paper_loss(model, batch, 50.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(loss.item() - paper_loss(model, batch, 50.0).item()) > 1e-3  # not the full model's loss
    assert forwards == [sft.Forward(skip_set, True)]


def test_layer_drop_draws_layers_as_the_runs_skip_policy_chooses_them():
    # kl_target draws its layers as kl_target_layers says, U at the warm-up's ratio (its upper bound)
    nesting = NestingConfig(skip_ratio=0.3, border=2, skip_policy="kl_target")
    warm_up = sft.NestedWarmUp.of(SFTConfig(layer_drop=0.3), nesting, TINY_NUM_LAYERS)
    assert warm_up.layer_drop.name == "uniform" and warm_up.layer_drop.max_count == 2
    assert {warm_up.skip_sets(0, step, "0-0")[0] for step in range(1, 6)} == {(2, 3)}  # border 2 of 6: layers 2, 3


def kl_by_hand(full_logits: torch.Tensor, nested_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """sum over the completion's tokens of sum_v p(v) log(p(v) / q(v)), one position at a time, in float64."""
    total = 0.0
    for row in range(mask.shape[0]):
        for position in range(mask.shape[1]):
            if not mask[row, position]:
                continue
            p = torch.softmax(full_logits[row, position].double(), dim=0)
            q = torch.softmax(nested_logits[row, position].double(), dim=0)
            total += sum(float(pv) * math.log(float(pv) / float(qv)) for pv, qv in zip(p, q))
    return total


def test_distill_nested_adds_alpha_times_the_kl_from_full_to_nested_computed_by_hand():
    model, batch = tiny_batch()
    warm_up = sft.NestedWarmUp.of(SFTConfig(distill_nested=0.3), NestingConfig(skip_ratio=0.3), TINY_NUM_LAYERS)
    skip_set, distill_set = warm_up.skip_sets(0, 1, "0-0")
    assert skip_set == () and len(distill_set) == 2  # x = nesting.skip_ratio: U = 2 of 6
    loss, forwards = sft.sft_loss(model, batch, 50.0, skip_set, (0.3, distill_set))
    inputs = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        full = completion_logits(model, *inputs)
        with nested(model, distill_set):
            nested_logits = completion_logits(model, *inputs)
    expected = paper_loss(model, batch, 50.0).item() + 0.3 * kl_by_hand(full, nested_logits, batch.completion_mask) / 50
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the second forward (nested, with a gradient) is counted; the teacher is the cross-entropy's own forward
    assert forwards == [sft.Forward((), True), sft.Forward(distill_set, True)]


def test_both_options_share_the_nested_forward_and_count_a_detached_full_one():
    model, batch = tiny_batch()
    warm_up = sft.NestedWarmUp.of(SFTConfig(layer_drop=0.5, distill_nested=1.0), NestingConfig(), TINY_NUM_LAYERS)
    skip_set, distill_set = warm_up.skip_sets(0, 1, "0-0")
    assert distill_set == skip_set and len(skip_set) == 3  # distill_ratio unset: sft.layer_drop's nested model
    _, forwards = sft.sft_loss(model, batch, 50.0, skip_set, (1.0, distill_set))
    assert forwards == [sft.Forward(skip_set, True), sft.Forward((), False)]
    shapes = ModelShapes.of(model)
    lengths = batch.prompt_mask.sum(-1), batch.completion_mask.sum(-1)
    assert sft.warm_up_flops(shapes, forwards, batch) == pytest.approx(
        3 * rollout_flops(shapes, skip_set, *lengths) + rollout_flops(shapes, (), *lengths))


def test_a_distilling_warm_up_costs_more_flops_than_the_plain_one():
    plain, plain_steps = warm_up(SFTConfig(epochs=1, batch_size=4, learning_rate=1e-3, max_length=128))
    options = dict(epochs=1, batch_size=4, learning_rate=1e-3, max_length=128, distill_nested=1.0)
    distilled, distilled_steps = warm_up(SFTConfig(**options), NestingConfig(skip_ratio=0.3))
    assert distilled[0] > plain[0]  # KL > 0 on the first step, from the same weights
    # the nested forward skips 2 of 6 blocks and carries a gradient: between 1 and 2 times the plain cost
    assert plain_steps[0].flops < distilled_steps[0].flops < 2 * plain_steps[0].flops
    assert all(step.time_s > 0 for step in distilled_steps)


def test_a_layer_drop_warm_up_draws_the_same_nested_models_every_time_it_runs():
    config = SFTConfig(epochs=1, batch_size=4, learning_rate=1e-3, max_length=128, layer_drop=0.5)
    first, _ = warm_up(config)
    again, _ = warm_up(config)
    plain, _ = warm_up(SFTConfig(epochs=1, batch_size=4, learning_rate=1e-3, max_length=128))
    assert first == again and first != plain  # seeded by (seed, step, micro-batch), not by what ran before


def test_distilling_without_a_nested_model_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match=r"sft\.distill_ratio"):
        load_config(None, {"sft.distill_nested": 0.5})  # x = 0 and no layer_drop: nothing to distil into
    with pytest.raises(ConfigError, match=r"sft\.distill_nested must be 0 while sft\.epochs = 0"):  # no warm-up:
        load_config(None, {"sft.distill_nested": 0.5, "sft.epochs": 0})  # it would do nothing (issue 33: 13)
    assert load_config(None, {"sft.distill_nested": 0.5, "sft.distill_ratio": 0.15}).sft.nested_ratio(0.0) == 0.15
    for option, value in (("sft.layer_drop", 1.0), ("sft.distill_nested", -1.0), ("sft.distill_ratio", 0.0)):
        with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
            load_config(None, {option: value})


def test_a_warm_up_ratio_the_border_cannot_give_is_refused_before_training():
    config = load_config(None, {"sft.layer_drop": 0.9, "nesting.border": 1})
    with pytest.raises(ConfigError, match=r"sft\.layer_drop=0\.9 skips 5"):
        check_fits_model(config, TINY_NUM_LAYERS, 1)
    with pytest.raises(ConfigError, match=r"sft\.layer_drop.*2 processes"):
        check_fits_model(load_config(None, {"sft.layer_drop": 0.3, "batch_size": 2}), TINY_NUM_LAYERS, 2)


def test_the_flags_of_train_and_sft_and_grid_files_reach_the_nested_warm_up_options(tmp_path):
    flags = ["--sft-layer-drop", "0.2", "--sft-distill-nested", "0.5", "--sft-distill-ratio", "0.1"]
    for command in ("train", "sft"):
        config = config_from_args(build_parser().parse_args([command, *flags]))
        assert (config.sft.layer_drop, config.sft.distill_nested, config.sft.distill_ratio) == (0.2, 0.5, 0.1)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "warm", "models": ["tiny-llama"], "datasets": ["arithmetic"], "skip_ratios": [0.2],
        "mitigations": ["retrace"], "train": {"sft": {"epochs": 1, "layer_drop": 0.15, "distill_nested": 0.5}},
        "eval": {"benchmarks": ["arithmetic"]}}))
    grid = load_grid(path)
    instance = enumerate_instances(grid)[0]
    assert (sft_config(grid, instance).sft.layer_drop, sft_config(grid, instance).sft.distill_nested) == (0.15, 0.5)
    assert instance_config(grid, instance).sft.epochs == 0  # the instances start from that warm-up's model
