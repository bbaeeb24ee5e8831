"""Levers PyAgent has against what the breakdown shows, each with a saving estimated from the
data, the flag that applies it, and, given a second breakdown measured with levers applied, the
measured change of the figure each lever moves.

Estimates (seconds of critical path, or request time for suite results):
- precision, `--dtype int8`: decode seconds x (1 - 1 / `int8_decode_ratio`);
- prefix caching, `--prefix-sharing`: in each conversation (a sequenced run; otherwise one
  agent turn), a call repeats the previous call's prompt and output; the repeated tokens not
  served from cache x measured prefill seconds per uncached prompt token, weighted by each
  call's share on the critical path;
- compaction, `--compact-keep N`: where a run's prompt tokens grow (Mann-Kendall, p < 0.05,
  over its calls that report usage), each call's prompt carries earlier steps' tool results;
  all but the N newest would shrink to about `compact_min_chars`: those characters /
  `chars_per_token` x the call's uncached share x the prefill seconds per token, weighted as
  above;
- batching, `--max-batch N` (twice the larger of the peak calls in flight and `batch_slots`):
  queue seconds (waiting for a batch slot or the KV budget), all saved if every request were
  admitted at once (an upper bound); `--concurrency N`: runs that ran one at a time (mean
  calls in flight under 1.5) could share the engine, N = min(runs, `batch_slots`) at once:
  model seconds x (1 - 1 / speedup(N)), speedup(N) interpolated linearly from 1 at one stream
  to `batch_speedup` at `batch_slots`;
- KV eviction, `--kv-policy pyagent --kv-budget 0.5`: seconds lost to KV refusals (attempts
  failed and repeated), not lost when the engine evicts down to a budget instead.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pyagent.bench.breakdown import Breakdown, Call
from pyagent.fleet.turn import TOOL_OUTPUT_CHARS
from pyagent.observe.metrics.trend import MIN_TREND_POINTS, mann_kendall

MIN_SHARE = 0.01  # opportunities saving less than this share of the wall time are not listed
GROWTH_ALPHA = 0.05  # Mann-Kendall significance of prompt growth over a run's calls
SERIAL_CONCURRENCY = 1.5  # mean LLM calls in flight below which runs ran one at a time


@dataclass(frozen=True)
class Levers:
    """Parameters of the estimates. Defaults measured in BENCHMARKS.md on the 2-core CPU:
    int8 decodes 28.9 tok/s against float32's 17.8 (engine section); 8 concurrent float32
    streams (`batch_slots`, the engine's default batch) get 2.65x one stream's throughput
    (batching section); compaction's defaults are `Compaction`'s."""

    int8_decode_ratio: float = 1.62
    batch_speedup: float = 2.65
    batch_slots: int = 8
    compact_keep: int = 2
    compact_min_chars: int = 200
    chars_per_token: float = 4.0
    kv_budget: float = 0.5


@dataclass(frozen=True)
class Measured:
    """The figure a lever moves, before and after applying levers."""

    figure: str
    before: float
    after: float
    change: float  # after / before - 1


@dataclass(frozen=True)
class Opportunity:
    lever: str
    flag: str
    saving_s: float
    share: float  # of the wall time
    figure: str  # what applying it should lower (see FIGURES)
    evidence: dict[str, Any]
    method: str
    measured: Measured | None = None


FIGURES = {  # per unit: a run (traces) or an attempt (suite results)
    "decode_s": "decode seconds per unit",
    "prefill_s": "prefill seconds per unit",
    "queue_s": "queue seconds per unit",
    "memory_s": "seconds lost to KV refusals per unit",
    "prompt_tokens": "prompt tokens per call",
    "elapsed_s": "elapsed seconds, first start to last end",
}


def opportunities(breakdown: Breakdown, levers: Levers = Levers()) -> list[Opportunity]:
    """The levers worth pulling, largest estimated saving first."""
    found = [_precision(breakdown, levers), _prefix(breakdown), _compaction(breakdown, levers),
             _admission(breakdown, levers), _concurrency(breakdown, levers), _eviction(breakdown,
                                                                                      levers)]
    return sorted((o for o in found if o is not None and o.share >= MIN_SHARE),
                  key=lambda o: -o.saving_s)


def figure(breakdown: Breakdown, name: str) -> float:
    """One of FIGURES measured on `breakdown`."""
    units = max(breakdown.units, 1)
    seconds = breakdown.seconds
    if name == "prompt_tokens":
        return float(np.mean([c.prompt_tokens for c in breakdown.calls])) if breakdown.calls \
            else 0.0
    if name == "elapsed_s":
        return breakdown.elapsed_s if breakdown.elapsed_s is not None else breakdown.wall_s
    part = {"decode_s": ("model", "decode"), "prefill_s": ("model", "prefill")}.get(name)
    if part:
        return seconds.get(part[0], {}).get(part[1], 0.0) / units
    return breakdown.kind_seconds()[name.removesuffix("_s")] / units


def measure(found: list[Opportunity], before: Breakdown, after: Breakdown) -> list[Opportunity]:
    """`found` with the measured change of each one's figure from `before` to `after`."""
    out = []
    for opportunity in found:
        old, new = figure(before, opportunity.figure), figure(after, opportunity.figure)
        change = new / old - 1 if old > 0 else 0.0
        out.append(replace(opportunity, measured=Measured(FIGURES[opportunity.figure], old, new,
                                                          change)))
    return out


def prefill_rate(calls: list[Call]) -> float | None:
    """Measured prefill seconds per uncached prompt token (None without such calls)."""
    timed = [c for c in calls if c.prefill_s is not None and c.prompt_tokens > c.cached_tokens]
    tokens = sum(c.prompt_tokens - c.cached_tokens for c in timed)
    return sum(c.prefill_s for c in timed) / tokens if tokens else None  # type: ignore[misc]


def _made(breakdown: Breakdown, lever: str, flag: str, saving: float, figure_name: str,
          evidence: dict[str, Any], method: str) -> Opportunity:
    share = saving / breakdown.wall_s if breakdown.wall_s > 0 else 0.0
    return Opportunity(lever, flag, saving, share, figure_name, evidence, method)


def _precision(b: Breakdown, levers: Levers) -> Opportunity | None:
    decode = b.seconds.get("model", {}).get("decode", 0.0)
    if decode <= 0:
        return None
    output = sum(c.output_tokens for c in b.calls if c.decode_s)
    rate = output / sum(c.decode_s for c in b.calls if c.decode_s) if output else None
    return _made(b, "precision", "--dtype int8", decode * (1 - 1 / levers.int8_decode_ratio),
                 "decode_s", {"decode_s": decode, "decode_share": b.share("model", "decode"),
                              "decode_tok_s": rate, "int8_ratio": levers.int8_decode_ratio},
                 f"decode seconds x (1 - 1/{levers.int8_decode_ratio:g}), int8's measured "
                 "decode speed over float32 (a float32 run)")


def _conversations(calls: list[Call]) -> dict[str, list[Call]]:
    out: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        if call.conversation is not None:
            out[call.conversation].append(call)
    return {key: sorted(group, key=lambda c: c.start) for key, group in out.items()}


def _prefix(b: Breakdown) -> Opportunity | None:
    rate = prefill_rate(b.calls)
    if rate is None:
        return None
    repeated = saving = 0.0
    for group in _conversations(b.calls).values():
        for previous, call in itertools.pairwise(group):
            carried = previous.prompt_tokens + previous.output_tokens
            tokens = max(0, min(call.prompt_tokens, carried) - call.cached_tokens)
            repeated += tokens
            saving += tokens * rate * call.on_path
    if not repeated:
        return None
    return _made(b, "prefix caching", "--prefix-sharing", saving, "prefill_s",
                 {"repeated_uncached_tokens": int(repeated),
                  "prompt_tokens": sum(c.prompt_tokens for c in b.calls),
                  "cached_tokens": sum(c.cached_tokens for c in b.calls),
                  "prefill_s_per_token": rate},
                 "prompt tokens repeating the conversation's previous call but not served from "
                 "cache x measured prefill seconds per token")


def _compaction(b: Breakdown, levers: Levers) -> Opportunity | None:
    rate = prefill_rate(b.calls)
    if rate is None or not b.tool_outputs:
        return None
    by_run: dict[str, list[Call]] = defaultdict(list)
    for call in b.calls:
        by_run[call.run_id].append(call)
    tokens = saving = 0.0
    slopes = []
    for run_id, found in by_run.items():
        calls = sorted((c for c in found if c.prompt_tokens > 0), key=lambda c: c.start)
        if len(calls) < MIN_TREND_POINTS:
            continue
        trend = mann_kendall([c.prompt_tokens for c in calls], alpha=GROWTH_ALPHA)
        if trend.direction != "increasing":
            continue
        slopes.append(trend.slope)
        outputs = sorted((o for o in b.tool_outputs if o.run_id == run_id), key=lambda o: o.end)
        for call in calls:
            earlier = [o for o in outputs if o.end <= call.start and o.step != call.step]
            old = earlier[:len(earlier) - levers.compact_keep] if levers.compact_keep else earlier
            chars = sum(max(0, min(o.chars, TOOL_OUTPUT_CHARS) - levers.compact_min_chars)
                        for o in old)
            elided = chars / levers.chars_per_token
            uncached = 1 - call.cached_tokens / call.prompt_tokens if call.prompt_tokens else 0.0
            tokens += elided
            saving += elided * uncached * rate * call.on_path
    if not tokens:
        return None
    return _made(b, "compaction", f"--compact-keep {levers.compact_keep}", saving,
                 "prompt_tokens",
                 {"growing_runs": len(slopes), "prompt_growth_per_call": float(np.median(slopes)),
                  "prompt_tokens_saved": int(tokens), "prefill_s_per_token": rate},
                 f"earlier steps' tool results beyond the {levers.compact_keep} newest, cut to "
                 f"{levers.compact_min_chars} characters, at {levers.chars_per_token:g} "
                 "characters a token x the uncached share x prefill seconds per token")


def _admission(b: Breakdown, levers: Levers) -> Opportunity | None:
    queue = b.kind_seconds()["queue"]
    waits = [c.queue_s for c in b.calls if c.queue_s > 0]
    if queue <= 0 or not waits:
        return None
    slots = 2 * max(b.peak_concurrency or 0, levers.batch_slots)
    return _made(b, "batching", f"--max-batch {slots}", queue, "queue_s",
                 {"queue_s": queue, "calls_waited": len(waits), "calls": len(b.calls),
                  "median_wait_s": float(np.median(waits)),
                  "p95_wait_s": float(np.quantile(waits, 0.95)),
                  "peak_concurrency": b.peak_concurrency},
                 "queue seconds on the critical path, all saved if every request were admitted "
                 "at once (an upper bound: a wider batch decodes each stream a little slower)")


def _concurrency(b: Breakdown, levers: Levers) -> Opportunity | None:
    if b.units < 2 or b.concurrency is None or b.concurrency >= SERIAL_CONCURRENCY:
        return None
    model = b.kind_seconds()["model"]
    streams = min(b.units, levers.batch_slots)
    speedup = 1 + (levers.batch_speedup - 1) * (streams - 1) / max(levers.batch_slots - 1, 1)
    return _made(b, "batching", f"--concurrency {streams}", model * (1 - 1 / speedup),
                 "elapsed_s",
                 {"runs": b.units, "mean_calls_in_flight": b.concurrency, "model_s": model,
                  "speedup": speedup},
                 f"{b.units} runs ran one at a time; {streams} at once share each decode pass: "
                 f"model seconds x (1 - 1/{speedup:.2f}), the aggregate speedup measured at "
                 f"{levers.batch_slots} streams ({levers.batch_speedup:g}x), interpolated")


def _eviction(b: Breakdown, levers: Levers) -> Opportunity | None:
    lost = b.kind_seconds()["memory"]
    refusals = sum(c.memory_error for c in b.calls)
    if lost <= 0:
        return None
    return _made(b, "KV eviction", f"--kv-policy pyagent --kv-budget {levers.kv_budget:g}", lost,
                 "memory_s", {"lost_s": lost, "kv_refusals": refusals,
                              "evicted": sum(c.evicted for c in b.calls)},
                 "seconds lost to KV refusals (failed attempts repeated), kept when the engine "
                 "evicts down to a budget instead of refusing")
