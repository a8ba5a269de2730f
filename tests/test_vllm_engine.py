"""The vllm engine against our eager one, on tiny Llama and Qwen2 models: nested greedy rollouts token for token,
sampled log-probs, weights pushed after an update, and ReFT runs and an evaluation with --engine vllm.

Runs in .venv-vllm (`make test-vllm`); skipped where vllm is not installed. The models have a head size of 32,
the smallest vLLM's CPU attention takes (nested_reft.models.tiny's is 8). One engine serves the module (vLLM's start-up
is most of its time); it is rebuilt only when the model's config changes, and closed at the end.

Tolerance for log-probs, 1e-5: both sides run the same float32 model on the CPU, in kernels that sum in other
orders (vLLM's fused qkv and gate/up projections, its paged attention); the differences measured here are below
1e-6 on log-probs of about -5, a few float32 ulps of the logits, so 1e-5 fails on any real disagreement (a wrong
layer, stale weights: 1e-2 and more) and never on rounding.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

pytest.importorskip("vllm")

from conftest import fitted_bridges  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from nested_reft.tasks.arithmetic import generate_arithmetic  # noqa: E402
from nested_reft.cli import main  # noqa: E402
from nested_reft.config import ConfigError, SamplingConfig, load_config  # noqa: E402
from nested_reft.engines.choice import decoder_closed_after, decoder_for  # noqa: E402
from nested_reft.engines.eager import EagerDecoder  # noqa: E402
from nested_reft.models.loading import load_model  # noqa: E402
from nested_reft.nesting.layers import nested  # noqa: E402
from nested_reft.engines.logprobs import completion_logprobs  # noqa: E402
from nested_reft.engines.rollout import generate_rollouts  # noqa: E402
from nested_reft.training.rundir import METRICS_FILE  # noqa: E402
from nested_reft.tasks.task import Task  # noqa: E402
from nested_reft.models.tiny import byte_tokenizer, tiny_config  # noqa: E402
from nested_reft.training.trainer import ensure_trained, train  # noqa: E402

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-5
PROMPTS = ["hello there", "a", "what is 2+2?"]
SKIP_SETS = [(), (0,), (1, 2), (3,), (0, 3)]  # layer 0 and the last layer too: border 0


@pytest.fixture(scope="module", autouse=True)
def engine():
    """The process's vllm engine for this module, its KV cache sized outright (1 GiB) rather than as a share of
    the CPU's memory; closed at the end so that the module leaves no engine behind."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        with decoder_closed_after("vllm"):
            yield


def tiny_model(architecture: str, num_layers: int = 4, seed: int = 0, tied: bool = False):
    """nested_reft.models.tiny's model of `architecture` with a head size vLLM's CPU attention takes: 2 heads of 32;
    `tied`: the output head is the embedding (as SmolLM2's)."""
    tokenizer = byte_tokenizer()
    config = tiny_config(architecture, num_layers, vocab_size=len(tokenizer))
    config.tie_word_embeddings = tied
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 32
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def sampling(temperature: float = 0.0, tokens: int = 12, **overrides) -> SamplingConfig:
    return SamplingConfig(**{"temperature": temperature, "max_new_tokens": tokens, "min_new_tokens": 0,
                             "engine": "vllm", **overrides})


def both_engines(model, tokenizer, config: SamplingConfig, skip_set, seed: int = 1):
    """The same rollouts through vLLM and through the eager engine."""
    theirs = generate_rollouts(model, tokenizer, PROMPTS, 2, config, skip_set, torch.Generator().manual_seed(seed))
    ours = generate_rollouts(model, tokenizer, PROMPTS, 2, config, skip_set, torch.Generator().manual_seed(seed),
                             decoder=EagerDecoder())
    return theirs, ours


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_nested_greedy_rollouts_equal_the_eager_engines(architecture):
    model, tokenizer = tiny_model(architecture)
    for skip_set in SKIP_SETS:
        theirs, ours = both_engines(model, tokenizer, sampling(), skip_set)
        assert torch.equal(theirs.completion_ids, ours.completion_ids), skip_set
        assert torch.equal(theirs.completion_mask, ours.completion_mask), skip_set
        assert torch.allclose(theirs.behavior_logprobs, ours.behavior_logprobs, atol=TOLERANCE), skip_set
        assert theirs.skip_set == tuple(skip_set) and theirs.logprob_mismatch[1] < TOLERANCE


