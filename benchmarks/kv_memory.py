"""What eviction saves where users pay for it: the peak KV of one request, and how many agents a
fixed KV pool runs at once.

    .venv/bin/python benchmarks/kv_memory.py [--quick]

1. Peak KV per request, prompts of 1k-16k tokens: transformers' DynamicCache (what it holds after
   the prompt), PyAgent's paged cache without eviction (its peak while prefilling in 512-token
   chunks), and PyAgent's policy with a budget of 60% of the full cache's total KV bytes (-40%),
   which it enforces after every chunk; int8 keys and values alone; and int8 with PyAgent's
   policy at a quarter of the full cache's bytes (-75%).
2. Agents in one pool: a fleet of agents that share a system prompt with tool descriptions and
   each carry their own transcript (1.5k-3.5k tokens) ask for 32 tokens each, all at once, on an
   engine whose KV pool holds POOL_TOKENS tokens per layer group. The scheduler admits what the
   reservations allow; the table gives the most agents that ran at once, the pool's peak KV
   bytes, and the workload's wall time and throughput, for the full cache, for PyAgent's policy
   keeping 35% of the global layers' tokens, and for that policy on int8 and on int4 keys and
   values in a pool of the same bytes (per head and token, int8 with its scales takes 544 of
   float32's 2048 bytes, int4 352, so the pool holds that many times more tokens). Quality in the
   same run: each agent's 32 greedy tokens against the full cache's, as the share of them before
   the first token that differs (1.0: the same output).
Results: benchmarks/results/kv-memory.json and kv-memory.md (kv-memory-quick with --quick).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from pyagent.bench.kvtasks import corpus_text
from pyagent.bench.provenance import provenance, write_result
from pyagent.engine.eviction import Budget
from pyagent.engine.generate import Engine, KVSettings
from pyagent.engine.scheduler import SchedulerSettings
from pyagent.errors import RequestError
from pyagent.types import CompletionRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MIB = 2**20
POOL_TOKENS = 16_384
TOOLS = "\n".join(
    f'{{"name": "{name}", "description": "{text}", "parameters": {{"type": "object", '
    f'"properties": {{"path": {{"type": "string"}}}}}}}}'
    for name, text in (("read_file", "Read a file of the workspace and return its text."),
                       ("write_file", "Write text to a file of the workspace."),
                       ("run_tests", "Run the project's tests and report passes and failures."),
                       ("search", "Search the workspace for a regular expression."),
                       ("list_files", "List the files under a folder of the workspace.")))
SYSTEM = ("You are a careful software agent. Work in small steps, call one tool at a time, and "
          "check every change by running the tests.\nTools:\n" + TOOLS + "\n\n") * 3


def hf_bytes(engine: Engine, ids: list[int]) -> int:
    cache = DynamicCache(config=engine.model.config)
    with torch.inference_mode():
        engine.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def paged_peak(engine: Engine, ids: list[int]) -> tuple[int, int]:
    """(peak, held after the prompt) of one request on `engine`."""
    sequence = engine.open(ids)
    engine.prefill(sequence, ids)
    held = engine.cache.memory(sequence).bytes
    engine.close(sequence)
    return sequence.peak_bytes, held


def peaks(engine: Engine, corpus: list[int], lengths: list[int]) -> list[dict]:
    rows = []
    for length in lengths:
        ids = [engine.tokenizer.bos_token_id, *corpus[:length - 1]]
        full = Engine(engine.loaded, kv=KVSettings(share_prefix=False, max_tokens=length + 64))
        full_peak, full_held = paged_peak(full, ids)
        budget = int(0.6 * full_held)
        evicting = Engine(engine.loaded, kv=KVSettings(
            share_prefix=False, max_tokens=length + 64, policy="pyagent",
            budget=Budget(bytes=budget)))
        chunk = 512 * sum(p.bytes_per_block for p in full.cache.pools.values()) // 16
        row = {"tokens": length, "hf_dynamic_cache": hf_bytes(engine, ids),
               "paged_full_peak": full_peak, "paged_full_held": full_held, "budget": budget}
        try:
            peak, held = paged_peak(evicting, ids)
            row |= {"pyagent_peak": peak, "pyagent_held": held,
                    "within_budget_plus_chunk": peak <= budget + chunk}
        except RequestError as exc:  # the sliding-window layers alone exceed the budget
            row |= {"infeasible": str(exc)}
        int8 = Engine(engine.loaded, kv=KVSettings(share_prefix=False, max_tokens=length + 64,
                                                   dtype="int8"))
        row["int8_peak"] = paged_peak(int8, ids)[0]
        quarter = int(0.25 * full_held)  # -75%: int8 storage and eviction together
        both = Engine(engine.loaded, kv=KVSettings(
            share_prefix=False, max_tokens=length + 64, dtype="int8", policy="pyagent",
            budget=Budget(bytes=quarter)))
        try:
            row["int8_pyagent_peak"] = paged_peak(both, ids)[0]
        except RequestError:
            row["int8_pyagent_peak"] = None
        int4 = Engine(engine.loaded, kv=KVSettings(share_prefix=False, max_tokens=length + 64,
                                                   dtype="int4"))
        row["int4_peak"] = paged_peak(int4, ids)[0]
        rows.append(row)
    return rows


def fleet(engine: Engine, corpus: list[int], agents: int, kv: KVSettings) -> dict:
    """Run `agents` requests at once; what ran together, the pool's peak and the wall time."""
    rng = random.Random(7)
    server = Engine(engine.loaded, kv=kv, scheduling=SchedulerSettings(max_batch=agents))
    system = server.tokenize(SYSTEM)
    requests = []
    for i in range(agents):
        start = rng.randrange(0, len(corpus) - 4000)
        transcript = corpus[start:start + rng.choice((1500, 2500, 3500))]
        prompt = (*system, *transcript, *server.tokenize(f"\nAgent {i}: next step:",
                                                         add_special_tokens=False))
        requests.append(CompletionRequest(prompt=prompt, sampling=SamplingParams(
            max_tokens=32, ignore_eos=True)))
    started = time.perf_counter()
    results = server.generate_many(requests)
    wall = time.perf_counter() - started
    tokens = sum(c.usage.total_tokens for c in results)
    return {"agents": agents, "completed": len(results),
            "outputs": [server.tokenize(c.text, add_special_tokens=False) for c in results],
            "most_at_once": server.scheduler.most_running,
            "pool_peak_bytes": server.cache.memory().peak_bytes,
            "request_peak_bytes_max": max(c.kv_peak_bytes for c in results),
            "cached_tokens": sum(c.usage.cached_tokens for c in results),
            "wall_s": wall, "tokens_per_s": tokens / wall}


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    """Mean share of each reference output that `outputs` reproduces before the first token
    that differs."""
    shares = []
    for ours, theirs in zip(outputs, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                    min(len(ours), len(theirs)))
        shares.append(same / max(1, len(theirs)))
    return sum(shares) / len(shares)


