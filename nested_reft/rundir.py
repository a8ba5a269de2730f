"""A run directory: the files a run leaves, its one writer, and whether a run there starts fresh or resumes.

    OUTPUT/config.yaml          the resolved config            OUTPUT/metrics.jsonl      one line per ReFT step
    OUTPUT/sft_metrics.jsonl    one line per SFT step          OUTPUT/summary.json       written at the end
    OUTPUT/checkpoint-N/        the newest resumable state     OUTPUT/model/             the final model
    OUTPUT/sft-model/           the reference (beta > 0 only)  OUTPUT/.nested-reft.lock  held while a run writes
    OUTPUT/adapter/             LoRA runs: the adapters

The rules that keep a week of training safe from a typo: a fresh run needs a directory without a run in
it; `--resume` needs a checkpoint and says why there is none; a finished run is never retrained unasked;
and only one process writes a run directory at a time (the second is refused, naming the first).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

from nested_reft.checkpoint import latest_checkpoint, remove_stale_staging
from nested_reft.config import RESUMABLE_OPTIONS, ConfigError, TrainConfig, config_differences, load_config
from nested_reft.files import LockHeldError, atomic_write_text, exclusive_lock

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
FINAL_MODEL_DIR = "model"
SFT_MODEL_DIR = "sft-model"  # the post-SFT model, kept only when beta > 0: the reference of a resumed run
SFT_METRICS_FILE = "sft_metrics.jsonl"
ADAPTER_DIR = "adapter"  # LoRA runs: the trained adapters in PEFT's format (model/ holds them merged)
LOCK_FILE = ".nested-reft.lock"
_STARTED_FILES = (CONFIG_FILE, METRICS_FILE, SFT_METRICS_FILE)


class RunState(Enum):
    """What a run directory holds."""

    EMPTY = "empty"  # no run: missing, empty, or only a lock file
    STARTED = "started"  # a run began but wrote no checkpoint yet (killed early, or failed at start-up)
    RESUMABLE = "resumable"  # a run with a checkpoint to continue from
    FINISHED = "finished"  # summary.json and model/: the run is complete


def run_state(output: str | Path) -> RunState:
    output = Path(output)
    if (output / SUMMARY_FILE).is_file() and (output / FINAL_MODEL_DIR).is_dir():
        return RunState.FINISHED
    if latest_checkpoint(output) is not None:
        return RunState.RESUMABLE
    started = [*_STARTED_FILES, SUMMARY_FILE, FINAL_MODEL_DIR, SFT_MODEL_DIR]
    return RunState.STARTED if any((output / name).exists() for name in started) else RunState.EMPTY


def clear_started_run(output: str | Path) -> None:
    """Remove what a run that never reached a checkpoint left behind, so it can start afresh (sweeps do this)."""
    output = Path(output)
    if run_state(output) is not RunState.STARTED:
        raise ConfigError(f"{output} holds a {run_state(output).value} run, not one to clear")
    for name in [*_STARTED_FILES, SUMMARY_FILE]:
        (output / name).unlink(missing_ok=True)
    for name in (FINAL_MODEL_DIR, SFT_MODEL_DIR, ADAPTER_DIR):
        shutil.rmtree(output / name, ignore_errors=True)


def checkpoint_to_resume(output: Path, resume: bool) -> Path | None:
    """The checkpoint a run continues from (None: a fresh run), or a ConfigError saying why neither can be.

    Resuming a finished run that kept its last checkpoint trains nothing: it rewrites the final model and
    summary (and may change the options of RESUMABLE_OPTIONS).
    """
    state = run_state(output)
    if not resume:
        if state is RunState.FINISHED:
            raise ConfigError(f"output_dir {output} already holds a run, finished ({SUMMARY_FILE} and "
                              f"{FINAL_MODEL_DIR}/): it is not trained again; choose another --output-dir")
        if state is not RunState.EMPTY:
            raise ConfigError(f"output_dir {output} already holds a run: pass --resume to continue it, or choose "
                              "another --output-dir")
        return None
    checkpoint = latest_checkpoint(output)
    if checkpoint is not None:
        return checkpoint
    if state is RunState.FINISHED:
        raise ConfigError(f"--resume: the run in {output} is finished and its checkpoints were removed: there is "
                          "nothing to continue, and a finished run is not trained again")
    if state is RunState.STARTED:
        raise ConfigError(
            f"--resume: the run in {output} stopped before its first checkpoint (save_steps), so there is nothing to "
            f"continue from; remove {output} and start it again without --resume"
        )
    raise ConfigError(f"--resume: output_dir {output} holds no run to resume (no {CONFIG_FILE}, no checkpoint); "
                      "check the path, or drop --resume to start a new run there")


def check_resumed_config(config: TrainConfig, output: Path) -> None:
    """Refuse to resume with a config that differs from the run's saved one beyond RESUMABLE_OPTIONS."""
    saved_path = output / CONFIG_FILE
    if not saved_path.exists():
        return
    differences = config_differences(load_config(saved_path), config)
    if differences:
        raise ConfigError(
            f"--resume: the run in {output} was started with another config; differing options: "
            f"{'; '.join(differences)}. Resume with the saved config ({saved_path}) or start a new --output-dir "
            f"(only {', '.join(RESUMABLE_OPTIONS)} may change on resume)"
        )


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
                stack.enter_context(exclusive_lock(output / LOCK_FILE, f"run directory {output}"))
                remove_stale_staging(output)
            except LockHeldError as error:
                refusal = str(error)
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise LockHeldError(refusal)
        yield


def keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (they are recomputed); on a fresh run, start empty."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (a step's metrics) to `path`."""
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics JSONL file ([] where there is none)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
