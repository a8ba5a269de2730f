"""Data loaders: the generated arithmetic set, each original format on tiny files, errors, the hub path, and
(with the shared datasets) every real set's size and its answers as the reward sees them."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from nested_reft.tasks import data
from nested_reft.tasks.arithmetic import ARITHMETIC_SIZES
from nested_reft.tasks.data import (
    BENCHMARKS,
    DATA_ENV,
    LAYOUT_PATHS,
    TRAINING_SETS,
    DataError,
    Problem,
    clean_answer,
    format_number,
    load_problems,
    svamp_split,
)


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """Tests choose their data directory explicitly; a developer's $NESTED_REFT_DATA must not leak in."""
    monkeypatch.delenv(DATA_ENV, raising=False)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------------------


def test_problem_is_frozen():
    problem = Problem("x/0", "What is 1 + 1?", "2", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.answer = "3"


def test_names_are_fixed():
    assert TRAINING_SETS == ("svamp", "gsm8k", "math12k", "arithmetic")
    assert set(BENCHMARKS) == {"aime24", "amc", "math500", "minerva", "olympiadbench", "gsm8k", "svamp"}
    for name in TRAINING_SETS:
        assert (name, "train") in data.REGISTRY
    for name in BENCHMARKS:
        assert (name, "test") in data.REGISTRY


# ----------------------------------------------------------------------------------------------------------
# The generated arithmetic set (the generator itself: tests/test_arithmetic.py)
# ----------------------------------------------------------------------------------------------------------


def test_arithmetic_train_and_test_are_disjoint(tmp_path):
    train = load_problems("arithmetic", "train", data_dir=tmp_path)  # generated: no files needed
    test = load_problems("arithmetic", "test")
    assert (len(train), len(test)) == (ARITHMETIC_SIZES["train"], ARITHMETIC_SIZES["test"])
    assert not {p.question for p in train} & {p.question for p in test}
    assert not {p.id for p in train} & {p.id for p in test}
    assert len({p.question for p in train}) == len(train)
    assert load_problems("arithmetic", "test") == test


def test_limit_keeps_the_first_problems():
    assert load_problems("arithmetic", "test", limit=5) == load_problems("arithmetic", "test")[:5]
    with pytest.raises(DataError, match="limit"):
        load_problems("arithmetic", "test", limit=-1)


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [(21.0, "21"), (-4.0, "-4"), (2.5, "2.5"), (0.1, "0.1"), (7, "7"),
     (Fraction(1, 3), "1/3"), (Fraction(5, 4), "1.25")],
)
def test_format_number(value, text):
    assert format_number(value) == text


@pytest.mark.parametrize(
    "raw, answer",
    [
        (21.0, "21"),
        ("204", "204"),
        ("$\\frac{1}{2 n+2}$", "\\frac{1}{2 n+2}"),
        (["$69$,$84$"], "69, 84"),
        (["$f(n)=n$, $g(n)=1$"], "f(n)=n, g(n)=1"),
        (["$(-\\infty, 0) \\cup\\{1\\}$."], "(-\\infty, 0) \\cup\\{1\\}"),
        (["4.4e7\n", "4.4 \\times 10^7\n"], "4.4e7"),  # alternatives of one answer: the first is kept
        (["9.6\n"], "9.6"),
        ("\\$ 5", "\\$ 5"),  # an escaped dollar sign is text, not a math delimiter
        ("4.25", "4.25"),
    ],
)
def test_clean_answer(raw, answer):
    assert clean_answer(raw) == answer


# ----------------------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------------------

GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {"question": "How many grams are in 1.08 kg?", "answer": "1.08 * 1000 = <<1.08*1000=1080>>1080 g\n#### 1,080"},
]


