"""How the experiments write numbers into Markdown: one formatter for the report, the study and the demo.

Every function returns a table cell; a value that was not measured (None, or NaN) is written as an en dash.
"""

from __future__ import annotations

import math

from nested_reft.experiments.stats import SEED_COLUMNS, Interval

MISSING = "–"


def number(value: float | None, spec: str) -> str:
    """`value` in the format `spec` (`.3f`, `+.2f`, `.4g`); – where it is None or NaN."""
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def percent(fraction: float | None) -> str:
    """A fraction (a pass@1) as a percentage with one decimal: 0.498 -> `49.8%`."""
    return MISSING if fraction is None else f"{100 * fraction:.1f}%"


def tera(flops: float | None, spec: str) -> str:
    """FLOPs in TFLOPs, in the format `spec`."""
    return number(None if flops is None else flops / 1e12, spec)


def interval_text(mean: float | None, low: float | None, high: float | None, spec: str, scale: float = 1) -> str:
    """`mean [low, high]` times `scale`; `mean [–]` without bounds (one seed), – without a mean."""
    if mean is None:
        return MISSING
    bounds = MISSING if low is None or high is None else f"{format(scale * low, spec)}, {format(scale * high, spec)}"
    return f"{format(scale * mean, spec)} [{bounds}]"


def interval_cell(interval: Interval | None, spec: str = "+.1f", scale: float = 1) -> str:
    """An estimate with its interval, `mean [low, high]` times `scale` (signed, one decimal by default); – where
    there is none. A bootstrap Delta of pass@1 fractions is in points with scale 100."""
    return MISSING if interval is None else interval_text(interval.mean, interval.low, interval.high, spec, scale)


def seeds_text(entry: dict, spec: str = "+.1f", scale: float = 100) -> str:
    """The SEED_COLUMNS of `entry`: the mean of the seeds' own deltas and its t interval (points by default)."""
    return interval_text(*(entry[column] for column in SEED_COLUMNS[1:]), spec, scale)
