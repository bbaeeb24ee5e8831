"""Orchestration overhead: PyAgent's orchestrator against LangGraph on the same 3-step chain.

    .venv/bin/python benchmarks/orchestration_overhead.py [--runs N]

Both run three steps whose LLM calls are served by the same replay backend (recorded once from
the embedded model), so the difference is the orchestration itself: templates, events, state and
checkpoints. Each framework runs without durable checkpoints and with SQLite checkpoints (PyAgent:
`SQLiteCheckpointStore`, WAL + synchronous=FULL, one checkpoint per step; LangGraph: `SqliteSaver`).
Every variant runs in a fresh Python process, so its peak RSS (imports included) is its own.
Needs the optional extra: pip install -e '.[compare]'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

from pyagent.bench.provenance import provenance, write_result
from pyagent.fleet.manifest import load_manifest
from pyagent.fleet.orchestrator import Orchestrator
from pyagent.llm.replay import ReplayBackend
from pyagent.observe.events import EventBus
from pyagent.resilience.memory_store import MemoryCheckpointStore
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore
from pyagent.types import CompletionRequest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
AGENTS = """\
agents:
  - {name: planner, role: You plan., limits: {max_tokens: 16}}
  - {name: writer, role: You write., limits: {max_tokens: 16}}
  - {name: checker, role: You check., limits: {max_tokens: 16}}
"""
MANIFEST = """\
name: chain
agents: agents.yaml
goal:  # this benchmark measures orchestration; its goal check only lists the workspace
  description: The chain ran.
  checks: [{tool: list_files, expect: "data.total >= 0"}]
steps:
  - {id: plan, agent: planner, instruction: "Plan: {{ task }}"}
  - {id: write, agent: writer, instruction: "Write from the plan: {{ steps.plan.output }}"}
  - {id: check, agent: checker, instruction: "Check: {{ steps.write.output }}"}
"""
TASK = "a haiku about caches"


def record(folder: Path) -> Path:
    """Run the chain once on the embedded model, recording every LLM call."""
    from pyagent.engine.generate import Engine
    from pyagent.llm.embedded import EmbeddedBackend

    recording = folder / "chain.jsonl"
    recorder = ReplayBackend(recording, mode="record", inner=EmbeddedBackend(Engine.load()))
    manifest = load_manifest(folder / "manifest.yaml")
    Orchestrator(manifest, lambda _a: recorder, folder, EventBus(),
                 MemoryCheckpointStore()).run(TASK)
    return recording


def pyagent_runs(folder: Path, recording: Path, runs: int, durable: bool) -> list[float]:
    manifest = load_manifest(folder / "manifest.yaml")
    replay = ReplayBackend(recording)
    store = SQLiteCheckpointStore(folder / "pyagent.db") if durable else MemoryCheckpointStore()
    runner = Orchestrator(manifest, lambda _a: replay, folder, EventBus(), store)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        result = runner.run(TASK, run_id=f"{durable}-{i}")
        times.append(time.perf_counter() - start)
        assert result.status == "succeeded", result.error
    store.close()
    return times


class ChainState(TypedDict, total=False):
    task: str
    plan: str
    write: str
    check: str


def langgraph_runs(folder: Path, recording: Path, runs: int, durable: bool) -> list[float]:
    """The same three replayed LLM calls as LangGraph nodes."""
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph

    replay = ReplayBackend(recording)
    requests = [CompletionRequest(**_request(entry["request"])) for entry in
                sorted(replay.entries.values(), key=lambda e: e["recorded_at"])]

    def node(step: str, index: int):
        def call(_state: ChainState) -> dict[str, str]:
            return {step: replay.complete(requests[index]).text}
        return call

    graph = StateGraph(ChainState)
    previous = START
    for index, step in enumerate(("plan", "write", "check")):
        graph.add_node(step, node(step, index))
        graph.add_edge(previous, step)
        previous = step
    graph.add_edge(previous, END)
    connection = sqlite3.connect(folder / "langgraph.db", check_same_thread=False)
    app = graph.compile(checkpointer=SqliteSaver(connection) if durable else None)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        app.invoke({"task": TASK}, {"configurable": {"thread_id": f"{durable}-{i}"}})
        times.append(time.perf_counter() - start)
    connection.close()
    return times


def _request(data: dict[str, Any]) -> dict[str, Any]:
    from pyagent.types import SamplingParams

    return {**data, "sampling": SamplingParams(**data["sampling"])}


RUNNERS = {"pyagent": pyagent_runs, "langgraph": langgraph_runs}


def variant(name: str, durable: bool, folder: Path, recording: Path, runs: int) -> dict[str, Any]:
    """Time one variant in this process (a fresh one) and measure its memory."""
    times = RUNNERS[name](folder, recording, runs, durable)[10:]  # the first 10 warm up
    return {"us_per_step_median": statistics.median(times) / 3 * 1e6,
            "us_per_step_p90": statistics.quantiles(times, n=10)[-1] / 3 * 1e6,
            "runs": len(times),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="chain runs per variant")
    parser.add_argument("--variant", nargs=4, metavar=("NAME", "DURABLE", "FOLDER", "RECORDING"),
                        help=argparse.SUPPRESS)  # one variant in a child process
    args = parser.parse_args()
    if args.variant:
        name, durable, folder, recording = args.variant
        print(json.dumps(variant(name, durable == "1", Path(folder), Path(recording),
                                 args.runs)))
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "agents.yaml").write_text(AGENTS)
        (folder / "manifest.yaml").write_text(MANIFEST)
        recording = record(folder)
        for name in RUNNERS:
            for durable in (False, True):
                child = subprocess.run(
                    [sys.executable, __file__, "--runs", str(args.runs), "--variant", name,
                     str(int(durable)), str(folder), str(recording)],
                    capture_output=True, text=True, check=True)
                key = f"{name}{' + sqlite checkpoints' if durable else ''}"
                results[key] = json.loads(child.stdout.splitlines()[-1])
                print(key, json.dumps(results[key]), flush=True)
    out = {"benchmark": "orchestration_overhead", "meta": provenance(ROOT),
           "versions": {"langgraph": metadata.version("langgraph"),
                        "langgraph-checkpoint-sqlite": metadata.version(
                            "langgraph-checkpoint-sqlite")}, "results": results}
    lines = ["| variant | us per step (median) | p90 | peak RSS (MB) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['us_per_step_median']:.0f} | {v['us_per_step_p90']:.0f} "
              f"| {v['peak_rss_mb']:.0f} |" for k, v in results.items()]
    write_result(RESULTS, "orchestration-overhead", out, lines)


if __name__ == "__main__":
    main()
