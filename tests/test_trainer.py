"""The ReFT loop on tiny models: updates, bookkeeping, nesting, resumption, failure handling, learning."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import string

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import GradientRecorder, NoSchedule
from safetensors.torch import load_file

import nested_reft.training.data_order as data_order
import nested_reft.training.startup as startup
import nested_reft.training.trainer as trainer
import nested_reft.training.update as update_module
from nested_reft.training.checkpoint import CheckpointError, checkpoints, latest_checkpoint
from nested_reft.config import ConfigError, load_config
from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.models.loading import TINY_NUM_LAYERS, TINY_SEED
from nested_reft.nesting.layers import num_skipped_layers
from nested_reft.tasks.prompts import build_prompt
from nested_reft.engines.rollout import generate_rollouts
from nested_reft.store.seeding import seeded_generator, step_generator
from nested_reft.tasks.task import Task
from nested_reft.models.tiny import tiny_model
from nested_reft.training.metrics import SELECTION_FIELDS, StepMetrics
from nested_reft.training.rundir import CONFIG_FILE, METRICS_FILE, SFT_MODEL_DIR, SUMMARY_FILE
from nested_reft.training.trainer import train
from nested_reft.training.update import TrainingState

B, G, T = 2, 4, 6  # prompts per step, completions per prompt, tokens per completion (min = max)
PROBLEMS = generate_arithmetic(24, seed=1)
LOWERCASE = set(string.ascii_lowercase)



def lowercase_share(completion: str, gold: str) -> float:
    """A reward a random byte-level model earns now and then (about 1 character in 10): learnable, varied."""
    return sum(ch in LOWERCASE for ch in completion) / max(len(completion), 1)


def lowercase_if_even(completion: str, gold: str) -> float:
    """lowercase_share on problems with an even answer, 0 on the others: their groups never teach."""
    return lowercase_share(completion, gold) if int(gold) % 2 == 0 else 0.0


def config_for(output_dir, **overrides):
    values = {
        "model": "tiny-llama", "dataset": "arithmetic", "output_dir": str(output_dir), "rft_steps": 2,
        "batch_size": B, "micro_batch_size": 4, "grpo.num_generations": G, "grpo.learning_rate": 1e-3,
        "sampling.max_new_tokens": T, "sampling.min_new_tokens": T, "nesting.skip_ratio": 0.3,
        "nesting.border": 1, "importance.mitigation": "retrace", "sft.epochs": 0, "save_steps": 1000,
    }
    values.update(overrides)
    return load_config(None, values)


def run(output_dir, reward=lowercase_share, resume=False, **overrides):
    """Train; return (summary, metric rows)."""
    summary = train(config_for(output_dir, **overrides), Task("tiny", list(PROBLEMS), reward=reward), resume=resume)
    return summary, metrics(output_dir)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]


def initial_weights() -> dict[str, torch.Tensor]:
    return tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED)[0].state_dict()


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model" / "model.safetensors")


def changed(a: dict, b: dict) -> set[str]:
    return {name for name in a if not torch.equal(a[name], b[name])}


class Snapshots:
    """Wraps `policy_update` to record the parameters before and after each update."""

    def __init__(self, monkeypatch):
        self.before, self.after, self.results = [], [], []
        update = trainer.policy_update

        def recording(state, *args, **kwargs):
            params = lambda: {n: p.detach().clone() for n, p in state.model.named_parameters()}  # noqa: E731
            self.before.append(params())
            result = update(state, *args, **kwargs)
            self.after.append(params())
            self.results.append(result)
            return result

        monkeypatch.setattr(trainer, "policy_update", recording)

    def changed(self, step: int) -> set[str]:
        return changed(self.before[step - 1], self.after[step - 1])


# --- one update ----------------------------------------------------------------------------------------


def test_one_step_with_varied_rewards_changes_every_layer(tmp_path):
    _, rows = run(tmp_path / "run", rft_steps=1)
    assert rows[0]["reward_std"] > 0, "the test needs rewards that differ within a group"
    assert rows[0]["loss"] != 0 and rows[0]["grad_norm"] > 0 and not rows[0]["update_skipped"]
    moved = changed(initial_weights(), final_weights(tmp_path / "run"))
    for layer in range(TINY_NUM_LAYERS):  # skipped layers too: the update is of the full model
        assert any(name.startswith(f"model.layers.{layer}.") for name in moved), f"layer {layer} did not change"
    assert "lm_head.weight" in moved and "model.norm.weight" in moved


def test_equal_rewards_give_zero_advantages_and_no_update(tmp_path):
    _, rows = run(tmp_path / "run", reward=lambda completion, gold: 1.0, rft_steps=1)
    row = rows[0]
    assert row["reward_mean"] == 1.0 and row["reward_std"] == 0.0
    assert row["loss"] == 0.0 and row["grad_norm"] == 0.0 and not row["update_skipped"]
    for key, value in row.items():
        if isinstance(value, float):
            assert math.isfinite(value), f"{key} is {value}"
    assert changed(initial_weights(), final_weights(tmp_path / "run")) == set()  # zero gradient, first Adam step


# --- what a run leaves behind --------------------------------------------------------------------------

METRIC_KEYS = {
    "step", "skip_set", "skipped_layers", "reward_mean", "reward_std", "fraction_correct", "completion_length",
    "generation_time_s", "scoring_time_s", "training_time_s", "step_time_s", "tokens_generated", "tokens_processed",
    "gen_tokens_per_s", "h_mean", "h_min", "h_max", "h_truncated", "h_ess", "kl_behavior_target", "kl", "loss",
    "grad_norm", "learning_rate", "update_skipped",
}


def test_metrics_summary_and_files_of_a_run(tmp_path):
    steps, lr = 3, 1e-3
    output = tmp_path / "run"
    summary, rows = run(output, rft_steps=steps, save_steps=2)

    assert METRIC_KEYS <= set(StepMetrics.__dataclass_fields__)
    assert [row["step"] for row in rows] == [1, 2, 3]  # one line per step
    for step, row in enumerate(rows, start=1):
        # every field, but rollout selection's counts only in a run that selects (issue 32)
        assert set(row) == set(StepMetrics.__dataclass_fields__) - set(SELECTION_FIELDS) and METRIC_KEYS <= set(row)
        assert row["tokens_generated"] == B * G * T and row["completion_length"] == T
        assert row["tokens_processed"] > row["tokens_generated"]  # prompts count too
        assert row["gen_tokens_per_s"] == pytest.approx(row["tokens_generated"] / row["generation_time_s"])
        assert 0 < row["generation_time_s"] < row["step_time_s"]
        assert row["generation_time_s"] + row["scoring_time_s"] + row["training_time_s"] <= row["step_time_s"] + 1e-6
        assert 0 <= row["h_min"] <= row["h_mean"] <= row["h_max"] <= 1.0  # retrace, lambda = 1
        assert 0 < row["h_ess"] <= 1.0 + 1e-6 and row["kl_behavior_target"] >= -1e-6
        assert row["kl"] is None  # beta = 0: no reference model, no KL to it
        assert row["layer_influence"] is None  # the uniform policy measures nothing
        # the rate the update used: linear decay from lr over the run (TrainingArguments' default)
        assert row["learning_rate"] == pytest.approx(lr * (1 - (step - 1) / steps))

    assert summary == json.loads((output / SUMMARY_FILE).read_text())
    assert summary["steps"] == steps
    assert summary["total_runtime_s"] == pytest.approx(sum(r["step_time_s"] for r in rows))
    assert summary["tokens_processed"] == sum(r["tokens_processed"] for r in rows)
    assert summary["tokens_generated"] == steps * B * G * T
    assert summary["token_speed"] == pytest.approx(summary["tokens_processed"] / summary["total_runtime_s"])
    assert summary["generation_share"] == pytest.approx(
        sum(r["generation_time_s"] for r in rows) / summary["total_runtime_s"])
    assert 0 < summary["generation_share"] < 1
    assert summary["final_reward"] == pytest.approx(rows[-1]["reward_mean"])
    assert summary["nonfinite_updates"] == 0

    assert load_config(output / "config.yaml") == config_for(output, rft_steps=steps, save_steps=2)
    assert latest_checkpoint(output) == output / "checkpoint-3"  # the last one, the older one removed
    assert not (output / "checkpoint-2").exists()
    assert (output / "model" / "model.safetensors").is_file()


# --- nesting -------------------------------------------------------------------------------------------


def test_an_influence_run_logs_each_layers_influence_and_skips_the_least_influential(tmp_path):
    _, rows = run(tmp_path / "run", rft_steps=3, **{"nesting.skip_policy": "influence",
                                                     "nesting.influence_temperature": 1e-4, "nesting.smoothing": 0.0})
    for row in rows:
        assert len(row["layer_influence"]) == TINY_NUM_LAYERS and all(0 < v < 2 for v in row["layer_influence"])
        assert all(0 < layer < TINY_NUM_LAYERS - 1 for layer in row["skip_set"])  # border 1
    for before, after in zip(rows, rows[1:]):  # tau ~ 0: the valid layers of least measured influence
        valid = before["layer_influence"][1:-1]
        least = sorted(range(1, TINY_NUM_LAYERS - 1), key=lambda i: valid[i - 1])[: after["skipped_layers"]]
        assert after["skip_set"] == sorted(least)


@pytest.mark.parametrize(
    "ratio, border, expected_count, allowed",
    [(0.3, 1, 2, range(1, 5)), (0.2, 1, 1, range(1, 5)), (0.3, 2, 2, range(2, 4)), (0.5, 0, 3, range(0, 6))],
)
def test_skip_sets_have_U_x_layers_and_avoid_the_borders(tmp_path, ratio, border, expected_count, allowed):
    assert num_skipped_layers(TINY_NUM_LAYERS, ratio) == expected_count
    _, rows = run(tmp_path / "run", rft_steps=6, **{"nesting.skip_ratio": ratio, "nesting.border": border,
                                                     "sampling.max_new_tokens": 2, "sampling.min_new_tokens": 2})
    for row in rows:
        assert row["skipped_layers"] == expected_count == len(row["skip_set"]) == len(set(row["skip_set"]))
        assert set(row["skip_set"]) <= set(allowed), row["skip_set"]
        assert row["skip_set"] == sorted(row["skip_set"])
    if len(allowed) > expected_count:  # a fresh draw every step, not one fixed set
        assert len({tuple(row["skip_set"]) for row in rows}) > 1


def test_classical_reft_has_unit_importance_weights(tmp_path):
    """x = 0, b = 0, m = base: the behavior model is the target, h = pi/eta = 1 up to rounding."""
    _, rows = run(tmp_path / "run", rft_steps=2, **{"nesting.skip_ratio": 0.0, "nesting.border": 0,
                                                     "importance.mitigation": "base"})
    for row in rows:
        assert row["skip_set"] == [] and row["skipped_layers"] == 0
        assert abs(row["h_mean"] - 1) < 1e-5
        assert abs(row["h_min"] - 1) < 1e-4 and abs(row["h_max"] - 1) < 1e-4
        assert abs(row["kl_behavior_target"]) < 1e-6


CLASSICAL = {"nesting.skip_ratio": 0.0, "nesting.border": 0, "importance.mitigation": "base"}


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-opt"])  # dropout 0.1 in their configs
def test_classical_reft_has_unit_weights_on_models_with_dropout(tmp_path, model):
    """grpo.disable_dropout (default True): the training forward is dropout-free like the sampler, so h = 1."""
    _, rows = run(tmp_path / "run", rft_steps=2, model=model, **CLASSICAL)
    for row in rows:
        assert abs(row["h_min"] - 1) < 1e-5 and abs(row["h_max"] - 1) < 1e-5, row


def test_with_dropout_enabled_h_is_noisy_at_x_0(tmp_path):
    """The control for the test above: TRL's default (dropout on) makes logp_old a dropout sample."""
    _, rows = run(tmp_path / "run", rft_steps=1, model="tiny-gpt2", **CLASSICAL, **{"grpo.disable_dropout": False})
    assert rows[0]["h_max"] - rows[0]["h_min"] > 1e-2


