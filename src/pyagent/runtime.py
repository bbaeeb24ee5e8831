"""Wiring for runs started from the command line: where runs keep their data, which backend
each agent gets, and the orchestrator that ties them together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyagent.bench.prices import PriceTable
from pyagent.bench.tokens import TokenTracker, Totals
from pyagent.errors import ConfigError
from pyagent.fleet.agent import AgentSpec
from pyagent.fleet.compaction import Compaction
from pyagent.fleet.manifest import load_manifest
from pyagent.fleet.orchestrator import Orchestrator, owner_alive
from pyagent.fleet.tools.registry import TOOLS
from pyagent.llm.base import Backend
from pyagent.observe.events import EventBus
from pyagent.observe.gauges import GaugeSampler, Reading
from pyagent.observe.metrics import MetricsFeed, MetricsRegistry
from pyagent.observe.traces import TraceStore
from pyagent.resilience.checkpoint import CheckpointStore
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore

CHECKPOINTS, TRACES = "checkpoints.db", "traces.db"


@dataclass(frozen=True)
class StepRow:
    """One attempt at a step as the trace recorded it."""

    step: str
    round: int
    attempt: int  # retries of a step in one round are attempts 2, 3, ...
    agent: str
    status: str  # ok, error, interrupted (the process died), running
    tokens: Totals
    tool_calls: int
    seconds: float


@dataclass
class Runtime:
    """One data folder's event bus, trace store and checkpoint store, with the metrics and the
    token and cost accounting that the bus feeds live.

    Prices come from `prices` (a user price file; default `<data>/prices.yaml` when it exists)
    and then genai-prices' table."""

    data_dir: Path
    bus: EventBus
    traces: TraceStore
    checkpoints: CheckpointStore
    prices: PriceTable
    metrics: MetricsRegistry
    tokens: TokenTracker
    samplers: list[GaugeSampler] = field(default_factory=list)

    @classmethod
    def open(cls, data_dir: Path, prices: Path | None = None, create: bool = True,
             checkpoints: CheckpointStore | None = None) -> Runtime:
        """The runtime of `data_dir`; without `create`, a folder that holds no runs is an error
        and nothing is created (for commands that only read). Checkpoints go to the folder's
        SQLite store unless `checkpoints` names another (the buddy ring)."""
        wanted = (TRACES,) if checkpoints is not None else (CHECKPOINTS, TRACES)
        missing = [name for name in wanted if not (data_dir / name).is_file()]
        if not create and missing:
            raise ConfigError(f"no runs in {data_dir}: it has no {' or '.join(missing)} "
                              "(give --data)")
        default = data_dir / "prices.yaml"
        table = PriceTable(prices or (default if default.is_file() else None))
        bus = EventBus()
        traces = TraceStore(data_dir / TRACES)
        traces.attach(bus)
        metrics = MetricsRegistry()
        MetricsFeed(metrics).attach(bus)
        tokens = TokenTracker(table)
        tokens.attach(bus)
        return cls(data_dir, bus, traces,
                   checkpoints or SQLiteCheckpointStore(data_dir / CHECKPOINTS), table, metrics,
                   tokens)

    def run_tokens(self, run_id: str) -> TokenTracker:
        """Tokens and cost of a stored run, call by call, rebuilt from its trace."""
        return TokenTracker.from_traces(self.traces, run_id, prices=self.prices)

    def step_rows(self, run_id: str) -> list[StepRow]:
        """Every attempt at a step of a stored run in the order it ran (loop rounds, retries and
        a killed attempt each their own row), with its tokens and cost from the trace; the rows'
        tokens and cost add up to `run_tokens(run_id).totals()`."""
        spans = self.traces.spans(run_id)
        children: dict[str | None, list[Any]] = {}
        for span in spans:
            children.setdefault(span.parent_id, []).append(span)

        def below(span_id: str) -> list[Any]:
            found = children.get(span_id, [])
            return [*found, *(s for c in found for s in below(c.span_id))]

        rows = []
        for step in (s for s in spans if s.kind == "step"):
            attempts = [s for s in children.get(step.span_id, []) if s.kind == "agent"]
            # a step killed after its last attempt ended also gets its own row, with no tokens
            ended = attempts and step.status in ("interrupted", "running") and \
                not any(a.status == step.status for a in attempts)
            for span in [*attempts, step] if ended else attempts or [step]:
                own = span is step and attempts
                inner = [] if own else below(span.span_id)
                tokens = Totals() if own else TokenTracker.from_traces(
                    self.traces, run_id, prices=self.prices, within=span.span_id).totals()
                rows.append(StepRow(
                    step.attributes.get("pyagent.step.id", step.name),
                    step.attributes.get("pyagent.loop.iteration", 1),
                    span.attributes.get("pyagent.attempt", 1),
                    span.attributes.get("gen_ai.agent.name", ""), span.status, tokens,
                    sum(s.kind == "tool_call" for s in inner), span.duration_s or 0.0))
        return rows

    def status(self, run_id: str) -> str:
        """The run's status as stored, except that a `running` run whose process died (this
        host can tell) is `interrupted`: `resume` continues it."""
        state = self.state(run_id)
        if state["status"] == "running" and owner_alive(state) is False:
            return "interrupted"
        return state["status"]

    def state(self, run_id: str) -> dict[str, Any]:
        """The latest checkpointed state of `run_id`."""
        checkpoint = self.checkpoints.get(run_id)
        if checkpoint is None:
            raise ConfigError(f"no run {run_id!r} in {self.data_dir}")
        return checkpoint.state

    def sample(self, read: Callable[[], Reading]) -> None:
        """Write the gauges `read` returns into the trace store while this runtime is open (an
        engine's KV bytes and queue, for observers in other processes)."""
        self.samplers.append(GaugeSampler(self.traces, read).start())

    def close(self) -> None:
        for sampler in self.samplers:
            sampler.stop()
        self.traces.close()
        self.checkpoints.close()


