"""SFT warm-up (Algorithm 1, step 1): E_sft epochs of cross-entropy on (prompt, chain of thought).

The loss covers the completion tokens only (the solution and its end-of-turn token), not the prompt,
as in TRL's SFTTrainer with `completion_only_loss`. Batches of `batch_size` examples are reached by
accumulating micro-batches, and the loss is normalised by the completion tokens of the whole batch.

Past the paper (issue 22), two options teach the nested models ReFT will sample from to agree with the full
model, both off by default (then the loss is the paper's cross-entropy, unchanged):
  sft.layer_drop      each micro-batch's cross-entropy runs on the nested model of a drawn skip set (LayerDrop);
  sft.distill_nested  the loss adds alpha * KL(full || nested) per completion token, the full model's distribution
                      detached (the teacher), the nested one from a second forward (the student).
Their skip sets come from the run's skip policy (`skip_policy.fixed_ratio_policy`: same border, same layer
choice), each from a generator seeded by (seed, step, micro-batch), so a warm-up draws the same sets every time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from nested_reft.config import NestingConfig, SFTConfig
from nested_reft.tasks.data import Problem
from nested_reft.training.metrics import ModelShapes, rollout_flops
from nested_reft.nesting.layers import nested, num_decoder_layers
from nested_reft.training.optim import lr_scheduler, trainable_parameters
from nested_reft.engines.logprobs import chosen_logprobs, completion_logits, kl_from_logits, training_backward
from nested_reft.tasks.prompts import build_prompt
from nested_reft.store.seeding import step_generator
from nested_reft.training.sharding import deferred_gradient_sync
from nested_reft.nesting.skip_policy import SkipPolicy, fixed_ratio_policy


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


@dataclass(frozen=True)
class Forward:
    """One forward pass of a warm-up micro-batch: the skip set it ran with, and whether it carried a gradient."""

    skip_set: tuple[int, ...]
    grad: bool


@dataclass(frozen=True)
class NestedWarmUp:
    """The warm-up's nested models: where their skip sets come from (None: that option is off) and alpha."""

    layer_drop: SkipPolicy | None
    distill: SkipPolicy | None
    alpha: float
    shared: bool  # distill_nested's nested model is layer_drop's (same ratio): one nested forward serves both

    @classmethod
    def of(cls, config: SFTConfig, nesting: NestingConfig, num_layers: int) -> NestedWarmUp:
        drop = fixed_ratio_policy(nesting, config.layer_drop, num_layers) if config.layer_drop else None
        ratio = config.nested_ratio(nesting.skip_ratio)
        shared = bool(config.layer_drop) and ratio == config.layer_drop
        distill = fixed_ratio_policy(nesting, ratio, num_layers) if config.distill_nested and not shared else None
        return cls(drop, distill, config.distill_nested, shared)

    def skip_sets(self, seed: int, step: int, micro_batch: str) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """(layer_drop's skip set, distill_nested's or None when off) of one micro-batch, named `micro_batch`
        within its step; each set from its own generator, so turning one option on leaves the other's draws."""
        drop = () if self.layer_drop is None else self.layer_drop.draw(
            step_generator(seed, step, f"sft-layer-drop-{micro_batch}"))
        if not self.alpha:
            return drop, None
        if self.shared:
            return drop, drop
        return drop, self.distill.draw(step_generator(seed, step, f"sft-distill-{micro_batch}"))


def sft_loss(model, batch: SFTBatch, num_tokens: float, skip_set: Sequence[int] = (),
             distill: tuple[float, Sequence[int]] | None = None, policy=None) -> tuple[torch.Tensor, list[Forward]]:
    """The micro-batch's loss over the batch's token count, and the forwards it ran.

    Summed negative log-likelihood of the solution tokens under the model with `skip_set` skipped (sft.layer_drop;
    none: the paper's warm-up), plus alpha * summed KL(full || nested) when `distill` = (alpha, the nested model's
    skip set). The full model's forward is the cross-entropy's when nothing is dropped; a nested model equal to the
    dropped one reuses its forward. `policy` is the unwrapped model when `model` is a DDP wrapper (nesting swaps the
    blocks of the module that owns them).
    """
    policy = model if policy is None else policy
    mask = batch.completion_mask
    logits = _logits(model, policy, batch, skip_set)
    loss = -(chosen_logprobs(logits, batch.completion_ids) * mask).sum() / max(num_tokens, 1.0)
    forwards = [Forward(tuple(skip_set), True)]
    if distill is None or not distill[0]:
        return loss, forwards
    alpha, nested_set = distill
    if skip_set:
        with torch.no_grad():
            full = _logits(model, policy, batch, ())
        forwards.append(Forward((), False))
    else:
        full = logits
    if tuple(nested_set) == tuple(skip_set):
        student = logits
    else:
        student = _logits(model, policy, batch, nested_set)
        forwards.append(Forward(tuple(nested_set), True))
    return loss + alpha * (kl_from_logits(full, student) * mask).sum() / max(num_tokens, 1.0), forwards


def _logits(model, policy, batch: SFTBatch, skip_set: Sequence[int]) -> torch.Tensor:
    with nested(policy, skip_set):
        return completion_logits(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                 batch.completion_mask)


