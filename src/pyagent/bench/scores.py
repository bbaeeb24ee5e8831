"""What a suite run's attempts add up to: accuracy with Wilson 95% intervals, pass^k over repeated
attempts, latency quantiles, tokens and cost, per family, per family and difficulty, and overall;
and the baselines that give accuracy its meaning (random guessing, the majority answer).

Accuracy is over items: an item's accuracy is the share of its attempts that were fully correct,
so repeats narrow nothing they should not (an interval counts items, not attempts). pass^k is the
chance that k attempts at an item all succeed, estimated without bias from n >= k attempts as
C(c, k) / C(n, k) per item (c correct), averaged over items (tau-bench's measure of consistency).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import numpy as np

from pyagent.bench.suites.base import Grade, Item

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(share, low, high): the Wilson score interval of a binomial share; `successes` may be
    fractional (items scored by the share of their attempts that passed)."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denominator
    # the interval holds p; rounding must not put p outside it (0 or 1 successes)
    return p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def pass_hat_k(correct_per_item: Iterable[Sequence[bool]], k: int) -> float:
    """The mean over items of C(c, k) / C(n, k): the chance that k attempts all pass."""
    values = [math.comb(sum(attempts), k) / math.comb(len(attempts), k)
              for attempts in correct_per_item if len(attempts) >= k]
    return float(np.mean(values)) if values else math.nan


def _quantile(values: Sequence[float], q: float) -> float | None:
    return float(np.quantile(values, q)) if values else None


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy (Wilson 95%), mean score, pass^k for each k up to the repeats, latency p50/p95,
    tokens, cost and errors of `records` (attempt records of one group)."""
    by_item: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_item[record["item_id"]].append(record)
    item_accuracy = [sum(bool(r["correct"]) for r in rs) / len(rs) for rs in by_item.values()]
    share, low, high = wilson(sum(item_accuracy), len(item_accuracy))
    repeats = min((len(rs) for rs in by_item.values()), default=0)
    latencies = [r["latency_s"] for r in records if r.get("latency_s") is not None]
    costs = [r["cost"] for r in records if r.get("cost") is not None]
    summary: dict[str, Any] = {
        "items": len(by_item), "attempts": len(records), "accuracy": share,
        "ci_low": low, "ci_high": high,
        "mean_score": float(np.mean([r["score"] for r in records])) if records else math.nan,
        "latency_p50_s": _quantile(latencies, 0.5), "latency_p95_s": _quantile(latencies, 0.95),
        "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in records),
        "cached_tokens": sum(r.get("cached_tokens", 0) for r in records),
        "completion_tokens": sum(r.get("completion_tokens", 0) for r in records),
        "cost_usd": str(sum((Decimal(c) for c in costs), Decimal(0)))
        if len(costs) == len(records) and records else None,
        "errors": sum(bool(r.get("error")) for r in records)}
    if repeats > 1:
        attempts = [[bool(r["correct"]) for r in rs] for rs in by_item.values()]
        summary["pass_hat_k"] = {str(k): pass_hat_k(attempts, k) for k in range(1, repeats + 1)}
    return summary


def grouped(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """`summarize` per distinct value of `keys`, in order of first appearance."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(record[k] for k in keys), []).append(record)
    return [{**dict(zip(keys, key, strict=True)), **summarize(rows)}
            for key, rows in groups.items()]


Grader = Callable[[Item, int, str], Grade]


def random_baseline(item: Item, grade: Grader) -> tuple[float, float] | None:
    """Uniform guesses among the item's choices: the chance they get every scored turn fully
    right (what accuracy counts) and their expected score (what mean score counts); None for
    open answers (a guess is then almost never right, and no figure is claimed)."""
    if not item.choices:
        return None
    turns = [[grade(item, turn, choice) for choice in item.choices] for turn in item.scored]
    return (float(np.prod([np.mean([g.correct for g in grades]) for grades in turns])),
            float(np.mean([np.mean([g.score for g in grades]) for grades in turns])))


def majority_answer(train: Sequence[Item]) -> str | None:
    """The most common reference answer of the scored turns of `train` (ties: the first seen)."""
    counts = Counter(item.turns[t].answer for item in train for t in item.scored)
    return counts.most_common(1)[0][0] if counts else None


def majority_baseline(item: Item, answer: str | None, grade: Grader
                      ) -> tuple[float, float] | None:
    """Always giving `answer`: 1.0 when that gets every scored turn fully right (else 0.0),
    and its mean score over the scored turns."""
    if answer is None:
        return None
    grades = [grade(item, turn, answer) for turn in item.scored]
    return float(all(g.correct for g in grades)), float(np.mean([g.score for g in grades]))