def test_gsm8k_parsing(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS)
    first, second = load_problems("gsm8k", "train", data_dir=tmp_path)
    assert first.id == "gsm8k/train/0" and first.question == GSM8K_ROWS[0]["question"]
    assert first.answer == "72"
    assert first.solution == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The final answer is \\boxed{72}"
    )
    assert second.answer == "1080"  # thousands separator stripped
    assert second.solution.endswith("\\boxed{1080}") and "<<" not in second.solution and "####" not in second.solution


def test_gsm8k_from_environment_variable(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_ROWS[:1])
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert [p.answer for p in load_problems("gsm8k", "test")] == ["72"]


def test_gsm8k_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [GSM8K_ROWS[0], {"question": "No answer here?"}])
    with pytest.raises(DataError) as error:
        load_problems("gsm8k", "train", data_dir=tmp_path)
    assert str(path) in str(error.value) and "line 2" in str(error.value) and "'answer'" in str(error.value)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_training_file_is_an_error_naming_it(tmp_path, text):
    path = tmp_path / "gsm8k" / "train.jsonl"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))} holds 0 problems"):
        load_problems("gsm8k", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="0 problems"):
        load_problems("gsm8k", "train", data_dir=tmp_path, limit=0)  # the set is empty, not just the selection


def test_limit_zero_selects_no_problem_of_a_set_that_has_some(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS)
    assert load_problems("gsm8k", "train", data_dir=tmp_path, limit=0) == []


def test_an_empty_svamp_file_is_an_error_naming_it(tmp_path):
    svamp = write_json(tmp_path / "svamp" / "SVAMP.json", [])
    with pytest.raises(DataError, match=f"^{re.escape(str(svamp))} holds 0 problems"):
        load_problems("svamp", "train", data_dir=tmp_path)


