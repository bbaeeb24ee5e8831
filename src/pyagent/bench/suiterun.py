"""`pyagent bench run`: items from suites, run and graded, with baselines, throughput and memory,
written as JSON, SQLite, CSV and a self-contained HTML report.

Baselines per family and difficulty, each as accuracy (every scored turn fully right) and as mean
score (`random_score`, `majority_score`): `random` guesses uniformly among an item's choices (only
where answers come from a finite set); `majority` always gives the most common reference answer
of 100 train-split items of the same family and difficulty; `reference` is the same items on a
second backend (the full-cache engine when a KV policy is under test).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.bench.memory import MemoryProfiler
from pyagent.bench.provenance import write_atomic
from pyagent.bench.report.records import write_records
from pyagent.bench.runner import RunSettings, SuiteRunner
from pyagent.bench.scores import (
    grouped,
    majority_answer,
    majority_baseline,
    random_baseline,
    summarize,
)
from pyagent.bench.suites.base import Item, Suite, check_split
from pyagent.bench.suites.registry import Selection
from pyagent.errors import ConfigError
from pyagent.llm.base import Backend

MAJORITY_SAMPLE = 100  # train items per family and difficulty that decide the majority answer
DIFFICULTY_KEYS = ("suite", "family", "difficulty")
MEMORY_INTERVAL_S = 0.25


def plan(selections: Sequence[Selection], split: str, limit: int, seed: int = 0,
         difficulties: Sequence[int] | None = None) -> list[Item]:
    """`limit` items per family and difficulty of every selection, from `split`."""
    check_split(split)
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    return [item for s in selections
            for item in s.suite.items(split, limit, seed, difficulties, s.families)]


BASELINES = ("random", "majority")


def baselines(items: Sequence[Item], suites: Mapping[str, Suite], seed: int = 0
              ) -> dict[str, dict[str, float | None]]:
    """Per item id: the random and majority baselines' accuracy and mean score (None: not
    defined)."""
    majority: dict[tuple[str, str, int], str | None] = {}
    found: dict[str, dict[str, float | None]] = {}
    for item in items:
        figures: dict[str, tuple[float, float] | None] = dict.fromkeys(BASELINES)
        if not item.is_fleet_task:
            suite = suites[item.suite]
            key = (item.suite, item.family, item.difficulty)
            if key not in majority:
                train = suite.items("train", MAJORITY_SAMPLE, seed, [item.difficulty],
                                    [item.family])
                majority[key] = majority_answer(train)
            figures = {"random": random_baseline(item, suite.grade),
                       "majority": majority_baseline(item, majority[key], suite.grade)}
        found[item.id] = {}
        for name, pair in figures.items():
            found[item.id][name] = None if pair is None else pair[0]
            found[item.id][f"{name}_score"] = None if pair is None else pair[1]
    return found


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known and len(known) == len(values) else None


def with_baselines(rows: list[dict[str, Any]], records: Sequence[Mapping[str, Any]],
                   keys: Sequence[str], expected: Mapping[str, Mapping[str, float | None]],
                   reference: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """`rows` (grouped by `keys`) with each group's baselines."""
    items: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    for record in records:
        items[tuple(record[k] for k in keys)].add(record["item_id"])
    references = {tuple(r[k] for k in keys): r for r in grouped(reference, keys)} \
        if reference else {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        ids = sorted(items[key])
        for name in (*BASELINES, *(f"{b}_score" for b in BASELINES)):
            row[name] = _mean([expected[i][name] for i in ids])
        if reference is not None:
            row["reference"] = references.get(key, {}).get("accuracy")
            row["reference_score"] = references.get(key, {}).get("mean_score")
    return rows


def run_suites(backend: Backend, selections: Sequence[Selection], settings: RunSettings, *,
               split: str = "test", limit: int = 20, difficulties: Sequence[int] | None = None,
               manifest: Path | None = None, folder: Path | None = None,
               reference: Backend | None = None, kv_bytes: Callable[[], int] | None = None,
               progress: Callable[[dict[str, Any]], None] = lambda _r: None,
               prices: Any = None) -> dict[str, Any]:
    """Run the selected suites' items on `backend` (and on `reference` when given) and return
    the result: configuration, records, summaries, baselines, throughput and memory."""
    items = plan(selections, split, limit, settings.seed, difficulties)
    suites = {s.suite.name: s.suite for s in selections}
    runner = SuiteRunner(backend, suites, settings, prices, manifest, folder, progress)
    profiler = MemoryProfiler(MEMORY_INTERVAL_S, kv_bytes, include_children=False).start()
    start = time.perf_counter()
    try:
        records = runner.run(items)
    finally:
        wall = time.perf_counter() - start
        memory = profiler.stop()
    compared = None
    if reference is not None:
        compared = SuiteRunner(reference, suites, settings, prices, manifest,
                               folder / "reference" if folder else None, progress).run(items)
    expected = baselines(items, suites, settings.seed)
    families = with_baselines(grouped(records, DIFFICULTY_KEYS[:2]), records,
                              DIFFICULTY_KEYS[:2], expected, compared)
    levels = with_baselines(grouped(records, DIFFICULTY_KEYS), records, DIFFICULTY_KEYS,
                            expected, compared)
    overall = with_baselines([{"all": "all", **summarize(records)}],
                             [{**r, "all": "all"} for r in records], ("all",), expected,
                             [{**r, "all": "all"} for r in compared] if compared else None)[0]
    overall.pop("all")
    return {
        "benchmark": "suites",
        "config": {"suites": [s.suite.name for s in selections],
                   "families": {s.suite.name: list(s.families or s.suite.families)
                                for s in selections},
                   "split": split, "limit": limit, "difficulties": difficulties,
                   "backend": getattr(backend, "name", type(backend).__name__),
                   "reference": getattr(reference, "name", None) if reference else None,
                   "manifest": str(manifest) if manifest else None,
                   **{k: getattr(settings, k) for k in ("style", "concurrency", "executor",
                                                         "repeat", "temperature", "seed",
                                                         "model", "mode")}},
        "overall": overall, "families": families, "difficulties": levels,
        "throughput": {"wall_s": wall, "attempts": len(records),
                       "items_per_s": len(records) / wall if wall > 0 else math.nan,
                       "concurrency": settings.concurrency, "executor": settings.executor},
        "memory": {"peak_rss": memory.peak_rss, "start_rss": memory.start_rss,
                   "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "peak_kv": memory.peak_kv, "pattern": memory.pattern.kind,
                   "samples": [{"t": s.t, "rss": s.rss, "kv": s.kv} for s in memory.samples]},
        "records": records,
        "reference_records": compared,
    }


def write_outputs(result: Mapping[str, Any], folder: Path, stem: str = "suites") -> list[Path]:
    """The result as `<stem>.json`, its tables as CSV files and in `<stem>.sqlite`, and
    `<stem>.html` (a self-contained report)."""
    from pyagent.bench.report.html import build_report

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    write_atomic(path, json.dumps(result, indent=1, default=str) + "\n")
    written = [path]
    tables = {"attempts": result["records"], "families": result["families"],
              "difficulties": result["difficulties"], "overall": [result["overall"]]}
    for name, rows in tables.items():
        written.append(write_records(list(rows), folder / f"{stem}-{name}.csv"))
        write_records(list(rows), folder / f"{stem}.sqlite", table=name)
    written.append(folder / f"{stem}.sqlite")
    written += build_report([path], folder / f"{stem}.html", "PyAgent benchmark suites")
    return written
