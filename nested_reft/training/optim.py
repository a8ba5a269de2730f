"""The optimizer and learning-rate schedules (those of `transformers.TrainingArguments`) that SFT and ReFT share.

One home so that `sft.lr_scheduler` and `grpo.lr_scheduler` mean the same thing: linear warm-up over
`warmup_steps`, then linear decay to 0, cosine decay to 0, or a constant rate. The factors are those of
transformers' `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` and
`get_constant_schedule_with_warmup` (warm-up step/w, so the first update of a warm-up runs at rate 0, as
there); they are written out here so that the configuration can name the schedules without importing
transformers.
"""

from __future__ import annotations

import math

import torch

from nested_reft.config import GRPOConfig

SHAPES = {  # the schedules config.SCHEDULERS names
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
            return step / warmup_steps
        return shape(min((step - warmup_steps) / decay, 1.0))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def make_optimizer(model: torch.nn.Module, config: GRPOConfig, total_steps: int):
    """AdamW with TrainingArguments' defaults (set in GRPOConfig) and `config.lr_scheduler` over the ReFT steps,
    on the parameters that train (all of them, or the LoRA adapters)."""
    optimizer = torch.optim.AdamW(
        trainable_parameters(model), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon, weight_decay=config.weight_decay,
    )
    warmup = int(config.warmup_ratio * total_steps)
    return optimizer, lr_scheduler(optimizer, config.lr_scheduler, total_steps, warmup)