@pytest.mark.integration
def test_nested_greedy_rollouts_of_smollm2_equal_the_eager_engines():
    """The real model (30 layers, head size 64, tied embeddings): vLLM's kernels and ours, same tokens. Its
    log-probs differ more than the tiny models' (mean 1e-5 to 8e-5, max 2.5e-5 to 2.3e-3 over these skip sets,
    the largest skipping layer 0 or 1): 30 layers of float32 matrix products summed in other orders (oneDNN's
    on the CPU), amplified where a nested model runs off the activations it was trained on; 1e-2 still fails a
    wrong or stale layer (nats off)."""
    model, tokenizer = load_model("smollm2-135m-instruct")
    for skip_set in [(), (0,), (7, 19), (1, 12, 28)]:
        theirs, ours = both_engines(model, tokenizer, sampling(tokens=16), skip_set)
        assert torch.equal(theirs.completion_ids, ours.completion_ids), skip_set
        assert theirs.logprob_mismatch[1] < 1e-2, skip_set
    with torch.no_grad():  # an update: the tied head and embedding change too
        for parameter in model.parameters():
            parameter.mul_(1 + 0.02 * torch.randn_like(parameter))
    theirs, ours = both_engines(model, tokenizer, sampling(tokens=16), (7, 19))
    assert torch.equal(theirs.completion_ids, ours.completion_ids) and theirs.logprob_mismatch[1] < 1e-2


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_bridged_greedy_rollouts_equal_the_eager_engines(architecture):
    """vLLM runs each skipped layer's bridge in its place (`_BridgeLayer`): the same tokens and log-probs as our
    bridged nested model, and other completions than the same skip sets removed."""
    model, tokenizer = tiny_model(architecture)
    bridges = fitted_bridges(model, tokenizer, PROMPTS)
    differ = 0
    for skip_set in [skip_set for skip_set in SKIP_SETS if skip_set]:  # layer 0 (no residual yet) and the last too
        config, generator = sampling(), torch.Generator().manual_seed(1)
        theirs = generate_rollouts(model, tokenizer, PROMPTS, 2, config, skip_set, generator, bridges=bridges)
        ours = generate_rollouts(model, tokenizer, PROMPTS, 2, config, skip_set, torch.Generator().manual_seed(1),
                                 decoder=EagerDecoder(), bridges=bridges)
        removed = generate_rollouts(model, tokenizer, PROMPTS, 2, config, skip_set, torch.Generator().manual_seed(1))
        assert torch.equal(theirs.completion_ids, ours.completion_ids), skip_set
        assert torch.allclose(theirs.behavior_logprobs, ours.behavior_logprobs, atol=TOLERANCE), skip_set
        assert theirs.logprob_mismatch[1] < TOLERANCE, skip_set
        differ += not torch.equal(theirs.behavior_logprobs, removed.behavior_logprobs)
    assert differ > 0


@pytest.mark.integration
def test_bridged_greedy_rollouts_of_smollm2_equal_the_eager_engines():
    model, tokenizer = load_model("smollm2-135m-instruct")
    bridges = fitted_bridges(model, tokenizer, PROMPTS)
    for skip_set in [(7, 19), (1, 12, 28)]:
        theirs = generate_rollouts(model, tokenizer, PROMPTS, 2, sampling(tokens=16), skip_set, bridges=bridges)
        ours = generate_rollouts(model, tokenizer, PROMPTS, 2, sampling(tokens=16), skip_set, decoder=EagerDecoder(),
                                 bridges=bridges)
        assert torch.equal(theirs.completion_ids, ours.completion_ids), skip_set
        assert theirs.logprob_mismatch[1] < 1e-2, skip_set


