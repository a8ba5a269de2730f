"""Nested behavior models: which layers to skip (f_{x,b}) and running a model without them.

Section 2.1 of the paper. A nested model is the current model with U_x of its transformer blocks
skipped; it shares every weight with the full model (no copy), so it costs nothing to build and is
re-drawn at every gradient step. This module knows nothing of RL.

How skipping works: inside `nested(model, S)` the model's block list is swapped for the kept blocks
(the same module objects), each kept block's `layer_idx` is renumbered 0..K-1 and the per-layer
config fields (`num_hidden_layers`, `layer_types`, ...) are cut to the kept layers. The model is then,
for transformers' cache and mask code, exactly a physically truncated K-layer model, which is why
the KV cache, left padding and mixed attention types (Gemma2's sliding and full layers) stay correct
when layer 0 or the first layer of a type is skipped: transformers reads cache lengths and mask sizes
from particular layer indices, and those always exist after renumbering. Everything is restored on
exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from decimal import ROUND_HALF_UP, Decimal

import torch
from torch import nn

_ACTIVE_SKIP_SET = "_nested_reft_skip_set"  # set on a model while it runs nested, to refuse re-entry


def num_skipped_layers(num_layers: int, ratio: float) -> int:
    """U_x, the number of layers to skip for a ratio x of a model with `num_layers` blocks.

    The paper writes U_x = min(1, ceil(|T| x)) for x > 0: `min` is a typo (it would cap U at 1) and
    `ceil` disagrees with its own Table 1 (28 layers: 5% -> 1, 10% -> 3, 15% -> 4, where ceil gives
    2, 3, 5). Table 1 is reproduced by U_x = max(1, round-half-up(|T| x)) for x > 0 and 0 for x = 0,
    which is what we use. The product is rounded in decimal so that 30 x 0.15 is 4.5, not 4.4999...
    """
    _check_num_layers(num_layers)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"skip ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return 0
    exact = Decimal(num_layers) * Decimal(str(ratio))
    return max(1, int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)))


def valid_layers(num_layers: int, border: int) -> list[int]:
    """V_{b}: the layers that may be skipped; the first `border` and the last `border` never are.

    Definition 2 of the paper; with b = 1 only the first and the last layer are protected, with b = 0
    every layer is valid.
    """
    _check_num_layers(num_layers)
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    return list(range(border, num_layers - border))


def skip_count_problem(num_layers: int, border: int, ratio: float, border_option: str = "nesting.border") -> str | None:
    """Why no skip set of ratio `ratio` can be drawn from a model of `num_layers` layers with `border`, or None:
    U_x more than the valid layers, or every layer (none would run); `border_option` names the border. What start-up
    checks ask before a run or a probe draws its first skip set."""
    skipped, valid = num_skipped_layers(num_layers, ratio), len(valid_layers(num_layers, border))
    if skipped > valid:
        return (f"skips {skipped} of the model's {num_layers} layers, but {border_option}={border} leaves only {valid} "
                "valid layers")
    if skipped >= num_layers:
        return f"skips all {num_layers} of the model's layers, so none would run"
    return None


def sample_skip_set(
    num_layers: int, ratio: float, border: int, generator: torch.Generator | None = None
) -> tuple[int, ...]:
    """f_{x,b}: U_x distinct valid layer indices, uniform without replacement, sorted.

    Definition 3 of the paper. Pass a seeded `torch.Generator` for a reproducible draw.
    """
    return draw_uniform(num_layers, num_skipped_layers(num_layers, ratio), border, generator)


def draw_uniform(num_layers: int, count: int, border: int, generator: torch.Generator | None = None) -> tuple[int, ...]:
    """`count` distinct valid layers (border `border`), uniform without replacement, sorted."""
    candidates = _candidates(num_layers, count, border)
    order = torch.randperm(len(candidates), generator=generator)[:count]
    return tuple(sorted(candidates[i] for i in order.tolist()))


def influence_probabilities(influence: Sequence[float], border: int, temperature: float) -> torch.Tensor:
    """Per-layer draw probabilities (N,) proportional to exp(-BI_l / temperature) over the valid layers, 0 on
    the border: layers that change the residual stream least (low Block Influence) are skipped most often.

    Computed as a softmax of -BI / temperature (log space, float64); a very large temperature gives uniform.
    """
    if temperature <= 0:
        raise ValueError(f"influence temperature must be > 0, got {temperature}")
    num_layers = len(influence)
    logits = torch.full((num_layers,), -math.inf, dtype=torch.float64)
    valid = valid_layers(num_layers, border)
    logits[valid] = -torch.tensor([influence[i] for i in valid], dtype=torch.float64) / temperature
    return torch.softmax(logits, dim=0)


def draw_weighted(probabilities: torch.Tensor, count: int, generator: torch.Generator | None = None) -> tuple[int, ...]:
    """`count` distinct layers drawn one after another, each with probability proportional to `probabilities`
    among the layers not yet drawn (successive sampling without replacement), sorted."""
    positive = int((probabilities > 0).sum())
    if count > positive:
        raise ValueError(f"cannot draw {count} distinct layers from {positive} with a positive probability")
    if count == 0:
        return ()
    drawn = torch.multinomial(probabilities.double(), count, replacement=False, generator=generator)
    return tuple(sorted(drawn.tolist()))


def kl_controlled_count(current: int, kl_by_count: dict[int, float], target: float, max_count: int) -> int:
    """The next number of layers to skip, stepping towards the largest U whose smoothed KL stays under `target`.

    `kl_by_count` holds the smoothed KL(behavior || target) measured at each U used so far. Over the target at
    `current`: one layer fewer. Under it: one layer more, unless U + 1 was measured over the target (then stay).
    The step of one layer keeps the behavior model from jumping far from what was measured.
    """
    measured = kl_by_count.get(current)
    if measured is None:
        return current
    if measured > target:
        return max(current - 1, 0)
    above = kl_by_count.get(current + 1)
    if current < max_count and (above is None or above <= target):
        return current + 1
    return current


def _candidates(num_layers: int, count: int, border: int) -> list[int]:
    candidates = valid_layers(num_layers, border)
    if count > len(candidates):
        raise ValueError(
            f"cannot skip {count} of {num_layers} layers with border {border}: only {len(candidates)} valid layers"
        )
    return candidates


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Find a decoder-only model's block list: (the module holding it, its attribute name, the list).

    Works for any Hugging Face architecture that keeps its blocks in an `nn.ModuleList` of
    `num_hidden_layers` entries (`model.layers` in Llama/Qwen/Mistral/Gemma/Phi3, `transformer.h` in
    GPT-2/Falcon, `gpt_neox.layers`, `model.decoder.layers` in OPT, ...). If several lists have that
    length, the one holding the most parameters is the stack of blocks.
    """
    num_layers = _text_config(model).num_hidden_layers
    candidates = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers:
                candidates.append((sum(p.numel() for p in child.parameters()), parent, name, child))
    if not candidates:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: "
            f"no nn.ModuleList of num_hidden_layers={num_layers} blocks"
        )
    _, parent, name, layers = max(candidates, key=lambda c: c[0])
    return parent, name, layers


