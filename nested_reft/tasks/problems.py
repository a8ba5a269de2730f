"""`Problem`: the one record every math data set becomes, loaded from files or the hub (`data`) or generated
(`arithmetic`), and what tasks, the SFT warm-up, the trainer and the evaluation read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One math problem. `answer` is the final value as a string; `solution`, where the set has one, is a
    chain of thought whose last `\\boxed{}` holds the answer (the SFT warm-up target)."""

    id: str
    question: str
    answer: str
    solution: str | None