def test_nested_behavior_with_base_weights_is_off_policy(tmp_path):
    """The control for the test above: skipping layers moves h away from 1."""
    _, rows = run(tmp_path / "run", rft_steps=1, **{"importance.mitigation": "base"})
    assert rows[0]["h_max"] - rows[0]["h_min"] > 1e-2 and rows[0]["kl_behavior_target"] > 1e-5


# --- KL penalty (beta > 0) ------------------------------------------------------------------------------


def test_beta_0_loads_no_reference_model(tmp_path, monkeypatch):
    references, loads = [], []
    make_reference, load_model = trainer.reference_model, trainer.load_model
    monkeypatch.setattr(trainer, "reference_model", lambda *a, **k: references.append(make_reference(*a, **k)) or
                        references[-1])
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    _, rows = run(tmp_path / "run", rft_steps=1)
    assert references == [None] and len(loads) == 1  # the policy only
    assert rows[0]["kl"] is None and not (tmp_path / "run" / SFT_MODEL_DIR).exists()


def test_beta_adds_the_kl_to_a_frozen_copy_of_the_starting_model(tmp_path, monkeypatch):
    references = []
    make_reference = trainer.reference_model
    monkeypatch.setattr(trainer, "reference_model", lambda *a, **k: references.append(make_reference(*a, **k)) or
                        references[-1])
    _, plain = run(tmp_path / "plain", rft_steps=3)
    _, penalised = run(tmp_path / "kl", rft_steps=3, **{"grpo.beta": 0.5})
    reference = references[-1]
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert changed(initial_weights(), reference.state_dict()) == set()  # the model ReFT started from, unchanged
    # step 1: policy == reference, so KL = 0 and (k3 having zero gradient there) the same update
    assert penalised[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert penalised[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-7)
    # later: the policy has moved, the penalty is positive and changes the loss and the updates
    assert all(row["kl"] > 1e-6 for row in penalised[1:])
    assert penalised[2]["loss"] != pytest.approx(plain[2]["loss"], abs=1e-6)
    assert changed(final_weights(tmp_path / "plain"), final_weights(tmp_path / "kl"))


def test_policy_update_adds_beta_times_the_mean_k3_kl(tmp_path):
    """dapo: loss(beta) - loss(0) = beta x masked mean of k3, and the gradients differ."""
    model, rollouts, advantages = tiny_rollouts(rows_per_prompt=4)
    reference = tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED + 1)[0].eval().requires_grad_(False)
    plain, plain_gradients = update_once(model, rollouts, advantages, micro_batch_size=8)
    penalised, penalised_gradients = update_once(model, rollouts, advantages, micro_batch_size=8, beta=0.5,
                                                 reference=reference)
    assert plain.kl is None and penalised.kl > 1e-3
    assert penalised.loss - plain.loss == pytest.approx(0.5 * penalised.kl, rel=1e-4)
    assert max((plain_gradients[n] - penalised_gradients[n]).abs().max().item() for n in plain_gradients) > 1e-4


