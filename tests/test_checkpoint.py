"""Checkpoints: exact round trips, refusal of damaged ones, atomic saves, `from_pretrained` compatibility."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

import nested_reft.training.checkpoint as checkpoint_module
from nested_reft.training.checkpoint import (
    MANIFEST,
    OPTIMIZER_STATE,
    RNG_STATE,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_path,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    remove_old_checkpoints,
    restore_rng_states,
    rng_states_of_rank,
    save_checkpoint,
    save_model,
    verify_checkpoint,
)
from nested_reft.config import GRPOConfig
from nested_reft.models.tiny import tiny_model
from nested_reft.training.optim import make_optimizer

STATE = {"step": 3, "totals": {"runtime_s": 1.5, "tokens_processed": 42}}



def trained(seed: int = 0, steps: int = 3, architecture: str = "llama"):
    """A tiny model with a few AdamW steps behind it, so optimizer and scheduler states are not trivial."""
    model, tokenizer = tiny_model(architecture, num_layers=3, seed=seed)
    optimizer, scheduler = make_optimizer(model, GRPOConfig(learning_rate=1e-3, warmup_ratio=0.2), total_steps=10)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, tokenizer, optimizer, scheduler


def fresh(architecture: str = "llama"):
    """Another model (different weights), optimizer and scheduler of the same shapes, at step 0."""
    model, tokenizer = tiny_model(architecture, num_layers=3, seed=123)
    optimizer, scheduler = make_optimizer(model, GRPOConfig(learning_rate=1e-3, warmup_ratio=0.2), total_steps=10)
    return model, tokenizer, optimizer, scheduler


def assert_same_state(a, b):
    """Equal nested structures of tensors and plain values, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def save(tmp_path, step=3, seed=0):
    model, tokenizer, optimizer, scheduler = trained(seed)
    path = save_checkpoint(checkpoint_path(tmp_path, step), model, tokenizer, optimizer, scheduler, STATE)
    return path, (model, tokenizer, optimizer, scheduler)


# --- round trip ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # gpt2 ties lm_head to the embeddings
def test_round_trip_restores_weights_optimizer_and_scheduler_exactly(tmp_path, architecture):
    model, tokenizer, optimizer, scheduler = trained(architecture=architecture)
    path = save_checkpoint(tmp_path / "checkpoint-3", model, tokenizer, optimizer, scheduler, STATE)
    other, _, other_optimizer, other_scheduler = fresh(architecture)
    assert not torch.equal(next(other.parameters()), next(model.parameters()))

    state = load_checkpoint(path, other, other_optimizer, other_scheduler)

    assert state == STATE
    assert_same_state(model.state_dict(), other.state_dict())
    assert_same_state(optimizer.state_dict(), other_optimizer.state_dict())
    assert_same_state(scheduler.state_dict(), other_scheduler.state_dict())
    assert other_scheduler.get_last_lr() == scheduler.get_last_lr()
    # and they keep training identically
    ids = torch.arange(16).view(2, 8)
    for m, o, s in ((model, optimizer, scheduler), (other, other_optimizer, other_scheduler)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
        s.step()
    assert_same_state(model.state_dict(), other.state_dict())


def test_rng_states_round_trip_per_rank_without_pickle(tmp_path):
    """Each rank gets its own global RNG state back (what dropout draws from), from a safetensors file."""
    model, tokenizer, optimizer, scheduler = trained()
    torch.manual_seed(1)
    states = rng_states_of_rank(0)
    expected = torch.rand(4)
    torch.manual_seed(2)
    states.update(rng_states_of_rank(1))
    path = save_checkpoint(tmp_path / "checkpoint-3", model, tokenizer, optimizer, scheduler, STATE, states)
    assert RNG_STATE in json.loads((path / MANIFEST).read_text())
    other, _, other_optimizer, other_scheduler = fresh()
    load_checkpoint(path, other, other_optimizer, other_scheduler)  # the RNG file is not taken for a weight shard

    restore_rng_states(path, rank=0)
    assert torch.equal(torch.rand(4), expected)
    restore_rng_states(path, rank=1)
    assert not torch.equal(torch.rand(4), expected)
    with pytest.raises(CheckpointError, match="2 process"):
        restore_rng_states(path, rank=2)


def test_latest_checkpoint_picks_the_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / ".checkpoint-11.tmp").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


