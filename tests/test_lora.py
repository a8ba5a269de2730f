"""LoRA: only the adapters train, nested models skip adapted blocks exactly, and the saved model is the merged one."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import truncated_copy
from peft import LoraConfig, PeftModel, get_peft_model

import nested_reft.training.trainer as trainer
from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.config import ConfigError, LoRAConfig, SamplingConfig, load_config
from nested_reft.engines.compiled import CompiledDecoder
from nested_reft.engines.eager import EagerDecoder
from nested_reft.models.lora import add_adapters, is_merged_for_sampling, merged_for_sampling, plain_named_parameters
from nested_reft.nesting.layers import nested
from nested_reft.training.rundir import ADAPTER_DIR, FINAL_MODEL_DIR
from nested_reft.engines.rollout import generate_rollouts
from nested_reft.tasks.task import Task
from nested_reft.models.tiny import tiny_model

PROBLEMS = generate_arithmetic(8, seed=2)
ROOT = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------------------------------------
# Rollouts from the adapters merged into a copy of the base weights
# ----------------------------------------------------------------------------------------------------------


def adapter_calls(model: PeftModel) -> list[str]:
    """A list that grows by one entry each time an adapter's A matrix runs."""
    calls: list[str] = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *args, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # gpt2: Conv1D, whose weight is stored transposed
def test_merged_for_sampling_is_the_adapted_model_at_one_matmul_per_layer_and_restores_the_base_bit_for_bit(
        architecture):
    adapted = random_adapters(architecture)
    calls = adapter_calls(adapted)
    weights = {name: parameter.detach().clone() for name, parameter in adapted.named_parameters()}
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        through_adapters = {skip: _logits(adapted, ids, skip) for skip in [(), (1, 3)]}
        assert calls
        calls.clear()
        with merged_for_sampling(adapted) as model:
            assert model is adapted and is_merged_for_sampling(adapted)
            with merged_for_sampling(adapted):  # re-entered: merged once, not twice
                merged = {skip: _logits(adapted, ids, skip) for skip in through_adapters}
        assert calls == []  # no adapter ran inside
        for skip, logits in through_adapters.items():
            torch.testing.assert_close(merged[skip], logits, atol=1e-5, rtol=1e-5)
        assert not is_merged_for_sampling(adapted)
        assert all(torch.equal(parameter, weights[name]) for name, parameter in adapted.named_parameters())
        torch.testing.assert_close(_logits(adapted, ids, ()), through_adapters[()], atol=0, rtol=0)  # adapters back


def _logits(model, ids, skip):
    with nested(model, skip):
        return model(input_ids=ids).logits


def test_an_error_inside_the_merge_leaves_the_adapted_model_as_it_was():
    adapted = random_adapters("llama")
    weights = {name: parameter.detach().clone() for name, parameter in adapted.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), merged_for_sampling(adapted):
        raise RuntimeError("boom")
    assert not is_merged_for_sampling(adapted) and adapter_calls(adapted) == []
    assert all(torch.equal(parameter, weights[name]) for name, parameter in adapted.named_parameters())
    calls = adapter_calls(adapted)
    with torch.no_grad():
        adapted(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls  # the adapters run again


def test_disabled_adapters_are_not_merged_in():
    adapted = random_adapters("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), adapted.disable_adapter():
        base = adapted(input_ids=ids).logits
        with merged_for_sampling(adapted):
            torch.testing.assert_close(adapted(input_ids=ids).logits, base, atol=0, rtol=0)


def test_plain_named_parameters_are_the_merged_models_under_its_own_names_and_only_inside_the_merge():
    adapted = random_adapters("llama")
    reference = dict(copy.deepcopy(adapted).merge_and_unload().named_parameters(remove_duplicate=False))
    with pytest.raises(RuntimeError, match="only inside lora.merged_for_sampling"):
        plain_named_parameters(adapted)
    with merged_for_sampling(adapted):
        plain = dict(plain_named_parameters(adapted))
        assert plain.keys() == reference.keys()
        for name, parameter in plain.items():
            torch.testing.assert_close(parameter, reference[name], atol=1e-6, rtol=1e-6)
    model, _ = tiny_model("llama")  # no adapters: its own parameters
    assert [name for name, _ in plain_named_parameters(model)] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("decoder", [EagerDecoder, lambda: CompiledDecoder(backend="aot_eager")],
                         ids=["eager", "compiled"])  # aot_eager: dynamo's graphs and guards without Inductor's minute
def test_rollouts_sampled_merged_equal_those_sampled_through_the_adapters(decoder):
    adapted = random_adapters("llama")
    _, tokenizer = tiny_model("llama")
    weights = {name: parameter.detach().clone() for name, parameter in adapted.named_parameters()}
    merged_config = SamplingConfig(temperature=0.0, max_new_tokens=8, min_new_tokens=0)
    runs, calls = {}, adapter_calls(adapted)
    for merge in (True, False):
        config = SamplingConfig(**{**merged_config.__dict__, "merge_adapters": merge})
        runs[merge] = generate_rollouts(adapted, tokenizer, ["12+3=", "a"], 2, config, (1,), decoder=decoder())
        assert bool(calls) is not merge  # merged: no adapter ran; through them: they did
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    torch.testing.assert_close(runs[True].behavior_logprobs, runs[False].behavior_logprobs, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(parameter, weights[name]) for name, parameter in adapted.named_parameters())


def test_the_lora_rollout_bench_runs_every_setup_and_checks_merged_against_the_adapters(capsys):
    spec = importlib.util.spec_from_file_location("lora_rollouts", ROOT / "bench" / "lora_rollouts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", "tiny-llama", "--rank", "2", "--batch", "2", "--tokens", "4", "--repeats", "1",
                "--skip-ratio", "0.5"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row[0].strip() for row in rows] == ["no adapters", "through adapters", "merged"]
    assert rows[1][3].strip() == "1.000" and all(float(row[1]) > 0 for row in rows)
