"""The results tables: the contract between `sweep`, which writes them, and `report`, which reads them.

results.csv: one row per instance of a grid: what the instance is (model, dataset, x, b, m, variant, seed), how
far it got (status, error) and what it measured (the pass@1 accuracy on each benchmark, `accuracy_<benchmark>`,
and their average `accuracy`; token speed; total runtime), plus the study's columns where measured (accuracy
before ReFT, i.e. of the SFT warm-up; the run's mean skipped layers, KL(behavior || target), ESS, truncated
fraction; median generation tokens/s; total rollout FLOPs; the warm-up's label, runtime and training FLOPs).
steps.csv: one row per ReFT step of each instance (the learning curves and off-policy diagnostics). problems.csv:
one row per evaluated problem of each instance and warm-up (correct or not: what the bootstrap resamples).
curve.csv: one row per evaluation of each instance, from its warm-up's to its own (pass@1 against the rollout FLOPs
spent by then).

Its own module so that the report, which only reads numbers, imports nothing that trains (no torch, no
transformers): this file needs the standard library alone.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nested_reft.store.files import atomic_write_text, read_text

RESULTS_FILE = "results.csv"
STEPS_FILE = "steps.csv"
PROBLEMS_FILE = "problems.csv"
CONDITIONS_FILE = "conditions.txt"  # the grid's `conditions`: how the runs were timed, beside wall-clock figures
# The columns every results.csv has; `results_columns` adds one `accuracy_<benchmark>` column per benchmark
# before `accuracy` (the average over the benchmarks).
RESULT_COLUMNS = ["model", "dataset", "instance", "role", "skip_ratio", "border", "mitigation", "seed", "status",
                  "accuracy", "token_speed", "total_runtime_s", "error"]
# The study's columns: optional (a results.csv written before them still reads), empty where not measured.
STUDY_COLUMNS = ["variant", "accuracy_before", "skipped_layers", "kl_behavior_target", "h_ess", "h_truncated",
                 "gen_tokens_per_s", "rollout_flops", "warm_up", "sft_runtime_s", "sft_flops"]
TEXT_STUDY_COLUMNS = ("variant", "warm_up")  # the others are numbers; warm_up: the label of a grid's warm_ups entry
REQUIRED_COLUMNS = [column for column in RESULT_COLUMNS if column != "error"]
STEP_COLUMNS = ["instance", "step", "reward_mean", "skipped_layers", "rollout_flops", "kl_behavior_target", "h_ess",
                "h_truncated", "gen_tokens_per_s", "step_time_s", "grad_norm", "groups_sampled", "groups_kept",
                "prompts_skipped"]
# added after the first study's steps.csv, which still reads (as None); the last three: rollout selection's
OPTIONAL_STEP_COLUMNS = ("grad_norm", "groups_sampled", "groups_kept", "prompts_skipped")
PROBLEM_COLUMNS = ["instance", "benchmark", "problem", "correct"]
# curve.csv: one row per evaluation of each run, at ReFT step `step` (0: its warm-up; intermediate ones with the
# grid's eval.steps, `step_evals`; the last, its own), with the rollout FLOPs the run had spent by then
CURVE_FILE = "curve.csv"
CURVE_COLUMNS = ["instance", "step", "accuracy", "rollout_flops"]
METRIC_COLUMNS = ("accuracy", "token_speed", "total_runtime_s")  # every finished instance has them
NUMERIC = {"skip_ratio": float, "border": int, "seed": int}
ROLES = ("baseline", "nested")


class ResultsError(ValueError):
    """results.csv is missing, lacks columns or holds values that are not numbers where numbers belong."""


def accuracy_column(benchmark: str) -> str:
    return f"accuracy_{benchmark}"


def model_slug(model: str) -> str:
    """How the sweep names a model in directories and the report in figures:
    `Qwen/Qwen2.5-Math-1.5B-Instruct` -> `qwen2.5-math-1.5b-instruct`."""
    name = Path(str(model).rstrip("/")).name
    name = name[: -len(".gguf")] if name.endswith(".gguf") else name
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def results_columns(benchmarks: Sequence[str]) -> list[str]:
    """RESULT_COLUMNS with one accuracy column per benchmark before the average."""
    at = RESULT_COLUMNS.index("accuracy")
    return RESULT_COLUMNS[:at] + [accuracy_column(name) for name in benchmarks] + RESULT_COLUMNS[at:] + STUDY_COLUMNS


def write_results(path: str | Path, benchmarks: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    """(Re)write results.csv at `path` atomically: the columns of `benchmarks`, and the accuracy columns of other
    benchmarks that some of `rows` hold (the runs of a larger grid, kept as written)."""
    columns = results_columns(benchmarks)
    at = columns.index("accuracy")
    columns[at:at] = list(dict.fromkeys(column for row in rows for column in row
                                        if column.startswith(accuracy_column("")) and column not in columns))
    atomic_write_text(path, csv_text(columns, rows))
    return Path(path)


def write_table(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    """(Re)write a CSV table (steps.csv, problems.csv) at `path` atomically."""
    atomic_write_text(path, csv_text(columns, rows))
    return Path(path)


def csv_text(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """`rows` as CSV text with a header; None (not measured yet, undefined) becomes an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


