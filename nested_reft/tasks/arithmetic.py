"""Arithmetic word problems, generated: the demo's training and test sets, needing no files and no hub.

"Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?", with a chain of thought
that ends in `\\boxed{7}`. `generate_arithmetic` draws them at any difficulty; `arithmetic_split` is the
registered `arithmetic` data set (`nested_reft.tasks.data`): fixed train and test sets that share no question.
"""

from __future__ import annotations

import random

from nested_reft.tasks.problems import Problem

ARITHMETIC_SIZES = {"train": 5000, "test": 500}
ARITHMETIC_SEEDS = {"train": 0, "test": 1}

_PEOPLE = (("Tom", "he", "him"), ("Anna", "she", "her"), ("Ben", "he", "him"), ("Mia", "she", "her"),
           ("Sam", "he", "him"), ("Lily", "she", "her"), ("Max", "he", "him"), ("Emma", "she", "her"),
           ("Leo", "he", "him"), ("Zoe", "she", "her"), ("Jack", "he", "him"), ("Ella", "she", "her"))  # fmt: skip
# Singular nouns whose plural adds an "s".
_ITEMS = ("apple", "book", "marble", "sticker", "pencil", "cookie", "shell", "card", "balloon", "stamp", "coin",
          "toy car")  # fmt: skip

# operation -> (sentences of the story, one is drawn; the step of the chain of thought).
# {S}/{O}: he/him; {k_items}: the noun agreeing with k ("apple" or "apples"); {items}: "apples".
_STORY = {
    "add": (
        ("{S} buys {k} more {k_items}.", "{S} finds {k} more {k_items}.", "A friend gives {O} {k} more {k_items}."),
        "{S} gets {k} more: {a} + {k} = {r}.",
    ),
    "sub": (
        ("{S} gives {k} {k_items} to a friend.", "{S} loses {k} {k_items}."),
        "{S} has {k} fewer: {a} - {k} = {r}.",
    ),
    "mul": (("{S} now has {k} times as many {items} as before.",), "{k} times as many: {a} * {k} = {r}."),
    "div": (
        ("{S} splits the {items} into {k} equal piles and keeps one pile.",),
        "One of {k} equal piles: {a} / {k} = {r}.",
    ),
}


def _noun(count: int, item: str) -> str:
    return item if count == 1 else item + "s"


def _arithmetic_step(rng: random.Random, total: int, difficulty: int) -> tuple[str, int, int]:
    """Draw one operation and operand that keep the count a positive whole number."""
    largest = 10 * difficulty - 1  # difficulty 1: one-digit numbers
    choices = [("add", rng.randint(1, largest))]
    if total >= 2:
        choices.append(("sub", rng.randint(1, min(total - 1, largest))))
    if difficulty >= 2:
        choices.append(("mul", rng.randint(2, difficulty + 1)))
        divisors = [k for k in range(2, 10) if total % k == 0 and total > k]
        if divisors:
            choices.append(("div", rng.choice(divisors)))
    kind, k = rng.choice(choices)
    result = {"add": total + k, "sub": total - k, "mul": total * k, "div": total // k}[kind]
    return kind, k, result


def generate_arithmetic(n: int, seed: int = 0, difficulty: int = 1) -> list[Problem]:
    """`n` distinct arithmetic word problems with step-by-step solutions ending in `\\boxed{}`.

    `difficulty` d sets both knobs: d operations on a running count; start values and added or subtracted
    amounts up to 10*d - 1, multipliers up to d + 1, divisors up to 9. Difficulty 1 is
    one addition or subtraction of one-digit numbers ("Tom has 3 apples. He buys 4 more apples. How many apples
    does Tom have now?"); from 2 on, multiplication and exact division join in. All results are positive whole
    numbers. The same (n, seed, difficulty) always gives the same list (a string seed, hashed by sha512 inside
    `random`, does not depend on PYTHONHASHSEED).
    """
    if n < 0 or difficulty < 1:
        raise ValueError(f"need n >= 0 and difficulty >= 1, got n={n}, difficulty={difficulty}")
    rng = random.Random(f"arithmetic:{seed}:{difficulty}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(100 * n + 100):
        if len(problems) == n:
            return problems
        name, subject, obj = rng.choice(_PEOPLE)
        item = rng.choice(_ITEMS)
        total = rng.randint(1, 10 * difficulty - 1)
        story = [f"{name} has {total} {_noun(total, item)}."]
        steps = [f"{name} starts with {total} {_noun(total, item)}."]
        for _ in range(difficulty):
            kind, k, result = _arithmetic_step(rng, total, difficulty)
            sentences, step = _STORY[kind]
            words = dict(S=subject.capitalize(), O=obj, items=f"{item}s", k_items=_noun(k, item))
            words.update(k=k, a=total, r=result)
            story.append(rng.choice(sentences).format(**words))
            steps.append(step.format(**words))
            total = result
        question = " ".join(story) + f" How many {item}s does {name} have now?"
        if question in seen:
            continue
        seen.add(question)
        steps.append(f"The final answer is \\boxed{{{total}}}")
        problem_id = f"arithmetic/seed{seed}-d{difficulty}/{len(problems)}"
        problems.append(Problem(problem_id, question, str(total), "\n".join(steps)))
    if len(problems) < n:
        raise ValueError(f"could not draw {n} distinct problems at difficulty {difficulty} (got {len(problems)})")
    return problems


def arithmetic_split(split: str) -> list[Problem]:
    """Train and test come from different seeds; train drops any question that the test set has."""
    test = generate_arithmetic(ARITHMETIC_SIZES["test"], seed=ARITHMETIC_SEEDS["test"])
    if split == "test":
        return test
    held_out = {p.question for p in test}
    candidates = generate_arithmetic(ARITHMETIC_SIZES["train"] + len(test), seed=ARITHMETIC_SEEDS["train"])
    train = [p for p in candidates if p.question not in held_out][: ARITHMETIC_SIZES["train"]]
    assert len(train) == ARITHMETIC_SIZES["train"] and not held_out & {p.question for p in train}
    return train
