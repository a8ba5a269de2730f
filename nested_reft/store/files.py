"""Small file helpers every module that writes shares: atomic writes, JSON reads and one-writer locks.

Reads of the files the project writes and reads back go through `read_text`, `read_json_object` and
`read_json_lines`: UTF-8, JSON objects, a torn last line (a kill mid-append) left out, and any other damage a
PathError that names the file and the line.

Atomic writes go through a temporary sibling and a rename, so a reader (or a run killed mid-write) sees the
old file or the new one, never half of one; they get the mode the umask gives a new file, as the files a
plain `open` writes do. A write that fails for want of space or of a writable file system is a PathError
naming the path and the cause (`writing`). A command whose results appear only when it succeeds writes them
through `written_on_success`. Locks are `flock` locks on a file beside what they guard: the kernel releases them
when the holding process dies (a `kill -9` leaves no stale lock), and the holder writes who it is into the
lock file so that a refused second writer can name it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class LockHeldError(RuntimeError):
    """Another process holds the lock; the message names it (pid, host, command, since when)."""


class PathError(ValueError):
    """A path to write to that cannot be used (a file where a directory belongs, no write access); or a file the
    project reads back that is damaged. The message names the path (and the line)."""


def check_output_directory(path: str | os.PathLike, what: str) -> None:
    """Refuse (PathError naming `what`) a directory that cannot be made or written into: it, or a path above it,
    is a file, or the nearest existing directory is not writable. Checked before anything is written."""
    reason = _unwritable(Path(path), Path(path))
    if reason:
        raise PathError(f"{what} {path} {reason}")


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """As `check_output_directory`, for a file to write: not a directory, in a directory that can be made."""
    path = Path(path)
    reason = "is a directory; give a file name" if path.is_dir() else _unwritable(path, path.parent)
    if reason:
        raise PathError(f"{what} {path} {reason}")


def _unwritable(target: Path, directory: Path) -> str | None:
    """Why `directory` (`target` or the one it goes in) cannot be made or written into, or None: a path through a
    symbolic link that leads nowhere (or in a loop), a file, a directory not writable (a read-only mount)."""
    for candidate in (directory, *directory.parents):
        if candidate.is_symlink() and not candidate.exists():
            return (f"cannot be made: {candidate} is a symbolic link to {os.readlink(candidate)}, which does not exist "
                    "or loops")
    existing = next(candidate for candidate in (directory, *directory.parents) if candidate.exists())
    if not existing.is_dir():
        return "is a file; give a directory" if existing == target else f"is under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is not writable" + (
            " (a read-only file system)" if _read_only(existing) else "")
    return None


def _read_only(directory: Path) -> bool:
    return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)


@contextlib.contextmanager
def removed_unless_used(path: str | os.PathLike, ignored: tuple[str, ...] = (), remove: bool = True) -> Iterator[None]:
    """For the body, nothing; after it, the directories of `path` the body created are removed again where they
    hold nothing but `ignored` files (a lock): a command refused or failed at start-up leaves no trace."""
    path = Path(path)
    created = [candidate for candidate in (path, *path.parents) if not candidate.exists()]  # deepest first
    try:
        yield
    finally:
        for directory in created if remove else ():
            if not directory.is_dir() or any(item.name not in ignored for item in directory.iterdir()):
                break
            for name in ignored:
                (directory / name).unlink(missing_ok=True)
            directory.rmdir()


UNWRITABLE = {errno.ENOSPC: "no space left on its file system", errno.EDQUOT: "the disk quota is used up",
              errno.EROFS: "its file system is read-only"}  # a write's errors that name a cause the user can fix
LOW_SPACE = 16 << 20  # bytes: a writer that fails with less free than this failed for want of space


@contextlib.contextmanager
def writing(path: str | os.PathLike, writers: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Writes of `path` in the body: one that fails for want of space, of quota or of a writable file system is a
    PathError naming `path` and the cause (one line, instead of the OSError, which names neither), and so is an
    error of one of `writers` (torch.save's RuntimeError "unexpected pos", safetensors' own) raised while the file
    system has less than LOW_SPACE left. Every other error passes unchanged."""
    try:
        yield
    except (OSError, *writers) as error:
        cause = UNWRITABLE.get(error.errno) if isinstance(error, OSError) else None
        if cause is None and isinstance(error, writers):
            existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
            free = shutil.disk_usage(existing).free
            if free < LOW_SPACE:
                cause = f"no space left on its file system ({free} bytes free; {str(error).splitlines()[0][:120]})"
        if cause is None:
            raise
        raise PathError(f"{path} could not be written: {cause}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    with writing(path):
        _atomic_write_text(path, text)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~umask())  # mkstemp makes it 0600; give it a normal file's mode
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """The mapping a JSON file holds, or {} when it is missing or unreadable (results not written yet)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_text(path: str | os.PathLike) -> str:
    """A file's UTF-8 text; a PathError naming the file and the byte where it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PathError(f"{path} is not UTF-8 text (byte {error.start}); it was not written by nested-reft, "
                        "or is damaged") from None
    except IsADirectoryError:
        raise PathError(f"{path} is a directory, where a file was expected") from None


