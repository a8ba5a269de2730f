"""LoRA: only the adapters train, nested models skip adapted blocks exactly, and the saved model is the merged one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from conftest import truncated_copy
from peft import LoraConfig, PeftModel, get_peft_model

import nested_reft.trainer as trainer
from nested_reft.arithmetic import generate_arithmetic
from nested_reft.config import ConfigError, LoRAConfig, load_config
from nested_reft.lora import add_adapters
from nested_reft.nesting import nested
from nested_reft.rundir import ADAPTER_DIR, FINAL_MODEL_DIR
from nested_reft.tasks import Task
from nested_reft.tiny import tiny_model

PROBLEMS = generate_arithmetic(8, seed=2)


def lowercase_share(completion: str, gold: str) -> float:
    return sum(ch.islower() for ch in completion) / max(len(completion), 1)


def config_for(output, **overrides):
    values = {"model": "tiny-llama", "output_dir": str(output), "rft_steps": 2, "batch_size": 2,
              "micro_batch_size": 8, "grpo.num_generations": 4, "grpo.learning_rate": 1e-2,
              "sampling.max_new_tokens": 6, "sampling.min_new_tokens": 6, "nesting.skip_ratio": 0.3, "sft.epochs": 0,
              "lora.r": 4, "save_steps": 1}
    return load_config(None, {**values, **overrides})


def random_adapters(architecture: str) -> PeftModel:
    """A tiny model with LoRA adapters whose B is not zero, so they change every adapted layer's output."""
    model, _ = tiny_model(architecture, num_layers=5, seed=0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config).eval()


@pytest.mark.parametrize("architecture", ["llama", "gemma2", "gpt2"])
def test_a_nested_adapted_model_equals_a_truncated_copy_of_the_merged_model(architecture):
    adapted = random_adapters(architecture)
    merged = copy.deepcopy(adapted).merge_and_unload()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        with adapted.disable_adapter():  # the adapters matter: the comparison below would catch them skipped
            assert not torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
        for skip in [(0,), (1, 3), (4,)]:
            with nested(adapted, skip):
                logits = adapted(input_ids=ids, attention_mask=mask).logits
            reference = truncated_copy(merged, skip)(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_a_lora_run_trains_only_the_adapters_and_saves_the_merged_model(tmp_path, monkeypatch):
    before, after = [], []
    update = trainer.policy_update

    def recording(state, *args, **kwargs):
        before.append({n: p.detach().clone() for n, p in state.model.named_parameters()})
        result = update(state, *args, **kwargs)
        after.append({n: p.detach().clone() for n, p in state.model.named_parameters()})
        return result

    monkeypatch.setattr(trainer, "policy_update", recording)
    output = tmp_path / "run"
    trainer.train(config_for(output), Task("tiny", list(PROBLEMS), reward=lowercase_share))
    changed = {name for name in before[0] if not torch.equal(before[0][name], after[-1][name])}
    assert changed and all(".lora_" in name for name in changed)  # only adapter weights moved
    assert any(".lora_B." in name for name in changed)  # B starts at 0: moving it is what changes the model

    saved = transformers.AutoModelForCausalLM.from_pretrained(output / FINAL_MODEL_DIR)  # plain transformers
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = tiny_model("llama", num_layers=6, seed=0)[0].eval()(input_ids=ids).logits
        base = tiny_model("llama", num_layers=6, seed=0)[0]
        adapted = PeftModel.from_pretrained(base, output / ADAPTER_DIR).eval()
        torch.testing.assert_close(saved(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(saved(input_ids=ids).logits, base_logits, atol=1e-6)  # training changed it
    assert json.loads((output / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 4


def adapter_dropouts(model) -> set[float]:
    """The probabilities of PEFT's dropout before each adapter (`lora_dropout`)."""
    return {module.p for name, module in model.named_modules()
            if ".lora_dropout." in name and isinstance(module, torch.nn.Dropout)}


@pytest.mark.parametrize("disable_dropout, in_reft", [(True, 0.0), (False, 0.5)])
def test_lora_dropout_acts_in_reft_only_without_grpo_disable_dropout(tmp_path, monkeypatch, disable_dropout, in_reft):
    """What config.py says beside lora.dropout: the warm-up always draws it; ReFT only with disable_dropout off."""
    seen = {"sft": set(), "reft": set()}

    def spy(name, phase, model_of):
        wrapped = getattr(trainer, name)

        def call(first, *args, **kwargs):
            seen[phase] |= adapter_dropouts(model_of(first))
            return wrapped(first, *args, **kwargs)
        monkeypatch.setattr(trainer, name, call)

    spy("sft_warmup", "sft", lambda model: model)
    spy("policy_update", "reft", lambda state: state.model)
    config = config_for(tmp_path / "run", **{"lora.dropout": 0.5, "sft.epochs": 1, "sft.max_examples": 2,
                                             "rft_steps": 1, "grpo.disable_dropout": disable_dropout})
    trainer.train(config, Task("tiny", list(PROBLEMS), reward=lowercase_share))
    assert seen == {"sft": {0.5}, "reft": {in_reft}}


def test_lora_with_a_kl_reference_is_refused_naming_both_options():
    with pytest.raises(ConfigError, match=r"grpo.beta must be 0 with LoRA \(lora.r > 0\)"):
        load_config(None, {"lora.r": 8, "grpo.beta": 0.04})


def test_add_adapters_targets_every_linear_layer_of_the_blocks_and_freezes_the_rest():
    model, _ = tiny_model("qwen2", num_layers=2, seed=0)
    adapted = add_adapters(model, LoRAConfig(r=2))
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    adapted_layers = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted_layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
