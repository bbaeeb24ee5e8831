"""Which thread should run the model: one 8-sequence decode pass timed on different threads.

    .venv/bin/python benchmarks/driver_thread.py

With bf16-weights, eight sequences are prefilled, then 16 decode passes (8 rows each, LM head
included) are timed in three arrangements in one process:
- on the main thread;
- on a fresh worker thread;
- on the main thread while 8 other threads that once ran a parallel torch op are alive.
libgomp starts parallel regions from a non-main thread slowly once a process has more threads
than cores, and every thread that ran a parallel op keeps a pool of its own; the scheduler and
`pyagent serve` are arranged around that (engine/scheduler.py).
Results: benchmarks/results/driver-thread.json and driver-thread.md.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import torch

from pyagent.bench.provenance import provenance, write_result
from pyagent.engine.generate import Engine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PASSES = 16


def main() -> None:
    engine = Engine.load(quantize="bf16")
    sequences = []
    for i in range(8):
        ids = engine.tokenize(f"Agent {i}: review the plan and list the risks of a cache.")
        sequence = engine.open(ids)
        engine.prefill(sequence, ids)
        sequences.append(sequence)

    def passes() -> float:
        """Median milliseconds of a decode pass of all 8 sequences."""
        times = []
        for _ in range(PASSES):
            start = time.perf_counter()
            hidden = engine.forward_batch([(s, [100]) for s in sequences])
            engine.logits(torch.stack([h[-1] for h in hidden]))
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def on_thread() -> float:
        result: list[float] = []
        worker = threading.Thread(target=lambda: result.append(passes()))
        worker.start()
        worker.join()
        return result[0]

    passes()  # warm up
    results = {"main thread": passes(), "worker thread": on_thread()}
    release = threading.Event()

    def parallel_then_wait() -> None:
        torch.randn(1_000_000).exp()  # big enough to run in parallel
        release.wait()

    others = [threading.Thread(target=parallel_then_wait) for _ in range(8)]
    for thread in others:
        thread.start()
    time.sleep(0.5)
    results["main thread, 8 threads with their own OpenMP pools alive"] = passes()
    release.set()
    for thread in others:
        thread.join()
    results["main thread again"] = passes()
    out = {"benchmark": "driver_thread", "meta": provenance(ROOT), "passes": PASSES,
           "decode_pass_ms": results}
    lines = ["| where the 8-row decode pass runs | median ms |", "|---|---|"]
    lines += [f"| {where} | {ms:.1f} |" for where, ms in results.items()]
    write_result(RESULTS, "driver-thread", out, lines)


if __name__ == "__main__":
    main()
