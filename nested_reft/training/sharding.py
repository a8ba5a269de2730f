"""FSDP2: the weights, gradients and AdamW state of full fine-tuning sharded over the ranks.

Why: Qwen2.5-Math-7B trained in full keeps float32 weights, gradients and two AdamW moments, about 16 bytes a
parameter (122 GB): more than one 80 GB GPU holds, and DDP replicates all of it on every rank. Sharded over W
ranks each holds 1/W of it (docs/scaling.md has the figures by component).

How it is launched: `accelerate launch --config_file configs/accelerate/fsdp2.yaml -m nested_reft.cli train ...`
(on CPU also `ACCELERATE_USE_CPU=1`). The launch puts ACCELERATE_USE_FSDP and FSDP_VERSION=2 into every rank's
environment, and accelerate's `FullyShardedDataParallelPlugin` reads its options from there (`fsdp2_of_launch`).

Why we apply `torch.distributed.fsdp.fully_shard` ourselves rather than through accelerate's FSDP2 plugin
(accelerate 1.15):
- on CPU accelerate ignores an FSDP launch: `AcceleratorState` turns FSDP on for GPU-like devices only, so
  over gloo the same config silently trains with DDP, and what the tests run would not be what a GPU runs;
- with FSDP2, accelerate prepares a model only together with its optimizer and once (`prepare(model,
  optimizer)`; `prepare_model` alone raises), while the trainer prepares the model before the SFT warm-up and
  then makes two optimizers, SFT's and ReFT's.
So `FSDP2.shard` wraps every decoder layer in its own FSDP unit, then the root (embeddings, final norm, head),
inside accelerate's process group; accelerate never prepares the model, so it wraps nothing in DDP. Accelerate
still runs the rest: the process group, autocast, gather/reduce and its DTensor-aware gradient clipping.

Per-layer units are what nested rollouts need: a step's generation gathers the root and the kept layers once,
keeps them whole for every decoded token and releases them after (as TRL's `unwrap_model_for_generation` does
for ZeRO-3); the skipped layers never run, so they are never gathered (`FSDP2.gathered_for_generation`).

Numerics equal DDP's: weights are gathered in float32 (no FSDP `MixedPrecisionPolicy`) and `dtype` runs the
compute under accelerate's autocast, as without sharding. Gradients are reduce-scattered after every
micro-batch's backward (`deferred_gradient_sync`): holding them whole between micro-batches would hold the
DDP-sized gradients that sharding is here to remove.

Checkpoints and the final model stay what they are under DDP: full safetensors that `from_pretrained` loads and
an optimizer state keyed by parameter index, gathered onto the main process by
`torch.distributed.checkpoint.state_dict` and written there; every rank reads them back on resume (so the files
of either launch resume under the other).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from nested_reft.config import ConfigError, TrainConfig
from nested_reft.nesting.layers import decoder_layers

_GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the main process's CPU
_FROM_WHOLE = StateDictOptions(full_state_dict=True, strict=False)  # tied weights are saved once


@dataclass(frozen=True)
class FSDP2:
    """A run's sharding, from its launch config: each decoder layer an FSDP unit, then the root."""

    # fsdp_reshard_after_forward: free each layer's gathered weights after its forward (not only after backward)
    reshard_after_forward: bool = True

    def shard(self, model: nn.Module) -> nn.Module:
        """Shard `model` in place over the process group (every rank holds 1/world of each weight).

        FSDP2 fixes the modules it manages at the first forward through the root. The sampler's first forward
        runs nested, with the skipped layers out of the module tree, so one token runs through the whole model
        here, before anything else does.
        """
        for layer in decoder_layers(model)[2]:
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model)
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=_device(model)))
        model.reshard()
        return model

    @contextlib.contextmanager
    def gathered_for_generation(self, model: nn.Module, skip_set: Sequence[int]) -> Iterator[int]:
        """Gather the root and the layers outside `skip_set` once, keep them whole for the body, release them
        after; yields the bytes gathered per rank (`generation_gather_bytes`)."""
        layers = decoder_layers(model)[2]
        kept = [layer for index, layer in enumerate(layers) if index not in set(skip_set)]
        try:
            model.unshard()
            for layer in kept:
                layer.set_reshard_after_forward(False, recurse=False)
                layer.unshard()
            yield generation_gather_bytes(model, skip_set)
        finally:
            for layer in kept:
                layer.reshard()
                layer.set_reshard_after_forward(self.reshard_after_forward, recurse=False)
            model.reshard()


def fsdp2_of_launch() -> FSDP2 | None:
    """The launch's FSDP2 settings (configs/accelerate/fsdp2.yaml), or None when it did not ask for FSDP.

    Read by accelerate's plugin from the environment `accelerate launch` gave every rank (on CPU the accelerator
    itself has no plugin). FSDP options this trainer cannot honour are refused, each naming its launch-config key.
    """
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return None
    plugin = FullyShardedDataParallelPlugin()
    refusals = {
        "fsdp_version": (plugin.fsdp_version != 2, f"2 (FSDP2), got {plugin.fsdp_version}: FSDP1's flat parameters "
                         "hide the decoder layers that nested rollouts skip; use configs/accelerate/fsdp2.yaml"),
        "fsdp_offload_params": (isinstance(plugin.cpu_offload, CPUOffloadPolicy),
                                "false: offloaded weights are not supported by the sampler's gathering"),
        "fsdp_activation_checkpointing": (plugin.activation_checkpointing,
                                          "false: set the run's gradient_checkpointing option instead"),
        "fsdp_cpu_ram_efficient_loading": (plugin.cpu_ram_efficient_loading,
                                           "false: it leaves the weights on rank 0 only, and every rank loads them"),
    }
    _refuse_first(refusals, " in the accelerate launch config")
    return FSDP2(reshard_after_forward=bool(plugin.reshard_after_forward))


