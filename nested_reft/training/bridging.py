"""Bridged nesting in the ReFT loop (`nesting.bridge: linear`; past the paper, issue 31).

Every block a skip set may drop (the band the border leaves) has a bridge. A fresh run fits the first bridges
from a calibration pass: one no-grad forward of the full model over a batch of training problems (their prompts
and reference solutions, the prompts alone where there are none). Then each step's update forward, which runs
anyway, adds the step's normal equations (`BridgeFitter`'s hooks, on the prompt and completion tokens of the
first pass), the older sums fading by `nesting.bridge_decay`, and every `nesting.bridge_refit_steps` steps the
bridges are solved again, to be used by the next step's rollouts. The bridges and the sums are run state: they
go into checkpoints (`state_dict`), so a resumed run samples from the bridges the uninterrupted one used.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nested_reft.config import NestingConfig
from nested_reft.nesting.bridges import BRIDGE_FITS, BridgeFitter, Bridges, NormalEquations, record_texts
from nested_reft.nesting.layers import num_decoder_layers, valid_layers
from nested_reft.tasks.problems import Problem
from nested_reft.tasks.prompts import build_prompt


@dataclass
class FitCost:
    """What a step's bridge fitting cost: wall time of folding and solving, and FLOPs of accumulating the normal
    equations (2 x 2 (d+1) d per token and bridged block) and of solving them (about 8/3 d^3 per block)."""

    time_s: float = 0.0
    flops: float = 0.0


class BridgeTraining:
    """The run's bridges and the fitter that keeps their normal equations."""

    def __init__(self, policy, config: NestingConfig):
        self.layers = tuple(valid_layers(num_decoder_layers(policy), config.border))
        self.hidden_size = policy.config.get_text_config().hidden_size
        self.config = config
        self.fitter = BridgeFitter(policy, self.layers, config.bridge_decay)
        self.fit = BRIDGE_FITS[config.bridge]
        self.bridges = Bridges.identity(self.layers, self.hidden_size)

    @classmethod
    def of(cls, policy, config: NestingConfig) -> BridgeTraining | None:
        """The run's bridging, or None when the skipped blocks are removed (`nesting.bridge: none`, the paper)."""
        return None if BRIDGE_FITS[config.bridge] is None else cls(policy, config)

    def calibrate(self, policy, tokenizer, problems: Sequence[Problem], micro_batch_size: int, accelerator) -> FitCost:
        """The first bridges, from a no-grad forward of the full model over `problems` (prompt + solution)."""
        record_texts(self.fitter, policy, tokenizer, calibration_texts(tokenizer, problems), micro_batch_size,
                     accelerator.autocast)
        return self.end_step(accelerator, refit=True)

    def recording(self, prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> contextlib.AbstractContextManager:
        """Record the body's forwards over prompt + completion rows on all their real tokens."""
        return self.fitter.recording(torch.cat([prompt_mask, completion_mask], dim=1))

    def end_step(self, accelerator, refit: bool) -> FitCost:
        """Fold the step's sums in (over all ranks) and, if `refit`, solve the bridges again."""
        tokens = float(self.fitter.pending_tokens())
        start = time.perf_counter()
        self.fitter.end_step(accelerator)
        d = self.hidden_size
        flops = 4.0 * (d + 1) * d * tokens
        if refit:
            self.bridges = self.fit(self.fitter.total, self.config.bridge_ridge)
            flops += len(self.layers) * (8.0 / 3.0) * d**3
        return FitCost(time.perf_counter() - start, flops)

    def end_of(self, step: int, accelerator) -> FitCost:
        """After step `step`'s update: fold its sums in, and refit every `nesting.bridge_refit_steps` steps."""
        return self.end_step(accelerator, refit=step % self.config.bridge_refit_steps == 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bridges and the decayed sums, as tensors (`checkpoint.RUN_TENSORS`)."""
        bridges = {f"bridges.{key}": value for key, value in self.bridges.state_dict().items()}
        sums = {f"bridge_sums.{key}": value for key, value in self.fitter.total.state_dict().items()}
        return {**bridges, **sums}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.bridges = Bridges.from_state_dict(_section(state, "bridges."))
        self.fitter.total = NormalEquations.from_state_dict(_section(state, "bridge_sums."))
        if self.bridges.layers != self.layers:
            raise ValueError(f"the checkpoint's bridges are for blocks {self.bridges.layers}, the run's for {self.layers}")


def calibration_texts(tokenizer, problems: Sequence[Problem]) -> list[str]:
    """What a calibration pass reads: each problem's templated prompt and its reference solution (if any)."""
    return [build_prompt(tokenizer, problem.question) + (problem.solution or "") for problem in problems]


def _section(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
