"""LoRA adapters through PEFT: train low-rank adapters of the blocks' linear layers instead of every weight.

What a one-GPU user runs on 7B (TRL's `peft_config`). The nested model skips adapted blocks like any other:
PEFT wraps the linear layers inside the blocks, so the block list and its skipping are untouched. Only the
adapters train; checkpoints hold the adapters; a finished run leaves `adapter/` (PEFT's format) and `model/`,
the base with the adapters merged in, which `transformers.AutoModelForCausalLM.from_pretrained` loads.

Rollouts sample from the adapters merged into the base weights (`merged_for_sampling`): through the
adapters every linear layer costs three matmuls per token (W x, A x, B A x) where the merged one costs one, and an
engine outside our model (vLLM) takes plain weights (`plain_named_parameters`). W + BA is written in place over a
saved copy of W, not undone by PEFT's unmerge, because W + BA - BA is not W in floating point: the training
weights come back bit for bit, at the addresses they had (which a CUDA graph recorded).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from nested_reft.config import ConfigError, LoRAConfig


def add_adapters(model: torch.nn.Module, config: LoRAConfig) -> PeftModel:
    """`model` with fresh LoRA adapters on `config.target_modules` (PEFT's "all-linear": every linear layer of
    the blocks, not the output head); only the adapters require gradients."""
    targets = config.target_modules[0] if config.target_modules == ("all-linear",) else list(config.target_modules)
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:  # PEFT's NoMatchingPeftModuleError: no module has one of these names
        raise ConfigError(f"lora.target_modules {config.target_modules!r} match no module of the model "
                          f"({str(error).splitlines()[0][:200]})") from None


def has_adapters(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def load_adapter_weights(model: PeftModel, weights: dict[str, torch.Tensor]) -> list[str]:
    """Set the adapters' weights from an adapter state dict (as `save_pretrained` writes it); returns the keys
    that fit no adapter."""
    return list(set_peft_model_state_dict(model, weights).unexpected_keys)


def merge(model: PeftModel) -> torch.nn.Module:
    """The base model with the adapters merged into its weights, in place (the adapters are gone after)."""
    return model.merge_and_unload()


_MERGED: weakref.WeakSet = weakref.WeakSet()  # the models inside `merged_for_sampling` now


@contextlib.contextmanager
def merged_for_sampling(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within: `model`'s adapted linear layers hold W + the active adapters' delta (W saved aside) and the
    adapters are bypassed, so a forward is the merged model's at the cost of the plain one's; after (or on an
    error): the original weight tensors are back, untouched. A model without adapters, or one already inside,
    is left as it is. For sampling only: no gradient reaches the adapters through it."""
    if not has_adapters(model) or model in _MERGED:
        yield model
        return
    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad(), _without_autocast(model):
            for layer in _adapted_layers(model):
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A)
                originals.append((weight, weight.detach().clone()))
                weight.add_(delta.to(weight.dtype))  # in place: a compiled decoder's graphs keep their addresses
        _MERGED.add(model)
        with model.disable_adapter():
            yield model
    finally:
        _MERGED.discard(model)
        with torch.no_grad():
            for weight, saved in originals:
                weight.copy_(saved)


def _without_autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """BA in the weights' precision even inside a bfloat16 autocast: computed there, a small update is lost
    before it is added (the forward still rounds W + BA to bfloat16, as an engine sampling in bfloat16 does)."""
    return torch.autocast(next(model.parameters()).device.type, enabled=False)


def _adapted_layers(model: PeftModel) -> list[LoraLayer]:
    """The LoRA-wrapped layers with an active adapter of their own, neither merged by PEFT already nor disabled
    (inside PEFT's `disable_adapter()` the base alone runs, and so it samples)."""
    return [module for module in model.modules() if isinstance(module, LoraLayer) and not module.merged
            and not module.disable_adapters and any(name in module.lora_A for name in module.active_adapters)]


def is_merged_for_sampling(model: torch.nn.Module) -> bool:
    return model in _MERGED


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under PEFT's wrapper (its class and config name the architecture), else `model`."""
    return model.get_base_model() if has_adapters(model) else model


def plain_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) as a checkpoint of the plain architecture names them (tied ones under each name): for a
    model with adapters, the base layers' weights without PEFT's `.base_layer` and without the adapters', which
    hold the merged weights only inside `merged_for_sampling` (refused outside it: an engine handed them would
    sample from the base without its adapters)."""
    named = base_of(model).named_parameters(remove_duplicate=False)
    if not has_adapters(model):
        return list(named)
    if not is_merged_for_sampling(model):
        raise RuntimeError("a model with LoRA adapters has plain weights only inside lora.merged_for_sampling")
    return [(name.replace(".base_layer.", "."), parameter) for name, parameter in named if ".lora_" not in name]