def check_fits_fsdp2(config: TrainConfig, world: int) -> None:
    """Refuse, before anything is loaded, the options an FSDP2 run cannot honour (naming them)."""
    refusals = {
        "number of processes": (world < 2, f"at least 2 under FSDP2 (got {world}): one process has nothing to "
                                "shard over; launch without configs/accelerate/fsdp2.yaml"),
        "model": (config.model.endswith(".gguf"), f"a model directory, hub id or alias under FSDP2, not the GGUF file "
                  f"{config.model!r}: every rank would dequantise it; convert it once (save_pretrained)"),
        "lora.r": (config.lora.r > 0, f"0 under FSDP2 (got {config.lora.r}): sharded adapters are not supported; "
                   "LoRA fits 7B on one GPU, or use DDP (configs/accelerate/ddp.yaml)"),
        "grpo.beta": (config.grpo.beta > 0, f"0 under FSDP2 (got {config.grpo.beta}): the frozen KL reference "
                      "would be a whole, unsharded copy on every rank"),
        "dtype": (config.dtype == "float16", "float32 or bfloat16 under FSDP2: accelerate's gradient clipping "
                  "unscales the float16 gradients of a model it did not prepare twice"),
    }
    _refuse_first(refusals)


def _refuse_first(refusals: dict[str, tuple[bool, str]], where: str = "") -> None:
    """A ConfigError "<option><where> must be <expected>" for the first refused option of {option: (refused,
    expected)}."""
    for option, (refused, expected) in refusals.items():
        if refused:
            raise ConfigError(f"{option}{where} must be {expected}")


def is_fully_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def deferred_gradient_sync(model: nn.Module, accelerator):
    """Where gradients accumulate over micro-batches before the last one's backward: unsynchronised under DDP
    (accelerate's `no_sync`); under FSDP2 they are reduce-scattered every time, so they stay sharded."""
    return contextlib.nullcontext() if is_fully_sharded(model) else accelerator.no_sync(model)


def generation_gather_bytes(model: nn.Module, skip_set: Sequence[int]) -> int:
    """Bytes of whole weights a rank holds while a step generates: every weight but the skipped layers' (0 for a
    model that is not sharded: it gathers nothing)."""
    if not is_fully_sharded(model):
        return 0
    layers = decoder_layers(model)[2]
    skipped = sum(_bytes(parameter) for index in skip_set for parameter in layers[index].parameters())
    return sum(_bytes(parameter) for parameter in model.parameters()) - skipped


def gathered_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole weights on the main process's CPU (every rank must call it; the others get {}),
    or None for a model that is whole on every rank (`save_pretrained` reads it itself)."""
    return get_model_state_dict(model, options=_GATHERED) if is_fully_sharded(model) else None


def gathered_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """A sharded model's whole (weights, optimizer state) on the main process, the optimizer's keyed by parameter
    index as `optimizer.state_dict()` keys it (every rank must call it; the others get ({}, {})); None when the
    model is not sharded."""
    if not is_fully_sharded(model):
        return None
    by_name = get_optimizer_state_dict(model, _unwrapped(optimizer), options=_GATHERED)
    return gathered_weights(model), _keyed_by_index(by_name) if by_name else {}


def _keyed_by_index(by_name: dict) -> dict:
    """An optimizer state keyed by parameter name (`get_optimizer_state_dict`) keyed by index instead."""
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    return _rekeyed(by_name, {name: index for index, name in enumerate(names)})


def _rekeyed(state: dict, new_key: dict) -> dict:
    """`state` (an optimizer state dict) with every parameter key k replaced by new_key[k]."""
    return {
        "state": {new_key[key]: values for key, values in state["state"].items()},
        "param_groups": [{**group, "params": [new_key[key] for key in group["params"]]}
                         for group in state["param_groups"]],
    }


def load_whole_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Shard whole `weights` (every rank holds them) into a sharded model; returns (missing, unexpected) keys."""
    result = set_model_state_dict(model, weights, options=_FROM_WHOLE)
    return list(result.missing_keys), list(result.unexpected_keys)


def load_whole_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard an index-keyed, whole optimizer state (as `optimizer.state_dict()` writes it) into `optimizer`."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    order = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    by_name = _rekeyed(state, dict(enumerate(order)))
    set_optimizer_state_dict(model, _unwrapped(optimizer), by_name, options=_FROM_WHOLE)


@dataclass(frozen=True)
class Footprint:
    """Bytes this rank holds for training, counted from its local shards (the whole tensor when not sharded)."""

    parameters: int
    gradients: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state


def training_footprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Footprint:
    """This rank's bytes of parameters, of the gradients present now, and of the optimizer's state."""
    parameters = list(model.parameters())
    states = _unwrapped(optimizer).state.values() if optimizer is not None else []
    return Footprint(
        parameters=sum(_local_bytes(p) for p in parameters),
        gradients=sum(_local_bytes(p.grad) for p in parameters if p.grad is not None),
        optimizer_state=sum(_local_bytes(value) for state in states for value in state.values()
                            if isinstance(value, torch.Tensor)),
    )


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _bytes(tensor: torch.Tensor) -> int:
    """The whole tensor's bytes (a DTensor's numel is its global one)."""
    return tensor.numel() * tensor.element_size()


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters())
    return parameter.to_local().device if isinstance(parameter, DTensor) else parameter.device
