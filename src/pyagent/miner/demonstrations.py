"""Demonstrations from verified successes: what an agent did, step by step, in a run whose
outcome the task's checker accepted; or, for a task whose fix the suite knows, that fix run as the
agent's own tool calls on a copy of the task's files and accepted by the same checker
(`from_reference`).

A step's demonstration is its agent's successful tool calls in order, with their arguments and
results as the trace recorded them, and the agent's answer. A step whose calls' arguments or
results were clipped in the trace (longer than it keeps) gives none: a demonstration must show
exactly what worked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyagent.fleet.agent import AgentSpec, Demonstration, DemoStep
from pyagent.fleet.tools.base import ToolContext, ToolError, Workspace
from pyagent.fleet.tools.registry import make_tool
from pyagent.fleet.turn import TOOL_OUTPUT_CHARS
from pyagent.miner.signatures import SUCCEEDED, suite_records
from pyagent.miner.specialists import Success
from pyagent.observe.traces import SpanRecord, TraceReader

CLIPPED = "more characters]"  # how `fleet.turn.clip` ends a text it shortened


def successes_in(data: Path) -> list[Success]:
    """The demonstrations of every verified successful run in the data folder `data`: runs whose
    suite record is correct or, without a record, whose goal was met."""
    by_run = {r["run_id"]: r for r in suite_records(data) if r.get("run_id")}
    found: list[Success] = []
    for path in sorted(data.rglob("traces.db")):
        with TraceReader(path) as reader:
            for run in reader.runs():
                record = by_run.get(run.run_id)
                spans = reader.spans(run.run_id)
                if _accepted(record, spans):
                    item = record.get("item_id") if record else None
                    found += from_run(spans, None, f"run {run.run_id}"
                                      + (f" of {item}" if item else ""))
    return found


def _accepted(record: Mapping[str, Any] | None, spans: Sequence[SpanRecord]) -> bool:
    if record is not None:
        return bool(record.get("correct"))
    runs = [s for s in spans if s.kind == "run"]
    return bool(runs) and runs[-1].attributes.get("pyagent.run.status") == SUCCEEDED


def from_run(spans: Sequence[SpanRecord], task: str | None, source: str) -> list[Success]:
    """Each step's demonstration in one accepted run (`task`: what the demonstrations say the
    task was; by default the run's)."""
    run = next(s for s in spans if s.kind == "run")
    task = task or str(run.attributes.get("pyagent.task", ""))
    children: dict[str | None, list[SpanRecord]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)
    found = []
    for step in (s for s in spans if s.kind == "step"):
        for agent in (s for s in children.get(step.span_id, []) if s.kind == "agent"):
            if agent.status != "ok":
                continue
            demo = _demonstration(task, agent, children.get(agent.span_id, []),
                                  f"{source}, step {step.attributes.get('pyagent.step.id')}")
            if demo is not None:
                found.append(Success(str(step.attributes.get("pyagent.step.id")),
                                     str(agent.attributes.get("gen_ai.agent.name")), demo))
    return found


def _demonstration(task: str, agent: SpanRecord, spans: Sequence[SpanRecord],
                   source: str) -> Demonstration | None:
    steps = []
    for call in (s for s in spans if s.kind == "tool_call" and s.status == "ok"):
        arguments = str(call.attributes.get("gen_ai.tool.call.arguments", ""))
        result = str(call.attributes.get("gen_ai.tool.call.result", ""))
        if arguments.endswith(CLIPPED) or result.endswith(CLIPPED):
            return None
        try:
            parsed = json.loads(arguments or "{}")
        except ValueError:
            return None
        if not isinstance(parsed, dict):
            return None
        steps.append(DemoStep(call=str(call.attributes.get("gen_ai.tool.name")),
                              arguments=parsed, result=result))
    if not steps or not task:
        return None
    return Demonstration(task=task, steps=steps,
                         answer=str(agent.attributes.get("pyagent.agent.output", "")),
                         source=source)


def from_reference(task: str, calls: Sequence[tuple[str, dict[str, Any]]], agent: AgentSpec,
                   step: str, workspace: Path, accepted: Callable[[Path], bool],
                   source: str) -> Success | None:
    """`calls` (a known fix) run with `agent`'s tools and permissions on `workspace`, which
    holds the task's files: a demonstration of `task` at `step` if every call succeeds and
    `accepted(workspace)` (the suite's checker) holds."""
    context = ToolContext(Workspace(workspace), writable=tuple(agent.permissions.paths))
    steps = []
    for name, arguments in calls:
        if name not in agent.tools:
            return None
        try:
            output = make_tool(name).call(arguments, context).output
        except ToolError:
            return None
        steps.append(DemoStep(call=name, arguments=dict(arguments),
                              result=output[-TOOL_OUTPUT_CHARS:]))
    if not steps or not accepted(workspace):
        return None
    return Success(step, agent.name, Demonstration(task=task, steps=steps,
                                                   answer="The fix is saved.", source=source))
