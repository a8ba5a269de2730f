"""The compiled engine: a static KV cache and one `torch.compile`d decode step (a CUDA graph on GPUs), with the
attention function that keeps its grouped-query attention packed (`packed_gqa_sdpa`) and the bridges in static
buffers (`nesting.static_bridges`). It samples as the eager engine does (`completions`), only running the model
otherwise."""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from transformers import AttentionInterface, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from nested_reft.config import SamplingConfig
from nested_reft.engines.completions import Completions, sync_every_for
from nested_reft.engines.interface import Samples
from nested_reft.nesting.static_bridges import ComposedBridges, StaticBridges, statically_bridged


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

    Bridged nested models (`nesting.bridge: linear`) run their bridges from static buffers (`StaticBridges`: a map
    per position of the nested model, one set per size kept like the caches), each run of adjacent skipped blocks
    composed into one map and copied in place for each skip set: a new skip set of the same size reads the same
    buffers, so it does not recompile either (and on CUDA the bridges' addresses stay those the graph was captured
    with).

    Hybrid-attention models (Gemma2's sliding and full layers) compile one graph per sequence of kept layer
    types; `recompile_limit` bounds the graphs per decode step (dynamo's default, 8, would silently fall back
    to eager decoding past it).
    """

    applies_skip_set = False  # samples from the model it is handed: `generate_rollouts` nests it
    applies_bridges = True  # ... and hands it the skip set's bridges, composed (hooks would recompile per skip set)

    def __init__(self, backend: str = "inductor", mode: str | None = None, length_bucket: int = 64,
                 recompile_limit: int = 64, sync_every: int | None = None, max_caches: int = 2):
        self.length_bucket, self.sync_every, self.max_caches = length_bucket, sync_every, max_caches
        self.recompile_limit = recompile_limit
        self._decode_step = torch.compile(_decode_step, backend=backend, mode=mode)
        self._caches: collections.OrderedDict[tuple, StaticCache] = collections.OrderedDict()
        self._bridges: collections.OrderedDict[tuple, StaticBridges] = collections.OrderedDict()

    @torch.no_grad()
    def sample(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               config: SamplingConfig, eos_token_ids: Sequence[int], pad_token_id: int,
               generator: torch.Generator | None = None, bridges: ComposedBridges | None = None) -> Samples:
        """As `EagerDecoder.sample`, through the compiled decode step; with `bridges`, the nested `model`'s
        (`static_bridges.composed_bridges`), run before the kept blocks they precede."""
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        sync_every = self.sync_every or sync_every_for(device)
        length = -(-(prompt_length + config.max_new_tokens) // self.length_bucket) * self.length_bucket
        cache = self._cache(model, batch, length)
        mask = torch.zeros((batch, length), dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_length] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self._bridged(model, bridges):
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
            out = Completions(batch, config, eos_token_ids, pad_token_id, device)
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            position = position_ids[:, -1:]
            with packed_gqa_attention(model):  # once for the loop: the prefill above attended as transformers does
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
        cache = self._caches.get(key)
        if cache is not None:
            cache.reset()
        return _recently_used(self._caches, key, self.max_caches,
                              lambda: StaticCache(config=_full_attention_within(config, length), max_cache_len=length))

    def _bridged(self, model: PreTrainedModel, bridges: ComposedBridges | None) -> contextlib.AbstractContextManager:
        """The nested `model` behind `bridges`, from the static buffers of their size (at most `max_caches` sizes
        kept, as the caches: U changes with an adaptive policy), filled in place; as it is without bridges."""
        if bridges is None:
            return contextlib.nullcontext()
        parameter = next(model.parameters())
        hidden_size = bridges.weight.shape[-1]
        key = (bridges.num_positions, hidden_size, parameter.dtype, parameter.device)
        static = _recently_used(self._bridges, key, self.max_caches, lambda: StaticBridges(
            bridges.num_positions, hidden_size, parameter.dtype, parameter.device))
        static.fill(bridges)
        return statically_bridged(model, static)

    @property
    def live_caches(self) -> int:
        return len(self._caches)


_Kept = TypeVar("_Kept")


def _recently_used(store: collections.OrderedDict[tuple, _Kept], key: tuple, limit: int,
                   make: Callable[[], _Kept]) -> _Kept:
    """`store[key]`, made by `make` if absent, now the most recently used; at most `limit` entries are kept, the
    least recently used dropped first."""
    value = store.pop(key, None)
    if value is None:
        while len(store) >= limit:
            store.popitem(last=False)
        value = make()
    store[key] = value
    return value


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
