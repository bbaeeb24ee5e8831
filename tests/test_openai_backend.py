"""The `openai` backend against PyAgent's own server, started on loopback."""

import socket
import time

import pytest

from pyagent.errors import BackendError, BackendUnavailableError
from pyagent.llm.openai import OpenAIBackend
from pyagent.types import CompletionRequest, Message, SamplingParams


def ask(**kwargs) -> CompletionRequest:
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    return CompletionRequest(sampling=sampling, **kwargs)


def test_text_completion_carries_server_usage_and_client_timings(tiny_server, tiny_engine):
    backend = OpenAIBackend(tiny_server.base_url, max_retries=0)
    completion = backend.complete(ask(prompt="The quick"))
    direct = tiny_engine.generate(ask(prompt="The quick"))
    assert completion.text == direct.text
    assert completion.usage == direct.usage
    assert (completion.backend, completion.model) == ("openai", tiny_engine.name)
    assert 0 < completion.timings.time_to_first_token_s <= completion.timings.total_s


def test_chat_stream_deltas_add_up(tiny_server, tiny_engine):
    backend = OpenAIBackend(tiny_server.base_url, model=tiny_engine.name, max_retries=0)
    events = list(backend.stream(ask(messages=(Message("user", "Hi"),))))
    final = events[-1].completion
    assert final is not None and final.finish_reason == "length"
    assert "".join(e.delta for e in events) == final.text
    assert final.usage.completion_tokens == 12


def test_an_unreachable_server_is_reported_quickly():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", model="m", max_retries=0)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"cannot reach .*127.0.0.1:{port}"):
        backend.complete(ask(prompt="x"))
    assert time.monotonic() - start < 10


def test_a_server_side_refusal_is_explained(tiny_server):
    backend = OpenAIBackend(tiny_server.base_url, model="gpt-9", max_retries=0)
    with pytest.raises(BackendError, match=r"HTTP 404: the model 'gpt-9' does not exist"):
        backend.complete(ask(prompt="x"))


@pytest.mark.model
def test_real_model_through_the_server_matches_the_engine(model_server, engine):
    backend = OpenAIBackend(model_server.base_url, max_retries=0)
    request = CompletionRequest(prompt="The three primary colors are",
                                sampling=SamplingParams(max_tokens=12))
    remote = backend.complete(request)
    local = engine.generate(request)
    assert remote.text == local.text
    assert remote.usage == local.usage
    assert remote.model == "gemma-3-270m"


@pytest.mark.parametrize("name", ["first", "second"])
def test_a_required_call_to_one_allowed_tool_is_sent_as_a_named_tool_choice(tiny_server,
                                                                           tiny_engine, name):
    from pyagent.types import ToolSpec

    empty = {"type": "object", "properties": {}, "additionalProperties": False}
    tools = (ToolSpec("first", "One tool.", empty), ToolSpec("second", "Another.", empty))
    backend = OpenAIBackend(tiny_server.base_url, model=tiny_engine.name, max_retries=0)
    request = CompletionRequest(messages=(Message("user", "Go."),), tools=tools,
                                tool_choice="required", allowed_tools=(name,),
                                sampling=SamplingParams(max_tokens=64))
    completion = backend.complete(request)
    assert [c.name for c in completion.tool_calls] == [name]
