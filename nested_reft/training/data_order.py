"""The data order: which problems each step's batch holds, on each rank.

One seeded shuffle per epoch, read in order, so the batch of step s is a function of (seed, s) alone and a
resumed run reads what the uninterrupted one read. Decisions about which prompts get rollouts belong here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from nested_reft.config import TrainConfig
from nested_reft.store.seeding import step_generator
from nested_reft.tasks.problems import Problem


def batch_for_step(problems: Sequence[Problem], config: TrainConfig, step: int, accelerator) -> list[Problem]:
    """This rank's share of the step's prompts: a seeded shuffle per epoch, read in order (resumable by step).

    A fraction of an epoch uses a proportional subset of the shuffled set, as in the paper (appendix F).
    """
    size, world = config.batch_size, accelerator.num_processes  # size % world == 0: `check_fits_model`
    first = (step - 1) * size
    positions = (divmod(position, len(problems)) for position in range(first, first + size))  # (epoch, offset)
    indices = [data_order(len(problems), config.seed, epoch)[offset] for epoch, offset in positions]
    share = size // world
    mine = indices[accelerator.process_index * share : (accelerator.process_index + 1) * share]
    return [problems[i] for i in mine]


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