def backend_factory(options: dict[str, Any],
                    embedded: Callable[[], Backend]) -> Callable[[AgentSpec], Backend]:
    """Backends per agent: the agent's `backend` kind (or `options["backend"]` for all), with
    one embedded backend that `embedded` makes when an agent first needs it, one replay of
    `options["recording"]`, and every completion appended to `options["record"]` if given."""
    cache: dict[tuple[str, str | None], Backend] = {}
    shared: dict[str, Backend] = {}

    def make(kind: str, agent: AgentSpec) -> Backend:
        if kind == "embedded":
            return shared.get(kind) or shared.setdefault(kind, embedded())
        if kind == "openai":
            from pyagent.llm.openai import OpenAIBackend

            return OpenAIBackend(options.get("base_url"), model=agent.model)
        if kind == "replay" and options.get("recording"):
            from pyagent.llm.replay import ReplayBackend

            return shared.get(kind) or shared.setdefault(kind, ReplayBackend(
                options["recording"], delay_s=options.get("replay_delay_s", 0.0)))
        raise ConfigError(f"agent {agent.name!r}: backend {kind!r} cannot run a manifest from "
                          "the command line" + (" without --recording" if kind == "replay"
                                                else ""))

    def backend_for(agent: AgentSpec) -> Backend:
        kind = options.get("backend") or agent.backend
        key = (kind, agent.model)
        if key not in cache:
            chosen = make(kind, agent)
            if options.get("record") and kind != "replay":
                from pyagent.llm.replay import ReplayBackend

                chosen = ReplayBackend(options["record"], mode="record", inner=chosen)
            cache[key] = chosen
        return cache[key]

    return backend_for


def orchestrator(manifest_path: Path, workspace: Path, mode: str, runtime: Runtime,
                 backend_for: Callable[[AgentSpec], Backend],
                 compact_keep: int | None = None,
                 identity: Callable[[], dict[str, Any]] | None = None) -> Orchestrator:
    """The orchestrator for a run from the command line (`compact_keep`: see Compaction;
    `identity`: see Orchestrator)."""
    if not workspace.is_dir():
        raise ConfigError(f"workspace {workspace} is not a directory")
    manifest = load_manifest(manifest_path, set(TOOLS))
    compaction = None if compact_keep is None else Compaction(keep_recent=compact_keep)
    return Orchestrator(manifest, backend_for, workspace, runtime.bus, runtime.checkpoints,
                        mode, compaction, runtime.traces, identity)  # type: ignore[arg-type]
