"""The options of an evaluation (pass@1 on benchmarks): how its completions are drawn, and which problems it covers.

`EvalConfig` is what `nested_reft.evaluation.evaluate` takes and records; `EvalSettings` adds the problems, and is
what `nested-reft eval` (its flags) and a grid's `eval:` section (its keys; each instance sets the seed) set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nested_reft.config.checks import check_option, check_types
from nested_reft.config.names import DEFAULT_BENCHMARKS, ENGINES
from nested_reft.config.options import SamplingConfig


@dataclass(frozen=True)
class EvalConfig:
    """How evaluation completions are drawn: pass@1, one sample per problem, stopping at EOS."""

    temperature: float = 0.6  # paper, appendix F
    top_p: float = 0.95  # paper, appendix F
    max_new_tokens: int = 1024  # paper: 32k (32768); 1024 keeps a CPU run of a small model to minutes
    batch_size: int = 16  # not in the paper: prompts per generate call, a memory/speed trade-off only
    seed: int = 0  # seeds each batch's generator with (seed, benchmark, batch index)
    engine: str = "eager"  # the decoding engine (SamplingConfig.engine)

    def __post_init__(self) -> None:
        check_types(self, "")  # integers where integers belong, finite numbers (an infinite temperature is uniform)
        check_option(self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 = greedy)")
        check_option(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        check_option(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        check_option(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_option(self.engine in ENGINES, "engine", self.engine, f"one of {ENGINES}")

    def sampling(self) -> SamplingConfig:
        """The sampler's settings: no top-k, and no minimum length so that completions stop at EOS."""
        return SamplingConfig(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=0,
            engine=self.engine,
        )


def eval_config(**options: Any) -> EvalConfig:
    """An EvalConfig from `options`, None meaning "the default": unset command-line flags and null grid keys."""
    return EvalConfig(**{key: value for key, value in options.items() if value is not None})


@dataclass(frozen=True)
class EvalSettings(EvalConfig):
    """One evaluation: EvalConfig's options and the problems they are drawn for. None (an unset flag, a null key in a
    grid file) leaves an option at its default. Benchmark names are checked where they are read
    (`nested_reft.evaluation.evaluate.benchmark_names`), and by a grid at load."""

    benchmarks: tuple[str, ...] = DEFAULT_BENCHMARKS  # names listed as words or separated by commas
    limit: int | None = None  # the first N problems of each benchmark (None = all)
    # a local copy of the data; None = $NESTED_REFT_DATA, else the hub (in a grid: its train data_dir first)
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            if getattr(self, spec.name) is None and spec.default is not None:
                object.__setattr__(self, spec.name, spec.default)
        if isinstance(self.benchmarks, (str, list, tuple)):  # anything else is left for `check_types` to name
            object.__setattr__(self, "benchmarks", tuple(listed_benchmarks(self.benchmarks)))  # "a,b" is two
        super().__post_init__()

    def config(self, seed: int | None = None) -> EvalConfig:
        """The settings of the draws alone (what `evaluate` takes and records), at `seed` where one is given."""
        options = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(EvalConfig)}
        return EvalConfig(**options) if seed is None else EvalConfig(**{**options, "seed": seed})

    def data_dir_in_grid(self, train_data_dir: str | None) -> str | None:
        """Where a grid's evaluation reads its benchmarks: this setting's own data_dir, else its training's."""
        return self.data_dir or train_data_dir


def listed_benchmarks(benchmarks: Sequence[str] | str) -> list[str]:
    """The names as listed, each item split at commas: shells give `gsm8k math500` as words, lm-eval's users
    type `gsm8k,math500`, and both (or a mix, `gsm8k, math500`) name the same two benchmarks."""
    items = [benchmarks] if isinstance(benchmarks, str) else benchmarks
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]
