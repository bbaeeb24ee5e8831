"""Continuous batching: one stream against 8 concurrent agents, through the HTTP server.

    .venv/bin/python benchmarks/batching.py [--precisions float32,int8,bf16] [--clients 8]
                                            [--drafts both|on|off] [--repeats 3]

For each weight precision, in a fresh process: `pyagent serve`'s arrangement (uvicorn on a thread,
the model on the main thread), driven over loopback by streaming OpenAI-style clients in a process
of their own (as agents calling a server are).
- unloaded: requests one at a time; time to first token (TTFT, at the client) and throughput;
- loaded: `--clients` clients in a closed loop, each sending `--requests` requests back to back
  (the first ones staggered over one unloaded request's time, as agents' calls are).
Every prompt is distinct (~60 tokens, no shared prefix), greedy, `--max-tokens` tokens each.
The loaded outputs are checked against the unloaded outputs of the same prompts (batch invariance).
Each variant runs `--repeats` times in fresh processes, the variants alternating: single stream,
aggregate and their ratio are medians over the runs (with the min and max), the TTFT and output
figures those of the run with the median aggregate.
Each precision runs with prompt-lookup drafts (the default: they speed the single stream up too)
and without (what the kernels alone batch).
Before that, in its own process, it times the LM head (262,144 x 640) at 1 and 8 rows in each
precision (int8's is the screened head: int4 logits, the top 1,024 recomputed in float32): why
some precisions batch better than others.
Results: benchmarks/results/batching.json and batching.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from pyagent.bench.provenance import provenance, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOPICS = ["a cache", "a queue", "a tree", "a graph", "a lock", "a stack", "a heap", "a trie",
          "a bloom filter", "a ring buffer", "a skip list", "a hash map"]


def prompt(i: int) -> str:
    """A distinct agent-style prompt of about 60 tokens."""
    topic = TOPICS[i % len(TOPICS)]
    return (f"Task {i}: you are the reviewer agent of a code team. Read the plan below and write "
            f"one paragraph on the risks of {topic} in a service under heavy load, with one "
            f"concrete test the coder should add before the audit step.\nPlan {i}: add {topic} "
            f"in front of the storage layer.\nReview:")


async def one(http: httpx.AsyncClient, base: str, model: str, text: str,
              max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    async with http.stream("POST", f"{base}/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["text"]:
                    first = first or time.perf_counter()
                    pieces.append(choice["text"])
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "total_s": end - start, "text": "".join(pieces),
            "completion_tokens": usage["completion_tokens"]}


async def unloaded(base: str, model: str, count: int, max_tokens: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=600) as http:
        await one(http, base, model, "Warm up.", 8)
        return [await one(http, base, model, prompt(i), max_tokens) for i in range(count)]


async def loaded(base: str, model: str, clients: int, requests: int, max_tokens: int,
                 stagger_s: float) -> tuple[list[dict[str, Any]], float]:
    async def client(c: int, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        await asyncio.sleep(stagger_s * c / clients)
        return [await one(http, base, model, prompt(c * requests + r), max_tokens) | {
            "index": c * requests + r} for r in range(requests)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        done = await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    return [r for rs in done for r in rs], wall


def drive(base: str, model: str, clients: int, requests: int, max_tokens: int
          ) -> dict[str, Any]:
    """The clients' side: the unloaded requests, then the loaded ones."""
    alone = asyncio.run(unloaded(base, model, clients * requests, max_tokens))
    stagger = statistics.median(r["total_s"] for r in alone)
    batch, wall = asyncio.run(loaded(base, model, clients, requests, max_tokens, stagger))
    return {"alone": alone, "batch": batch, "wall": wall}


