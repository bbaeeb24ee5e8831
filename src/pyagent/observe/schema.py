"""The observability API's documents, as pydantic models (their JSON Schema is served at
`/api/observability/schema`).

Version 1. A snapshot is the fleet's topology (nodes and edges with live figures), its health,
alerts and metrics; run documents are the span tree and the lineage of one run. Every figure comes
from the trace store or from gauges that running processes sampled into it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

VERSION = 1

NodeKind = Literal["run", "step", "agent", "subagent", "tool", "backend"]
EdgeKind = Literal["contains", "next", "delegates", "calls", "uses"]
Status = Literal["running", "ok", "error", "interrupted"]


class Figures(BaseModel):
    """What a node did: its spans (`calls`), failed spans, tokens and cost of the LLM calls in
    it, latency of its spans, and KV bytes (an agent: the most any of its calls held at once; a
    backend: what its engines hold now)."""

    calls: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = Field(None, description="None while no call had a known price")
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    kv_bytes: int | None = None


class RecentSpan(BaseModel):
    span_id: str
    run_id: str
    name: str
    status: Status
    start: float | None
    duration_s: float | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None


class Node(BaseModel):
    """One thing in the fleet. Runs, steps and agents belong to a run; tools and backends are
    shared by every run that uses them."""

    id: str
    kind: NodeKind
    label: str
    run_id: str | None
    status: Status
    first_seen: float
    last_seen: float
    figures: Figures
    outcome: str | None = Field(
        None, description="a run's outcome: succeeded, goal_not_met or error (its status is "
                          "then error unless it succeeded)")
    definition: dict[str, Any] | None = Field(
        None, description="an agent's definition from its run's manifest")
    recent: list[RecentSpan] = Field(default_factory=list,
                                     description="its latest spans, newest last")


class Edge(BaseModel):
    """`contains` run->step, `next` step->step, `delegates` step->agent and agent->sub-agent,
    `calls` agent->tool, `uses` agent->backend; `count` spans went along it, the last at
    `last_at`."""

    source: str
    target: str
    kind: EdgeKind
    count: int
    last_at: float


class Check(BaseModel):
    name: str
    status: str
    score: float | None
    value: float | None
    target: float


class Health(BaseModel):
    status: str
    score: float | None
    checks: list[Check]
    capped_by: list[str]


class AlertView(BaseModel):
    name: str
    state: str
    severity: str | None
    summary: str
    labels: dict[str, str]
    value: float | None
    active_since: float | None


class Totals(BaseModel):
    """Calls, failed spans, and tokens and cost of the LLM calls that succeeded (cost None while
    no call had a known price)."""

    llm_calls: int
    tool_calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: float | None


class Metrics(Totals):
    """Fleet totals over every event the observer has read, and the gauges of processes alive
    now (the engines' KV bytes and scheduler queues)."""

    runs: int
    running_runs: int
    tokens_per_s: float = Field(description="output tokens of LLM calls that ended in the last "
                                            "10 s, per second")
    kv_bytes: int
    kv_capacity_bytes: int
    queue_waiting: int
    requests_running: int
    sources: int = Field(description="processes whose gauges are live")


class Point(BaseModel):
    """One second of the live charts."""

    t: float
    tokens_per_s: float
    cost_usd: float | None
    kv_bytes: int
    queue_waiting: int
    health_score: float | None


class Source(BaseModel):
    """Where the observer reads, and whether it can."""

    data_dir: str
    status: Literal["ok", "unavailable"]
    message: str | None
    last_event_id: int
    events_read: int
    events_skipped: int = Field(0, description="stored events too damaged to show")


class StreamStats(BaseModel):
    clients: int
    delivered: int
    dropped: int = Field(description="events dropped from full client buffers (each was re-read "
                                      "from the store, so clients saw no gap)")


class Snapshot(BaseModel):
    version: int = VERSION
    generated_at: float
    source: Source
    nodes: list[Node]
    edges: list[Edge]
    health: Health
    alerts: list[AlertView]
    metrics: Metrics
    series: list[Point]
    stream: StreamStats


class RunSummary(Totals):
    run_id: str
    name: str
    status: str
    start: float | None
    end: float | None
    duration_s: float | None


class RunList(BaseModel):
    version: int = VERSION
    runs: list[RunSummary]


class SpanTree(BaseModel):
    """One span with its children; `attributes` are as recorded (secrets masked), including tool
    arguments and results."""

    span_id: str
    parent_id: str | None
    kind: str
    name: str
    status: str
    start: float | None
    end: float | None
    duration_s: float | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    cost_usd: float | None = None
    error: str | None = None
    attributes: dict[str, Any]
    children: list[SpanTree] = Field(default_factory=list)


class RunDetail(BaseModel):
    version: int = VERSION
    run: RunSummary
    spans: list[SpanTree]


class LineageNode(BaseModel):
    """Run -> step -> agent -> sub-agent: each level's spans merged by name, with their
    figures."""

    id: str
    kind: Literal["run", "step", "agent", "subagent"]
    name: str
    status: str
    span_ids: list[str]
    figures: Figures
    children: list[LineageNode] = Field(default_factory=list)


class Lineage(BaseModel):
    version: int = VERSION
    run_id: str
    root: LineageNode


class ErrorBody(BaseModel):
    message: str
    type: str


class Error(BaseModel):
    error: ErrorBody
