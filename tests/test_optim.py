"""The learning-rate schedules are transformers' own (warm-up included), and the configuration stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from nested_reft.training.optim import SHAPES, lr_scheduler

THEIRS = {
    "linear": transformers.get_linear_schedule_with_warmup,
    "cosine": transformers.get_cosine_schedule_with_warmup,
    "constant": lambda optimizer, warmup, total: transformers.get_constant_schedule_with_warmup(optimizer, warmup),
}


def rates(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_every_schedule_matches_transformers(name, warmup):
    total = 10
    ours = rates(lambda optimizer: lr_scheduler(optimizer, name, total, warmup), total)
    theirs = rates(lambda optimizer: THEIRS[name](optimizer, warmup, total), total)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_reading_a_config_does_not_import_transformers():
    code = ("import sys, nested_reft.config as c; c.load_config(None, {'grpo.beta': 0.1}); "
            "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
