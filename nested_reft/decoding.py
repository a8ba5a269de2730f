"""Decoding engines: a batch of left-padded prompts in, completions and their behavior log-probs out.

The behavior log-prob of each sampled token is recorded while sampling, from the very logits the sampler
drew from, so the importance weights never need an extra forward pass of the behavior model. Engines:

  eager     a plain KV-cached loop over `model(...)` with a growing (dynamic) cache: what `generate` does
            for a decoder-only model, minus the generality we do not need; finished rows leave the batch.
  compiled  a static KV cache and one `torch.compile`d decode step (a CUDA graph on GPUs), see
            `CompiledDecoder`.

Both draw with `sampling.draw`, so they sample the same distributions.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from nested_reft.config import SamplingConfig
from nested_reft.sampling import draw


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


@torch.no_grad()
def eager_sample(
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
        next_tokens, drawn_logprobs = _draw_next(logits, config, eos if step < config.min_new_tokens else None,
                                                 generator)
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
    return _checked(Samples(tokens[:, :length], masks[:, :length], logprobs[:, :length]))


def _draw_next(logits: torch.Tensor, config: SamplingConfig, banned: torch.Tensor | None,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row from the last logits (N, V), and its float32 log-prob."""
    scaled = logits.float() if config.temperature in (0, 1) else logits.float() / config.temperature
    probs = torch.softmax(scaled, dim=-1)
    tokens = draw(probs, config, banned, generator)
    # log of the drawn token's float32 probability: its log-softmax to ~1e-7 (rounding) whenever it is above
    # 1e-38 (a rarer token is drawn with odds below that), and one pass over the vocabulary cheaper
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def _checked(samples: Samples) -> Samples:
    """`samples`, once its log-probs are known finite (one check per batch, not a device sync per token)."""
    if not bool(torch.isfinite(samples.logprobs).all()):
        raise FloatingPointError("the model's logits became NaN or infinite while sampling: its weights diverged")
    return samples


