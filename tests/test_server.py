"""The OpenAI-compatible server, driven over real HTTP on loopback."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest


@pytest.fixture
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.base_url, timeout=60) as client:
        yield client


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0)


def model_name(http):
    return http.get("/models").json()["data"][0]["id"]


def test_models_lists_the_served_model(http, tiny_engine):
    body = http.get("/models").json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == tiny_engine.name
    assert body["data"][0]["context_length"] == 256


def test_completion_matches_the_engine(client, tiny_engine):
    from pyagent.types import CompletionRequest, SamplingParams

    response = client.completions.create(model=tiny_engine.name, prompt="The quick",
                                         max_tokens=10, temperature=0, extra_body={
                                             "ignore_eos": True})
    direct = tiny_engine.generate(CompletionRequest(
        prompt="The quick", sampling=SamplingParams(max_tokens=10, ignore_eos=True)))
    assert response.choices[0].text == direct.text
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == direct.usage.prompt_tokens
    assert response.usage.completion_tokens == 10
    assert response.model_extra["timings"]["total_s"] > 0


def test_chat_streaming_sends_role_deltas_usage_and_done(http, tiny_engine):
    body = {"model": tiny_engine.name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    plain = http.post("/chat/completions", json={**body, "stream": False}).json()
    assert plain["choices"][0]["message"]["content"] == text


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_malformed_json_is_a_400_in_openai_shape(http):
    response = http.post("/completions", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert "JSON" in error_of(response, 400)["message"]


@pytest.mark.parametrize(("change", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": None}, "prompt"),
    ({"n": 2}, "n"),
    ({"logprobs": 3}, "logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_fields_are_named(http, change, param):
    body = {"model": model_name(http), "prompt": "x", **change}
    error = error_of(http.post("/completions", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_missing_messages_and_bad_roles_are_named(http):
    name = model_name(http)
    assert error_of(http.post("/chat/completions", json={"model": name}), 400)["param"] == \
        "messages"
    bad_role = {"model": name, "messages": [{"role": "robot", "content": "x"}]}
    assert error_of(http.post("/chat/completions", json=bad_role), 400)["param"].startswith(
        "messages.0.role")


def test_unknown_model_is_a_404(http):
    error = error_of(http.post("/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]


def test_prompt_longer_than_the_context_is_a_400(http):
    body = {"model": model_name(http), "prompt": "The quick brown fox. " * 200, "max_tokens": 4}
    error = error_of(http.post("/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert "context is 256 tokens" in error["message"]


def test_unknown_route_is_a_404_in_openai_shape(http):
    assert error_of(http.get("/nothing"), 404)["code"] == "not_found"


def test_concurrent_streaming_clients_get_their_own_output(tiny_server, tiny_engine):
    prompts = [f"The quick brown fox {i}" for i in range(6)]

    def stream(prompt):
        client = openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0)
        chunks = client.completions.create(model=tiny_engine.name, prompt=prompt, max_tokens=16,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    alone = [stream(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(stream, prompts * 2))
    assert together == alone * 2


def test_openai_sdk_parses_a_chat_completion(client, tiny_engine):
    response = client.chat.completions.create(
        model=tiny_engine.name, messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text",
                                                                        "text": "Hi"}]}],
        max_completion_tokens=5, temperature=0.7, seed=3)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    again = client.chat.completions.create(
        model=tiny_engine.name, messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}],
        max_completion_tokens=5, temperature=0.7, seed=3)
    prompt = again.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16 > 0


def test_kv_memory_is_exposed(http):
    http.post("/completions", json={"model": model_name(http), "prompt": "The quick brown fox",
                                    "max_tokens": 3})
    body = http.get("/kv").json()
    assert body["peak_bytes"] > 0 and body["bytes"] == sum(body["per_layer"].values())
    assert body["policy"] == "full" and body["block_size"] == 16
