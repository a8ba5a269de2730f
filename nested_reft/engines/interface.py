"""What a decoding engine is: the `Decoder` protocol every engine implements, the `Samples` it returns, and the
check every result passes (`checked`).

An engine takes a batch of left-padded prompts and returns their completions with each sampled token's behavior
log-prob, recorded while sampling from the very logits the sampler drew from, so that the importance weights never
need an extra forward pass of the behavior model. The engines: `eager.EagerDecoder`, `compiled.CompiledDecoder`,
`vllm_engine.VLLMEngine`; `choice` picks the process's engine by name (config.ENGINES).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from nested_reft.config import SamplingConfig


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


class Decoder(Protocol):
    """A decoding engine: what `rollout.generate_rollouts` and the trainer ask of one."""

    applies_skip_set: ClassVar[bool]
    """False: `sample` runs the model it is handed, already nested(model, skip_set) by the caller. True (vLLM, which
    samples in its own copy of the model): `sample` is handed the full model and takes `skip_set=` and `bridges=`
    (`nesting.bridges.Bridges` or None) as well, and runs their nested, bridged model itself."""

    applies_bridges: ClassVar[bool]
    """True (compiled, whose compiled step would trace the bridges' hooks into a graph per skip set): `sample` takes
    `bridges=` as well, the skip set's bridges composed for the nested model it is handed
    (`nesting.static_bridges.ComposedBridges` or None), and runs them itself. False: a nested model is handed with
    its bridges already in place (`nesting.bridges.nested_bridged`), or, with `applies_skip_set`, handed over."""

    def sample(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: SamplingConfig,
               eos_token_ids: Sequence[int], pad_token_id: int, generator: torch.Generator | None = None) -> Samples:
        """Decode up to `config.max_new_tokens` tokens for left-padded `input_ids` (N, P) and `attention_mask`,
        drawing with `generator`; a completion ends at one of `eos_token_ids` and is padded with `pad_token_id`."""
        ...

    def close(self) -> None:
        """Release what the engine holds beyond memory (vLLM: its engine and process group) at the end of a run; the
        engine stays usable (and rebuilds what it released on its next use)."""
        ...


def checked(samples: Samples) -> Samples:
    """`samples`, once its log-probs are known finite (one check per batch, not a device sync per token)."""
    if not bool(torch.isfinite(samples.logprobs).all()):
        raise FloatingPointError("the model's logits became NaN or infinite while sampling: its weights diverged")
    return samples
