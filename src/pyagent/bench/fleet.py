"""Run an example manifest on the embedded engine and measure it: wall time, tokens prefilled and
served from the cache, calls, and task success as judged by the example's own `check.py`."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyagent.engine.generate import Engine
from pyagent.fleet.compaction import Compaction
from pyagent.fleet.manifest import load_manifest
from pyagent.fleet.orchestrator import Orchestrator
from pyagent.fleet.tools.registry import TOOLS
from pyagent.llm.embedded import EmbeddedBackend
from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.resilience.memory_store import MemoryCheckpointStore
from pyagent.types import Usage


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
    bus = EventBus()
    traces = TraceStore(run_dir / "traces.db")
    traces.attach(bus)
    backend = EmbeddedBackend(engine)
    runner = Orchestrator(manifest, lambda _agent: backend, workspace, bus,
                          MemoryCheckpointStore(), mode, compaction)  # type: ignore[arg-type]
    start = time.perf_counter()
    result = runner.run((example / "task.txt").read_text().strip())
    wall = time.perf_counter() - start
    totals = traces.totals(result.run_id)
    usages = [Usage(s.attributes["gen_ai.usage.input_tokens"],
                    s.attributes["gen_ai.usage.output_tokens"],
                    s.attributes["pyagent.usage.cached_tokens"])
              for s in traces.spans(result.run_id) if s.kind == "llm_call" and s.status == "ok"]
    traces.close()
    check = subprocess.run([sys.executable, str(example / "check.py"), workspace],
                           capture_output=True, text=True, timeout=300)
    return {"example": example.name, "mode": mode, "compaction": compaction is not None,
            "status": result.status, "error": result.error, "wall_s": wall,
            "prompt_tokens": totals.input_tokens, "cached_tokens": totals.cached_tokens,
            "prefilled_tokens": totals.input_tokens - totals.cached_tokens,
            "output_tokens": totals.output_tokens, "llm_calls": totals.llm_calls,
            "tool_calls": totals.tool_calls, "success": check.returncode == 0,
            "steps": {k: v["status"] for k, v in result.outputs.items()},
            "usages": [[u.prompt_tokens, u.completion_tokens, u.cached_tokens] for u in usages]}
