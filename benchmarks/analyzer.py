"""The performance analyzer's accuracy on synthetic data with known answers.

    .venv/bin/python benchmarks/analyzer.py [--seed 0] [--balanced 60] [--per-kind 60]
        [--per-pair 10] [--leaks 60] [--pairs 100]

- Bottlenecks: trace stores written through an EventBus into a TraceStore
  (`pyagent.bench.synthetic.trace_set`), two runs each, event times jittered by 5 ms, with
  helpers running in parallel off the critical path, attempts rejected by an overloaded engine
  or refused for KV and retried. The truth is booked as the runs are laid out: each kind's
  share of the critical path; a kind is a true bottleneck at the analyzer's threshold (0.25) or
  above, memory also when the KV gauge leaks by 0.2 of capacity or more. Four sets:
  balanced stores (every kind at 0.24 or less: any bottleneck reported is a false alarm); one
  kind injected at a share drawn from 0.15-0.8, on both sides of the threshold (per injected
  kind); two kinds injected above the threshold (each pair of kinds); KV leaks with no
  refusals (the gauge climbs or steps by 0.05-0.6 of capacity). Per kind over all stores:
  precision and recall of "reported as a bottleneck"; the error of every measured share; the
  false-alarm rate on balanced stores; the two-bottleneck ranking.
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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.bench.analyzer import Settings, analyze_traces, compare
from pyagent.bench.critical_path import KINDS
from pyagent.bench.provenance import markdown_lines, provenance, write_result
from pyagent.bench.synthetic import (
    BALANCED_MAX,
    INJECTED,
    METRICS,
    PAIRS,
    Scenario,
    balanced,
    double,
    kv_leak,
    result_pair,
    single,
    trace_set,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JITTER_S = 0.005
FALSE_ALARM_GOAL = 0.05
SETTINGS = Settings()
THRESHOLD, GROWTH = SETTINGS.bottleneck_share, SETTINGS.memory_growth
SWEEP = (0.15, 0.8)  # the injected kind's share in the single-kind set
LEAK = (0.05, 0.6)  # a leaking KV gauge's rise, share of capacity


def scenarios(seed: int, counts: dict[str, int]) -> list[Scenario]:
    """The stores' scenarios, each drawn from its own seeded generator."""
    Draw = Callable[[np.random.Generator], Scenario]
    plan: list[Draw] = [balanced] * counts["balanced"]
    for kind in INJECTED:
        plan += [partial(single, kind=kind, low=SWEEP[0], high=SWEEP[1])] * counts["per_kind"]
    for pair in PAIRS:
        plan += [partial(double, kinds=pair)] * counts["per_pair"]
    plan += [partial(kv_leak, low=LEAK[0], high=LEAK[1])] * counts["leaks"]
    return [draw(np.random.default_rng((seed, index))) for index, draw in enumerate(plan)]


def bottlenecks(folder: Path, seed: int, counts: dict[str, int]) -> dict[str, Any]:
    rows = []
    for index, scenario in enumerate(scenarios(seed, counts)):
        path = folder / f"traces-{index}.db"
        found = trace_set(path, scenario, seed * 100_000 + index, jitter_s=JITTER_S)
        analysis = analyze_traces(found.path, settings=SETTINGS)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        rows.append({"set": scenario.name, "injected": list(scenario.injected),
                     "gauge": scenario.gauge, "kv_growth": found.kv_growth,
                     "truth": found.truth, "measured": analysis.time["shares"],
                     "true_bottlenecks": found.bottlenecks(THRESHOLD, GROWTH),
                     "reported": [b.kind for b in analysis.bottlenecks],
                     "kv_series": [{"pattern": m.pattern, "growth": m.growth,
                                    "released": m.released, "growing": m.growing}
                                   for m in analysis.memory]})
    return summarize(rows)


