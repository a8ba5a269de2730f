"""Resumable checkpoints and atomically written model directories.

A checkpoint is a directory: the model (`save_pretrained`, safetensors) with its tokenizer, the
optimizer and scheduler states (`torch.save`, read back with `weights_only=True`, so loading never
runs pickled code: anything but tensors and plain values is refused by name), `trainer_state.json` (the step and the run's totals), every process's torch RNG
states (`rng_state.safetensors`), and `manifest.json` written last with the SHA-256 of every file.

What makes a resumed run draw what the original drew: every sampling decision of the trainer (the
data order, the skip set, the tokens) comes from a generator seeded by (seed, step, purpose) alone
(`seeding.step_generator`), so the checkpoint's step *is* that randomness's state. The global torch RNG
is still consumed by whatever the model does in training mode (dropout when it is enabled, OPT's
layer-drop draw), so its states are saved and restored too.

A sharded (FSDP2) run writes the same files: `sharding` gathers its whole weights and optimizer state onto
the main process first, and on resume every rank reads them and keeps its shard.

Every directory is assembled in a `.staging-*` sibling and renamed into place, so a killed run leaves
either the previous checkpoint or the new one, never half of one (and a staging directory that the next
start removes); a checkpoint whose manifest is missing or whose files do not match it is refused with a
clear error.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nested_reft.store.files import (
    PathError, atomic_write_json, file_digest, follow_umask, read_json_object, umask, writing,
)
from nested_reft.models.lora import has_adapters, load_adapter_weights
from nested_reft.training.sharding import is_fully_sharded, load_whole_optimizer_state, load_whole_weights

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
RNG_STATE = "rng_state.safetensors"
RUN_TENSORS = "run_tensors.safetensors"  # run state held in tensors (the bridges and their normal equations)
CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".staging-"  # a directory being written: renamed into place when complete
RETIRED_PREFIX = ".retired-"  # a directory being replaced: removed once its successor is in place


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupt."""


def save_model(directory: Path, model, tokenizer, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a `from_pretrained`-loadable model directory (safetensors + tokenizer) atomically.

    `weights`: the whole weights to write, for a sharded model (`sharding.gathered_weights`); by default the
    model's own.
    """
    return _write_atomically(directory, lambda staging: _write_model(staging, model, tokenizer, weights))


def save_checkpoint(
    directory: Path,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    rng_states: dict[str, torch.Tensor] | None = None,
    gathered: tuple[dict, dict] | None = None,
    run_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete, resumable checkpoint to `directory` atomically (replacing an older one there).

    `rng_states`: the RNG states of every process (`rng_states_of_rank`, keyed by rank), saved as safetensors.
    `gathered`: for a sharded model, its whole (weights, optimizer state) as `sharding` gathers them, written
    in place of the model's and the optimizer's own. `run_tensors`: run state held in tensors (`load_run_tensors`).
    """
    weights, optimizer_state = gathered if gathered is not None else (None, optimizer.state_dict())

    def write(staging: Path) -> None:
        _write_model(staging, model, tokenizer, weights)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, staging / OPTIMIZER_STATE)
        atomic_write_json(staging / TRAINER_STATE, state)
        if rng_states is not None:
            save_file(rng_states, staging / RNG_STATE)
        if run_tensors:
            save_file(run_tensors, staging / RUN_TENSORS)

    return _write_atomically(directory, write)


