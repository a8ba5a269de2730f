"""The study's statistics: the bootstrap interval of a Delta accuracy, Student's t interval of the seeds' own deltas.

The interval of a configuration's Delta accuracy (its mean pass@1 minus the baseline's, over seeds and the
held-out problems) is a percentile bootstrap over seeds and problems: each replicate draws the seeds of
each arm with replacement and one set of problems with replacement, the same problems for both arms (the
arms answer the same problems, so the comparison is paired), and takes the difference of the means. It
measures both sources of noise this setting has: which seed (warm-up, data order, sampling) and which
problems happen to be in the held-out set.

Beside it, the interval the seeds alone give: each seed's paired delta (the run minus the baseline of the same
seed and warm-up, which started from the very same weights), their mean and its Student t interval (n seeds,
n - 1 degrees of freedom; none for one seed). It asks whether the effect repeats from seed to seed, where the
bootstrap also asks whether it would hold on other problems.

Pure functions over numbers and rows (dicts): the study's tables, the report's deltas and the demo use them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 4000
CONFIDENCE = 0.95
# A configuration's seeds' own paired deltas (`seed_summary`): how many seeds pair, their mean, its t interval.
SEED_COLUMNS = ("seeds_paired", "delta_abs_accuracy_seeds_mean", "delta_abs_accuracy_seeds_t_low",
                "delta_abs_accuracy_seeds_t_high")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided confidence interval."""

    mean: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_delta(nested: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Interval:
    """Mean accuracy of `nested` minus `baseline`, each a list of seeds' per-problem scores (seed x problem, the
    problems in the same order in every list), with a percentile bootstrap interval over seeds and problems."""
    deltas = bootstrap_replicates(nested, baseline, samples, seed)
    tail = (1 - CONFIDENCE) / 2
    point = float(np.mean(nested) - np.mean(baseline))
    return Interval(point, float(np.quantile(deltas, tail)), float(np.quantile(deltas, 1 - tail)))


def bootstrap_replicates(nested: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                         samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """The `samples` bootstrap replicates of the Delta of means (see the module docstring for the scheme)."""
    arms = [np.asarray(arm, dtype=np.float64) for arm in (nested, baseline)]
    problems = {arm.shape[1] for arm in arms if arm.ndim == 2}
    if any(arm.ndim != 2 or arm.shape[0] == 0 for arm in arms) or len(problems) != 1:
        raise ValueError("both arms need at least one seed, each scored on the same problems")
    (count,) = problems
    generator = np.random.default_rng(seed)
    picked = generator.integers(0, count, size=(samples, count))  # one problem resample per replicate, both arms
    means = []
    for arm in arms:
        seeds = generator.integers(0, arm.shape[0], size=(samples, arm.shape[0]))
        per_seed = arm[:, picked].mean(axis=2)  # (seeds, replicates)
        means.append(np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1))
    return means[0] - means[1]


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile (above 1/2) of Student's t with `df` degrees of freedom, by bisection on its
    distribution function: scipy is not a dependency, and a table would cover only the levels it lists."""
    if not 0.5 <= probability < 1 or df < 1:
        raise ValueError(f"need 0.5 <= probability < 1 and df >= 1, got {probability} and {df}")
    level = 2 * probability - 1  # P(|T| <= t)
    low, high = 0.0, 1.0
    while _t_central(high, df) < level:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_central(middle, df) < level else (low, middle)
    return (low + high) / 2


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer `df`: the finite series of Abramowitz and Stegun 26.7.3-4, exact
    up to rounding (theta = atan(t / sqrt(df)); a sum of powers of cos^2 theta, odd df adding theta itself)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    term = total = 1.0
    if df % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... up to cos^(df - 2))
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ... to cos^(df - 3)))
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """The mean of `values` (one per seed) with its Student t interval, mean +- t_{(1 + c)/2, n - 1} s / sqrt(n);
    None for fewer than two values, whose spread says nothing."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def seed_summary(deltas: Sequence[float]) -> dict[str, Any]:
    """SEED_COLUMNS of the seeds' own paired deltas: their number, mean and t interval (None where undefined)."""
    interval = t_interval(deltas)
    bounds = (None, None) if interval is None else (interval.low, interval.high)
    return dict(zip(SEED_COLUMNS, (len(deltas), statistics.fmean(deltas) if deltas else None, *bounds)))


def paired_deltas(runs: Iterable[dict], references: Iterable[dict], column: str = "accuracy") -> dict[int, float]:
    """Seed -> a run's `column` minus that of the reference run of the same seed, for the seeds both have: the two
    started from warm-ups of one seed, so the seed's own luck cancels."""
    reference = {row["seed"]: row[column] for row in references if row.get(column) is not None}
    return {row["seed"]: row[column] - reference[row["seed"]] for row in runs
            if row.get(column) is not None and row["seed"] in reference}
