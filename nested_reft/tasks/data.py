"""Math datasets as one uniform record, `Problem`, from local files or the Hugging Face hub.

`load_problems(name, split)` is the single entry point. Where the data comes from:

1. `data_dir=` if given, else the environment variable `NESTED_REFT_DATA`: a directory laid out like
   `shared/data` (see `LAYOUT`), holding the original files unconverted;
2. otherwise the Hugging Face hub through `datasets.load_dataset`, from these datasets:

| name            | split(s)    | hub dataset (config, hub split)                             | rows        |
|-----------------|-------------|-------------------------------------------------------------|-------------|
| `gsm8k`         | train, test | `openai/gsm8k` ("main", train/test)                         | 7473 / 1319 |
| `svamp`         | train, test | `ChilleD/SVAMP` (train/test)                                | 700 / 300   |
| `math12k`       | train, test | `hiyouga/math12k` (train/test), solutions joined from       | 12000 / 500 |
|                 |             | `EleutherAI/hendrycks_math` (7 subject configs, train+test) |             |
| `math500`       | test        | `HuggingFaceH4/MATH-500` (test)                             | 500         |
| `aime24`        | test        | `HuggingFaceH4/aime_2024` (train)                           | 30          |
| `amc`           | test        | `AI-MO/aimo-validation-amc` (train)                         | 83          |
| `minerva`       | test        | `math-ai/minervamath` (test)                                | 272         |
| `olympiadbench` | test        | `Hothan/OlympiadBench` ("OE_TO_maths_en_COMP", train)       | 675         |
| `arithmetic`    | train, test | none: generated (`nested_reft.tasks.arithmetic`)                  | 5000 / 500  |

Locally the benchmarks come from the evaluation suite of Liu et al. 2025 (`eval_suite/r1zero_suite`), the set
the Nested-ReFT paper evaluates on; `math12k` "test" is the same 500 MATH500 problems with their MATH solutions.
The hub's SVAMP split (ChilleD) and the local one (`svamp_split`) have the same sizes but not the same members:
the original SVAMP file has no split.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import math
import operator
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

from nested_reft.config import BENCHMARKS, TRAINING_SETS  # noqa: F401 (the names of the sets REGISTRY loads)
from nested_reft.tasks.arithmetic import arithmetic_split
from nested_reft.store.files import read_text
from nested_reft.tasks.problems import Problem

DATA_ENV = "NESTED_REFT_DATA"

LAYOUT = """\
<data_dir>/
  gsm8k/{train,test}.jsonl                       GSM8K, fields question, answer ('... #### N')
  svamp/SVAMP.json                               SVAMP, one JSON array: ID, Body, Question, Equation, Answer
  math/math12k/{train,test}-00000-of-00001.parquet   hiyouga/math12k, fields problem, answer
  math/MATH/{train,test}/<subject>/<n>.json      Hendrycks MATH files, fields problem, solution
  eval_suite/r1zero_suite/{aime,amc,math,minerva,olympiad_bench}/   datasets.save_to_disk, fields problem, answer"""

# The layout in one line, for errors (one line each): the paths alone.
LAYOUT_PATHS = ", ".join(line.split()[0] for line in LAYOUT.splitlines()[1:]) + " (see nested_reft/tasks/data.py)"

SVAMP_TEST_FRACTION = 0.3  # 300 of 1000: the sizes of the hub's ChilleD/SVAMP test split
HENDRYCKS_MATH = "EleutherAI/hendrycks_math"  # the hub copy of MATH with solutions, one config per subject
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


class DataError(ValueError):
    """A data set is missing, malformed or unknown; the message names the file, row and field."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers shared by the formats
# ----------------------------------------------------------------------------------------------------------

Rows = Iterable[tuple[str, Mapping[str, Any]]]  # (where: "file, line 3" / "hub dataset ..., row 3", row)


def _field(row: Mapping[str, Any], keys: str | tuple[str, ...], where: str) -> Any:
    """The first present, non-empty field of `keys` (several names where hub copies name a field differently)."""
    keys = (keys,) if isinstance(keys, str) else keys
    for key in keys:
        value = row.get(key) if isinstance(row, Mapping) else None
        if value is not None and not (isinstance(value, (str, list)) and not value):
            return value
    names = " or ".join(repr(k) for k in keys)
    raise DataError(f"{where}: missing or empty field {names}")