# --- precision -----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes the mixed precision once per process: give this test, and the ones after it, a fresh one."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bfloat16_computes_under_autocast_on_float32_weights_and_keeps_small_updates(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    autocast = []
    generate = trainer.generate_rollouts

    def recording(*args, **kwargs):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return generate(*args, **kwargs)

    monkeypatch.setattr(trainer, "generate_rollouts", recording)
    snapshots = Snapshots(monkeypatch)
    _, rows = run(tmp_path / "run", rft_steps=1, dtype="bfloat16", **{"grpo.learning_rate": 1e-6})
    assert autocast == [(True, torch.bfloat16)]  # generation runs in bf16
    assert {p.dtype for p in snapshots.after[0].values()} == {torch.float32}  # fp32 master weights
    assert rows[0]["grad_norm"] > 0 and not rows[0]["update_skipped"]
    moved = snapshots.changed(1)  # an update of ~1e-6 survives in fp32 (in bf16 weights it would round away)
    for layer in range(TINY_NUM_LAYERS):
        assert any(name.startswith(f"model.layers.{layer}.") for name in moved), f"layer {layer} did not change"


# --- start-up checks and micro-batches -------------------------------------------------------------------


def test_too_many_skipped_layers_for_the_border_is_refused_before_sft(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "sft_warmup", lambda *a, **k: pytest.fail("SFT ran before the check"))
    with pytest.raises(ConfigError, match=r"nesting\.skip_ratio=0\.5 skips 3 .* nesting\.border=2 leaves only 2"):
        run(tmp_path / "run", **{"nesting.skip_ratio": 0.5, "nesting.border": 2, "sft.epochs": 1})


