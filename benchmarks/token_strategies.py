"""Token and cost optimization strategies, each measured, none assumed.

    .venv/bin/python benchmarks/token_strategies.py [--quick]

- caching: the three example manifests in sequenced mode with the engine's prefix cache on and
  off: cached prompt tokens, prefilled tokens and wall time, on the same greedy runs;
- compression: the same runs with Compaction (old tool results cut to their first line): prompt
  tokens before and after, and task success judged by each example's check.py;
- batching: aggregate decode throughput at batch sizes 1, 2, 4 and 8 on the same weights
  (transformers' batched generate: PyAgent's engine does not batch yet), and providers' batch
  prices;
- pruning: KV bytes held after a long prompt with PyAgent's eviction at half the KV against the
  full cache, and context tokens dropped.

Money: the measured token counts of every call are priced at a few API models' list prices
(genai-prices), as if the same calls had gone to them, with their prompt-cache and batch rates.
That the provider's cache would hold what the engine's did is an assumption, stated in the
results. The compound saving combines the measured money-saving fractions, 1 - prod(1 - s).
The tracker's totals are checked against the sum of the recorded usage, and its prices against
genai-prices' own calculation, for every model listed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import torch

from pyagent.bench.fleet import run_example
from pyagent.bench.prices import PriceTable
from pyagent.bench.provenance import provenance, write_atomic
from pyagent.bench.tokens import TokenTracker, compound_saving
from pyagent.engine.eviction import Budget
from pyagent.engine.generate import Engine, KVSettings
from pyagent.fleet.compaction import Compaction
from pyagent.fleet.tools.registry import tool_specs
from pyagent.types import CompletionRequest, Message, SamplingParams, Usage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE_NAMES = ("bugfix", "docstrings", "triage")
PRICED_MODELS = ("gpt-4o-mini", "claude-haiku-4-5", "gemini-2.5-flash")
BATCH_SIZES = (1, 2, 4, 8)


def fleet_runs(engine: Engine, cold: Engine, folder: Path, quick: bool) -> list[dict[str, Any]]:
    """Each example: cache on (baseline), cache off, cache on with compaction."""
    runs = []
    max_tokens = 64 if quick else None
    for name in EXAMPLE_NAMES:
        for variant, use, compaction in (("baseline", engine, None), ("no cache", cold, None),
                                         ("compaction", engine, Compaction(keep_recent=2))):
            run = run_example(use, EXAMPLES / name, "sequenced", folder, compaction=compaction,
                              max_tokens=max_tokens)
            run["variant"] = variant
            print(json.dumps({k: v for k, v in run.items() if k != "usages"}), flush=True)
            runs.append(run)
    return runs


def tracker(runs: list[dict[str, Any]], model: str, prices: PriceTable) -> TokenTracker:
    """The runs' calls, priced as `model`."""
    tokens = TokenTracker(prices)
    for run in runs:
        for prompt, output, cached in run["usages"]:
            tokens.record(Usage(prompt, output, cached), model=model, run_id=run["example"])
    return tokens


def money(runs: list[dict[str, Any]], prices: PriceTable) -> dict[str, Any]:
    """Per priced model: what caching, compression and batch prices save on these calls."""
    by = {v: [r for r in runs if r["variant"] == v] for v in ("baseline", "compaction")}
    out = {}
    for model in PRICED_MODELS:
        base = tracker(by["baseline"], model, prices)
        compact = tracker(by["compaction"], model, prices)
        caching = base.caching_report()
        batch = base.batch_report()
        savings = {
            "caching": 1 - caching.cost / caching.cost_without_cache,
            "compression": 1 - compact.totals().cost / base.totals().cost,
            "batch": 1 - batch.batch_cost / batch.cost if batch.calls and batch.cost else None}
        measured = [Decimal(str(s)) for s in savings.values() if s is not None]
        out[model] = {"baseline_cost": str(base.totals().cost),
                      "cost_without_cache": str(caching.cost_without_cache),
                      "compaction_cost": str(compact.totals().cost),
                      "batch_cost": str(batch.batch_cost),
                      "savings": {k: None if v is None else float(v) for k, v in savings.items()},
                      "compound_saving": float(compound_saving(measured))}
    return out


def checks(runs: list[dict[str, Any]], prices: PriceTable) -> dict[str, Any]:
    """The tracker's totals against the recorded usage, and its prices against genai-prices."""
    usages = [u for run in runs for u in run["usages"]]
    tokens = tracker(runs, PRICED_MODELS[0], prices).totals()
    sums = [sum(u[i] for u in usages) for i in range(3)]
    price_rows = []
    for model in PRICED_MODELS:
        usage = Usage(12_000, 700, 9_000)
        ours = prices.cost(usage, model)
        theirs = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=usage.prompt_tokens,
                               cache_read_tokens=usage.cached_tokens,
                               output_tokens=usage.completion_tokens), model_ref=model)
        price_rows.append({"model": model, "pyagent": str(ours.total),
                           "genai_prices": str(theirs.total_price),
                           "equal": ours.total == theirs.total_price})
    return {"totals_equal_usage": [tokens.prompt_tokens, tokens.completion_tokens,
                                   tokens.cached_tokens] == sums,
            "calls": len(usages), "usage_sums": sums, "prices": price_rows}