def _write_model(staging: Path, model, tokenizer, weights: dict[str, torch.Tensor] | None) -> None:
    model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def _write_atomically(directory: Path, write) -> Path:
    """Run `write(staging)` in a temporary sibling, seal it with a manifest, then rename it to `directory`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{STAGING_PREFIX}{directory.name}."))
    try:
        with writing(directory, (RuntimeError, SafetensorError)):  # a full disk: one line naming the directory
            staging.chmod(0o777 & ~umask())  # mkdtemp makes it 0700; give it a normal directory's mode
            write(staging)
            follow_umask(staging)  # safetensors writes 0600 files: a model other users and jobs load follows the umask
            atomic_write_json(staging / MANIFEST, _hashes(staging))
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging and retired directories a killed write left in `directory` (at 7B, tens of GB).

    Only a process that holds the directory's lock may call this: another writer's staging is not stale.
    """
    stale = [path for path in Path(directory).glob(".*") if path.is_dir() and path.name.startswith((STAGING_PREFIX, RETIRED_PREFIX))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def load_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Verify `directory`, load its weights and optimizer/scheduler states in place, return its state."""
    directory = Path(directory)
    listed = verify_checkpoint(directory)
    shards = sorted(path for path in directory.glob("*.safetensors") if path.name not in (RNG_STATE, RUN_TENSORS))
    unverified = [name for name in [p.name for p in shards] + [OPTIMIZER_STATE, TRAINER_STATE] if name not in listed]
    if not shards or unverified:  # everything read below must be covered by the manifest's checksums
        missing = unverified or "no *.safetensors"
        raise CheckpointError(f"checkpoint {directory} is partial: {missing} not in {MANIFEST}")
    weights = {}
    for shard in shards:
        weights.update(load_file(shard))
    if is_fully_sharded(model):  # every rank holds the whole weights read above and keeps its shard
        missing, unexpected = load_whole_weights(model, weights)
    elif has_adapters(model):  # a LoRA run's checkpoint holds the adapters only; the base comes from config.model
        missing, unexpected = [], load_adapter_weights(model, weights)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint {directory} does not fit the model: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    states = _optimizer_states(directory / OPTIMIZER_STATE)
    if is_fully_sharded(model):
        load_whole_optimizer_state(model, optimizer, states["optimizer"])
    else:
        optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    return _trainer_state(directory / TRAINER_STATE)


def _optimizer_states(path: Path) -> dict:
    """The optimizer and scheduler states of optimizer.pt, the one pickle nested-reft reads: with torch.load's
    weights_only=True, which unpickles tensors, numbers, strings and plain containers and refuses anything else
    (a global it does not know is never imported or called). What it refuses, or a file of another shape, is a
    CheckpointError naming the file."""
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = str(error).strip().splitlines()[0][:200]
        raise CheckpointError(f"{path} is not an optimizer state of tensors and plain values ({reason}): nested-reft "
                              "did not write it; restore the checkpoint, or start a new --output-dir") from None
    if not isinstance(states, dict) or not {"optimizer", "scheduler"} <= set(states):
        raise CheckpointError(f"{path} holds no optimizer and scheduler states: nested-reft did not write it; restore "
                              "the checkpoint, or start a new --output-dir")
    return states


def _trainer_state(path: Path) -> dict:
    """The JSON object trainer_state.json holds; a CheckpointError naming the file where it holds none."""
    try:
        return read_json_object(path)
    except PathError as error:
        raise CheckpointError(f"{error}: restore the checkpoint, or start a new --output-dir") from None


def load_run_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The run state a checkpoint holds in tensors (empty if it holds none), once its checksum is verified."""
    directory = Path(directory)
    if RUN_TENSORS not in verify_checkpoint(directory):
        return {}
    return load_file(directory / RUN_TENSORS)


def rng_states_of_rank(rank: int) -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and every CUDA device), keyed "rank{rank}.cpu", "rank{rank}.cuda{i}"."""
    states = {f"rank{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"rank{rank}.cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng_states(directory: Path, rank: int) -> None:
    """Set this process's torch RNG states to those rank `rank` saved in checkpoint `directory`."""
    directory = Path(directory)
    if RNG_STATE not in verify_checkpoint(directory):
        warnings.warn(f"checkpoint {directory} has no {RNG_STATE} (saved by an older version): the global torch "
                      "RNG (dropout) is not restored, so a resumed run may differ from an uninterrupted one")
        return
    states = load_file(directory / RNG_STATE)
    if f"rank{rank}.cpu" not in states:
        saved = len([key for key in states if key.endswith(".cpu")])
        raise CheckpointError(f"checkpoint {directory} was saved by {saved} process(es); rank {rank} has no RNG state")
    torch.set_rng_state(states[f"rank{rank}.cpu"])
    devices = sum(key.startswith(f"rank{rank}.cuda") for key in states)
    cuda = [states[f"rank{rank}.cuda{i}"] for i in range(devices)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def verify_checkpoint(directory: Path) -> dict[str, str]:
    """Raise CheckpointError unless every file listed in the manifest is present and unchanged; return it."""
    manifest_path = Path(directory) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        expected = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path} is corrupt: {error}") from None
    if not isinstance(expected, dict) or not expected:
        raise CheckpointError(f"{manifest_path} is corrupt: not a mapping of file names to checksums")
    actual = _hashes(Path(directory), exclude={MANIFEST})
    for name, digest in expected.items():
        if name not in actual:
            raise CheckpointError(f"checkpoint {directory} is partial: {name} is missing")
        if actual[name] != digest:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} does not match its checksum")
    return expected


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints in `output_dir`, oldest (lowest step) first."""
    candidates = [
        path for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if path.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(candidates, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint of the highest step in `output_dir`, or None."""
    return (checkpoints(output_dir) or [None])[-1]


def remove_old_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints of `output_dir` (0: keep every one), called after a complete save."""
    for path in checkpoints(output_dir)[:-keep] if keep else []:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def _hashes(directory: Path, exclude: set[str] = frozenset()) -> dict[str, str]:
    return {path.name: file_digest(path) for path in sorted(directory.iterdir())
            if path.is_file() and path.name not in exclude}


def _replace_directory(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and removed after."""
    if target.exists():
        retired = target.with_name(f"{RETIRED_PREFIX}{target.name}")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def _is_tied(model, name: str) -> bool:
    """Whether parameter `name` is tied to another one (safetensors stores tied weights once)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return name in keys
