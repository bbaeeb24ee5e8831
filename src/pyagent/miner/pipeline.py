"""`pyagent mine`: from failed attempts to specialists promoted on evidence, as proposed files.

1. **Mine**: the signature of every failed attempt in the data folder, embedded and clustered.
2. **Demonstrations**: verified successes in the data folder; with `rationalize`, also runs of the
   incumbent manifest on the failed training tasks with the fix given as a hint (STaR's
   rationalization), kept only when the suite's checker accepts the result, and shown without
   the hint; with `references`, for the failed training tasks still without one, the suite's
   known fix run as the failing agent's own tool calls and accepted by the same checker.
3. **Synthesize** a specialist for each of the largest clusters, and a control from a random
   sample of the failures.
4. **Validate**: the incumbent manifest and each candidate (the manifest with a route that hands
   the cluster's step to the specialist) on the suite's validation split; a candidate is promoted
   only on a significant paired gain (`promotion.py`).
5. **Test**: the incumbent, every candidate and the promoted manifest on the test split, which
   mining never saw: the claim.

Nothing the user wrote is changed: everything goes to `out` (the candidates' files, the proposed
`manifest.yaml` and `agents.yaml`, `mine.json`, `mine.html`, and `traces.db` with the miner's
phases and every run it made).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pyagent.bench.runner import RunSettings, SuiteRunner
from pyagent.bench.suites.base import Item, Suite
from pyagent.errors import ConfigError
from pyagent.fleet.manifest import Manifest, load_manifest
from pyagent.fleet.tools.registry import TOOLS
from pyagent.llm.base import Backend
from pyagent.miner.clusters import cluster, embed
from pyagent.miner.demonstrations import from_reference, from_run, successes_in
from pyagent.miner.promotion import Decision, compare, decide
from pyagent.miner.signatures import Signature, mine
from pyagent.miner.specialists import Candidate, Success, control_members, synthesize
from pyagent.observe.events import EventBus, Span
from pyagent.observe.traces import TraceStore

INCUMBENT = "incumbent"
PROMOTED = "promoted"


@dataclass(frozen=True)
class MineSettings:
    """What `pyagent mine` mines, how many specialists it tries, and how it validates them."""

    data: Path
    manifest: Path
    out: Path
    clusters: int = 2  # specialists synthesized, from the largest clusters
    min_cluster: int = 3
    threshold: float = 1.0  # a score below it is a failure
    validation: int = 4  # tasks per family of the validation split
    test: int = 4  # tasks per family of the test split
    difficulties: tuple[int, ...] = (1,)
    families: tuple[str, ...] | None = None
    rationalize: bool = True
    references: bool = True
    alpha: float = 0.05
    seed: int = 0
    concurrency: int = 4


@dataclass
class Ledger:
    """What mining cost, phase by phase: wall and CPU seconds (the process's and its children's,
    such as the sandboxed test runs), and tokens."""

    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    def measure(self, name: str, started: tuple[float, float], tokens: int = 0) -> None:
        wall, cpu = started
        self.phases[name] = {"wall_s": time.perf_counter() - wall,
                             "cpu_s": _cpu() - cpu, "tokens": tokens}

    @staticmethod
    def start() -> tuple[float, float]:
        return time.perf_counter(), _cpu()


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Miner:
    """One mining run: `suite` gives the tasks and their checker, `backend` runs every agent,
    `embedder` (MiniLM) embeds signatures and task texts."""

    def __init__(self, settings: MineSettings, suite: Suite, backend: Backend, embedder: Any,
                 progress: Callable[[str], None] = lambda _line: None):
        self.settings, self.suite, self.backend = settings, suite, backend
        self.embedder, self.progress = embedder, progress
        self.manifest: Manifest = load_manifest(settings.manifest, set(TOOLS))
        self.ledger = Ledger()
        self.traces: TraceStore  # the run's store, open while `run` runs
        settings.out.mkdir(parents=True, exist_ok=True)

    def run(self) -> dict[str, Any]:
        """Mine, synthesize, validate and test; the report (also written to `out`)."""
        out = self.settings.out
        bus = EventBus()
        with TraceStore(out / "traces.db") as traces:
            self.traces = traces  # also reads the runs the miner makes (one connection)
            detach = traces.attach(bus)
            try:
                with bus.span("run", "mine", f"mine-{int(time.time())}",
                              **{"pyagent.task": f"mine {self.settings.data}"}) as root:
                    report = self._run(root)
                    root.set("pyagent.run.status", "succeeded")
            finally:
                traces.flush()
                detach()
        from pyagent.miner.report import write_report

        write_report(report, out)
        return report

    def _run(self, root: Span) -> dict[str, Any]:
        settings = self.settings
        with root.child("step", "step signatures", **{"pyagent.step.id": "signatures"}) as span:
            started = Ledger.start()
            signatures = mine(settings.data, settings.threshold)
            if not signatures:
                raise ConfigError(f"--data {settings.data}: no failed attempt to mine")
            vectors = embed(signatures, self.embedder)
            clusters, noise = cluster(signatures, vectors, settings.min_cluster)
            self.ledger.measure("signatures and clusters", started)
            span.update({"pyagent.miner.signatures": len(signatures),
                         "pyagent.miner.clusters": len(clusters)})
        self.progress(f"{len(signatures)} failures, {len(clusters)} clusters, "
                      f"{len(noise)} in none")
        with root.child("step", "step demonstrations", **{"pyagent.step.id": "demonstrations"}):
            successes = self._successes(signatures)
        with root.child("step", "step synthesis", **{"pyagent.step.id": "synthesis"}):
            candidates = self._candidates(clusters, signatures, successes)
        for candidate in candidates:
            self._write_candidate(candidate)
        with root.child("step", "step validation", **{"pyagent.step.id": "validation"}) as span:
            validation = self._evaluate("validation", settings.validation, candidates)
            mined = {c.name: validation["scores"][c.name] for c in candidates
                     if c.kind == "mined"}
            decisions = decide(validation["scores"][INCUMBENT], mined, settings.alpha,
                               settings.seed)
            promoted = self._promoted(decisions, candidates)
            span.set("pyagent.miner.promoted", [c.name for c in promoted])
        self._write_proposal(promoted)
        with root.child("step", "step test", **{"pyagent.step.id": "test"}):
            test = self._evaluate("test", settings.test, candidates,
                                  promoted=bool(promoted))
        return self._report(signatures, clusters, noise, successes, candidates, validation,
                            decisions, promoted, test)

    # --- demonstrations ----------------------------------------------------------------------

    def _successes(self, signatures: Sequence[Signature]) -> list[Success]:
        started = Ledger.start()
        found = successes_in(self.settings.data)
        tokens = 0
        hint = getattr(self.suite, "hint", None)
        covered: set[str] = set()
        if self.settings.rationalize and hint is not None:
            items = self._failed_items(signatures)
            if items:
                self.progress(f"rationalizing {len(items)} failed training tasks")
                hinted = [_with_task(item, f"{item.task} {hint(item)}") for item in items]
                records = self._runner(self.settings.manifest, "rationalize-").run(hinted)
                tokens = sum(_tokens(r) for r in records)
                by_id = {item.id: item for item in items}
                for record in records:
                    if record.get("correct") and record.get("run_id"):
                        covered.add(record["item_id"])
                        found += from_run(self.traces.spans(record["run_id"]),
                                          by_id[record["item_id"]].task,
                                          f"run {record['run_id']} of {record['item_id']} "
                                          "(rationalized: solved with the fix as a hint)")
        if self.settings.references and hasattr(self.suite, "reference"):
            found += self._references(signatures, covered)
        self.ledger.measure("demonstrations", started, tokens)
        self.progress(f"{len(found)} verified demonstrations")
        return found

    def _references(self, signatures: Sequence[Signature], covered: set[str]) -> list[Success]:
        """The suite's known fixes of failed training tasks not in `covered`, each run as the
        failing agent's tool calls and kept when the checker accepts it."""
        from pyagent.bench.suites.repair import write_workspace

        found = []
        failed = {s.item_id: s for s in reversed(signatures)
                  if s.item_id and s.source == "fleet" and s.step
                  and s.agent in self.manifest.agents}
        for item_id, signature in failed.items():
            if item_id in covered:
                continue
            item = self.suite.item(item_id)  # type: ignore[attr-defined]
            agent = self.manifest.agents[signature.agent]
            calls = self.suite.reference(item, agent.tools)  # type: ignore[attr-defined]
            workspace = write_workspace(item, self.settings.out / "references"
                                        / item_id.replace("/", "_"))
            success = from_reference(
                item.task, calls, agent, signature.step, workspace,
                lambda root, item=item: self.suite.check(item, root).correct,
                f"the reference fix of {item_id}, run as {agent.name}'s tool calls and "
                "accepted by the checker")
            if success is not None:
                found.append(success)
        return found

    def _failed_items(self, signatures: Sequence[Signature]) -> list[Item]:
        rebuild = getattr(self.suite, "item", None)
        if rebuild is None:
            return []
        ids = list(dict.fromkeys(s.item_id for s in signatures
                                 if s.item_id and s.source == "fleet"))
        return [rebuild(item_id) for item_id in ids]

    # --- candidates ----------------------------------------------------------------------------

    def _similar(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        return np.asarray(self.embedder.sentences(list(a)) @ self.embedder.sentences(list(b)).T)

    def _candidates(self, clusters: Sequence[Any], signatures: Sequence[Signature],
                    successes: Sequence[Success]) -> list[Candidate]:
        started = Ledger.start()
        candidates = []
        for found in clusters[:self.settings.clusters]:
            if not any(s.step and s.agent for s in found.members):
                continue
            candidates.append(synthesize(
                f"specialist-c{found.id}", found.members, found.symptoms, self.manifest.agents,
                successes, self._similar, cluster=found.id))
        sample = [s for s in control_members(clusters, signatures, self.settings.seed)
                  if s.step and s.agent]
        if candidates and sample:
            from pyagent.miner.clusters import over_represented

            candidates.append(synthesize("control-random", sample,
                                         over_represented(sample, signatures),
                                         self.manifest.agents, successes, self._similar,
                                         kind="control"))
        self.ledger.measure("synthesis", started)
        return candidates

    def _write_candidate(self, candidate: Candidate) -> Path:
        folder = self.settings.out / "candidates" / candidate.name
        folder.mkdir(parents=True, exist_ok=True)
        _write_files(self.manifest, [candidate], folder,
                     f"candidate {candidate.name} ({candidate.kind}), proposed by pyagent mine")
        return folder / "manifest.yaml"

    def _write_proposal(self, promoted: Sequence[Candidate]) -> None:
        names = ", ".join(c.name for c in promoted) or "none: the incumbents stay"
        _write_files(self.manifest, promoted, self.settings.out,
                     f"proposed by pyagent mine; promoted specialists: {names}")

    @staticmethod
    def _promoted(decisions: Sequence[Decision], candidates: Sequence[Candidate]
                  ) -> list[Candidate]:
        """The promoted candidates, the best gain per step (one route per step)."""
        by_name = {c.name: c for c in candidates}
        best: dict[str, Decision] = {}
        for decision in decisions:
            step = by_name[decision.candidate].step
            if decision.promoted and (step not in best or decision.comparison.gain
                                      > best[step].comparison.gain):
                best[step] = decision
        return [by_name[d.candidate] for d in best.values()]

    # --- evaluation ----------------------------------------------------------------------------

    def _runner(self, manifest: Path, label: str) -> SuiteRunner:
        return SuiteRunner(self.backend, {self.suite.name: self.suite},
                           RunSettings(concurrency=self.settings.concurrency,
                                       seed=self.settings.seed),
                           manifest=manifest, folder=self.settings.out, label=label)

    def _evaluate(self, split: str, count: int, candidates: Sequence[Candidate],
                  promoted: bool = False) -> dict[str, Any]:
        """Every variant on the same tasks of `split`: scores in task order, tokens, records."""
        started = Ledger.start()
        items = self.suite.items(split, count, self.settings.seed,
                                 list(self.settings.difficulties),
                                 list(self.settings.families) if self.settings.families
                                 else None)
        out = self.settings.out
        variants = {INCUMBENT: self.settings.manifest,
                    **{c.name: out / "candidates" / c.name / "manifest.yaml" for c in candidates}}
        if promoted:
            variants[PROMOTED] = out / "manifest.yaml"
        result: dict[str, Any] = {"items": [i.id for i in items], "scores": {}, "tokens": {},
                                  "calls": {}, "records": {}}
        for name, manifest in variants.items():
            self.progress(f"{split}: {name} on {len(items)} tasks")
            records = self._runner(manifest, f"{split}-{name}-").run(items)
            by_item = {r["item_id"]: r for r in records}
            result["scores"][name] = [float(by_item[i.id].get("score") or 0.0) for i in items]
            result["tokens"][name] = sum(_tokens(r) for r in records)
            result["calls"][name] = self._calls(records)
            result["records"][name] = [{k: r.get(k) for k in (
                "item_id", "correct", "score", "detail", "run_id", "error")} for r in records]
        tokens = sum(result["tokens"].values())
        self.ledger.measure(split, started, tokens)
        return result

    def _calls(self, records: Sequence[dict[str, Any]]) -> dict[str, int]:
        """The tool calls of `records`' runs, and how many of them failed."""
        calls = failed = 0
        for record in records:
            if record.get("run_id"):
                spans = [s for s in self.traces.spans(record["run_id"]) if s.kind == "tool_call"]
                calls += len(spans)
                failed += sum(s.status == "error" for s in spans)
        return {"calls": calls, "failed": failed}

    # --- report --------------------------------------------------------------------------------

    def _report(self, signatures: Sequence[Signature], clusters: Sequence[Any],
                noise: Sequence[Signature], successes: Sequence[Success],
                candidates: Sequence[Candidate], validation: dict[str, Any],
                decisions: Sequence[Decision], promoted: Sequence[Candidate],
                test: dict[str, Any]) -> dict[str, Any]:
        settings = self.settings
        base = test["scores"][INCUMBENT]
        claims = {name: compare(base, scores, seed=settings.seed).to_dict()
                  for name, scores in test["scores"].items() if name != INCUMBENT}
        after = PROMOTED if PROMOTED in test["scores"] else INCUMBENT
        extra = (sum(test["scores"][after]) - sum(base))
        mining = {k: v for k, v in self.ledger.phases.items() if k not in ("validation", "test")}
        spent = {"tokens": sum(p["tokens"] for p in self.ledger.phases.values()),
                 "cpu_s": sum(p["cpu_s"] for p in self.ledger.phases.values()),
                 "wall_s": sum(p["wall_s"] for p in self.ledger.phases.values())}
        return {
            "settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in settings.__dict__.items()},
            "suite": self.suite.name,
            "failures": len(signatures),
            "clusters": [c.to_dict() for c in clusters],
            "noise": [s.key for s in noise],
            "demonstrations": [{"step": s.step, "agent": s.agent,
                                "source": s.demonstration.source} for s in successes],
            "candidates": [c.to_dict() for c in candidates],
            "validation": {"items": validation["items"], "scores": validation["scores"],
                           "tokens": validation["tokens"], "calls": validation["calls"],
                           "decisions": [d.to_dict() for d in decisions]},
            "promoted": [c.name for c in promoted],
            "test": {"items": test["items"], "scores": test["scores"], "tokens": test["tokens"],
                     "calls": test["calls"],
                     "against_incumbent": claims, "after": after},
            "cost": {"phases": self.ledger.phases, "mining": mining, "total": spent,
                     "extra_solved_on_test": extra,
                     "tokens_per_extra_solved": spent["tokens"] / extra if extra > 0 else None,
                     "cpu_s_per_extra_solved": spent["cpu_s"] / extra if extra > 0 else None},
            "records": {"validation": validation["records"], "test": test["records"]},
        }


def _with_task(item: Item, task: str) -> Item:
    from dataclasses import replace

    return replace(item, task=task)


def _tokens(record: dict[str, Any]) -> int:
    return int(record.get("prompt_tokens") or 0) + int(record.get("completion_tokens") or 0)


def _write_files(manifest: Manifest, specialists: Sequence[Candidate], folder: Path,
                 header: str) -> None:
    """`folder`/manifest.yaml and agents.yaml: the user's manifest and agents, with each
    specialist added and routed to its step."""
    raw = yaml.safe_load(manifest.path.read_text(encoding="utf-8"))
    agents_path = manifest.files[1]
    agents = yaml.safe_load(agents_path.read_text(encoding="utf-8"))
    for specialist in specialists:
        agents["agents"].append(specialist.agent.model_dump(mode="json", exclude_defaults=True))
        _route(raw["steps"], specialist.step, specialist.agent.name)
    raw["agents"] = "agents.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    comment = f"# {header}\n# from {manifest.path}\n"
    (folder / "agents.yaml").write_text(comment + yaml.safe_dump(agents, sort_keys=False,
                                                                 allow_unicode=True))
    (folder / "manifest.yaml").write_text(comment + yaml.safe_dump(raw, sort_keys=False,
                                                                   allow_unicode=True))


def _route(steps: list[dict[str, Any]], step_id: str, agent: str) -> None:
    for step in steps:
        if "loop" in step:
            _route(step["loop"]["steps"], step_id, agent)
        elif step.get("id") == step_id:
            step.setdefault("routes", []).insert(0, {"agent": agent})
