"""Bridges in static buffers, for the compiled engine (issue 31): a skip set's bridges (`bridges.Bridges`) held in
tensors of fixed shapes and addresses that a compiled decode step reads, so that a new skip set of the same size
neither recompiles it nor re-captures its CUDA graph (the hooks of `bridges.bridged` are Python around the blocks:
a compiled step would trace them into its graph, one graph per skip set).

A run of adjacent skipped blocks composes into one affine map: the bridges h -> h (I + W_i) + c_i in order make
h -> h (I + W) + c with I + W = prod (I + W_i) and c the earlier biases carried through the later maps. It is
composed once per skip set, outside the graph, in float32 (`composed_bridges`), and kept in residual form
(h + h W + c, as each bridge is), so that h keeps its precision in a low-precision model. A run costs one d x d
product where its blocks' bridges cost one each.

`StaticBridges` holds one map per position j of the nested model (before kept block j, 0..K-1, and K: after the
last kept block, before the final norm): `weight` (K + 1, d, d) and `bias` (K + 1, d), zero where no run is, and
`applies` (K + 1,), whether one is; `fill` copies a skip set's maps into them in place. `statically_bridged` wraps
each kept block in a `_BridgedBlock` that runs position j's map before the block (the last one also position K's
after it). A map per position rather than per run (at most U slots, each position pointing at one) because a
slot chosen by a tensor index is gathered, a copy of its d x d matrix at every token (a CPU decode step at d = 1024
took 9% longer than without bridges, against 7% per position); the price is (K + 1) d^2 numbers where U d^2 would
do.

Where no run precedes a kept block the map must cost nothing. Under torch.compile on a CPU it is a `torch.cond` on
`applies[j]`: a host-side branch, the d x d product only where a run is. On a GPU that branch would read the flag
from the device (a sync per block per token) and split the CUDA graph at each cond, so there every position runs
its map, the zero map where no run is: one graph, a d x d product per kept block (`branching` False). Run eagerly
(the compiled engine's prefill), a Python branch on the same flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nested_reft.nesting.bridges import Bridges
from nested_reft.nesting.layers import decoder_layers


@dataclass
class ComposedBridges:
    """A skip set's bridges as its nested model runs them: one map per run of adjacent skipped blocks, at the
    position it precedes (`positions`, ascending, of `num_positions` = K + 1), `weight` (R, d, d) and `bias`
    (R, d) in residual form, float32."""

    positions: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    num_positions: int


def runs_by_position(skip_set: Sequence[int], num_layers: int) -> list[tuple[int, ...]]:
    """Position j (0..K) of the nested model -> the skipped blocks between kept blocks j - 1 and j, in order
    (position K: those after the last kept block); empty where none is."""
    skip = {int(i) for i in skip_set}
    runs: list[list[int]] = [[]]
    for index in range(num_layers):
        if index in skip:
            runs[-1].append(index)
        else:
            runs.append([])
    return [tuple(run) for run in runs]


def composed_run(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one map (W, c) of the bridges `weight` (r, d, d), `bias` (r, d) applied in order, in residual form:
    h + h W + c equals h through each h -> h + h W_i + c_i. (I + W)(I + W_i) = I + (W + W_i + W W_i), so W
    never holds the identity and keeps its precision."""
    composed_weight, composed_bias = torch.zeros_like(weight[0]), torch.zeros_like(bias[0])
    for step_weight, step_bias in zip(weight, bias):
        composed_bias = composed_bias + composed_bias @ step_weight + step_bias
        composed_weight = composed_weight + step_weight + composed_weight @ step_weight
    return composed_weight, composed_bias


def composed_bridges(bridges: Bridges | None, skip_set: Sequence[int], num_layers: int,
                     device: str | torch.device | None = None) -> ComposedBridges | None:
    """`bridges` for nested(model, skip_set) of a model of `num_layers` blocks, each run composed on `device` (the
    model's: a d x d product per extra block of a run) in float32; None without bridges or without a skip set."""
    if bridges is None or not len(skip_set):
        return None
    runs = runs_by_position(skip_set, num_layers)
    positions = tuple(j for j, run in enumerate(runs) if run)
    maps = [composed_run(*(t[list(bridges.rows_of(runs[j]))].to(device=device, dtype=torch.float32)
                           for t in (bridges.weight, bridges.bias))) for j in positions]
    return ComposedBridges(positions, torch.stack([w for w, _ in maps]), torch.stack([c for _, c in maps]), len(runs))