def markdown(result: dict) -> list[str]:
    lines = ["| prompt tokens | transformers DynamicCache MiB | paged full: peak MiB | "
             "PyAgent -40% budget MiB | PyAgent peak MiB | peak within budget + chunk | "
             "int8 KV: peak MiB | int8 + PyAgent at -75% budget: peak MiB | int4 KV: peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["peaks"]:
        measured = ("infeasible (the sliding-window layers alone hold more) | -"
                    if "infeasible" in r else f"{r['pyagent_peak'] / MIB:.1f} | "
                    f"{'yes' if r['within_budget_plus_chunk'] else 'NO'}")
        both = r["int8_pyagent_peak"]
        lines.append(f"| {r['tokens']} | {r['hf_dynamic_cache'] / MIB:.1f} | "
                     f"{r['paged_full_peak'] / MIB:.1f} | {r['budget'] / MIB:.1f} | "
                     f"{measured} | {r['int8_peak'] / MIB:.1f} | "
                     f"{'infeasible' if both is None else f'{both / MIB:.1f}'} | "
                     f"{r['int4_peak'] / MIB:.1f} |")
    lines += ["", f"Fleet in a pool of {result['pool_tokens']} tokens per layer group "
              f"({result['pool_mib']:.0f} MiB if both groups fill):", "",
              "| cache | agents | most at once | pool peak MiB | largest request peak MiB | "
              "wall s | tokens/s | output agreement with the full cache |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in result["fleet"].items():
        lines.append(f"| {name} | {r['agents']} | {r['most_at_once']} | "
                     f"{r['pool_peak_bytes'] / MIB:.1f} | {r['request_peak_bytes_max'] / MIB:.1f}"
                     f" | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r['agreement']:.2f} |")
    full = result["fleet"]["full"]
    for name, r in result["fleet"].items():
        if name != "full":
            lines.append(f"\nAgents at once, {name} over the full cache: "
                         f"{r['most_at_once'] / full['most_at_once']:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1k-4k prompts, 6 agents")
    args = parser.parse_args()
    engine = Engine.load()
    corpus = engine.tokenize(corpus_text(), add_special_tokens=False)
    lengths = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    agents = 6 if args.quick else 12
    pool = POOL_TOKENS // 2 if args.quick else POOL_TOKENS
    common = {"max_tokens": pool, "share_prefix": True}
    result = {"benchmark": "kv_memory", "meta": provenance(ROOT), "pool_tokens": pool,
              "pool_mib": pool * sum(p.bytes_per_block for p in engine.cache.pools.values())
              / 16 / MIB,
              "peaks": peaks(engine, corpus, lengths),
              "fleet": {"full": fleet(engine, corpus, agents, KVSettings(**common)),
                        "pyagent": fleet(engine, corpus, agents, KVSettings(
                            **common, policy="pyagent", budget=Budget(ratio=0.35))),
                        "int8 + pyagent": fleet(engine, corpus, agents, KVSettings(
                            max_tokens=pool * 2048 // 544, share_prefix=True, dtype="int8",
                            policy="pyagent", budget=Budget(ratio=0.35))),
                        "int4 + pyagent": fleet(engine, corpus, agents, KVSettings(
                            max_tokens=pool * 2048 // 352, share_prefix=True, dtype="int4",
                            policy="pyagent", budget=Budget(ratio=0.35)))}}
    reference = result["fleet"]["full"]["outputs"]
    for run in result["fleet"].values():
        run["agreement"] = agreement(run["outputs"], reference)
    stem = "kv-memory-quick" if args.quick else "kv-memory"
    write_result(RESULTS, stem, result, markdown(result))


if __name__ == "__main__":
    main()