class CompiledDecoder:
    """A static KV cache and one `torch.compile`d decode step: one graph instead of hundreds of small kernels
    launched from Python per token (what makes eager decoding launch-bound on a GPU); on CUDA,
    `mode="reduce-overhead"` also captures it as a CUDA graph.

    The cache is sized for the nested model (its N - U layers, the batch, the prompt plus the new tokens,
    rounded up to `length_bucket` so that prompts of other lengths reuse the graph) and kept between calls of
    the same shape. A new skip set of the same size does not recompile: inside `nested` the kept blocks are
    renumbered 0..K-1, so the graph sees the same module structure, and their weights are graph inputs, not
    constants. The prompt is prefilled eagerly (its length varies); rows are not dropped when they end (the
    shapes are static), and a completion past its end is masked as in the eager engine.

    Hybrid-attention models (Gemma2's sliding and full layers) compile one graph per sequence of kept layer
    types; `recompile_limit` bounds the graphs per decode step (dynamo's default, 8, would silently fall back
    to eager decoding past it).
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, length_bucket: int = 64,
                 recompile_limit: int = 64):
        self.length_bucket = length_bucket
        self.recompile_limit = recompile_limit
        self._decode_step = torch.compile(_decode_step, backend=backend, mode=mode)
        self._caches: dict[tuple, StaticCache] = {}

    @torch.no_grad()
    def sample(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        config: SamplingConfig,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        generator: torch.Generator | None = None,
    ) -> Samples:
        """As `eager_sample`, through the compiled decode step."""
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        length = -(-(prompt_length + config.max_new_tokens) // self.length_bucket) * self.length_bucket
        cache = self._cache(model, batch, length)
        mask = torch.zeros((batch, length), dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_length] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        eos = torch.tensor(list(eos_token_ids), device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens = torch.full((batch, config.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        masks = torch.zeros((batch, config.max_new_tokens), dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, config.max_new_tokens), dtype=torch.float32, device=device)
        position = position_ids[:, -1:]
        with packed_gqa_attention(model):  # once for the whole loop: the prefill above attended as transformers does
            for step in range(config.max_new_tokens):
                next_tokens, drawn_logprobs = _draw_next(logits, config, eos if step < config.min_new_tokens else None,
                                                         generator)
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
                alive = ~finished
                tokens[:, step], masks[:, step], logprobs[:, step] = next_tokens, alive.long(), drawn_logprobs * alive
                finished = finished | torch.isin(next_tokens, eos)
                if step + 1 == config.max_new_tokens or (step + 1 >= config.min_new_tokens and bool(finished.all())):
                    break
                mask[:, prompt_length + step] = alive.to(mask.dtype)
                position = position + 1
                with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
                    logits = self._decode_step(model, next_tokens[:, None], mask, position, cache)
        return _checked(Samples(tokens[:, : step + 1], masks[:, : step + 1], logprobs[:, : step + 1]))

    def _cache(self, model: PreTrainedModel, batch: int, length: int) -> StaticCache:
        """The static cache of this shape (the nested model's layer count included), emptied for reuse."""
        config = model.config.get_text_config()
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        key = (config.num_hidden_layers, tuple(getattr(config, "layer_types", None) or ()), batch, length, dtype,
               device)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = StaticCache(config=_full_attention_within(config, length), max_cache_len=length)
        else:
            cache.reset()
        return cache


def _full_attention_within(config, length: int):
    """The config the cache is built from: sliding-window layers become full-attention ones when every
    sequence fits in the window, where the two attend alike. The sliding cache's write position is a Python
    int that the compiled step would specialise on, recompiling at every token (Gemma2's sliding layers)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types or window is None or length > window:
        return config
    full = copy.copy(config)
    full.layer_types = ["full_attention" if kind == "sliding_attention" else kind for kind in types]
    return full


PACKED_GQA = "nested_reft_packed_gqa_sdpa"


def packed_gqa_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, with one query token per row and grouped key/value heads computed on the
    key/value heads as stored: the group's query heads become that head's queries (transformers' `pack_gqa`).

    transformers packs so in eager decoding only; under torch.compile it expands the cache to every query head
    instead (`repeat_kv`), a copy of each layer's whole static K/V cache at every step, which made the compiled
    engine slower than the eager one on CPU (docs/benchmarks.md, bench/profile_decode.py). Anything else (a
    prompt, no grouping, a per-head mask, a position bias) goes to transformers' own function.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if groups == 1 or length != 1 or per_head_mask or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    output = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, dropout_p=dropout,
        scale=scaling,
    )
    return output.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_GQA, packed_gqa_sdpa)
AttentionMaskInterface.register(PACKED_GQA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def packed_gqa_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run a model that attends with sdpa through `packed_gqa_sdpa` inside the block (others as they are)."""
    config = model.config
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = PACKED_GQA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def _decode_step(model, tokens: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """One token per row through the model: the function `CompiledDecoder` compiles."""
    return model(input_ids=tokens, attention_mask=mask, position_ids=position_ids, cache=cache,
                 use_cache=True).logits[:, -1]


class EagerDecoder:
    """The eager engine behind the decoder interface (`eager_sample`)."""

    def sample(self, *args, **kwargs) -> Samples:
        return eager_sample(*args, **kwargs)


_DECODERS: dict[str, EagerDecoder | CompiledDecoder] = {}


def decoder_for(engine: str) -> EagerDecoder | CompiledDecoder:
    """The process's decoder of `engine` (config.ENGINES), made on first use: a compiled decoder keeps its
    compiled step and static caches for every later rollout of the run."""
    if engine not in _DECODERS:
        factories = {"eager": EagerDecoder, "compiled": _default_compiled}
        if engine not in factories:
            raise ValueError(f"unknown decoding engine {engine!r}; expected one of {tuple(factories)}")
        _DECODERS[engine] = factories[engine]()
    return _DECODERS[engine]


def _default_compiled() -> CompiledDecoder:
    """Inductor everywhere; on CUDA its decode step is also captured as a CUDA graph ("reduce-overhead")."""
    return CompiledDecoder(mode="reduce-overhead" if torch.cuda.is_available() else None)
