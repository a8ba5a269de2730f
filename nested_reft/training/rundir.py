"""A run directory: the files a run leaves, its one writer, and whether a run there starts fresh or resumes.

    OUTPUT/config.yaml          the resolved config            OUTPUT/metrics.jsonl      one line per ReFT step
    OUTPUT/sft_metrics.jsonl    one line per SFT step          OUTPUT/summary.json       written at the end
    OUTPUT/checkpoint-N/        the newest resumable state     OUTPUT/model/             the final model
    OUTPUT/sft-model/           the reference (beta > 0 only)  OUTPUT/.nested-reft.lock  held while a run writes
    OUTPUT/adapter/             LoRA runs: the adapters        OUTPUT/data.json          the training data's identity

The rules that keep a week of training safe from a typo: a fresh run needs a directory without a run in
it (one that stopped before its first checkpoint holds nothing to keep, and is cleared); `--resume` needs a
checkpoint and says why there is none, and continues only with the settings and the data the run started
with; a finished run is never retrained unasked; and only one process writes a run directory at a time (the
second is refused, naming the first, before it touches anything).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path

from nested_reft.training.checkpoint import latest_checkpoint, remove_stale_staging
from nested_reft.config import RESUMABLE_OPTIONS, ConfigError, TrainConfig, config_differences, load_config
from nested_reft.store.files import (
    LOCK_FILE, LockHeldError, PathError, atomic_write_text, locked_directory, read_json_lines, read_json_object,
    removed_unless_used, writing,
)
from nested_reft.tasks.problems import Problem

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
FINAL_MODEL_DIR = "model"
SFT_MODEL_DIR = "sft-model"  # the post-SFT model, kept only when beta > 0: the reference of a resumed run
SFT_METRICS_FILE = "sft_metrics.jsonl"
ADAPTER_DIR = "adapter"  # LoRA runs: the trained adapters in PEFT's format (model/ holds them merged)
DATA_FILE = "data.json"  # which problems the run trains on (`data_identity`), compared on resume
_STARTED_FILES = (CONFIG_FILE, METRICS_FILE, SFT_METRICS_FILE, DATA_FILE)

logger = logging.getLogger(__name__)


class RunState(Enum):
    """What a run directory holds."""

    EMPTY = "empty"  # no run: missing, empty, or only a lock file
    STARTED = "started"  # a run began but wrote no checkpoint yet (killed early, or failed at start-up)
    RESUMABLE = "resumable"  # a run with a checkpoint to continue from
    FINISHED = "finished"  # summary.json: the run is complete (its model/ may have been deleted since)


def run_state(output: str | Path) -> RunState:
    """What `output` holds. A finished run is known by its summary, written last, never by its model/: a sweep
    with `keep_models: false` deletes that once it is evaluated, and the run is finished all the same."""
    output = Path(output)
    if (output / SUMMARY_FILE).is_file():
        return RunState.FINISHED
    if latest_checkpoint(output) is not None:
        return RunState.RESUMABLE
    started = [*_STARTED_FILES, FINAL_MODEL_DIR, SFT_MODEL_DIR]
    return RunState.STARTED if any((output / name).exists() for name in started) else RunState.EMPTY


def clear_started_run(output: str | Path) -> None:
    """Remove what a run that never reached a checkpoint left behind, so that it starts afresh; nothing where
    the run has a checkpoint or is finished. The caller holds the run directory's lock."""
    output = Path(output)
    if run_state(output) is not RunState.STARTED:
        return
    for name in _STARTED_FILES:
        (output / name).unlink(missing_ok=True)
    for name in (FINAL_MODEL_DIR, SFT_MODEL_DIR, ADAPTER_DIR):
        shutil.rmtree(output / name, ignore_errors=True)
    remove_stale_staging(output)  # a first checkpoint whose write failed


