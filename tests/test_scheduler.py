"""Continuous batching: a request's output is the same alone or in a batch, the KV budget bounds
what runs at once, a full queue is refused with a retry hint, a cancelled or disconnected request
frees its sequence, and the server keeps serving many concurrent streaming clients."""

import asyncio
import json
import threading
import time

import httpx
import pytest

from conftest import LoopbackServer, build_tiny_model
from pyagent.engine.generate import Engine, KVSettings
from pyagent.engine.model import load
from pyagent.engine.registry import resolve_model
from pyagent.engine.scheduler import SchedulerSettings
from pyagent.engine.server import create_app
from pyagent.errors import OverloadedError, RequestError
from pyagent.types import CompletionRequest, SamplingParams

PROMPTS = ["The quick brown fox", "def add(a, b):", "Once upon a time there", "1, 2, 3, 4,",
           "The capital of", "import os\nimport", "Dear team,", "a b c d e f g"]


def greedy(prompt: str, tokens: int = 24, **sampling) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, sampling=SamplingParams(
        max_tokens=tokens, ignore_eos=True, **{"temperature": 0.0, **sampling}))


def concurrently(engine: Engine, requests: list[CompletionRequest]) -> list:
    """Run `requests` at once from threads, the main thread driving the scheduler."""
    results: list = [None] * len(requests)
    submitted = threading.Barrier(len(requests) + 1)

    def client(i: int) -> None:
        ticket = engine.submit(requests[i])
        submitted.wait()
        *_, last = ticket
        results[i] = last.completion

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    submitted.wait()
    engine.scheduler.run(stop=lambda: not any(t.is_alive() for t in threads))
    return results


def tiny(tiny_model_dir, quantize=None, **scheduling) -> Engine:
    return Engine(load(resolve_model(str(tiny_model_dir)), quantize=quantize),
                  kv=KVSettings(share_prefix=False), scheduling=SchedulerSettings(**scheduling))


@pytest.mark.parametrize("quantize,invariant", [(None, True), ("int8", None), ("bf16", None)])
def test_outputs_are_identical_alone_and_in_a_batch(tiny_model_dir, quantize, invariant):
    engine = tiny(tiny_model_dir, quantize, batch_invariant=invariant)
    requests = [greedy(p) for p in PROMPTS[:6]] + [greedy(PROMPTS[6], temperature=0.9, seed=7)]
    alone = [engine.generate(r) for r in requests]
    steps = engine.scheduler.steps
    batched = concurrently(engine, requests)
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.usage.completion_tokens == 24 for c in batched)
    assert engine.scheduler.steps - steps < sum(c.usage.completion_tokens for c in alone) / 2
    assert engine.cache.memory().bytes == 0  # every sequence let go of its blocks


def test_generate_many_runs_every_pass_on_its_own_thread(tiny_model_dir):
    """No other thread may run a pass: OpenMP then keeps a second pool of workers, and every
    parallel region of the caller's passes wakes its workers slowly."""
    engine = tiny(tiny_model_dir, "int8")
    threads, forward = set(), engine.forward_batch

    def recording(*args, **kwargs):
        threads.add(threading.get_ident())
        return forward(*args, **kwargs)

    engine.forward_batch = recording
    results = engine.generate_many([greedy(p, 6) for p in PROMPTS[:5]])
    assert threads == {threading.get_ident()}
    assert [r.usage.completion_tokens for r in results[:5]] == [6] * 5
    alone = [engine.generate(greedy(p, 6)).text for p in PROMPTS[:5]]
    assert [r.text for r in results[:5]] == alone


def test_concurrent_requests_share_a_cached_prefix(tiny_model_dir):
    engine = Engine(load(resolve_model(str(tiny_model_dir))), kv=KVSettings(block_size=16))
    system = "You are the reviewer agent of a small code team. " * 2
    first = engine.generate(greedy(system + "Go.", tokens=4))
    assert first.usage.cached_tokens == 0
    others = concurrently(engine, [greedy(system + f"Task {i}.", tokens=4) for i in range(4)])
    shared = len(engine.tokenize(system)) // 16 * 16
    assert shared >= 32 and all(c.usage.cached_tokens >= shared - 16 for c in others)