# What identifies a row of each table: a second row with the same key is refused, never "the last one wins".
ROW_KEYS = {RESULTS_FILE: ("instance",), STEPS_FILE: ("instance", "step"),
            PROBLEMS_FILE: ("instance", "benchmark", "problem"), CURVE_FILE: ("instance", "step")}
TEXT_COLUMNS = ("instance", "benchmark", "problem")
SCHEMAS = {RESULTS_FILE: (REQUIRED_COLUMNS, ()), STEPS_FILE: (STEP_COLUMNS, OPTIONAL_STEP_COLUMNS),
           PROBLEMS_FILE: (PROBLEM_COLUMNS, ()), CURVE_FILE: (CURVE_COLUMNS, ())}  # each table's columns, and those a table written before them lacks  # the columns of steps.csv and problems.csv that are not numbers


def read_rows(path: str | Path, columns: Sequence[str], optional: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """The one reader of the results tables: each row of the CSV file `path` as written (cells not parsed) with
    where it is ("<path>, line N"); [] where the file does not exist. Refused (ResultsError, naming file and line):
    text that is not UTF-8, a header without one of `columns` (`optional` ones may be absent), a row with more or
    fewer fields than the header, an empty key cell, and a second row with the key of an earlier one (`ROW_KEYS`)."""
    path = Path(path)
    if not path.is_file():
        return []
    return csv_rows(read_text(path), str(path), columns, optional, ROW_KEYS.get(path.name, ("instance",)))


def csv_rows(text: str, source: str, columns: Sequence[str], optional: Sequence[str] = (),
             key: Sequence[str] = ("instance",), expected: str | None = None) -> list[tuple[str, dict]]:
    """`read_rows` of the text of a table named `source`; `expected` says which columns a refusal asks for."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [column for column in columns if column not in header and column not in optional]
    if missing:
        raise ResultsError(f"{source} lacks column(s) {', '.join(missing)}; expected {expected or ', '.join(columns)}")
    rows, first = [], {}
    for row in reader:
        where = f"{source}, line {reader.line_num}"
        if None in row:  # csv.DictReader files the cells past the header's columns under None
            raise ResultsError(f"{where}: more fields than the header has columns ({len(row[None])} over)")
        if any(value is None for value in row.values()):  # and leaves those of a short row None
            given = sum(value is not None for value in row.values())
            raise ResultsError(f"{where}: {given} field(s), but the header has {len(header)} columns")
        identity = tuple(row.get(column, "") for column in key)
        if not all(identity):
            raise ResultsError(f"{where}: an empty {' or '.join(key)}")
        if identity in first:
            raise ResultsError(f"{where}: a second row for {', '.join(identity)} (the first is on line "
                               f"{first[identity]}); a table holds one row per {', '.join(key)}")
        first[identity] = reader.line_num
        rows.append((where, row))
    return rows


def read_results(path: str | Path) -> list[dict]:
    """The rows of results.csv, numbers parsed; finished rows must have every metric."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path} does not exist; run `nested-reft sweep GRID.yaml` (or `--collect`) first")
    return parse_results(read_text(path), str(path))