class StaticBridges(nn.Module):
    """The maps of the `num_positions` (K + 1) positions of a nested model of width `hidden_size`, in buffers
    filled in place (`fill`), so that a compiled graph reading them serves every skip set of that size.
    `branching`: skip the product where no run is with `torch.cond` (default on a CPU; the module's docstring)."""

    def __init__(self, num_positions: int, hidden_size: int, dtype: torch.dtype, device: str | torch.device,
                 branching: bool | None = None):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_positions, hidden_size, hidden_size, dtype=dtype,
                                                   device=device))
        self.register_buffer("bias", torch.zeros(num_positions, hidden_size, dtype=dtype, device=device))
        self.register_buffer("applies", torch.zeros(num_positions, dtype=torch.bool, device=device))
        self.branching = torch.device(device).type == "cpu" if branching is None else branching
        self._applies: tuple[bool, ...] = (False,) * num_positions  # the flags on the host, for eager runs

    @property
    def num_positions(self) -> int:
        return self.applies.shape[0]

    def fill(self, composed: ComposedBridges) -> None:
        """Copy `composed`'s maps to their positions and the zero map to the others, in place."""
        if composed.num_positions != self.num_positions:
            raise ValueError(f"bridges of a nested model of {composed.num_positions} positions cannot fill those "
                             f"of {self.num_positions}")
        positions = torch.tensor(composed.positions, device=self.weight.device)
        self.weight.zero_().index_copy_(0, positions, composed.weight.to(self.weight))
        self.bias.zero_().index_copy_(0, positions, composed.bias.to(self.bias))
        self._applies = tuple(j in composed.positions for j in range(self.num_positions))
        self.applies.copy_(torch.tensor(self._applies))

    def forward(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` through position `position`'s map, where a run is; else `hidden` unchanged."""
        weight, bias = self.weight[position], self.bias[position]  # views: `position` is a constant of the graph
        if not torch.compiler.is_compiling():
            return _through(hidden, weight, bias) if self._applies[position] else hidden
        if self.branching:
            return torch.cond(self.applies[position], _through, _past, (hidden, weight, bias))
        return _through(hidden, weight, bias)  # the zero map where no run is: h + h 0 + 0 = h


def _through(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h + h W + c."""
    return hidden + hidden @ weight + bias


def _past(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """No map: `hidden` (a copy, as `torch.cond` returns no alias of an input)."""
    return hidden.clone()


class _BridgedBlock(nn.Module):
    """Kept block `position` of a nested model behind its position's map (and, when `last`, the next position's
    after it): the same module type and positions for every skip set of a size, so a compiled graph serves all."""

    def __init__(self, block: nn.Module, bridges: StaticBridges, position: int, last: bool):
        super().__init__()
        self.block, self.bridges, self.position, self.last = block, bridges, position, last

    def forward(self, *args, **kwargs):
        if args:
            args = (self.bridges(self.position, args[0]), *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": self.bridges(self.position, kwargs["hidden_states"])}
        output = self.block(*args, **kwargs)
        if not self.last:
            return output
        if isinstance(output, tuple):
            return (self.bridges(self.position + 1, output[0]), *output[1:])
        return self.bridges(self.position + 1, output)


@contextlib.contextmanager
def statically_bridged(model: nn.Module, bridges: StaticBridges) -> Iterator[None]:
    """Run the nested model `model` (inside `nested`) with each kept block behind its position's map in
    `bridges`; its block list is restored on exit."""
    parent, name, layers = decoder_layers(model)
    if len(layers) + 1 != bridges.num_positions:
        raise ValueError(f"static bridges of {bridges.num_positions} positions cannot bridge {len(layers)} blocks")
    wrapped = [_BridgedBlock(block, bridges, j, j == len(layers) - 1) for j, block in enumerate(layers)]
    setattr(parent, name, nn.ModuleList(wrapped))
    try:
        yield
    finally:
        setattr(parent, name, layers)
