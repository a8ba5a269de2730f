"""The peer check: at x = 0 our GRPO update is TRL's `GRPOTrainer` loss, value and gradients.

On the same tiny model, the same batch (sampled by `generate_rollouts`, advantages from `group_advantages`)
and the same settings, a real `trl.GRPOTrainer` computes its loss (`compute_loss`, micro-batch by micro-batch,
as its training step does) and we run our real `policy_update` (mitigation "base", so h = 1 up to rounding)
with an optimizer stand-in that records the gradients instead of stepping. Loss and every parameter's
gradient must agree within 1e-5, for each loss normalisation, on one micro-batch and on two accumulated ones.

Known differences from TRL 1.16 that this tolerates (they cancel, up to float rounding):
- TRL's training forward passes no position ids, so left-padded rows get positions shifted by their padding;
  we use positions from the attention mask, as sampling does. RoPE only sees position differences, so the
  log-probs agree up to rounding (for absolute-position models such as GPT-2 they would not: TRL's training
  forward would then score padded rows at other positions than its own `generate` sampled them at).
- TRL scores completion-padding positions as 0 and we score the pad token there; both are masked out.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

trl = pytest.importorskip("trl")  # a dev dependency; built offline below (construction needs no network)
datasets = pytest.importorskip("datasets")
from accelerate import Accelerator  # noqa: E402

from nested_reft.config import GRPOConfig, ImportanceConfig, NestingConfig, TrainConfig  # noqa: E402
from nested_reft.algorithm.grpo import group_advantages  # noqa: E402
from nested_reft.engines.logprobs import completion_logprobs  # noqa: E402
from nested_reft.engines.rollout import Rollouts, SamplingConfig, generate_rollouts  # noqa: E402
from nested_reft.models.tiny import byte_tokenizer, tiny_model  # noqa: E402
from nested_reft.training.update import TrainingState, policy_update  # noqa: E402
from conftest import GradientRecorder, NoSchedule  # noqa: E402

TOLERANCE = 1e-5
ARCHITECTURE, LAYERS, SEED = "qwen2", 2, 0
G = 4  # generations per prompt
T = 10  # completion tokens (max_completion_length)
TEMPERATURE = 0.7  # not 1, so that a temperature mismatch would show in the gradients and log-probs
PROMPTS = ("2 + 3 =", "Tom has 4 apples and eats one.", "7 x 6?")  # different lengths: rows are left-padded
# One reward per completion; the middle group is all equal (advantage 0), the others mixed.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 0.0])
PAD_ID = byte_tokenizer().pad_token_id
CUT_LENGTHS = (T, 3, T, 7, 1, T, 5, T, 2, 8, 4, 6)  # ragged ends, as if EOS had come early; the halves
# hold different token counts (41 and 35), so per-micro-batch and whole-batch normalisations differ


def fresh_model():
    """The tiny policy, identical weights on every call (same seed)."""
    return tiny_model(ARCHITECTURE, num_layers=LAYERS, seed=SEED)


def cut(rollouts: Rollouts, lengths) -> Rollouts:
    """End row i after lengths[i] tokens (pad, mask 0, log-prob 0 after), keeping the recorded log-probs of the
    tokens that stay: sampling is causal, so they are what the sampler would have recorded anyway."""
    keep = torch.arange(rollouts.completion_ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return dataclasses.replace(
        rollouts,
        completion_ids=torch.where(keep, rollouts.completion_ids, torch.full_like(rollouts.completion_ids, PAD_ID)),
        completion_mask=rollouts.completion_mask * keep,
        behavior_logprobs=rollouts.behavior_logprobs * keep,
    )


@pytest.fixture(scope="module")
def batch() -> tuple[Rollouts, torch.Tensor]:
    """B = 3 prompts x G = 4 completions of up to T tokens from the full model (x = 0), and their advantages."""
    model, tokenizer = fresh_model()
    sampling = SamplingConfig(temperature=TEMPERATURE, max_new_tokens=T, min_new_tokens=T)
    rollouts = generate_rollouts(model, tokenizer, PROMPTS, G, sampling, (), torch.Generator().manual_seed(0))
    rollouts = cut(rollouts, CUT_LENGTHS)
    assert rollouts.prompt_mask.eq(0).any(), "the batch should hold left-padded prompts"
    assert rollouts.completion_mask.eq(0).any(), "the batch should hold ragged completions"
    return rollouts, group_advantages(REWARDS, G)


def trl_trainer(model, tokenizer, tmp_path, loss_type: str, micro_batches: int, num_iterations: int = 1):
    """A real GRPOTrainer, built offline, that accumulates `micro_batches` micro-batches per generation batch."""
    rows = len(PROMPTS) * G
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL 1.16 defaults to bf16 and activation checkpointing: the peer runs in float32, plainly
        activation_checkpointing=False,
        num_generations=G,
        per_device_train_batch_size=rows // micro_batches,
        gradient_accumulation_steps=micro_batches,  # steps_per_generation follows it: one generation batch
        max_completion_length=T,
        temperature=TEMPERATURE,
        loss_type=loss_type,
        beta=0.0,
        epsilon=0.2,
        num_iterations=num_iterations,
        save_strategy="no",
    )
    dataset = datasets.Dataset.from_dict({"prompt": list(PROMPTS)})
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),  # never called: we pass the batch
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.temperature == TEMPERATURE and trainer.beta == 0.0 and trainer.loss_type == loss_type
    # Set by Trainer's training loop for each accumulation window; we call the loss outside that loop.
    trainer.current_gradient_accumulation_steps = micro_batches
    return trainer


def trl_loss_and_gradients(trainer, model, rollouts: Rollouts, advantages: torch.Tensor, micro_batches: int,
                           old_logps: torch.Tensor | None = None):
    """TRL's loss summed over the micro-batches and the accumulated gradients, as its training step builds them.
    `old_logps`: log pi_old of the batch, which TRL computes before the first of several iterations."""
    model.train()
    model.zero_grad(set_to_none=True)
    rows = rollouts.completion_ids.shape[0]
    size = rows // micro_batches
    num_items_in_batch = rollouts.completion_mask.sum().float()  # active tokens of the whole generation batch
    total = 0.0
    for start in range(0, rows, size):
        part = slice(start, start + size)
        inputs = {
            "prompt_ids": rollouts.prompt_ids[part],
            "prompt_mask": rollouts.prompt_mask[part],
            "completion_ids": rollouts.completion_ids[part],
            "completion_mask": rollouts.completion_mask[part],
            "advantages": advantages[part],
            "num_items_in_batch": num_items_in_batch,
            # one update per batch: None, and TRL uses the detached log-probs of this forward
            "old_per_token_logps": None if old_logps is None else old_logps[part],
        }
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        total += loss.item()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total, gradients




def our_loss_and_gradients(model, rollouts: Rollouts, advantages: torch.Tensor, loss_type: str, micro_batches: int):
    """Our real `policy_update` at x = 0, mitigation "base", no clipping of the gradient norm."""
    rows = rollouts.completion_ids.shape[0]
    config = TrainConfig(
        micro_batch_size=rows // micro_batches,
        nesting=NestingConfig(skip_ratio=0.0, border=0),
        importance=ImportanceConfig(mitigation="base"),
        sampling=SamplingConfig(temperature=TEMPERATURE, max_new_tokens=T, min_new_tokens=T),
        grpo=GRPOConfig(num_generations=G, loss_type=loss_type, epsilon=0.2, epsilon_high=0.2, max_grad_norm=1e9),
    )
    recorder = GradientRecorder(model)
    state = TrainingState(model, recorder, NoSchedule(), Accelerator(cpu=True))
    update = policy_update(state, rollouts, advantages, config)
    assert update.finite
    return update, recorder.gradients


def trl_old_logps(trainer, model, rollouts: Rollouts) -> torch.Tensor:
    """log pi_old as TRL computes it before the first iteration (no gradient)."""
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, T)[0]


def max_gradient_difference(ours: dict, theirs: dict) -> tuple[float, str]:
    assert ours.keys() == theirs.keys(), "the two updates reached different parameters"
    differences = {name: (ours[name] - theirs[name]).abs().max().item() for name in ours}
    name = max(differences, key=differences.get)
    return differences[name], name


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_loss_and_gradients_match_trl(batch, tmp_path, loss_type, micro_batches):
    rollouts, advantages = batch
    model, tokenizer = fresh_model()
    trainer = trl_trainer(model, tokenizer, tmp_path, loss_type, micro_batches)

    theirs_loss, theirs_gradients = trl_loss_and_gradients(trainer, model, rollouts, advantages, micro_batches)
    update, ours_gradients = our_loss_and_gradients(model, rollouts, advantages, loss_type, micro_batches)

    # x = 0 and mitigation "base": h = pi_theta / eta is 1 up to rounding (sampler and scorer agree).
    h = torch.exp(update.logp_old - rollouts.behavior_logprobs)[rollouts.completion_mask.bool()]
    assert (h - 1).abs().max().item() < 1e-4
    assert update.loss == pytest.approx(theirs_loss, abs=TOLERANCE)
    difference, where = max_gradient_difference(ours_gradients, theirs_gradients)
    assert difference <= TOLERANCE, f"largest gradient difference {difference:.3g} at {where}"
    # The comparison has teeth: the gradients are not all (near) zero.
    assert max(g.abs().max().item() for g in theirs_gradients.values()) > 100 * TOLERANCE


def test_same_temperature_scaling_as_trl(batch, tmp_path):
    """TRL's per-token log-probs (the ones its loss uses) equal `completion_logprobs` and the sampler's record."""
    rollouts, _ = batch
    model, tokenizer = fresh_model()
    trainer = trl_trainer(model, tokenizer, tmp_path, "dapo", 1)
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    attention_mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    mask = rollouts.completion_mask.bool()
    with torch.no_grad():
        # The function TRL's `_compute_loss` gets its log-probs from (private; pinned by the TRL version).
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, T)
        args = (model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids, rollouts.completion_mask)
        ours = completion_logprobs(*args, temperature=TEMPERATURE)
        unscaled = completion_logprobs(*args, temperature=1.0)
    assert (ours - theirs)[mask].abs().max().item() <= TOLERANCE
    assert (rollouts.behavior_logprobs - theirs)[mask].abs().max().item() <= TOLERANCE
    assert (unscaled - theirs)[mask].abs().max().item() > 1e-3  # a temperature mismatch would be caught


LEARNING_RATE = 3.0  # plain SGD on the tiny model: large enough that the second iteration's ratios leave the clip


def mu_config(loss_type: str, epsilon: float = 0.2) -> TrainConfig:
    return TrainConfig(
        micro_batch_size=len(PROMPTS) * G,
        nesting=NestingConfig(skip_ratio=0.0, border=0),
        importance=ImportanceConfig(mitigation="base"),
        sampling=SamplingConfig(temperature=TEMPERATURE, max_new_tokens=T, min_new_tokens=T),
        grpo=GRPOConfig(num_generations=G, loss_type=loss_type, num_iterations=2, epsilon=epsilon, max_grad_norm=1e9),
    )


def our_two_iterations(rollouts, advantages, config: TrainConfig):
    """Our `policy_update` with mu = 2 and SGD: the update result and each iteration's gradients."""
    model, _ = fresh_model()
    recorder = GradientRecorder(model, learning_rate=LEARNING_RATE)
    update = policy_update(TrainingState(model, recorder, NoSchedule(), Accelerator(cpu=True)), rollouts, advantages,
                           config)
    assert update.finite and len(recorder.history) == 2
    return update, recorder.history


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_iterations_per_batch_match_trl(batch, tmp_path, loss_type):
    """mu = 2 (TRL's num_iterations): pi_old is the sampling model, the second iteration's ratio moves and clips."""
    rollouts, advantages = batch
    update, ours = our_two_iterations(rollouts, advantages, mu_config(loss_type))

    model, tokenizer = fresh_model()
    trainer = trl_trainer(model, tokenizer, tmp_path, loss_type, 1, num_iterations=2)
    old = trl_old_logps(trainer, model, rollouts)
    losses, theirs = [], []
    for _ in range(2):
        loss, gradients = trl_loss_and_gradients(trainer, model, rollouts, advantages, 1, old_logps=old)
        losses.append(loss)
        theirs.append(gradients)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.sub_(LEARNING_RATE * gradients[name])

    assert update.loss == pytest.approx(sum(losses) / 2, abs=TOLERANCE)
    for iteration in range(2):
        difference, where = max_gradient_difference(ours[iteration], theirs[iteration])
        assert difference <= TOLERANCE, f"iteration {iteration + 1}: gradient difference {difference:.3g} at {where}"
    assert max((a - b).abs().max().item() for a, b in zip(ours[0].values(), ours[1].values())) > 100 * TOLERANCE
    assert update.clip_fraction > 0  # the second iteration's ratio left [1 - eps, 1 + eps] on some tokens


def test_epsilon_changes_the_second_iteration_and_only_it(batch):
    """A test that fails if clipping is inert: with mu = 2 a tighter clip changes the second iteration's gradients,
    not the first's (the ratio is 1 there)."""
    rollouts, advantages = batch
    loose, loose_steps = our_two_iterations(rollouts, advantages, mu_config("dapo", epsilon=0.2))
    tight, tight_steps = our_two_iterations(rollouts, advantages, mu_config("dapo", epsilon=0.01))
    assert max_gradient_difference(loose_steps[0], tight_steps[0])[0] <= 1e-7
    assert max_gradient_difference(loose_steps[1], tight_steps[1])[0] > 100 * TOLERANCE
    assert tight.clip_fraction > loose.clip_fraction > 0