def test_the_skip_sets_change_the_completions():
    """The swap reaches vLLM's forward: nested models that differ give other greedy completions."""
    model, tokenizer = tiny_model("llama")
    completions = {skip_set: both_engines(model, tokenizer, sampling(), skip_set)[0].completion_ids
                   for skip_set in SKIP_SETS}
    assert len({tuple(ids.flatten().tolist()) for ids in completions.values()}) == len(SKIP_SETS)


def test_the_engine_takes_its_length_from_the_sampling_config():
    """sampling.vllm_max_model_len sizes the engine (a new engine when it changes); None is the model's context."""
    model, tokenizer = tiny_model("llama")
    for length, expected in ((96, 96), (None, model.config.max_position_embeddings)):
        theirs, ours = both_engines(model, tokenizer, sampling(vllm_max_model_len=length), (1,))
        assert decoder_for("vllm")._llm.llm_engine.model_config.max_model_len == expected
        assert torch.equal(theirs.completion_ids, ours.completion_ids)


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.0, 1.0)])
def test_sampled_log_probs_are_ours_under_the_nested_model(temperature, top_p):
    model, tokenizer = tiny_model("llama")
    config = sampling(temperature, top_p=top_p)
    rollouts = generate_rollouts(model, tokenizer, PROMPTS, 4, config, (1,), torch.Generator().manual_seed(3))
    with torch.no_grad(), nested(model, (1,)):
        ours = completion_logprobs(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                   rollouts.completion_mask, temperature)
    mask = rollouts.completion_mask.bool()
    assert mask.sum() > 20
    assert (rollouts.behavior_logprobs - ours).abs()[mask].max() < TOLERANCE
    assert rollouts.logprob_mismatch[1] < TOLERANCE


def test_samples_are_reproducible_from_the_generator_and_differ_between_seeds():
    model, tokenizer = tiny_model("llama")
    first, again = (generate_rollouts(model, tokenizer, PROMPTS, 2, sampling(1.0), (), torch.Generator().manual_seed(5))
                    for _ in range(2))
    other = generate_rollouts(model, tokenizer, PROMPTS, 2, sampling(1.0), (), torch.Generator().manual_seed(6))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_min_new_tokens_bans_eos_and_vllm_renormalises_without_it():
    """Before min_new_tokens EOS is banned; vLLM's processed log-probs are of the distribution drawn from (EOS
    removed, renormalised), ours of the model's: the mismatch is log(1 - p(EOS)) per token, logged per step."""
    model, tokenizer = tiny_model("llama")
    config = sampling(1.0, tokens=8, min_new_tokens=8)
    rollouts = generate_rollouts(model, tokenizer, PROMPTS, 2, config, (), torch.Generator().manual_seed(2))
    assert rollouts.completion_mask.all() and not rollouts.finished.any()
    mean, largest = rollouts.logprob_mismatch
    assert 0 < mean <= largest < 0.05  # p(EOS) of a random model: about 1/len(vocabulary)


@pytest.mark.parametrize("tied", [False, True])
def test_the_engine_samples_from_weights_pushed_after_an_update(tied):
    model, tokenizer = tiny_model("llama", tied=tied)
    before = both_engines(model, tokenizer, sampling(), (1,))[0]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    after, eager = both_engines(model, tokenizer, sampling(), (1,))
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, eager.completion_ids)
    assert after.logprob_mismatch[1] < TOLERANCE


