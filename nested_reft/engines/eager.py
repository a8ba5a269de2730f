"""The eager engine: a plain KV-cached loop over `model(...)` with a growing (dynamic) cache, what `generate` does
for a decoder-only model, minus the generality we do not need; finished rows leave the batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from nested_reft.config import SamplingConfig
from nested_reft.engines.completions import Completions, sync_every_for
from nested_reft.engines.interface import Samples


class EagerDecoder:
    """The eager engine: a plain KV-cached loop over `model(...)` with a growing (dynamic) cache, what `generate`
    does for a decoder-only model minus the generality we do not need.

    Rows that have ended (EOS, past `min_new_tokens`) leave the batch once a quarter of it has ended: their KV
    cache rows are dropped, so a batch is not decoded at full width for a few long completions (evaluation stops
    at EOS; ReFT with min = max never drops a row). Which rows ended is read every `sync_every` tokens.
    """

    applies_skip_set = False  # samples from the model it is handed: `generate_rollouts` nests it
    applies_bridges = False  # ... with its bridges' hooks in place

    def __init__(self, sync_every: int | None = None):
        self.sync_every = sync_every

    @torch.no_grad()
    def sample(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               config: SamplingConfig, eos_token_ids: Sequence[int], pad_token_id: int,
               generator: torch.Generator | None = None) -> Samples:
        """Decode up to `config.max_new_tokens` tokens for left-padded `input_ids` (N, P)."""
        batch, device = input_ids.shape[0], input_ids.device
        sync_every = self.sync_every or sync_every_for(device)
        out = Completions(batch, config, eos_token_ids, pad_token_id, device)
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

    def close(self) -> None:
        """Nothing to release: the engine holds nothing between calls."""