def read_json_object(path: str | os.PathLike) -> dict:
    """The mapping a JSON file the project wrote holds; a PathError naming the file where it is not one."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise PathError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise PathError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class JsonLines:
    """The records of a JSON-lines file with the line each came from, and whether its last line was torn."""

    records: list[tuple[int, dict]]
    torn: bool  # the last line was cut short (a kill mid-write) and is not among the records


def read_json_lines(path: str | os.PathLike) -> JsonLines:
    """The one reader of the JSON-lines files the project appends to (metrics, evaluation records).

    Blank lines are skipped; a last line without its newline that is not valid JSON is what a kill in the
    middle of a write leaves, and is left out (`torn`); any other line that is not a JSON object is damage
    that no reader may paper over: a PathError naming the file and the line. A missing file has no records.
    """
    path = Path(path)
    if not path.exists():
        return JsonLines([], False)
    lines = read_text(path).split("\n")
    last = len(lines) if lines[-1].strip() else None  # the number of a last line without its newline
    records, torn = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == last:
                torn = True
                continue
            raise PathError(f"{path}, line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise PathError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return JsonLines(records, torn)


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks: a model's weights are not held in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give every file under `path` (or `path` itself) the mode a new file gets, for writers that make 0600 files."""
    path = Path(path)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        file.chmod(0o666 & ~umask())


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the body; `what` names the guarded thing in the refusal.

    With `wait=False` a lock held by another process raises LockHeldError naming that process; with
    `wait=True` the call blocks until the holder is done (jobs that take turns, such as a shared warm-up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process (it has not written its name yet)"
            raise LockHeldError(f"{what} is in use by {holder}; wait for it to finish or stop it "
                                f"(lock file {path})") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(_holder_description())
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


LOCK_FILE = ".nested-reft.lock"  # an output directory's one-writer lock, whichever command writes it


def locked_directory(directory: str | os.PathLike, what: str) -> contextlib.AbstractContextManager[None]:
    """Hold `directory`'s one-writer lock (LOCK_FILE inside it) for the body: every command that writes an output
    directory takes this one, so a second writer is refused whatever command it is, naming the holder."""
    return exclusive_lock(Path(directory) / LOCK_FILE, what)


def _holder_description() -> str:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = " ".join(sys.argv)[:300]
    return f"pid {os.getpid()} on {socket.gethostname()} since {started} ({command})"


@contextlib.contextmanager
def written_on_success(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """For a command that writes its results into `directory` (probe, report): the directory's one-writer lock held
    for the body (`locked_directory`, `what` naming it in a refusal), and a staging directory inside it to write
    the results into, whose files appear in `directory` (each renamed into place) only once the body succeeds. A
    body that fails leaves none of them, and a directory it created is removed again (`removed_unless_used`)."""
    directory = Path(directory)
    with removed_unless_used(directory, (LOCK_FILE,)), locked_directory(directory, what):
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
        try:
            yield staging
            for file in sorted(path for path in staging.rglob("*") if path.is_file()):
                target = directory / file.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
