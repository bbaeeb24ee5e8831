"""A stored run as results: tokens and cost call by call, and its metrics (latency distributions,
call and error counts) rebuilt by replaying its events from the trace store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pyagent.bench.prices import PriceTable
from pyagent.bench.provenance import write_atomic
from pyagent.bench.report.html import write_html
from pyagent.bench.report.records import write_records
from pyagent.bench.report.sections import sections_for
from pyagent.bench.tokens import TokenTracker
from pyagent.observe.metrics import MetricsFeed, MetricsRegistry
from pyagent.observe.traces import TraceStore


def run_result(traces: TraceStore, run_id: str, prices: PriceTable) -> dict[str, Any]:
    """Tokens, cost and metrics of `run_id`, as JSON-able data."""
    registry = MetricsRegistry()
    feed = MetricsFeed(registry)
    for event in traces.events(run_id):
        feed.record(event)
    tokens = TokenTracker.from_traces(traces, run_id, prices=prices)
    return {"tokens": tokens.to_dict(), "metrics": registry.snapshot()}


def write_run_report(traces: TraceStore, run_id: str, prices: PriceTable,
                     out: Path) -> list[Path]:
    """Write `run_id`'s results to `out`: JSON, its calls as CSV and SQLite, and an HTML page."""
    result = run_result(traces, run_id, prices)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"run-{run_id}.json"]
    write_atomic(written[0], json.dumps(result, indent=1, default=str) + "\n")
    calls = result["tokens"]["records"]
    written.append(write_records(calls, out / f"run-{run_id}-calls.csv"))
    written.append(write_records(calls, out / f"run-{run_id}.sqlite", table="calls"))
    sections = sections_for(f"run {run_id}", result)
    written.append(write_html(out / f"run-{run_id}.html", f"PyAgent run {run_id}",
                              [str(written[0])], sections))
    return written
