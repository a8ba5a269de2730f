"""What each transformer block reads and writes, tapped on forward passes that run anyway.

Block Influence (`influence`) and the bridges' normal equations (`bridges`) both need, per block, the hidden
states entering and leaving it on real tokens. A `LayerTap` puts one forward hook on each block of the full
model; inside `tapping(mask)` the hooks hand each block's (h_in, h_out) at the masked positions to `observe`,
outside it they do nothing, so a tap costs nothing on the forwards it is not asked to read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from nested_reft.nesting.layers import decoder_layers


class LayerTap:
    """Forward hooks on `model`'s blocks that call `observe(index, hidden_in, hidden_out)` with the (tokens, d)
    hidden states at the positions `tapping`'s mask marks, without gradient. Subclasses implement `observe`."""

    def __init__(self, model: nn.Module):
        _, _, layers = decoder_layers(model)
        self.num_layers = len(layers)
        self._mask: torch.Tensor | None = None
        for index, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(index), with_kwargs=True)

    @contextlib.contextmanager
    def tapping(self, mask: torch.Tensor) -> Iterator[None]:
        """Read the forwards of the body: `mask` (n, T) marks the real tokens among the last T positions of their
        (n, L >= T) sequences (the completion of prompt + completion sequences, or the whole sequence)."""
        self._mask = mask.bool()
        try:
            yield
        finally:
            self._mask = None

    def observe(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        raise NotImplementedError

    def _hook(self, index: int):
        def record(module, args, kwargs, output) -> None:
            if self._mask is None:
                return
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            length = self._mask.shape[1]
            with torch.no_grad():
                mask = self._mask.to(hidden_in.device)
                self.observe(index, hidden_in[:, -length:][mask], hidden_out[:, -length:][mask])

        return record
