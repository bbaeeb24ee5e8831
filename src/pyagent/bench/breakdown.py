"""Where the time went: the critical-path breakdown of a trace store's runs, or of a benchmark
suite's attempts, with the LLM calls, tool outputs and memory series the bottleneck and
opportunity analyses read.

From traces, time is critical-path time (`critical_path`), summed over the runs. From suite
results, attempts may overlap and carry no start times, so time is request time: each attempt's
latency split into queue (`queue_s`), prefill (`ttft_s` - `queue_s`) and decode (`latency_s` -
`ttft_s`), or all of it lost to memory when its error is a KV refusal, or to queue when the
engine was overloaded.

Memory series: the engine's KV bytes gauge (from the trace store's samples, within the runs'
time) or the suite's RSS and KV samples, each classified by `trend.classify`. A series keeps
growing when its shape is linear, exponential or a step up, and no sharp fall gives back half
of its rise or more: memory that climbs while a run's conversation grows and is released when
the run ends is used, not kept.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.bench.critical_path import (
    KINDS,
    LOST,
    MEMORY_ERROR,
    OVERLOAD_ERROR,
    RunPath,
    critical_path,
    is_memory_error,
    is_overload_error,
    number,
)
from pyagent.bench.memory import RSS_RESOLUTION
from pyagent.bench.results import load_json, suite_records
from pyagent.errors import ConfigError
from pyagent.observe.metrics.trend import classify
from pyagent.observe.traces import Sample, SpanRecord, TraceReader

GROWING = ("linear", "exponential", "step")  # patterns of a series that keeps growing
FULL_KV = 0.95  # KV bytes at or above this share of capacity: the budget is full
RELEASED = 0.5  # a sharp fall giving back this share of a series' rise: memory released
KV_GAUGE, KV_CAPACITY = "pyagent_kv_bytes", "pyagent_kv_capacity_bytes"
MAX_ANCESTORS = 64


@dataclass(frozen=True)
class Call:
    """One LLM request. Calls with the same `conversation` extend one prompt (None: the call
    stands alone); `on_path` is the share of its time on its run's critical path."""

    run_id: str
    conversation: str | None
    step: str | None
    start: float
    duration_s: float
    queue_s: float
    prefill_s: float | None  # None: no time to first token recorded
    decode_s: float | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    on_path: float
    memory_error: bool  # failed on a KV refusal
    evicted: float  # what attributes naming eviction report (0 when none do)
    overloaded: bool = False  # rejected by an overloaded engine (its queue full)


@dataclass(frozen=True)
class ToolOutput:
    """One tool result a later prompt carries: its size in characters and when it came."""

    run_id: str
    step: str | None
    end: float
    chars: int


@dataclass(frozen=True)
class MemorySeries:
    """A memory gauge over time and its shape: `growth` is the rise from the first to the last
    level (medians of the first and last fifth) over the first level, or over the capacity
    when it is known; `released` the deepest sharp fall (`classify`'s drops) on the same
    scale; `full_share` the share of samples at FULL_KV of capacity or more."""

    name: str
    samples: int
    pattern: str
    reason: str
    first: float
    last: float
    peak: float
    growth: float
    full_share: float | None
    released: float = 0.0

    @property
    def growing(self) -> bool:
        """Whether the series keeps growing: a growing shape, and no sharp fall giving back
        RELEASED of the rise or more."""
        return self.pattern in GROWING and self.growth > 0 and \
            self.released < RELEASED * self.growth


@dataclass
class Breakdown:
    """Seconds per kind and detail (`seconds["model"]["decode"]`) over `wall_s`, the summed
    critical paths of `units` runs (or the summed latency of `units` attempts)."""

    source: str
    units: int
    wall_s: float
    seconds: dict[str, dict[str, float]]
    calls: list[Call]
    operations: int  # LLM and tool calls
    errors: int  # ... of which failed
    tool_outputs: list[ToolOutput] = field(default_factory=list)
    memory: list[MemorySeries] = field(default_factory=list)
    elapsed_s: float | None = None  # first start to last end of the runs
    concurrency: float | None = None  # mean LLM calls in flight while any is
    peak_concurrency: int | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def kind_seconds(self) -> dict[str, float]:
        return {kind: sum(self.seconds.get(kind, {}).values()) for kind in KINDS}

    def share(self, kind: str, detail: str | None = None) -> float:
        """Share of the wall time spent in `kind` (and `detail`)."""
        parts = self.seconds.get(kind, {})
        seconds = sum(parts.values()) if detail is None else parts.get(detail, 0.0)
        return seconds / self.wall_s if self.wall_s > 0 else 0.0


