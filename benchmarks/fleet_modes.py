"""Sequenced vs hand-over execution of the same manifests on the embedded engine.

    .venv/bin/python benchmarks/fleet_modes.py [--repeats N] [--quick]

Each repeat runs every example manifest (examples/bugfix: Code -> Test -> Audit;
examples/docstrings: Read -> Document -> Review; examples/triage: Test -> Diagnose -> Report) once
per mode, on a fresh copy of its project, with greedy decoding and one shared engine (prefix cache
cleared between runs, so no run benefits from another; one-time costs such as building the
grammar tokenizer are paid in a warm-up call before the first run). Recorded per run: end-to-end
wall time, prompt tokens prefilled and served from the cache (from the trace store), LLM and tool
calls, and task success, judged afterwards by the example's own `check.py`, independently of the
agents.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from pyagent.bench.fleet import run_example
from pyagent.bench.provenance import provenance, write_atomic
from pyagent.engine.generate import Engine
from pyagent.fleet.tools.registry import tool_specs
from pyagent.types import CompletionRequest, Message, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE_NAMES = ("bugfix", "docstrings", "triage")
MODES = ("sequenced", "handover")


SUMMED = ("wall_s", "prompt_tokens", "prefilled_tokens", "cached_tokens", "llm_calls")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per example and mode: medians over repeats; overall: those medians summed per mode."""
    out: dict[str, Any] = {}
    for example in dict.fromkeys(r["example"] for r in runs):
        out[example] = {}
        for mode in MODES:
            rows = [r for r in runs if r["example"] == example and r["mode"] == mode]
            out[example][mode] = {key: statistics.median(r[key] for r in rows) for key in SUMMED}
            out[example][mode]["success_rate"] = statistics.fmean(
                float(r["success"]) for r in rows)
    examples = list(out)
    out["all"] = {mode: {key: sum(out[e][mode][key] for e in examples) for key in SUMMED}
                  for mode in MODES}
    for mode in MODES:
        out["all"][mode]["success_rate"] = statistics.fmean(
            float(r["success"]) for r in runs if r["mode"] == mode)
    for name in [*examples, "all"]:
        out[name]["wall_ratio_sequenced_over_handover"] = (
            out[name]["sequenced"]["wall_s"] / out[name]["handover"]["wall_s"])
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| manifest | mode | wall s | prompt tokens | prefilled | cached | LLM calls | "
             "success | sequenced / handover wall |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["summary"].items():
        for mode in MODES:
            m = s[mode]
            ratio = f"{s['wall_ratio_sequenced_over_handover']:.2f}x" if mode == MODES[0] else ""
            lines.append(f"| {name} | {mode} | {m['wall_s']:.1f} | {m['prompt_tokens']:.0f} | "
                         f"{m['prefilled_tokens']:.0f} | {m['cached_tokens']:.0f} | "
                         f"{m['llm_calls']:.0f} | {m['success_rate']:.0%} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="one run per mode with 64-token actions (writes fleet-modes-quick)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    engine = Engine.load()
    engine.generate(CompletionRequest(  # warm-up: one-time costs must not land on the first run
        messages=(Message("user", "Read a.py"),), tools=tool_specs(["read_file"]),
        sampling=SamplingParams(max_tokens=8)))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            folder = Path(tmp) / f"{repeat}"
            folder.mkdir()
            for example in EXAMPLE_NAMES:
                for mode in (MODES if repeat % 2 == 0 else MODES[::-1]):  # alternate the order
                    run = run_example(engine, EXAMPLES / example, mode, folder,
                                      max_tokens=64 if args.quick else None)
                    print(json.dumps(run), flush=True)
                    runs.append(run)
    tasks = {name: (EXAMPLES / name / "task.txt").read_text().strip() for name in EXAMPLE_NAMES}
    result = {"benchmark": "fleet_modes", "meta": provenance(ROOT), "tasks": tasks,
              "runs": runs, "summary": summarize(runs)}
    stem = "fleet-modes-quick" if args.quick else "fleet-modes"
    write_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(RESULTS / f"{stem}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