def median_run(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' median of every throughput figure; the other figures from the run whose
    aggregate is the median."""
    middle = sorted(samples, key=lambda run: run["aggregate_tok_s"])[(len(samples) - 1) // 2]
    return middle | {key: statistics.median(run[key] for run in samples)
                     for key in ("single_stream_tok_s", "aggregate_tok_s", "throughput_ratio")}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def kernels(rows: tuple[int, ...] = (1, 8), repeats: int = 10) -> dict[str, dict[str, float]]:
    """Milliseconds of the LM head's product per precision and row count (median of repeats)."""
    import torch

    from pyagent.engine.quantize import BF16Linear
    from pyagent.engine.screened_head import ScreenedHead

    torch.manual_seed(0)
    float_head = torch.nn.Linear(640, 262_144, bias=False)
    heads = {"float32": float_head, "int8": ScreenedHead(float_head.weight.detach()),
             "bf16": BF16Linear(float_head)}
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, head in heads.items():
            out[name] = {}
            for n in rows:
                x = torch.randn(n, 640)
                head(x)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    head(x)
                    times.append(time.perf_counter() - start)
                out[name][f"{n}_rows_ms"] = statistics.median(times) * 1e3
    return out


def precision(name: str, clients: int, requests: int, max_tokens: int, drafts: bool
              ) -> dict[str, Any]:
    """Serve the embedded model at `name` precision, with or without prompt-lookup drafts,
    and measure it (in this process)."""
    import uvicorn

    from pyagent.engine.generate import Engine
    from pyagent.engine.scheduler import SchedulerSettings
    from pyagent.engine.server import create_app
    from pyagent.engine.speculation import SpeculationSettings

    quantize = None if name == "float32" else name
    speculation = SpeculationSettings() if drafts else SpeculationSettings(draft_tokens=0)
    engine = Engine.load(quantize=quantize, scheduling=SchedulerSettings(
        max_batch=clients, speculation=speculation))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0,
                                           log_level="warning"))
    http = threading.Thread(target=server.run, daemon=True)
    http.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    # the clients are agents in a process of their own; the model runs on this thread
    agents = subprocess.Popen([sys.executable, __file__, "--drive", base, "--model", engine.name,
                               "--clients", str(clients), "--requests", str(requests),
                               "--max-tokens", str(max_tokens)], stdout=subprocess.PIPE,
                              text=True)
    engine.scheduler.run(stop=lambda: agents.poll() is not None)
    server.should_exit = True
    http.join()
    if agents.returncode:
        raise RuntimeError(f"the clients failed (exit status {agents.returncode})")
    out = json.loads(agents.stdout.read().splitlines()[-1])
    alone, batch, wall = out["alone"], out["batch"], out["wall"]
    single_tok_s = sum(r["completion_tokens"] for r in alone) / sum(r["total_s"] for r in alone)
    aggregate = sum(r["completion_tokens"] for r in batch) / wall
    ttft_alone = [r["ttft_s"] for r in alone]
    ttft_batch = [r["ttft_s"] for r in batch]
    same = sum(r["text"] == alone[r["index"]]["text"] for r in batch)
    return {
        "pad_rows": engine.scheduler.pad_rows,
        "single_stream_tok_s": single_tok_s,
        "aggregate_tok_s": aggregate,
        "throughput_ratio": aggregate / single_tok_s,
        "ttft_unloaded_median_s": statistics.median(ttft_alone),
        "ttft_unloaded_p95_s": p95(ttft_alone),
        "ttft_loaded_median_s": statistics.median(ttft_batch),
        "ttft_loaded_p95_s": p95(ttft_batch),
        "ttft_p95_ratio": p95(ttft_batch) / p95(ttft_alone),
        "identical_outputs": f"{same}/{len(batch)}",
        "requests": len(batch),
        "prompt_tokens": len(engine.tokenize(prompt(0))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="float32,int8,bf16")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--drafts", choices=("on", "off", "both"), default="both",
                        help="prompt-lookup drafts (the default is on): measure with, without "
                             "or both")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh server processes per variant (this machine is noisy)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one precision, in a child process
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # the clients of a server at this URL
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        print(json.dumps(drive(args.drive, args.model, args.clients, args.requests,
                               args.max_tokens)))
        return
    if args.one == "kernels":
        print(json.dumps(kernels()))
        return
    if args.one:
        print(json.dumps(precision(args.one, args.clients, args.requests, args.max_tokens,
                                   args.drafts == "on")))
        return
    child = subprocess.run([sys.executable, __file__, "--one", "kernels"], capture_output=True,
                           text=True, check=True)
    lm_head = json.loads(child.stdout.splitlines()[-1])
    print("LM head", json.dumps(lm_head), flush=True)
    variants = [(name, drafts) for name in args.precisions.split(",")
                for drafts in ("on", "off") if args.drafts in (drafts, "both")]
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):  # the variants alternate: a slow spell hits them alike
        for name, drafts in variants:
            label = name if drafts == "on" else f"{name}, no drafts"
            child = subprocess.run(
                [sys.executable, __file__, "--one", name, "--clients", str(args.clients),
                 "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
                 "--drafts", drafts], capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"{label} failed:\n{child.stderr[-3000:]}")
            runs.setdefault(label, []).append(json.loads(child.stdout.splitlines()[-1]))
            print(label, json.dumps(runs[label][-1]), flush=True)
    results = {label: median_run(samples) for label, samples in runs.items()}
    out = {"benchmark": "batching", "meta": provenance(ROOT),
           "settings": {"clients": args.clients, "requests_per_client": args.requests,
                        "max_tokens": args.max_tokens, "drafts": args.drafts,
                        "repeats": args.repeats},
           "lm_head_ms": lm_head, "results": results, "runs": runs}

    def spread(label: str, key: str, form: str, unit: str = "") -> str:
        values = [run[key] for run in runs[label]]
        middle = format(results[label][key], form) + unit
        return middle if len(values) == 1 else (
            f"{middle} [{format(min(values), form)}{unit}, {format(max(values), form)}{unit}]")

    lines = ["| weights | single stream (tok/s) | 8 concurrent, aggregate (tok/s) | ratio | TTFT "
             "unloaded (median / p95) | TTFT loaded (median / p95) | p95 ratio | same output |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {spread(k, 'single_stream_tok_s', '.1f')} "
              f"| {spread(k, 'aggregate_tok_s', '.1f')} "
              f"| {spread(k, 'throughput_ratio', '.2f', 'x')} "
              f"| {v['ttft_unloaded_median_s'] * 1e3:.0f} / "
              f"{v['ttft_unloaded_p95_s'] * 1e3:.0f} ms | {v['ttft_loaded_median_s'] * 1e3:.0f} / "
              f"{v['ttft_loaded_p95_s'] * 1e3:.0f} ms | {v['ttft_p95_ratio']:.2f}x "
              f"| {v['identical_outputs']} |" for k, v in results.items()]
    lines += ["", f"Cells: the median run [min, max] of {args.repeats} (by aggregate for the "
              "TTFT and output columns)." if args.repeats > 1 else ""]
    lines += ["", "| LM head (262,144 x 640) | 1 row | 8 rows | 8 rows / 1 row |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['1_rows_ms']:.1f} ms | {v['8_rows_ms']:.1f} ms "
              f"| {v['8_rows_ms'] / v['1_rows_ms']:.2f}x |" for k, v in lm_head.items()]
    write_result(RESULTS, "batching", out, lines)


if __name__ == "__main__":
    main()
