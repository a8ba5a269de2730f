"""The learning-rate schedules of `transformers.TrainingArguments` that SFT and ReFT share.

One home so that `sft.lr_scheduler` and `grpo.lr_scheduler` mean the same thing: linear warm-up over
`warmup_steps`, then linear decay to 0, cosine decay to 0, or a constant rate.
"""

from __future__ import annotations

import math

import torch

SHAPES = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
}


def lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR multiplying the optimizer's rate by the `name` schedule over `total_steps` updates."""
    shape = SHAPES[name]
    decay = max(total_steps - warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return shape(min((step - warmup_steps) / decay, 1.0))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
