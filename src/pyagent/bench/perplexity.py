"""Continuation perplexity on a fixed corpus: how much a precision costs in quality.

The loss of each next token is computed either as a prompt pass computes it (all tokens of a
sample in one pass) or as decoding does (one token per pass), because quantized layers may take
different kernels on the two paths (engine/quantize.py).
"""

from __future__ import annotations

import torch

from pyagent.bench.kvtasks import corpus_text
from pyagent.engine.generate import Engine

SAMPLE_STARTS = (5_000, 40_000, 90_000, 150_000)  # token offsets into the corpus


def corpus_samples(engine: Engine, length: int = 513) -> list[list[int]]:
    """Slices of `length` tokens from fixed places in the corpus."""
    ids = engine.tokenize(corpus_text())
    return [ids[start:start + length] for start in SAMPLE_STARTS]


def continuation_nll(engine: Engine, samples: list[list[int]], decode: bool = False) -> float:
    """Mean next-token loss over `samples`, each in one prompt pass, or with `decode` token by
    token as decoding computes them. The prefix cache is cleared before each sample."""
    total = 0.0
    for ids in samples:
        engine.cache.clear_prefix_cache()
        sequence = engine.open(ids)
        try:
            if decode:
                hidden = torch.cat([engine.forward(sequence, [t]) for t in ids[:-1]])
            else:
                hidden = engine.forward(sequence, ids)[:-1]
            logits = engine.logits(hidden)
        finally:
            engine.close(sequence)
        total += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:])).item()
    return total / len(samples)