def test_gsm8k_answer_without_final_line(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": "Q?", "answer": "It is 4."}])
    with pytest.raises(DataError, match=r"line 1: field 'answer' must end in '#### N'"):
        load_problems("gsm8k", "train", data_dir=tmp_path)


def test_gsm8k_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"line 3: invalid JSON"):
        load_problems("gsm8k", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------
# SVAMP
# ----------------------------------------------------------------------------------------------------------


def svamp_rows(n: int = 10) -> list[dict]:
    rows = [
        {"ID": "chal-1",
         "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack",
         "Question": "How much do you have to pay to buy each pack?", "Equation": "( 76.0 - 25.0 )",
         "Answer": 51.0, "Type": "Subtraction"},
        {"ID": "chal-2", "Body": "Rachel's tree had 4 apples. She picked 2 apples. Then 3 new apples grew.",
         "Question": "How many apples are there on the tree now?", "Equation": "( ( 4.0 - 2.0 ) + 3.0 )",
         "Answer": 1.0, "Type": "Addition"},
        {"ID": "chal-3", "Body": "10 cakes are shared by 4 friends.", "Question": "How much does each get?",
         "Equation": "( 10.0 / 4.0 )", "Answer": 2.5, "Type": "Common-Division"},
        {"ID": "chal-4", "Body": "He would use 8 large planks.", "Question": "How many planks does he need?",
         "Equation": "8.0", "Answer": 8.0, "Type": "Common-Division"},
    ]  # fmt: skip
    for i in range(len(rows), n):
        rows.append({"ID": f"chal-{i + 1}", "Body": f"Sam has {i} pens and buys {i + 1} more.",
                     "Question": "How many pens does he have?", "Equation": f"( {i}.0 + {i + 1}.0 )",
                     "Answer": float(2 * i + 1), "Type": "Addition"})  # fmt: skip
    return rows


def test_svamp_parsing_and_chain_of_thought(tmp_path):
    write_json(tmp_path / "svamp" / "SVAMP.json", svamp_rows())
    problems = {p.id: p for split in ("train", "test") for p in load_problems("svamp", split, data_dir=tmp_path)}
    assert len(problems) == 10
    dvd = problems["svamp/chal-1"]
    assert dvd.question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert dvd.answer == "51" and dvd.solution == "We compute 76 - 25 = 51.\nThe final answer is \\boxed{51}"
    apples = problems["svamp/chal-2"]  # Answer 1.0 contradicts the equation; the equation's value wins
    assert apples.answer == "5"
    assert apples.solution == "First, 4 - 2 = 2.\nThen, 2 + 3 = 5.\nThe final answer is \\boxed{5}"
    assert problems["svamp/chal-3"].answer == "2.5" and "10 / 4 = 2.5" in problems["svamp/chal-3"].solution
    assert problems["svamp/chal-4"].answer == "8" and problems["svamp/chal-4"].solution.endswith("\\boxed{8}")


def test_svamp_split_is_disjoint_fixed_and_order_free(tmp_path):
    rows = svamp_rows(20)
    write_json(tmp_path / "a" / "svamp" / "SVAMP.json", rows)
    write_json(tmp_path / "b" / "svamp" / "SVAMP.json", list(reversed(rows)))
    splits = {}
    for root in ("a", "b"):
        for split in ("train", "test"):
            splits[root, split] = {p.id for p in load_problems("svamp", split, data_dir=tmp_path / root)}
    assert splits["a", "train"] == splits["b", "train"] and splits["a", "test"] == splits["b", "test"]
    assert (len(splits["a", "train"]), len(splits["a", "test"])) == (14, 6)
    assert not splits["a", "train"] & splits["a", "test"]
    assert splits["a", "train"] | splits["a", "test"] == {f"svamp/{row['ID']}" for row in rows}


def test_svamp_split_sizes_on_a_thousand_ids():
    split = svamp_split(f"chal-{i}" for i in range(1, 1001))
    assert (len(split["train"]), len(split["test"])) == (700, 300)


def test_svamp_missing_field_names_file_index_and_field(tmp_path):
    rows = svamp_rows()
    del rows[4]["Equation"]
    path = write_json(tmp_path / "svamp" / "SVAMP.json", rows)
    with pytest.raises(DataError) as error:
        for split in ("train", "test"):
            load_problems("svamp", split, data_dir=tmp_path)
    assert str(path) in str(error.value) and "index 4" in str(error.value) and "'Equation'" in str(error.value)


def test_svamp_bad_equation(tmp_path):
    rows = svamp_rows(1)
    rows[0]["Equation"] = "( 3.0 ** 2.0 )"
    write_json(tmp_path / "svamp" / "SVAMP.json", rows)
    with pytest.raises(DataError, match=r"index 0: field 'Equation'"):
        load_problems("svamp", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------
# MATH12k
# ----------------------------------------------------------------------------------------------------------


def write_math(root: Path, rows: list[dict], split: str = "train") -> Path:
    """A parquet of (problem, answer) rows and Hendrycks MATH files holding their solutions."""
    files = {
        "train/algebra/1.json": ("What is $1+1$?\n", "We add: $1+1=\\boxed{2}$."),
        "test/prealgebra/5.json": ("Compute $3\\cdot 4$.", "$3\\cdot 4 = \\boxed {12}$"),
        "train/algebra/25040.json": (
            "If $(x + y)^2 = 1$ and $xy = -4$, what is the value of $x^2 + y^2$?",
            "So $x^2 + y^2 = \\boxed 9$.",
        ),
    }
    for name, (problem, solution) in files.items():
        write_json(root / "math" / "MATH" / name, {"problem": problem, "level": "Level 1", "solution": solution})
    path = root / "math" / "math12k" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


MATH_ROWS = [
    {"problem": "What is $1+1$?", "answer": "2"},
    {"problem": "Compute $3\\cdot 4$.", "answer": "12"},
    {"problem": "If $(x + y)^2 = 1$ and $xy = -4$, what is the value of $x^2 + y^2$?", "answer": "None"},
]


def test_math12k_join(tmp_path):
    write_math(tmp_path, MATH_ROWS)
    one, two, three = load_problems("math12k", "train", data_dir=tmp_path)
    assert (one.id, one.question, one.answer) == ("math12k/train/0", "What is $1+1$?", "2")
    assert one.solution == "We add: $1+1=\\boxed{2}$."
    assert two.answer == "12" and two.solution == "$3\\cdot 4 = \\boxed{12}$"  # a MATH test file, braces tidied
    assert three.answer == "9" and three.solution.endswith("\\boxed{9}$.")  # upstream 'None', read from its box


def test_math12k_problem_without_solution(tmp_path):
    path = write_math(tmp_path, MATH_ROWS[:1] + [{"problem": "An unknown problem?", "answer": "1"}])
    with pytest.raises(DataError) as error:
        load_problems("math12k", "train", data_dir=tmp_path)
    assert str(path) in str(error.value) and "row 1" in str(error.value) and "'problem'" in str(error.value)


def test_math12k_missing_answer(tmp_path):
    path = write_math(tmp_path, [{"problem": "Compute $3\\cdot 4$.", "answer": ""}], split="test")
    with pytest.raises(DataError) as error:
        load_problems("math12k", "test", data_dir=tmp_path)
    assert str(path) in str(error.value) and "row 0" in str(error.value) and "'answer'" in str(error.value)


def test_math_file_without_solution(tmp_path):
    write_math(tmp_path, MATH_ROWS)
    broken = write_json(tmp_path / "math" / "MATH" / "train" / "geometry" / "3.json", {"problem": "Area?"})
    with pytest.raises(DataError) as error:
        load_problems("math12k", "train", data_dir=tmp_path)
    assert str(broken) in str(error.value) and "'solution'" in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# Benchmarks from a saved suite, missing files, unknown names
# ----------------------------------------------------------------------------------------------------------


def test_benchmarks_from_a_saved_suite(tmp_path):
    suite = tmp_path / "eval_suite" / "r1zero_suite"
    saved = {
        "amc": {"problem": ["A?", "B?"], "answer": [21.0, 2.5], "difficulty": [1.0, 2.0]},
        "minerva": {"problem": ["C?"], "answer": [["2\n", "2"]]},
        "olympiad_bench": {"problem": ["D?"], "answer": [["$69$,$84$"]]},
    }
    for directory, columns in saved.items():
        datasets.Dataset.from_dict(columns).save_to_disk(str(suite / directory))
    amc = load_problems("amc", "test", data_dir=tmp_path)
    assert [(p.id, p.question, p.answer, p.solution) for p in amc] == [
        ("amc/test/0", "A?", "21", None),
        ("amc/test/1", "B?", "2.5", None),
    ]
    assert [p.answer for p in load_problems("minerva", "test", data_dir=tmp_path)] == ["2"]
    assert [p.answer for p in load_problems("olympiadbench", "test", data_dir=tmp_path)] == ["69, 84"]


def test_missing_file_shows_the_expected_layout(tmp_path):
    with pytest.raises(DataError) as error:
        load_problems("gsm8k", "train", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in message and LAYOUT_PATHS in message
    with pytest.raises(DataError, match="r1zero_suite"):
        load_problems("aime24", "test", data_dir=tmp_path)


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems("svamp", "train", data_dir=tmp_path / "nowhere")


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as error:
        load_problems("gsm9k")
    assert isinstance(error.value, ValueError)
    assert all(name in str(error.value) for name in set(TRAINING_SETS) | set(BENCHMARKS))


def test_unknown_split_lists_valid_splits():
    with pytest.raises(DataError, match=r"'aime24' has no split 'train'; expected one of \['test'\]"):
        load_problems("aime24", "train")


# ----------------------------------------------------------------------------------------------------------
# The hub path, with datasets.load_dataset replaced by in-memory datasets
# ----------------------------------------------------------------------------------------------------------

HUB = {
    ("openai/gsm8k", "main", "train"): GSM8K_ROWS,
    ("ChilleD/SVAMP", None, "test"): [dict(row, question_concat="...") for row in svamp_rows()[:2]],
    ("hiyouga/math12k", None, "train"): MATH_ROWS[:2],
    ("EleutherAI/hendrycks_math", "algebra", "train"): [
        {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra", "solution": "$\\boxed{2}$"}
    ],
    ("EleutherAI/hendrycks_math", "prealgebra", "test"): [
        {"problem": "Compute $3\\cdot 4$.  ", "level": "Level 1", "type": "Prealgebra", "solution": "$\\boxed{12}$"}
    ],
    ("HuggingFaceH4/aime_2024", None, "train"): [{"id": 60, "problem": "Find $n$.", "answer": "204", "year": "2024"}],
    ("AI-MO/aimo-validation-amc", None, "train"): [{"id": 0, "problem": "Find $m+n$.", "answer": 142.0, "url": "u"}],
    ("HuggingFaceH4/MATH-500", None, "test"): [
        {"problem": "Convert $(0,3)$.", "solution": "...", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"}
    ],
    ("math-ai/minervamath", None, "test"): [{"question": "Estimate the wavelength.", "answer": "9.6"}],
    ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"): [
        {"id": 1606, "question": "Find all $N$.", "final_answer": ["$69$,$84$"], "is_multiple_answer": True}
    ],
}


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(HUB.get((path, name, split), []))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_gsm8k(fake_hub):
    problems = load_problems("gsm8k", "train")
    assert fake_hub == [("openai/gsm8k", "main", "train")]
    assert [p.answer for p in problems] == ["72", "1080"] and problems[0].solution.endswith("\\boxed{72}")


def test_hub_svamp_keeps_the_hub_split(fake_hub):
    problems = load_problems("svamp", "test")
    assert fake_hub == [("ChilleD/SVAMP", None, "test")]
    assert [(p.id, p.answer) for p in problems] == [("svamp/chal-1", "51"), ("svamp/chal-2", "5")]


def test_hub_math12k_joins_hendrycks_solutions(fake_hub):
    problems = load_problems("math12k", "train")
    assert ("hiyouga/math12k", None, "train") in fake_hub
    assert {(path, split) for path, _, split in fake_hub if path == "EleutherAI/hendrycks_math"} == {
        ("EleutherAI/hendrycks_math", "train"),
        ("EleutherAI/hendrycks_math", "test"),
    }
    assert {name for path, name, _ in fake_hub if path == "EleutherAI/hendrycks_math"} == set(data.MATH_SUBJECTS)
    assert [(p.answer, p.solution) for p in problems] == [("2", "$\\boxed{2}$"), ("12", "$\\boxed{12}$")]


@pytest.mark.parametrize(
    "name, hub_id, question, answer",
    [
        ("aime24", "HuggingFaceH4/aime_2024", "Find $n$.", "204"),
        ("amc", "AI-MO/aimo-validation-amc", "Find $m+n$.", "142"),
        ("math500", "HuggingFaceH4/MATH-500", "Convert $(0,3)$.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("minerva", "math-ai/minervamath", "Estimate the wavelength.", "9.6"),
        ("olympiadbench", "Hothan/OlympiadBench", "Find all $N$.", "69, 84"),
    ],
)
def test_hub_benchmarks(fake_hub, name, hub_id, question, answer):
    (problem,) = load_problems(name, "test")
    assert [call[0] for call in fake_hub] == [hub_id]
    assert problem == Problem(f"{name}/test/0", question, answer, None)


def test_hub_row_with_missing_field(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"problem": "Q?"}]))
    with pytest.raises(DataError, match=r"hub dataset AI-MO/aimo-validation-amc, split 'train', row 0: .*'answer'"):
        load_problems("amc", "test")


def test_hub_failure_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as error:
        load_problems("gsm8k", "test")
    assert "openai/gsm8k" in str(error.value) and "no network" in str(error.value) and DATA_ENV in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# The real datasets (shared/data)
# ----------------------------------------------------------------------------------------------------------

EXPECTED_SIZES = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("svamp", "train"): 700,
    ("svamp", "test"): 300,
    ("math12k", "train"): 12000,
    ("math12k", "test"): 500,
    ("aime24", "test"): 30,
    ("amc", "test"): 83,
    ("math500", "test"): 500,
    ("minerva", "test"): 272,
    ("olympiadbench", "test"): 675,
}
WITH_SOLUTIONS = [key for key in EXPECTED_SIZES if key[0] in ("gsm8k", "svamp", "math12k")]
SAMPLE = 25  # per set, for the reward checks that run on every commit; the integration tests check all


@pytest.fixture(scope="module")
def real(shared_data):
    """load(name, split) on the shared datasets, each set loaded once per module."""
    cache: dict[tuple[str, str], list[Problem]] = {}

    def load(name: str, split: str) -> list[Problem]:
        if (name, split) not in cache:
            cache[name, split] = load_problems(name, split, data_dir=shared_data)
        return cache[name, split]

    return load


@pytest.fixture(scope="module")
def math_reward():
    from nested_reft.tasks.rewards import math_reward

    return math_reward


def sample(problems: list[Problem]) -> list[Problem]:
    return random.Random(0).sample(problems, min(SAMPLE, len(problems)))


def test_every_real_set_is_checked():
    names = {name for name, _ in EXPECTED_SIZES} | {"arithmetic"}
    assert names == set(TRAINING_SETS) | set(BENCHMARKS)


@pytest.mark.parametrize("name, split", list(EXPECTED_SIZES))
def test_real_set_sizes_and_fields(real, name, split):
    problems = real(name, split)
    assert len(problems) == EXPECTED_SIZES[name, split]
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.question.strip() and p.answer.strip() for p in problems)


