"""Bridges: each skipped block replaced by a linear map fitted to the policy (past the paper; issue 31).

A block adds an update Delta = f(h) to the residual stream h. The paper's nested model drops the block, which
stands in Delta = 0 (the identity) for it; a bridge predicts the update linearly, h -> h + h W + c, at d^2
multiply-adds per token where the block costs about ten times that (LLM-Streamline replaces pruned layers with
a small trained module; this one is fitted in closed form, with no gradient and no optimizer state).

The fit is ridge regression of each block's Delta on [h, 1], from the normal equations G = X^T X and
B = X^T Delta (X = [h, 1] over the tapped tokens), accumulated in float64 by a `BridgeFitter`'s hooks on the
full model's forwards (the update's own forward, so fitting costs no extra pass), old steps fading by a decay.
`fit_bridges` is a pure function of those sums: (G + lambda * s * I_W) [W; c] = B, where s is the mean of G's
diagonal over the h columns, so `ridge` is a fraction of the typical squared activation and the bias is not
shrunk. Shapes: L bridged blocks, hidden size d.

The eager engine runs the bridges as hooks around the kept blocks (`bridged`), vLLM in place of its skipped layers,
and the compiled engine from static buffers (`static_bridges`): hooks traced into its compiled step would make one
graph per skip set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nested_reft.nesting.layer_io import LayerTap
from nested_reft.nesting.layers import decoder_layers, nested


@dataclass
class Bridges:
    """The fitted maps of the blocks in `layers`: `weight` (L, d, d) and `bias` (L, d), float32."""

    layers: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def identity(cls, layers: Sequence[int], hidden_size: int, device: str | torch.device = "cpu") -> Bridges:
        """Bridges that stand in Delta = 0, the paper's nested model, until a first fit."""
        layers = tuple(layers)
        return cls(layers, torch.zeros(len(layers), hidden_size, hidden_size, device=device),
                   torch.zeros(len(layers), hidden_size, device=device))

    def rows_of(self, layers: Sequence[int]) -> tuple[int, ...]:
        """The rows of the maps of `layers`, in their order; a layer without a bridge is refused by name."""
        missing = [i for i in layers if i not in self.layers]
        if missing:
            raise ValueError(f"blocks {missing} are skipped but have no bridge (bridged blocks: {self.layers})")
        return tuple(self.layers.index(i) for i in layers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors holds them): the layer indices, the weights and the biases."""
        return {"layers": torch.tensor(self.layers, dtype=torch.int64), "weight": self.weight.contiguous(),
                "bias": self.bias.contiguous()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Bridges:
        return cls(tuple(int(i) for i in state["layers"].tolist()), state["weight"], state["bias"])


@dataclass
class NormalEquations:
    """Per bridged block the sums of a ridge fit: `gram` (L, d+1, d+1) = X^T X, `cross` (L, d+1, d) = X^T Delta,
    `tokens` (L,) the (decayed) token count, all float64, X = [h, 1]."""

    layers: tuple[int, ...]
    gram: torch.Tensor
    cross: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, layers: Sequence[int], hidden_size: int, device: str | torch.device = "cpu") -> NormalEquations:
        layers, width = tuple(layers), hidden_size + 1
        return cls(layers, torch.zeros(len(layers), width, width, dtype=torch.float64, device=device),
                   torch.zeros(len(layers), width, hidden_size, dtype=torch.float64, device=device),
                   torch.zeros(len(layers), dtype=torch.float64, device=device))

    def add(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        """Add the (tokens, d) states entering and leaving block `layer` (a block without a bridge is ignored)."""
        if layer not in self.layers:
            return
        row = self.layers.index(layer)
        x = torch.cat([hidden_in.double(), hidden_in.new_ones(hidden_in.shape[0], 1, dtype=torch.float64)], dim=-1)
        self.gram[row] += x.T @ x
        self.cross[row] += x.T @ (hidden_out.double() - hidden_in.double())
        self.tokens[row] += hidden_in.shape[0]

    def scaled(self, factor: float) -> NormalEquations:
        """The sums times `factor`: how old steps fade (`factor` = the decay) before a step's sums join them."""
        return NormalEquations(self.layers, self.gram * factor, self.cross * factor, self.tokens * factor)

    def plus(self, other: NormalEquations) -> NormalEquations:
        if other.layers != self.layers:
            raise ValueError(f"normal equations of blocks {other.layers} cannot join those of {self.layers}")
        return NormalEquations(self.layers, self.gram + other.gram, self.cross + other.cross,
                               self.tokens + other.tokens)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"layers": torch.tensor(self.layers, dtype=torch.int64), "gram": self.gram.contiguous(),
                "cross": self.cross.contiguous(), "tokens": self.tokens.contiguous()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> NormalEquations:
        return cls(tuple(int(i) for i in state["layers"].tolist()), state["gram"], state["cross"], state["tokens"])