def parse_results(text: str, source: str = RESULTS_FILE) -> list[dict]:
    expected = f"the columns written by `nested-reft sweep`: {', '.join(REQUIRED_COLUMNS)}"
    return [_parse_row(row, where) for where, row in csv_rows(text, source, REQUIRED_COLUMNS, expected=expected)]


def read_table(path: str | Path, columns: Sequence[str], optional: Sequence[str] = ()) -> list[dict]:
    """The rows of steps.csv or problems.csv (`read_rows`), every column but `instance`, `benchmark` and `problem` a
    number (None where empty, or where an `optional` column is absent); [] where the file does not exist (a sweep
    written before the study's tables)."""
    return [parse_table_row(row, columns, where) for where, row in read_rows(path, columns, optional)]


def parse_table_row(row: dict, columns: Sequence[str], where: str) -> dict:
    """A row of steps.csv or problems.csv with its numbers parsed."""
    return {column: row[column] if column in TEXT_COLUMNS else _optional_number(row.get(column), column, where)
            for column in columns}


def table_rows(path: str | Path) -> list[dict]:
    """The rows of results.csv, steps.csv or problems.csv (by the file's name) as written, cells not parsed (so that
    copying them changes no figure), each checked as `read_results` and `read_table` check it; [] where the file
    does not exist."""
    path = Path(path)
    columns, optional = SCHEMAS[path.name]
    rows = read_rows(path, columns, optional)
    for where, row in rows:
        _parse_row(row, where) if path.name == RESULTS_FILE else parse_table_row(row, columns, where)
    return [row for _, row in rows]


def _optional_number(value: str, column: str, where: str) -> float | None:
    return None if value in (None, "") else _number(value, column, where, float)


def _parse_row(row: dict, where: str) -> dict:
    parsed: dict[str, Any] = dict(row)
    for column, kind in NUMERIC.items():
        parsed[column] = _number(row[column], column, where, kind)
    for column in STUDY_COLUMNS:
        text = column in TEXT_STUDY_COLUMNS
        parsed[column] = (row.get(column) or "") if text else _optional_number(row.get(column), column, where)
    done = row["status"] == "done"
    for column in [*METRIC_COLUMNS, *(c for c in row if c.startswith(accuracy_column("")))]:
        value = row.get(column)
        if value in (None, ""):
            if done and column in METRIC_COLUMNS:
                raise ResultsError(f"{where}: instance {row['instance']} is done but has no {column}")
            parsed[column] = None
        else:
            parsed[column] = _number(value, column, where, float)
    if row["role"] not in ROLES:
        raise ResultsError(f"{where}: role must be baseline or nested, got {row['role']!r}")
    return parsed


def _number(value: str, column: str, where: str, kind: type) -> float | int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ResultsError(f"{where}: column {column} must be a number, got {value!r}") from None
    if not math.isfinite(number):  # an accuracy of nan would print as "+nan" in Table 2
        raise ResultsError(f"{where}: column {column} must be a finite number, got {value!r}")
    return kind(number)


def mean_of_measured(values: Iterable[float | None]) -> float | None:
    """The mean of the values that were measured (not None: h's statistics on a step whose loss counted no token,
    a column a run lacks); None where none was."""
    measured = [value for value in values if value is not None]
    return statistics.fmean(measured) if measured else None