def test_real_svamp_split_is_disjoint(real, shared_data):
    train, test = real("svamp", "train"), real("svamp", "test")
    assert not {p.id for p in train} & {p.id for p in test}
    assert not {p.question for p in train} & {p.question for p in test}
    all_ids = {f"svamp/{row['ID']}" for row in json.loads((shared_data / "svamp" / "SVAMP.json").read_text())}
    assert {p.id for p in train} | {p.id for p in test} == all_ids


def test_real_math12k_has_a_solution_for_every_problem(real):
    problems = real("math12k", "train")
    assert all(p.solution and "\\boxed{" in p.solution for p in problems)


@pytest.mark.parametrize("name, split", [("gsm8k", "train"), ("gsm8k", "test"), ("svamp", "train"), ("svamp", "test")])
def test_real_written_solutions_end_in_the_boxed_answer(real, name, split):
    for problem in real(name, split):
        assert problem.solution.endswith(f"\\boxed{{{problem.answer}}}"), problem.id
        assert "<<" not in problem.solution and "####" not in problem.solution


@pytest.mark.parametrize("name, split", list(EXPECTED_SIZES))
def test_reward_accepts_the_boxed_answer_sample(real, math_reward, name, split):
    for problem in sample(real(name, split)):
        assert math_reward(f"\\boxed{{{problem.answer}}}", problem.answer) == 1.0, (problem.id, problem.answer)


@pytest.mark.parametrize("name, split", WITH_SOLUTIONS)
def test_reward_accepts_the_sft_solution_sample(real, math_reward, name, split):
    for problem in sample(real(name, split)):
        assert math_reward(problem.solution, problem.answer) == 1.0, (problem.id, problem.answer)


@pytest.mark.integration
@pytest.mark.parametrize("name, split", list(EXPECTED_SIZES))
def test_reward_accepts_every_boxed_answer(real, math_reward, name, split):
    rejected = [p.id for p in real(name, split) if math_reward(f"\\boxed{{{p.answer}}}", p.answer) != 1.0]
    assert not rejected


@pytest.mark.integration
@pytest.mark.parametrize("name, split", WITH_SOLUTIONS)
def test_reward_accepts_every_sft_solution(real, math_reward, name, split):
    rejected = [(p.id, p.answer) for p in real(name, split) if math_reward(p.solution, p.answer) != 1.0]
    assert not rejected
