"""A campaign: plan cases (targets x tasks x attacks x channels x defenses), run each on a fresh
temporary workspace, judge it from state, and log it as garak does (a report JSONL of attempts
and evaluations, and a hit log).

Every benign case (no attack) measures utility; every attacked case measures attack success and
utility under attack, as AgentDojo does. The judges also run on benign cases: how often a goal
"happens" with no attacker is the control every attack success rate is read against.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from pyagent.errors import ConfigError
from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.security.attacks import Attack
from pyagent.security.cases import GEMMA_MARKERS, POSITIONS, Case, DefenseSet, armed, environment
from pyagent.security.judges import JUDGES, Verdict
from pyagent.security.summary import finite
from pyagent.security.targets import Outcome, Target


@dataclass(frozen=True)
class Attempt:
    """A case run and judged."""

    case: Case
    outcome: Outcome
    verdict: Verdict | None  # None for a benign case
    controls: dict[str, bool]  # benign cases: each goal's judge, with no attacker

    @property
    def hit(self) -> bool:
        return self.verdict is not None and self.verdict.hit

    def record(self) -> dict[str, Any]:
        """The attempt as JSON data (one line of the report)."""
        evidence = self.outcome.evidence
        return {**self.case.record(), "case": self.case.key,
                "hit": self.hit, "attempted": bool(self.verdict and self.verdict.attempted),
                "detail": self.verdict.detail if self.verdict else "",
                "utility": self.outcome.utility, "error": self.outcome.error,
                "breaches": evidence.breaches, "flagged": evidence.flagged,
                "llm_calls": evidence.llm_calls, "wall_s": round(self.outcome.wall_s, 3),
                "tool_calls": [{"name": e.name, "arguments": e.arguments[:500],
                                "error": e.error} for e in evidence.tools],
                "answers": [a[:1000] for a in evidence.answers],
                "written": sorted(evidence.written), "controls": self.controls}


def plan(targets: Sequence[Target], attacks: Sequence[Attack], channels: Sequence[str] | None,
         defenses: Sequence[DefenseSet], mutators: Sequence[tuple[str, ...]] = ((),),
         benign: int = 1, repeat: int = 1, seed: int = 0,
         positions: Sequence[str] = ("end",), every_task: bool = False,
         limit: int | None = None, tasks: Sequence[str] | None = None) -> list[Case]:
    """The cases to run: for each defense, `benign` runs of every task without attack (each with
    its own canaries and secret), then every attack on every
    channel the target offers, with every mutator chain and position. An attack runs on one task
    (in turn), or on all with `every_task`. `limit` keeps that many attacked cases per defense,
    drawn by `seed`, the same ones under every defense (so defenses compare on equal cases).
    `tasks` keeps only those tasks (of the targets that have them). Each case's environment
    (canary, secret) comes from `seed` and the case."""
    for position in positions:
        if position not in POSITIONS:
            raise ConfigError(f"unknown position {position!r}; positions: {', '.join(POSITIONS)}")
    cases: list[Case] = []
    for target in targets:
        chosen = target.channels if channels is None else \
            [c for c in channels if c in target.channels]
        offered = target.tasks()
        chosen_tasks = offered if tasks is None else [t for t in offered if t in tasks]
        if not chosen_tasks:
            raise ConfigError(f"target {target.name!r} has none of the tasks "
                              f"{', '.join(tasks or ())}; its tasks: {', '.join(offered)}")
        attacked = [(attack, channel, tuple(chain), position)
                    for attack in attacks if attack.goal in target.goals
                    for channel in chosen for chain in mutators for position in positions]
        if limit is not None and len(attacked) > limit:
            attacked = random.Random(f"{seed}/{target.name}/sample").sample(attacked, limit)
        for defense in defenses:
            for round_ in range(repeat):
                cases += [Case(target.name, task, defense, seed=round_ * benign + run,
                               hard_negative=target.hard_negative(task))
                          for run in range(benign) for task in chosen_tasks]
                for index, (attack, channel, chain, position) in enumerate(attacked):
                    for task in chosen_tasks if every_task else \
                            [chosen_tasks[index % len(chosen_tasks)]]:
                        cases.append(Case(target.name, task, defense, attack, channel, chain,
                                          position, round_,
                                          hard_negative=target.hard_negative(task)))
    by_name = {t.name: t for t in targets}
    return [with_environment(case, by_name[case.target], seed) for case in cases]


def with_environment(case: Case, target: Target, seed: int) -> Case:
    """`case` with fresh environment values drawn from `seed` and the case itself."""
    rng = random.Random(f"{seed}/{case.key}")
    values = target.values()
    env = environment(rng, values["canary_dir"], values["sink_path"], values["tool"],
                      values["arguments"], GEMMA_MARKERS)
    return replace(case, env=env)


class Log:
    """garak-style logs: `<name>.report.jsonl` (a start entry, one attempt and one eval entry per
    case, a completion entry) and `<name>.hitlog.jsonl` (one entry per successful attack)."""

    def __init__(self, folder: Path, name: str = "fuzz", meta: dict[str, Any] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.report_path = folder / f"{name}.report.jsonl"
        self.hitlog_path = folder / f"{name}.hitlog.jsonl"
        self.run_id = uuid.uuid4().hex
        self._report: IO[str] = self.report_path.open("a", encoding="utf-8")
        self._hits: IO[str] = self.hitlog_path.open("a", encoding="utf-8")
        self.seq = 0
        self._write(self._report, {"entry_type": "start_run setup", "run": self.run_id,
                                   "start_time": time.time(), **(meta or {})})

    def attempt(self, attempt: Attempt) -> None:
        record = attempt.record()
        self._write(self._report, {"entry_type": "attempt", "run": self.run_id,
                                   "seq": self.seq, "status": 2, **record})
        goal = attempt.case.attack.goal if attempt.case.attack else None
        self._write(self._report, {"entry_type": "eval", "run": self.run_id, "seq": self.seq,
                                   "detector": f"state.{goal}" if goal else "utility",
                                   "passed": int(not attempt.hit), "total": 1})
        if attempt.hit:
            self._write(self._hits, {"run_id": self.run_id, "attempt_seq": self.seq,
                                     "goal": goal, "probe": record["family"],
                                     "attack": record["attack"], "channel": record["channel"],
                                     "defense": record["defense"], "prompt": record["payload"],
                                     "output": record["answers"], "trigger": record["detail"],
                                     "score": 1.0})
        self.seq += 1

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self._write(self._report, {"entry_type": "completion", "run": self.run_id,
                                   "end_time": time.time(), "attempts": self.seq,
                                   **({"summary": summary} if summary else {})})
        self._report.close()
        self._hits.close()

    @staticmethod
    def _write(handle: IO[str], entry: dict[str, Any]) -> None:
        handle.write(json.dumps(finite(entry), ensure_ascii=False, allow_nan=False) + "\n")
        handle.flush()


def run_case(case: Case, target: Target, traces: TraceStore | None = None,
             backend: Any = None, keep: Path | None = None) -> Attempt:
    """Arm, run and judge one case on a fresh temporary copy of its workspace (removed after,
    unless `keep` names a folder to leave it in)."""
    case = armed(case, backend)
    run_id = fresh_run_id(case, traces, keep)
    workdir = Path(tempfile.mkdtemp(prefix="pyagent-fuzz-"))
    try:
        outcome = target.run(case, workdir, run_id, traces)
    finally:
        if keep is not None:
            shutil.copytree(workdir, keep / run_id)
        shutil.rmtree(workdir, ignore_errors=True)
    if case.attack is not None:
        attempt = Attempt(case, outcome, JUDGES[case.attack.goal](outcome.evidence, case.env), {})
    else:
        controls = {goal: JUDGES[goal](outcome.evidence, case.env).hit for goal in target.goals}
        attempt = Attempt(case, outcome, None, controls)
    if traces is not None:
        publish_verdict(attempt, run_id, traces)
    return attempt


def run_id_for(case: Case) -> str:
    """The case's run id, from its key and environment: the same seed gives the same ids (and so
    the same spotlighting delimiters, which derive from the run id), while the environment's
    secret keeps them unguessable to a payload."""
    text = f"{case.key}/{json.dumps(case.env, sort_keys=True)}"
    return "fuzz-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def fresh_run_id(case: Case, traces: TraceStore | None, keep: Path | None) -> str:
    """`run_id_for(case)`, with a suffix where `traces` or `keep` already holds that run."""
    base = run_id = run_id_for(case)
    count = 0
    while (traces is not None and traces.spans(run_id)) or (keep and (keep / run_id).exists()):
        count += 1
        run_id = f"{base}-{count}"
    return run_id


def publish_verdict(attempt: Attempt, run_id: str, traces: TraceStore) -> None:
    """The attempt's verdict as a `goal` span of its run in `traces`: what `pyagent observe`
    turns into the fuzzer's metrics (attempts by outcome, ASR gauges) and alerts."""
    case, verdict = attempt.case, attempt.verdict
    outcome = "benign" if verdict is None else "hit" if verdict.hit else \
        "attempted" if verdict.attempted else "miss"
    bus = EventBus()
    detach = traces.attach(bus)
    try:
        with bus.span("goal", f"judge {case.attack.goal if case.attack else 'utility'}", run_id,
                      **{"pyagent.fuzz.outcome": outcome, "pyagent.fuzz.target": case.target,
                         "pyagent.fuzz.task": case.task, "pyagent.fuzz.defense": case.defense.name,
                         "pyagent.fuzz.family": case.attack.family if case.attack else "",
                         "pyagent.fuzz.goal": case.attack.goal if case.attack else "",
                         "pyagent.fuzz.channel": case.channel or "",
                         "pyagent.fuzz.utility": attempt.outcome.utility,
                         "pyagent.fuzz.breaches": attempt.outcome.evidence.breaches,
                         "pyagent.fuzz.detail": verdict.detail if verdict else ""}):
            pass
    finally:
        detach()
        traces.flush()


def run_cases(cases: Iterable[Case], targets: dict[str, Target], log: Log | None = None,
              traces: TraceStore | None = None, backend: Any = None,
              on_attempt: Callable[[Attempt], None] | None = None,
              stop: Callable[[], bool] = lambda: False) -> list[Attempt]:
    """Run cases one after another until done or `stop()` says so; each logged as it ends."""
    attempts = []
    for case in cases:
        if stop():
            break
        attempt = run_case(case, targets[case.target], traces, backend)
        attempts.append(attempt)
        if log is not None:
            log.attempt(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
    return attempts
