"""One agent turn: the agent calls tools until it answers or runs out of tool calls.

Tools are offered through the backend's tool calling: native on OpenAI-compatible servers,
grammar-constrained on the embedded engine, so even a small model's call always parses and matches
its tool's schema. What a model decides may still be wrong: a call to a tool its agent does not
hold, arguments that are not JSON, a tool that fails. Each becomes a result the agent reads and a
failed `execute_tool` span in the trace.

An agent with sub-agents also holds `delegate`: it hands a sub-task to one of them, which works in a
fresh context with its own tools and permissions; the sub-agent's answer is the call's result. The
trace records the lineage run -> step -> agent -> sub-agent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pyagent.errors import BackendError, PyAgentError
from pyagent.fleet.agent import AgentSpec, Demonstration
from pyagent.fleet.defenses import Guard, Screen
from pyagent.fleet.tools.base import Tool, ToolContext, ToolError, ToolResult, Workspace
from pyagent.fleet.tools.registry import make_tool, tool_specs
from pyagent.llm.base import Backend
from pyagent.observe.events import Span
from pyagent.types import (
    Completion,
    CompletionRequest,
    Message,
    SamplingParams,
    ToolCall,
    ToolSpec,
    Usage,
)

TOOL_OUTPUT_CHARS = 4000  # what an agent sees of one tool result
TRACE_CHARS = 4000  # what a tool call's span records of its arguments and of its result
DELEGATE = "delegate"
MAX_DEPTH = 3  # sub-agents of sub-agents of sub-agents, no deeper


class LimitExceeded(PyAgentError):
    """An agent went past one of its limits."""


@dataclass
class TurnResult:
    """What a turn produced: the final answer, the last tool result's data, and its cost
    (sub-agents' tokens included)."""

    output: str
    data: dict[str, Any] = field(default_factory=dict)
    tool_calls: int = 0
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0))
    messages: list[Message] = field(default_factory=list)  # what the turn added to its transcript


@dataclass(frozen=True)
class Team:
    """What a turn reaches beyond its agent: the run's agents (to delegate to), a backend for each,
    the workspace their tools work in, where tools come from (by name), and the injection
    detector for agents whose defenses use one."""

    agents: Mapping[str, AgentSpec]
    backend_for: Callable[[AgentSpec], Backend]
    workspace: Workspace
    tool: Callable[[str], Tool] = make_tool
    screen: Screen | None = None

    def context(self, agent: AgentSpec) -> ToolContext:
        """What `agent`'s tools may touch."""
        return ToolContext(self.workspace, allowed_commands=frozenset(agent.permissions.commands),
                           writable=tuple(agent.permissions.paths))


def offered_tools(agents: Iterable[AgentSpec]) -> tuple[ToolSpec, ...]:
    """The tools a model is told about when any of `agents` may act: their tools in order of first
    appearance, plus `delegate` over all their sub-agents. One list for several agents keeps a
    shared conversation's prompt prefix identical from one agent to the next."""
    agents = list(agents)
    names = list(dict.fromkeys(name for agent in agents for name in agent.tools))
    specs = tool_specs(names)
    subagents = list(dict.fromkeys(sub for agent in agents for sub in agent.subagents))
    if subagents:
        specs += (ToolSpec(DELEGATE, "Hand a sub-task to another agent and get its answer back.", {
            "type": "object", "additionalProperties": False, "required": ["agent", "task"],
            "properties": {
                "agent": {"enum": subagents, "description": "The agent to do it."},
                "task": {"type": "string", "maxLength": 2000,
                         "description": "What to do, with everything the agent needs to know."}}}),)
    return specs


def system_prompt(agent: AgentSpec) -> str:
    return f"{agent.role}\n\nUse your tools when you need them; answer when you are done."