def fit_bridges(equations: NormalEquations, ridge: float) -> Bridges:
    """Solve each block's ridge regression in float64; a block that saw no token keeps the identity (W = 0, c = 0).

    `ridge` (lambda) scales the penalty on W by the mean diagonal of X^T X over the h columns, so it reads as a
    fraction of the typical squared activation whatever the model's scale; c is not penalised.
    """
    gram, cross = equations.gram, equations.cross
    width = gram.shape[-1]
    scale = torch.diagonal(gram[:, :-1, :-1], dim1=-2, dim2=-1).mean(-1).clamp(min=torch.finfo(torch.float64).tiny)
    penalty = torch.ones(width, dtype=gram.dtype, device=gram.device)
    penalty[-1] = 0.0
    system = gram + ridge * scale[:, None, None] * torch.diag(penalty)
    seen = equations.tokens > 0
    solution = torch.zeros_like(cross)
    if bool(seen.any()):
        solution[seen] = torch.linalg.solve(system[seen], cross[seen])
    return Bridges(equations.layers, solution[:, :-1].float(), solution[:, -1].float())


# nesting.bridge -> how a bridge is fitted from the normal equations (None: no bridge, the skipped block is removed)
BRIDGE_FITS = {"none": None, "linear": fit_bridges}


class BridgeFitter(LayerTap):
    """Accumulates a step's normal equations from the forwards run inside `recording(mask)` (hooks on the full
    model's blocks), and folds them into the running sums at `end_step`: old sums times `decay`, plus this step's
    (summed over ranks, so every rank holds the same sums and fits the same bridges)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], decay: float):
        super().__init__(model)
        hidden_size = model.config.get_text_config().hidden_size
        self.decay = decay
        self.layers = tuple(layers)
        self.total = NormalEquations.zeros(self.layers, hidden_size)
        self._step = NormalEquations.zeros(self.layers, hidden_size)

    def recording(self, mask: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Record the forwards of the body on the tokens `mask` (n, T) marks among their last T positions."""
        return self.tapping(mask)

    def observe(self, index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        if self._step.gram.device != hidden_in.device:
            self._step = NormalEquations.zeros(self.layers, hidden_in.shape[-1], hidden_in.device)
        self._step.add(index, hidden_in, hidden_out)

    def pending_tokens(self) -> float:
        """The tokens recorded since the last `end_step` (each block sees the same ones)."""
        return float(self._step.tokens[0]) if self.layers else 0.0

    def end_step(self, accelerator=None) -> None:
        """Fold the step's sums (over all ranks) into the decayed total, on the CPU, and start a new step."""
        step = self._step
        if accelerator is not None and accelerator.num_processes > 1:
            step = NormalEquations(step.layers, *(accelerator.reduce(t.to(accelerator.device), reduction="sum")
                                                  for t in (step.gram, step.cross, step.tokens)))
        step = NormalEquations(step.layers, step.gram.cpu(), step.cross.cpu(), step.tokens.cpu())
        self.total = self.total.scaled(self.decay).plus(step)
        self._step = NormalEquations.zeros(self.layers, self.total.gram.shape[-1] - 1)


def record_texts(fitter: BridgeFitter, model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Run the full model without gradient over `texts` (batches of `batch_size`, every real token recorded): a
    calibration pass, the first bridges' data before any rollout has been scored. `autocast` makes each batch's
    precision context (`accelerator.autocast`)."""
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
        with torch.no_grad(), autocast(), fitter.recording(encoded["attention_mask"]):
            model(**encoded, use_cache=False)


@contextlib.contextmanager
def bridged(model: nn.Module, skip_set: Sequence[int], bridges: Bridges) -> Iterator[None]:
    """While the body runs `model` nested without `skip_set` (inside `nested`), run each skipped block's bridge
    where the block would have run: before the next kept block (a forward pre-hook), or after the last kept block
    for skipped blocks at the end. The blocks are the full model's (`decoder_layers` before nesting)."""
    _, _, layers = decoder_layers(model)
    skip = sorted(int(i) for i in skip_set)
    bridges.rows_of(skip)  # refuses a skipped block without a bridge, by name
    kept = [i for i in range(len(layers)) if i not in set(skip)]
    placed = _Placed(bridges)
    handles = []
    for kept_index, runs in _runs_before_kept(skip, kept).items():
        handles.append(layers[kept_index].register_forward_pre_hook(_bridge_input(runs, placed), with_kwargs=True))
    tail = [i for i in skip if i > kept[-1]]
    if tail:
        handles.append(layers[kept[-1]].register_forward_hook(_bridge_output(tail, placed)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Placed:
    """The bridges on the hidden states' device and in their dtype, each cast once per `bridged` context (a rollout
    casts a skipped block's map at its first token, not at every token)."""

    def __init__(self, bridges: Bridges):
        self.bridges = bridges
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def through(self, run: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` through the bridges of the skipped blocks `run`, in order: h -> h + h W + c each."""
        for layer in run:
            key = (layer, hidden.device, hidden.dtype)
            if key not in self._cast:
                row = self.bridges.layers.index(layer)
                self._cast[key] = (self.bridges.weight[row].to(hidden.device, hidden.dtype),
                                   self.bridges.bias[row].to(hidden.device, hidden.dtype))
            weight, bias = self._cast[key]
            hidden = hidden + torch.addmm(bias, hidden.reshape(-1, hidden.shape[-1]), weight).view_as(hidden)
        return hidden


def _runs_before_kept(skip: list[int], kept: list[int]) -> dict[int, list[int]]:
    """kept block -> the skipped blocks between it and the kept block before it, in order."""
    runs: dict[int, list[int]] = {}
    for index in skip:
        following = next((k for k in kept if k > index), None)
        if following is not None:
            runs.setdefault(following, []).append(index)
    return runs


def _bridge_input(run: list[int], placed: _Placed):
    def hook(module, args, kwargs):
        if args:
            return (placed.through(run, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": placed.through(run, kwargs["hidden_states"])}

    return hook


def _bridge_output(run: list[int], placed: _Placed):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (placed.through(run, output[0]), *output[1:])
        return placed.through(run, output)

    return hook


@contextlib.contextmanager
def nested_bridged(model: nn.Module, skip_set: Sequence[int], bridges: Bridges | None) -> Iterator[nn.Module]:
    """`nested(model, skip_set)`, each skipped block replaced by its bridge when `bridges` is given: the behavior
    model every engine samples from (the bridges' hooks are placed on the full model's blocks, before nesting)."""
    with contextlib.ExitStack() as stack:
        if bridges is not None and len(skip_set):
            stack.enter_context(bridged(model, skip_set, bridges))
        yield stack.enter_context(nested(model, skip_set))
