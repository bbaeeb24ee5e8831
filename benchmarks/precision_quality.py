"""Precision quality: how far int8 and bf16-weights are from float32 on the embedded model.

    .venv/bin/python benchmarks/precision_quality.py

Four 512-token continuations from fixed places in the corpus (Python's documentation topics),
each scored two ways: in one prompt pass, and token by token as decoding computes them (prompts
attend through SDPA, decoding through per-query spans; on CPUs without AVX-512 VNNI, int8 also
multiplies prompts through bfloat16 GEMM and decodes through a row-wise kernel). Figures per
precision, against float32:
- perplexity ratio, exp(mean loss difference): 1.006 means 0.6% higher perplexity;
- KL divergence of the next-token distributions, KL(float32 || precision), mean per token;
- top-1 agreement: how often the likeliest next token is the same.
Results: benchmarks/results/precision-quality.json and precision-quality.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pyagent.bench.perplexity import SAMPLE_STARTS, continuation_nll, corpus_samples
from pyagent.bench.provenance import provenance, write_result
from pyagent.engine.generate import Engine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRECISIONS = ("float32", "int8", "bf16-weights")


def log_probs(engine: Engine, samples: list[list[int]]) -> torch.Tensor:
    """Next-token log probabilities of every position of every sample, in one prompt pass."""
    rows = []
    for ids in samples:
        engine.cache.clear_prefix_cache()
        sequence = engine.open(ids)
        try:
            rows.append(torch.log_softmax(engine.logits(engine.forward(sequence, ids)[:-1])
                                          .float(), dim=-1))
        finally:
            engine.close(sequence)
    return torch.cat(rows)


def main() -> None:
    losses: dict[str, dict[str, float]] = {}
    divergence: dict[str, dict[str, float]] = {}
    samples: list[list[int]] = []
    reference = None
    for name in PRECISIONS:
        engine = Engine.load(dtype=name)
        samples = samples or corpus_samples(engine)
        losses[name] = {path: continuation_nll(engine, samples, decode=path == "decode")
                        for path in ("prompt", "decode")}
        probs = log_probs(engine, samples)
        reference = probs if reference is None else reference
        kl = (reference.exp() * (reference - probs)).sum(-1).mean().item()
        top1 = (reference.argmax(-1) == probs.argmax(-1)).float().mean().item()
        divergence[name] = {"kl": kl, "top1_agreement": top1}
        print(name, losses[name], divergence[name], flush=True)
        engine.shutdown()
    ratios = {name: {path: math.exp(loss - losses["float32"][path])
                     for path, loss in paths.items()} for name, paths in losses.items()}
    out = {"benchmark": "precision_quality", "meta": provenance(ROOT),
           "samples": {"starts": list(SAMPLE_STARTS), "tokens": len(samples[0])},
           "mean_loss": losses, "perplexity_ratio": ratios, "divergence": divergence}
    lines = ["| weights | perplexity vs float32, prompt pass | token by token | KL to float32 "
             "(nats/token) | top-1 agreement |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {(r['prompt'] - 1) * 100:+.2f}% | {(r['decode'] - 1) * 100:+.2f}% | "
              f"{divergence[name]['kl']:.4f} | {divergence[name]['top1_agreement'] * 100:.1f}% |"
              for name, r in ratios.items() if name != "float32"]
    write_result(RESULTS, "precision-quality", out, lines)


if __name__ == "__main__":
    main()