def test_a_layer_skipped_while_the_weights_changed_runs_the_new_weights_when_kept_again():
    """Skipped layers are not pushed: the first generation that keeps a layer again pushes its new weights."""
    model, tokenizer = tiny_model("llama")
    both_engines(model, tokenizer, sampling(), ())
    with torch.no_grad():
        for parameter in model.model.layers[2].parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    both_engines(model, tokenizer, sampling(), (2,))
    theirs, ours = both_engines(model, tokenizer, sampling(), ())
    assert torch.equal(theirs.completion_ids, ours.completion_ids)
    assert theirs.logprob_mismatch[1] < TOLERANCE


def test_lora_adapters_are_sampled_merged_into_the_engines_weights():
    """A model with LoRA adapters (B not zero) samples in vLLM what our engine samples through the adapters."""
    model, tokenizer = tiny_model("llama", seed=3)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False)).eval()
    through_adapters = dataclasses.replace(sampling(), merge_adapters=False)
    for skip_set in [(), (1, 2)]:
        theirs = generate_rollouts(adapted, tokenizer, PROMPTS, 2, sampling(), skip_set, torch.Generator())
        ours = generate_rollouts(adapted, tokenizer, PROMPTS, 2, through_adapters, skip_set, torch.Generator(),
                                 decoder=EagerDecoder())
        assert torch.equal(theirs.completion_ids, ours.completion_ids)
        assert theirs.logprob_mismatch[1] < TOLERANCE  # against our forward through the adapters
        with adapted.disable_adapter():  # the adapters matter: without them the model is measurably another
            base = generate_rollouts(adapted, tokenizer, PROMPTS, 2, sampling(), skip_set, torch.Generator())
        assert (base.behavior_logprobs - theirs.behavior_logprobs).abs().max() > 100 * TOLERANCE


PROBLEMS = generate_arithmetic(12, seed=1)


def run_config(model_dir, output_dir, **overrides):
    values = {
        "model": str(model_dir), "dataset": "arithmetic", "output_dir": str(output_dir), "rft_steps": 2,
        "batch_size": 2, "micro_batch_size": 4, "grpo.num_generations": 4, "grpo.learning_rate": 1e-2,
        "sampling.max_new_tokens": 6, "sampling.min_new_tokens": 0, "nesting.skip_ratio": 0.3,
        "nesting.border": 0, "sft.epochs": 0, "save_steps": 1000, "sampling.engine": "vllm",
    }
    values.update(overrides)
    return load_config(None, values)


