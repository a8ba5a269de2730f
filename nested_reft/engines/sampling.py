"""Drawing the next token from a softmax: the min-length EOS ban, top-k, top-p, and an inverse-CDF draw.

Pure tensor functions shared by the engines that draw in our own loop (`eager` and `compiled`, through
`completions`), so that they differ in how they run the model, never in which distribution they draw from.
"""

from __future__ import annotations

import torch

from nested_reft.config import SamplingConfig


def draw(
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
        probs = top_p_filter(probs, config.top_p)
    return inverse_cdf_sample(probs, generator)


def top_p_filter(probs: torch.Tensor, top_p: float, candidates: int = 256) -> torch.Tensor:
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


def inverse_cdf_sample(weights: torch.Tensor, generator: torch.Generator | None, block: int = 256) -> torch.Tensor:
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