def format_number(value: float | int | Fraction | str) -> str:
    """A number as people write it: 21.0 -> '21', 2.50 -> '2.5', 1/3 -> '1/3' (no float noise)."""
    exact = Fraction(str(value)) if isinstance(value, float) else Fraction(value)
    if exact.denominator == 1:
        return str(exact.numerator)
    decimal = Decimal(exact.numerator) / Decimal(exact.denominator)
    if Fraction(decimal) == exact:
        return format(decimal.normalize(), "f")
    return f"{exact.numerator}/{exact.denominator}"


def clean_answer(value: Any) -> str:
    """A gold answer from a benchmark as a plain string.

    Numbers are printed cleanly (AMC stores 21.0). A list is a set of *alternative* spellings of one answer
    (Minerva: ['4.4e7', '4.4 \\times 10^7'], ['2\\n', '2']), the way the Liu et al. grader reads it (any one
    matches), so the first is kept; joining them would make a wrong tuple. Several answers inside one string
    (OlympiadBench '$69$,$84$') are joined with ', ' and the `$` math delimiters (not `\\$`) are dropped, as is
    a trailing full stop.
    """
    if isinstance(value, list):
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    text = re.sub(r"(?<!\\)\$\s*,\s*\$", ", ", str(value).strip())
    text = re.sub(r"(?<!\\)\$", "", text).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _require(path: Path, root: Path) -> Path:
    if not path.exists():
        raise DataError(f"missing {path}; expected this layout under {root}: {LAYOUT_PATHS}")
    return path


def _not_empty(rows: Sequence[Any], source: object) -> Sequence[Any]:
    """The rows of a local file of problems, unless there are none: then a DataError naming the file here,
    where it is known, rather than a division by zero once a run has started on nothing."""
    if len(rows) == 0:
        raise DataError(f"{source} holds 0 problems (it is empty)")
    return rows


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    lines = [(number, line) for number, line in enumerate(read_text(path).split("\n"), start=1) if line.strip()]
    for number, line in _not_empty(lines, path):
        where = f"{path}, line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg})") from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from err


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a bad file; name the file instead
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    return ((f"{path}, row {i}", row) for i, row in enumerate(_not_empty(rows, path)))


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or its own errors for a bad directory
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from err
    return ((f"{path}, row {i}", row) for i, row in enumerate(_not_empty(dataset, path)))


def _hub_rows(path: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    """Rows of a hub dataset; any failure (offline, renamed dataset) becomes one clear DataError."""
    import datasets

    label = f"hub dataset {path}" + (f" ({config})" if config else "") + f", split {split!r}"
    try:
        dataset = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # network, auth and schema errors all mean the same thing to the user
        raise DataError(
            f"could not load {label}: {err}. To use local files instead, pass data_dir= or set ${DATA_ENV} "
            f"to a directory laid out as: {LAYOUT_PATHS}"
        ) from err
    return ((f"{label}, row {i}", row) for i, row in enumerate(dataset))


# ----------------------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------------------


def gsm8k_problem(row: Mapping[str, Any], where: str, index: int, split: str) -> Problem:
    """The answer is the number after '####' without thousands separators ('1,080' -> '1080'). The solution
    drops the `<<48/2=24>>` calculator annotations and ends in a sentence with `\\boxed{N}` in place of '#### N'.
    """
    question, worked = _field(row, "question", where), _field(row, "answer", where)
    body, marker, final = str(worked).rpartition("####")
    answer = final.strip().replace(",", "")
    if not marker or not re.fullmatch(r"-?\d+(\.\d+)?", answer):  # a gold answer of words would score nothing
        raise DataError(f"{where}: field 'answer' must end in '#### N', N a number, got {final.strip()[:40]!r}")
    body = re.sub(r"<<[^>]*>>", "", body).rstrip()
    solution = f"{body}\nThe final answer is \\boxed{{{answer}}}"
    return Problem(f"gsm8k/{split}/{index}", str(question).strip(), answer, solution)


# ----------------------------------------------------------------------------------------------------------
# SVAMP
# ----------------------------------------------------------------------------------------------------------

_OPERATIONS = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
}


