"""What the vllm engine refuses by name: checked before vLLM is imported, so these run without it installed."""

from __future__ import annotations

import pytest

from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.config import ConfigError, SamplingConfig, load_config
from nested_reft.training.rundir import CONFIG_FILE
from nested_reft.tasks.task import Task
from nested_reft.models.tiny import tiny_model
from nested_reft.training.trainer import train
from nested_reft.engines.vllm_engine import check_vllm_supports


def test_unmerged_lora_adapters_are_refused_before_the_run_writes_anything(tmp_path):
    config = load_config(None, {"model": "tiny-llama", "dataset": "arithmetic", "output_dir": str(tmp_path / "run"),
                                "rft_steps": 1, "batch_size": 2, "sft.epochs": 0, "lora.r": 4,
                                "sampling.engine": "vllm", "sampling.merge_adapters": False})
    with pytest.raises(ConfigError, match=r"sampling.engine=vllm samples from LoRA adapters merged .* only"):
        train(config, Task("tiny", generate_arithmetic(4, seed=1)))
    assert not (tmp_path / "run" / CONFIG_FILE).exists()


def test_several_processes_are_refused():
    model, _ = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"sampling.engine=vllm runs one engine in one process, but 2 processes"):
        check_vllm_supports(model, world=2)


def test_hybrid_attention_models_are_refused_and_single_type_ones_pass():
    with pytest.raises(ConfigError, match=r"does not support hybrid-attention models \(Gemma2ForCausalLM"):
        check_vllm_supports(tiny_model("gemma2")[0])
    for architecture in ("llama", "qwen2", "qwen3"):  # layer_types of one kind, or none
        check_vllm_supports(tiny_model(architecture)[0])


def test_an_engine_length_that_leaves_no_room_for_the_completion_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"sampling\.vllm_max_model_len .*max_new_tokens=64, got 64"):
        SamplingConfig(max_new_tokens=64, min_new_tokens=0, vllm_max_model_len=64)
