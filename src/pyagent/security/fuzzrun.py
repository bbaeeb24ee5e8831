"""`pyagent fuzz`: a campaign, the adaptive search, or continuous attack, with their outputs.

Outputs in the chosen folder: `fuzz.report.jsonl` and `fuzz.hitlog.jsonl` (garak's layout),
`traces.db` (every attempt's spans and its verdict, which `pyagent observe` turns into ASR gauges
and alerts), `fuzz.json` (the summary with Wilson intervals) and `fuzz.html`.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyagent.errors import ConfigError
from pyagent.fleet.defenses import Screen
from pyagent.llm.base import Backend
from pyagent.observe.traces import TraceStore
from pyagent.security.attacks import CHANNELS, Attack
from pyagent.security.campaign import Attempt, Log, plan, run_cases
from pyagent.security.cases import POSITIONS, Case, DefenseSet
from pyagent.security.summary import finite, summarize
from pyagent.security.targets import TARGETS, AssistantTarget, FleetTarget, Target

REQUIRED = frozenset({"defense", "attack", "hit", "attempted", "utility", "mutators"})
REPORT, HITLOG, SUMMARY, TRACES = "fuzz.report.jsonl", "fuzz.hitlog.jsonl", "fuzz.json", \
    "traces.db"


@dataclass
class Plan:
    """What to attack and how."""

    targets: list[str]
    attacks: list[Attack]
    defenses: list[DefenseSet]
    channels: list[str] | None = None
    mutators: list[tuple[str, ...]] = field(default_factory=lambda: [()])
    positions: list[str] = field(default_factory=lambda: ["end"])
    repeat: int = 1
    seed: int = 0
    limit: int | None = None
    every_task: bool = False
    benign: int = 1
    tasks: list[str] | None = None

    def check(self) -> None:
        """Refuse unknown targets, channels and positions before anything loads."""
        for names, kind, known in ((self.targets, "target", tuple(TARGETS)),
                                   (self.channels or (), "channel", CHANNELS),
                                   (self.positions, "position", POSITIONS)):
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ConfigError(f"unknown {kind} {unknown[0]!r}; {kind}s: {', '.join(known)}")

    def cases(self, targets: Sequence[Target], seed: int | None = None) -> list[Case]:
        self.check()
        return plan(targets, self.attacks, self.channels, self.defenses, self.mutators,
                    self.benign, self.repeat, self.seed if seed is None else seed,
                    self.positions, self.every_task, self.limit, self.tasks)


def make_targets(names: Sequence[str], backend: Backend, example: Path | None,
                 screen: Screen | None, threshold: float | None) -> dict[str, Target]:
    """The named targets on `backend`; the fleet target runs `example`."""
    targets: dict[str, Target] = {}
    for name in names:
        if name not in TARGETS:
            raise ConfigError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
        if name == "fleet":
            if example is None:
                raise ConfigError("the fleet target needs --example (for example "
                                  "examples/bugfix)")
            targets[name] = FleetTarget(backend, example, screen, threshold)
        else:
            targets[name] = AssistantTarget(backend, screen, threshold)
    return targets


def detector_screen(defenses: Sequence[DefenseSet]) -> tuple[Screen | None, float | None]:
    """The shipped injection detector and its tuned threshold, when a defense set uses it."""
    if not any(d.detector for d in defenses):
        return None, None
    from pyagent.fleet.detector import InjectionDetector

    detector = InjectionDetector.load()
    return detector.score, detector.threshold


def campaign(plan_: Plan, targets: dict[str, Target], out: Path, backend: Backend | None = None,
             progress: Callable[[Attempt], None] | None = None,
             stop: Callable[[], bool] = lambda: False, meta: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Run the plan once; write the logs, traces, summary and HTML report into `out`."""
    cases = plan_.cases(list(targets.values()))
    log = Log(out, meta={"cases": len(cases), **(meta or {})})
    traces = TraceStore(out / TRACES)
    try:
        attempts = run_cases(cases, targets, log, traces, backend, progress, stop)
    finally:
        traces.close()
    records = [a.record() for a in attempts]
    summary = summarize(records)
    log.close(summary.get("headline"))
    write_summary(summary, records, out, meta, complete=len(attempts) == len(cases))
    return summary


