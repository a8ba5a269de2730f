"""SFT warm-up (Algorithm 1, step 1): E_sft epochs of cross-entropy on (prompt, chain of thought).

The loss covers the completion tokens only (the solution and its end-of-turn token), not the prompt,
as in TRL's SFTTrainer with `completion_only_loss`. Batches of `batch_size` examples are reached by
accumulating micro-batches, and the loss is normalised by the completion tokens of the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from nested_reft.config import SFTConfig
from nested_reft.data import Problem
from nested_reft.optim import lr_scheduler, trainable_parameters
from nested_reft.policy import completion_logprobs
from nested_reft.prompts import build_prompt
from nested_reft.sharding import deferred_gradient_sync


@dataclass
class SFTBatch:
    """Tokenised examples: left-padded prompts (N, P) and right-padded solutions (N, T)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor


def sft_examples(problems: Sequence[Problem]) -> list[Problem]:
    """The problems that have a chain of thought to imitate."""
    return [problem for problem in problems if problem.solution]


def tokenize_examples(tokenizer, problems: Sequence[Problem], max_length: int, device) -> SFTBatch:
    """Prompt (chat template) and solution + EOS, truncated so that prompt + solution <= max_length."""
    prompts = [tokenizer(build_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    solutions = [
        tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in problems
    ]
    pairs = [(prompt[-max_length // 2 :], solution[: max_length - min(len(prompt), max_length // 2)])
             for prompt, solution in zip(prompts, solutions)]
    prompt_ids, prompt_mask = _pad([p for p, _ in pairs], tokenizer.pad_token_id, left=True)
    completion_ids, completion_mask = _pad([s for _, s in pairs], tokenizer.pad_token_id, left=False)
    return SFTBatch(*(t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)))


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def sft_loss(model, batch: SFTBatch, num_tokens: float) -> torch.Tensor:
    """Summed negative log-likelihood of the solution tokens, divided by the batch's token count."""
    logp = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    return -(logp * batch.completion_mask).sum() / max(num_tokens, 1.0)


@dataclass
class SFTStep:
    """One optimizer step of the warm-up, as written to sft_metrics.jsonl."""

    step: int
    epoch: int
    loss: float
    learning_rate: float  # the rate this step's update used


def sft_warmup(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: SFTConfig,
    micro_batch_size: int,
    seed: int,
    accelerator: Accelerator,
    on_step: Callable[[SFTStep], None] | None = None,
) -> list[float]:
    """Train `model` (prepared by `accelerator`) in place for `config.epochs` epochs; returns each step's loss.

    Every process takes its share of each batch (examples rank, rank + world, ...) and DDP averages the
    gradients, so a batch costs 1/world of its time per process and the update equals the one-process update.
    `on_step` sees each step as it ends (the trainer writes them to sft_metrics.jsonl). Optimizer and
    schedule are TRL SFTConfig's (AdamW, `config.lr_scheduler` without warm-up, gradient clipping at
    `config.max_grad_norm`), set in `SFTConfig`.
    """
    examples = sft_examples(problems)[: config.max_examples]
    if config.epochs == 0 or not examples:
        return []
    policy = accelerator.unwrap_model(model)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    scheduler = lr_scheduler(optimizer, config.lr_scheduler, steps)
    optimizer = accelerator.prepare_optimizer(optimizer)
    order = random.Random(seed)
    model.train()
    losses = []
    for epoch in range(1, config.epochs + 1):
        shuffled = list(examples)
        order.shuffle(shuffled)
        for start in range(0, len(shuffled), config.batch_size):
            batch = shuffled[start : start + config.batch_size]
            learning_rate = scheduler.get_last_lr()[0]
            losses.append(_sft_step(model, tokenizer, batch, config, micro_batch_size, accelerator))
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step:
                on_step(SFTStep(len(losses), epoch, losses[-1], learning_rate))
    model.eval()
    return losses


def _sft_step(model, tokenizer, batch: Sequence[Problem], config: SFTConfig, micro_batch_size: int, accelerator) -> float:
    """Accumulate this process's share of one batch's gradients over micro-batches; return the batch's loss.

    Each process divides its summed log-likelihood by the batch's token count over all processes / world, so
    DDP's average of the processes' gradients is the gradient of the whole batch's token mean. A process left
    without an example (a last batch smaller than the world) runs one with weight 0: DDP needs every process
    to take part in each synchronisation.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    share, weight = (batch[rank::world], 1.0) if batch[rank::world] else (batch[:1], 0.0)
    device = accelerator.device
    micro_batches = [
        tokenize_examples(tokenizer, share[i : i + micro_batch_size], config.max_length, device)
        for i in range(0, len(share), micro_batch_size)
    ]
    tokens = weight * float(sum(int(m.completion_mask.sum()) for m in micro_batches))
    num_tokens = accelerator.reduce(torch.tensor(tokens, device=device), reduction="sum").item() / world
    total = 0.0
    for index, micro_batch in enumerate(micro_batches):
        sync = contextlib.nullcontext() if index == len(micro_batches) - 1 else deferred_gradient_sync(model, accelerator)
        with sync:
            with accelerator.autocast():
                loss = weight * sft_loss(model, micro_batch, num_tokens)
            accelerator.backward(loss)
        total += loss.item()
    return accelerator.reduce(torch.tensor(total, device=device), reduction="mean").item()
