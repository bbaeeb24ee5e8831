"""Run a manifest: steps in order, bounded loops, conditions, retries; a checkpoint after every
step, so a run killed at any point resumes without repeating a completed step; and at the end the
manifest's goal, checked on the workspace, decides the outcome.

Two modes for the same manifest:
- `sequenced`: the steps continue one shared conversation, offered one list of tools (every
  agent's), so the engine reuses the KV of everything before (prefix sharing) and remote backends
  hit the provider's prompt cache; each agent may still call only its own tools;
- `handover`: every step starts a fresh conversation that carries the earlier transcript as text,
  as frameworks that hand work from agent to agent do.

With a `Compaction`, old tool results in the run's transcript shrink before each step.

A run ends `succeeded` (the goal's check passed), `goal_not_met` (it did not: the reason names the
check's output and any loop that ran out of rounds) or `error` (a step failed). A checkpoint that
cannot be stored raises `CheckpointError` out of the run: it stays `running` where it was last
saved, interrupted, for `resume` to continue. Resume is exact or
refuses: the manifest must be unchanged (its SHA-256 is kept with the run), and a checkpoint store
that lost checkpoints the trace saw written is detected, never silently repeated.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pyagent.errors import ConfigError, PyAgentError
from pyagent.fleet.agent import AgentSpec
from pyagent.fleet.compaction import Compaction
from pyagent.fleet.defenses import Guard, Screen
from pyagent.fleet.manifest import CheckSpec, LoopSpec, Manifest, StepSpec
from pyagent.fleet.templates import Templates
from pyagent.fleet.tools.base import Limits, Tool, ToolContext, ToolError, Workspace
from pyagent.fleet.tools.registry import make_tool
from pyagent.fleet.turn import Team, clip, guard_for, offered_tools, run_turn, system_prompt
from pyagent.llm.base import Backend
from pyagent.observe.events import EventBus, Span
from pyagent.observe.traces import TraceStore
from pyagent.resilience.checkpoint import CheckpointError, CheckpointStore
from pyagent.types import Message

Mode = Literal["sequenced", "handover"]
MODES = ("sequenced", "handover")
SUCCEEDED, GOAL_NOT_MET, ERROR, RUNNING = "succeeded", "goal_not_met", "error", "running"
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
GOAL_OUTPUT_CHARS = 2000  # the tail of the goal check's output kept with the run


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str  # succeeded, goal_not_met or error
    outputs: dict[str, dict[str, Any]]
    error: str | None  # why the run did not succeed
    checkpoints: int


def manifest_hash(manifest: Manifest) -> str:
    """SHA-256 of a manifest's files (it and its agents file) as they are on disk now."""
    digest = hashlib.sha256()
    for path in manifest.files:
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest()