def checkpoint_to_resume(output: Path, resume: bool | None) -> Path | None:
    """The checkpoint a run continues from (None: a fresh run), or a ConfigError saying why neither can be.

    `resume=None` takes what the directory holds (callers that own it: sweeps, the demo). A fresh run over
    one that stopped before its first checkpoint starts it again (`clear_started_run`). Resuming a finished
    run that kept its last checkpoint trains nothing: it rewrites the final model and summary (and may change
    the options of RESUMABLE_OPTIONS).
    """
    state = run_state(output)
    if resume is None:
        resume = state is RunState.RESUMABLE
    if not resume:
        if state is RunState.FINISHED:
            raise ConfigError(f"output_dir {output} already holds a run, finished ({SUMMARY_FILE}): it is not trained "
                              "again, whatever was deleted from it since; choose another --output-dir")
        if state is RunState.RESUMABLE:
            raise ConfigError(f"output_dir {output} already holds a run: pass --resume to continue it, or choose "
                              "another --output-dir")
        return None
    checkpoint = latest_checkpoint(output)
    if checkpoint is not None:
        if state is RunState.FINISHED:
            logger.warning("--resume: the run in %s is finished; resuming from %s trains nothing and writes %s/ and "
                           "%s again", output, checkpoint.name, FINAL_MODEL_DIR, SUMMARY_FILE)
        return checkpoint
    if state is RunState.FINISHED:
        raise ConfigError(f"--resume: the run in {output} is finished and its checkpoints were removed: there is "
                          f"nothing to continue, and a finished run ({SUMMARY_FILE}) is not trained again")
    if state is RunState.STARTED:
        raise ConfigError(
            f"--resume: the run in {output} stopped before its first checkpoint (save_steps), so there is nothing to "
            "continue from; rerun it without --resume to start it again"
        )
    raise ConfigError(f"--resume: output_dir {output} holds no run to resume (no {CONFIG_FILE}, no checkpoint); "
                      "check the path, or drop --resume to start a new run there")


def check_resumed_config(config: TrainConfig, output: Path) -> None:
    """Refuse to resume with a config that differs from the run's saved one beyond RESUMABLE_OPTIONS."""
    saved_path = output / CONFIG_FILE
    if not saved_path.exists():
        raise ConfigError(f"--resume: {output} has no {CONFIG_FILE}, so the settings its checkpoint was trained "
                          "with are unknown; restore the file, or start a new --output-dir")
    differences = config_differences(load_config(saved_path), config)
    if differences:
        raise ConfigError(
            f"--resume: the run in {output} was started with another config; differing options: "
            f"{'; '.join(differences)}. Resume with the saved config ({saved_path}) or start a new --output-dir "
            f"(only {', '.join(RESUMABLE_OPTIONS)} may change on resume)"
        )


def data_identity(name: str, problems: Sequence[Problem]) -> dict:
    """What a run trains on, recorded in data.json: the set's name, its size and a digest of every problem
    (id, question, answer, solution), so that a resume on another copy or version of the data is seen."""
    rows = json.dumps([dataclasses.astuple(problem) for problem in problems]).encode("utf-8")
    return {"dataset": name, "problems": len(problems), "sha256": hashlib.sha256(rows).hexdigest()}


def check_resumed_data(output: Path, identity: dict) -> None:
    """Refuse to resume on other problems than the run's data.json records (runs from before it are not checked)."""
    saved = read_json_object(output / DATA_FILE) if (output / DATA_FILE).exists() else identity
    if saved != identity:
        raise ConfigError(
            f"--resume: the run in {output} was trained on other data ({saved['dataset']}, {saved['problems']} "
            f"problems, sha256 {saved['sha256'][:12]}; now {identity['dataset']}, {identity['problems']} problems, "
            f"sha256 {identity['sha256'][:12]}): check --data-dir, or start a new --output-dir"
        )


@contextlib.contextmanager
def claimed_run_directory(output: Path, accelerator) -> Iterator[None]:
    """`locked_run_directory`, creating the directory for the body and removing it again if the body leaves
    nothing in it but the lock: a refused or failed start leaves no trace (`removed_unless_used`)."""
    with removed_unless_used(output, (LOCK_FILE,), accelerator.is_main_process):
        with locked_run_directory(output, accelerator):
            yield


@contextlib.contextmanager
def locked_run_directory(output: Path, accelerator) -> Iterator[None]:
    """Hold the run directory's lock (main process) for the body; every rank fails alike when it is taken.

    Also clears what a checkpoint write killed midway left behind (its staging directory), which only the
    lock holder may do: another writer could be staging right now.
    """
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as stack:
        refusal = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(locked_directory(output, f"run directory {output}"))
                remove_stale_staging(output)
            except LockHeldError as error:
                refusal = str(error)
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise LockHeldError(refusal)
        yield


def keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they are recomputed) and a torn last line; on a fresh
    run, start empty."""
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (a step's metrics) to `path`."""
    with writing(path), open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The step records of a metrics JSONL file ([] where there is none; a torn last line left out), each with an
    integer step; a PathError naming the file and line where one is damaged."""
    records = read_json_lines(path).records
    for number, record in records:
        if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            raise PathError(f"{path}, line {number}: a metrics record needs an integer step, "
                            f"got {record.get('step')!r}")
    return [record for _, record in records]
