"""An evaluation directory: its files, its one writer, and the per-problem records a rerun resumes from.

    OUTPUT/<benchmark>.jsonl     one record per problem: {"id", "prompt", "completion", "extracted_answer",
                                 "gold", "correct", "completion_tokens", "finished"}; appended batch by batch,
                                 rewritten (atomically) in the data set's order once the benchmark is done
    OUTPUT/eval_settings.json    the model (its name, and the SHA-256 of its config and weight files) and the
                                 sampling settings the records were drawn with
    OUTPUT/eval.json             the accuracies, written atomically at the end (`nested_reft.evaluation.evaluate`)
    OUTPUT/.nested-reft.lock     held while an evaluation writes

The rules that keep results from mixing: records are resumed only under the settings they were drawn with
(`claim_output_dir`), and only for the very problem they answer (`resumable_records`: the same prompt and gold
answer, not just the same id, so other data under the same names is refused); one process writes a directory
at a time; a torn last line (a kill mid-write) is dropped, any other damage is refused naming file and line.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nested_reft.store.files import (
    PathError, atomic_write_json, atomic_write_text, locked_directory, read_json_lines, read_json_object,
)

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
SETTINGS_FILE = "eval_settings.json"
# Each record's fields and the JSON types they hold (None: the extractor found no answer).
RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "prompt": (str,), "completion": (str,), "extracted_answer": (str, type(None)), "gold": (str,),
    "correct": (bool,), "completion_tokens": (int,), "finished": (bool,),
}
RECORD_FIELDS = tuple(RECORD_TYPES)


class EvalError(ValueError):
    """An output directory whose results cannot be resumed: corrupt lines or results of other settings or data."""


@contextlib.contextmanager
def locked_eval_directory(output_dir: Path) -> Iterator[None]:
    """Hold the directory's lock for the body: a second evaluation into it is refused, naming the first."""
    with locked_directory(output_dir, f"evaluation directory {output_dir}"):
        yield


def read_records(path: Path) -> dict[str, dict]:
    """The records in a benchmark's JSONL file, by problem id (first one wins), in file order; a torn last line
    (a kill in the middle of a write, or a write under way) left out. A damaged line elsewhere, or a record
    without the expected fields and types, is corruption that no reader may paper over: `EvalError`, naming
    the file and line. Reads only: the evaluation that holds the directory repairs (`resumable_records`)."""
    return _read_records(Path(path))[0]


def _read_records(path: Path) -> tuple[dict[str, dict], bool]:
    """(`read_records`, whether the last line was torn)."""
    try:
        lines = read_json_lines(path)
    except PathError as error:
        raise EvalError(f"{error}; delete the file to start over") from None
    records: dict[str, dict] = {}
    for number, record in lines.records:
        _check_record(record, path, number)
        records.setdefault(record["id"], record)
    return records, lines.torn


def _check_record(record: dict, path: Path, number: int) -> None:
    missing = [key for key in RECORD_FIELDS if key not in record]
    if missing:
        raise EvalError(f"{path}, line {number}: not an evaluation record (missing {', '.join(missing)})")
    for key, types in RECORD_TYPES.items():
        value = record[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise EvalError(f"{path}, line {number}: field {key!r} must be "
                            f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}, got {value!r}")


def write_records(path: Path, records) -> None:
    """Rewrite a benchmark's records file atomically, one JSON line per record."""
    atomic_write_text(path, "".join(json_line(record) for record in records))


def json_line(record: dict) -> str:
    return json.dumps(record) + "\n"


def resumable_records(path: Path, problems: dict[str, tuple[str, str]]) -> dict[str, dict]:
    """The records of `path` (`read_records`), each checked to answer the problem its id names now: `problems`
    maps an id to its (prompt, gold answer). A record of another question or answer under the same id (other
    data, a changed copy) is an EvalError naming the problem, never a result reused for the wrong problem.
    A torn last line is dropped from the file (rewritten atomically) before the evaluation appends to it."""
    records, torn = _read_records(path)
    if torn:
        logger.warning("%s: dropping a partial last line (an interrupted write)", path)
        write_records(path, records.values())
    for problem_id, record in records.items():
        if problem_id in problems and (record["prompt"], record["gold"]) != problems[problem_id]:
            what = "prompt" if record["prompt"] != problems[problem_id][0] else "gold answer"
            raise EvalError(f"{path}: problem {problem_id} was evaluated with another {what} than the data gives "
                            "now (other data under the same ids); use another output directory")
    return records


def claim_output_dir(output_dir: Path, settings: dict, names: list[str]) -> None:
    """Record the settings, or check them against those of the results already in `output_dir`.

    `batch_size` may change between a run and its resumption (samples stay valid pass@1 draws, only no longer
    the exact draws of an uninterrupted run); anything else is refused.
    """
    path = output_dir / SETTINGS_FILE
    if path.exists():
        try:
            previous = read_json_object(path)
        except PathError as error:
            raise EvalError(f"{error}; delete it to start over") from None
        differences = _differences(previous, settings)
        if differences:
            raise EvalError(
                f"{output_dir} holds results of another evaluation ({'; '.join(differences)}); "
                "use another output directory, or delete this one to start over"
            )
    else:
        unclaimed = [f"{name}.jsonl" for name in names if (output_dir / f"{name}.jsonl").exists()]
        if unclaimed:
            raise EvalError(
                f"{output_dir} holds {', '.join(unclaimed)} but no {SETTINGS_FILE} saying how they were drawn; "
                "use another output directory"
            )
    atomic_write_json(path, settings)


@contextlib.contextmanager
def claimed_output_dir(output_dir: Path, settings: dict, names: list[str]) -> Iterator[None]:
    """`claim_output_dir` for the body; a body that fails before a record is written (an engine that cannot start, a
    full disk) removes what the claim wrote into a directory that held no evaluation: a failed start leaves no trace."""
    fresh = not (output_dir / SETTINGS_FILE).exists()
    claim_output_dir(output_dir, settings, names)
    try:
        yield
    except BaseException:
        files = [output_dir / f"{name}.jsonl" for name in names]
        if fresh and not any(file.is_file() and file.stat().st_size for file in files):
            for file in [*files, output_dir / SETTINGS_FILE]:
                file.unlink(missing_ok=True)
        raise


def _differences(previous: dict, current: dict) -> list[str]:
    """The settings that differ, "key was X, now Y"; a model's files are compared where both record them (an alias or
    a Hub id has none, and settings written before they were recorded are not checked)."""
    def flat(settings: dict) -> dict[str, Any]:
        config = settings.get("config")
        config = dict(config) if isinstance(config, dict) else {"config": config}
        for how in ("batch_size", "engine"):  # how the problems are batched and run, not what is drawn from
            config.pop(how, None)
        return {"model": settings.get("model"), "model_files": settings.get("model_files"), **config}

    before, now = flat(previous), flat(current)
    if before["model_files"] is None or now["model_files"] is None:
        now.pop("model_files")
    return [f"{key} was {before.get(key)!r}, now {now[key]!r}" + (" (another model at the same path)"
                                                                  if key == "model_files" else "")
            for key in now if before.get(key) != now[key]]
