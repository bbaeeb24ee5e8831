"""The fuzzer's HTML report: ASR and utility by defense with 95% intervals, ASR by family,
channel and goal, the adaptive search against the static corpus, and the attacks that worked."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pyagent.bench.report import figures
from pyagent.bench.report.headlines import Summary
from pyagent.bench.report.html import write_html as write_page
from pyagent.bench.report.sections import Section
from pyagent.bench.report.tables import table


def _pct(share: Mapping[str, Any]) -> str:
    if not share or not share.get("n") or share.get("rate") is None or \
            math.isnan(share["rate"]):
        return "n/a"
    return (f"{100 * share['rate']:.1f}% [{100 * share['low']:.1f}, {100 * share['high']:.1f}] "
            f"({share['k']}/{share['n']})")


def _flat(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with each share written as one readable cell."""
    out = []
    for row in rows:
        flat = {k: row.get(k) for k in keys}
        for name in ("asr", "attempted", "utility_under_attack", "utility"):
            if name in row:
                flat[name] = _pct(row[name])
        for name in ("errors", "breaches", "flagged", "llm_calls"):
            if name in row:
                flat[name] = row[name]
        out.append(flat)
    return out


def fuzz_sections(data: Mapping[str, Any]) -> list[Section]:
    summary = data["summary"]
    defenses = summary["by_defense"]
    section = Section("Fuzzing: attack success and utility by defense")
    headline = summary.get("headline")
    lines = [f"{summary['attempts']} attempts"]
    if headline:
        reduction = headline["reduction"]
        lines.append(
            f"all defenses: ASR {_pct(headline['asr_before'])} -> {_pct(headline['asr_after'])}"
            + (f", {reduction:.1f}x lower" if reduction else ""))
        if headline["utility_loss_points"] is not None:
            lines.append(f"utility loss {headline['utility_loss_points']:.1f} points")
    section.summary = Summary("fuzz", lines)
    if not data.get("complete", True):
        section.notes.append("The run was stopped before every planned case ran.")
    names = list(defenses)
    rows = [defenses[n] for n in names]
    if names:
        for key, title in (("asr", "attack success rate by defense"),
                           ("utility", "utility without attack by defense"),
                           ("utility_under_attack", "utility under attack by defense")):
            shown = [(n, r[key]) for n, r in zip(names, rows, strict=True) if r[key]["n"]]
            if shown:
                section.figures.append(figures.intervals(
                    [n for n, _ in shown], [s["rate"] for _, s in shown],
                    [s["low"] for _, s in shown], [s["high"] for _, s in shown], {},
                    title, "share"))
        section.tables.append(table(_flat([{"defense": n, **r} for n, r in defenses.items()],
                                          ["defense"]), title="by defense"))
        controls = [{"defense": n, **{goal: _pct(share) for goal, share in
                                      r.get("control", {}).items()}}
                    for n, r in defenses.items()]
        section.tables.append(table(controls, title="goals reached with no attacker (control)"))
    sections = [section]
    for key, keys, title in (("by_family", ["family", "defense"], "ASR by family"),
                             ("by_channel", ["channel", "defense"], "ASR by channel"),
                             ("by_goal", ["goal", "defense"], "ASR by goal"),
                             ("by_mutator", ["mutators", "defense"], "ASR by mutator"),
                             ("by_family_channel_defense", ["family", "channel", "defense"],
                              "ASR by family, channel and defense")):
        if summary.get(key):
            part = Section(title)
            part.tables.append(table(_flat(summary[key], keys), title=title))
            sections.append(part)
    if data.get("adaptive"):
        sections.append(_adaptive_section(data["adaptive"]))
    hits = [r for r in data.get("records", []) if r.get("hit")]
    if hits:
        part = Section("Attacks that reached their goal")
        part.tables.append(table([{k: r.get(k) for k in (
            "target", "task", "attack", "family", "channel", "mutators", "defense", "detail",
            "payload")} for r in hits[:200]], title="hits"))
        sections.append(part)
    return sections


def _adaptive_section(adaptive: Mapping[str, Any]) -> Section:
    section = Section("Adaptive search against the static corpus (equal model calls)")
    searches = [adaptive[name] for name in ("static", "adaptive") if name in adaptive]
    section.figures.append(_curves(searches))
    section.tables.append(table([{"search": s["name"], "calls": s["calls"],
                                  "fielded": s["fielded"], "asr": _pct(s["asr"]),
                                  "distinct successful attacks":
                                      s["distinct_successful_attacks"],
                                  "white-box passes": s["white_box_passes"]}
                                 for s in searches], title="searches"))
    best = adaptive.get("best", [])
    if best:
        section.tables.append(table(best, title="the adaptive search's best attacks"))
    return section


def _curves(searches: Sequence[Mapping[str, Any]]) -> str:
    """Hits found against model calls spent, one line per search (steps at each fielding)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(figures.WIDTH, 2.6))
    for search in searches:
        curve = search["curve"]
        axes.step([0] + [p["calls"] for p in curve], [0] + [p["hits"] for p in curve],
                  where="post", label=search["name"])
    axes.set_xlabel("model calls")
    axes.set_ylabel("successful attacks")
    axes.set_title("successful attacks found at equal model calls")
    axes.legend(fontsize=7)
    return figures.svg(figure)


def write_html(data: Mapping[str, Any], path: Path) -> Path:
    """The fuzzer's report page."""
    return write_page(path, "PyAgent fuzzing report", [path.with_suffix(".json").name],
                      fuzz_sections(data))
