"""Selective rollouts (GRESO-style, issue 32; `sampling.skip_predictable`): each prompt's history of zero-variance
groups, and the rule that skips a prompt before sampling when its history predicts another group that teaches
nothing.

The rule, for one step (all numbers by hand):
  - history: z(p), the number of consecutive most recent groups of problem p (by id) whose G rewards were all equal
    (zero variance, so zero advantages); a group whose rewards vary sets z(p) = 0; a prompt never sampled has z = 0.
    Every group sampled counts, also one that `grpo.filter_groups` drops.
  - skip: walking the data order, a prompt with z(p) >= 1 is skipped with probability
        q(p) = 1 - max(floor, e ** z(p))
    (one uniform draw u per such prompt, from the step's own generator: skipped when u < q); a prompt with z = 0 is
    never skipped. The next prompt of the order takes a skipped one's place. floor = `sampling.skip_floor`, so a
    prompt is sampled with probability >= floor whenever the order reaches it: never skipped for ever.
  - adapt: after a step that met at least one prompt with z >= 1, with s = skipped / considered (considered = the
    prompts the step's walk read, skipped or sampled) and target = `sampling.skip_target`,
        e <- min(1, max(floor, e + adapt * sign(s - target)))
    (`sampling.skip_adapt`; sign(0) = 0): more exploration when too many were skipped, less when too few. A step
    that met no predictable prompt leaves e alone (it had nothing to act on, as in a first epoch). e starts at
    `sampling.skip_initial`.
  - came back: a prompt skipped, then sampled at a later reach of the order, counts once as returned.

Example (floor 0.05, e = 0.5): z = 1 -> q = 0.5; z = 2 -> 0.75; z = 5 -> 1 - max(0.05, 0.03125) = 0.95. A step that
skipped 3 of 4 prompts with target 0.5 and adapt 0.05 moves e to 0.55.

GRESO (arXiv 2506.02177) sets its exploration probability apart for all-correct and all-wrong prompts and adapts it
toward a target share of zero-variance groups among the rollouts; this rule keeps one e and targets the share of
prompts skipped, which a run's budget reads directly. The history is run state, checkpointed (`state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from nested_reft.config import SamplingConfig


@dataclass
class PromptHistory:
    """z(p) per problem id, the prompts skipped and not yet sampled again, and the exploration probability e."""

    exploration: float
    streaks: dict[str, int] = field(default_factory=dict)  # ids with z >= 1 only
    skipped: set[str] = field(default_factory=set)

    @classmethod
    def from_config(cls, sampling: SamplingConfig) -> PromptHistory:
        return cls(exploration=sampling.skip_initial)

    def skip_probability(self, problem_id: str, floor: float) -> float:
        """q(p) = 1 - max(floor, e ** z(p)) for z >= 1, else 0."""
        streak = self.streaks.get(problem_id, 0)
        return 0.0 if streak == 0 else 1.0 - max(floor, self.exploration**streak)

    def choose(self, candidates: Iterator[tuple[int, str]], count: int, generator: torch.Generator, floor: float
               ) -> tuple[list[int], int, int]:
        """Walk `candidates` ((position, problem id), in the data order) until `count` are chosen; returns the chosen
        positions, how many candidates were read and how many of those were predictable (z >= 1)."""
        chosen, read, predictable = [], 0, 0
        while len(chosen) < count:
            position, problem_id = next(candidates)
            read += 1
            probability = self.skip_probability(problem_id, floor)
            if probability > 0:
                predictable += 1
                if torch.rand(1, generator=generator, dtype=torch.float64).item() < probability:
                    self.skipped.add(problem_id)
                    continue
            chosen.append(position)
        return chosen, read, predictable

    def observe(self, problem_ids: Sequence[str], zero_variance: Sequence[bool]) -> int:
        """Fold in sampled groups (in order): z + 1 for a zero-variance group, 0 otherwise. Returns how many of them
        were skipped before (and are sampled again now: they came back)."""
        returned = 0
        for problem_id, flat in zip(problem_ids, zero_variance, strict=True):
            if problem_id in self.skipped:
                self.skipped.discard(problem_id)
                returned += 1
            if flat:
                self.streaks[problem_id] = self.streaks.get(problem_id, 0) + 1
            else:
                self.streaks.pop(problem_id, None)
        return returned

    def adapt(self, skipped: int, considered: int, predictable: int, sampling: SamplingConfig) -> None:
        """e after a step that read `considered` prompts, `predictable` of them with z >= 1, and skipped `skipped`."""
        if predictable == 0 or considered == 0:
            return
        share = skipped / considered
        direction = (share > sampling.skip_target) - (share < sampling.skip_target)
        self.exploration = min(1.0, max(sampling.skip_floor, self.exploration + sampling.skip_adapt * direction))

    def state_dict(self) -> dict:
        """JSON-ready (trainer_state.json)."""
        return {"exploration": self.exploration, "streaks": dict(self.streaks), "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.exploration = float(state["exploration"])
        self.streaks = {str(key): int(value) for key, value in state["streaks"].items()}
        self.skipped = set(state["skipped"])
