"""Figures without a display: matplotlib's file-only backend, and saving that creates the directory."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files; no display needed on a cluster or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `figure` to `path` (its directory created) and close it, so long reports do not pile figures up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path


LINESTYLES = ("-", "--", ":", "-.")


def series_style(index: int) -> dict[str, object]:
    """The colour and line style of the `index`-th series of a figure: matplotlib's default ten colours (tab10)
    first, so figures of up to ten series look as before, then tab20's ten lighter shades of them, and a new line
    style every ten series; 20 distinct colours, 40 distinct colour and style pairs. Deterministic, so one series
    keeps its look across the panels of a figure."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors  # (dark, light) pairs; the dark ones are tab10's
    colours = tab20[0::2] + tab20[1::2]
    return {"color": colours[index % len(colours)], "linestyle": LINESTYLES[(index // 10) % len(LINESTYLES)]}
