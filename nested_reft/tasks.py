"""A task: problems, how to prompt for them, and how to score a completion, in one object.

Training reward and evaluation metric are the same `Task.score`, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nested_reft.data import Problem, load_problems
from nested_reft.prompts import build_prompt
from nested_reft.rewards import math_reward

RewardFunction = Callable[[str, str], float]  # (completion, gold answer) -> reward


@dataclass
class Task:
    """Problems of one dataset split with their prompt template and reward (the math reward by default)."""

    name: str
    problems: list[Problem]
    reward: RewardFunction = field(default=math_reward)

    @classmethod
    def load(cls, name: str, split: str = "train", data_dir: str | None = None, limit: int | None = None) -> "Task":
        return cls(name=name, problems=load_problems(name, split=split, data_dir=data_dir, limit=limit))

    def prompts(self, tokenizer, problems: Sequence[Problem]) -> list[str]:
        return [build_prompt(tokenizer, problem.question) for problem in problems]

    def score(self, completions: Sequence[str], golds: Sequence[str]) -> list[float]:
        """Rewards of `completions` against their gold answers."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        return [self.reward(completion, gold) for completion, gold in zip(completions, golds)]
