"""Rollouts: G sampled completions per prompt from a (nested) behavior model, with their log-probs.

The behavior log-prob of each sampled token is recorded while sampling, from the very logits the
sampler drew from, so the importance weights never need an extra forward pass of the behavior model.
Knows nothing of rewards. The sampler is a plain KV-cached decoding loop over `model(...)`: it is what
`generate` does for a decoder-only model, minus the generality we do not need, which makes it at least
as fast as `generate` and lets us read the log-probs on the way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from nested_reft.config import SamplingConfig
from nested_reft.nesting import nested


@dataclass
class Samples:
    """What the sampler returns for a batch of N sequences of T new tokens.

    tokens: (N, T) long, pad after a sequence ends; mask: (N, T) 1 for generated tokens (the EOS
    included), 0 after; logprobs: (N, T) float32 log-probs of `tokens` under the sampling model's
    temperature-scaled softmax (before top-k/top-p/min-length filtering), 0 where mask is 0.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor


@dataclass
class Rollouts:
    """A batch of B prompts x G completions, in prompt-major order (completion i belongs to prompt i // G).

    prompt_ids, prompt_mask: (B*G, P) left-padded prompts; completion_ids, completion_mask,
    behavior_logprobs: (B*G, T) as in `Samples`.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    num_generations: int
    skip_set: tuple[int, ...]
    generation_time_s: float

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_mask.sum())

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(self.generation_time_s, 1e-9)


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: SamplingConfig,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Samples:
    """Decode up to `config.max_new_tokens` tokens for left-padded `input_ids` (N, P) with a KV cache.

    Rows that have ended (EOS, past `min_new_tokens`) leave the batch once a quarter of it has ended: their
    KV cache rows are dropped, so a batch is not decoded at full width for a few long completions (evaluation
    stops at EOS; ReFT with min = max never drops a row). `rows` maps the working batch to the output rows.
    """
    batch = input_ids.shape[0]
    device = input_ids.device
    eos = torch.tensor(list(eos_token_ids), device=device)
    cache = DynamicCache(config=model.config.get_text_config())
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    tokens = torch.full((batch, config.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    masks = torch.zeros((batch, config.max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, config.max_new_tokens), dtype=torch.float32, device=device)
    for step in range(config.max_new_tokens):
        scaled = logits.float() if config.temperature in (0, 1) else logits.float() / config.temperature
        probs = torch.softmax(scaled, dim=-1)
        next_tokens = _draw(probs, config, eos if step < config.min_new_tokens else None, generator)
        # log of the drawn token's float32 probability: its log-softmax to ~1e-7 (rounding) whenever it is above
        # 1e-38 (a rarer token is drawn with odds below that), and one pass over the vocabulary cheaper
        drawn_logprobs = probs.gather(-1, next_tokens[:, None]).squeeze(-1).log()
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        alive = ~finished
        tokens[rows, step], masks[rows, step], logprobs[rows, step] = next_tokens, alive.long(), drawn_logprobs * alive
        finished = finished | torch.isin(next_tokens, eos)
        length = step + 1
        if length == config.max_new_tokens:
            break
        if length >= config.min_new_tokens:  # no EOS before min_new_tokens, so no need to ask (a GPU would wait)
            ended = int(finished.sum())
            if ended == len(finished):
                break
            if 4 * ended >= len(finished):
                keep = torch.nonzero(~finished).squeeze(-1)
                cache.batch_select_indices(keep)
                rows, next_tokens, finished, alive = rows[keep], next_tokens[keep], finished[keep], alive[keep]
                attention_mask, position_ids = attention_mask[keep], position_ids[keep]
        attention_mask = torch.cat([attention_mask, alive[:, None].to(attention_mask.dtype)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        logits = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
    logprobs = logprobs[:, :length]
    if not bool(torch.isfinite(logprobs).all()):  # one check per batch, not a device sync per token
        raise FloatingPointError("the model's logits became NaN or infinite while sampling: its weights diverged")
    return Samples(tokens[:, :length], masks[:, :length], logprobs)


def _draw(
    probs: torch.Tensor,
    config: SamplingConfig,
    banned: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row from the temperature-scaled softmax `probs`, after min-length, top-k and top-p filtering.

    Filters probabilities rather than a copy of the logits followed by a second softmax: filtering zeroes
    probabilities, and the draw does not need them normalised. The `banned` tokens are zeroed in `probs`
    itself; they are never drawn, so the drawn tokens' probabilities stay exactly as the softmax gave them.
    """
    if banned is not None:
        probs[:, banned] = 0.0  # min_new_tokens: no EOS before the minimum length
    if config.temperature == 0:
        return probs.argmax(dim=-1)
    if config.top_k:
        kth = torch.topk(probs, min(config.top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if config.top_p < 1.0:
        probs = _top_p_filter(probs, config.top_p)
    return _inverse_cdf_sample(probs, generator)


def _top_p_filter(probs: torch.Tensor, top_p: float, candidates: int = 256) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (nucleus sampling).

    The nucleus is looked for among each row's `candidates` most likely tokens first (a top-k, a tenth of the
    time of sorting a 49k vocabulary at batch 32 on a CPU core, where the sort took longer than the model's
    forward); only rows whose candidates hold less than `top_p` of the mass are sorted whole.
    """
    top, index = torch.topk(probs, min(candidates, probs.shape[-1]), dim=-1)
    total = probs.sum(dim=-1, keepdim=True)
    covered = top.sum(dim=-1) >= top_p * total.squeeze(-1)  # past the candidates, every token would be dropped
    keep = (top.cumsum(dim=-1) - top) < top_p * total  # the mass before the token is not yet enough
    filtered = torch.zeros_like(probs).scatter_(-1, index, top * keep)
    if bool(covered.all()):
        return filtered
    rest = ~covered
    filtered[rest] = _top_p_by_sorting(probs[rest], top_p)
    return filtered


def _top_p_by_sorting(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering over the whole sorted vocabulary."""
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token is enough
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


def _inverse_cdf_sample(weights: torch.Tensor, generator: torch.Generator | None, block: int = 256) -> torch.Tensor:
    """One index per row, drawn with probability proportional to `weights` (>= 0, a positive sum per row).

    The same distribution as `torch.multinomial(weights, 1)`, which on CPU draws one exponential variate per
    vocabulary entry (a sixth of a SmolLM2 decoding step at batch 32). This draws one uniform per row and
    inverts the cumulative sum in two levels, in float64 so that 150k-token vocabularies keep exact tails:
    first over the sums of `block` consecutive entries, then within the one block the draw fell in, rather
    than one sequential cumulative sum over the whole vocabulary per row.
    """
    rows, vocab = weights.shape
    weights = weights.contiguous()
    full_blocks = weights.as_strided((rows, vocab // block, block), (weights.stride(0), block, 1))  # a view
    short_block = weights[:, full_blocks.shape[1] * block :].sum(-1, keepdim=True)
    # a float32 sum is exact to ~1e-7 of its own block's mass, so rare blocks keep their odds (a float32
    # cumulative sum would not: near 1 it cannot resolve a token below 6e-8); the cdf itself is float64
    block_cdf = torch.cat([full_blocks.sum(-1), short_block], dim=-1).double().cumsum(-1)
    uniform = torch.rand(rows, 1, dtype=torch.float64, device=weights.device, generator=generator)
    target = uniform * block_cdf[:, -1:]  # < the total: u <= 1 - 2**-53 and the product rounds to nearest
    chosen = _first_exceeding(block_cdf, target)  # a block of positive mass: its cdf exceeds the one before
    mass_before = torch.where(chosen > 0, block_cdf.gather(-1, (chosen - 1).clamp_(min=0)), 0.0)
    positions = chosen * block + torch.arange(block, device=weights.device)
    in_vocab = positions < vocab  # the last block may be short
    entries = weights.gather(-1, positions.clamp(max=vocab - 1)).double() * in_vocab
    within_cdf = entries.cumsum(-1)
    index = _first_exceeding(within_cdf, target - mass_before)
    # rounding can leave the residual at or past the block's own total: take its last positive entry then
    last_positive = torch.searchsorted(within_cdf, within_cdf[:, -1:].contiguous())
    return (chosen * block + torch.minimum(index, last_positive)).squeeze(-1).clamp_(max=vocab - 1)


def _first_exceeding(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative value exceeds `target` (rows, 1); NaN searches past the end,
    so it is clamped to the last index and `sample` reports the non-finite logits."""
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)


def generate_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_generations: int,
    sampling: SamplingConfig,
    skip_set: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Rollouts:
    """Sample `num_generations` completions for each prompt from `model` with `skip_set` skipped.

    `prompts` are already templated text. The behavior model is the nested model
    nested(model, skip_set); with an empty skip set it is the model itself (classical ReFT).
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = encoded["input_ids"].repeat_interleave(num_generations, dim=0)
    prompt_mask = encoded["attention_mask"].repeat_interleave(num_generations, dim=0)
    was_training = model.training
    model.eval()
    try:
        start = _synchronized_clock(device)
        with nested(model, skip_set):
            samples = sample(
                model, prompt_ids, prompt_mask, sampling, eos_token_ids(model, tokenizer), tokenizer.pad_token_id,
                generator,
            )
        elapsed = _synchronized_clock(device) - start
    finally:
        model.train(was_training)
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=samples.tokens,
        completion_mask=samples.mask,
        behavior_logprobs=samples.logprobs,
        num_generations=num_generations,
        skip_set=tuple(sorted(skip_set)),
        generation_time_s=elapsed,
    )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the generation config's EOS ids, else the tokenizer's."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return [int(i) for i in ids if i is not None]


def _synchronized_clock(device: torch.device) -> float:
    """Wall time, after the device's queued work is done (so GPU timings are real)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
