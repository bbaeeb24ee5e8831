"""Sequenced vs hand-over execution of the same manifest on the embedded engine.

    .venv/bin/python benchmarks/fleet_modes.py [--repeats N] [--quick]

Each repeat runs the example Code -> Test -> Audit manifest (examples/bugfix) once per mode, on a
fresh copy of its project, with greedy decoding and one shared engine (prefix cache cleared between
runs, so no run benefits from another). Recorded per run: end-to-end wall time, prompt tokens
prefilled and served from the cache (from the trace store), LLM and tool calls, and task success:
the project's own tests pass afterwards (pytest run independently of the agents).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyagent.bench.provenance import provenance, write_atomic
from pyagent.engine.generate import Engine
from pyagent.fleet.manifest import load_manifest
from pyagent.fleet.orchestrator import Orchestrator
from pyagent.fleet.tools.registry import TOOLS
from pyagent.llm.embedded import EmbeddedBackend
from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.resilience.memory_store import MemoryCheckpointStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bugfix"
RESULTS = ROOT / "benchmarks" / "results"
TASK = ("The test test_remove_counts_down fails: remove() in src/inventory/stock.py must "
        "subtract count, not add it. Fix it.")
MODES = ("sequenced", "handover")


def one_run(engine: Engine, mode: str, folder: Path, max_tokens: int | None) -> dict[str, Any]:
    """Run the example once in `mode`; return its measurements."""
    workspace = folder / f"{mode}-workspace"
    shutil.copytree(EXAMPLE / "project", workspace)
    manifest = load_manifest(EXAMPLE / "manifest.yaml", set(TOOLS))
    if max_tokens is not None:
        agents = {name: agent.model_copy(update={"limits": agent.limits.model_copy(
            update={"max_tokens": max_tokens})}) for name, agent in manifest.agents.items()}
        manifest = manifest.__class__(manifest.path, manifest.name, manifest.description,
                                      manifest.steps, agents)
    engine.cache.clear_prefix_cache()
    bus = EventBus()
    traces = TraceStore(folder / f"{mode}-traces.db")
    traces.attach(bus)
    backend = EmbeddedBackend(engine)
    runner = Orchestrator(manifest, lambda _agent: backend, workspace, bus,
                          MemoryCheckpointStore(), mode)  # type: ignore[arg-type]
    start = time.perf_counter()
    result = runner.run(TASK)
    wall = time.perf_counter() - start
    totals = traces.totals(result.run_id)
    traces.close()
    check = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                           cwd=workspace, capture_output=True, text=True, timeout=300)
    return {"mode": mode, "status": result.status, "error": result.error, "wall_s": wall,
            "prompt_tokens": totals.input_tokens, "cached_tokens": totals.cached_tokens,
            "prefilled_tokens": totals.input_tokens - totals.cached_tokens,
            "output_tokens": totals.output_tokens, "llm_calls": totals.llm_calls,
            "tool_calls": totals.tool_calls, "tests_pass": check.returncode == 0,
            "steps": {k: v["status"] for k, v in result.outputs.items()}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    out = {}
    for mode, rows in by_mode.items():
        out[mode] = {key: statistics.median(r[key] for r in rows) for key in (
            "wall_s", "prompt_tokens", "prefilled_tokens", "cached_tokens", "llm_calls")}
        out[mode]["success_rate"] = statistics.fmean(float(r["tests_pass"]) for r in rows)
    out["wall_ratio_sequenced_over_handover"] = (out["sequenced"]["wall_s"]
                                                 / out["handover"]["wall_s"])
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = ["| mode | wall s (median) | prompt tokens | prefilled | cached | LLM calls | tests "
             "pass |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        m = s[mode]
        lines.append(f"| {mode} | {m['wall_s']:.1f} | {m['prompt_tokens']:.0f} | "
                     f"{m['prefilled_tokens']:.0f} | {m['cached_tokens']:.0f} | "
                     f"{m['llm_calls']:.0f} | {m['success_rate']:.0%} |")
    ratio = s["wall_ratio_sequenced_over_handover"]
    lines.append(f"\nsequenced / handover wall time: {ratio:.2f}x ({1 - ratio:.0%} less time)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="one run per mode with 64-token actions (writes fleet-modes-quick)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    engine = Engine.load()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for mode in (MODES if repeat % 2 == 0 else MODES[::-1]):  # alternate the order
                folder = Path(tmp) / f"{repeat}"
                folder.mkdir(exist_ok=True)
                run = one_run(engine, mode, folder, 64 if args.quick else None)
                print(json.dumps(run), flush=True)
                runs.append(run)
    result = {"benchmark": "fleet_modes", "meta": provenance(ROOT), "task": TASK, "runs": runs,
              "summary": summarize(runs)}
    stem = "fleet-modes-quick" if args.quick else "fleet-modes"
    write_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(RESULTS / f"{stem}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
