"""The generated arithmetic word problems: deterministic, correct (recomputed from the text alone), graded by
difficulty."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from nested_reft.tasks.arithmetic import generate_arithmetic


def solve_story(question: str) -> int:
    """Recompute an arithmetic word problem from its text alone (independent of the generator's bookkeeping)."""
    sentences = re.split(r"(?<=[.?]) ", question)
    assert sentences[-1].startswith("How many ")
    total = int(re.match(r"\w+ has (\d+) ", sentences[0]).group(1))
    for sentence in sentences[1:-1]:
        (k,) = map(int, re.findall(r"\d+", sentence))
        if " more " in sentence:
            total += k
        elif sentence.endswith("to a friend.") or " loses " in sentence:
            total -= k
        elif "times as many" in sentence:
            total *= k
        elif "equal piles" in sentence:
            assert total % k == 0, sentence
            total //= k
        else:
            raise AssertionError(f"unknown sentence {sentence!r}")
    return total


def test_arithmetic_is_deterministic():
    assert generate_arithmetic(50, seed=3) == generate_arithmetic(50, seed=3)
    assert generate_arithmetic(50, seed=3, difficulty=2) == generate_arithmetic(50, seed=3, difficulty=2)
    assert generate_arithmetic(50, seed=3) != generate_arithmetic(50, seed=4)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arithmetic_answers_are_correct(difficulty):
    problems = generate_arithmetic(300, seed=7, difficulty=difficulty)
    assert len(problems) == 300
    assert len({p.question for p in problems}) == 300
    assert len({p.id for p in problems}) == 300
    for problem in problems:
        assert problem.answer == str(solve_story(problem.question))
        assert int(problem.answer) > 0
        assert problem.solution.endswith(f"\\boxed{{{problem.answer}}}")
        for line in problem.solution.splitlines():  # every written computation is right
            match = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", line)
            if match:
                a, op, b, c = match.groups()
                assert Fraction(eval(f"{a} {op} {b}")) == int(c), line


def test_arithmetic_difficulty_knob():
    def steps(problem):
        return sum(" = " in line for line in problem.solution.splitlines())

    def numbers(problem):
        return [int(x) for x in re.findall(r"\d+", problem.question)]

    easy = generate_arithmetic(200, seed=0, difficulty=1)
    assert all(steps(p) == 1 for p in easy)
    assert all(n < 10 for p in easy for n in numbers(p))  # one-digit numbers only
    assert not any(re.search(r" [*/] ", p.solution) for p in easy)  # only + and -
    for difficulty in (2, 3, 5):
        problems = generate_arithmetic(200, seed=0, difficulty=difficulty)
        assert all(steps(p) == difficulty for p in problems)
        assert any(" * " in p.solution for p in problems) and any(" / " in p.solution for p in problems)
    largest = [max(n for p in generate_arithmetic(300, difficulty=d) for n in numbers(p)) for d in (1, 2, 3)]
    assert largest == sorted(largest) and largest[0] < largest[-1]


def test_arithmetic_difficulty_one_reads_like_the_example():
    problem = generate_arithmetic(1, seed=0)[0]
    assert re.fullmatch(r"\w+ has \d \w+( \w+)?\. [^.]+\. How many [\w ]+ does \w+ have now\?", problem.question)


def test_arithmetic_rejects_bad_arguments():
    with pytest.raises(ValueError):
        generate_arithmetic(5, difficulty=0)
    with pytest.raises(ValueError):
        generate_arithmetic(-1)