def test_float32_pads_decode_passes_only_when_asked(tiny_model_dir):
    def shape(**kwargs):
        scheduler = tiny(tiny_model_dir, **kwargs).scheduler
        return scheduler.pad_rows, scheduler.fused

    assert shape() == (0, True)
    assert shape(batch_invariant=True, max_batch=4) == (4, False)
    assert shape(quantize="int8", batch_invariant=True) == (0, False)
    assert shape(quantize="bf16", max_batch=6) == (6, False)


@pytest.mark.parametrize("quantize", [None, "bf16", "int8"])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_model_dir, quantize):
    engine = Engine(load(resolve_model(str(tiny_model_dir)), quantize=quantize),
                    kv=KVSettings(share_prefix=False, prefill_chunk=16),
                    scheduling=SchedulerSettings(step_tokens=20, max_batch=4))
    passes: list[list[int]] = []
    forward = engine.forward_batch

    def recording(items, *args, **kwargs):
        passes.append([len(tokens) for _, tokens in items])
        return forward(items, *args, **kwargs)

    engine.forward_batch = recording
    long = greedy("The quick brown fox jumps over the lazy dog. " * 8, tokens=4)
    concurrently(engine, [greedy("Hi", tokens=30), long])
    assert max(n for p in passes for n in p) == 16 and [16] * 2 not in passes
    if quantize is None:  # one pass per step: the decode token rides along with the chunk
        assert sum(p == [16, 1] for p in passes) >= 3
    else:  # a pass per chunk, with decode passes (bf16: of a fixed 4 rows) in between
        decode = [1] * 4 if quantize == "bf16" else [1]
        chunks = [i for i, p in enumerate(passes) if p == [16]]
        assert decode in passes[chunks[0]:chunks[-1]]
        assert all(len(p) == 1 or set(p) == {1} for p in passes)  # never a chunk with a decode
        if quantize == "bf16":
            assert all(len(p) in (1, 4) for p in passes)


def test_the_kv_budget_bounds_what_runs_at_once(tiny_model_dir):
    engine = Engine(load(resolve_model(str(tiny_model_dir))),
                    kv=KVSettings(share_prefix=False, max_tokens=160))
    need = engine.kv_reservation(len(engine.tokenize(PROMPTS[0])), 24)["global"]
    assert 2 * need <= 160 < 3 * need
    running: list[int] = []
    step = engine.scheduler._step

    def watched() -> None:
        running.append(engine.scheduler.load()["running"])
        assert engine.scheduler.load()["reserved_global"] <= 160
        step()

    engine.scheduler._step = watched
    results = concurrently(engine, [greedy(PROMPTS[0]) for _ in range(5)])
    assert max(running) == 2 and all(c.usage.completion_tokens == 24 for c in results)
    assert engine.scheduler.load() == {"running": 0, "waiting": 0, "reserved_global": 0,
                                       "reserved_sliding": 0}


def test_a_full_queue_is_refused_with_a_retry_hint(tiny_model_dir):
    engine = tiny(tiny_model_dir, max_batch=1, max_queue=1)
    first, second = engine.submit(greedy("a")), engine.submit(greedy("b"))
    with pytest.raises(OverloadedError, match=r"1 waiting|2 waiting") as caught:
        engine.submit(greedy("c"))
    assert caught.value.retry_after >= 1 and caught.value.code == "overloaded"
    assert [e.completion for e in first][-1].usage.completion_tokens == 24
    assert [e.completion for e in second][-1].usage.completion_tokens == 24
    assert engine.generate(greedy("d")).usage.completion_tokens == 24  # room again


def test_closing_a_stream_cancels_its_request(tiny_model_dir):
    engine = tiny(tiny_model_dir)
    events = engine.stream(greedy("The quick brown fox", tokens=200))
    next(events)
    assert engine.cache.memory().bytes > 0
    events.close()
    assert engine.scheduler.load()["running"] == 0
    assert engine.cache.memory().bytes == 0
    assert engine.generate(greedy("fox")).usage.completion_tokens == 24


def test_shutdown_ends_queued_requests_and_refuses_new_ones(tiny_model_dir):
    engine = tiny(tiny_model_dir)
    ticket = engine.submit(greedy("a"))
    engine.shutdown()
    with pytest.raises(OverloadedError, match="shut down"):
        list(ticket)
    with pytest.raises(OverloadedError, match="shutting down") as caught:
        engine.submit(greedy("b"))
    assert caught.value.code == "engine_closed"


