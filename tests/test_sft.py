"""The SFT warm-up: its options (TRL SFTConfig's defaults) are honoured and its steps are logged."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

import nested_reft.sft as sft
from nested_reft.config import SFTConfig, load_config
from nested_reft.arithmetic import generate_arithmetic
from nested_reft.models import TINY_NUM_LAYERS, TINY_SEED
from nested_reft.tasks import Task
from nested_reft.tiny import tiny_model
from nested_reft.rundir import SFT_METRICS_FILE
from nested_reft.trainer import train

PROBLEMS = generate_arithmetic(8, seed=1)


def warm_up(config: SFTConfig):
    """Run `sft_warmup` on a tiny llama; return (losses, the SFTStep records)."""
    model, tokenizer = tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED)
    steps = []
    losses = sft.sft_warmup(model, tokenizer, PROBLEMS, config, micro_batch_size=4, seed=0,
                            accelerator=Accelerator(cpu=True), on_step=steps.append)
    return losses, steps


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
    assert set(rows[0]) == {"step", "epoch", "loss", "learning_rate"} and rows[0]["loss"] > 0