def confusion(rows: list[dict[str, Any]], kind: str,
              truth: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Precision and recall of `kind` reported, against the true bottlenecks (or `truth(row)`)."""
    def true(row: dict[str, Any]) -> bool:
        return truth(row) if truth else kind in row["true_bottlenecks"]

    tp = sum(true(r) and kind in r["reported"] for r in rows)
    fp = sum(not true(r) and kind in r["reported"] for r in rows)
    fn = sum(true(r) and kind not in r["reported"] for r in rows)
    return {"stores": len(rows), "positives": tp + fn, "tp": tp, "fp": fp, "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_set = {name: [r for r in rows if r["set"] == name]
              for name in ("balanced", "single", "double", "kv_leak")}
    errors = np.array([abs(r["measured"][k] - r["truth"][k]) for r in rows for k in KINDS])

    def spread(values: Any) -> dict[str, float]:
        values = np.asarray(values, dtype=float)
        return {"median": float(np.median(values)), "p95": float(np.quantile(values, 0.95)),
                "max": float(values.max())}

    per_kind = {kind: confusion(rows, kind) for kind in KINDS}
    for kind in KINDS:
        signed = [r["measured"][kind] - r["truth"][kind] for r in rows]
        per_kind[kind]["injected_stores"] = sum(kind in r["injected"] for r in rows)
        per_kind[kind]["share_error"] = {**spread(np.abs(signed)),
                                         "mean_signed": float(np.mean(signed))}
    balanced_rows = by_set["balanced"]
    alarms = [r for r in balanced_rows if r["reported"]]
    sweep = by_set["single"]

    def reported_rate(low: float, high: float) -> dict[str, Any]:
        chosen = [r for r in sweep if low <= r["truth"][r["injected"][0]] < high]
        hits = sum(r["injected"][0] in r["reported"] for r in chosen)
        return {"stores": len(chosen), "reported": hits / len(chosen) if chosen else None}

    doubles = by_set["double"]

    def ranked(row: dict[str, Any]) -> bool:
        order = [k for k in row["reported"] if k in row["injected"]]
        return order == row["injected"]

    refusals = [r for r in rows if not r["gauge"].startswith("leak")]
    leaks = by_set["kv_leak"]
    return {
        "stores": {name: len(chosen) for name, chosen in by_set.items()},
        "per_kind": per_kind,
        "exact": sum(r["reported"] == r["true_bottlenecks"] for r in rows) / len(rows),
        "wrong": [index for index, r in enumerate(rows)
                  if r["reported"] != r["true_bottlenecks"]],
        "share_error": spread(errors),
        "balanced": {"stores": len(balanced_rows),
                     "false_alarm_rate": len(alarms) / len(balanced_rows),
                     "false_alarms": dict(Counter(k for r in alarms for k in r["reported"])),
                     "largest_true_share": max(max(r["truth"].values()) for r in balanced_rows),
                     "largest_measured_share": max(max(r["measured"].values())
                                                   for r in balanced_rows)},
        "sweep": {"below": reported_rate(SWEEP[0], THRESHOLD),
                  "near": reported_rate(THRESHOLD, THRESHOLD + 0.05),
                  "above": reported_rate(THRESHOLD + 0.05, 1.0),
                  "below_near": reported_rate(THRESHOLD - 0.05, THRESHOLD)},
        "double": {"stores": len(doubles),
                   "both_reported": sum(set(r["injected"]) <= set(r["reported"])
                                        for r in doubles) / len(doubles),
                   "ranked_right": sum(ranked(r) for r in doubles) / len(doubles),
                   "exact": sum(r["reported"] == r["true_bottlenecks"]
                                for r in doubles) / len(doubles),
                   "smallest_gap": min(abs(r["truth"][r["injected"][0]]
                                           - r["truth"][r["injected"][1]]) for r in doubles)},
        "memory": {
            "refusals": confusion(refusals, "memory",
                                  lambda r: r["truth"]["memory"] >= THRESHOLD),
            "refusals_by_gauge": {g: confusion([r for r in refusals if r["gauge"] == g],
                                               "memory",
                                               lambda r: r["truth"]["memory"] >= THRESHOLD)
                                  for g in ("sawtooth", "per-run", "full")},
            "leaks": confusion(leaks, "memory", lambda r: r["kv_growth"] >= GROWTH),
            "leak_memory_share_max": max(r["measured"]["memory"] for r in leaks),
            "leak_top_kept": sum(r["reported"][:1] == r["true_bottlenecks"][:1]
                                 for r in leaks) / len(leaks)},
        "rows": rows}


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

    stores = b["stores"]
    lines = ["# Analyzer accuracy on synthetic data", "", *markdown_lines(result["meta"]), "",
             f"## Bottlenecks: {sum(stores.values())} trace stores", "",
             f"{stores['balanced']} balanced (every kind at most {BALANCED_MAX:.0%} of the "
             f"critical path), {stores['single']} with one kind injected at "
             f"{SWEEP[0]:.0%}-{SWEEP[1]:.0%} ({stores['single'] // len(INJECTED)} per kind), "
             f"{stores['double']} with two kinds above the threshold "
             f"({stores['double'] // len(PAIRS)} per pair), {stores['kv_leak']} KV leaks with "
             f"no refusals (rise {LEAK[0]:.0%}-{LEAK[1]:.0%} of capacity). Noise: helpers in "
             "parallel off the critical path, attempts rejected by an overloaded engine or "
             f"refused for KV and retried, event times jittered by {JITTER_S * 1000:g} ms. "
             f"True bottleneck: a true critical-path share of {THRESHOLD:g} or more (memory "
             f"also: a leaking KV gauge rising {GROWTH:g} of capacity or more); the truth is "
             "booked as the runs are laid out.", "",
             "| kind | injected in | true bottleneck in | precision | recall | share error "
             "median / p95 / max | mean signed error |", "|---|---|---|---|---|---|---|"]
    for kind, k in b["per_kind"].items():
        e = k["share_error"]
        lines.append(f"| {kind} | {k['injected_stores']} | {k['positives']} | "
                     f"{pct(k['precision'])} ({k['fp']} false) | {pct(k['recall'])} "
                     f"({k['fn']} missed) | {e['median']:.4f} / {e['p95']:.4f} / "
                     f"{e['max']:.4f} | {e['mean_signed']:+.4f} |")
    e, bal, sw, d, m = (b["share_error"], b["balanced"], b["sweep"], b["double"], b["memory"])
    alarms = ", ".join(f"{k} {n}" for k, n in sorted(bal["false_alarms"].items())) or "none"
    lines += ["", "| figure | value |", "|---|---|",
              f"| every kind's share, error (median / p95 / max) | {e['median']:.4f} / "
              f"{e['p95']:.4f} / {e['max']:.4f} |",
              f"| stores answered exactly (the true bottlenecks, in order, nothing else) | "
              f"{pct(b['exact'])} |",
              f"| balanced stores: false-alarm rate (any bottleneck reported) | "
              f"{pct(bal['false_alarm_rate'])} ({alarms}) |",
              f"| balanced stores: largest true / measured share | "
              f"{bal['largest_true_share']:.3f} / {bal['largest_measured_share']:.3f} |"]
    for key, label in (("below", f"{SWEEP[0]:.2f}-{THRESHOLD:.2f}"),
                       ("below_near", f"{THRESHOLD - 0.05:.2f}-{THRESHOLD:.2f}"),
                       ("near", f"{THRESHOLD:.2f}-{THRESHOLD + 0.05:.2f}"),
                       ("above", f"{THRESHOLD + 0.05:.2f}-{SWEEP[1]:.2f}")):
        lines.append(f"| one kind injected at {label}: reported ({sw[key]['stores']} stores) | "
                     f"{pct(sw[key]['reported'])} |")
    lines += [f"| two kinds above the threshold: both reported | {pct(d['both_reported'])} |",
              f"| ... ranked by true share (smallest gap {d['smallest_gap']:.3f}) | "
              f"{pct(d['ranked_right'])} |",
              f"| ... exactly those two, nothing else | {pct(d['exact'])} |", "",
              "Memory, two ways to be a bottleneck:", "",
              "| case | stores | true | precision | recall |", "|---|---|---|---|---|"]
    cases = [("KV refusals (no leak): memory share >= threshold", m["refusals"])]
    cases += [(f"... KV gauge {g}", c) for g, c in m["refusals_by_gauge"].items()]
    cases += [(f"KV leak, no refusals: rise >= {GROWTH:g} of capacity", m["leaks"])]
    lines += [f"| {name} | {c['stores']} | {c['positives']} | {pct(c['precision'])} "
              f"({c['fp']} false) | {pct(c['recall'])} ({c['fn']} missed) |"
              for name, c in cases]
    lines += ["", f"In the KV-leak stores the largest memory share measured is "
              f"{m['leak_memory_share_max']:.3f} (no time was lost to memory), and the top "
              f"time bottleneck stays ranked first in {pct(m['leak_top_kept'])}.", "",
              f"Stores not answered exactly ({len(b['wrong'])}):", "",
              "| set | true bottlenecks (true share) | reported (measured share) | KV gauge |",
              "|---|---|---|---|"]
    for index in b["wrong"]:
        row = b["rows"][index]

        def shares(kinds: list[str], key: str, row: dict[str, Any] = row) -> str:
            return ", ".join(f"{k} {row[key][k]:.4f}" for k in kinds) or "none"

        series = "; ".join(f"{s['pattern']} {s['growth']:+.2f}" for s in row["kv_series"])
        lines.append(f"| {row['set']} | {shares(row['true_bottlenecks'], 'truth')} | "
                     f"{shares(row['reported'], 'measured')} | {row['gauge']} "
                     f"(true rise {row['kv_growth']:+.2f}; {series}) |")
    lines += ["",
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
    parser.add_argument("--balanced", type=int, default=60, help="balanced trace stores")
    parser.add_argument("--per-kind", type=int, default=60,
                        help="trace stores per injected kind")
    parser.add_argument("--per-pair", type=int, default=10,
                        help="trace stores per pair of injected kinds")
    parser.add_argument("--leaks", type=int, default=60, help="trace stores with a KV leak")
    parser.add_argument("--pairs", type=int, default=100, help="result pairs per group")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    counts = {"balanced": args.balanced, "per_kind": args.per_kind,
              "per_pair": args.per_pair, "leaks": args.leaks}
    with tempfile.TemporaryDirectory() as folder:
        result = {"benchmark": "analyzer", "meta": provenance(ROOT),
                  "settings": {"seed": args.seed, "jitter_s": JITTER_S, **counts,
                               "bottleneck_share": THRESHOLD, "memory_growth": GROWTH,
                               "sweep": SWEEP, "leak": LEAK, "pairs": args.pairs},
                  "bottlenecks": bottlenecks(Path(folder), args.seed, counts),
                  "regressions": regressions(Path(folder), args.pairs, args.seed)}
    write_result(args.out, "analyzer", result, table(result))


if __name__ == "__main__":
    main()
