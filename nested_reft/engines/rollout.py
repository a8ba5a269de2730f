"""Rollouts: G sampled completions per prompt from a (nested) behavior model, with their log-probs.

The behavior log-prob of each sampled token is recorded while sampling, from the very logits the
sampler drew from, so the importance weights never need an extra forward pass of the behavior model.
Knows nothing of rewards. How the model runs while it samples is a decoding engine's business
(`nested_reft.engines.interface.Decoder`: eager, compiled with a static cache, or vLLM; `choice` picks one).
`rollout_speedup` is the one definition of how much faster a nested model samples than the full one, for the demo,
the probe and the benches.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nested_reft.config import SamplingConfig
from nested_reft.engines.choice import decoder_for
from nested_reft.engines.interface import Decoder, Samples
from nested_reft.models.lora import merged_for_sampling
from nested_reft.nesting.bridges import Bridges, nested_bridged
from nested_reft.nesting.layers import num_decoder_layers
from nested_reft.nesting.static_bridges import composed_bridges
from nested_reft.engines.logprobs import completion_logprobs


@dataclass
class Rollouts:
    """A batch of B prompts x G completions, in prompt-major order (completion i belongs to prompt i // G).

    prompt_ids, prompt_mask: (B*G, P) left-padded prompts; completion_ids, completion_mask,
    behavior_logprobs: (B*G, T) as in `Samples`; finished: (B*G,) bool, the completion ended with an EOS
    token rather than at `max_new_tokens` (TRL's `~is_truncated`); bridged: the skipped blocks ran their bridges.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    finished: torch.Tensor
    skip_set: tuple[int, ...]
    generation_time_s: float
    bridged: bool = False
    logprob_mismatch: tuple[float, float] | None = None  # `logprob_mismatch`, for an engine like vLLM

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_mask.sum())

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def seconds_per_token(self) -> float:
        """Generation time per generated token: what a speedup compares where completions' lengths differ."""
        return self.generation_time_s / max(self.completion_tokens, 1)


def generate_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_generations: int,
    sampling: SamplingConfig,
    skip_set: Sequence[int] = (),
    generator: torch.Generator | None = None,
    decoder: Decoder | None = None,
    bridges: Bridges | None = None,
) -> Rollouts:
    """Sample `num_generations` completions for each prompt from `model` with `skip_set` skipped.

    `prompts` are already templated text. The behavior model is the nested model
    nested(model, skip_set), each skipped block replaced by its bridge when `bridges` are given
    (`bridges.nested_bridged`); with an empty skip set it is the model itself (classical ReFT). `decoder` runs
    the model (`nested_reft.engines.interface.Decoder`); by default the process's decoder of `sampling.engine`
    (`choice.decoder_for`). LoRA adapters are merged for the sampling (`lora.merged_for_sampling`) unless
    `sampling.merge_adapters` is off.
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = encoded["input_ids"].repeat_interleave(num_generations, dim=0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(num_generations, dim=0)
    eos = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        start = _synchronized_clock(device)
        decoder = decoder or decoder_for(sampling.engine)
        outside = decoder.applies_skip_set  # vLLM: samples in its own copy of the model
        arguments = (prompt_ids, prompt_mask, sampling, eos, tokenizer.pad_token_id, generator)
        with merged_for_sampling(model) if sampling.merge_adapters else contextlib.nullcontext():
            if outside:
                samples = decoder.sample(model, *arguments, skip_set=skip_set, bridges=bridges)
            else:
                inside = decoder.applies_bridges  # compiled: the bridges composed into its static buffers, not hooks
                extra = ({"bridges": composed_bridges(bridges, skip_set, num_decoder_layers(model), device)}
                         if inside else {})
                with nested_bridged(model, skip_set, None if inside else bridges):
                    samples = decoder.sample(model, *arguments, **extra)
        elapsed = _synchronized_clock(device) - start
        mismatch = (logprob_mismatch(model, skip_set, prompt_ids, prompt_mask, samples, sampling, bridges)
                    if outside else None)
    finally:
        model.train(was_training)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=samples.tokens,
        completion_mask=samples.mask,
        behavior_logprobs=samples.logprobs,
        finished=ended_with_eos(samples.tokens, samples.mask, eos),
        skip_set=tuple(sorted(skip_set)),
        bridged=bridges is not None and len(skip_set) > 0,
        generation_time_s=elapsed,
        logprob_mismatch=mismatch,
    )


@torch.no_grad()
def logprob_mismatch(model: PreTrainedModel, skip_set: Sequence[int], prompt_ids: torch.Tensor,
                     prompt_mask: torch.Tensor, samples: Samples, sampling: SamplingConfig,
                     bridges: Bridges | None = None) -> tuple[float, float]:
    """(mean, max) |an engine's behavior log-prob - ours| over the sampled tokens, ours from one forward pass of
    nested(model, skip_set): the training-inference mismatch of an engine that samples outside our model, which
    TRL and verl monitor for theirs. Not timed as generation (it is a check, not part of sampling)."""
    with nested_bridged(model, skip_set, bridges):
        ours = completion_logprobs(model, prompt_ids, prompt_mask, samples.tokens, samples.mask, sampling.temperature)
    difference = (samples.logprobs - ours).abs()[samples.mask.bool()]
    if difference.numel() == 0:
        return 0.0, 0.0
    return float(difference.mean()), float(difference.max())


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the generation config's EOS ids, else the tokenizer's."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return [int(i) for i in ids if i is not None]


def ended_with_eos(tokens: torch.Tensor, mask: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """(N,) bool: row i's last generated token (mask 1) is an EOS token; False for an empty completion."""
    lengths = mask.sum(dim=1).long()
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    return (lengths > 0) & torch.isin(last, torch.tensor(eos, dtype=tokens.dtype, device=tokens.device))


def _synchronized_clock(device: torch.device) -> float:
    """Wall time, after the device's queued work is done (so GPU timings are real)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def rollout_speedup(pairs: Iterable[tuple[float, float]]) -> float:
    """The rollout speedup of a nested model over the full one: the median over pairs of t(full) / t(nested).

    A pair is (t(full), t(nested)): the full and the nested model timed on the same work back to back, the order
    alternating from pair to pair so that a machine slowing down favours neither side; the same prompts at a
    fixed length in seconds, or, where the completions' lengths differ, seconds per generated token
    (`Rollouts.seconds_per_token`). Pairs may differ in their work (another skip set, other completions).

    Why the median of per-pair ratios: a shared machine's speed drifts (a shared CPU's by 10-40% over hours,
    more than the effects measured) and jumps when other work starts. The two timings of one pair share the
    machine's state, so their ratio cancels it whatever the other pairs did; a ratio of medians or of summed
    rates compares timings of different moments and different work (the median full timing of one pair against
    the median nested timing of another), which only cancels the drift where every pair did the same work. The
    median rather than the mean of the ratios, so that a pair that a burst of load hit on one side moves the
    speedup no more than any other pair.
    """
    ratios = speedup_ratios(pairs)
    if not ratios:
        raise ValueError("a rollout speedup needs at least one pair of timings")
    return statistics.median(ratios)


def speedup_ratios(pairs: Iterable[tuple[float, float]]) -> list[float]:
    """t(full) / t(nested) of each pair of timings (`rollout_speedup`), in order: their spread beside the median."""
    ratios = []
    for full, nested_time in pairs:
        if not (full > 0 and nested_time > 0):
            raise ValueError(f"timings must be positive, got t(full) = {full} and t(nested) = {nested_time}")
        ratios.append(full / nested_time)
    return ratios
