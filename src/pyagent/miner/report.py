"""The miner's report: `mine.json` (everything) and `mine.html` (clusters, candidates, the
validation decisions, the test split's claim against the incumbent and the control, the cost)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyagent.bench.report.headlines import Summary
from pyagent.bench.report.html import write_html
from pyagent.bench.report.sections import Section
from pyagent.bench.report.tables import table


def _gain(comparison: Mapping[str, Any]) -> str:
    return (f"{comparison['before']:.2f} -> {comparison['after']:.2f}: "
            f"{comparison['gain']:+.2f} [{comparison['low']:+.2f}, {comparison['high']:+.2f}], "
            f"{comparison['wins']} wins / {comparison['losses']} losses, "
            f"p = {comparison['p_value']:.3g}")


def _failed(calls: Mapping[str, int]) -> str:
    return f"{calls['failed']}/{calls['calls']}"


def sections(report: Mapping[str, Any]) -> list[Section]:
    """The report's sections, for the HTML page."""
    test = report["test"]
    headline = Section("Mining: failures to specialists, promoted on evidence")
    lines = [f"{report['failures']} failed attempts, {len(report['clusters'])} clusters, "
             f"{len(report['demonstrations'])} verified demonstrations",
             f"promoted: {', '.join(report['promoted']) or 'none'}"]
    claim = test["against_incumbent"].get(test["after"])
    if claim:
        lines.append(f"test split, after mining against before: {_gain(claim)}")
    headline.summary = Summary("mine", lines)
    headline.tables.append(table([{"cluster": c["id"], "label": c["label"], "size": c["size"],
                                   "tokens": c["tokens"], "wall_s": round(c["wall_s"], 1),
                                   "where": ", ".join(c["steps"]),
                                   "representatives": ", ".join(c["representatives"])}
                                  for c in report["clusters"]], title="clusters"))
    candidates = Section("Candidates")
    candidates.tables.append(table([
        {"name": c["name"], "kind": c["kind"], "cluster": c["cluster"], "step": c["step"],
         "replaces": c["replaces"], "tools": ", ".join(c["tools"]),
         "procedure": " -> ".join(c.get("procedure") or []) or "-",
         "demonstrations": len(c["demonstrations"]),
         "instructions from": ", ".join(p["source"] for p in c["provenance"]["instructions"])}
        for c in report["candidates"]], title="candidates"))
    validation = Section("Validation: promotion decisions (paired, against the incumbent)")
    validation.tables.append(table([
        {"candidate": d["candidate"], "promoted": d["promoted"],
         "gain": _gain(d["comparison"]), "why": d["reason"]}
        for d in report["validation"]["decisions"]], title="decisions"))
    held_out = Section("Test split (never seen by mining): each variant against the incumbent")
    held_out.tables.append(table([{"variant": name, "against the incumbent": _gain(c),
                                   "tokens": test["tokens"][name],
                                   "tool calls failed": _failed(test["calls"][name])}
                                  for name, c in test["against_incumbent"].items()],
                                 title="test split"))
    cost = Section("What mining cost")
    cost.tables.append(table([{"phase": name, **{k: round(v, 1) for k, v in phase.items()}}
                              for name, phase in report["cost"]["phases"].items()],
                             title="phases"))
    return [headline, candidates, validation, held_out, cost]


def write_report(report: Mapping[str, Any], out: Path) -> Path:
    """`out`/mine.json and `out`/mine.html; the HTML page's path."""
    (out / "mine.json").write_text(json.dumps(report, indent=1, default=str),
                                   encoding="utf-8")
    return write_html(out / "mine.html", "PyAgent mining report", ["mine.json"],
                      sections(report))
