"""Precision quality: continuation perplexity of int8 and bf16-weights against float32.

    .venv/bin/python benchmarks/precision_quality.py

Four 512-token continuations from fixed places in the corpus (Python's documentation topics),
each scored two ways: in one prompt pass, and token by token as decoding computes them (int8
multiplies prompts through bfloat16 GEMM and decodes through its row-wise kernel). The ratio is
exp(mean loss difference), so 1.006 means 0.6% higher perplexity than float32.
Results: benchmarks/results/precision-quality.json and precision-quality.md.
"""

from __future__ import annotations

import math
from pathlib import Path

from pyagent.bench.perplexity import SAMPLE_STARTS, continuation_nll, corpus_samples
from pyagent.bench.provenance import provenance, write_result
from pyagent.engine.generate import Engine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRECISIONS = {"float32": None, "int8": "int8", "bf16-weights": "bf16"}


def main() -> None:
    losses: dict[str, dict[str, float]] = {}
    samples: list[list[int]] = []
    for name, scheme in PRECISIONS.items():
        engine = Engine.load(quantize=scheme)
        samples = samples or corpus_samples(engine)
        losses[name] = {path: continuation_nll(engine, samples, decode=path == "decode")
                        for path in ("prompt", "decode")}
        print(name, losses[name], flush=True)
        engine.shutdown()
    ratios = {name: {path: math.exp(loss - losses["float32"][path])
                     for path, loss in paths.items()} for name, paths in losses.items()}
    out = {"benchmark": "precision_quality", "meta": provenance(ROOT),
           "samples": {"starts": list(SAMPLE_STARTS), "tokens": len(samples[0])},
           "mean_loss": losses, "perplexity_ratio": ratios}
    lines = ["| weights | prompt pass: perplexity vs float32 | token by token |", "|---|---|---|"]
    lines += [f"| {name} | {(r['prompt'] - 1) * 100:+.2f}% | {(r['decode'] - 1) * 100:+.2f}% |"
              for name, r in ratios.items() if name != "float32"]
    write_result(RESULTS, "precision-quality", out, lines)


if __name__ == "__main__":
    main()
