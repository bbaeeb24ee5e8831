"""The critical path of a run: where its wall time went, span by span, when children overlap.

A span's interval is covered by its children's; time no child covers is the span's own ("self")
time. Walking back from the span's end, the path enters the child that ends last (clipped to the
cursor), continues from that child's start, and so on; children that lie wholly inside a stretch
another child already covers ran in parallel and are off the path. The result partitions each
run's wall time (first start to last end of its top spans) into self-time segments, each
attributed to a kind:

- `model` (`prefill`, `decode`; `compute` when the call has no time to first token) and `queue`
  for an LLM call: its first `pyagent.queue_s` seconds waited for admission, prefill runs to
  `pyagent.time_to_first_token_s`, decode to its end;
- `tools`, by tool name (a goal's checks count as the tool `goal check`);
- `memory`: all time inside a span that failed on a KV refusal (`is_memory_error`): the work
  was lost and is repeated;
- `queue` also: all time inside a span that failed because the engine was overloaded (its
  waiting queue full, the request rejected at admission: `is_overload_error`), lost and
  repeated as well;
- `other`: self time of runs, steps, agents and `delegate` calls (orchestration), and gaps
  between a run's top spans (`idle`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyagent.observe.traces import SpanRecord

KINDS = ("model", "queue", "tools", "memory", "other")
MEMORY_ERROR = re.compile(r"kv[ _.-]?budget|out of memory|outofmemory", re.IGNORECASE)
OVERLOAD_ERROR = re.compile(r"overload|engine is busy", re.IGNORECASE)
LOST = {"memory": ("memory", "lost to a KV refusal"),
        "queue": ("queue", "lost to an overloaded engine")}


@dataclass(frozen=True)
class Segment:
    """Seconds of a run's critical path and what they went to: `kind` and a `detail` within it
    (prefill, a tool's name, ...); `span_id` is the span whose self time it is."""

    kind: str
    detail: str
    seconds: float
    span_id: str | None


@dataclass(frozen=True)
class RunPath:
    """One run's critical path: its wall time and the segments that partition it."""

    run_id: str
    start: float
    wall_s: float
    segments: list[Segment]

    def seconds(self) -> dict[str, float]:
        """Seconds per kind."""
        out = dict.fromkeys(KINDS, 0.0)
        for segment in self.segments:
            out[segment.kind] += segment.seconds
        return out


def _error_text(span: SpanRecord) -> str:
    if span.status != "error":
        return ""
    return f"{span.attributes.get('error.type', '')} {span.attributes.get('exception.message', '')}"


def is_memory_error(span: SpanRecord) -> bool:
    """Whether `span` failed on memory pressure: its error type or message names a KV budget
    or running out of memory."""
    return bool(MEMORY_ERROR.search(_error_text(span)))


def is_overload_error(span: SpanRecord) -> bool:
    """Whether `span` failed because the engine turned the request away at admission (an
    `OverloadedError`: its waiting queue full), and not on memory."""
    text = _error_text(span)
    return bool(OVERLOAD_ERROR.search(text)) and not MEMORY_ERROR.search(text)


def lost_to(span: SpanRecord) -> str | None:
    """The kind the time inside a failed `span` is lost to: memory (a KV refusal), queue (an
    overloaded engine), or None (it did not fail so)."""
    return "memory" if is_memory_error(span) else "queue" if is_overload_error(span) else None


def number(attributes: dict[str, Any], key: str) -> float | None:
    """A numeric attribute (None when absent or not a number)."""
    value = attributes.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def critical_path(run_id: str, spans: Iterable[SpanRecord]) -> RunPath:
    """The critical path of one run from its spans (any order). Spans with no start are
    skipped; a span still open (no end) is taken to last until the run's latest time seen."""
    timed = [s for s in spans if s.start is not None]
    if not timed:
        return RunPath(run_id, 0.0, 0.0, [])
    horizon = max(max(s.end or s.start for s in timed), max(s.start for s in timed))
    ends = {s.span_id: _end(s, horizon) for s in timed}
    ids = set(ends)
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for span in timed:
        children[span.parent_id if span.parent_id in ids else None].append(span)
    start = min(s.start for s in children[None])  # type: ignore[type-var]
    end = max(ends[s.span_id] for s in children[None])
    walk = _Walk(children, ends)
    walk.cover(children[None], start, end, ("other", "idle", None), lost=None)
    return RunPath(run_id, start, end - start, walk.segments)


def _end(span: SpanRecord, horizon: float) -> float:
    assert span.start is not None
    if span.end is not None:
        return max(span.end, span.start)
    if span.duration_s is not None:
        return span.start + span.duration_s
    return horizon


class _Walk:
    """One run's walk: children by parent, each span's end, and the segments found."""

    def __init__(self, children: dict[str | None, list[SpanRecord]], ends: dict[str, float]):
        self.children = children
        self.ends = ends
        self.segments: list[Segment] = []

    def cover(self, kids: list[SpanRecord], lo: float, hi: float,
              own: tuple[str, str, str | None], lost: str | None) -> None:
        """Partition [lo, hi] between `kids` (on the path) and `own` self time, back from hi."""
        cursor = hi
        for kid in sorted(kids, key=lambda s: (self.ends[s.span_id], s.start), reverse=True):
            assert kid.start is not None
            if cursor <= lo:
                break
            if kid.start >= cursor:
                continue  # ran in parallel with a child already on the path
            end = min(self.ends[kid.span_id], cursor)
            if end <= lo:
                break
            self._self(own, end, cursor, lost)
            self.span(kid, max(kid.start, lo), end, lost)
            cursor = max(kid.start, lo)
        self._self(own, lo, cursor, lost)

    def span(self, span: SpanRecord, lo: float, hi: float, lost: str | None) -> None:
        """Walk `span` over [lo, hi], the part of it on the path; `lost`: the kind the time of
        a failed span around it is lost to."""
        lost = lost or lost_to(span)
        kids = self.children.get(span.span_id, [])
        if kids:
            self.cover(kids, lo, hi, (*_own(span), span.span_id), lost)
        elif span.kind == "llm_call" and not lost:
            self._call(span, lo, hi)
        else:
            self._self((*_own(span), span.span_id), lo, hi, lost)

    def _call(self, span: SpanRecord, lo: float, hi: float) -> None:
        """An LLM call's time on the path, split at its queue and first-token marks."""
        assert span.start is not None
        queue = max(0.0, number(span.attributes, "pyagent.queue_s") or 0.0)
        ttft = number(span.attributes, "pyagent.time_to_first_token_s")
        marks = [("queue", "admission", span.start + queue)]
        if ttft is None:
            marks.append(("model", "compute", self.ends[span.span_id]))
        else:
            marks += [("model", "prefill", span.start + max(ttft, queue)),
                      ("model", "decode", self.ends[span.span_id])]
        begin = span.start
        for kind, detail, mark in marks:
            self._self((kind, detail, span.span_id), max(lo, begin), min(hi, mark), None)
            begin = mark

    def _self(self, own: tuple[str, str, str | None], lo: float, hi: float,
              lost: str | None) -> None:
        if hi > lo:
            kind, detail, span_id = (*LOST[lost], own[2]) if lost else own
            self.segments.append(Segment(kind, detail, hi - lo, span_id))


def _own(span: SpanRecord) -> tuple[str, str]:
    """The kind and detail a span's self time goes to."""
    if span.kind == "tool_call":
        tool = str(span.attributes.get("gen_ai.tool.name") or span.name)
        return ("other", "delegate") if tool == "delegate" else ("tools", tool)
    if span.kind == "goal":
        return "tools", "goal check"
    if span.kind == "llm_call":  # a call with children (not one PyAgent writes)
        return "model", "compute"
    return "other", span.kind
