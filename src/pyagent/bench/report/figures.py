"""Plots as inline SVG (matplotlib, no display needed), so a report is one offline file."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

WIDTH, HEIGHT = 7.0, 3.2


def svg(figure: plt.Figure) -> str:
    """The figure as an <svg> element; the figure is closed."""
    buffer = io.StringIO()
    figure.tight_layout()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def stacked_bars(categories: Sequence[str], series: Mapping[str, Sequence[float]], title: str,
                 ylabel: str) -> str:
    """One bar per category, stacked by series."""
    figure, axes = plt.subplots(figsize=(WIDTH, HEIGHT))
    bottom = [0.0] * len(categories)
    for label, values in series.items():
        axes.bar(categories, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    if len(series) > 1:
        axes.legend()
    return svg(figure)


def lines(x: Sequence[float], series: Mapping[str, Sequence[float]], title: str, xlabel: str,
          ylabel: str) -> str:
    """Line plots over a shared x axis."""
    figure, axes = plt.subplots(figsize=(WIDTH, HEIGHT))
    for label, values in series.items():
        axes.plot(x, values, label=label)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if len(series) > 1:
        axes.legend()
    return svg(figure)


def quantile_ranges(names: Sequence[str], quantiles: Sequence[Mapping[str, float]], title: str,
                    unit: str) -> str:
    """Per series a bar from p50 to p99 with ticks at p50, p90, p95 and p99 (horizontal)."""
    figure, axes = plt.subplots(figsize=(WIDTH, max(1.6, 0.45 * len(names) + 1)))
    for row, q in enumerate(quantiles):
        axes.hlines(row, q["p50"], q["p99"], linewidth=6, alpha=0.35)
        for key, marker in (("p50", "|"), ("p90", "x"), ("p95", "+"), ("p99", "d")):
            axes.plot(q[key], row, marker=marker, color="black", linestyle="none",
                      label=key if row == 0 else None)
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel(unit)
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")
    return svg(figure)


def indexed(series: Mapping[str, Sequence[float]], title: str, ylabel: str) -> str:
    """Each series as a line over its own index (repeat, iteration, sample)."""
    figure, axes = plt.subplots(figsize=(WIDTH, HEIGHT))
    for label, values in series.items():
        axes.plot(range(1, len(values) + 1), values, marker="." if len(values) < 60 else None,
                  label=label)
    axes.set_title(title)
    axes.set_xlabel("index")
    axes.set_ylabel(ylabel)
    if 1 < len(series) <= 12:
        axes.legend(fontsize="small")
    return svg(figure)


def intervals(names: Sequence[str], values: Sequence[float], lows: Sequence[float],
              highs: Sequence[float], markers: Mapping[str, Sequence[float | None]], title: str,
              ylabel: str) -> str:
    """A point with its interval per name (horizontal), and reference markers (baselines)."""
    figure, axes = plt.subplots(figsize=(WIDTH, max(1.6, 0.32 * len(names) + 1.2)))
    rows = range(len(names))
    below = [max(0.0, v - lo) for v, lo in zip(values, lows, strict=True)]  # never negative,
    above = [max(0.0, hi - v) for v, hi in zip(values, highs, strict=True)]  # rounding aside
    axes.errorbar(values, rows, xerr=[below, above],
                  fmt="o", capsize=3, label="measured (95% CI)")
    for (label, points), symbol in zip(markers.items(), "x+|", strict=False):
        shown = [(p, r) for p, r in zip(points, rows, strict=True) if p is not None]
        if shown:
            axes.scatter([p for p, _ in shown], [r for _, r in shown], marker=symbol,
                         label=label, zorder=3)
    axes.set_yticks(list(rows), list(names))
    axes.invert_yaxis()
    axes.set_title(title)
    axes.set_xlabel(ylabel)
    axes.legend(fontsize=7, loc="lower right")
    return svg(figure)
