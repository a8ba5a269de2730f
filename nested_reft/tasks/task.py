"""A task: problems, how to prompt for them, and how to score a completion, in one object.

Training reward and evaluation metric are the same `Task.score`, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nested_reft.tasks.data import DataError, Problem, load_problems
from nested_reft.tasks.prompts import build_prompt
from nested_reft.tasks.rewards import math_reward

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

    def check_fits(self, tokenizer, positions: int | None, max_new_tokens: int, option: str,
                   limit: str | None = None) -> None:
        """The rule for problems longer than the model: refused at start-up, naming the longest, never truncated
        (a cut question is another problem): its prompt plus `max_new_tokens` (the option `option`) must fit
        `positions` (`models.position_table_size`, or what the engine takes; None: no limit), which `limit` names
        (default: the model's positions)."""
        if positions is None or not self.problems:
            return
        prompts = self.prompts(tokenizer, self.problems)
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] + max_new_tokens > positions:
            raise DataError(
                f"problem {self.problems[longest].id}: its prompt ({lengths[longest]} tokens) plus {option} "
                f"({max_new_tokens}) runs past {limit or f'the model{chr(39)}s {positions} positions'}; problems are "
                f"not truncated: lower {option}, or leave the problem out"
            )

    def score(self, completions: Sequence[str], golds: Sequence[str]) -> list[float]:
        """Rewards of `completions` against their gold answers."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        return [self.reward(completion, gold) for completion, gold in zip(completions, golds)]