def from_traces(path: str | Path, run_ids: Sequence[str] | None = None) -> Breakdown:
    """The breakdown of the runs in a trace store (a `traces.db`, or a data folder holding
    one): all of them, or `run_ids`."""
    path = Path(path)
    if path.is_dir():
        path = path / "traces.db"
    with TraceReader(path) as reader:
        known = [run.run_id for run in reversed(reader.runs())]
        if not known:
            raise ConfigError(f"{path}: the trace store holds no runs")
        missing = [run for run in run_ids or () if run not in known]
        if missing:
            raise ConfigError(f"{path}: no run {', '.join(map(repr, missing))} in the trace store")
        spans = {run: reader.spans(run) for run in (run_ids or known)}
        samples = _samples(reader)
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls, outputs, runs, paths = [], [], [], []
    for run_id, run_spans in spans.items():
        found = critical_path(run_id, run_spans)
        paths.append(found)
        for segment in found.segments:
            seconds[segment.kind][segment.detail] += segment.seconds
        runs.append({"run_id": run_id, "wall_s": found.wall_s, "seconds": found.seconds()})
        run_calls, run_outputs = _run_calls(run_spans, found)
        calls += run_calls
        outputs += run_outputs
    operations = [s for run in spans.values() for s in run if s.kind in ("llm_call", "tool_call")]
    intervals = [(c.start, c.start + c.duration_s) for c in calls]
    mean, peak = _concurrency(intervals)
    starts = [p.start for p in paths if p.wall_s > 0]
    window = (min(starts, default=0.0), max((p.start + p.wall_s for p in paths), default=0.0))
    return Breakdown("traces", len(spans), sum(p.wall_s for p in paths), _plain(seconds), calls,
                     len(operations), sum(s.status == "error" for s in operations),
                     outputs, _kv_series(samples, window), window[1] - window[0], mean, peak,
                     runs)


def from_suite(paths: Sequence[str | Path]) -> Breakdown:
    """The breakdown of the attempts in benchmark-suite results (request time, see above)."""
    seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    calls, memory, errors = [], [], 0
    for path in paths:
        data = load_json(path)
        for record in suite_records(path, data):
            call = _attempt(record)
            calls.append(call)
            errors += bool(record.get("error"))
            if call.memory_error or call.overloaded:
                kind, detail = LOST["memory" if call.memory_error else "queue"]
                seconds[kind][detail] += call.duration_s
                continue
            seconds["queue"]["admission"] += call.queue_s
            if call.prefill_s is None or call.decode_s is None:
                seconds["model"]["compute"] += call.duration_s - call.queue_s
            else:
                seconds["model"]["prefill"] += call.prefill_s
                seconds["model"]["decode"] += call.decode_s
        memory += _suite_memory(Path(path).name, data.get("memory"))
    return Breakdown("suite", len(calls), sum(c.duration_s for c in calls), _plain(seconds),
                     calls, len(calls), errors, memory=memory)


