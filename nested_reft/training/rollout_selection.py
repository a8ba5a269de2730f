"""Which prompts get rollouts and which groups train (issue 32): rollouts where they teach.

A group whose G rewards are all equal has zero advantages under GRPO's group normalisation: its rollouts cost what
any others cost and move nothing. Two answers, both off by default (then a step is exactly the paper's: the next
batch_size prompts of the data order, `data_order.batch_for_step`, every group trained):
  - dynamic sampling (DAPO, Yu et al. 2025; verl's `algorithm.filter_groups`), `grpo.filter_groups`: a step samples
    generation rounds of `grpo.generation_batch_size` prompts, drops the groups whose `grpo.filter_metric` does not
    vary (`FILTER_METRICS`, `informative_groups`) and goes on until the batch holds batch_size informative groups
    or `grpo.filter_max_rounds` rounds have run; it then trains on the first batch_size of them, or on what it has
    (none: no gradient step). Informative groups past batch_size are dropped too, as verl does;
  - selective rollouts (GRESO-style), `sampling.skip_predictable`: before sampling, a prompt whose recent groups
    all had zero variance may be skipped (`prompt_history` states the rule); the next prompt of the order takes
    its place.
Either way a step reads the data order from a cursor (the prompts read so far, skipped ones included), so the
order is the seeded per-epoch shuffle as before, only read at another pace; the cursor and the prompts' history
are run state, kept in checkpoints (`state_dict`), and a resumed run selects what the uninterrupted one did.

The groups are rated on the behavior model's completions and rewards, those the update trains on: with a nested
or bridged behavior model, the filter reads what the nested model sampled. Several processes: a round's prompts
are split over the ranks as a batch is; every rank gathers the round's rewards, so every rank takes the same
decisions (history, skips, which groups are informative, when to stop); each rank fills its own share of the
batch from its own share of each round, the rounds go on until every rank's share is full, and a step that
reaches the limit trains every rank on as many groups as the rank with fewest holds (DDP's steps stay in lockstep).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from nested_reft.config import TrainConfig
from nested_reft.engines.rollout import Rollouts
from nested_reft.store.seeding import step_generator
from nested_reft.tasks.problems import Problem
from nested_reft.training.data_order import batch_for_step, order_indices, rank_share
from nested_reft.training.prompt_history import PromptHistory

# grpo.filter_metric -> the per-completion values (groups, G) whose spread within a group makes it informative
FILTER_METRICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "reward": lambda rewards: rewards,  # verl's "score"/"seq_reward": the reward itself
    "correct": lambda rewards: (rewards >= 1.0).float(),  # verl's "acc": whether the completion is right
}

Generate = Callable[[list[Problem], int], Rollouts]  # (this rank's prompts, round) -> their G completions each
Score = Callable[[list[Problem], Rollouts], torch.Tensor]  # -> (rows,) float32 rewards


def informative_groups(rewards: torch.Tensor, num_generations: int, metric: str = "reward") -> list[bool]:
    """Per group of `rewards` (N * G,), prompt-major: whether the metric's values differ within the group
    (max > min: a nonzero variance)."""
    values = FILTER_METRICS[metric](rewards.float().view(-1, num_generations))
    return (values.amax(dim=1) > values.amin(dim=1)).tolist()


@dataclass(frozen=True)
class SelectionCounts:
    """What a step's selection did (over all ranks) and what its sampling cost (this rank's rows, every round)."""

    groups_sampled: int
    groups_kept: int
    generation_rounds: int
    round_limit_hit: bool
    prompts_skipped: int
    prompts_returned: int
    skip_exploration: float | None  # e the step's skips used (sampling.skip_predictable), else None
    sampled_rewards: torch.Tensor  # every rank's rewards of every round, dropped groups included
    prompt_lengths: torch.Tensor  # (rows,) this rank's sampled rows, every round
    completion_lengths: torch.Tensor
    generation_time_s: float  # this rank's, every round


@dataclass(frozen=True)
class StepBatch:
    """This rank's share of the step's training batch: its groups' rollouts and rewards, the seconds spent scoring,
    and what the selection did (None: no selection, the paper's batch)."""

    rollouts: Rollouts
    rewards: torch.Tensor
    scoring_time_s: float
    selection: SelectionCounts | None = None

    @property
    def trains(self) -> bool:
        """Whether there is a group to train on (a selecting step at its round limit may have none)."""
        return self.rewards.numel() > 0


class RolloutSelection:
    """The run's rollout selection: the data-order cursor and, with skip_predictable, the prompts' history."""

    def __init__(self, config: TrainConfig, pad_token_id: int = 0):
        self.config, self.pad_token_id = config, pad_token_id
        self.filters = config.grpo.filter_groups
        self.history = PromptHistory.from_config(config.sampling) if config.sampling.skip_predictable else None
        self.cursor = 0  # positions of the data order read so far (selecting runs only)

    @property
    def active(self) -> bool:
        return self.filters or self.history is not None

    def batch(self, problems: Sequence[Problem], step: int, accelerator, generate: Generate, score: Score
              ) -> StepBatch:
        """Step `step`'s batch on this rank: the paper's, or the selected one (module docstring)."""
        if not self.active:
            mine = batch_for_step(problems, self.config, step, accelerator)
            rollouts = generate(mine, 0)
            start = time.perf_counter()
            rewards = score(mine, rollouts)
            return StepBatch(rollouts, rewards, time.perf_counter() - start)
        return _Step(self, problems, step, accelerator).run(generate, score)

    def state_dict(self) -> dict:
        """JSON-ready (trainer_state.json)."""
        return {"cursor": self.cursor, "history": self.history.state_dict() if self.history else None}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        if self.history is not None:
            self.history.load_state_dict(state["history"])


class _Step:
    """One selecting step: its rounds and the counts they leave."""

    def __init__(self, selection: RolloutSelection, problems: Sequence[Problem], step: int, accelerator):
        self.selection, self.problems, self.accelerator = selection, problems, accelerator
        config = selection.config
        self.G, self.world = config.grpo.num_generations, accelerator.num_processes
        self.size = (config.grpo.generation_batch_size or config.batch_size) if selection.filters else config.batch_size
        self.quota = config.batch_size // self.world  # groups per rank
        self.limit = config.grpo.filter_max_rounds if selection.filters else 1
        self.generator = step_generator(config.seed, step, "skip-prompts")
        self.exploration = selection.history.exploration if selection.history else None
        self.kept = [0] * self.world  # informative groups each rank holds
        self.parts: list[tuple[Rollouts, torch.Tensor]] = []  # this rank's, per round
        self.sampled, self.costs, self.read, self.skipped, self.predictable, self.returned = [], [], 0, 0, 0, 0
        self.scoring_s = 0.0

    def run(self, generate: Generate, score: Score) -> StepBatch:
        rounds = 0
        while True:
            self._round(rounds, generate, score)
            rounds += 1
            if min(self.kept) >= self.quota or rounds == self.limit:
                break
            if not self.limit and self.read >= len(self.problems):  # no limit but the data: every problem had a turn
                break
        history, config = self.selection.history, self.selection.config
        if history is not None:
            history.adapt(self.skipped, self.read, self.predictable, config.sampling)
        groups = min(self.kept)  # each rank trains on as many: at most its quota
        rollouts, rewards = _concatenated(self.parts, self.G, groups, self.selection.pad_token_id)
        seconds = sum(r.generation_time_s for r in self.costs)
        rollouts = replace(rollouts, generation_time_s=seconds)  # every round's, as the engine timed them
        counts = SelectionCounts(
            groups_sampled=rounds * self.size, groups_kept=groups * self.world, generation_rounds=rounds,
            round_limit_hit=groups < self.quota, prompts_skipped=self.skipped, prompts_returned=self.returned,
            skip_exploration=self.exploration, sampled_rewards=torch.cat(self.sampled),
            prompt_lengths=torch.cat([r.prompt_mask.sum(-1) for r in self.costs]),
            completion_lengths=torch.cat([r.completion_mask.sum(-1) for r in self.costs]),
            generation_time_s=seconds,
        )
        return StepBatch(rollouts, rewards, self.scoring_s, counts)

    def _round(self, index: int, generate: Generate, score: Score) -> None:
        """Choose the round's prompts, sample and score this rank's share, and take what is informative."""
        selection, accelerator = self.selection, self.accelerator
        chosen = [self.problems[i] for i in order_indices(len(self.problems), selection.config.seed, self._positions())]
        mine = rank_share(chosen, accelerator)
        rollouts = generate(mine, index)
        start = time.perf_counter()
        rewards = score(mine, rollouts)
        self.scoring_s += time.perf_counter() - start
        everyone = accelerator.gather(rewards.to(accelerator.device)).cpu()  # rank-major = the order of `chosen`
        self.sampled.append(everyone)
        self.costs.append(rollouts)
        if selection.history is not None:
            flat = [not varies for varies in informative_groups(everyone, self.G)]
            self.returned += selection.history.observe([problem.id for problem in chosen], flat)
        informative = (informative_groups(everyone, self.G, selection.config.grpo.filter_metric) if selection.filters
                       else [True] * len(chosen))
        share = len(chosen) // self.world
        for rank in range(self.world):
            groups = [g - rank * share for g in range(rank * share, (rank + 1) * share) if informative[g]]
            groups = groups[: self.quota - self.kept[rank]]
            if rank == accelerator.process_index:
                self.parts.append((_groups(rollouts, groups, self.G), _group_rows(rewards, groups, self.G)))
            self.kept[rank] += len(groups)

    def _positions(self) -> list[int]:
        """The data-order positions of the round's `size` prompts, from the cursor: skipped ones passed over."""
        selection = self.selection
        if selection.history is None:
            positions = list(range(selection.cursor, selection.cursor + self.size))
            read = self.size
        else:
            positions, read, predictable = selection.history.choose(
                self._walk(selection.cursor), self.size, self.generator, selection.config.sampling.skip_floor)
            self.skipped += read - self.size
            self.predictable += predictable
        selection.cursor += read
        self.read += read
        return positions

    def _walk(self, start: int) -> Iterator[tuple[int, str]]:
        """(position, problem id) of the data order from `start` on."""
        position = start
        while True:
            index = order_indices(len(self.problems), self.selection.config.seed, [position])[0]
            yield position, self.problems[index].id
            position += 1


def _group_rows(values: torch.Tensor, groups: list[int], G: int) -> torch.Tensor:
    """The rows of `groups` (indices of groups of G rows) in `values`; `values` itself when that is all of them."""
    if groups == list(range(values.shape[0] // G)):
        return values
    rows = [group * G + member for group in groups for member in range(G)]
    return values[torch.tensor(rows, dtype=torch.long)]


def _groups(rollouts: Rollouts, groups: list[int], G: int) -> Rollouts:
    """The rollouts of `groups` alone (the record itself when that is all of them)."""
    take = lambda tensor: _group_rows(tensor, groups, G)  # noqa: E731
    return replace(rollouts, prompt_ids=take(rollouts.prompt_ids), prompt_mask=take(rollouts.prompt_mask),
                   completion_ids=take(rollouts.completion_ids), completion_mask=take(rollouts.completion_mask),
                   behavior_logprobs=take(rollouts.behavior_logprobs), finished=take(rollouts.finished))


def _concatenated(parts: list[tuple[Rollouts, torch.Tensor]], G: int, groups: int, pad_token_id: int
                  ) -> tuple[Rollouts, torch.Tensor]:
    """The first `groups` groups of the rounds' parts as one batch (prompts left-padded, completions right-padded
    with `pad_token_id` to the longest, masks and log-probs with 0); a single part's tensors are used as they are.
    The engine's log-prob mismatch (mean, max) is the largest of the parts'."""
    parts = [part for part in parts if part[1].numel()] or parts[:1]
    rollouts, rewards = ([part[0] for part in parts], torch.cat([part[1] for part in parts])[: groups * G])
    if len(rollouts) == 1:
        one = rollouts[0]
        return (_groups(one, list(range(groups)), G), rewards)
    rows = groups * G
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    completion_width = max(r.completion_ids.shape[1] for r in rollouts)
    left = lambda t, width, value=0: torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)  # noqa: E731
    right = lambda t, width, value=0: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    joined = rollouts[0]
    mismatches = [r.logprob_mismatch for r in rollouts if r.logprob_mismatch is not None]
    merged = replace(
        joined,
        prompt_ids=torch.cat([left(r.prompt_ids, prompt_width, pad_token_id) for r in rollouts])[:rows],
        prompt_mask=torch.cat([left(r.prompt_mask, prompt_width) for r in rollouts])[:rows],
        completion_ids=torch.cat([right(r.completion_ids, completion_width, pad_token_id) for r in rollouts])[:rows],
        completion_mask=torch.cat([right(r.completion_mask, completion_width) for r in rollouts])[:rows],
        behavior_logprobs=torch.cat([right(r.behavior_logprobs, completion_width) for r in rollouts])[:rows],
        finished=torch.cat([r.finished for r in rollouts])[:rows],
        logprob_mismatch=(max(m[0] for m in mismatches), max(m[1] for m in mismatches)) if mismatches else None,
    )
    return merged, rewards
