"""Regressions between two sets of results, by asv's rule: a metric changed only when the
Mann-Whitney U test says so (two-sided p < alpha) AND its center moved by a factor (1.1).

The center is the median, or the mean for 0/1 samples (correctness, errors: a proportion).
Which way is worse follows from the metric's name (`direction`), unless overridden.

alpha defaults to 0.01. asv uses 0.002 with many samples; Mann-Whitney's smallest two-sided p
with n samples a side is 2 / C(2n, n), which is below 0.002 only from 7 a side, and below 0.01
from 5: typical benchmark repeats (5 to 20) can reach 0.01. The factor gate keeps the false
alarms a p-value alone would give on many metrics rare (the synthetic benchmark measures it).
Fewer samples than the test needs to ever reach alpha is reported as "insufficient samples";
a single value a side is compared by ratio only and never called significant; a negative center
has no ratio, so its metric is tested but never flagged ("no ratio").
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pyagent.bench.results import Metrics

ALPHA = 0.01
FACTOR = 1.1
Better = Literal["lower", "higher", "unknown"]
Verdict = Literal["regression", "improvement", "changed", "below factor", "no ratio",
                  "unchanged", "insufficient samples", "single value"]
FLAGGED = ("regression", "improvement", "changed")
# Rules on one dotted component, first match wins; components are read from the last.
RULES: tuple[tuple[re.Pattern[str], Better], ...] = (
    (re.compile(r"error|fail|miss|refus|timeout"), "lower"),
    (re.compile(r"per_s|tok_s|tokens_s|/s$|throughput|speedup|accuracy|score|correct|pass"
                r"|success|hit|cached|recall|precision|f1|qps|rps"), "higher"),
    (re.compile(r"latency|time|duration|(^|_)s$|seconds|(^|_)ms$|bytes|rss|memory|mib|gib"
                r"|tokens|cost|usd|queue|ttft|loss|perplexity|wait|lag"), "lower"),
)


@dataclass(frozen=True)
class Change:
    """One metric compared: centers, their ratio (candidate / baseline), the test's p-value
    (None when not tested) and the verdict."""

    metric: str
    better: Better
    n_baseline: int
    n_candidate: int
    baseline: float
    candidate: float
    ratio: float | None
    p_value: float | None
    verdict: Verdict

    @property
    def flagged(self) -> bool:
        return self.verdict in FLAGGED


def direction(metric: str, overrides: Mapping[str, Better] | None = None) -> Better:
    """Which way is better for `metric`: an override whose glob matches the name wins; else the
    first of RULES matching a dotted component, from the last component back (`latency.p50`
    is lower-better by `latency`; `error_rate` lower by `error`; `decode.tok_s` higher)."""
    for pattern, better in (overrides or {}).items():
        if fnmatch.fnmatchcase(metric, pattern):
            return better
    for component in reversed(metric.lower().split(".")):
        for rule, better in RULES:
            if rule.search(component):
                return better
    return "unknown"


def center(values: Sequence[float]) -> float:
    """The median, or the mean of 0/1 samples (a proportion)."""
    array = np.asarray(values, dtype=float)
    binary = bool(np.isin(array, (0.0, 1.0)).all())
    return float(array.mean() if binary else np.median(array))


def smallest_p(n1: int, n2: int) -> float:
    """The smallest two-sided p-value Mann-Whitney U can give with n1 and n2 samples."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def compare_samples(metric: str, baseline: Sequence[float], candidate: Sequence[float],
                    better: Better = "unknown", alpha: float = ALPHA,
                    factor: float = FACTOR) -> Change:
    """Compare one metric's samples (see the module's doc for the rule)."""
    from scipy.stats import mannwhitneyu

    base, cand = center(baseline), center(candidate)
    ratio = _ratio(base, cand)
    n1, n2 = len(baseline), len(candidate)

    def made(p: float | None, verdict: Verdict) -> Change:
        return Change(metric, better, n1, n2, base, cand, ratio, p, verdict)

    if n1 == 1 and n2 == 1:
        return made(None, "single value")
    if smallest_p(n1, n2) >= alpha:
        return made(None, "insufficient samples")
    if np.ptp(np.concatenate([baseline, candidate])) == 0:
        return made(1.0, "unchanged")
    p = float(mannwhitneyu(baseline, candidate, alternative="two-sided").pvalue)
    if p >= alpha:
        return made(p, "unchanged")
    if ratio is None:
        return made(p, "no ratio")
    if 1 / factor < ratio < factor:
        return made(p, "below factor")
    if better == "unknown":
        return made(p, "changed")
    worse = ratio > 1 if better == "lower" else ratio < 1
    return made(p, "regression" if worse else "improvement")


def compare_metrics(baseline: Metrics, candidate: Metrics, alpha: float = ALPHA,
                    factor: float = FACTOR,
                    overrides: Mapping[str, Better] | None = None) -> list[Change]:
    """Every metric with samples on both sides compared; flagged ones first, then by name."""
    changes = [compare_samples(name, baseline[name], candidate[name],
                               direction(name, overrides), alpha, factor)
               for name in sorted(baseline.keys() & candidate.keys())]
    return sorted(changes, key=lambda c: (not c.flagged, c.metric))


def _ratio(base: float, cand: float) -> float | None:
    """candidate / baseline; infinite from zero, None when a center is negative."""
    if base < 0 or cand < 0:
        return None
    if base == 0:
        return 1.0 if cand == 0 else math.inf
    return cand / base
