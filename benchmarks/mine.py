"""The expert miner on the embedded fleet: does mining failed repair runs make the fleet solve
more held-out repair tasks?

    .venv/bin/python benchmarks/mine.py [--train 2] [--validation 1] [--test 1] [--clusters 1]

Two commands, as a user runs them, then the figures:
1. `pyagent bench run repair --manifest examples/bugfix/manifest.yaml --split train` on the
   embedded engine: the fleet's own failures (and any successes), with their traces;
2. `pyagent mine --data <that folder> --suite repair`: signatures, clusters, rationalized
   demonstrations, specialists and a random-sample control, validated on the validation split
   and claimed on the test split, which mining never saw.

The tables give the solve rate on the test split before and after mining (Wilson 95% intervals)
against the control, the paired gain with its bootstrap interval and exact McNemar p-value, each
specialist's cluster, validation gain and whether it held on test, and what mining cost against
what it gained. `--data DIR` reuses a finished step 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyagent.bench.provenance import write_sections
from pyagent.bench.scores import wilson

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEM = "mine"
MANIFEST = ROOT / "examples" / "bugfix" / "manifest.yaml"
PYAGENT = str(Path(sys.executable).with_name("pyagent"))


def _run(argv: list[str]) -> float:
    """Run one CLI command, its output shown as it comes; its wall time."""
    print("$", " ".join(argv), flush=True)
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    backend = ["--dtype", args.dtype, "--concurrency", str(args.concurrency)]
    data = Path(args.data) if args.data else work / "train"
    train_s = None
    if not args.data:
        train_s = _run([PYAGENT, "bench", "run", "repair", "--manifest", str(MANIFEST),
                        "--split", "train", "--difficulty", args.difficulty,
                        "--limit", str(args.train), "--seed", str(args.seed),
                        "--out", str(data), *backend])
    out = work / "mined"
    mine_s = _run([PYAGENT, "mine", "--data", str(data), "--suite", "repair",
                   "--manifest", str(MANIFEST), "--out", str(out),
                   "--clusters", str(args.clusters), "--validation", str(args.validation),
                   "--test", str(args.test), "--difficulty", args.difficulty,
                   "--seed", str(args.seed), *backend])
    report = json.loads((out / "mine.json").read_text())
    train = _train_summary(data)
    return {"settings": vars(args), "train": {**train, "wall_s": train_s},
            "mine_wall_s": mine_s, "report": {k: v for k, v in report.items()
                                              if k != "records"}}


def _train_summary(data: Path) -> dict[str, Any]:
    found = next((p for p in sorted(data.glob("*.json")) if "records" in p.read_text()), None)
    if found is None:
        return {}
    result = json.loads(found.read_text())
    records = result.get("records", [])
    return {"tasks": len(records), "solved": sum(bool(r.get("correct")) for r in records),
            "tokens": sum(int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens")
                                                                   or 0) for r in records)}


def _rate(scores: list[float]) -> str:
    solved, n = int(sum(s >= 1.0 for s in scores)), len(scores)
    _, low, high = wilson(solved, n)
    return f"{solved}/{n} ({solved / n:.0%}) [{low:.0%}, {high:.0%}]" if n else "-"


def _gain(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    return (f"{c['gain']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}], {c['wins']} wins / "
            f"{c['losses']} losses, p = {c['p_value']:.3g}")


def table(result: dict[str, Any]) -> list[str]:
    part = result.get("mining")
    if not part:
        return []
    report, train = part["report"], part["train"]
    test, validation = report["test"], report["validation"]
    lines = ["## The expert miner on the embedded fleet", "",
             f"Training data: {train.get('solved', 0)}/{train.get('tasks', 0)} train-split "
             f"repair tasks solved by the incumbent; {report['failures']} failure signatures, "
             f"{len(report['clusters'])} clusters, {len(report['demonstrations'])} verified "
             f"demonstrations; promoted: {', '.join(report['promoted']) or 'none'}.", "",
             "### Test split (never seen by mining)", "",
             "| variant | solved [95% CI] | gain over the incumbent [95% CI], paired | "
             "tool calls failed | tokens |", "|---|---|---|---|---|"]
    for name, scores in test["scores"].items():
        claim = test["against_incumbent"].get(name)
        calls = test.get("calls", {}).get(name)
        failed = f"{calls['failed']}/{calls['calls']}" if calls else "-"
        lines.append(f"| {name} | {_rate(scores)} | {_gain(claim)} | {failed} | "
                     f"{test['tokens'][name]:,} |")
    lines += ["", "### Specialists", "",
              "| candidate | kind | cluster (size): label | step | procedure | validation gain "
              "| promoted | test gain | holds on test |", "|---|---|---|---|---|---|---|---|---|"]
    clusters = {c["id"]: c for c in report["clusters"]}
    decisions = {d["candidate"]: d for d in validation["decisions"]}
    for c in report["candidates"]:
        found = clusters.get(c["cluster"])
        where = f"{found['id']} ({found['size']}): {found['label']}" if found else "random sample"
        decision = decisions.get(c["name"])
        valid = decision["comparison"] if decision else None
        if valid is None:
            from pyagent.miner.promotion import compare

            valid = compare(validation["scores"]["incumbent"],
                            validation["scores"][c["name"]]).to_dict()
        claim = test["against_incumbent"].get(c["name"])
        holds = bool(claim and claim["low"] > 0)
        lines.append(f"| {c['name']} | {c['kind']} | {where} | {c['step']} | "
                     f"{' -> '.join(c.get('procedure') or []) or '-'} | {_gain(valid)} | "
                     f"{decision['promoted'] if decision else '(control)'} | {_gain(claim)} | "
                     f"{'yes' if holds else 'no'} |")
    cost = report["cost"]
    lines += ["", "### What mining cost", "", "| phase | wall s | CPU s | tokens |",
              "|---|---|---|---|"]
    for name, phase in cost["phases"].items():
        lines.append(f"| {name} | {phase['wall_s']:.0f} | {phase['cpu_s']:.0f} | "
                     f"{int(phase['tokens']):,} |")
    total = cost["total"]
    per = cost["tokens_per_extra_solved"]
    lines += [f"| total | {total['wall_s']:.0f} | {total['cpu_s']:.0f} | "
              f"{int(total['tokens']):,} |", "",
              f"Extra tasks solved on the test split after mining: "
              f"{cost['extra_solved_on_test']:g}; tokens per extra solved task: "
              f"{f'{per:,.0f}' if per else 'none solved, so no cost per task'}.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=2, help="train tasks per family")
    parser.add_argument("--validation", type=int, default=1, help="validation tasks per family")
    parser.add_argument("--test", type=int, default=1, help="test tasks per family")
    parser.add_argument("--clusters", type=int, default=1, help="specialists to synthesize")
    parser.add_argument("--difficulty", default="1")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="a finished `bench run` folder to mine instead")
    parser.add_argument("--keep", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": "mine", "mining": measure(args, work)}
    else:
        with tempfile.TemporaryDirectory(prefix="pyagent-mine-") as folder:
            result = {"benchmark": "mine", "mining": measure(args, Path(folder))}
    write_sections(ROOT, RESULTS, STEM, result, {"mining"}, table)


if __name__ == "__main__":
    main()
