"""Shared file helpers: atomic writes that never leave half a file, and one-writer locks that name the holder."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

import nested_reft.store.files as files_module
from nested_reft.store.files import LockHeldError, atomic_write_json, atomic_write_text, exclusive_lock, follow_umask


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_atomic_write_text_never_leaves_a_partial_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old contents\n")

    class Boom(Exception):
        pass

    def boom(*args, **kwargs):
        raise Boom()

    if failing == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.stream.close()

            def write(self, text):
                self.stream.write(text[: len(text) // 2])
                self.stream.flush()
                raise Boom()

        monkeypatch.setattr(files_module.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(files_module.os, failing, boom)
    with pytest.raises(Boom):
        atomic_write_text(target, "new contents that are much longer than the old ones\n" * 100)
    monkeypatch.undo()

    assert target.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_atomic_write_creates_parents_and_writes_whole(tmp_path):
    atomic_write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": [1, 2]}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def _hold_lock(path, ready, release):
    with exclusive_lock(path, "the test directory"):
        ready.set()
        release.wait(30)


def start_holder(path):
    """Another process that holds the lock on `path` until its `release` event is set; (process, release)."""
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    assert ready.wait(30)
    return holder, release


@pytest.fixture
def held_lock(tmp_path):
    """A lock on tmp_path/.lock held by another process for the duration of the test."""
    holder, release = start_holder(tmp_path / ".lock")
    yield holder
    release.set()
    holder.join(30)


def test_a_held_lock_is_refused_naming_the_holder(tmp_path, held_lock):
    with pytest.raises(LockHeldError, match=rf"the test directory is in use by pid {held_lock.pid} on "):
        with exclusive_lock(tmp_path / ".lock", "the test directory"):
            pytest.fail("entered a lock another process holds")


def test_a_lock_is_free_again_after_its_holder_ends(tmp_path):
    with exclusive_lock(tmp_path / ".lock", "it"):
        pass
    with exclusive_lock(tmp_path / ".lock", "it"):  # released on exit, also in the same process
        pass


def test_a_lock_of_a_killed_holder_is_free(tmp_path):
    holder, _ = start_holder(tmp_path / ".lock")
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    holder.join(30)
    with exclusive_lock(tmp_path / ".lock", "it"):
        pass


def test_follow_umask_gives_files_a_new_files_mode(tmp_path):
    (tmp_path / "model").mkdir()
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    previous = os.umask(0o022)
    try:
        follow_umask(tmp_path / "model")
    finally:
        os.umask(previous)
    assert weights.stat().st_mode & 0o777 == 0o644
