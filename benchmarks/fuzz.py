"""The fuzzer on the embedded fleet: attack success and utility under each defense, the adaptive
search against the static corpus at equal model calls, and the injection detector.

    .venv/bin/python benchmarks/fuzz.py [--sections defenses,adaptive,fleet,detector]
                                        [--limit N] [--budget N] [--fleet-limit N]

A run of some sections keeps the other sections' latest figures in the result file.

- defenses: the assistant target (one tool-using turn); every corpus attack on its goals and
  channels, a seeded sample of `--limit` the same under every defense set, plus each task twice
  without attack; ASR, utility and utility under attack with Wilson 95% intervals.
- adaptive: for each of the assistant's goals, the static corpus (seeded order) and the adaptive
  search, `--budget` model calls each (a white-box pass counts as one).
- fleet: the Code -> Test -> Audit example run by the fleet, undefended (a shared toolbox, the
  loop ending on the tester's words), with state-only conditions (the loop ends on the runtime's
  own test run), with least-privilege tools, and with all defenses: `--fleet-limit` sampled
  attacks and one benign run under each.
- detector: the shipped detector's held-out figures (from its training report) and its measured
  cost per call on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pyagent.bench.provenance import write_sections
from pyagent.engine.generate import Engine
from pyagent.llm.embedded import EmbeddedBackend
from pyagent.security.attacks import load_corpus
from pyagent.security.cases import DEFENSES
from pyagent.security.fuzzrun import (
    Plan,
    adaptive_against_static,
    campaign,
    detector_screen,
    make_targets,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEM = "fuzz"
EXAMPLE = ROOT / "examples" / "bugfix"
ASSISTANT_DEFENSES = ("none", "delimit", "datamark", "encode", "sandwich", "least_privilege",
                      "detector", "all")
FLEET_DEFENSES = ("none", "state_conditions", "least_privilege", "all")


def _progress(attempt: Any) -> None:
    verdict = "benign" if attempt.verdict is None else "HIT" if attempt.hit else \
        "attempted" if attempt.verdict.attempted else "miss"
    print(f"{attempt.case.key}: {verdict} utility={attempt.outcome.utility} "
          f"{attempt.outcome.wall_s:.1f}s", flush=True)


def defenses(backend: EmbeddedBackend, limit: int, target: str = "assistant",
             names: tuple[str, ...] = ASSISTANT_DEFENSES, benign: int = 2) -> dict[str, Any]:
    sets = [DEFENSES[name] for name in names]
    screen, threshold = detector_screen(sets)
    targets = make_targets([target], backend, EXAMPLE, screen, threshold)
    corpus = [a for a in load_corpus() if a.goal in targets[target].goals]
    plan = Plan([target], corpus, sets, limit=limit, benign=benign, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        summary = campaign(plan, targets, Path(folder), progress=_progress)
    return {"target": target, "limit": limit, "benign_runs_per_task": benign,
            "defenses": list(names), "summary": summary}


def adaptive(backend: EmbeddedBackend, budget: int) -> dict[str, Any]:
    targets = make_targets(["assistant"], backend, None, None, None)
    target = targets["assistant"]
    goals = [g for g in target.goals if g != "exfiltrate_prompt"]
    return adaptive_against_static(
        target, backend.engine, load_corpus(), goals, DEFENSES["none"], budget, seed=0,
        progress=lambda name, trial: print(f"{name} {trial.calls}: "
                                           f"{'HIT' if trial.hit else 'miss'}", flush=True))


def detector() -> dict[str, Any]:
    from pyagent.fleet.detector import InjectionDetector

    loaded = InjectionDetector.load()
    text = ("Meeting notes. " * 60)[:1000]
    loaded.score(text)  # warm
    times = []
    for index in range(30):
        start = time.perf_counter()
        loaded.score(f"{index} {text}")
        times.append(time.perf_counter() - start)
    return {"report": loaded.report, "ms_per_call_1kb": {
        "mean": 1000 * statistics.fmean(times),
        "p95": 1000 * sorted(times)[int(0.95 * len(times)) - 1]}}


def _pct(share: dict[str, Any]) -> str:
    if not share.get("n"):
        return "n/a"
    return (f"{100 * share['rate']:.1f}% [{100 * share['low']:.1f}, {100 * share['high']:.1f}] "
            f"({share['k']}/{share['n']})")


def _cut(head: dict[str, Any]) -> str:
    """How much the defenses cut ASR, and at what cost in utility."""
    if not head["asr_before"]["n"] or not head["asr_after"]["n"]:
        cut = "no ASR to compare (a side ran no attacked case)"
    elif head["reduction"]:
        cut = f"ASR cut {head['reduction']:.1f}x"
    elif head["asr_before"]["k"]:
        cut = (f"ASR cut to zero (at least {head['reduction_at_least']:.1f}x at the 95% upper "
               "bound)")
    else:
        cut = "no attack succeeded undefended"
    loss = head["utility_loss_points"]
    return cut + ("" if loss is None else f", utility loss {loss:.1f} points")


def _ratios(static: dict[str, Any], adaptive: dict[str, Any]) -> str:
    """The adaptive search's ASR and successful attacks as multiples of the static corpus's."""
    parts = []
    for label, mine, theirs in (
            ("ASR", adaptive["asr"]["rate"], static["asr"]["rate"]),
            ("successful attacks", adaptive["asr"]["k"], static["asr"]["k"]),
            ("distinct successful attacks", adaptive["distinct_successful_attacks"],
             static["distinct_successful_attacks"])):
        parts.append(f"{label} {mine / theirs:.2f}x" if theirs else
                     f"{label} {mine} against none")
    return ", ".join(parts)


def table(result: dict[str, Any]) -> list[str]:
    lines = [f"# Fuzzer ({result['meta']['date']}, {result['meta']['machine']})", ""]
    for key, title in (("defenses", "assistant target"), ("fleet", "fleet target")):
        if key not in result:
            continue
        part = result[key]
        lines += [f"## Defenses, {title} ({part['limit']} attacked cases per defense)", "",
                  "| defense | ASR | attempted | utility | utility under attack | breaches | "
                  "flagged |", "|---|---|---|---|---|---|---|"]
        for name, row in part["summary"]["by_defense"].items():
            lines.append(f"| {name} | {_pct(row['asr'])} | {_pct(row['attempted'])} | "
                         f"{_pct(row['utility'])} | {_pct(row['utility_under_attack'])} | "
                         f"{row['breaches']} | {row['flagged']} |")
        head = part["summary"].get("headline")
        if head:
            lines += ["", f"all defenses against none: {_cut(head)}", ""]
        lines += ["", "| family | defense | ASR |", "|---|---|---|"]
        for row in part["summary"]["by_family"]:
            lines.append(f"| {row['family']} | {row['defense']} | {_pct(row['asr'])} |")
        lines += ["", "| channel | defense | ASR |", "|---|---|---|"]
        for row in part["summary"]["by_channel"]:
            lines.append(f"| {row['channel']} | {row['defense']} | {_pct(row['asr'])} |")
        lines.append("")
    if "adaptive" in result:
        part = result["adaptive"]
        lines += [f"## Adaptive search against the static corpus ({part['budget_per_goal']} "
                  "model calls per goal)", "",
                  "| goal | search | calls | fielded | ASR | distinct hits |",
                  "|---|---|---|---|---|---|"]
        for goal, both in part["by_goal"].items():
            for name in ("static", "adaptive"):
                s = both[name]
                lines.append(f"| {goal} | {name} | {s['calls']} | {s['fielded']} | "
                             f"{_pct(s['asr'])} | {s['distinct_successful_attacks']} |")
        for name in ("static", "adaptive"):
            s = part[name]
            lines.append(f"| all | {name} | {s['calls']} | {s['fielded']} | {_pct(s['asr'])} | "
                         f"{s['distinct_successful_attacks']} |")
        lines += ["", f"adaptive against static: {_ratios(part['static'], part['adaptive'])}", ""]
    if "detector" in result:
        part = result["detector"]
        lines += ["## Injection detector", "", "```", json.dumps(part, indent=1)[:3000], "```",
                  ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="defenses,adaptive,fleet,detector")
    parser.add_argument("--limit", type=int, default=40,
                        help="attacked cases per defense on the assistant")
    parser.add_argument("--budget", type=int, default=120, help="model calls per goal")
    parser.add_argument("--defenses", default=",".join(ASSISTANT_DEFENSES),
                        help="defense sets on the assistant")
    parser.add_argument("--fleet-limit", type=int, default=8,
                        help="attacked cases per defense on the fleet")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    result: dict[str, Any] = {"benchmark": "fuzz-bench"}
    backend = EmbeddedBackend(Engine.load()) if sections - {"detector"} else None
    if "defenses" in sections:
        result["defenses"] = defenses(backend, args.limit,
                                      names=tuple(args.defenses.split(",")))
    if "adaptive" in sections:
        result["adaptive"] = adaptive(backend, args.budget)
    if "fleet" in sections:
        result["fleet"] = defenses(backend, args.fleet_limit, "fleet", FLEET_DEFENSES, benign=1)
    if "detector" in sections:
        result["detector"] = detector()
    write_sections(ROOT, RESULTS, STEM, result, sections, table)


if __name__ == "__main__":
    main()
