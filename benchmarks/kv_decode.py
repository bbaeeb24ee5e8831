"""What the KV storage dtype costs in decode speed: tokens/s after a 2k-token prompt with keys and
values kept in float32 (the model's dtype), bfloat16, int8 and int4.

    .venv/bin/python benchmarks/kv_decode.py

Each round generates 64 greedy tokens once per dtype, the dtypes alternating so that machine
noise falls on all of them; the table gives the median over ROUNDS rounds and the ratio to
float32. Results: benchmarks/results/kv-decode.json and kv-decode.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pyagent.bench.kvtasks import corpus_text
from pyagent.bench.provenance import provenance, write_result
from pyagent.engine.generate import Engine, KVSettings
from pyagent.types import CompletionRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROUNDS = 3
PROMPT_TOKENS = 2048
DECODE_TOKENS = 64
DTYPES = ("auto", "bfloat16", "int8", "int4")


def main() -> None:
    base = Engine.load()
    ids = base.tokenize(corpus_text(), add_special_tokens=False)[:PROMPT_TOKENS]
    request = CompletionRequest(prompt=tuple(ids), sampling=SamplingParams(
        max_tokens=DECODE_TOKENS, ignore_eos=True))
    engines = {dtype: Engine(base.loaded, kv=KVSettings(share_prefix=False, dtype=dtype))
               for dtype in DTYPES}
    for engine in engines.values():
        engine.generate(request)  # warm up
    speeds: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    for _ in range(ROUNDS):
        for dtype, engine in engines.items():
            speeds[dtype].append(engine.generate(request).timings.tokens_per_s)
    medians = {dtype: statistics.median(values) for dtype, values in speeds.items()}
    result = {"benchmark": "kv_decode", "meta": provenance(ROOT), "rounds": ROUNDS,
              "prompt_tokens": PROMPT_TOKENS, "decode_tokens": DECODE_TOKENS,
              "tokens_per_s": speeds, "median_tokens_per_s": medians,
              "ratio_to_float32": {d: m / medians["auto"] for d, m in medians.items()}}
    lines = ["| KV storage | median tokens/s | ratio to float32 |", "|---|---|---|"]
    for dtype, median in medians.items():
        name = "float32" if dtype == "auto" else dtype
        lines.append(f"| {name} | {median:.2f} | {median / medians['auto']:.2f}x |")
    write_result(RESULTS, "kv-decode", result, lines)


if __name__ == "__main__":
    main()
