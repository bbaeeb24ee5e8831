"""Tool calling on the embedded engine, for any model, whatever its chat template.

The tools are described in a system message at the start of the conversation, and the reply is
grammar-constrained to one JSON object: `{"tool": NAME, "arguments": {...}}` for a call whose
arguments validate against that tool's schema, or `{"final": "..."}` for an answer. The reply then
becomes OpenAI-shaped: a `ToolCall`, or plain text. Earlier calls and their results are written
back into the conversation in the same format, so a conversation that continues re-renders to the
very tokens the model produced and its KV prefix is reused.

A tool's object schemas are closed while decoding (no properties beyond those listed or
required) unless they say otherwise, so a small model cannot wander off into made-up arguments;
and the reply format itself never reaches the caller: a reply cut short yields only the answer
written so far.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pyagent.types import CompletionRequest, Message, ToolCall, ToolSpec

FINAL_MAX_CHARS = 4000
_FINAL = {"type": "object", "required": ["final"], "additionalProperties": False,
          "properties": {"final": {"type": "string", "maxLength": FINAL_MAX_CHARS}}}


def reply_schema(request: CompletionRequest) -> dict[str, Any] | None:
    """The JSON schema of a reply to `request`; None when it offers no tools (free text)."""
    if not request.tools:
        return None
    calls = [{"type": "object", "required": ["tool", "arguments"], "additionalProperties": False,
              "properties": {"tool": {"const": tool.name},
                             "arguments": arguments_schema(tool.parameters, i)}}
             for i, tool in enumerate(request.callable_tools)]
    if request.tool_choice != "required":
        calls.append(_FINAL)
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def arguments_schema(parameters: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """A tool's parameters as the reply format holds them: closed, and a resource of their own
    (`$id`), so that their `$ref`s (`#/$defs/...`, `#`) still point into them though they sit
    inside the reply's schema."""
    schema = closed_schema(parameters)
    return schema if "$id" in schema else {**schema, "$id": f"urn:pyagent:tool-arguments:{index}"}


_SCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # allOf's parts are left open: they combine
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed_schema(schema: Any, close: bool = True) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that does not say
    what other properties it allows, its required properties listed (any value where it does
    not describe them), and the parts of an `allOf` left open at their top (they combine)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYS:
        if key in out:
            out[key] = closed_schema(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(part) for part in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed_schema(part, close=False) for part in out["allOf"]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(part) for name, part in out[key].items()}
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or (
        kind is None and "properties" in out)
    if close and is_object and not any(key in out for key in _OPEN_KEYS):
        out["additionalProperties"] = False
        required = out.get("required")
        properties = out.get("properties", {})
        if isinstance(required, list) and isinstance(properties, dict):
            unlisted = [name for name in required if isinstance(name, str)
                        and name not in properties]
            if unlisted:  # required, so allowed: any value
                out["properties"] = {**properties, **{name: {} for name in unlisted}}
    return out


def tools_prompt(tools: Sequence[ToolSpec]) -> str:
    """How the model learns about `tools` and the reply format."""
    lines = ["You can call these tools. To call one, reply with exactly one JSON object "
             '{"tool": NAME, "arguments": {...}}. When you are done, reply with '
             '{"final": "your answer"}.', "Tools:"]
    for tool in tools:
        lines.append(f"- {tool.name}: {tool.description}")
        required = set(tool.parameters.get("required", ()))
        for name, schema in tool.parameters.get("properties", {}).items():
            need = "required" if name in required else "optional"
            about = f": {schema['description']}" if schema.get("description") else ""
            lines.append(f"    {name} ({_type_name(schema)}, {need}){about}")
    return "\n".join(lines)


def _type_name(schema: dict[str, Any]) -> str:
    """'string', 'integer or null', 'array of string', ... for a property's schema."""
    if "anyOf" in schema:
        return " or ".join(_type_name(option) for option in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type_name(schema.get('items', {}))}"
    return kind if isinstance(kind, str) else " or ".join(kind)


def as_text_messages(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> list[Message]:
    """`messages` as plain text messages any chat template renders: the tools described up front,
    each call written as the JSON the model replies with, each result as a user turn."""
    names = {call.id: call.name for message in messages for call in message.tool_calls}
    plain = [Message("system", tools_prompt(tools))] if tools else []
    for message in messages:
        if message.tool_calls:
            lines = [message.content] if message.content else []
            lines += [call_text(call) for call in message.tool_calls]
            plain.append(Message("assistant", "\n".join(lines)))
        elif message.role == "tool":
            name = names.get(message.tool_call_id or "", "the tool call")
            plain.append(Message("user", f"Result of {name}:\n{message.content}"))
        else:
            plain.append(message)
    return plain


def call_text(call: ToolCall) -> str:
    """A call as the model writes it."""
    return f'{{"tool":{json.dumps(call.name, ensure_ascii=False)},"arguments":{call.arguments}}}'


def parse_reply(text: str, context: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The answer text and tool calls in a constrained reply. `context` (the prompt) makes call
    ids unique per conversation and repeatable: the same prompt and reply give the same id."""
    try:
        action = json.loads(text)
    except ValueError:  # cut short by max_tokens: the answer so far, if any
        return _cut_answer(text), ()
    if not isinstance(action, dict) or "tool" not in action:
        final = action.get("final") if isinstance(action, dict) else None
        return (final if isinstance(final, str) else ""), ()
    name = action["tool"]
    head = f'{{"tool":{json.dumps(name, ensure_ascii=False)},"arguments":'
    if text.startswith(head) and text.endswith("}"):
        arguments = text[len(head):-1]  # exactly as written, so it re-renders to the same tokens
    else:
        arguments = json.dumps(action.get("arguments", {}), separators=(",", ":"))
    digest = hashlib.sha256(f"{context}\x00{text}".encode()).hexdigest()[:24]
    return "", (ToolCall(f"call_{digest}", name, arguments),)


def _cut_answer(text: str) -> str:
    """The answer in a `{"final": "...` reply cut short; "" for a call cut short."""
    if text.startswith('{"final":"'):
        for ending in ('"}', '\\"}'):  # a cut may fall right after a backslash
            try:
                return json.loads(text + ending)["final"].rstrip("\\")
            except ValueError:
                continue
    return ""
