"""The data order: which problems each step's batch holds, on each rank.

One seeded shuffle per epoch, read in order, so the batch of step s is a function of (seed, s) alone and a
resumed run reads what the uninterrupted one read. Decisions about which prompts get rollouts read this order from
a cursor instead (`rollout_selection`, past the paper).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch

from nested_reft.config import TrainConfig
from nested_reft.store.seeding import step_generator
from nested_reft.tasks.problems import Problem


def batch_for_step(problems: Sequence[Problem], config: TrainConfig, step: int, accelerator) -> list[Problem]:
    """This rank's share of the step's prompts: a seeded shuffle per epoch, read in order (resumable by step).

    A fraction of an epoch uses a proportional subset of the shuffled set, as in the paper (appendix F).
    """
    size = config.batch_size  # size % world == 0: `check_fits_model`
    indices = order_indices(len(problems), config.seed, range((step - 1) * size, step * size))
    return [problems[i] for i in rank_share(indices, accelerator)]


def order_indices(length: int, seed: int, positions: Iterable[int]) -> list[int]:
    """The problems at `positions` of the run's order: epoch 0's shuffle of the `length` problems, then epoch 1's, and
    so on (position p is offset p mod length of epoch p // length). A step without rollout selection reads positions
    (s - 1) B .. s B - 1; one with it reads on from a cursor (`rollout_selection`)."""
    return [data_order(length, seed, epoch)[offset] for epoch, offset in (divmod(p, length) for p in positions)]


def rank_share(items: Sequence, accelerator) -> list:
    """This rank's slice of a batch the ranks split evenly (rank-major: rank r holds the r-th of W equal slices)."""
    share = len(items) // accelerator.num_processes
    return list(items[accelerator.process_index * share : (accelerator.process_index + 1) * share])


@functools.lru_cache(maxsize=4)
def data_order(length: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Epoch `epoch`'s shuffle of `length` problems, drawn from (seed, epoch) alone, so a resumed process draws
    the uninterrupted run's; kept for the steps that read the epoch (a step reads one or two, rarely more)."""
    return tuple(torch.randperm(length, generator=step_generator(seed, epoch, "data")).tolist())


def calibration_problems(problems: Sequence[Problem], config: TrainConfig, accelerator) -> list[Problem]:
    """This rank's share of the bridges' calibration problems: the first `nesting.bridge_calibration` of epoch 0's
    order (problems the run trains on), split over the ranks as the batches are (their sums are added up)."""
    order = data_order(len(problems), config.seed, 0)[: config.nesting.bridge_calibration]
    return [problems[i] for i in order[accelerator.process_index :: accelerator.num_processes]]
