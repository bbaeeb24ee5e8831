"""The performance analyzer's accuracy on synthetic data with known answers.

    .venv/bin/python benchmarks/analyzer.py [--seed 0] [--trace-sets 100] [--pairs 100]

- Bottlenecks: trace stores written through an EventBus into a TraceStore
  (`pyagent.bench.synthetic.trace_set`), two runs each, one kind injected at 40-70% of the
  critical path, the others sharing the rest at no more than 3/4 of it, agents running in
  parallel off the critical path, event times jittered by 5 ms. Per kind: precision and recall
  of the top-ranked bottleneck, and the error of the shares found.
- Regressions: result pairs (`result_pair`) of five metrics, 5 to 30 lognormal samples a side
  (sigma 0.03 to 0.21, 3% outliers 2-4x off); in one set one metric is made worse by 1.2x to 2x,
  in another nothing changes; a third has 2 to 4 samples a side and a 2x regression. Recall
  (the shifted metric called a regression), precision (flags that are the shifted metric), and
  the false-alarm rate: noise pairs with any metric flagged.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.bench.analyzer import analyze_traces, compare
from pyagent.bench.provenance import markdown_lines, provenance, write_result
from pyagent.bench.synthetic import INJECTED, METRICS, result_pair, trace_set

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JITTER_S = 0.005
FALSE_ALARM_GOAL = 0.05


def bottlenecks(folder: Path, count: int, seed: int) -> dict[str, Any]:
    rows = []
    for index in range(count):
        kind = INJECTED[index % len(INJECTED)]
        found = trace_set(folder / f"traces-{index}.db", kind, seed + index, jitter_s=JITTER_S)
        analysis = analyze_traces(found.path)
        shares = analysis.time["shares"]
        rows.append({"injected": kind, "top": analysis.bottlenecks[0].kind,
                     "reported": [b.kind for b in analysis.bottlenecks],
                     "true_share": found.truth[kind], "found_share": shares[kind],
                     "max_share_error": max(abs(shares[k] - found.truth[k]) for k in shares)})
    per_kind = {}
    for kind in INJECTED:
        called = [r for r in rows if r["top"] == kind]
        injected = [r for r in rows if r["injected"] == kind]
        hits = sum(r["injected"] == kind for r in called)
        per_kind[kind] = {"sets": len(injected),
                          "precision": hits / len(called) if called else None,
                          "recall": hits / len(injected),
                          "reported": sum(kind in r["reported"] for r in injected) / len(injected)}
    errors = [r["max_share_error"] for r in rows]
    return {"sets": count, "top1_accuracy": sum(r["top"] == r["injected"] for r in rows) / count,
            "per_kind": per_kind, "share_error_median": float(np.median(errors)),
            "share_error_max": float(max(errors)), "rows": rows}


def regressions(folder: Path, count: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    names = list(METRICS)
    rows = []
    for index in range(3 * count):
        group = ("regression", "noise", "tiny")[index // count]
        n = int(rng.integers(2, 5) if group == "tiny" else rng.integers(5, 31))
        metric = names[index % len(names)]
        factor = 2.0 if group == "tiny" else float(rng.uniform(1.2, 2.0))
        shift = None if group == "noise" else (metric, factor)
        base, cand = result_pair(folder, seed * 10_000 + index, n, shift)
        changes = compare([base], [cand]).changes
        verdicts = {c.metric: c.verdict for c in changes}
        rows.append({"group": group, "n": n, "metric": shift and metric,
                     "factor": shift and factor,
                     "found": bool(shift) and verdicts[metric] == "regression",
                     "flagged": sorted(c.metric for c in changes if c.flagged),
                     "insufficient": sum(v == "insufficient samples" for v in verdicts.values())})
    shifted = [r for r in rows if r["group"] == "regression"]
    noise = [r for r in rows if r["group"] == "noise"]
    tiny = [r for r in rows if r["group"] == "tiny"]
    flags = sum(len(r["flagged"]) for r in rows)
    true = sum(r["found"] for r in rows)

    def recall(selected: list[dict[str, Any]]) -> dict[str, Any]:
        return {"pairs": len(selected),
                "recall": sum(r["found"] for r in selected) / len(selected) if selected else None}

    return {
        "pairs": {"regression": len(shifted), "noise": len(noise), "tiny": len(tiny)},
        "recall": recall(shifted)["recall"], "precision": true / flags if flags else None,
        "false_alarm_rate": sum(bool(r["flagged"]) for r in noise) / len(noise),
        "noise_flags": dict(Counter(m for r in noise for m in r["flagged"])),
        "recall_by_factor": {"1.2-1.4x": recall([r for r in shifted if r["factor"] < 1.4]),
                             "1.4-2x": recall([r for r in shifted if r["factor"] >= 1.4])},
        "recall_by_samples": {"5-9": recall([r for r in shifted if r["n"] < 10]),
                              "10-30": recall([r for r in shifted if r["n"] >= 10])},
        "tiny_flagged": sum(bool(r["flagged"]) for r in tiny),
        "tiny_all_insufficient": all(r["insufficient"] == len(METRICS) for r in tiny),
        "rows": rows}


def table(result: dict[str, Any]) -> list[str]:
    b, r = result["bottlenecks"], result["regressions"]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    lines = ["# Analyzer accuracy on synthetic data", "", *markdown_lines(result["meta"]), "",
             f"## Bottlenecks: {b['sets']} trace stores, one kind injected each", "",
             "| kind | sets | precision (top-ranked) | recall (top-ranked) | reported |",
             "|---|---|---|---|---|"]
    lines += [f"| {kind} | {k['sets']} | {pct(k['precision'])} | {pct(k['recall'])} | "
              f"{pct(k['reported'])} |" for kind, k in b["per_kind"].items()]
    lines += ["", f"Top-ranked kind right in {pct(b['top1_accuracy'])} of the stores; largest "
              f"error of any kind's share: median {b['share_error_median']:.4f}, max "
              f"{b['share_error_max']:.4f} (event times jittered by {JITTER_S * 1000:g} ms).", "",
              f"## Regressions: {r['pairs']['regression']} shifted pairs, "
              f"{r['pairs']['noise']} noise pairs, {r['pairs']['tiny']} tiny pairs", "",
              "| figure | value |", "|---|---|",
              f"| recall (shift 1.2-2x, 5-30 samples a side) | {pct(r['recall'])} |",
              f"| precision (flags on the shifted metric) | {pct(r['precision'])} |",
              f"| false-alarm rate (noise pairs flagging anything; goal <= "
              f"{FALSE_ALARM_GOAL:.0%}) | {pct(r['false_alarm_rate'])} |"]
    for name, groups in (("shift", r["recall_by_factor"]), ("samples a side",
                                                              r["recall_by_samples"])):
        lines += [f"| recall, {name} {key} ({g['pairs']} pairs) | {pct(g['recall'])} |"
                  for key, g in groups.items()]
    lines += [f"| tiny pairs (2-4 samples a side, 2x) flagging anything | {r['tiny_flagged']} |",
              f"| tiny pairs all 'insufficient samples' | {r['tiny_all_insufficient']} |", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace-sets", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=100, help="pairs per group")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = {"benchmark": "analyzer", "meta": provenance(ROOT),
                  "settings": {"seed": args.seed, "jitter_s": JITTER_S},
                  "bottlenecks": bottlenecks(Path(folder), args.trace_sets, args.seed),
                  "regressions": regressions(Path(folder), args.pairs, args.seed)}
    write_result(RESULTS, "analyzer", result, table(result))


if __name__ == "__main__":
    main()