def write_summary(summary: dict[str, Any], records: list[dict[str, Any]], out: Path,
                  meta: dict[str, Any] | None, complete: bool = True,
                  extra: dict[str, Any] | None = None) -> list[Path]:
    """`fuzz.json` and `fuzz.html` from a summary and its records."""
    from pyagent.security.report import write_html

    data = finite({"meta": meta or {}, "complete": complete, "summary": summary,
                   "records": records, **(extra or {})})
    path = out / SUMMARY
    path.write_text(json.dumps(data, indent=1, default=str, allow_nan=False))
    return [path, write_html(data, out / "fuzz.html")]


def read_records(report: Path) -> list[dict[str, Any]]:
    """The attempts logged in a report JSONL (a continuous run's, for example). A last line cut
    short (the process was killed while writing it) is skipped; a bad line elsewhere is an
    error naming it."""
    records = []
    try:
        lines = report.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise ConfigError(f"{report}: cannot read: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise ConfigError(f"{report}:{number}: not a JSON line") from None
        if isinstance(entry, dict) and entry.get("entry_type") == "attempt":
            missing = sorted(REQUIRED - set(entry))
            if missing:
                raise ConfigError(f"{report}:{number}: an attempt without {', '.join(missing)}")
            wrong = _mistyped(entry)
            if wrong:
                raise ConfigError(f"{report}:{number}: {wrong}")
            records.append(entry)
    return records


def _mistyped(entry: dict[str, Any]) -> str | None:
    """What is wrong with the types of an attempt's fields that the summary reads, or None."""
    for name in ("hit", "attempted", "utility", "hard_negative"):
        if name in entry and not isinstance(entry[name], bool):
            return f"{name} must be true or false, got {entry[name]!r:.60}"
    for name in ("defense", "attack", "family", "goal", "channel", "split"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            return f"{name} must be a string, got {entry[name]!r:.60}"
    if not isinstance(entry["defense"], str):
        return f"defense must be a string, got {entry['defense']!r:.60}"
    if not (isinstance(entry["mutators"], list)
            and all(isinstance(m, str) for m in entry["mutators"])):
        return f"mutators must be a list of names, got {entry['mutators']!r:.60}"
    controls = entry.get("controls", {})
    if not (isinstance(controls, dict) and all(isinstance(v, bool) for v in controls.values())):
        return f"controls must map goals to true or false, got {controls!r:.60}"
    for name in ("breaches", "flagged", "llm_calls"):
        if name in entry and (isinstance(entry[name], bool) or not isinstance(entry[name], int)):
            return f"{name} must be a whole number, got {entry[name]!r:.60}"
    return None


class Continuous:
    """Keeps attacking: a round of the plan (fresh canaries and secrets, a fresh sample), then a
    pause, until stopped. Each attempt goes to the report JSONL and the trace store as it ends;
    a stop (SIGTERM, SIGINT) lets the case in flight finish, then closes both cleanly."""

    def __init__(self, plan_: Plan, targets: dict[str, Target], out: Path,
                 interval_s: float = 60.0, rounds: int | None = None,
                 backend: Backend | None = None, meta: dict[str, Any] | None = None):
        self.plan, self.targets, self.out = plan_, targets, out
        self.interval_s, self.rounds, self.backend, self.meta = interval_s, rounds, backend, meta
        self.stopping = threading.Event()

    def stop(self, *_: Any) -> None:
        """Ask the loop to end after the case in flight (safe from a signal handler)."""
        self.stopping.set()

    def run(self, progress: Callable[[Attempt], None] | None = None) -> dict[str, Any]:
        log = Log(self.out, meta={"mode": "continuous", "interval_s": self.interval_s,
                                  **(self.meta or {})})
        traces = TraceStore(self.out / TRACES)
        attempts: list[Attempt] = []
        round_ = 0
        try:
            while not self.stopping.is_set() and (self.rounds is None or round_ < self.rounds):
                cases = self.plan.cases(list(self.targets.values()), self.plan.seed + round_)
                random.Random(f"{self.plan.seed}/{round_}").shuffle(cases)
                attempts += run_cases(cases, self.targets, log, traces, self.backend, progress,
                                      self.stopping.is_set)
                round_ += 1
                if self.rounds is None or round_ < self.rounds:
                    self.stopping.wait(self.interval_s)
        finally:
            traces.close()
            records = [a.record() for a in attempts]
            summary = summarize(records)
            log.close(summary.get("headline"))
            write_summary(summary, records, self.out, self.meta,
                          complete=not self.stopping.is_set(), extra={"rounds": round_})
        return summary


def select_attacks(corpus: Sequence[Attack], families: Sequence[str] = (),
                   goals: Sequence[str] = (), ids: Sequence[str] = ()) -> list[Attack]:
    """The attacks of `corpus` in the given families, goals and ids (each filter optional);
    a name that matches nothing is an error naming what exists."""
    for chosen, kind, known in ((families, "family", {a.family for a in corpus}),
                                (goals, "goal", {a.goal for a in corpus}),
                                (ids, "attack", {a.id for a in corpus})):
        missing = [name for name in chosen if name not in known]
        if missing:
            raise ConfigError(f"no {kind} {missing[0]!r} in the corpus; it has "
                              f"{', '.join(sorted(known))}")
    return [a for a in corpus if (not families or a.family in families)
            and (not goals or a.goal in goals) and (not ids or a.id in ids)]


def mutator_chains(texts: Sequence[str]) -> list[tuple[str, ...]]:
    """`base64`, `rot13+repeat`, `-` (none) as chains of mutator names, each name checked."""
    from pyagent.security.mutators import MUTATORS

    chains = []
    for text in texts:
        chain = tuple(name for name in text.split("+") if name and name != "-")
        unknown = [name for name in chain if name not in MUTATORS]
        if unknown:
            raise ConfigError(f"--mutator {text!r}: unknown mutator {unknown[0]!r}; mutators: "
                              f"{', '.join(MUTATORS)}")
        chains.append(chain)
    return chains


def adaptive_against_static(target: AssistantTarget, engine: Any, corpus: Sequence[Attack],
                            goals: Sequence[str], defense: DefenseSet, budget: int,
                            seed: int = 0, progress: Callable[[str, Any], None] | None = None
                            ) -> dict[str, Any]:
    """For each goal: the static corpus (seeded order) and the adaptive search, each given
    `budget` model calls, on the same target and defense; their summaries and the best attacks
    the adaptive search found."""
    from pyagent.security.campaign import run_case, with_environment
    from pyagent.security.evolve import Evolver, Search, static_search

    by_goal: dict[str, dict[str, Any]] = {}
    searches: dict[str, list[Search]] = {"static": [], "adaptive": []}
    best: list[dict[str, Any]] = []
    for goal in goals:
        attacks = [a for a in corpus if a.goal == goal]
        if not attacks or goal not in target.goals:
            continue
        cases = [with_environment(Case(target.name, task, defense, attack, channel,
                                       seed=index, hard_negative=target.hard_negative(task)),
                                  target, seed)
                 for index, (attack, channel, task) in enumerate(
                     (a, c, t) for a in attacks for c in target.channels
                     for t in target.tasks())]
        random.Random(f"{seed}/static/{goal}").shuffle(cases)
        static = static_search(cases, budget, lambda case: run_case(case, target),
                               lambda trial: progress and progress("static", trial))
        evolver = Evolver(target, engine, goal, corpus, defense, seed)
        adaptive = evolver.run(budget, lambda trial: progress and progress("adaptive", trial))
        searches["static"].append(static)
        searches["adaptive"].append(adaptive)
        by_goal[goal] = {"static": static.summary(), "adaptive": adaptive.summary()}
        winners = {t.gene.id: t for t in adaptive.trials if t.hit}
        best += [{"goal": goal, "id": t.gene.id, "channel": t.gene.channel,
                  "position": t.gene.position, "mutators": "+".join(t.gene.mutators) or "-",
                  "lineage": " > ".join(t.gene.lineage), "logprob": t.logprob,
                  "text": t.gene.text} for t in winners.values()]
    return {"budget_per_goal": budget, "defense": defense.name, "by_goal": by_goal,
            "static": _merged("static", searches["static"]),
            "adaptive": _merged("adaptive", searches["adaptive"]), "best": best}


def _merged(name: str, searches: Sequence[Any]) -> dict[str, Any]:
    """Several goals' searches as one: fielded attacks and hits summed, curves laid end to end."""
    from pyagent.security.summary import rate

    trials = [t for s in searches for t in s.trials]
    curve, offset, hits = [], 0, 0
    for search in searches:
        for point in search.curve():
            curve.append({"calls": offset + point["calls"], "fielded": len(curve) + 1,
                          "hits": hits + point["hits"]})
        offset += search.calls
        hits += sum(t.hit for t in search.trials)
    return {"name": name, "calls": sum(s.calls for s in searches),
            "white_box_passes": sum(s.scored for s in searches), "fielded": len(trials),
            "asr": rate(sum(t.hit for t in trials), len(trials)),
            "distinct_successful_attacks": len({t.gene.id for t in trials if t.hit}),
            "curve": curve}