def test_a_background_driver_serves_event_loops_and_ends_when_idle(tiny_model_dir):
    engine = tiny(tiny_model_dir)

    async def ask() -> str:
        ticket = engine.submit(greedy("fox"), loop=asyncio.get_running_loop())
        return "".join([event.delta async for event in ticket])

    assert len(asyncio.run(ask())) > 0
    drivers = [t for t in threading.enumerate() if t.name == "pyagent-scheduler"]
    assert drivers
    for thread in drivers:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in drivers)
    assert engine.scheduler.load()["running"] == 0


def test_requests_are_validated_before_they_queue(tiny_model_dir):
    engine = tiny(tiny_model_dir)
    with pytest.raises(RequestError, match="context"):
        engine.submit(greedy("word " * 300, tokens=10_000))
    assert engine.scheduler.load()["waiting"] == 0


# --- the server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny model with 8k positions: room for requests that run long enough to interrupt."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-long"), context=8192)


def sse_text(lines: list[str]) -> str:
    chunks = [json.loads(line[6:]) for line in lines
              if line.startswith("data: {") and '"choices"' in line]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_server_answers_429_with_retry_after_when_full(long_model_dir):
    engine = tiny(long_model_dir, max_batch=1, max_queue=0)
    with LoopbackServer(create_app(engine)) as server, httpx.Client(timeout=60) as http:
        body = {"model": engine.name, "prompt": "The quick", "max_tokens": 8000,
                "ignore_eos": True, "stream": True}
        with http.stream("POST", f"{server.base_url}/completions", json=body) as busy:
            lines = busy.iter_lines()
            assert next(lines).startswith("data: ")
            refused = http.post(f"{server.base_url}/completions",
                                json={**body, "stream": False, "max_tokens": 4})
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "overloaded"
        deadline = time.monotonic() + 30
        while engine.scheduler.load()["running"]:  # the closed stream is cancelled
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ok = http.post(f"{server.base_url}/completions",
                       json={**body, "stream": False, "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert engine.cache.memory().bytes == 0
        engine.shutdown()
        closed = http.post(f"{server.base_url}/completions", json={**body, "stream": False})
        assert closed.status_code == 503 and "retry-after" in closed.headers


def test_server_cancels_a_non_streaming_request_whose_client_left(long_model_dir):
    engine = tiny(long_model_dir)
    with LoopbackServer(create_app(engine)) as server:
        body = {"model": engine.name, "prompt": "The quick", "max_tokens": 8000,
                "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.base_url}/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 30
        while engine.scheduler.load()["running"] or engine.cache.memory().bytes:
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.05)
        assert engine.scheduler.steps < 7000  # stopped long before its 8000 tokens


def test_load_many_concurrent_streaming_clients(tiny_model_dir):
    """32 streaming clients at once on loopback: every stream completes, well-formed, with the
    text the same request gets alone (int8: batch-invariant)."""
    engine = tiny(tiny_model_dir, "int8", max_batch=8, max_queue=64)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    alone = [engine.generate(greedy(p, tokens=16)).text for p in prompts]

    async def client(http: httpx.AsyncClient, base: str, prompt: str) -> tuple[str, dict]:
        body = {"model": engine.name, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", f"{base}/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][6:])["usage"]
        return sse_text(lines), usage

    async def main(base: str) -> list[tuple[str, dict]]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(client(http, base, p) for p in prompts))

    with LoopbackServer(create_app(engine)) as server:
        results = asyncio.run(main(server.base_url))
    assert [text for text, _ in results] == alone
    assert all(usage["completion_tokens"] == 16 for _, usage in results)
    assert engine.cache.memory().bytes == 0


@pytest.mark.model
@pytest.mark.parametrize("quantize", ["int8", "bf16"])
def test_real_model_outputs_are_identical_alone_and_in_a_batch(quantize):
    engine = Engine.load(quantize=quantize, kv=KVSettings(share_prefix=False))
    requests = [greedy(p, tokens=32) for p in PROMPTS[:8]]
    alone = [engine.generate(r).text for r in requests]
    assert [c.text for c in concurrently(engine, requests)] == alone