def batching(engine: Engine, new_tokens: int) -> list[dict[str, Any]]:
    """Aggregate greedy decode throughput at each batch size, same prompt in every row."""
    tokenizer = engine.tokenizer
    prompt = "def fibonacci(n):\n    "
    rows = []
    for size in BATCH_SIZES:
        inputs = tokenizer([prompt] * size, return_tensors="pt")
        with torch.inference_mode():
            engine.model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm up
            start = time.perf_counter()
            output = engine.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                           min_new_tokens=new_tokens)
            elapsed = time.perf_counter() - start
        generated = (output.shape[1] - inputs["input_ids"].shape[1]) * size
        rows.append({"batch_size": size, "tokens": generated, "seconds": elapsed,
                     "tokens_per_s": generated / elapsed})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["speedup_vs_1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def pruning(engine: Engine, pruned: Engine, prompt_tokens: int) -> dict[str, Any]:
    """KV bytes after prefilling a long prompt, with and without eviction at half the KV."""
    from pyagent.bench.kvtasks import corpus_text

    ids = engine.tokenize(corpus_text())[:prompt_tokens]
    out = {}
    for name, use in (("full", engine), ("pyagent eviction, budget 0.5", pruned)):
        use.cache.clear_prefix_cache()
        sequence = use.open(ids)
        try:
            use.prefill(sequence, ids)  # evicts down to the budget at its end
            kept = sequence.tables["global"].tokens(use.kv.block_size)
            out[name] = {"kv_bytes": use.cache.memory().bytes, "prompt_tokens": len(ids),
                         "global_tokens_kept": kept, "tokens_dropped": len(ids) - kept}
        finally:
            use.close(sequence)
    full, kept = out["full"]["kv_bytes"], out["pyagent eviction, budget 0.5"]["kv_bytes"]
    out["kv_saving"] = 1 - kept / full
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| example | variant | wall s | prompt tokens | prefilled | cached | success |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['example']} | {r['variant']} | {r['wall_s']:.1f} | "
                     f"{r['prompt_tokens']} | {r['prefilled_tokens']} | {r['cached_tokens']} | "
                     f"{'yes' if r['success'] else 'no'} |")
    lines += ["", "| priced as | baseline $ | caching saves | compaction saves | batch saves | "
              "compound |", "|---|---|---|---|---|---|"]
    for model, m in result["money"].items():
        s = m["savings"]
        batch = "n/a" if s["batch"] is None else f"{s['batch']:.1%}"
        lines.append(f"| {model} | {m['baseline_cost']} | {s['caching']:.1%} | "
                     f"{s['compression']:.1%} | {batch} | {m['compound_saving']:.1%} |")
    lines += ["", "| batch size | tokens/s | vs batch 1 |", "|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_1']:.2f}x |"
              for r in result["batching"]]
    p = result["pruning"]
    lines += ["", f"pruning: {p['full']['prompt_tokens']}-token prompt, KV "
              f"{p['full']['kv_bytes'] / 2**20:.1f} MiB full vs "
              f"{p['pyagent eviction, budget 0.5']['kv_bytes'] / 2**20:.1f} MiB with eviction "
              f"({p['kv_saving']:.0%} less), "
              f"{p['pyagent eviction, budget 0.5']['tokens_dropped']} context tokens dropped "
              "from the global layers"]
    c = result["checks"]
    lines += ["", f"checks: tracker totals equal the recorded usage: {c['totals_equal_usage']} "
              f"({c['calls']} calls); prices equal genai-prices' own: "
              f"{all(row['equal'] for row in c['prices'])}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="64-token actions, 16 decoded tokens per batch row, 2k-token prompt "
                             "(writes token-strategies-quick)")
    args = parser.parse_args()
    engine = Engine.load()
    cold = Engine(engine.loaded, kv=KVSettings(share_prefix=False))
    pruned = Engine(engine.loaded, kv=KVSettings(policy="pyagent", budget=Budget(ratio=0.5)))
    engine.generate(CompletionRequest(  # warm-up: one-time costs must not land on a run
        messages=(Message("user", "Read a.py"),), tools=tool_specs(["read_file"]),
        sampling=SamplingParams(max_tokens=8)))
    prices = PriceTable()
    with tempfile.TemporaryDirectory() as tmp:
        runs = fleet_runs(engine, cold, Path(tmp), args.quick)
    result = {"benchmark": "token_strategies", "meta": provenance(ROOT),
              "assumption": "money figures price the engine's measured calls at each model's "
                            "list prices, as if the provider's prompt cache held what the "
                            "engine's prefix cache held",
              "price_data": prices.sources(), "runs": runs, "money": money(runs, prices),
              "batching": batching(engine, 16 if args.quick else 64),
              "pruning": pruning(engine, pruned, 2048 if args.quick else 4096),
              "checks": checks(runs, prices)}
    stem = "token-strategies-quick" if args.quick else "token-strategies"
    write_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=1, default=str) + "\n")
    write_atomic(RESULTS / f"{stem}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
