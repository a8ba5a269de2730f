"""The compiled engine: a static KV cache and one `torch.compile`d decode step (a CUDA graph on GPUs), with the
attention function that keeps its grouped-query attention packed (`packed_gqa_sdpa`). It samples as the eager
engine does (`completions`), only running the model otherwise."""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from transformers import AttentionInterface, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from nested_reft.config import SamplingConfig
from nested_reft.engines.completions import Completions, sync_every_for
from nested_reft.engines.interface import Samples


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

    applies_skip_set = False  # samples from the model it is handed: `generate_rollouts` nests it

    def __init__(self, backend: str = "inductor", mode: str | None = None, length_bucket: int = 64,
                 recompile_limit: int = 64, sync_every: int | None = None, max_caches: int = 2):
        self.length_bucket, self.sync_every, self.max_caches = length_bucket, sync_every, max_caches
        self.recompile_limit = recompile_limit
        self._decode_step = torch.compile(_decode_step, backend=backend, mode=mode)
        self._caches: collections.OrderedDict[tuple, StaticCache] = collections.OrderedDict()

    @torch.no_grad()
    def sample(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               config: SamplingConfig, eos_token_ids: Sequence[int], pad_token_id: int,
               generator: torch.Generator | None = None) -> Samples:
        """As `EagerDecoder.sample`, through the compiled decode step."""
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        sync_every = self.sync_every or sync_every_for(device)
        length = -(-(prompt_length + config.max_new_tokens) // self.length_bucket) * self.length_bucket
        cache = self._cache(model, batch, length)
        mask = torch.zeros((batch, length), dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_length] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        out = Completions(batch, config, eos_token_ids, pad_token_id, device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        position = position_ids[:, -1:]
        with packed_gqa_attention(model):  # once for the whole loop: the prefill above attended as transformers does
            while True:
                next_tokens, alive, finished = out.append(logits, slice(None), finished, generator)
                if out.full or (out.time_to_look(sync_every) and bool(finished.all())):
                    break
                mask[:, prompt_length + out.length - 1] = alive.to(mask.dtype)
                position = position + 1
                with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
                    logits = self._decode_step(model, next_tokens[:, None], mask, position, cache)
        return out.samples()

    def close(self) -> None:
        """Nothing to release: the compiled step and the static caches are memory, kept for the next run."""

    def _cache(self, model: PreTrainedModel, batch: int, length: int) -> StaticCache:
        """The static cache of this shape (the nested model's layer count included), emptied for reuse.

        At most `max_caches` are kept, the least recently used dropped first: an adaptive skip policy changes U
        from step to step, and each cache holds a whole batch's keys and values on the device (two: a policy
        that alternates between two sizes reuses both)."""
        config = model.config.get_text_config()
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        key = (config.num_hidden_layers, tuple(getattr(config, "layer_types", None) or ()), batch, length, dtype,
               device)
        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= self.max_caches:
                self._caches.popitem(last=False)
            cache = StaticCache(config=_full_attention_within(config, length), max_cache_len=length)
        else:
            cache.reset()
        self._caches[key] = cache
        return cache

    @property
    def live_caches(self) -> int:
        return len(self._caches)


def default_compiled_mode() -> str | None:
    """Inductor everywhere; on CUDA its decode step is also captured as a CUDA graph ("reduce-overhead")."""
    return "reduce-overhead" if torch.cuda.is_available() else None


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
