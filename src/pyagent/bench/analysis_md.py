"""An `Analysis` as Markdown: score with its components, time breakdown, bottlenecks,
opportunities, memory, changes and trends (the sections that apply)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyagent.bench.critical_path import KINDS
from pyagent.bench.report.fmt import number

if TYPE_CHECKING:
    from pyagent.bench.analyzer import Analysis


def render(analysis: Analysis) -> str:
    lines = [f"# Performance analysis ({analysis.kind})", "",
             "Sources: " + ", ".join(f"`{s}`" for s in analysis.sources), ""]
    for section in (_score, _time, _bottlenecks, _opportunities, _memory, _changes, _trends):
        lines += section(analysis)
    return "\n".join(lines).rstrip() + "\n"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows), ""]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return number(value)
    return str(value).replace("|", "\\|")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _score(a: Analysis) -> list[str]:
    rows = [(c.name, c.penalty, c.max_penalty, c.value, c.explanation)
            for c in a.score.components]
    return [f"## Score: {a.score.value:g} / 100", "",
            *table(("component", "penalty", "max", "input", "how"), rows),
            f"`{a.score.formula}`", ""]


def _time(a: Analysis) -> list[str]:
    if a.time is None:
        return []
    t = a.time
    unit = "runs" if t["source"] == "traces" else "attempts"
    basis = "critical paths" if t["source"] == "traces" else "request time"
    rows = []
    for kind in KINDS:
        parts = t["seconds"].get(kind, {})
        detail = ", ".join(f"{name} {number(s)} s" for name, s in list(parts.items())[:4])
        rows.append((kind, sum(parts.values()), _pct(t["shares"][kind]), detail))
    head = [f"## Where the time goes: {number(t['wall_s'])} s over {t['units']} {unit} "
            f"({basis})", ""]
    if t["concurrency"] is not None:
        head += [f"LLM calls in flight: mean {number(t['concurrency'])}, peak "
                 f"{t['peak_concurrency']}; failed calls: {t['errors']} of {t['operations']}.",
                 ""]
    return head + table(("kind", "seconds", "share", "detail"), rows)


def _bottlenecks(a: Analysis) -> list[str]:
    if a.time is None:
        return []
    if not a.bottlenecks:
        return ["## Bottlenecks", "", "None at or above the threshold.", ""]
    rows = [(rank, b.kind, _pct(b.share), b.seconds, b.summary)
            for rank, b in enumerate(a.bottlenecks, 1)]
    return ["## Bottlenecks", "", *table(("rank", "kind", "share", "seconds", "evidence"), rows)]


def _opportunities(a: Analysis) -> list[str]:
    if a.time is None:
        return []
    if not a.opportunities:
        return ["## Opportunities", "", "None worth 1% of the wall time.", ""]
    rows = []
    for o in a.opportunities:
        measured = "" if o.measured is None else (
            f"{o.measured.figure}: {number(o.measured.before)} -> {number(o.measured.after)} "
            f"({o.measured.change:+.1%})")
        rows.append((o.lever, f"`{o.flag}`", o.saving_s, _pct(o.share), measured, o.method))
    lines = ["## Opportunities", "",
             *table(("lever", "flag", "estimated saving (s)", "share", "measured", "estimate"),
                    rows)]
    if a.measured is not None:
        m = a.measured
        lines += [f"Measured {m.figure}: {number(m.before)} -> {number(m.after)} "
                  f"({m.change:+.1%}).", ""]
    return lines


def _memory(a: Analysis) -> list[str]:
    if not a.memory:
        return []
    rows = [(m.name, m.samples, m.pattern, f"{m.growth:+.1%}", f"{m.released:.1%}",
             "yes" if m.growing else "no", _pct(m.full_share), m.reason) for m in a.memory]
    return ["## Memory", "",
            *table(("series", "samples", "pattern", "growth", "released", "keeps growing",
                    "at capacity", "why"), rows)]


def _changes(a: Analysis) -> list[str]:
    if a.kind != "compare":
        return []
    shown = [c for c in a.changes if c.verdict != "unchanged"]
    rows = [(c.metric, c.better, f"{c.n_baseline} / {c.n_candidate}", c.baseline, c.candidate,
             None if c.ratio is None else f"{c.ratio:.3f}x",
             None if c.p_value is None else f"{c.p_value:.2g}", c.verdict) for c in shown]
    settings = a.settings
    regressions = len(a.regressions)
    return [f"## Changes: {regressions} regression{'' if regressions == 1 else 's'}", "",
            f"A change needs Mann-Whitney U p < {settings['alpha']:g} and a ratio of centers of "
            f"at least {settings['factor']:g}x; {len(a.changes) - len(shown)} of "
            f"{len(a.changes)} metrics unchanged.", "",
            *(table(("metric", "better", "n", "baseline", "candidate", "ratio", "p", "verdict"),
                    rows) if rows else [])]


def _trends(a: Analysis) -> list[str]:
    if a.kind != "trends":
        return []
    unit = a.settings.get("time_unit", "result")
    rows = []
    for t in a.trends:
        nxt = t.forecast[0] if t.forecast else None
        rows.append((t.metric, len(t.values), t.trend.slope, f"{t.trend.p_value:.2g}", t.verdict,
                     None if nxt is None else f"{number(nxt.value)} [{number(nxt.low)}, "
                                              f"{number(nxt.high)}]"))
    return [f"## Trends over {len(a.sources)} results", "",
            f"Slope: Sen's, per {unit}; forecast: the next point, least-squares line with its "
            f"{a.settings['confidence']:.0%} prediction interval.", "",
            *table(("metric", "points", "slope", "p", "verdict", "next"), rows)]