def test_a_batch_the_processes_cannot_share_is_refused():
    config = config_for("unused", batch_size=3)
    with pytest.raises(ConfigError, match=r"batch_size=3 .* processes \(2\)"):
        startup.check_fits_model(config, TINY_NUM_LAYERS, world=2)
    startup.check_fits_model(config, TINY_NUM_LAYERS, world=1)




def tiny_rollouts(rows_per_prompt: int = 4):
    """A tiny llama, 2 prompts x `rows_per_prompt` completions of T tokens (min = max) and varied advantages."""
    model, tokenizer = tiny_model("llama", num_layers=TINY_NUM_LAYERS, seed=TINY_SEED)
    prompts = [build_prompt(tokenizer, problem.question) for problem in PROBLEMS[:2]]
    config = config_for("unused")
    rollouts = generate_rollouts(model, tokenizer, prompts, rows_per_prompt, config.sampling, (),
                                 seeded_generator("tiny-rollouts"))
    advantages = torch.linspace(-0.5, 1.5, rollouts.completion_ids.shape[0])  # a non-zero mean: loss != 0
    return model, rollouts, advantages


def update_once(model, rollouts, advantages, micro_batch_size, loss_type="dapo", beta=0.0, reference=None,
                mask_truncated=False):
    """`policy_update` on a copy of `model`, recording instead of applying the gradients."""
    model = copy.deepcopy(model)
    config = config_for("unused", micro_batch_size=micro_batch_size, **{
        "grpo.loss_type": loss_type, "grpo.beta": beta, "grpo.max_grad_norm": 1e9, "grpo.num_generations": 4,
        "grpo.mask_truncated_completions": mask_truncated, "importance.mitigation": "practical",
        "sampling.min_new_tokens": 0})  # min = max with masking is refused; the rollouts are already drawn
    recorder = GradientRecorder(model)
    state = TrainingState(model, recorder, NoSchedule(), Accelerator(cpu=True), reference)
    update = trainer.policy_update(state, rollouts, advantages, config)
    return update, recorder.gradients


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_uneven_micro_batches_give_the_whole_batch_loss_and_gradients(loss_type):
    """8 rows in chunks of 3, 3 and 2 (min = max length): the same as one chunk of 8, for every aggregation."""
    model, rollouts, advantages = tiny_rollouts(rows_per_prompt=4)
    whole, whole_gradients = update_once(model, rollouts, advantages, micro_batch_size=8, loss_type=loss_type)
    chunked, chunked_gradients = update_once(model, rollouts, advantages, micro_batch_size=3, loss_type=loss_type)
    assert whole.loss != 0 and chunked.loss == pytest.approx(whole.loss, abs=1e-6)
    for name, gradient in whole_gradients.items():
        assert torch.allclose(chunked_gradients[name], gradient, atol=1e-6), name


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_masking_truncated_completions_drops_exactly_their_tokens_from_the_loss(loss_type):
    """TRL's mask_truncated_completions: the update is that of the batch whose truncated rows have no tokens."""
    model, rollouts, advantages = tiny_rollouts(rows_per_prompt=4)
    finished = torch.tensor([True, False, True, True, False, True, False, True])
    rollouts = dataclasses.replace(rollouts, finished=finished)
    masked, masked_gradients = update_once(model, rollouts, advantages, 8, loss_type, mask_truncated=True)
    emptied = dataclasses.replace(rollouts, completion_mask=rollouts.completion_mask * finished[:, None])
    expected, expected_gradients = update_once(model, emptied, advantages, 8, loss_type)
    _, plain_gradients = update_once(model, rollouts, advantages, 8, loss_type)
    assert masked.loss == pytest.approx(expected.loss, abs=1e-6) and masked.loss != 0
    for name, gradient in expected_gradients.items():
        assert torch.allclose(masked_gradients[name], gradient, atol=1e-6), name
    assert max((plain_gradients[n] - masked_gradients[n]).abs().max().item() for n in plain_gradients) > 1e-4