def run_turn(agent: AgentSpec, transcript: list[Message], team: Team, span: Span,
             tools: tuple[ToolSpec, ...] | None = None, depth: int = 0) -> TurnResult:
    """Let `agent` act on `transcript` (which ends with its instruction) until it answers.

    `tools` is what the model is told about (default: the agent's own); it may call only the
    agent's own tools, and `delegate` while `depth` is below MAX_DEPTH.
    """
    tools = offered_tools([agent]) if tools is None else tools
    allowed = [*agent.tools, *([DELEGATE] if agent.subagents and depth < MAX_DEPTH else [])]
    backend = team.backend_for(agent)
    result = TurnResult(output="")
    deadline = time.monotonic() + agent.limits.wall_time_s
    guard = guard_for(agent, transcript, team, span.run_id)
    while True:
        now = next_tools(agent, allowed, result.tool_calls)
        request = turn_request(agent, guard.view(shown(agent, transcript) + result.messages),
                               tools, now or allowed, bool(now),
                               required=bool(now) and bool(agent.procedure))
        with span.child("llm_call", f"chat {agent.model or backend.name}",
                        **{"gen_ai.operation.name": "chat",
                           "gen_ai.request.model": agent.model or ""}) as call:
            completion = _complete(backend, request, deadline, agent)
            call.update({"gen_ai.response.model": completion.model,
                         "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
                         "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
                         "pyagent.usage.cached_tokens": completion.usage.cached_tokens,
                         "gen_ai.usage.cache_creation.input_tokens":
                             completion.usage.cache_write_tokens,
                         "pyagent.time_to_first_token_s":
                             completion.timings.time_to_first_token_s,
                         "gen_ai.response.finish_reasons": [completion.finish_reason]})
            if completion.kv_peak_bytes is not None:
                call.set("pyagent.kv.peak_bytes", completion.kv_peak_bytes)
            if completion.timings.queue_s is not None:
                call.set("pyagent.queue_s", completion.timings.queue_s)
        result.usage = _add(result.usage, completion.usage)
        if guard.flagged:
            span.set("pyagent.defense.flagged", guard.flagged)
        result.messages.append(Message("assistant", completion.text,
                                       tool_calls=completion.tool_calls))
        if not completion.tool_calls:
            result.output = completion.text
            span.set("pyagent.agent.output", clip(completion.text))
            return result
        for tool_call in completion.tool_calls:
            if time.monotonic() > deadline:
                raise _past_wall_time(agent)
            expected = next_tools(agent, allowed, result.tool_calls)
            if result.tool_calls >= agent.limits.max_tool_calls:
                output = (f"not run: agent {agent.name!r} has used all "
                          f"{agent.limits.max_tool_calls} of its tool calls")
            elif agent.procedure and tool_call.name not in expected:
                output = (f"not run: agent {agent.name!r}'s procedure calls "
                          f"{expected[0] if expected else 'nothing more'} next")
            else:
                result.tool_calls += 1
                output = _call_tool(tool_call, agent, allowed, team, span, depth, result)
            result.messages.append(Message("tool", output, tool_call_id=tool_call.id))


def shown(agent: AgentSpec, transcript: list[Message]) -> list[Message]:
    """`transcript` with the agent's demonstrations as earlier exchanges just before its last
    message (the instruction), so the conversation before it stays a shared prefix."""
    if not agent.demonstrations:
        return transcript
    return [*transcript[:-1], *demonstration_messages(agent.demonstrations), *transcript[-1:]]


def demonstration_messages(demos: Iterable[Demonstration]) -> list[Message]:
    """Worked examples as the messages of a finished exchange: the task, each call and its
    result, the answer."""
    messages = []
    for index, demo in enumerate(demos):
        messages.append(Message("user", demo.task))
        for number, step in enumerate(demo.steps):
            call = ToolCall(f"example-{index}-{number}", step.call, json.dumps(step.arguments))
            messages += [Message("assistant", "", tool_calls=(call,)),
                         Message("tool", step.result, tool_call_id=call.id)]
        messages.append(Message("assistant", demo.answer))
    return messages


def next_tools(agent: AgentSpec, allowed: list[str], calls: int) -> list[str]:
    """The tools `agent` may call after `calls` calls in its turn: none once its limit or its
    procedure is used up, the procedure's next tool while it lasts, else all it is `allowed`."""
    if calls >= agent.limits.max_tool_calls:
        return []
    if agent.procedure:
        return [agent.procedure[calls]] if calls < len(agent.procedure) else []
    return allowed


def turn_request(agent: AgentSpec, messages: list[Message], tools: tuple[ToolSpec, ...],
                 allowed: list[str], may_call: bool = True,
                 required: bool = False) -> CompletionRequest:
    """The request a turn sends its backend for `messages` (as the model reads them); with
    `required`, the model must call one of `allowed`."""
    return CompletionRequest(
        messages=tuple(messages), model=agent.model,
        sampling=SamplingParams(max_tokens=agent.limits.max_tokens), tools=tools,
        tool_choice=("required" if required else "auto") if may_call else "none",
        allowed_tools=tuple(allowed) if tools else None)


