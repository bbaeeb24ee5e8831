"""One stored run as the API shows it: its summary, its span tree and its lineage."""

from __future__ import annotations

from typing import Any

from pyagent.observe.redact import Redactor
from pyagent.observe.schema import (
    Figures,
    Lineage,
    LineageNode,
    RunDetail,
    RunSummary,
    SpanTree,
)
from pyagent.observe.topology import OUTCOME, SUCCEEDED, TOKENS, Pricer, Topology, model_of
from pyagent.observe.traces import RunRecord, SpanRecord, TraceReader

LINEAGE_KINDS = ("run", "step", "agent", "subagent")


def run_summary(reader: TraceReader, record: RunRecord, pricer: Pricer | None) -> RunSummary:
    """A run's status, times and totals (tokens and cost of its LLM calls)."""
    return _summary(record, reader.spans(record.run_id), pricer)


def _summary(record: RunRecord, spans: list[SpanRecord], pricer: Pricer | None) -> RunSummary:
    llm = [s for s in spans if s.kind == "llm_call" and s.status == "ok"]
    costs = [c for s in llm if (c := _cost(s, pricer)) is not None]
    run = next((s for s in reversed(spans) if s.kind == "run"), None)
    outcome = run.attributes.get(OUTCOME) if run is not None else None
    status = outcome if isinstance(outcome, str) and record.status == "ok" else record.status
    return RunSummary(
        run_id=record.run_id, name=record.name.removeprefix("run "), status=status,
        start=record.start, end=record.end,
        duration_s=None if record.start is None or record.end is None
        else record.end - record.start,
        llm_calls=sum(s.kind == "llm_call" for s in spans),
        tool_calls=sum(s.kind == "tool_call" for s in spans),
        errors=sum(s.status in ("error", "interrupted") for s in spans),
        **{name: sum(_int(s.attributes.get(key)) or 0 for s in llm) for name, key in TOKENS},
        cost_usd=sum(costs) if costs else None)


def run_detail(reader: TraceReader, record: RunRecord, pricer: Pricer | None,
               redactor: Redactor) -> RunDetail:
    """The run's spans as a tree, in the order they started."""
    spans = reader.spans(record.run_id)
    nodes: dict[str, SpanTree] = {}
    roots: list[SpanTree] = []
    for span in spans:
        attributes = span.attributes
        ok_llm = span.kind == "llm_call" and span.status == "ok"
        outcome = attributes.get(OUTCOME) if span.kind == "run" else None
        missed = span.status == "ok" and isinstance(outcome, str) and outcome != SUCCEEDED
        nodes[span.span_id] = SpanTree(  # a run that missed its goal is not ok
            span_id=span.span_id, parent_id=span.parent_id, kind=span.kind, name=span.name,
            status="error" if missed else span.status, start=span.start, end=span.end,
            duration_s=span.duration_s,
            **{name: _int(attributes.get(key)) if ok_llm else None for name, key in TOKENS},
            cost_usd=_cost(span, pricer) if ok_llm else None,
            error=redactor.value(attributes.get("exception.message"))
            if span.status != "ok" else None,
            attributes=redactor.attributes(attributes))
    for span in spans:
        parent = nodes.get(span.parent_id or "")
        (parent.children if parent is not None else roots).append(nodes[span.span_id])
    return RunDetail(run=_summary(record, spans, pricer), spans=roots)


def lineage(reader: TraceReader, record: RunRecord, pricer: Pricer | None) -> Lineage:
    """Run -> step -> agent -> sub-agent, folded from the run's events as the live topology
    folds them, so both agree; every span of a level is listed under it."""
    topology = Topology(pricer)
    span_ids: dict[str, list[str]] = {}
    for event in reader.events(record.run_id):
        touch = topology.fold(event)
        if event.phase == "start" and touch.node is not None:
            span_ids.setdefault(touch.node, []).append(event.span_id)
    nodes = {node_id: LineageNode(
        id=node_id, kind=state.kind, name=state.label,  # type: ignore[arg-type]
        status="running" if state.active else state.outcome or state.status,
        span_ids=span_ids.get(node_id, []), figures=state.view().figures)
        for node_id, state in topology.nodes.items() if state.kind in LINEAGE_KINDS}
    placed: set[str] = set()
    for edge in topology.edges.values():  # in the order they were first travelled
        if edge.kind in ("contains", "delegates") and edge.source in nodes \
                and edge.target in nodes and edge.target not in placed:
            nodes[edge.source].children.append(nodes[edge.target])
            placed.add(edge.target)
    root = nodes.get(f"run:{record.run_id}") or LineageNode(
        id=f"run:{record.run_id}", kind="run", name=record.name, status=record.status,
        span_ids=[], figures=Figures())
    return Lineage(run_id=record.run_id, root=root)


def _cost(span: SpanRecord, pricer: Pricer | None) -> float | None:
    if pricer is None:
        return None
    return pricer(model_of(span.name, span.attributes), span.attributes)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
