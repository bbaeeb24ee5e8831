"""Run a manifest: steps in order, bounded loops, conditions, retries; a checkpoint after every
step, so a run killed at any point resumes without repeating a completed step.

Two modes for the same manifest:
- `sequenced`: the steps continue one shared conversation, offered one list of tools (every
  agent's), so the engine reuses the KV of everything before (prefix sharing) and remote backends
  hit the provider's prompt cache; each agent may still call only its own tools;
- `handover`: every step starts a fresh conversation that carries the earlier transcript as text,
  as frameworks that hand work from agent to agent do.

With a `Compaction`, old tool results in the run's transcript shrink before each step.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyagent.errors import ConfigError, PyAgentError
from pyagent.fleet.agent import AgentSpec
from pyagent.fleet.compaction import Compaction
from pyagent.fleet.manifest import LoopSpec, Manifest, StepSpec, environment
from pyagent.fleet.tools.base import Workspace
from pyagent.fleet.turn import Team, offered_tools, run_turn, system_prompt
from pyagent.llm.base import Backend
from pyagent.observe.events import EventBus, Span
from pyagent.resilience.checkpoint import CheckpointStore
from pyagent.types import Message

Mode = Literal["sequenced", "handover"]
MODES = ("sequenced", "handover")


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str  # "ok" or "error"
    outputs: dict[str, dict[str, Any]]
    error: str | None
    checkpoints: int


class Orchestrator:
    """Executes one manifest with backends chosen per agent, on one workspace."""

    def __init__(self, manifest: Manifest, backend_for: Callable[[AgentSpec], Backend],
                 workspace: Path, bus: EventBus, store: CheckpointStore,
                 mode: Mode = "sequenced", compaction: Compaction | None = None):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.manifest = manifest
        self.workspace = Workspace(workspace)
        self.team = Team(manifest.agents, backend_for, self.workspace)
        self.shared_tools = offered_tools(manifest.agents.values())
        self.bus = bus
        self.store = store
        self.mode = mode
        self.compaction = compaction
        self.env = environment()
        self._template = functools.lru_cache(maxsize=None)(self.env.from_string)
        self._expression = functools.lru_cache(maxsize=None)(self.env.compile_expression)

    # --- entry points ------------------------------------------------------------------------

    def run(self, task: str, run_id: str | None = None,
            options: dict[str, Any] | None = None) -> RunResult:
        """Start a run; `options` (JSON data) are kept with it for `resume`."""
        run_id = run_id or uuid.uuid4().hex[:12]
        if self.store.get(run_id) is not None:
            raise ConfigError(f"run {run_id!r} already exists; resume it instead")
        state = {"run_id": run_id, "task": task, "mode": self.mode,
                 "manifest": str(self.manifest.path), "workspace": str(self.workspace.root),
                 "options": options or {}, "cursor": {"item": 0, "iteration": 1, "inner": 0},
                 "outputs": {}, "transcript": [], "status": "running", "error": None, "seq": -1}
        self._save(state)
        return self._execute(state)

    def resume(self, run_id: str) -> RunResult:
        """Continue `run_id` from its latest checkpoint (a finished run is returned as is)."""
        checkpoint = self.store.get(run_id)
        if checkpoint is None:
            raise ConfigError(f"no checkpoints for run {run_id!r}")
        state = checkpoint.state
        if state["manifest"] != str(self.manifest.path):
            raise ConfigError(f"run {run_id!r} ran {state['manifest']}, not {self.manifest.path}")
        if state["status"] != "running":
            return self._result(state)
        return self._execute(state)

    # --- execution -----------------------------------------------------------------------------

    def _execute(self, state: dict[str, Any]) -> RunResult:
        run_id = state["run_id"]
        with self.bus.span("run", f"run {self.manifest.name}", run_id,
                           **{"pyagent.mode": self.mode, "pyagent.resumed": state["seq"] > 0}
                           ) as span:
            try:
                self._walk(state, span)
                state["status"] = "ok"
            except PyAgentError as exc:
                state["status"], state["error"] = "error", str(exc)
                span.set("error.type", type(exc).__name__)
            self._save(state)
        return self._result(state)

    def _walk(self, state: dict[str, Any], span: Span) -> None:
        cursor = state["cursor"]
        items = self.manifest.steps
        while cursor["item"] < len(items):
            item = items[cursor["item"]]
            if isinstance(item, LoopSpec):
                body = item.loop.steps
                while cursor["inner"] < len(body):
                    self._step(body[cursor["inner"]], state, span, cursor["iteration"])
                    cursor["inner"] += 1
                    self._save(state)
                done = self._holds(item.loop.until, state, cursor["iteration"])
                if done or cursor["iteration"] >= item.loop.max_iterations:
                    cursor.update(item=cursor["item"] + 1, iteration=1, inner=0)
                else:
                    cursor.update(iteration=cursor["iteration"] + 1, inner=0)
            else:
                if item.when is None or self._holds(item.when, state, 1):
                    self._step(item, state, span, 1)
                else:
                    state["outputs"][item.id] = {"output": "", "data": {}, "status": "skipped"}
                cursor["item"] += 1
            self._save(state)

    def _step(self, step: StepSpec, state: dict[str, Any], run_span: Span,
              iteration: int) -> None:
        agent = self.manifest.agents[step.agent]
        if step.timeout_s is not None:
            agent = agent.model_copy(update={"limits": agent.limits.model_copy(
                update={"wall_time_s": min(agent.limits.wall_time_s, step.timeout_s)})})
        instruction = self._template(step.instruction).render(
            task=state["task"], steps=state["outputs"], loop={"iteration": iteration})
        elided = self.compaction.apply(state["transcript"]) if self.compaction else 0
        transcript, logged = self._transcript(agent, instruction, state)
        tools = self.shared_tools if self.mode == "sequenced" else None
        attempts = step.retries + 1
        with run_span.child("step", f"step {step.id}", **{"pyagent.step.id": step.id,
                                                         "pyagent.loop.iteration": iteration,
                                                         "pyagent.compaction.elided_chars": elided}
                            ) as span:
            for attempt in range(1, attempts + 1):
                try:
                    with span.child("agent", f"invoke_agent {agent.name}",
                                    **{"gen_ai.operation.name": "invoke_agent",
                                       "gen_ai.agent.name": agent.name,
                                       "pyagent.attempt": attempt}) as agent_span:
                        result = run_turn(agent, transcript, self.team, agent_span, tools)
                    break
                except PyAgentError:
                    if attempt == attempts:
                        raise
        earlier = state["outputs"].get(step.id, {}).get("usage", [0, 0, 0])  # loop iterations
        usage = [result.usage.prompt_tokens, result.usage.completion_tokens,
                 result.usage.cached_tokens]
        state["outputs"][step.id] = {
            "output": result.output, "data": result.data, "status": "ok", "agent": agent.name,
            "tool_calls": result.tool_calls, "iteration": iteration,
            "usage": [a + b for a, b in zip(earlier, usage, strict=True)]}
        state["transcript"] += [_record(m) for m in [logged, *result.messages]]

    def _transcript(self, agent: AgentSpec, instruction: str,
                    state: dict[str, Any]) -> tuple[list[Message], Message]:
        """The conversation an agent's turn starts from in this run's mode, and the message the
        run's transcript records for this step."""
        earlier = [Message(**message) for message in state["transcript"]]
        if self.mode == "sequenced":
            turn = Message("user", f"[{agent.name}] {system_prompt(agent)}\n\n{instruction}")
            return [*earlier, turn], turn
        history = "\n\n".join(_as_text(m) for m in earlier)
        handed = f"Transcript so far:\n{history}\n\n{instruction}" if earlier else instruction
        return ([Message("system", system_prompt(agent)), Message("user", handed)],
                Message("user", f"[{agent.name}] {instruction}"))

    def _holds(self, expression: str, state: dict[str, Any], iteration: int) -> bool:
        try:
            return bool(self._expression(expression)(
                task=state["task"], steps=state["outputs"], loop={"iteration": iteration}))
        except Exception as exc:  # a condition over a step that failed or returned no data
            raise PyAgentError(f"condition {expression!r} could not be evaluated: {exc}") from exc

    def _save(self, state: dict[str, Any]) -> None:
        state["seq"] += 1
        self.store.put(state["run_id"], state["seq"], state)

    @staticmethod
    def _result(state: dict[str, Any]) -> RunResult:
        return RunResult(state["run_id"], state["status"], state["outputs"], state["error"],
                         state["seq"] + 1)



def _record(message: Message) -> dict[str, Any]:
    """A transcript message as checkpoint JSON."""
    record: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        record["tool_calls"] = [vars(call) for call in message.tool_calls]
    if message.tool_call_id is not None:
        record["tool_call_id"] = message.tool_call_id
    return record


def _as_text(message: Message) -> str:
    """A transcript message as a hand-over writes it for the next agent."""
    calls = "".join(f"\n[called {c.name} with {c.arguments}]" for c in message.tool_calls)
    return f"{message.role}: {message.content}{calls}"