def guard_for(agent: AgentSpec, transcript: list[Message], team: Team, seed: str) -> Guard:
    """The guard that applies `agent`'s defenses to a turn on `transcript`, whose last user
    message is the instruction it repeats when sandwiching."""
    instruction = next((m.content for m in reversed(transcript) if m.role == "user"), "")
    return Guard(agent.defenses, instruction, seed, team.screen)


def _complete(backend: Backend, request: CompletionRequest, deadline: float,
              agent: AgentSpec) -> Completion:
    """The backend's completion of `request`, streamed so that the agent's wall time interrupts
    a generation in progress: past `deadline` the stream is closed, which cancels the request."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _past_wall_time(agent)
    stream = None
    try:
        stream = backend.stream(replace(request, timeout_s=left))
        for event in stream:
            if event.completion is not None:
                return event.completion
            if time.monotonic() > deadline:
                raise _past_wall_time(agent)
    except BackendError:
        if time.monotonic() >= deadline:  # the backend gave up at the time it was given
            raise _past_wall_time(agent) from None
        raise
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    raise PyAgentError(f"{backend.name}: the stream ended without a completion")


def _past_wall_time(agent: AgentSpec) -> LimitExceeded:
    return LimitExceeded(f"agent {agent.name!r} ran past its wall time of "
                         f"{agent.limits.wall_time_s:g} s")


def _call_tool(tool_call: ToolCall, agent: AgentSpec, allowed: list[str], team: Team,
               span: Span, depth: int, result: TurnResult) -> str:
    """Run one call; what the agent reads back (an error included)."""
    name = tool_call.name
    try:
        with span.child("tool_call", f"execute_tool {name}",
                        **{"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                           "gen_ai.tool.call.id": tool_call.id,
                           "gen_ai.tool.call.arguments": clip(tool_call.arguments or "")}
                        ) as call:
            if name not in allowed:
                raise ToolError(f"agent {agent.name!r} may not call {name!r}; its tools: "
                                f"{', '.join(allowed) or 'none'}")
            arguments = _arguments(tool_call)
            if name == DELEGATE:
                outcome = _delegate(agent, arguments, team, call, depth, result)
            else:
                outcome = team.tool(name).call(arguments, team.context(agent))
            call.update({"pyagent.tool.output_chars": len(outcome.output),
                         "gen_ai.tool.call.result": clip(outcome.output)})
    except ToolError as exc:
        return f"failed: {exc}"
    result.data = dict(outcome.data)
    return outcome.output[-TOOL_OUTPUT_CHARS:]


def clip(text: str) -> str:
    """A text as a span records it (a tool's arguments or result, an answer, a task): at most
    TRACE_CHARS, the end elided."""
    if len(text) <= TRACE_CHARS:
        return text
    return f"{text[:TRACE_CHARS]}... [{len(text) - TRACE_CHARS} more characters]"


def _arguments(tool_call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(tool_call.arguments or "{}")
    except ValueError as exc:
        raise ToolError(f"the arguments of {tool_call.name} are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments of {tool_call.name} must be a JSON object")
    return arguments


def _delegate(agent: AgentSpec, arguments: dict[str, Any], team: Team, span: Span, depth: int,
              result: TurnResult) -> ToolResult:
    """Run the sub-agent `arguments` names on its task, in a fresh context."""
    name, task = arguments.get("agent"), arguments.get("task")
    if name not in agent.subagents:
        raise ToolError(f"agent {agent.name!r} may delegate only to "
                        f"{', '.join(agent.subagents)}; got {name!r}")
    if not isinstance(task, str) or not task.strip():
        raise ToolError("delegate needs a non-empty task")
    sub = team.agents[name]
    with span.child("agent", f"invoke_agent {sub.name}",
                    **{"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": sub.name,
                       "pyagent.parent_agent": agent.name, "pyagent.depth": depth + 1}) as sub_span:
        transcript = [Message("system", system_prompt(sub)), Message("user", task)]
        try:
            sub_result = run_turn(sub, transcript, team, sub_span, depth=depth + 1)
        except LimitExceeded as exc:
            raise ToolError(f"sub-agent {sub.name!r} failed: {exc}") from None
    result.usage = _add(result.usage, sub_result.usage)
    return ToolResult(sub_result.output, {**sub_result.data, "agent": sub.name,
                                          "tool_calls": sub_result.tool_calls})


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                 a.cached_tokens + b.cached_tokens, a.cache_write_tokens + b.cache_write_tokens)
