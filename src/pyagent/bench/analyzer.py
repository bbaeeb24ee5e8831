"""The performance analyzer: bottlenecks, the levers against them, regressions, trends, and a
0-100 score, from trace stores, benchmark-suite results or any result JSON.

    analyze_traces("traces.db")                     # where the critical path goes, what to pull
    analyze_results(["suite.json"], after=["int8.json"])   # the same for suite attempts
    compare(["base-1.json", ...], ["cand-1.json", ...])    # regressions, asv's rule
    trends(["monday.json", "tuesday.json", ...])    # per metric: Mann-Kendall, Sen, forecast

Bottlenecks: time is split into model compute (prefill, decode), queueing, tools, memory
pressure and other (orchestration) along each run's critical path (`critical_path`); a kind is
a bottleneck when its share of the wall time is at least `bottleneck_share` (0.25), or, for
memory, when a memory series keeps growing (linear, exponential or step, not given back by a
sharp fall) by `memory_growth` (0.2) of its first level, or of capacity, or more. Bottlenecks
rank by share. Time lost to refusals goes to their cause: a KV refusal to memory, an
overloaded engine (its queue full) to queueing.

Score: 100 minus five penalties, each computed from the data and nondecreasing in its input
(components that were not measured cost nothing):
- bottleneck (up to 15): 15 x clip((top share - 0.5) / 0.5, 0, 1): one kind above a healthy
  half of the wall time;
- headroom (up to 30): 30 x min(1, S / 0.5), S = 1 - prod(1 - share_i) over the opportunities'
  estimated savings: what the levers could still remove;
- regressions (up to 30): 10 per significant regression or worsening trend;
- errors (up to 15): 15 x min(1, error rate / 0.2), failed LLM and tool calls (or attempts);
- memory (up to 10): 10 x min(1, growth / 0.5) of the fastest-growing memory series.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.bench.analysis_md import render
from pyagent.bench.breakdown import Breakdown, MemorySeries, from_suite, from_traces
from pyagent.bench.critical_path import KINDS, LOST
from pyagent.bench.forecast import MetricTrend, metric_trends, points
from pyagent.bench.opportunities import Levers, Measured, Opportunity, measure, opportunities
from pyagent.bench.regression import ALPHA, FACTOR, Better, Change, compare_metrics
from pyagent.bench.results import pooled

HEALTHY_SHARE = 0.5
PENALTIES = {"bottleneck": 15.0, "headroom": 30.0, "regressions": 30.0, "errors": 15.0,
             "memory": 10.0}
HEADROOM_FULL = 0.5  # estimated savings at which the headroom penalty is full
REGRESSION_COST = 10.0
ERROR_RATE_FULL = 0.2
GROWTH_FULL = 0.5
FORMULA = ("score = 100 - bottleneck - headroom - regressions - errors - memory; "
           "bottleneck = 15 x clip((top share - 0.5) / 0.5, 0, 1); "
           "headroom = 30 x min(1, (1 - prod(1 - saving share)) / 0.5); "
           "regressions = min(30, 10 x (significant regressions + worsening trends)); "
           "errors = 15 x min(1, error rate / 0.2); memory = 10 x min(1, growth / 0.5)")
KIND_NAMES = {"model": "model compute", "queue": "queueing", "tools": "tools",
              "memory": "memory pressure", "other": "orchestration"}


@dataclass(frozen=True)
class Settings:
    """Thresholds of the analyses (see the module's doc and `regression`, `forecast`)."""

    bottleneck_share: float = 0.25
    memory_growth: float = 0.2
    alpha: float = ALPHA
    factor: float = FACTOR
    confidence: float = 0.95
    horizon: int = 3
    directions: Mapping[str, Better] = field(default_factory=dict)  # glob -> lower / higher
    levers: Levers = field(default_factory=Levers)


@dataclass(frozen=True)
class Bottleneck:
    kind: str
    seconds: float
    share: float  # of the wall time
    summary: str
    evidence: dict[str, Any]


@dataclass(frozen=True)
class Component:
    name: str
    penalty: float
    max_penalty: float
    value: float | None  # the input, None when not measured
    explanation: str


@dataclass(frozen=True)
class Score:
    value: float
    components: list[Component]
    formula: str = FORMULA


@dataclass
class Analysis:
    """What an analysis found; sections that do not apply stay empty."""

    kind: str  # traces, results, compare or trends
    sources: list[str]
    score: Score
    time: dict[str, Any] | None = None  # wall time, units, seconds per kind and detail
    bottlenecks: list[Bottleneck] = field(default_factory=list)
    opportunities: list[Opportunity] = field(default_factory=list)
    measured: Measured | None = None  # wall time per unit, before and after levers
    changes: list[Change] = field(default_factory=list)
    trends: list[MetricTrend] = field(default_factory=list)
    memory: list[MemorySeries] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (infinities and NaN as null)."""
        return _jsonable(asdict(self))

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "regression"]

    def markdown(self) -> str:
        return render(self)


def analyze_traces(path: str | Path, run_ids: Sequence[str] | None = None, *,
                   after: str | Path | None = None, after_run_ids: Sequence[str] | None = None,
                   settings: Settings = Settings()) -> Analysis:
    """Bottlenecks and opportunities of the runs in a trace store (all, or `run_ids`); with
    `after`, a store measured with levers applied, the measured change next to each estimate."""
    before = from_traces(path, run_ids)
    changed = from_traces(after, after_run_ids) if after is not None else None
    return _profiled("traces", [str(path), *([str(after)] if after else [])], before, changed,
                     settings)


def analyze_results(paths: Sequence[str | Path], *, after: Sequence[str | Path] | None = None,
                    settings: Settings = Settings()) -> Analysis:
    """Bottlenecks and opportunities of benchmark-suite results (their attempts pooled); with
    `after`, results measured with levers applied."""
    before = from_suite(paths)
    changed = from_suite(after) if after else None
    return _profiled("results", [str(p) for p in [*paths, *(after or [])]], before, changed,
                     settings)


def compare(baseline: Sequence[str | Path], candidate: Sequence[str | Path], *,
            settings: Settings = Settings()) -> Analysis:
    """Regressions and improvements of `candidate` results against `baseline` (each side's
    files pooled: repeated runs add samples), by asv's rule (see `regression`)."""
    changes = compare_metrics(pooled(list(baseline)), pooled(list(candidate)), settings.alpha,
                              settings.factor, settings.directions)
    significant = sum(c.verdict == "regression" for c in changes)
    return Analysis("compare", [str(p) for p in [*baseline, *candidate]],
                    score(regressions=significant), changes=changes,
                    settings=_settings(settings))


def trends(paths: Sequence[str | Path], *, settings: Settings = Settings()) -> Analysis:
    """Per metric over results in time order: Mann-Kendall, Sen's slope and a forecast of the
    next `settings.horizon` points with its prediction interval (see `forecast`)."""
    series, unit = points(paths)
    found = metric_trends(series, settings.horizon, settings.confidence, settings.directions)
    worsening = sum(t.verdict == "worsening" for t in found)
    return Analysis("trends", [str(p) for p in paths], score(regressions=worsening),
                    trends=found, settings={**_settings(settings), "time_unit": unit})


def bottlenecks(breakdown: Breakdown, settings: Settings = Settings()) -> list[Bottleneck]:
    """The kinds at or above the bottleneck threshold (memory also when it keeps growing),
    largest share first, each with its evidence."""
    seconds = breakdown.kind_seconds()
    growing = [m for m in breakdown.memory if m.growing and m.growth >= settings.memory_growth]
    out = []
    for kind in KINDS:
        share = seconds[kind] / breakdown.wall_s if breakdown.wall_s > 0 else 0.0
        if share >= settings.bottleneck_share or (kind == "memory" and growing):
            summary, evidence = EVIDENCE[kind](breakdown, share)
            out.append(Bottleneck(kind, seconds[kind], share, summary, evidence))
    return sorted(out, key=lambda b: -b.share)


def score(top_share: float | None = None, saving_shares: Sequence[float] = (),
          regressions: int = 0, error_rate: float | None = None,
          memory_growth: float | None = None) -> Score:
    """The 0-100 score from its inputs (None: not measured), per the module's formula."""
    headroom = 1 - math.prod(1 - min(1.0, s) for s in saving_shares)
    parts = [
        ("bottleneck", top_share, lambda v: (v - HEALTHY_SHARE) / (1 - HEALTHY_SHARE),
         f"the top kind's share of the wall time; above a healthy {HEALTHY_SHARE:.0%} costs "
         "up to 15"),
        ("headroom", headroom if saving_shares else None, lambda v: v / HEADROOM_FULL,
         "estimated savings of the levers, combined as 1 - prod(1 - share); "
         f"{HEADROOM_FULL:.0%} of the wall time costs all 30"),
        ("regressions", float(regressions),
         lambda v: v * REGRESSION_COST / PENALTIES["regressions"],
         f"significant regressions and worsening trends, {REGRESSION_COST:g} each"),
        ("errors", error_rate, lambda v: v / ERROR_RATE_FULL,
         f"failed calls over all calls; {ERROR_RATE_FULL:.0%} costs all 15"),
        ("memory", memory_growth, lambda v: v / GROWTH_FULL,
         f"growth of the fastest-growing memory series; {GROWTH_FULL:.0%} costs all 10"),
    ]
    components = []
    for name, value, scale, explanation in parts:
        cap = PENALTIES[name]
        penalty = 0.0 if value is None else cap * float(np.clip(scale(value), 0.0, 1.0))
        components.append(Component(name, round(penalty, 2), cap, value,
                                    explanation if value is not None else "not measured"))
    return Score(round(max(0.0, 100.0 - sum(c.penalty for c in components)), 1), components)


def _profiled(kind: str, sources: list[str], before: Breakdown, after: Breakdown | None,
              settings: Settings) -> Analysis:
    found = opportunities(before, settings.levers)
    measured = None
    if after is not None:
        found = measure(found, before, after)
        old, new = before.wall_s / max(before.units, 1), after.wall_s / max(after.units, 1)
        measured = Measured("wall seconds per unit", old, new, new / old - 1 if old else 0.0)
    shares = {k: s / before.wall_s if before.wall_s > 0 else 0.0
              for k, s in before.kind_seconds().items()}
    growth = [m.growth for m in before.memory if m.growing]
    result = score(max(shares.values(), default=0.0), [o.share for o in found],
                   error_rate=before.errors / before.operations if before.operations else None,
                   memory_growth=max(growth, default=0.0) if before.memory else None)
    time = {"source": before.source, "units": before.units, "wall_s": before.wall_s,
            "elapsed_s": before.elapsed_s, "shares": shares, "seconds": before.seconds,
            "concurrency": before.concurrency, "peak_concurrency": before.peak_concurrency,
            "errors": before.errors, "operations": before.operations, "runs": before.runs}
    return Analysis(kind, sources, result, time, bottlenecks(before, settings), found, measured,
                    memory=before.memory, settings=_settings(settings))


def _settings(settings: Settings) -> dict[str, Any]:
    return {**asdict(settings), "directions": dict(settings.directions)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    return value


# --- evidence per kind: a one-line summary with the numbers, and the numbers -------------------

def _top(parts: Mapping[str, float], wall: float, n: int = 3) -> str:
    ranked = sorted(parts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {seconds / wall:.0%}" for name, seconds in ranked if seconds > 0)


def _model(b: Breakdown, share: float) -> tuple[str, dict[str, Any]]:
    parts = b.seconds.get("model", {})
    prefill, decode = parts.get("prefill", 0.0), parts.get("decode", 0.0)
    uncached = sum(c.prompt_tokens - c.cached_tokens for c in b.calls if c.prefill_s is not None)
    output = sum(c.output_tokens for c in b.calls if c.decode_s is not None)
    evidence = {"prefill_s": prefill, "decode_s": decode, "compute_s": parts.get("compute", 0.0),
                "calls": len(b.calls), "prefill_tok_s": uncached / prefill if prefill else None,
                "decode_tok_s": output / decode if decode else None}
    rate = f" ({evidence['decode_tok_s']:.1f} output tok/s)" if evidence["decode_tok_s"] else ""
    return (f"model compute is {share:.0%} of the wall time: {_top(parts, b.wall_s)}{rate}",
            evidence)


def _queue(b: Breakdown, share: float) -> tuple[str, dict[str, Any]]:
    waits = [c.queue_s for c in b.calls if c.queue_s > 0]
    median = float(np.median(waits)) if waits else 0.0
    rejected = sum(c.overloaded for c in b.calls)
    lost = b.seconds.get("queue", {}).get(LOST["queue"][1], 0.0)
    evidence = {"queue_s": b.kind_seconds()["queue"], "calls_waited": len(waits),
                "calls": len(b.calls), "median_wait_s": median,
                "p95_wait_s": float(np.quantile(waits, 0.95)) if waits else 0.0,
                "peak_concurrency": b.peak_concurrency, "rejected": rejected, "lost_s": lost}
    summary = (f"requests wait for admission {share:.0%} of the wall time: {len(waits)} of "
               f"{len(b.calls)} calls waited, median {median:.2f} s")
    if rejected:
        summary += (f"; {rejected} rejected by an overloaded engine, "
                    f"{lost / b.wall_s if b.wall_s else 0.0:.0%} of the wall time lost")
    return summary, evidence


def _tools(b: Breakdown, share: float) -> tuple[str, dict[str, Any]]:
    parts = b.seconds.get("tools", {})
    return (f"tools take {share:.0%} of the wall time: {_top(parts, b.wall_s)}",
            {"seconds_by_tool": parts})


def _memory(b: Breakdown, share: float) -> tuple[str, dict[str, Any]]:
    refusals = sum(c.memory_error for c in b.calls)
    series = [{"name": m.name, "pattern": m.pattern, "growth": m.growth,
               "released": m.released, "full_share": m.full_share, "growing": m.growing}
              for m in b.memory]
    growing = [m for m in b.memory if m.growing]
    parts = [f"{share:.0%} of the wall time lost to {refusals} KV refusals"] if refusals else []
    if growing:
        worst = max(growing, key=lambda m: m.growth)
        parts.append(f"{worst.name} grows ({worst.pattern}, {worst.growth:+.0%})")
    return "; ".join(parts), {"lost_s": b.kind_seconds()["memory"], "kv_refusals": refusals,
                  "evicted": sum(c.evicted for c in b.calls), "series": series}


def _other(b: Breakdown, share: float) -> tuple[str, dict[str, Any]]:
    parts = b.seconds.get("other", {})
    return (f"orchestration takes {share:.0%} of the wall time: {_top(parts, b.wall_s)}",
            {"seconds_by_part": parts})


EVIDENCE = {"model": _model, "queue": _queue, "tools": _tools, "memory": _memory,
            "other": _other}