def num_decoder_layers(model: nn.Module) -> int:
    """|T|, the number of transformer blocks of `model`."""
    return len(decoder_layers(model)[2])


@contextlib.contextmanager
def nested(model: nn.Module, skip_set: Sequence[int]) -> Iterator[nn.Module]:
    """Run `model` (forward and `generate`) without the blocks in `skip_set`; restore it on exit.

    Weights are shared, never copied. An empty skip set runs the full model untouched.
    """
    if getattr(model, _ACTIVE_SKIP_SET, None) is not None:
        raise RuntimeError(f"model is already nested (skipping {getattr(model, _ACTIVE_SKIP_SET)})")
    parent, name, layers = decoder_layers(model)
    skip = _check_skip_set(skip_set, len(layers))
    if not skip:
        yield model
        return
    kept = [i for i in range(len(layers)) if i not in skip]
    config = _text_config(model)
    saved_config = _per_layer_config_fields(config, len(layers))
    saved_layer_idx = [(module, module.layer_idx) for i in kept for module in _modules_with_layer_idx(layers[i])]
    try:
        setattr(model, _ACTIVE_SKIP_SET, tuple(sorted(skip)))
        setattr(parent, name, nn.ModuleList([layers[i] for i in kept]))
        for new_index, old_index in enumerate(kept):
            for module in _modules_with_layer_idx(layers[old_index]):
                module.layer_idx = new_index
        config.num_hidden_layers = len(kept)
        for field, values in saved_config.items():
            setattr(config, field, type(values)(values[i] for i in kept))
        yield model
    finally:
        setattr(parent, name, layers)
        for module, layer_idx in saved_layer_idx:
            module.layer_idx = layer_idx
        config.num_hidden_layers = len(layers)
        for field, values in saved_config.items():
            setattr(config, field, values)
        if hasattr(model, _ACTIVE_SKIP_SET):
            delattr(model, _ACTIVE_SKIP_SET)


def _text_config(model: nn.Module):
    """The decoder's config (the model's own config, or its text sub-config for composite models)."""
    return model.config.get_text_config()


def _check_num_layers(num_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"a model needs at least one layer, got num_layers={num_layers}")


def _check_skip_set(skip_set: Sequence[int], num_layers: int) -> set[int]:
    indices = [int(i) for i in skip_set]
    out_of_range = [i for i in indices if not 0 <= i < num_layers]
    if out_of_range:
        raise ValueError(f"skip indices {out_of_range} out of range for a model of {num_layers} layers")
    if len(set(indices)) != len(indices):
        raise ValueError(f"skip set {tuple(indices)} repeats a layer")
    if len(indices) >= num_layers:
        raise ValueError(f"cannot skip all {num_layers} layers")
    return set(indices)


def _per_layer_config_fields(config, num_layers: int) -> dict[str, list | tuple]:
    """Config fields that hold one entry per layer (`layer_types` and other `*layer*` lists)."""
    return {
        field: value
        for field, value in vars(config).items()
        if "layer" in field and isinstance(value, (list, tuple)) and len(value) == num_layers
    }


def _modules_with_layer_idx(block: nn.Module) -> list[nn.Module]:
    """The sub-modules of a block that address the KV cache by their `layer_idx`."""
    return [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