def lowercase_share(completion: str, gold: str) -> float:
    """A varied reward a random byte-level model earns now and then, so that every step updates."""
    return sum(ch.islower() for ch in completion) / max(len(completion), 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_reft_run_samples_from_each_steps_weights_and_its_final_model_matches_the_eager_engine(model_dir, tmp_path):
    output = tmp_path / "run"
    summary = train(run_config(model_dir, output), Task("tiny", list(PROBLEMS), reward=lowercase_share))
    rows = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    assert summary["steps"] == 2 and [row["step"] for row in rows] == [1, 2]
    assert all(row["grad_norm"] > 0 and not row["update_skipped"] for row in rows)
    # step 2 sampled after step 1's update: a stale engine would disagree with our model far beyond rounding
    assert all(row["engine_logprob_diff_max"] < TOLERANCE for row in rows)
    assert all(len(row["skip_set"]) == 1 for row in rows)

    final, tokenizer = load_model(str(output / "model"))
    theirs, ours = both_engines(final, tokenizer, sampling(), (1,))
    assert torch.equal(theirs.completion_ids, ours.completion_ids)
    initial, _ = load_model(str(model_dir))
    assert not torch.equal(both_engines(initial, tokenizer, sampling(), (1,))[0].completion_ids, theirs.completion_ids)


def test_a_lora_run_pushes_its_merged_weights_before_every_generation(model_dir, tmp_path):
    output = tmp_path / "run"
    train(run_config(model_dir, output, **{"lora.r": 4}), Task("tiny", list(PROBLEMS), reward=lowercase_share))
    rows = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and not rows[0]["update_skipped"]
    # step 2 samples after step 1 moved B off 0: the base's weights alone would disagree far beyond rounding
    assert all(row["engine_logprob_diff_max"] < TOLERANCE for row in rows)


def test_nested_reft_eval_with_engine_vllm_finishes(model_dir, tmp_path):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    rows = [{"question": f"What is {i} + 1?", "answer": f"Add.\n#### {i + 1}"} for i in range(3)]
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["eval", "--model", str(model_dir), "--benchmarks", "gsm8k", "--engine", "vllm",
                 "--max-new-tokens", "6", "--batch-size", "2", "--data-dir", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["config"]["engine"] == "vllm"
    assert result["benchmarks"]["gsm8k"]["n"] == 3 and result["timing"]["generated_tokens"] > 0


class Killed(Exception):
    """Stands in for the process being killed."""


RESUMED_KEYS = ("step", "skip_set", "reward_mean", "loss", "grad_norm", "h_mean", "h_max", "kl_behavior_target",
                "tokens_generated", "engine_logprob_diff_max")
# kl_target changes U between steps: the swap takes any skip set, so the engine supports it (not refused)
RESUMED_RUN = {"rft_steps": 4, "save_steps": 2, "importance.mitigation": "base", "nesting.skip_policy": "kl_target",
               "nesting.kl_target": 0.005, "nesting.kl_retry_steps": 2}


@pytest.fixture(scope="module")
def whole_run(model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("whole") / "run"
    train(run_config(model_dir, output, **RESUMED_RUN), Task("tiny", list(PROBLEMS), reward=lowercase_share))
    return [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]


def assert_same_run(rows, whole):
    assert [row["step"] for row in rows] == [row["step"] for row in whole]
    for row, other in zip(rows, whole):
        for key in RESUMED_KEYS:
            assert row[key] == pytest.approx(other[key], abs=1e-6), (row["step"], key)


def test_a_resumed_run_rebuilds_the_engine_and_equals_the_uninterrupted_one(model_dir, whole_run, tmp_path):
    calls = []

    def killed_after_step_3(completion, gold):
        calls.append(None)
        if len(calls) > 3 * 2 * 4:
            raise Killed
        return lowercase_share(completion, gold)

    config = run_config(model_dir, tmp_path / "run", **RESUMED_RUN)
    with pytest.raises(Killed):
        train(config, Task("tiny", list(PROBLEMS), reward=killed_after_step_3))
    train(config, Task("tiny", list(PROBLEMS), reward=lowercase_share), resume=True)
    assert_same_run([json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()],
                    whole_run)


def test_a_run_stopped_mid_generation_leaves_nothing_that_blocks_the_rerun(model_dir, whole_run, tmp_path,
                                                                          monkeypatch):
    """Stopped inside vLLM's generation loop with its requests queued: the engine is shut down with the run, so
    the rerun in this process (as a sweep's `ensure_trained` does) starts a clean one and equals the whole run."""
    import vllm

    run_engine, calls = vllm.LLM._run_engine, []

    def stopped_in_the_second_generation(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise Killed
        return run_engine(self, *args, **kwargs)

    monkeypatch.setattr(vllm.LLM, "_run_engine", stopped_in_the_second_generation)
    config = run_config(model_dir, tmp_path / "run", **RESUMED_RUN)
    with pytest.raises(Killed):
        train(config, Task("tiny", list(PROBLEMS), reward=lowercase_share))
    ensure_trained(config, Task("tiny", list(PROBLEMS), reward=lowercase_share))
    assert_same_run([json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()],
                    whole_run)


def test_models_whose_vllm_layers_cannot_be_skipped_are_refused_by_name():
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ConfigError, match="cannot skip the layers of vLLM's GPT2LMHeadModel"):
        generate_rollouts(model, tokenizer, PROMPTS, 1, sampling(), (1,))
