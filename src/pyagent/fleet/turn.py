"""One agent turn: the agent acts (a tool call or its final answer) until it answers or runs out
of tool calls.

Every action is JSON constrained by a schema that admits exactly the agent's tools with their
argument schemas, or `{"final": "..."}`: the embedded engine enforces it while decoding, and
OpenAI-compatible servers through structured outputs. So even a small model's action always
parses and validates; what it decides may still be wrong, and the trace records it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pyagent.errors import PyAgentError
from pyagent.fleet.agent import AgentSpec
from pyagent.fleet.tools.base import ToolContext, ToolError
from pyagent.fleet.tools.registry import make_tool
from pyagent.llm.base import Backend
from pyagent.observe.events import Span
from pyagent.types import CompletionRequest, Message, SamplingParams, Usage

TOOL_OUTPUT_CHARS = 4000  # what an agent sees of one tool result


class LimitExceeded(PyAgentError):
    """An agent went past one of its limits."""


@dataclass
class TurnResult:
    """What a turn produced: the final answer, the last tool result's data, and its cost."""

    output: str
    data: dict[str, Any] = field(default_factory=dict)
    tool_calls: int = 0
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0))
    messages: list[Message] = field(default_factory=list)  # what the turn added to its transcript


def action_schema(agent: AgentSpec, tools_allowed: bool) -> dict[str, Any]:
    """JSON schema of one action: a call to one of the agent's tools, or the final answer."""
    final = {"type": "object", "required": ["final"], "additionalProperties": False,
             "properties": {"final": {"type": "string", "maxLength": 2000}}}
    if not tools_allowed or not agent.tools:
        return final
    calls = []
    for name in agent.tools:
        calls.append({"type": "object", "required": ["tool", "arguments"],
                      "additionalProperties": False,
                      "properties": {"tool": {"const": name},
                                     "arguments": make_tool(name).input_schema()}})
    return {"anyOf": [*calls, final]}


def system_prompt(agent: AgentSpec) -> str:
    tools = "\n".join(f"- {make_tool(name).name}: {make_tool(name).description}"
                      for name in agent.tools) or "- (none)"
    return (f"{agent.role}\n\nYou act by replying with one JSON object: either "
            '{"tool": NAME, "arguments": {...}} to call a tool, or {"final": "..."} when done.\n'
            f"Tools:\n{tools}")


def run_turn(agent: AgentSpec, backend: Backend, transcript: list[Message], context: ToolContext,
             span: Span) -> TurnResult:
    """Let `agent` act on `transcript` (which ends with its instruction) until it answers."""
    result = TurnResult(output="")
    deadline = time.monotonic() + agent.limits.wall_time_s
    while True:
        tools_allowed = result.tool_calls < agent.limits.max_tool_calls
        request = CompletionRequest(
            messages=tuple(transcript + result.messages), model=agent.model,
            sampling=SamplingParams(max_tokens=agent.limits.max_tokens,
                                    json_schema=action_schema(agent, tools_allowed)))
        with span.child("llm_call", f"chat {agent.model or backend.name}",
                        **{"gen_ai.operation.name": "chat",
                           "gen_ai.request.model": agent.model or ""}) as call:
            completion = backend.complete(request)
            call.update({"gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
                         "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
                         "pyagent.usage.cached_tokens": completion.usage.cached_tokens,
                         "pyagent.finish_reason": completion.finish_reason})
        result.usage = _add(result.usage, completion.usage)
        result.messages.append(Message("assistant", completion.text))
        action = _parse(completion.text)
        if action is None or "final" in action:
            result.output = completion.text if action is None else action["final"]
            return result
        if time.monotonic() > deadline:
            raise LimitExceeded(f"agent {agent.name!r} ran past its wall time of "
                                f"{agent.limits.wall_time_s:g} s")
        result.tool_calls += 1
        result.messages.append(Message("tool", _call_tool(action, context, span, result)))


def _call_tool(action: dict[str, Any], context: ToolContext, span: Span,
               result: TurnResult) -> str:
    name = action["tool"]
    with span.child("tool_call", f"execute_tool {name}",
                    **{"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name}) as call:
        try:
            outcome = make_tool(name).call(action.get("arguments", {}), context)
        except ToolError as exc:
            call.set("error.type", "ToolError").set("pyagent.tool.error", str(exc))
            return f"{name} failed: {exc}"
        call.set("pyagent.tool.output_chars", len(outcome.output))
    result.data = dict(outcome.data)
    return f"{name} result:\n{outcome.output[-TOOL_OUTPUT_CHARS:]}"


def _parse(text: str) -> dict[str, Any] | None:
    """The action in `text`; None when it is not a JSON object (a length-cut reply)."""
    try:
        action = json.loads(text)
    except ValueError:
        return None
    return action if isinstance(action, dict) else None


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                 a.cached_tokens + b.cached_tokens)