# --- resumption ----------------------------------------------------------------------------------------


class KilledAfter(Exception):
    pass


def killed_after(step: int, scored: int | None = None, score=None):
    """A reward (`score`, by default lowercase_share) that kills the run when scoring step `step` + 1: steps 1..step
    are complete and logged. `scored`: the completions steps 1..step score (default step x B x G)."""
    calls, score = [], score or lowercase_share

    def reward(completion, gold):
        calls.append(None)
        if len(calls) > (step * B * G if scored is None else scored):
            raise KilledAfter(f"killed after step {step}")
        return score(completion, gold)

    return reward


RESUMED_KEYS = ("step", "skip_set", "skipped_layers", "reward_mean", "reward_std", "loss", "grad_norm", "learning_rate", "h_mean",
                "h_min", "h_max", "h_truncated", "h_ess", "kl_behavior_target", "tokens_generated",
                "tokens_processed", "update_skipped", "kl")


@pytest.mark.parametrize("variant", [
    {},
    {"grpo.beta": 0.5},  # the reference is the post-SFT model, reloaded from OUTPUT/sft-model on resume
    {"model": "tiny-gpt2", "grpo.disable_dropout": False},  # dropout draws from the global RNG: restored
    # adaptive skip policies: their smoothed influence and KL are restored from the checkpoint
    {"nesting.skip_policy": "influence", "nesting.influence_temperature": 0.01},
    {"nesting.skip_policy": "kl_target", "nesting.kl_target": 0.005, "nesting.kl_target_layers": "influence",
     "nesting.kl_retry_steps": 2},
    {"lora.r": 4, "grpo.learning_rate": 1e-2},  # the checkpoint holds the adapters; the base is config.model
    # bridges: refitted every 3 steps, so the resumed step 3 samples from bridges fitted before the kill and
    # refits from the restored sums; the behavior log-probs (kl_behavior_target) read the bridges
    {"nesting.bridge": "linear", "nesting.bridge_refit_steps": 3},
    # rollout selection (issue 32): the data order's cursor and the prompts' history are restored; a pool of 6
    # problems is read several times in 4 steps, odd answers never rewarded, so groups are dropped and prompts skipped
    {"grpo.filter_groups": True, "grpo.filter_max_rounds": 3, "sampling.skip_predictable": True, "train_problems": 6,
     "reward": "lowercase_if_even"},
], ids=["plain", "kl-penalty", "dropout", "influence-policy", "kl-target-policy", "lora", "bridges", "selection"])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, variant):
    variant = dict(variant)
    score = {"lowercase_if_even": lowercase_if_even, None: lowercase_share}[variant.pop("reward", None)]
    settings = dict(rft_steps=4, save_steps=2, **{"importance.mitigation": "base", "sft.epochs": 1,
                                                   "sft.max_examples": 4, "sft.batch_size": 4}, **variant)
    whole_summary, whole = run(tmp_path / "whole", reward=score, **settings)
    assert (tmp_path / "whole" / SFT_MODEL_DIR).is_dir() == ("grpo.beta" in variant)  # kept only for a reference
    selects = "groups_sampled" in whole[0]
    scored = sum(row["groups_sampled"] for row in whole[:3]) * G if selects else None

    with pytest.raises(KilledAfter):  # dies after step 3: its last checkpoint is step 2
        run(tmp_path / "killed", reward=killed_after(3, scored, score), **settings)
    assert [row["step"] for row in metrics(tmp_path / "killed")] == [1, 2, 3]
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-2"
    assert not (tmp_path / "killed" / "model").exists()

    resumed_summary, resumed = run(tmp_path / "killed", reward=score, resume=True, **settings)

    assert [row["step"] for row in resumed] == [1, 2, 3, 4]  # step 3 recomputed, not logged twice
    for a, b in zip(whole, resumed):
        for key in RESUMED_KEYS + (SELECTION_FIELDS if selects else ()):
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], abs=1e-6), f"step {a['step']}: {key}"
            else:
                assert b[key] == a[key], f"step {a['step']}: {key}"
    assert changed(final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")) == set()
    for key in ("steps", "tokens_processed", "tokens_generated", "final_reward", "nonfinite_updates"):
        assert resumed_summary[key] == whole_summary[key], key
    assert any(row["grad_norm"] > 0 for row in whole[2:])  # steps 3-4 did update: the comparison means something
    if selects:  # the premise: after the resume, groups were dropped and prompts skipped and sampled again
        assert any(row["groups_kept"] < row["groups_sampled"] for row in whole[2:])
        assert any(row["prompts_skipped"] for row in whole[2:]) and any(row["prompts_returned"] for row in whole[2:])
    if "nesting.skip_policy" in variant:  # the policy's draws after the resume depend on the restored state
        assert all(row["layer_influence"] == pytest.approx(other["layer_influence"], abs=1e-6)
                   for row, other in zip(whole, resumed))


def test_step_callbacks_see_each_steps_policy_and_change_nothing_the_run_does(tmp_path):
    """A callback (an evaluation during training) that draws from the global RNG and switches the policy's mode
    is called once per step with the updated policy, and the run draws and learns exactly what it does without."""
    settings = {"model": "tiny-gpt2", "grpo.disable_dropout": False, "rft_steps": 3}  # dropout reads the global RNG
    seen = []

    def callback(step, policy, tokenizer):
        torch.rand(1000)
        policy.eval()
        seen.append((step, {name: value.detach().clone() for name, value in policy.state_dict().items()}))

    task = Task("tiny", list(PROBLEMS), reward=lowercase_share)
    train(config_for(tmp_path / "with", **settings), task, callbacks=[callback])
    _, without = run(tmp_path / "without", **settings)
    assert [step for step, _ in seen] == [1, 2, 3]
    assert changed(final_weights(tmp_path / "with"), seen[-1][1]) == set()  # the step's policy, after its update
    assert changed(seen[0][1], seen[1][1])  # each step's own
    for a, b in zip(without, metrics(tmp_path / "with"), strict=True):
        for key in RESUMED_KEYS:
            assert b[key] == (pytest.approx(a[key], abs=1e-6) if isinstance(a[key], float) else a[key]), key
    assert changed(final_weights(tmp_path / "with"), final_weights(tmp_path / "without")) == set()


@pytest.mark.parametrize("limit, kept", [(1, [3]), (0, [1, 2, 3])])
def test_save_total_limit_keeps_the_newest_checkpoints_of_a_run(tmp_path, limit, kept):
    run(tmp_path, rft_steps=3, save_steps=1, save_total_limit=limit)
    assert [int(path.name.split("-")[1]) for path in checkpoints(tmp_path)] == kept
    first, last = (load_file(checkpoints(tmp_path)[i] / "model.safetensors") for i in (0, -1))
    assert (first.keys() == last.keys()) and bool(changed(first, last)) == (limit == 0)  # each step's own weights


def test_resuming_from_a_corrupt_checkpoint_is_refused(tmp_path):
    output = tmp_path / "run"
    run(output, rft_steps=2, save_steps=1)
    weights = latest_checkpoint(output) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        run(output, resume=True, rft_steps=2, save_steps=1)


def test_resuming_with_a_changed_config_is_refused_naming_the_options(tmp_path):
    output = tmp_path / "run"
    run(output, rft_steps=2, save_steps=1)
    saved = (output / CONFIG_FILE).read_text()
    with pytest.raises(ConfigError, match=r"grpo\.learning_rate: 0\.001 -> 0\.002.*nesting\.skip_ratio") as error:
        run(output, resume=True, rft_steps=2, save_steps=1, **{"nesting.skip_ratio": 0.2, "grpo.learning_rate": 2e-3})
    assert "save_steps" not in str(error.value).split("only")[0]  # save_steps is the same; only the two differ
    assert (output / CONFIG_FILE).read_text() == saved  # the saved config is not overwritten
    # options that do not shape the trajectory may change
    run(output, resume=True, rft_steps=2, save_steps=5, max_nonfinite_steps=9)
    assert load_config(output / CONFIG_FILE).save_steps == 5


def test_a_fresh_run_refuses_an_output_dir_that_holds_a_run(tmp_path):
    output = tmp_path / "run"
    run(output, rft_steps=1)
    before = (output / METRICS_FILE).read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(output, rft_steps=1)
    assert (output / METRICS_FILE).read_text() == before  # and leaves it untouched
    (output / METRICS_FILE).unlink()  # a checkpoint alone is a run too
    with pytest.raises(ConfigError, match="already holds a run"):
        run(output, rft_steps=1)


def test_a_launch_that_accelerate_does_not_see_is_refused(tmp_path, monkeypatch):
    """torchrun on CPU without ACCELERATE_USE_CPU: each rank would train alone into the same directory."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU"):
        run(tmp_path / "run", rft_steps=1)
    assert not (tmp_path / "run" / METRICS_FILE).exists()


class OneProcess:
    num_processes, process_index = 1, 0


def test_the_data_order_is_one_shuffle_per_epoch_and_a_resumed_process_reads_on_from_its_step(monkeypatch):
    """24 problems, 5 per step: 10 steps read 50 positions of 3 epochs (steps 5 and 10 cross into the next)."""
    purposes = []

    def recording(seed, step, purpose, *args):
        purposes.append(purpose)
        return step_generator(seed, step, purpose, *args)

    monkeypatch.setattr(data_order, "step_generator", recording)
    data_order.data_order.cache_clear()  # as a fresh process: the runs before drew these orders too
    config = config_for("unused", batch_size=5)
    batches = [data_order.batch_for_step(PROBLEMS, config, step, OneProcess()) for step in range(1, 11)]
    assert purposes == ["data"] * 3  # one permutation per epoch, not one per position read
    read = [problem for batch in batches for problem in batch]
    every = sorted(problem.id for problem in PROBLEMS)
    assert sorted(p.id for p in read[:24]) == every and read[:24] != PROBLEMS  # an epoch: each problem, shuffled
    assert sorted(p.id for p in read[24:48]) == every and read[24:48] != read[:24]  # the next: another order
    data_order.data_order.cache_clear()  # a resumed process starts with none of the orders
    assert [data_order.batch_for_step(PROBLEMS, config, step, OneProcess()) for step in range(7, 11)] == batches[6:]


# --- non-finite updates --------------------------------------------------------------------------------


def poison_loss(monkeypatch, steps: set[int] | None = None):
    """Make the GRPO loss NaN on the given ReFT steps (all steps if None)."""
    loss, calls = update_module.grpo_loss, []

    def poisoned(*args, **kwargs):
        value = loss(*args, **kwargs)
        step = trainer_step[0]
        calls.append(step)
        return value * float("nan") if steps is None or step in steps else value

    trainer_step = [0]
    score = Task.score

    def counting_score(self, completions, golds):  # one call per step, before the update
        trainer_step[0] += 1
        return score(self, completions, golds)

    monkeypatch.setattr(update_module, "grpo_loss", poisoned)
    monkeypatch.setattr(Task, "score", counting_score)


def test_a_non_finite_loss_skips_the_update(tmp_path, monkeypatch):
    poison_loss(monkeypatch, steps={2})
    snapshots = Snapshots(monkeypatch)
    summary, rows = run(tmp_path / "run", rft_steps=3, max_nonfinite_steps=0)
    assert [row["update_skipped"] for row in rows] == [False, True, False]
    assert math.isnan(rows[1]["loss"])
    assert snapshots.changed(2) == set()  # parameters unchanged by the skipped step
    assert snapshots.changed(1) and snapshots.changed(3)
    assert rows[2]["learning_rate"] == rows[1]["learning_rate"]  # the schedule did not advance either
    assert summary["nonfinite_updates"] == 1


def test_repeated_non_finite_losses_abort_the_run(tmp_path, monkeypatch):
    poison_loss(monkeypatch)
    snapshots = Snapshots(monkeypatch)
    with pytest.raises(FloatingPointError, match="max_nonfinite_steps=2"):
        run(tmp_path / "run", rft_steps=5, max_nonfinite_steps=2, save_steps=1)  # kept: it has a checkpoint
    rows = metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2] and all(row["update_skipped"] for row in rows)
    assert snapshots.changed(1) == snapshots.changed(2) == set()
    assert changed(initial_weights(), snapshots.after[-1]) == set()


# --- learning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mitigation", ["base", "practical", "retrace"])
def test_nested_reft_learns_a_trivial_reward(tmp_path, mitigation):
    """On x = 0.2 (1 of 6 layers skipped), b = 1, each mitigation raises a learnable reward clearly.

    Reward: the share of lowercase letters in the completion (about 0.1 for the random model).
    """
    _, rows = run(tmp_path / "run", rft_steps=25, **{
        "batch_size": 2, "micro_batch_size": 16, "grpo.num_generations": 8, "grpo.learning_rate": 1e-2,
        "grpo.lr_scheduler": "constant", "sampling.max_new_tokens": 8, "sampling.min_new_tokens": 8,
        "nesting.skip_ratio": 0.2, "nesting.border": 1, "importance.mitigation": mitigation,
    })
    rewards = [row["reward_mean"] for row in rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"{mitigation}: first-5 mean reward {first:.3f}, last-5 {last:.3f}")
    assert all(row["skipped_layers"] == 1 for row in rows)
    assert not any(row["update_skipped"] for row in rows)
    assert last > first + 0.25, f"{mitigation} did not learn: {[round(r, 2) for r in rewards]}"


def test_metrics_reach_tensorboard_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, report_to="tensorboard")
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file under the run directory"
    scalars = set()
    for path in event_files:
        events = EventAccumulator(str(path))
        events.Reload()
        scalars |= set(events.Tags()["scalars"])
    assert {"reward_mean", "gen_tokens_per_s", "loss"} <= scalars


# --- several updates per batch, gradient checkpointing ------------------------------------------------


def test_num_iterations_updates_each_batch_mu_times_on_one_schedule(tmp_path, monkeypatch):
    snapshots = Snapshots(monkeypatch)
    steps, lr = 2, 1e-3
    _, rows = run(tmp_path / "run", rft_steps=steps, **{"grpo.num_iterations": 2, "grpo.epsilon": 0.1})
    # the schedule spans rft_steps x mu optimizer steps: step 2 starts at update 3 of 4
    assert [row["learning_rate"] for row in rows] == pytest.approx([lr, lr * (1 - 2 / 4)])
    assert all(0 <= row["clip_fraction"] <= 1 for row in rows)
    assert snapshots.changed(1) and snapshots.changed(2)


def test_gradient_checkpointing_gives_the_same_run(tmp_path, monkeypatch):
    checkpointed = []
    update = trainer.policy_update

    def recording(state, *args, **kwargs):
        checkpointed.append(state.policy.is_activation_checkpointing)
        return update(state, *args, **kwargs)

    monkeypatch.setattr(trainer, "policy_update", recording)
    _, plain = run(tmp_path / "plain", rft_steps=2)
    _, recomputed = run(tmp_path / "recomputed", rft_steps=2, gradient_checkpointing=True)
    assert checkpointed == [False, False, True, True]
    for a, b in zip(plain, recomputed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["skip_set"] == a["skip_set"]
    plain_weights = final_weights(tmp_path / "plain")
    for name, weights in final_weights(tmp_path / "recomputed").items():
        assert torch.allclose(weights, plain_weights[name], atol=1e-6), name
