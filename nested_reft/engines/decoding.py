"""Decoding engines: a batch of left-padded prompts in, completions and their behavior log-probs out.

The behavior log-prob of each sampled token is recorded while sampling, from the very logits the sampler
drew from, so the importance weights never need an extra forward pass of the behavior model. Engines:

  eager     a plain KV-cached loop over `model(...)` with a growing (dynamic) cache: what `generate` does
            for a decoder-only model, minus the generality we do not need; finished rows leave the batch
            (`EagerDecoder`).
  compiled  a static KV cache and one `torch.compile`d decode step (a CUDA graph on GPUs), see
            `CompiledDecoder`.

Both draw with `sampling.draw`, so they sample the same distributions.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from nested_reft.config import SamplingConfig
from nested_reft.engines.sampling import draw


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


SYNC_EVERY = {"cpu": 1, "cuda": 8}  # tokens between looks at which rows have ended, per device type (below)


def sync_every_for(device: torch.device) -> int:
    """How often a decoder asks the device which rows have ended (a host sync): on a CPU every token, where it
    costs nothing and lets finished rows leave the batch at once (every 8 took 1.076x as long, SmolLM2); on a
    GPU every 8 tokens, so that the host keeps queueing kernels (a sync per token cost an H200 12% of an
    evaluation batch). bench/host_sync.py measures both; docs/benchmarks.md."""
    return SYNC_EVERY.get(device.type, SYNC_EVERY["cuda"])


class _Completions:
    """The output of a batch being decoded, one token per `append`: tokens, masks and behavior log-probs, and
    which rows have ended. Shared by both engines: the per-token sampling and bookkeeping is one code path."""

    def __init__(self, batch: int, config: SamplingConfig, eos_token_ids: Sequence[int], pad_token_id: int,
                 device: torch.device):
        self.config, self.pad_token_id, self.length = config, pad_token_id, 0
        self.eos = torch.tensor(list(eos_token_ids), device=device)
        self.tokens = torch.full((batch, config.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.masks = torch.zeros((batch, config.max_new_tokens), dtype=torch.long, device=device)
        self.logprobs = torch.zeros((batch, config.max_new_tokens), dtype=torch.float32, device=device)

    def append(self, logits: torch.Tensor, rows, finished: torch.Tensor, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw the next token of the working rows `rows` (a slice or index tensor of output rows) from their last
        logits (n, V); returns (next tokens, alive before this token, finished after it)."""
        banned = self.eos if self.length < self.config.min_new_tokens else None
        next_tokens, drawn_logprobs = _draw_next(logits, self.config, banned, generator)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, self.pad_token_id), next_tokens)
        alive = ~finished
        step = self.length
        self.tokens[rows, step], self.masks[rows, step] = next_tokens, alive.long()
        self.logprobs[rows, step] = drawn_logprobs * alive
        self.length += 1
        return next_tokens, alive, finished | torch.isin(next_tokens, self.eos)

    @property
    def full(self) -> bool:
        return self.length == self.config.max_new_tokens

    def time_to_look(self, sync_every: int) -> bool:
        """Whether to read `finished` on the host now: never before `min_new_tokens` (no EOS can have been drawn),
        then every `sync_every` tokens."""
        past = self.length - self.config.min_new_tokens
        return past >= 0 and past % sync_every == 0

    def samples(self) -> Samples:
        """The completions, cut after the last column any row generated in (rows that all ended between two
        looks leave padding columns behind), once their log-probs are known finite."""
        generated = torch.nonzero(self.masks[:, : self.length].any(dim=0))
        width = int(generated[-1]) + 1 if len(generated) else self.length
        return _checked(Samples(self.tokens[:, :width], self.masks[:, :width], self.logprobs[:, :width]))


class EagerDecoder:
    """The eager engine: a plain KV-cached loop over `model(...)` with a growing (dynamic) cache, what `generate`
    does for a decoder-only model minus the generality we do not need.

    Rows that have ended (EOS, past `min_new_tokens`) leave the batch once a quarter of it has ended: their KV
    cache rows are dropped, so a batch is not decoded at full width for a few long completions (evaluation stops
    at EOS; ReFT with min = max never drops a row). Which rows ended is read every `sync_every` tokens.
    """

    def __init__(self, sync_every: int | None = None):
        self.sync_every = sync_every

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
        """Decode up to `config.max_new_tokens` tokens for left-padded `input_ids` (N, P)."""
        batch, device = input_ids.shape[0], input_ids.device
        sync_every = self.sync_every or sync_every_for(device)
        out = _Completions(batch, config, eos_token_ids, pad_token_id, device)
        cache = DynamicCache(config=model.config.get_text_config())
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)  # the working batch's rows in the output
        while True:
            next_tokens, alive, finished = out.append(logits, rows, finished, generator)
            if out.full:
                break
            if out.time_to_look(sync_every):
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
            logits = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=True).logits[:, -1]
        return out.samples()


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
                 recompile_limit: int = 64, sync_every: int | None = None, max_caches: int = 2):
        self.length_bucket, self.sync_every, self.max_caches = length_bucket, sync_every, max_caches
        self.recompile_limit = recompile_limit
        self._decode_step = torch.compile(_decode_step, backend=backend, mode=mode)
        self._caches: collections.OrderedDict[tuple, StaticCache] = collections.OrderedDict()

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
        out = _Completions(batch, config, eos_token_ids, pad_token_id, device)
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


_DECODERS: dict[str, EagerDecoder | CompiledDecoder] = {}


def decoder_for(engine: str) -> EagerDecoder | CompiledDecoder:
    """The process's decoder of `engine` (config.ENGINES), made on first use: a compiled decoder keeps its
    compiled step and static caches for every later rollout of the run."""
    if engine not in _DECODERS:
        factories = {"eager": EagerDecoder, "compiled": _default_compiled, "vllm": _vllm_engine}
        if engine not in factories:
            raise ValueError(f"unknown decoding engine {engine!r}; expected one of {tuple(factories)}")
        _DECODERS[engine] = factories[engine]()
    return _DECODERS[engine]


@contextlib.contextmanager
def decoder_closed_after(engine: str) -> Iterator[None]:
    """Shut the process's decoder of `engine` down after the body, also when it raises, where the decoder holds
    more than memory: the vllm engine, whose process group accelerate's `end_training` would otherwise destroy
    under it, and whose requests, if the body stopped mid-generation, would otherwise meet the next run's. The
    next use makes a new one. The others stay (a compiled decoder keeps its graphs for the next run)."""
    try:
        yield
    finally:
        if hasattr(_DECODERS.get(engine), "close"):
            _DECODERS.pop(engine).close()


def default_compiled_mode() -> str | None:
    """Inductor everywhere; on CUDA its decode step is also captured as a CUDA graph ("reduce-overhead")."""
    return "reduce-overhead" if torch.cuda.is_available() else None


def _default_compiled() -> CompiledDecoder:
    return CompiledDecoder(mode=default_compiled_mode())


def _vllm_engine():
    """Imported on first use: the package runs without vllm installed (it is the optional `vllm` extra)."""
    from nested_reft.engines.vllm_engine import VLLMEngine

    return VLLMEngine()
