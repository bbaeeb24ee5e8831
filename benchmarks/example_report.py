"""The example report: the main job (`pyagent demo`) under the memory profiler, its run's tokens,
cost and metrics, and every committed benchmark result, in one offline HTML page.

    .venv/bin/python benchmarks/example_report.py

Writes benchmarks/results/example-report/ (the demo's memory profile, its run as JSON, CSV and
SQLite, every table as CSV and SQLite) and benchmarks/results/example-report.html. The demo's run
is priced with examples/prices.yaml (the embedded model at no per-token charge).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pyagent.bench.prices import PriceTable
from pyagent.bench.report.html import build_report
from pyagent.bench.report.run import write_run_report
from pyagent.observe.traces import TraceStore
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "example-report"
BENCHMARKS = ("fleet-modes", "orchestration-overhead", "token-strategies", "metrics-overhead",
              "memory-profiler")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        profile = OUT / "demo-memory.json"
        subprocess.run([sys.executable, "-m", "pyagent", "bench", "memory", "--out", str(profile),
                        "--", sys.executable, "-m", "pyagent", "demo", "--data", str(data)],
                       check=True)
        store = SQLiteCheckpointStore(data / "checkpoints.db")
        (run_id,) = store.runs()
        store.close()
        traces = TraceStore(data / "traces.db")
        written = write_run_report(traces, run_id, PriceTable(ROOT / "examples" / "prices.yaml"),
                                   OUT)
        traces.close()
    sources = [profile, written[0], *(RESULTS / f"{name}.json" for name in BENCHMARKS)]
    for path in build_report(sources, RESULTS / "example-report.html",
                             "PyAgent: example report", OUT / "tables"):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
