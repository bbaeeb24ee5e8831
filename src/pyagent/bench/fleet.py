"""Run a manifest on a workspace and measure it: wall time, tokens prefilled and served from the
cache, calls, timings; for an example folder, task success as judged by its own `check.py`."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyagent.engine.generate import Engine
from pyagent.fleet.compaction import Compaction
from pyagent.fleet.manifest import Manifest, load_manifest
from pyagent.fleet.orchestrator import Orchestrator, RunResult
from pyagent.fleet.tools.registry import TOOLS
from pyagent.llm.base import Backend
from pyagent.llm.embedded import EmbeddedBackend
from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.resilience.memory_store import MemoryCheckpointStore
from pyagent.types import Usage


@dataclass(frozen=True)
class FleetRun:
    """One manifest run on a workspace, as measured."""

    run_id: str
    status: str
    error: str | None
    outputs: dict[str, dict[str, Any]]
    wall_s: float
    usage: Usage
    usages: list[Usage]  # each LLM call's
    llm_calls: int
    tool_calls: int
    first_token_s: float | None  # time to first token, summed over the LLM calls
    queue_s: float | None  # summed over calls that report it


def run_manifest(manifest: Manifest, workspace: Path, task: str, backend: Backend,
                 traces: TraceStore, mode: str = "sequenced",
                 compaction: Compaction | None = None, run_id: str | None = None) -> FleetRun:
    """Run `manifest` once on `workspace` with every agent on `backend`, its spans in `traces`."""
    bus = EventBus()
    detach = traces.attach(bus)
    runner = Orchestrator(manifest, lambda _agent: backend, workspace, bus,
                          MemoryCheckpointStore(), mode, compaction)  # type: ignore[arg-type]
    start = time.perf_counter()
    try:
        result: RunResult = runner.run(task, run_id)
    finally:
        wall = time.perf_counter() - start
        traces.flush()
        detach()
    calls = [s.attributes for s in traces.spans(result.run_id)
             if s.kind == "llm_call" and s.status == "ok"]
    usages = [Usage(a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"],
                    a["pyagent.usage.cached_tokens"]) for a in calls]
    queues = [a["pyagent.queue_s"] for a in calls if "pyagent.queue_s" in a]
    totals = traces.totals(result.run_id)
    return FleetRun(
        result.run_id, result.status, result.error, result.outputs, wall,
        Usage(totals.input_tokens, totals.output_tokens, totals.cached_tokens), usages,
        totals.llm_calls, totals.tool_calls,
        sum(a.get("pyagent.time_to_first_token_s", 0.0) for a in calls) if calls else None,
        sum(queues) if queues else None)


def run_on_workspace(manifest: Path, files: Mapping[str, str], task: str, workspace: Path,
                     backend: Backend, traces: TraceStore, mode: str = "sequenced",
                     run_id: str | None = None) -> FleetRun:
    """Write `files` into a new `workspace` and run the manifest file `manifest` on it."""
    if workspace.exists():
        shutil.rmtree(workspace)
    for name, text in files.items():
        path = workspace / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    workspace.mkdir(parents=True, exist_ok=True)
    return run_manifest(load_manifest(manifest, set(TOOLS)), workspace, task, backend, traces,
                        mode, run_id=run_id)


def run_example(engine: Engine, example: Path, mode: str, folder: Path, *,
                compaction: Compaction | None = None,
                max_tokens: int | None = None) -> dict[str, Any]:
    """Run `example` (a folder with project/, manifest.yaml, task.txt and check.py) once on a
    fresh copy of its project in a new folder under `folder`, the engine's prefix cache cleared
    first; its measurements and the usage of each LLM call."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{example.name}-{mode}-", dir=folder))
    workspace = run_dir / "workspace"
    shutil.copytree(example / "project", workspace)
    manifest = load_manifest(example / "manifest.yaml", set(TOOLS))
    if max_tokens is not None:
        agents = {name: agent.model_copy(update={"limits": agent.limits.model_copy(
            update={"max_tokens": max_tokens})}) for name, agent in manifest.agents.items()}
        manifest = dataclasses.replace(manifest, agents=agents)
    engine.cache.clear_prefix_cache()
    traces = TraceStore(run_dir / "traces.db")
    try:
        run = run_manifest(manifest, workspace, (example / "task.txt").read_text().strip(),
                           EmbeddedBackend(engine), traces, mode, compaction)
    finally:
        traces.close()
    check = subprocess.run([sys.executable, str(example / "check.py"), workspace],
                           capture_output=True, text=True, timeout=300)
    return {"example": example.name, "mode": mode, "compaction": compaction is not None,
            "status": run.status, "error": run.error, "wall_s": run.wall_s,
            "prompt_tokens": run.usage.prompt_tokens, "cached_tokens": run.usage.cached_tokens,
            "prefilled_tokens": run.usage.prompt_tokens - run.usage.cached_tokens,
            "output_tokens": run.usage.completion_tokens, "llm_calls": run.llm_calls,
            "tool_calls": run.tool_calls, "success": check.returncode == 0,
            "steps": {k: v["status"] for k, v in run.outputs.items()},
            "usages": [[u.prompt_tokens, u.completion_tokens, u.cached_tokens]
                       for u in run.usages]}