class Orchestrator:
    """Executes one manifest with backends chosen per agent, on one workspace.

    With `traces` (the store the bus feeds), `resume` closes the killed attempt's spans as
    interrupted and refuses when the checkpoint store lost checkpoints the trace saw written.
    `identity` names the process that runs it (default: host, pid and start time). `tools` makes
    the agents' tools by name (default: the registry's); `screen` is the injection detector for
    agents whose defenses use one (default: the shipped one, loaded when an agent needs it)."""

    def __init__(self, manifest: Manifest, backend_for: Callable[[AgentSpec], Backend],
                 workspace: Path, bus: EventBus, store: CheckpointStore,
                 mode: Mode = "sequenced", compaction: Compaction | None = None,
                 traces: TraceStore | None = None,
                 identity: Callable[[], dict[str, Any]] | None = None,
                 tools: Callable[[str], Tool] = make_tool, screen: Screen | None = None):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.manifest = manifest
        self.workspace = Workspace(workspace)
        if screen is None and any(a.defenses.detector is not None
                                  for a in manifest.agents.values()):
            from pyagent.fleet.detector import InjectionDetector
            screen = InjectionDetector.load().score
        self.team = Team(manifest.agents, backend_for, self.workspace, tools, screen)
        self.shared_tools = offered_tools(manifest.agents.values())
        self.bus = bus
        self.store = store
        self.mode = mode
        self.compaction = compaction
        self.traces = traces
        self.identity = identity or process_identity  # who runs it, as the run records
        self.templates = Templates()

    # --- entry points ------------------------------------------------------------------------

    def run(self, task: str, run_id: str | None = None,
            options: dict[str, Any] | None = None,
            history: list[Message] | None = None) -> RunResult:
        """Start a run; `options` (JSON data) are kept with it for `resume`; `history` is an
        earlier conversation the run continues (the first step reads it)."""
        run_id = run_id or uuid.uuid4().hex[:12]
        if not RUN_ID.fullmatch(run_id):
            raise ConfigError(f"run id {run_id[:80]!r} must be 1 to 128 letters, digits, '.', "
                              "'_' or '-', starting with a letter or digit (it names the run in "
                              "paths and URLs)")
        if self.store.get(run_id) is not None:
            raise ConfigError(f"run {run_id!r} already exists; resume it instead")
        state = {"run_id": run_id, "task": task, "mode": self.mode,
                 "manifest": str(self.manifest.path),
                 "manifest_sha256": manifest_hash(self.manifest),
                 "workspace": str(self.workspace.root),
                 "options": options or {}, "cursor": {"item": 0, "iteration": 1, "inner": 0},
                 "outputs": {}, "transcript": [_record(m) for m in history or ()],
                 "exhausted": [], "goal": None,
                 "status": RUNNING, "error": None, "seq": -1}
        self._save(state)
        return self._execute(state, resumed=False)

    def resume(self, run_id: str, force: bool = False) -> RunResult:
        """Continue `run_id` from its latest checkpoint (a finished run is returned as is).

        Refuses a manifest edited since the run started (unless `force`) and a checkpoint store
        that lost checkpoints the trace recorded as written."""
        checkpoint = self.store.get(run_id)
        if checkpoint is None:
            raise ConfigError(f"no checkpoints for run {run_id!r}")
        state = checkpoint.state
        if state["manifest"] != str(self.manifest.path):
            raise ConfigError(f"run {run_id!r} ran {state['manifest']}, not {self.manifest.path}")
        if state["status"] != RUNNING:
            return self._result(state)
        if not force and state.get("manifest_sha256") != manifest_hash(self.manifest):
            raise ConfigError(f"{self.manifest.path} (or its agents file) changed since run "
                              f"{run_id!r} started; resuming would mix two workflows "
                              "(--force resumes anyway)")
        if self.traces is not None:
            self._check_store(state)
            self.traces.interrupt(run_id, self.bus)
        return self._execute(state, resumed=True)

    def _check_store(self, state: dict[str, Any]) -> None:
        """Refuse when the trace saw a checkpoint written that the store no longer has."""
        assert self.traces is not None
        seen = [s.attributes.get("pyagent.checkpoint.seq") for s in
                self.traces.spans(state["run_id"]) if s.kind == "step"]
        newest = max((seq for seq in seen if isinstance(seq, int)), default=-1)
        if newest > state["seq"]:
            raise PyAgentError(
                f"run {state['run_id']!r}: the trace records checkpoint {newest} as written, but "
                f"the checkpoint store's newest is {state['seq']}: the store lost checkpoints "
                f"(a damaged file?). Resuming would repeat completed steps; refusing.")

    # --- execution -----------------------------------------------------------------------------

    def _execute(self, state: dict[str, Any], resumed: bool) -> RunResult:
        run_id = state["run_id"]
        if state.get("owner") != (owner := self.identity()):
            state["owner"] = owner
            self._save(state)  # a run killed before its next checkpoint still names its owner
        with self.bus.span("run", f"run {self.manifest.name}", run_id,
                           **{"pyagent.mode": self.mode, "pyagent.resumed": resumed,
                              "pyagent.task": clip(state["task"]),
                              "pyagent.manifest.agents": self._definitions()}
                           ) as span:
            try:
                self._walk(state, span)
                self._check_goal(state, span)
            except CheckpointError:
                raise  # the state cannot be stored: the run is interrupted, not failed
            except PyAgentError as exc:
                state["status"], state["error"] = ERROR, str(exc)
                span.set("error.type", type(exc).__name__)
            except Exception as exc:  # a defect: the run still ends as failed, never running
                state["status"], state["error"] = ERROR, f"internal error: {exc!r}"
                self._save(state)
                raise
            span.set("pyagent.run.status", state["status"])
            self._save(state)
        return self._result(state)

    def _definitions(self) -> dict[str, dict[str, Any]]:
        """The manifest's agents as the trace records them (what an observer shows for each)."""
        return {name: agent.model_dump(mode="json")
                for name, agent in self.manifest.agents.items()}

    def _walk(self, state: dict[str, Any], span: Span) -> None:
        cursor = state["cursor"]
        items = self.manifest.steps
        while cursor["item"] < len(items):
            item = items[cursor["item"]]
            if isinstance(item, LoopSpec):
                body = item.loop.steps
                while cursor["inner"] < len(body):
                    self._step(body[cursor["inner"]], state, span, cursor["iteration"],
                               lambda: cursor.update(inner=cursor["inner"] + 1))
                if item.loop.check is not None:
                    done = self._loop_check(item, state, span, cursor["iteration"])
                else:
                    done = self._holds(item.id, "until", item.loop.until or "", state,
                                       cursor["iteration"])
                if done:
                    cursor.update(item=cursor["item"] + 1, iteration=1, inner=0)
                elif cursor["iteration"] >= item.loop.max_iterations:
                    state["exhausted"].append(item.id)
                    cursor.update(item=cursor["item"] + 1, iteration=1, inner=0)
                else:
                    cursor.update(iteration=cursor["iteration"] + 1, inner=0)
                self._save(state)
            elif item.when is None or self._holds(item.id, "when", item.when, state, 1):
                self._step(item, state, span, 1, lambda: cursor.update(item=cursor["item"] + 1))
            else:
                state["outputs"][item.id] = {"output": "", "data": {}, "status": "skipped"}
                cursor["item"] += 1
                self._save(state)

    def _step(self, step: StepSpec, state: dict[str, Any], run_span: Span, iteration: int,
              advance: Callable[[], None]) -> None:
        """One step's turn; its output, the cursor's `advance` and the checkpoint are saved
        before the step's span closes, so a span the trace shows complete is always in a
        checkpoint."""
        agent = self.manifest.agents[self._taker(step, state)]
        if step.tools is not None:  # least privilege: only what this step needs
            agent = agent.model_copy(update={"tools": step.tools})
        if step.timeout_s is not None:
            agent = agent.model_copy(update={"limits": agent.limits.model_copy(
                update={"wall_time_s": min(agent.limits.wall_time_s, step.timeout_s)})})
        quoted, withheld = self._quoted(agent, step.id, state)
        instruction = self.templates.render(
            step.instruction, self.manifest.where(step.id, "instruction"), task=state["task"],
            steps=quoted, loop={"iteration": iteration})
        elided = self.compaction.apply(state["transcript"]) if self.compaction else 0
        transcript, logged, flagged = self._transcript(agent, instruction, state)
        withheld += flagged
        tools = self.shared_tools if self.mode == "sequenced" else None
        attempts = step.retries + 1
        with run_span.child("step", f"step {step.id}", **{"pyagent.step.id": step.id,
                                                         "pyagent.loop.iteration": iteration,
                                                         "pyagent.compaction.elided_chars": elided}
                            ) as span:
            if withheld:
                span.set("pyagent.defense.flagged", withheld)
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
            earlier = state["outputs"].get(step.id, {}).get("usage", [0, 0, 0])  # loop rounds
            usage = [result.usage.prompt_tokens, result.usage.completion_tokens,
                     result.usage.cached_tokens]
            state["outputs"][step.id] = {
                "output": result.output, "data": result.data, "status": "ok",
                "agent": agent.name, "tool_calls": result.tool_calls, "iteration": iteration,
                "usage": [a + b for a, b in zip(earlier, usage, strict=True)]}
            state["transcript"] += [_record(m) for m in [logged, *result.messages]]
            advance()
            self._save(state)
            span.set("pyagent.checkpoint.seq", state["seq"])

    def _quoted(self, agent: AgentSpec, step: str,
                state: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Earlier results as `step`'s instruction quotes them: their outputs (a model's words,
        a check's tool output: both untrusted) through `agent`'s defenses, as tool results
        are; and how many of those it names the detector withheld."""
        names = self.manifest.quoted(step)
        if not agent.defenses.active or names == frozenset():
            return state["outputs"], 0
        guard = Guard(agent.defenses, "", state["run_id"], self.team.screen)
        quoted = {name: {**out, "output": guard.untrusted(out["output"])}
                  if out["output"] and (names is None or name in names) else out
                  for name, out in state["outputs"].items()}
        return quoted, guard.flagged

    def _check_goal(self, state: dict[str, Any], run_span: Span) -> None:
        """Run the goal's checks on the workspace and set the run's final status from them."""
        goal = self.manifest.goal
        with run_span.child("goal", "check_goal",
                            **{"pyagent.goal.description": goal.description}) as span:
            results = [self._check(check, self.manifest.where("goal", f"checks.{index}.expect"))
                       for index, check in enumerate(goal.checks)]
            met = all(passed for passed, _, _ in results)
            span.set("pyagent.goal.met", met)
        failed = [f"{goal.checks[i].tool}: {_gist(output)}"
                  for i, (passed, output, _) in enumerate(results) if not passed]
        reasons = [f"goal check failed ({goal.description}): {'; '.join(failed)}"] if failed \
            else []
        reasons += [f"loop {loop!r} ran out of rounds without its condition holding"
                    for loop in state["exhausted"]]
        state["goal"] = {"description": goal.description, "met": met,
                         "checks": [{"tool": c.tool, "passed": passed,
                                     "output": output[-GOAL_OUTPUT_CHARS:]}
                                    for c, (passed, output, _) in zip(goal.checks, results,
                                                                      strict=True)]}
        state["status"] = SUCCEEDED if met else GOAL_NOT_MET
        state["error"] = None if met else "; ".join(reasons)

    def _loop_check(self, loop: LoopSpec, state: dict[str, Any], run_span: Span,
                    iteration: int) -> bool:
        """Run a loop's check after a round; `steps.<loop id>` becomes its result."""
        check = loop.loop.check
        assert check is not None
        with run_span.child("goal", f"check {loop.id}", **{"pyagent.check.loop": loop.id,
                                                           "pyagent.loop.iteration": iteration,
                                                           "gen_ai.tool.name": check.tool}
                            ) as span:
            passed, output, data = self._check(check, self.manifest.where(loop.id,
                                                                          "check.expect"))
            span.set("pyagent.check.passed", passed)
        state["outputs"][loop.id] = {"output": output[-GOAL_OUTPUT_CHARS:], "data": data,
                                     "status": "passed" if passed else "failed",
                                     "iteration": iteration}
        return passed

    def _check(self, check: CheckSpec, where: str) -> tuple[bool, str, dict[str, Any]]:
        """Whether a check passes, and the output and data of its tool call."""
        context = ToolContext(self.workspace, limits=Limits(timeout_s=check.timeout_s),
                              allowed_commands=frozenset(_goal_commands(check.arguments)),
                              writable=())
        try:
            outcome = make_tool(check.tool).call(check.arguments, context)
        except ToolError as exc:
            return False, f"failed: {exc}", {}
        passed = self.templates.holds(check.expect, where, data=dict(outcome.data),
                                      output=outcome.output)
        return passed, outcome.output, dict(outcome.data)

    def _transcript(self, agent: AgentSpec, instruction: str,
                    state: dict[str, Any]) -> tuple[list[Message], Message, int]:
        """The conversation an agent's turn starts from in this run's mode, the message the
        run's transcript records for this step, and how many earlier tool results the detector
        withheld from it (in hand-over mode, where they are text in the first message)."""
        earlier = [Message(**message) for message in state["transcript"]]
        if self.mode == "sequenced":
            turn = Message("user", f"[{agent.name}] {system_prompt(agent)}\n\n{instruction}")
            return [*earlier, turn], turn, 0
        guard = guard_for(agent, [Message("user", instruction)], self.team, state["run_id"])
        history = "\n\n".join(_as_text(m if m.role != "tool" else
                                         replace(m, content=guard.untrusted(m.content)))
                              for m in earlier)
        handed = f"Transcript so far:\n{history}\n\n{instruction}" if earlier else instruction
        return ([Message("system", system_prompt(agent)), Message("user", handed)],
                Message("user", f"[{agent.name}] {instruction}"), guard.flagged)

    def _taker(self, step: StepSpec, state: dict[str, Any]) -> str:
        """The agent that takes `step` for this run's task: its first route that holds, or its
        own agent."""
        for index, route in enumerate(step.routes):
            if route.when is None or self.templates.holds(
                    route.when, self.manifest.where(step.id, f"routes.{index}.when"),
                    task=state["task"]):
                return route.agent
        return step.agent

    def _holds(self, item: str, name: str, expression: str, state: dict[str, Any],
               iteration: int) -> bool:
        return self.templates.holds(expression, self.manifest.where(item, name),
                                    task=state["task"], steps=state["outputs"],
                                    loop={"iteration": iteration})

    def _save(self, state: dict[str, Any]) -> None:
        state["seq"] += 1
        self.store.put(state["run_id"], state["seq"], state)

    @staticmethod
    def _result(state: dict[str, Any]) -> RunResult:
        return RunResult(state["run_id"], state["status"], state["outputs"], state["error"],
                         state["seq"] + 1)


def process_identity() -> dict[str, Any]:
    """This process, as a run records its owner: host, pid and start time (pids are reused)."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time()}


def owner_alive(state: dict[str, Any]) -> bool | None:
    """Whether the process that last ran a `running` run still lives (None: it ran on another
    host, or the run predates owner records, so this host cannot tell)."""
    import psutil

    owner = state.get("owner")
    if not owner or owner.get("host") != socket.gethostname():
        return None
    try:
        return psutil.Process(owner["pid"]).create_time() == owner["started"]
    except psutil.Error:
        return False


def _goal_commands(arguments: dict[str, Any]) -> list[str]:
    """The command a `shell` goal runs: its own check may run it without an allow-list."""
    argv = arguments.get("argv")
    return [argv[0]] if isinstance(argv, list) and argv and isinstance(argv[0], str) else []


def _gist(text: str, chars: int = 200) -> str:
    """A tool output in one line: its first line and its last (a status and a summary)."""
    lines = [" ".join(line.split()) for line in text.strip().splitlines() if line.strip()]
    cut = [line if len(line) <= chars else line[:chars] + "..." for line in lines]
    return " | ".join(cut[:1] + cut[-1:]) if len(cut) > 1 else "".join(cut)


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