def _evaluate_steps(node: ast.AST, steps: list[str], where: str) -> Fraction:
    """Evaluate an equation tree exactly (Fractions), appending 'a op b = c' for each operation, inner first."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        if not math.isfinite(node.value):  # a literal past float's range (1e400) parses as inf
            raise DataError(f"{where}: field 'Equation' holds a number out of range ({node.value})")
        return Fraction(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATIONS:
        left, right = _evaluate_steps(node.left, steps, where), _evaluate_steps(node.right, steps, where)
        symbol, apply = _OPERATIONS[type(node.op)]
        if symbol == "/" and right == 0:
            raise DataError(f"{where}: field 'Equation' divides by zero")
        result = apply(left, right)
        steps.append(f"{format_number(left)} {symbol} {format_number(right)} = {format_number(result)}")
        return result
    raise DataError(f"{where}: field 'Equation' holds something other than + - * / on numbers")


def svamp_problem(row: Mapping[str, Any], where: str) -> Problem:
    """SVAMP has no chain of thought: one is written from its `Equation`, one computation per sentence.

    The answer is the exact value of the equation. It equals the `Answer` field everywhere but in one row
    (chal-680: "4 apples, picked 2, 3 grew", ( ( 4.0 - 2.0 ) + 3.0 ) = 5, Answer 1.0), where the equation
    matches the text and `Answer` does not.
    """
    problem_id, equation = _field(row, "ID", where), str(_field(row, "Equation", where))
    question = f"{str(_field(row, 'Body', where)).strip()} {str(_field(row, 'Question', where)).strip()}"
    steps: list[str] = []
    try:
        answer = format_number(_evaluate_steps(ast.parse(equation.strip(), mode="eval").body, steps, where))
    except SyntaxError as err:
        raise DataError(f"{where}: field 'Equation' is not an arithmetic expression: {equation[:80]!r}") from err
    except RecursionError:  # parsing or evaluating a chain of thousands of operations
        raise DataError(f"{where}: field 'Equation' nests too deeply ({len(equation)} characters)") from None
    if len(steps) <= 1:  # one row (chal-555) has the bare equation '8.0': nothing to compute
        lines = [f"We compute {steps[0]}." if steps else "The problem states this number directly."]
    else:
        lines = [f"First, {steps[0]}."] + [f"Then, {step}." for step in steps[1:]]
    lines.append(f"The final answer is \\boxed{{{answer}}}")
    return Problem(f"svamp/{problem_id}", question, answer, "\n".join(lines))


def svamp_split(ids: Iterable[str]) -> dict[str, set[str]]:
    """Split SVAMP ids once, deterministically: the 30% of ids with the smallest sha256(ID) are the test set.

    A hash of the id (not of the position, not Python's seeded `hash`) keeps the split fixed under any
    reordering of the file, across machines and Python versions; on the 1000 problems it gives 700 / 300.
    """
    ordered = sorted(set(ids), key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    n_test = round(SVAMP_TEST_FRACTION * len(ordered))
    return {"test": set(ordered[:n_test]), "train": set(ordered[n_test:])}


def _svamp_local(root: Path, split: str) -> list[Problem]:
    path = _require(root / "svamp" / "SVAMP.json", root)
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected one JSON array of problems")
    located = [(f"{path}, index {i}", row) for i, row in enumerate(_not_empty(rows, path))]
    ids = {str(_field(row, "ID", where)) for where, row in located}
    keep = svamp_split(ids)[split]
    return [svamp_problem(row, where) for where, row in located if str(row["ID"]) in keep]


# ----------------------------------------------------------------------------------------------------------
# MATH12k (hiyouga/math12k problems and answers, Hendrycks MATH solutions)
# ----------------------------------------------------------------------------------------------------------


def _normalise_boxed(solution: str) -> str:
    """Three MATH solutions write `\\boxed 9` or `\\boxed {17}`; braces make them readable by any grader."""
    solution = re.sub(r"\\boxed\s+\{", r"\\boxed{", solution)
    return re.sub(r"\\boxed\s+(\d+)", r"\\boxed{\1}", solution)


def _math_solutions(rows: Rows) -> dict[str, str]:
    """problem.strip() -> solution. One text occurs in two files (train/geometry/6032, test/precalculus/24307);
    rows arrive in a fixed order and the first one wins, so the join is deterministic."""
    index: dict[str, str] = {}
    for where, row in rows:
        problem = str(_field(row, "problem", where)).strip()
        index.setdefault(problem, _normalise_boxed(str(_field(row, "solution", where))))
    return index


# Four rows of hiyouga/math12k have no usable answer ('None' or ''), because PRM800K took it from a box that is
# unbraced (`\boxed 2`) or empty (`\boxed{}`) in the MATH solution. Their answers, read from those solutions
# (problem text prefix -> answer; an empty box in the solution is filled with it):
_MATH12K_MISSING_ANSWERS = {
    r"What is the largest value of $x$, if $\frac{x}{5} + \frac{1}{5x}": "2",  # train/algebra/24014
    "If $(x + y)^2 = 1$ and $xy = -4$": "9",  # train/algebra/25040
    "For any integer $n>1$, the number of prime numbers greater than $n!+1$": "0",  # train/number_theory/7115
    "You are given a sequence of $58$ terms": "0",  # train/number_theory/7117
}


def math12k_problem(row: Mapping[str, Any], where: str, index: int, split: str, solutions: dict[str, str]) -> Problem:
    """Join the row to its MATH solution by `problem.strip()` (the texts agree up to surrounding white space)."""
    problem = str(_field(row, "problem", where)).strip()
    solution = solutions.get(problem)
    if solution is None:
        raise DataError(f"{where}: no MATH solution has the text of field 'problem' ({problem[:60]!r}...)")
    answer = str(row.get("answer") or "").strip()
    if answer in ("", "None"):
        fixed = [value for prefix, value in _MATH12K_MISSING_ANSWERS.items() if problem.startswith(prefix)]
        if not fixed:
            raise DataError(f"{where}: missing or empty field 'answer'")
        answer, solution = fixed[0], solution.replace("\\boxed{}", f"\\boxed{{{fixed[0]}}}")
    return Problem(f"math12k/{split}/{index}", problem, answer, solution)


def _math_files(root: Path) -> Rows:
    math_dir = _require(root / "math" / "MATH", root)
    paths = sorted(glob.glob(str(math_dir / "*" / "*" / "*.json")))
    if not paths:
        raise DataError(f"{math_dir} holds no <split>/<subject>/<n>.json files; expected layout: {LAYOUT_PATHS}")
    return ((path, _read_json(Path(path))) for path in paths)


def _math12k_local(root: Path, split: str) -> list[Problem]:
    parquet = _require(root / "math" / "math12k" / f"{split}-00000-of-00001.parquet", root)
    solutions = _math_solutions(_math_files(root))
    return _convert(_read_parquet(parquet), partial(math12k_problem, split=split, solutions=solutions))


def _math12k_hub(split: str) -> list[Problem]:
    parts = [("train", subject) for subject in MATH_SUBJECTS] + [("test", subject) for subject in MATH_SUBJECTS]
    solutions = _math_solutions(row for part, subject in parts for row in _hub_rows(HENDRYCKS_MATH, subject, part))
    make = partial(math12k_problem, split=split, solutions=solutions)
    return _convert(_hub_rows("hiyouga/math12k", None, split), make)


# ----------------------------------------------------------------------------------------------------------
# Benchmarks (problem and answer only)
# ----------------------------------------------------------------------------------------------------------


def benchmark_problem(row: Mapping[str, Any], where: str, index: int, name: str) -> Problem:
    """Hub copies call the fields problem/question and answer/final_answer; both are read."""
    question = str(_field(row, ("problem", "question", "Problem"), where)).strip()
    answer = clean_answer(_field(row, ("answer", "final_answer", "Answer"), where))
    if not answer:
        raise DataError(f"{where}: field 'answer' is empty once cleaned")
    return Problem(f"{name}/test/{index}", question, answer, None)


# suite directory in eval_suite/r1zero_suite, hub (path, config, split)
_BENCHMARK_SOURCES = {
    "aime24": ("aime", ("HuggingFaceH4/aime_2024", None, "train")),
    "amc": ("amc", ("AI-MO/aimo-validation-amc", None, "train")),
    "math500": ("math", ("HuggingFaceH4/MATH-500", None, "test")),
    "minerva": ("minerva", ("math-ai/minervamath", None, "test")),
    "olympiadbench": ("olympiad_bench", ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")),
}


def _benchmark_local(root: Path, name: str) -> list[Problem]:
    path = _require(root / "eval_suite" / "r1zero_suite" / _BENCHMARK_SOURCES[name][0], root)
    return _convert(_read_saved_dataset(path), partial(benchmark_problem, name=name))


def _benchmark_hub(name: str) -> list[Problem]:
    return _convert(_hub_rows(*_BENCHMARK_SOURCES[name][1]), partial(benchmark_problem, name=name))


# ----------------------------------------------------------------------------------------------------------
# The registry and the entry point
# ----------------------------------------------------------------------------------------------------------


def _convert(rows: Rows, make: Callable[..., Problem]) -> list[Problem]:
    """Apply a row converter `make(row, where, index)` to every row."""
    return [make(row, where, index) for index, (where, row) in enumerate(rows)]


@dataclass(frozen=True)
class _Loader:
    local: Callable[[Path], list[Problem]]  # from a directory laid out as LAYOUT
    hub: Callable[[], list[Problem]]  # from the Hugging Face hub


def _gsm8k(split: str) -> _Loader:
    make = partial(gsm8k_problem, split=split)
    return _Loader(
        local=lambda root: _convert(_read_jsonl(_require(root / "gsm8k" / f"{split}.jsonl", root)), make),
        hub=lambda: _convert(_hub_rows("openai/gsm8k", "main", split), make),
    )


def _svamp(split: str) -> _Loader:
    return _Loader(
        local=lambda root: _svamp_local(root, split),
        hub=lambda: [svamp_problem(row, where) for where, row in _hub_rows("ChilleD/SVAMP", None, split)],
    )


def _math12k(split: str) -> _Loader:
    return _Loader(local=lambda root: _math12k_local(root, split), hub=lambda: _math12k_hub(split))


def _benchmark(name: str) -> _Loader:
    return _Loader(local=lambda root: _benchmark_local(root, name), hub=lambda: _benchmark_hub(name))


def _generated(split: str) -> _Loader:
    return _Loader(local=lambda root: arithmetic_split(split), hub=lambda: arithmetic_split(split))


REGISTRY: dict[tuple[str, str], _Loader] = {
    ("gsm8k", "train"): _gsm8k("train"),
    ("gsm8k", "test"): _gsm8k("test"),
    ("svamp", "train"): _svamp("train"),
    ("svamp", "test"): _svamp("test"),
    ("math12k", "train"): _math12k("train"),
    ("math12k", "test"): _math12k("test"),  # the MATH500 problems, with their MATH solutions (held out)
    ("arithmetic", "train"): _generated("train"),
    ("arithmetic", "test"): _generated("test"),
    **{(name, "test"): _benchmark(name) for name in _BENCHMARK_SOURCES},
}


def load_problems(
    name: str, split: str = "train", data_dir: str | Path | None = None, limit: int | None = None
) -> list[Problem]:
    """The problems of data set `name` (see TRAINING_SETS, BENCHMARKS; benchmarks use split "test").

    Reads `data_dir`, else `$NESTED_REFT_DATA`, else the Hugging Face hub (table in the module docstring).
    `limit` keeps the first `limit` problems in the set's fixed order. A local file that holds no problem
    is a DataError naming it, whatever the limit: a run on an empty set would fail much later.
    """
    loader = REGISTRY.get((name, split))
    if loader is None:
        names = sorted({n for n, _ in REGISTRY})
        if name not in names:
            raise DataError(f"unknown data set {name!r}; expected one of {names}")
        splits = sorted(s for n, s in REGISTRY if n == name)
        raise DataError(f"data set {name!r} has no split {split!r}; expected one of {splits}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    root = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if root is None:
        problems = loader.hub()
    else:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist; expected layout: {LAYOUT_PATHS}")
        problems = loader.local(root)
    return problems if limit is None else problems[:limit]
