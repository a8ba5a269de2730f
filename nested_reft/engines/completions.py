"""The per-token bookkeeping of the engines that run our model in a Python loop (eager and compiled): the next
token drawn from the last logits (`draw_next`), the batch's completions built one token at a time (`Completions`),
and how often the host looks at which rows have ended (`sync_every_for`). One code path for both engines, so that
they differ in how they run the model only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nested_reft.config import SamplingConfig
from nested_reft.engines.interface import Samples, checked
from nested_reft.engines.sampling import draw

SYNC_EVERY = {"cpu": 1, "cuda": 8}  # tokens between looks at which rows have ended, per device type (below)


def sync_every_for(device: torch.device) -> int:
    """How often a decoder asks the device which rows have ended (a host sync): on a CPU every token, where it
    costs nothing and lets finished rows leave the batch at once (every 8 took 1.076x as long, SmolLM2); on a
    GPU every 8 tokens, so that the host keeps queueing kernels (a sync per token cost an H200 12% of an
    evaluation batch). bench/host_sync.py measures both; docs/benchmarks.md."""
    return SYNC_EVERY.get(device.type, SYNC_EVERY["cuda"])


class Completions:
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
        next_tokens, drawn_logprobs = draw_next(logits, self.config, banned, generator)
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
        return checked(Samples(self.tokens[:, :width], self.masks[:, :width], self.logprobs[:, :width]))


def draw_next(logits: torch.Tensor, config: SamplingConfig, banned: torch.Tensor | None,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row from the last logits (N, V), and its float32 log-prob."""
    scaled = logits.float() if config.temperature in (0, 1) else logits.float() / config.temperature
    probs = torch.softmax(scaled, dim=-1)
    tokens = draw(probs, config, banned, generator)
    # log of the drawn token's float32 probability: its log-softmax to ~1e-7 (rounding) whenever it is above
    # 1e-38 (a rarer token is drawn with odds below that), and one pass over the vocabulary cheaper
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()
