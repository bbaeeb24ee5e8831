"""The fleet's topology, folded event by event: which runs, steps, agents, sub-agents, tools and
backends exist, how they connect, and what each has done.

Node ids: `run:<run>`, `step:<run>:<step>`, `agent:<run>:<agent>` (an agent delegated to by
another is a `subagent`), `tool:<tool>` and `backend:<model>` (shared by every run). An LLM call's
tokens and cost count for its backend, its nearest agent, its step and its run. Spans are
forgotten once they close (their children close first), so memory follows the open spans, the
nodes and the edges, not the length of the history.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyagent.observe.events import Event
from pyagent.observe.metrics.sketch import Sketch
from pyagent.observe.schema import Edge, Figures, Node, RecentSpan

RECENT = 20  # spans kept per node for its detail view (an agent's: its LLM and tool calls too)
STATUS = {"end": "ok", "error": "error", "interrupted": "interrupted"}
TOKENS = (("input_tokens", "gen_ai.usage.input_tokens"),
          ("output_tokens", "gen_ai.usage.output_tokens"),
          ("cached_tokens", "pyagent.usage.cached_tokens"))
KV_PEAK = "pyagent.kv.peak_bytes"
AGENTS = "pyagent.manifest.agents"
OUTCOME, SUCCEEDED = "pyagent.run.status", "succeeded"

Pricer = Callable[[str, dict[str, Any]], float | None]
"""The cost in USD of one LLM call from its model and span attributes; None when unknown."""


@dataclass
class NodeState:
    id: str
    kind: str
    label: str
    run_id: str | None
    first_seen: float
    last_seen: float
    status: str = "running"
    active: int = 0
    calls: int = 0
    errors: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("input_tokens", "output_tokens", "cached_tokens"), 0))
    cost: float | None = None
    kv_bytes: int | None = None
    latency: Sketch = field(default_factory=Sketch)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    definition: dict[str, Any] | None = None
    outcome: str | None = None

    def view(self, kv_bytes: int | None = None, recent: int = RECENT) -> Node:
        """The node as the API shows it, with its `recent` latest spans."""
        spans = list(self.recent)[-recent:] if recent else []
        return Node(
            id=self.id, kind=self.kind, label=self.label, run_id=self.run_id,  # type: ignore[arg-type]
            status="running" if self.active > 0 else self.status,  # type: ignore[arg-type]
            first_seen=self.first_seen, last_seen=self.last_seen,
            figures=Figures(calls=self.calls, errors=self.errors, **self.tokens,
                            cost_usd=self.cost, latency_p50_s=self.latency.quantile(0.5),
                            latency_p95_s=self.latency.quantile(0.95),
                            kv_bytes=self.kv_bytes if kv_bytes is None else kv_bytes),
            outcome=self.outcome, definition=self.definition,
            recent=[RecentSpan(**span) for span in spans])


@dataclass
class OpenSpan:
    kind: str
    node: str | None  # the node whose figures the span counts in
    rollup: tuple[str, ...]  # nodes an LLM call below it adds its tokens to
    agent: str | None  # the nearest agent node at or above it
    start: float


@dataclass
class Touch:
    """What one event changed: the node it belongs to and the edge it travelled (for the
    stream, so a screen can light them up)."""

    node: str | None
    edge: tuple[str, str] | None


class Topology:
    """Nodes and edges of the fleet, folded from events in the order they were stored."""

    def __init__(self, pricer: Pricer | None = None,
                 redact: Callable[[Any], Any] = lambda value: value):
        self.pricer = pricer
        self.redact = redact  # for what nodes keep of attributes: definitions, errors
        self.nodes: dict[str, NodeState] = {}
        self.edges: dict[tuple[str, str], Edge] = {}
        self.open: dict[str, OpenSpan] = {}
        self.last_step: dict[str, str] = {}  # run -> its latest step node
        self.definitions: dict[str, dict[str, dict[str, Any]]] = {}  # run -> agent -> definition

    def fold(self, event: Event) -> Touch:
        """Apply one event; returns the node and edge it touched."""
        if event.phase == "start":
            return self._start(event)
        return self._close(event)

    def _start(self, event: Event) -> Touch:
        parent = self.open.get(event.parent_id or "")
        run_node = self._node(f"run:{event.run_id}", "run", event.run_id, event.run_id,
                              event.timestamp)
        attributes = event.attributes
        node = node_of(event)
        label = _name(event)
        edge: tuple[str, str] | None = None
        agent = parent.agent if parent else None
        rollup = parent.rollup if parent else (run_node.id,)
        if event.kind == "run":
            run_node.label = label or event.run_id
            if isinstance(attributes.get(AGENTS), dict):
                self.definitions[event.run_id] = self.redact(attributes[AGENTS])
            rollup = (node,)
        elif event.kind == "step":
            self._node(node, "step", label, event.run_id, event.timestamp)
            edge = self._edge(run_node.id, node, "contains", event.timestamp)
            previous = self.last_step.get(event.run_id)
            if previous is not None and previous != node:
                self._edge(previous, node, "next", event.timestamp)
            self.last_step[event.run_id] = node
            rollup = (node, run_node.id)
        elif event.kind == "agent":
            kind = "subagent" if agent is not None else "agent"
            state = self._node(node, kind, label, event.run_id, event.timestamp)
            state.definition = self.definitions.get(event.run_id, {}).get(label, state.definition)
            source = agent or (parent.node if parent else None) or run_node.id
            edge = self._edge(source, node, "delegates", event.timestamp)
            agent = node
            rollup = (node, *(n for n in rollup if not n.startswith("agent:")))
        elif event.kind == "tool_call":
            self._node(node, "tool", label, None, event.timestamp)
            edge = self._edge(agent or run_node.id, node, "calls", event.timestamp)
        elif event.kind == "llm_call":
            self._node(node, "backend", label, None, event.timestamp)
            edge = self._edge(agent or run_node.id, node, "uses", event.timestamp)
        state = self.nodes[node]
        state.active += 1
        state.last_seen = max(state.last_seen, event.timestamp)
        self.open[event.span_id] = OpenSpan(event.kind, node, rollup, agent, event.timestamp)
        return Touch(node, edge)

    def _close(self, event: Event) -> Touch:
        span = self.open.pop(event.span_id, None)
        if span is None:  # its start came before what was read, or it was already closed
            return Touch(None, None)
        attributes = event.attributes
        status = STATUS[event.phase]
        duration = attributes.get("duration_s")
        state = self.nodes[span.node] if span.node else None
        if state is not None:
            state.active = max(0, state.active - 1)
            state.status = status
            outcome = attributes.get(OUTCOME)
            if span.kind == "run" and isinstance(outcome, str):
                state.outcome = outcome  # a run that did not reach its goal is never ok
                state.status = status if outcome == SUCCEEDED or status != "ok" else "error"
            state.last_seen = max(state.last_seen, event.timestamp)
            if span.kind != "goal":
                state.calls += 1
                state.errors += status != "ok"
                if isinstance(duration, int | float) and duration >= 0:
                    state.latency.add(float(duration))
        tokens = {}
        if span.kind == "llm_call" and status == "ok":
            tokens = {name: value for name, key in TOKENS
                      if isinstance(value := attributes.get(key), int) and value >= 0}
            cost = (self.pricer(model_of(event.name, attributes), attributes)
                    if self.pricer else None)
            for node in (span.node, *span.rollup):
                target = self.nodes.get(node or "")
                if target is None:
                    continue
                for name, value in tokens.items():
                    target.tokens[name] += value
                if cost is not None:
                    target.cost = (target.cost or 0.0) + cost
            peak = attributes.get(KV_PEAK)
            agent = self.nodes.get(span.agent or "")
            if isinstance(peak, int) and agent is not None:
                agent.kv_bytes = max(agent.kv_bytes or 0, peak)
        if state is not None:
            start = event.timestamp - duration if isinstance(duration, int | float) else None
            message = attributes.get("exception.message")
            recent = {  # a RecentSpan when viewed (building models here is slow)
                "span_id": event.span_id, "run_id": event.run_id, "name": event.name,
                "status": status, "start": start,
                "duration_s": duration if isinstance(duration, int | float) else None,
                "input_tokens": tokens.get("input_tokens"),
                "output_tokens": tokens.get("output_tokens"),
                "error": None if status == "ok" or message is None else self.redact(str(message))}
            state.recent.append(recent)
            agent = self.nodes.get(span.agent or "")
            if agent is not None and agent is not state:  # its LLM and tool calls show there too
                agent.recent.append(recent)
        return Touch(span.node, None)

    def _node(self, node_id: str, kind: str, label: str, run_id: str | None,
              now: float) -> NodeState:
        state = self.nodes.get(node_id)
        if state is None:
            state = self.nodes[node_id] = NodeState(node_id, kind, label, run_id, now, now)
        return state

    def _edge(self, source: str, target: str, kind: str, now: float) -> tuple[str, str]:
        key = (source, target)
        edge = self.edges.get(key)
        if edge is None:
            self.edges[key] = Edge(source=source, target=target, kind=kind,  # type: ignore[arg-type]
                                   count=1, last_at=now)
        else:
            edge.count += 1
            edge.last_at = max(edge.last_at, now)
        return key

    def view(self, runs: Iterable[str] = (), agent: str | None = None,
             since: float | None = None, backend_kv: dict[str, int] | None = None,
             recent: int = RECENT) -> tuple[list[Node], list[Edge]]:
        """Nodes and edges, optionally only those of `runs`, of agents whose name contains
        `agent`, or seen at or after `since`; shared nodes (tools, backends) come with the nodes
        that use them. `backend_kv` gives backends' live KV bytes by model; each node comes with
        its `recent` latest spans."""
        wanted = set(runs)
        keep = {node_id for node_id, state in self.nodes.items()
                if state.run_id is not None
                and (not wanted or state.run_id in wanted)
                and (since is None or state.last_seen >= since)}
        if agent:
            needle = agent.lower()
            agents = {n for n in keep if self.nodes[n].kind in ("agent", "subagent")
                      and needle in self.nodes[n].label.lower()}
            linked = {e.source for e in self.edges.values() if e.target in agents}
            runs_of = {self.nodes[n].run_id for n in agents}
            keep = agents | {n for n in linked if n in keep} | {f"run:{r}" for r in runs_of}
        if wanted or agent or since is not None:
            keep |= {e.target for e in self.edges.values()
                     if e.source in keep and self.nodes[e.target].run_id is None}
        else:
            keep = set(self.nodes)
        kv = backend_kv or {}
        nodes = [state.view(kv.get(state.label) if state.kind == "backend" else None, recent)
                 for node_id, state in self.nodes.items() if node_id in keep]
        edges = [edge.model_copy() for edge in self.edges.values()
                 if edge.source in keep and edge.target in keep]
        return nodes, edges


def node_of(event: Event) -> str:
    """The id of the node an event's span counts in (a goal check counts in its run)."""
    name = _name(event)
    return {"step": f"step:{event.run_id}:{name}", "agent": f"agent:{event.run_id}:{name}",
            "tool_call": f"tool:{name}", "llm_call": f"backend:{name}"}.get(
        event.kind, f"run:{event.run_id}")


def _name(event: Event) -> str:
    """What a span is about: the manifest, step, agent, tool or requested model."""
    attributes = event.attributes
    found = {"step": attributes.get("pyagent.step.id"),
             "agent": attributes.get("gen_ai.agent.name"),
             "tool_call": attributes.get("gen_ai.tool.name"),
             "llm_call": attributes.get("gen_ai.request.model")}.get(event.kind)
    return str(found or event.name.partition(" ")[2] or event.name)


def model_of(name: str, attributes: dict[str, Any]) -> str:
    """The model an LLM call used: the one that answered, else the one asked for, else the
    span name's (`chat <model>`)."""
    return str(attributes.get("gen_ai.response.model") or attributes.get("gen_ai.request.model")
               or name.removeprefix("chat ") or "unknown")
