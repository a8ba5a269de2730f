"""scripts/scaling.py's counts against the models torch and PEFT build: parameters, LoRA adapters, and the bytes
autograd keeps per token and layer under bfloat16 autocast (read by a saved-tensors hook)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


SMALL = dict(hidden=128, layers=2, intermediate=352, heads=8, kv_heads=2, vocab=300)


def small_qwen2(tied: bool) -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        hidden_size=SMALL["hidden"], intermediate_size=SMALL["intermediate"], num_hidden_layers=SMALL["layers"],
        num_attention_heads=SMALL["heads"], num_key_value_heads=SMALL["kv_heads"], vocab_size=SMALL["vocab"],
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_are_those_of_the_built_model(scaling, tied):
    from nested_reft.config import LoRAConfig
    from nested_reft.models.lora import add_adapters
    from nested_reft.training.optim import trainable_parameters

    shape = scaling.Model("small", **SMALL, tied_embeddings=tied)
    model = small_qwen2(tied)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    adapted = add_adapters(model, LoRAConfig(r=4))
    assert shape.lora_parameters(4) == sum(p.numel() for p in trainable_parameters(adapted))
    adapted_weights = [m.get_base_layer().weight for m in adapted.modules() if hasattr(m, "lora_A")]
    assert shape.linear_weights == sum(weight.numel() for weight in adapted_weights)  # what the merge copies


def test_the_paper_models_have_their_published_sizes(scaling):
    assert scaling.QWEN_MATH_1_5B.parameters == 1_543_714_304  # Qwen2.5-1.5B's count
    assert scaling.QWEN_MATH_7B.parameters / 1e9 == pytest.approx(7.61, abs=0.01)


def test_activation_bytes_per_token_are_what_autograd_keeps(scaling):
    """Saved-tensor bytes of the decoder layers at two lengths: their difference is per token (the weights' autocast
    copies do not grow with length); the attention mask's growth is the few percent left."""
    model = small_qwen2(tied=False)
    per_token = (saved_bytes(model, length=128) - saved_bytes(model, length=64)) / (2 * 64 * SMALL["layers"])
    expected = scaling.activation_bytes_per_token(scaling.Model("small", **SMALL, tied_embeddings=False))
    assert per_token == pytest.approx(expected, rel=0.03)


def saved_bytes(model, length: int, batch: int = 2) -> int:
    """Bytes of the distinct storages autograd saves in a bf16-autocast forward of the decoder (no head)."""
    ids = torch.randint(0, SMALL["vocab"], (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as in training: the masked SDPA path
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask)
    return sum(storages.values())


def test_a_step_fits_only_with_the_measured_margin_to_spare(scaling):
    """The modelled peaks undercount a GPU's by up to 22% (H200): 70 GB modelled is too much for 80 GB."""
    peak = {"generation": 20 * scaling.GB, "training, no checkpointing": 70 * scaling.GB,
            "training, checkpointing": 30 * scaling.GB}
    assert scaling.verdict(peak, 80 * scaling.GB, margin=1.0) == "fits"
    assert scaling.verdict(peak, 80 * scaling.GB) == "fits with gradient checkpointing"
    assert scaling.verdict(peak, 30 * scaling.GB) == "does not fit"
