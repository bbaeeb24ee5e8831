"""Promotion by evidence: a candidate replaces the incumbent only when it wins on paired tasks.

Both ran on the same tasks; each task gives a pair of scores (1 solved, 0 not, or a partial
score). The gain is the mean of the per-task differences, with a paired bootstrap interval
(percentile method, resampling tasks). For solved/unsolved outcomes the exact McNemar test reads
only the tasks where the two disagree: the chance of at least that many wins among them if a win
and a loss were equally likely.

A candidate is promoted when both say so at a family-wise level `alpha` split over the candidates
compared (Bonferroni): the bootstrap interval at 1 - alpha/m lies above zero and the one-sided
McNemar p-value is below alpha/m. The bootstrap alone is lenient on a few tasks (three wins and no
losses among ten tasks already put its 95% lower bound at zero or above); the exact test keeps the
rule honest when tasks are few.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

from pyagent.errors import ConfigError

RESAMPLES = 10_000


@dataclass(frozen=True)
class Comparison:
    """A candidate against the incumbent on the same `n` tasks."""

    n: int
    before: float  # the incumbent's mean score
    after: float  # the candidate's
    gain: float  # after - before
    low: float  # the gain's bootstrap interval at `confidence`
    high: float
    confidence: float
    wins: int  # tasks where the candidate scored higher
    losses: int
    p_value: float  # exact one-sided McNemar (sign test on the tasks that differ)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """Whether a candidate is promoted, and why."""

    candidate: str
    comparison: Comparison
    promoted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "comparison": self.comparison.to_dict(),
                "promoted": self.promoted, "reason": self.reason}


def compare(before: Sequence[float], after: Sequence[float], confidence: float = 0.95,
            seed: int = 0, resamples: int = RESAMPLES) -> Comparison:
    """The paired comparison of `after` against `before` (scores of the same tasks, in order)."""
    if len(before) != len(after):
        raise ConfigError(f"paired scores differ in length: {len(before)} before, "
                          f"{len(after)} after")
    if not before:
        raise ConfigError("no paired tasks to compare")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie between 0 and 1, not {confidence}")
    old, new = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    diffs = new - old
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    p_value = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue \
        if wins + losses else 1.0
    return Comparison(len(diffs), float(old.mean()), float(new.mean()), float(diffs.mean()),
                      float(low), float(high), confidence, wins, losses, float(p_value))


def decide(incumbent: Sequence[float], candidates: dict[str, Sequence[float]],
           alpha: float = 0.05, seed: int = 0) -> list[Decision]:
    """Each candidate's promotion decision against the incumbent, at family-wise level `alpha`."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie between 0 and 1, not {alpha}")
    level = alpha / max(len(candidates), 1)
    decisions = []
    for name, scores in candidates.items():
        result = compare(incumbent, scores, 1 - level, seed)
        if result.low <= 0:
            reason = (f"the gain's {1 - level:.1%} interval [{result.low:+.3f}, "
                      f"{result.high:+.3f}] does not lie above zero")
        elif result.p_value >= level:
            reason = (f"{result.wins} wins against {result.losses} losses: exact p = "
                      f"{result.p_value:.3g}, not below {level:.3g}")
        else:
            reason = (f"gain {result.gain:+.3f}, {1 - level:.1%} interval [{result.low:+.3f}, "
                      f"{result.high:+.3f}], {result.wins} wins against {result.losses} losses "
                      f"(exact p = {result.p_value:.3g} < {level:.3g})")
        decisions.append(Decision(name, result, result.low > 0 and result.p_value < level,
                                  reason))
    return decisions
