"""LoRA adapters through PEFT: train low-rank adapters of the blocks' linear layers instead of every weight.

What a one-GPU user runs on 7B (TRL's `peft_config`). The nested model skips adapted blocks like any other:
PEFT wraps the linear layers inside the blocks, so the block list and its skipping are untouched. Only the
adapters train; checkpoints hold the adapters; a finished run leaves `adapter/` (PEFT's format) and `model/`,
the base with the adapters merged in, which `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

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