@pytest.mark.parametrize("keep, kept", [(1, [10]), (2, [9, 10]), (0, [2, 9, 10]), (5, [2, 9, 10])])
def test_removing_old_checkpoints_keeps_the_newest_by_step(tmp_path, keep, kept):
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()  # not a checkpoint: never removed
    remove_old_checkpoints(tmp_path, keep)
    assert checkpoints(tmp_path) == [tmp_path / f"checkpoint-{step}" for step in kept]
    assert (tmp_path / "checkpoint-final").is_dir()


# --- damaged checkpoints are refused -------------------------------------------------------------------


def load_into_fresh(path):
    model, _, optimizer, scheduler = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return load_checkpoint(path, model, optimizer, scheduler)
    except CheckpointError:
        # a refused checkpoint leaves the model as it was
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name])
        raise


@pytest.mark.parametrize("name", ["model.safetensors", OPTIMIZER_STATE, TRAINER_STATE, "config.json"])
def test_a_missing_file_is_refused(tmp_path, name):
    path, _ = save(tmp_path)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_into_fresh(path)


@pytest.mark.parametrize("name", ["model.safetensors", OPTIMIZER_STATE, TRAINER_STATE])
def test_a_truncated_file_is_refused(tmp_path, name):
    path, _ = save(tmp_path)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_into_fresh(path)


def test_a_modified_file_of_the_same_size_is_refused(tmp_path):
    path, _ = save(tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_into_fresh(path)


def test_a_checkpoint_without_manifest_is_refused(tmp_path):
    path, _ = save(tmp_path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=MANIFEST):
        load_into_fresh(path)


@pytest.mark.parametrize("manifest", ['{"model.safeten', "{}", "[]", '"x"'])
def test_a_corrupt_or_empty_manifest_is_refused(tmp_path, manifest):
    path, _ = save(tmp_path)
    (path / MANIFEST).write_text(manifest)
    with pytest.raises(CheckpointError):
        load_into_fresh(path)


def test_files_the_manifest_does_not_vouch_for_are_refused(tmp_path):
    path, (model, tokenizer, _, _) = save(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != OPTIMIZER_STATE}))
    with pytest.raises(CheckpointError, match=OPTIMIZER_STATE):
        load_into_fresh(path)
    (path / MANIFEST).write_text(json.dumps(manifest))
    load_into_fresh(path)  # intact again
    (path / "model-extra.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="model-extra.safetensors"):
        load_into_fresh(path)
    # a final model directory has no optimizer state: it is not a resumable checkpoint
    with pytest.raises(CheckpointError, match=OPTIMIZER_STATE):
        load_into_fresh(save_model(tmp_path / "model", model, tokenizer))


def test_an_intact_checkpoint_verifies(tmp_path):
    path, _ = save(tmp_path)
    verify_checkpoint(path)
    assert set(json.loads((path / MANIFEST).read_text())) >= {"model.safetensors", OPTIMIZER_STATE, TRAINER_STATE}


# --- atomic saves --------------------------------------------------------------------------------------


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    previous, (model, tokenizer, optimizer, scheduler) = save(tmp_path, step=2)
    listing = sorted(p.name for p in tmp_path.iterdir())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)  # after the weights, before the optimizer
    model.lm_head.weight.data.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(checkpoint_path(tmp_path, 4), model, tokenizer, optimizer, scheduler, {"step": 4})
    with pytest.raises(OSError, match="disk full"):  # overwriting the same name fails the same way
        save_checkpoint(previous, model, tokenizer, optimizer, scheduler, {"step": 4})
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no partial or temporary directory
    assert latest_checkpoint(tmp_path) == previous
    verify_checkpoint(previous)
    other, _, other_optimizer, other_scheduler = fresh()
    assert load_checkpoint(previous, other, other_optimizer, other_scheduler) == STATE
    expected = trained(0)[0]
    assert_same_state(other.state_dict(), expected.state_dict())  # the old weights, not the changed ones


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    path, (model, tokenizer, optimizer, scheduler) = save(tmp_path)
    model.lm_head.weight.data.add_(1.0)
    save_checkpoint(path, model, tokenizer, optimizer, scheduler, {"step": 9})
    other, _, other_optimizer, other_scheduler = fresh()
    assert load_checkpoint(path, other, other_optimizer, other_scheduler) == {"step": 9}
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- from_pretrained -----------------------------------------------------------------------------------


def test_checkpoint_and_model_directories_load_with_from_pretrained(tmp_path):
    path, (model, tokenizer, _, _) = save(tmp_path)
    model_dir = save_model(tmp_path / "model", model, tokenizer)
    verify_checkpoint(model_dir)  # the final model carries a manifest too
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    for directory in (path, model_dir):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        assert_same_state(model.state_dict(), loaded.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        text = "<|im_start|>user\n2+2?<|im_end|>"
        assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