def memory_series(name: str, times: Sequence[float], values: Sequence[float],
                  capacity: float | None = None) -> MemorySeries:
    """Classify one memory gauge (bytes) over time."""
    pattern = classify(values, times, resolution=RSS_RESOLUTION)
    array = np.asarray(values, dtype=float)
    fifth = max(1, array.size // 5)
    first, last = float(np.median(array[:fifth])), float(np.median(array[-fifth:]))
    base = capacity if capacity else max(first, 1.0)
    full = float(np.mean(array >= FULL_KV * capacity)) if capacity else None
    released = max((-drop.size for drop in pattern.drops), default=0.0) / base
    return MemorySeries(name, int(array.size), pattern.kind, pattern.reason, first, last,
                        float(array.max()), (last - first) / base, full, released)


def _plain(seconds: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {kind: dict(sorted(parts.items(), key=lambda kv: -kv[1]))
            for kind, parts in seconds.items()}


def _attempt(record: dict[str, Any]) -> Call:
    """A suite attempt as a standalone call."""
    latency = float(record["latency_s"])
    queue = min(latency, max(0.0, number(record, "queue_s") or 0.0))
    ttft = number(record, "ttft_s")
    prefill = None if ttft is None else max(0.0, min(ttft, latency) - queue)
    decode = None if ttft is None else max(0.0, latency - max(ttft, queue))
    error = str(record.get("error") or "")
    memory = bool(MEMORY_ERROR.search(error))

    def count(key: str) -> int:
        return int(number(record, key) or 0)

    return Call(str(record.get("item_id", "")), None, None, 0.0, latency, queue, prefill, decode,
                count("prompt_tokens"), count("cached_tokens"), count("completion_tokens"), 1.0,
                memory, 0.0, not memory and bool(OVERLOAD_ERROR.search(error)))


def _run_calls(spans: list[SpanRecord], path: RunPath) -> tuple[list[Call], list[ToolOutput]]:
    """A run's LLM calls (with their share on the critical path) and tool outputs."""
    by_id = {s.span_id: s for s in spans}
    run_span = next((s for s in spans if s.kind == "run"), None)
    sequenced = run_span is not None and run_span.attributes.get("pyagent.mode") == "sequenced"
    on_path: dict[str, float] = defaultdict(float)
    for segment in path.segments:
        if segment.span_id is not None:
            on_path[segment.span_id] += segment.seconds
    calls, outputs = [], []
    for span in spans:
        if span.start is None or span.duration_s is None:
            continue
        step = _ancestor(span, by_id, "step")
        if span.kind == "tool_call":
            chars = number(span.attributes, "pyagent.tool.output_chars")
            if chars is not None:
                outputs.append(ToolOutput(span.run_id, step, span.start + span.duration_s,
                                          int(chars)))
            continue
        if span.kind != "llm_call":
            continue
        attributes = span.attributes
        duration = span.duration_s
        queue = min(duration, max(0.0, number(attributes, "pyagent.queue_s") or 0.0))
        ttft = number(attributes, "pyagent.time_to_first_token_s")
        agent = _ancestor(span, by_id, "agent")
        top_agent = agent is not None and by_id[agent].parent_id == step
        conversation = span.run_id if sequenced and top_agent else agent
        calls.append(Call(
            span.run_id, conversation, step, span.start, duration, queue,
            None if ttft is None else max(0.0, min(ttft, duration) - queue),
            None if ttft is None else max(0.0, duration - max(ttft, queue)),
            int(number(attributes, "gen_ai.usage.input_tokens") or 0),
            int(number(attributes, "pyagent.usage.cached_tokens") or 0),
            int(number(attributes, "gen_ai.usage.output_tokens") or 0),
            min(1.0, on_path[span.span_id] / duration) if duration > 0 else 0.0,
            is_memory_error(span),
            sum(v for k, v in attributes.items() if "evict" in k and number(attributes, k)),
            is_overload_error(span)))
    return calls, outputs


def _ancestor(span: SpanRecord, by_id: dict[str, SpanRecord], kind: str) -> str | None:
    """The id of the nearest ancestor of `kind` (None when there is none)."""
    current = by_id.get(span.parent_id or "")
    for _ in range(MAX_ANCESTORS):
        if current is None:
            return None
        if current.kind == kind:
            return current.span_id
        current = by_id.get(current.parent_id or "")
    return None


def _concurrency(intervals: list[tuple[float, float]]) -> tuple[float | None, int | None]:
    """Mean calls in flight over the time at least one is, and the most at once."""
    if not intervals:
        return None, None
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    busy = total = 0.0
    level = peak = 0
    previous = edges[0][0]
    for time, step in edges:
        if level > 0:
            busy += time - previous
            total += level * (time - previous)
        level += step
        peak = max(peak, level)
        previous = time
    return (total / busy if busy > 0 else 1.0), peak


def _samples(reader: TraceReader) -> list[Sample]:
    out: list[Sample] = []
    cursor = 0
    while batch := reader.samples_after(cursor):
        out += [s for s in batch if s.name in (KV_GAUGE, KV_CAPACITY)]
        cursor = batch[-1].id
    return out


def _kv_series(samples: list[Sample], window: tuple[float, float]) -> list[MemorySeries]:
    """One series per engine (source and labels) of KV bytes within `window`."""
    series: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    capacity: dict[tuple[str, str], float] = {}
    for sample in samples:
        if not window[0] <= sample.timestamp <= window[1]:
            continue
        key = (sample.source, json.dumps(sample.labels, sort_keys=True))
        if sample.name == KV_CAPACITY:
            capacity[key] = max(capacity.get(key, 0.0), sample.value)
        else:
            series[key][sample.timestamp] = sample.value
    out = []
    for key, points in series.items():
        if len(points) >= 2:
            times = sorted(points)
            labels = json.loads(key[1])
            out.append(memory_series(f"KV bytes, {labels.get('model', key[0])}", times,
                                     [points[t] for t in times], capacity.get(key) or None))
    return out


def _suite_memory(name: str, memory: Any) -> list[MemorySeries]:
    """RSS and KV series of one suite result's memory samples."""
    samples = memory.get("samples") if isinstance(memory, dict) else None
    if not isinstance(samples, list):
        return []
    points = {float(s["t"]): s for s in samples if isinstance(s, dict) and "t" in s}
    times = sorted(points)
    out = []
    for field_name in ("rss", "kv"):
        values = [points[t].get(field_name) for t in times]
        kept = [(t, float(v)) for t, v in zip(times, values, strict=True) if v is not None]
        if len(kept) >= 2:
            out.append(memory_series(f"{field_name.upper()} bytes, {name}",
                                     [t for t, _ in kept], [v for _, v in kept]))
    return out
