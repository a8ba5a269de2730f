"""A run directory's rules: one writer, a fresh run only where there is none, --resume only from a checkpoint,
a finished run never retrained unasked, stale staging cleared, nothing written before the inputs are checked."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import pytest

from nested_reft.training.checkpoint import latest_checkpoint
from nested_reft.config import ConfigError, load_config
from nested_reft.tasks.arithmetic import generate_arithmetic
from nested_reft.store.files import LOCK_FILE, LockHeldError
from nested_reft.training.rundir import (
    CONFIG_FILE,
    FINAL_MODEL_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    RunState,
    run_state,
)
from nested_reft.tasks.task import Task
from nested_reft.training.trainer import ensure_trained, train

PROBLEMS = generate_arithmetic(8, seed=1)


def config_for(output, **overrides):
    values = {"model": "tiny-llama", "output_dir": str(output), "rft_steps": 2, "batch_size": 2,
              "micro_batch_size": 4, "grpo.num_generations": 2, "sampling.max_new_tokens": 4,
              "sampling.min_new_tokens": 4, "sft.epochs": 0, "save_steps": 1}
    return load_config(None, {**values, **overrides})


def run(output, resume=False, problems=PROBLEMS, **overrides):
    return train(config_for(output, **overrides), Task("tiny", list(problems), reward=lambda c, g: 0.5), resume=resume)


def remove(output, *patterns: str) -> None:
    for pattern in patterns:
        for path in output.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def files(output) -> set[str]:
    return {path.name for path in output.iterdir()} if output.exists() else set()


def test_resume_on_a_missing_or_empty_directory_is_refused_not_started_fresh(tmp_path):
    with pytest.raises(ConfigError, match="holds no run to resume.*drop --resume"):
        run(tmp_path / "typo", resume=True)
    assert files(tmp_path / "typo") <= {LOCK_FILE}  # nothing of a run was written
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no run to resume"):
        run(tmp_path / "empty", resume=True)


def test_a_finished_run_without_checkpoints_is_never_retrained(tmp_path):
    output = tmp_path / "run"
    run(output)
    metrics = (output / METRICS_FILE).read_text()
    remove(output, "checkpoint-*")  # as a sweep does once a run is trained
    with pytest.raises(ConfigError, match="finished and its checkpoints were removed"):
        run(output, resume=True)
    with pytest.raises(ConfigError, match="already holds a run, finished"):
        run(output)
    assert (output / METRICS_FILE).read_text() == metrics  # not emptied


def test_a_directory_with_only_model_and_summary_is_not_overwritten(tmp_path):
    output = tmp_path / "run"
    run(output)
    for name in (CONFIG_FILE, METRICS_FILE):
        (output / name).unlink()
    remove(output, "checkpoint-*")
    summary = (output / SUMMARY_FILE).read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(output)
    assert (output / SUMMARY_FILE).read_text() == summary


def test_resume_before_the_first_checkpoint_says_why_it_cannot(tmp_path):
    output = tmp_path / "run"
    run(output, save_steps=100)
    remove(output, "checkpoint-*", FINAL_MODEL_DIR, SUMMARY_FILE)
    assert run_state(output) is RunState.STARTED
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        run(output, resume=True, save_steps=100)


def test_ensure_trained_finishes_resumes_or_restarts_as_the_directory_says(tmp_path):
    output = tmp_path / "run"
    config, task = config_for(output), Task("tiny", list(PROBLEMS), reward=lambda c, g: 0.5)
    first = ensure_trained(config, task)
    assert run_state(output) is RunState.FINISHED
    assert ensure_trained(config, task) == json.loads((output / SUMMARY_FILE).read_text()) == first
    remove(output, "checkpoint-*", FINAL_MODEL_DIR, SUMMARY_FILE)
    (output / METRICS_FILE).write_text('{"step": 1}\n')  # a run killed before its first checkpoint
    assert ensure_trained(config, task)["steps"] == 2
    assert [json.loads(line)["step"] for line in (output / METRICS_FILE).read_text().splitlines()] == [1, 2]


def test_an_empty_training_set_is_refused_before_anything_is_written(tmp_path):
    output = tmp_path / "run"
    with pytest.raises(ValueError, match="0 problems"):
        run(output, problems=[])
    assert files(output) <= {LOCK_FILE}
    run(output)  # the rerun with good data is not refused
    assert run_state(output) is RunState.FINISHED


def test_a_border_the_model_does_not_have_is_refused_even_at_x_0(tmp_path):
    with pytest.raises(ConfigError, match="nesting.border=100"):
        run(tmp_path / "run", **{"nesting.skip_ratio": 0.0, "nesting.border": 100})
    assert not (tmp_path / "run" / CONFIG_FILE).exists()


def test_stale_staging_of_a_killed_checkpoint_write_is_removed_at_start(tmp_path):
    output = tmp_path / "run"
    run(output, rft_steps=1)
    staging = output / ".staging-checkpoint-2.x1y2z3"
    staging.mkdir()
    (staging / "optimizer.pt").write_bytes(b"")  # what a kill -9 mid-write leaves
    retired = output / ".retired-checkpoint-1"
    retired.mkdir()
    run(output, resume=True, rft_steps=1)
    assert not staging.exists() and not retired.exists()
    assert latest_checkpoint(output).name == "checkpoint-1"


def test_saved_model_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        run(tmp_path / "run", rft_steps=1)
    finally:
        os.umask(previous)
    for directory in (tmp_path / "run" / FINAL_MODEL_DIR, latest_checkpoint(tmp_path / "run")):
        modes = {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}
        assert set(modes.values()) == {0o644}, modes


def _train_while_holding(output, started, release):
    import nested_reft.training.trainer as trainer

    def blocked_reft(*args, **kwargs):
        started.set()
        release.wait(60)

    trainer.reft = blocked_reft
    run(output, rft_steps=1)


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_first(tmp_path):
    output = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    first = context.Process(target=_train_while_holding, args=(output, started, release))
    first.start()
    try:
        assert started.wait(120), "the first run did not start"
        with pytest.raises(LockHeldError, match=rf"run directory {output} is in use by pid {first.pid}"):
            run(output, resume=True)
        with pytest.raises(LockHeldError):
            run(output)
    finally:
        release.set()
        first.join(120)
    assert first.exitcode == 0
    assert run_state(output) is RunState.FINISHED  # the first run ended normally; the refusals wrote nothing
