"""The report section of a suite run (`pyagent bench run`): accuracy per family and difficulty
with 95% intervals against the baselines, throughput, memory; the attempts stay in the CSV and
SQLite tables, not on the page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyagent.bench.report import figures
from pyagent.bench.report.headlines import Summary
from pyagent.bench.report.sections import Section
from pyagent.bench.report.tables import table

COLUMNS = ("suite", "family", "difficulty", "items", "attempts", "accuracy", "ci_low", "ci_high",
           "random", "majority", "reference", "mean_score", "random_score", "majority_score",
           "reference_score", "latency_p50_s", "latency_p95_s", "prompt_tokens",
           "completion_tokens", "cost_usd", "errors")
BASELINES = ("random", "majority", "reference")


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def suites_section(name: str, data: Mapping[str, Any]) -> list[Section]:
    """Accuracy with intervals and baselines, tables by family and difficulty, throughput."""
    config, overall = data["config"], data["overall"]
    section = Section(f"Suites: {', '.join(config['suites'])} ({name})")
    section.notes.append(
        f"{overall['items']} items, {overall['attempts']} attempts on {config['backend']} "
        f"({config['style']} prompts, split {config['split']}, {config['executor']} x "
        f"{config['concurrency']}); accuracy {_percent(overall['accuracy'])} "
        f"[{_percent(overall['ci_low'])}, {_percent(overall['ci_high'])}]; "
        f"{overall['errors']} errors")
    section.summary = Summary(name, [
        f"accuracy {_percent(overall['accuracy'])} over {overall['items']} items",
        f"{data['throughput']['items_per_s']:.2f} attempts/s",
        f"peak RSS {data['memory']['peak_rss'] / 2**20:.0f} MiB"])
    rows = data["difficulties"]
    if rows:
        section.figures.append(figures.intervals(
            [f"{r['family']} d{r['difficulty']}" for r in rows], [r["accuracy"] for r in rows],
            [r["ci_low"] for r in rows], [r["ci_high"] for r in rows],
            {b: [r.get(b) for r in rows] for b in BASELINES if any(r.get(b) is not None
                                                                    for r in rows)},
            "accuracy by family and difficulty", "accuracy"))
    for title, key in (("by family", "families"), ("by family and difficulty", "difficulties")):
        present = [c for c in COLUMNS if any(c in r for r in data[key])]
        section.tables.append(table(data[key], present, title=title))
    section.tables.append(table([{"all": "overall", **overall}], title="overall"))
    section.tables.append(table([data["throughput"]], title="throughput"))
    memory = {k: v for k, v in data["memory"].items() if k != "samples"}
    section.tables.append(table([memory], title="memory"))
    samples = data["memory"]["samples"]
    if len(samples) >= 2:
        section.figures.append(figures.lines(
            [s["t"] for s in samples], {"RSS (MiB)": [s["rss"] / 2**20 for s in samples]},
            "memory during the run", "seconds", "MiB"))
    return [section]
