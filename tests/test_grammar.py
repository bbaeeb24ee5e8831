"""Grammar-constrained JSON: even a random-weight model emits output that parses and validates."""

import json

import httpx
import pytest

from pyagent.errors import RequestError
from pyagent.fleet.tools.registry import tool_specs
from pyagent.types import CompletionRequest, Message, SamplingParams

ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
          "required": ["answer", "count"], "additionalProperties": False}
TOOL_CALL = {"type": "object", "additionalProperties": False, "required": ["tool", "arguments"],
             "properties": {"tool": {"enum": ["read_file", "write_file"]},
                            "arguments": {"type": "object", "required": ["path"],
                                          "additionalProperties": False,
                                          "properties": {"path": {"type": "string",
                                                                  "maxLength": 40}}}}}


def ask(prompt: str, schema: dict, seed: int | None = None, **kw) -> CompletionRequest:
    sampling = SamplingParams(max_tokens=48, json_schema=schema, seed=seed, **kw)
    return CompletionRequest(prompt=prompt, sampling=sampling)


@pytest.mark.parametrize("seed", range(5))
def test_sampled_output_always_matches_the_schema(tiny_engine, seed):
    completion = tiny_engine.generate(ask("The quick", ANSWER, seed=seed, temperature=1.0))
    data = json.loads(completion.text)
    assert data["answer"] in ("yes", "no") and isinstance(data["count"], int)
    assert set(data) == {"answer", "count"}


def test_an_invalid_schema_is_refused(tiny_engine):
    with pytest.raises(RequestError, match="not a usable JSON schema"):
        tiny_engine.stream(ask("x", {"type": "no-such-type"}))
    with pytest.raises(RequestError, match="json_schema must be"):
        SamplingParams(json_schema="{}")


def test_the_server_honours_response_format(tiny_server, tiny_engine):
    with httpx.Client(base_url=tiny_server.base_url, timeout=60) as http:
        body = {"model": tiny_engine.name, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 48, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}}
        reply = http.post("/chat/completions", json=body).json()
        assert json.loads(reply["choices"][0]["message"]["content"])["answer"] in ("yes", "no")
        bad = http.post("/chat/completions", json={**body, "response_format": {
            "type": "json_schema"}})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"].startswith("response_format")


@pytest.mark.model
def test_the_embedded_model_makes_the_tool_call_asked_for(engine):
    request = CompletionRequest(
        messages=(Message("user", "Read the file src/app.py."),), tool_choice="required",
        tools=tool_specs(["read_file", "write_file", "list_files"]),
        sampling=SamplingParams(max_tokens=60))
    (call,) = engine.generate(request).tool_calls
    assert call.name == "read_file" and json.loads(call.arguments)["path"] == "src/app.py"
    text = engine.generate(ask("Call a tool to read the file src/app.py. Answer with JSON:\n",
                               TOOL_CALL)).text
    assert json.loads(text) == {"tool": "read_file", "arguments": {"path": "src/app.py"}}
