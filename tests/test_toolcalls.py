"""Tool calling: the engine's grammar-constrained calls, PyAgent's server in OpenAI's tool format,
and the `openai` backend's native tool calls against that server on loopback."""

import json

import httpx
import pytest

from pyagent.engine.toolcalls import as_text_messages, call_text, parse_reply, reply_schema
from pyagent.errors import RequestError
from pyagent.llm.openai import OpenAIBackend
from pyagent.types import CompletionRequest, Message, SamplingParams, ToolCall, ToolSpec

READ = ToolSpec("read_file", "Read a file.", {
    "type": "object", "additionalProperties": False, "required": ["path"],
    "properties": {"path": {"type": "string", "maxLength": 12, "description": "Where."}}})
COUNT = ToolSpec("count", "Count to n.", {
    "type": "object", "additionalProperties": False, "required": ["n"],
    "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}})
TOOLS = (READ, COUNT)


def chat(*messages, **kw):
    sampling = kw.pop("sampling", SamplingParams(max_tokens=60))
    return CompletionRequest(messages=messages, tools=kw.pop("tools", TOOLS), sampling=sampling,
                             **kw)


def test_the_reply_schema_follows_tool_choice_and_allowed_tools():
    question = Message("user", "hi")
    auto = reply_schema(chat(question))
    assert len(auto["anyOf"]) == 3 and auto["anyOf"][-1]["required"] == ["final"]
    required = reply_schema(chat(question, tool_choice="required", allowed_tools=("count",)))
    assert required["properties"]["tool"] == {"const": "count"}
    assert reply_schema(chat(question, tool_choice="none"))["required"] == ["final"]
    assert reply_schema(chat(question, tools=())) is None


def test_bad_tool_requests_name_the_field():
    question = Message("user", "hi")
    with pytest.raises(RequestError) as info:
        chat(question, allowed_tools=("write_file",))
    assert info.value.param == "allowed_tools"
    with pytest.raises(RequestError, match="unique"):
        chat(question, tools=(READ, READ))
    with pytest.raises(RequestError, match="needs at least one tool"):
        chat(question, tools=(), tool_choice="required")
    with pytest.raises(RequestError, match="tool_call_id"):
        Message("tool", "result")
    with pytest.raises(RequestError, match="only assistant"):
        Message("user", "x", tool_calls=(ToolCall("c1", "count", "{}"),))
    with pytest.raises(RequestError) as info:
        chat(question, sampling=SamplingParams(json_schema={"type": "object"}))
    assert info.value.param == "response_format"


def test_calls_and_results_are_written_back_as_the_model_writes_them():
    call = ToolCall("c1", "read_file", '{"path":"a.py"}')
    plain = as_text_messages([Message("user", "go"), Message("assistant", "", tool_calls=(call,)),
                              Message("tool", "print(1)", tool_call_id="c1")], TOOLS)
    assert plain[0].role == "system" and "read_file: Read a file." in plain[0].content
    assert "path (string, required): Where." in plain[0].content
    assert "n (integer, required)" in plain[0].content
    assert plain[2] == Message("assistant", call_text(call))
    assert plain[3] == Message("user", "Result of read_file:\nprint(1)")
    text, calls = parse_reply(call_text(call), "prompt")
    assert text == "" and calls[0].arguments == call.arguments and calls[0].name == "read_file"
    assert parse_reply(call_text(call), "prompt") == (text, calls)  # ids are repeatable
    assert parse_reply(call_text(call), "other")[1][0].id != calls[0].id
    assert parse_reply('{"final":"done"}', "p") == ("done", ())
    assert parse_reply('{"tool":"read_fi', "p") == ("", ())  # a cut call: no framing
    assert parse_reply('{"final":"half an ans', "p") == ("half an ans", ())  # cut by max_tokens
    assert parse_reply('{"final":"a \\', "p") == ("a ", ())


@pytest.mark.parametrize("seed", range(4))
def test_a_random_model_always_makes_a_valid_call(agent_engine, seed):
    request = chat(Message("user", "Read a.py"), tool_choice="required",
                   sampling=SamplingParams(max_tokens=120, temperature=1.0, seed=seed))
    completion = agent_engine.generate(request)
    assert completion.finish_reason == "tool_calls" and completion.text == ""
    (call,) = completion.tool_calls
    arguments = json.loads(call.arguments)
    if call.name == "read_file":
        assert set(arguments) == {"path"} and len(arguments["path"]) <= 12
    else:
        assert call.name == "count" and 1 <= arguments["n"] <= 9


def test_a_conversation_with_calls_reuses_its_prefix(agent_engine):
    question = Message("user", "Count to three.")
    first = agent_engine.generate(chat(question, tool_choice="required",
                                      allowed_tools=("count",)))
    (call,) = first.tool_calls
    assert call.name == "count"
    after = (question, Message("assistant", "", tool_calls=first.tool_calls),
             Message("tool", "1 2 3", tool_call_id=call.id))
    second = agent_engine.generate(chat(*after, tool_choice="none"))
    assert second.tool_calls == () and second.finish_reason in ("stop", "length")
    assert not second.text.startswith('{"final"')  # the answer, unwrapped
    # every full block of the first prompt and the call the model wrote is served from the cache
    written = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.cached_tokens >= written - agent_engine.kv.block_size


def test_the_server_speaks_openais_tool_format(agent_server, agent_engine):
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                               "parameters": t.parameters}} for t in TOOLS]
    body = {"model": agent_engine.name, "max_tokens": 60, "temperature": 0, "tools": tools,
            "messages": [{"role": "user", "content": "Count to two."}],
            "tool_choice": {"type": "function", "function": {"name": "count"}}}
    with httpx.Client(base_url=agent_server.base_url, timeout=60) as http:
        reply = http.post("/chat/completions", json=body).json()
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        call = choice["message"]["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] == "count"
        assert 1 <= json.loads(call["function"]["arguments"])["n"] <= 9
        chunks = []
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        streamed = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                    if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
        assert streamed[0]["id"] == call["id"]  # same prompt, same reply, same call id
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        orphan = {**body, "messages": [{"role": "tool", "content": "x"}]}
        bad = http.post("/chat/completions", json=orphan)
        assert bad.status_code == 400 and "tool_call_id" in bad.json()["error"]["message"]
        unknown = {**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
        bad = http.post("/chat/completions", json=unknown)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "allowed_tools"


def test_the_openai_backend_uses_native_tool_calls(agent_server, agent_engine):
    backend = OpenAIBackend(agent_server.base_url, model=agent_engine.name, max_retries=0)
    question = Message("user", "Read notes.txt")
    request = chat(question, tool_choice="required", allowed_tools=None)
    remote = backend.complete(request)
    local = agent_engine.generate(request)
    assert remote.tool_calls == local.tool_calls and remote.finish_reason == "tool_calls"
    assert remote.usage.prompt_tokens == local.usage.prompt_tokens
    call = remote.tool_calls[0]
    follow = chat(question, Message("assistant", "", tool_calls=remote.tool_calls),
                  Message("tool", "hello", tool_call_id=call.id), tool_choice="none")
    assert backend.complete(follow).text == agent_engine.generate(follow).text