def warm_up_flops(shapes: ModelShapes, forwards: Sequence[Forward], batch: SFTBatch) -> float:
    """Training FLOPs of a micro-batch's forwards: each forward's count as `rollout_flops` makes it for these
    tokens (a teacher-forced pass computes what sampling them computed), three times over for a forward with a
    gradient (the backward costs twice the forward: the 6N rule) and once for a detached one."""
    prompts, completions = batch.prompt_mask.sum(-1).cpu(), batch.completion_mask.sum(-1).cpu()
    return sum((3.0 if f.grad else 1.0) * rollout_flops(shapes, f.skip_set, prompts, completions) for f in forwards)


@dataclass
class SFTStep:
    """One optimizer step of the warm-up, as written to sft_metrics.jsonl."""

    step: int
    epoch: int
    loss: float
    learning_rate: float  # the rate this step's update used
    time_s: float = 0.0  # this process's wall time for the step (forwards, backwards, optimizer)
    flops: float = 0.0  # the step's training FLOPs over all processes (`warm_up_flops`)


def sft_warmup(
    model,
    tokenizer,
    problems: Sequence[Problem],
    config: SFTConfig,
    micro_batch_size: int,
    seed: int,
    accelerator: Accelerator,
    on_step: Callable[[SFTStep], None] | None = None,
    nesting: NestingConfig | None = None,
) -> list[SFTStep]:
    """Train `model` (prepared by `accelerator`) in place for `config.epochs` epochs; returns each step's record.

    Every process takes its share of each batch (examples rank, rank + world, ...) and DDP averages the
    gradients, so a batch costs 1/world of its time per process and the update equals the one-process update.
    `on_step` sees each step as it ends (the trainer writes them to sft_metrics.jsonl). Optimizer and
    schedule are TRL SFTConfig's (AdamW, `config.lr_scheduler` without warm-up, gradient clipping at
    `config.max_grad_norm`), set in `SFTConfig`; a non-finite loss or gradient stops it (FloatingPointError), as
    ReFT stops on non-finite updates. `nesting` is the run's (border, skip policy, skip ratio): the
    nested models of sft.layer_drop and sft.distill_nested are drawn as ReFT draws them.
    """
    examples = sft_examples(problems)[: config.max_examples]
    if config.epochs == 0 or not examples:
        return []
    policy = accelerator.unwrap_model(model)
    warm_up = NestedWarmUp.of(config, nesting or NestingConfig(), num_decoder_layers(policy))
    shapes = ModelShapes.of(policy)
    optimizer = torch.optim.AdamW(trainable_parameters(policy), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    scheduler = lr_scheduler(optimizer, config.lr_scheduler, steps)
    optimizer = accelerator.prepare_optimizer(optimizer)
    order = random.Random(seed)
    model.train()
    records = []
    for epoch in range(1, config.epochs + 1):
        shuffled = list(examples)
        order.shuffle(shuffled)
        for start in range(0, len(shuffled), config.batch_size):
            started = time.perf_counter()
            step = len(records) + 1
            batch = shuffled[start : start + config.batch_size]
            learning_rate = scheduler.get_last_lr()[0]
            draws = functools.partial(warm_up.skip_sets, seed, step)
            loss, flops = _sft_step(model, tokenizer, batch, config, micro_batch_size, accelerator, draws, shapes)
            norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            _check_finite(step, loss, norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            records.append(SFTStep(step, epoch, loss, learning_rate, time.perf_counter() - started, flops))
            if on_step:
                on_step(records[-1])
    model.eval()
    return records


def _check_finite(step: int, loss: float, norm) -> None:
    """Stop the warm-up (FloatingPointError) at a step whose loss or gradient norm is not finite, before its update:
    one such update makes every weight NaN, and the warm-up's model would be saved and trained from. Both values
    are the same on every process (reduced), so every rank stops alike."""
    norm = None if norm is None else float(norm)
    if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
        raise FloatingPointError(f"SFT warm-up step {step}: the loss ({loss:g}) or the gradient norm ({norm:g}) is not "
                                 "finite; the warm-up stopped before its update, nothing was saved (lower "
                                 "sft.learning_rate or sft.distill_nested)")


def _sft_step(model, tokenizer, batch: Sequence[Problem], config: SFTConfig, micro_batch_size: int, accelerator,
              draws: Callable[[str], tuple], shapes: ModelShapes) -> tuple[float, float]:
    """Accumulate this process's share of one batch's gradients over micro-batches; return the batch's loss and
    training FLOPs (over all processes). `draws(name)` gives the skip sets of the micro-batch named
    "<rank>-<index>" (`NestedWarmUp.skip_sets` at this step).

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
    policy = accelerator.unwrap_model(model)
    total, flops = 0.0, 0.0
    for index, micro_batch in enumerate(micro_batches):
        sync = contextlib.nullcontext() if index == len(micro_batches) - 1 else deferred_gradient_sync(model, accelerator)
        skip_set, distill_set = draws(f"{rank}-{index}")
        distill = None if distill_set is None else (config.distill_nested, distill_set)
        with sync:
            with accelerator.autocast():
                loss, forwards = sft_loss(model, micro_batch, num_tokens, skip_set, distill, policy)
                loss = weight * loss
            training_backward(accelerator, loss)
        total += loss.item()
        flops += weight * warm_up_flops(shapes, forwards, micro_batch)
    summed = accelerator.reduce(torch.tensor([total, flops], dtype=torch.float64, device=device), reduction="sum")
    return summed[0].item() / world, summed[1].item()
