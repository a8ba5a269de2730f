"""Block Influence of each transformer layer, measured on the training forward pass that runs anyway.

ShortGPT's Block Influence of layer l is BI_l = 1 - cos(h_in, h_out), the cosine between the hidden states
entering and leaving the block, averaged over tokens: a block that barely turns the residual stream has a
BI near 0 and is the cheapest to skip. Forward hooks on the full model's blocks read it during the update's
forward pass, on the completion tokens only, so measuring costs no extra pass.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from nested_reft.nesting.layer_io import LayerTap


class InfluenceMeter(LayerTap):
    """Accumulates per-layer sums of 1 - cos(h_in, h_out) over the completion tokens of the forwards run inside
    `measuring(mask)`, until `take()` returns their means and starts over. Its hooks stay on the model's blocks
    but do nothing outside `measuring`."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._sums: torch.Tensor | None = None  # N layer sums, then the token count; on the hidden states' device

    def measuring(self, completion_mask: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Measure the forwards of the body over prompt + completion sequences whose last T positions are the
        completion, `completion_mask` (n, T) marking its real tokens."""
        return self.tapping(completion_mask)

    def take(self, accelerator=None) -> list[float] | None:
        """Each layer's mean BI since the last take (over all processes' tokens), or None if nothing was measured."""
        totals = self._sums if self._sums is not None else torch.zeros(self.num_layers + 1, dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum")
        totals = totals.cpu()
        self._sums = None
        if totals[-1] == 0:
            return None
        return (totals[:-1] / totals[-1]).tolist()

    def observe(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        cosine = nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
        if self._sums is None:
            self._sums = torch.zeros(self.num_layers + 1, dtype=torch.float64, device=cosine.device)
        self._sums[index] += (1.0 - cosine).double().sum()  # no device sync per layer
        if index == 0:
            self._sums[-1] += cosine.numel()
