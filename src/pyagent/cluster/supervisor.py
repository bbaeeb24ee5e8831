"""The supervisor: fans a batch of runs out over the cluster, keeps the buddy ring whole, and
resumes on a surviving node every run whose actor died with its node.

Each run is placed on its owner on the ring (the first node its id hashes to), whose own host
keeps one of its k+1 copies. Ray restarts actors but does not restore their state; the supervisor
does not ask it to. When a run's actor dies, the supervisor hands the run to a warm standby (an
actor kept ready on every node, preferably on the run's owner among the live nodes, which
already holds a copy), or else a new actor, that claims the run with a new epoch and resumes it
from the ring. After every change in membership (and every
`repair_every_s`) it starts replica hosts on new nodes and runs a repair pass, so each run is back
to k+1 copies after a death and the ring rebalances after a join.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pyagent.cluster.membership import RayMembership
from pyagent.cluster.runs import INTERRUPTED, RunOnNode, RunSpec
from pyagent.errors import ConfigError
from pyagent.resilience.repair import RepairReport, repair
from pyagent.resilience.ring import HashRing
from pyagent.resilience.ring_store import check_quorum

MAX_ATTEMPTS = 20  # attempts per run before the supervisor gives up on it
RETRY_PAUSE_S = 1.0  # before resuming a run whose checkpoint found too few live replicas


@dataclass
class Attempt:
    spec: RunSpec
    number: int
    resume: bool
    actor: Any
    launched: float


@dataclass
class BatchReport:
    """How a batch went: each run's final outcome, every failover, every repair pass."""

    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    failovers: list[dict[str, Any]] = field(default_factory=list)
    repairs: list[RepairReport] = field(default_factory=list)
    seconds: float = 0.0
    engines_stopped: int = 0  # node engines the batch started and ended


class Supervisor:
    """Runs batches on the cluster that `ray` is connected to.

    The main loop only settles attempts and launches the next ones; a maintenance thread starts
    replica hosts on new nodes, repairs the ring and keeps one warm standby actor per node (its
    process started and PyAgent imported), which takes over a run whose node died."""

    def __init__(self, ring_dir: str, k: int, cpus_per_run: float = 0.25,
                 repair_every_s: float = 2.0,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None):
        self.membership = RayMembership(ring_dir)
        self.k = k
        self.cpus_per_run = cpus_per_run
        self.repair_every_s = repair_every_s
        self.on_event = on_event or (lambda kind, data: None)
        self.nodes_seen: set[str] = set()
        self._pending: dict[Any, Attempt] = {}  # result ref -> the attempt it ends
        self._later: list[tuple[float, RunSpec, int]] = []  # retries due at a time
        self._lock = threading.Lock()
        self._standbys: dict[str, tuple[Any, Any]] = {}  # node -> (actor, its warm-up ref)

    def start(self) -> list[str]:
        """Start the replica hosts; the nodes that have one."""
        live = self.membership.ensure_hosts(timeout_s=10.0)
        self.nodes_seen |= set(live)
        return live

    def run(self, specs: list[RunSpec], resume: bool = False) -> BatchReport:
        """Run (or, with `resume`, continue) every spec until each has an outcome."""
        began = time.monotonic()
        report = BatchReport()
        members = self.start()
        needed = check_quorum(self.k, specs[0].ring.write_quorum) if specs else 0
        if len(members) < needed:
            raise ConfigError(f"the ring needs {needed} live nodes for k={self.k} and write "
                              f"quorum {needed}; the cluster has {len(members)} (add nodes or "
                              "lower --replicas)")
        for spec in specs:
            self._launch(spec, 1, resume)
        stop = threading.Event()
        keeper = threading.Thread(target=self._maintain, args=(stop, report), daemon=True,
                                  name="pyagent-ring-keeper")
        keeper.start()
        try:
            while self._pending or self._later:
                ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=0.1) \
                    if self._pending else ([], [])
                for ref in ready:
                    self._settle(ref, self._pending.pop(ref), report)
                for due in [entry for entry in self._later if entry[0] <= time.monotonic()]:
                    self._later.remove(due)
                    self._launch(due[1], due[2], True)
                if not ready:
                    time.sleep(0.05 if self._later and not self._pending else 0)
        finally:
            stop.set()
            keeper.join()
            with self._lock:
                for actor, _ in self._standbys.values():
                    ray.kill(actor)
                self._standbys.clear()
        self.repair(report)
        report.seconds = time.monotonic() - began
        return report

    def repair(self, report: BatchReport) -> list[str]:
        """Start hosts on new nodes and run one repair pass; the nodes with a host."""
        members = self.start()
        report.repairs.append(repair(self.membership, self.k, timeout_s=10.0))
        self.on_event("repair", vars(report.repairs[-1]))
        return members

    def _maintain(self, stop: threading.Event, report: BatchReport) -> None:
        """Repair after every change in membership (and every `repair_every_s`); keep a warm
        standby on every live node."""
        alive, last = set(self.membership.alive_nodes()), time.monotonic()
        self._stand_by(alive)
        while not stop.wait(0.2):
            now_alive = set(self.membership.alive_nodes())
            if now_alive != alive or time.monotonic() - last > self.repair_every_s:
                self._stand_by(now_alive)
                self.repair(report)
                alive, last = now_alive, time.monotonic()

    def _stand_by(self, alive: set[str]) -> None:
        """A standby on each live node that has none (those of dead nodes are forgotten)."""
        with self._lock:
            for node in set(self._standbys) - alive:
                del self._standbys[node]
            for node in alive - set(self._standbys):
                actor = ray.remote(RunOnNode).options(
                    num_cpus=self.cpus_per_run, max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote()
                self._standbys[node] = (actor, actor.warm.remote())

    def _take_standby(self, wanted: list[str]) -> Any | None:
        """A warm standby, on the first node of `wanted` that has a ready one if any."""
        with self._lock:
            ready = {}
            for node, (actor, warm) in list(self._standbys.items()):
                if ray.wait([warm], timeout=0)[1]:
                    continue  # still starting
                try:
                    ray.get(warm)
                    ready[node] = actor
                except ray.exceptions.RayError:  # it died with its node
                    del self._standbys[node]
            node = next((n for n in wanted if n in ready), next(iter(ready), None))
            if node is None:
                return None
            del self._standbys[node]
            return ready[node]

    def _settle(self, ref: Any, attempt: Attempt, report: BatchReport) -> None:
        """Record a finished attempt, or schedule the next one."""
        spec = attempt.spec
        try:
            outcome = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError) as exc:  # its node (or process) died
            ray.kill(attempt.actor, no_restart=True)  # if it only went silent, it stops now
            failover = {"run_id": spec.run_id, "attempt": attempt.number,
                        "noticed": time.time(), "why": type(exc).__name__}
            report.failovers.append(failover)
            self.on_event("failover", failover)
            self._retry(attempt, report, f"its actor died ({type(exc).__name__})", 0.0)
            return
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            report.outcomes[spec.run_id] = {"run_id": spec.run_id, "status": "error",
                                            "error": str(cause or exc).splitlines()[0],
                                            "attempts": attempt.number}
            self.on_event("done", report.outcomes[spec.run_id])
            return
        outcome["attempts"] = attempt.number
        if outcome["status"] == INTERRUPTED:
            self._retry(attempt, report, outcome["error"], RETRY_PAUSE_S)
            return
        report.outcomes[spec.run_id] = outcome
        self.on_event("done", outcome)

    def _retry(self, attempt: Attempt, report: BatchReport, why: str, after_s: float) -> None:
        spec = attempt.spec
        if attempt.number >= MAX_ATTEMPTS:
            report.outcomes[spec.run_id] = {
                "run_id": spec.run_id, "status": INTERRUPTED, "attempts": attempt.number,
                "error": f"gave up after {attempt.number} attempts; the last: {why}"}
            self.on_event("done", report.outcomes[spec.run_id])
            return
        self._later.append((time.monotonic() + after_s, spec, attempt.number + 1))

    def _launch(self, spec: RunSpec, number: int, resume: bool) -> None:
        """Start an attempt on the run's owner on the ring: a resumed run on a warm standby
        when one is ready, else on a new actor."""
        owner = HashRing(self.membership.live()).replicas(spec.run_id, 1)
        actor = self._take_standby(owner) if resume else None
        if actor is None:
            placement = NodeAffinitySchedulingStrategy(owner[0], soft=True) if owner \
                else "SPREAD"
            actor = ray.remote(RunOnNode).options(
                num_cpus=self.cpus_per_run, max_restarts=0, scheduling_strategy=placement,
            ).remote()
        self._pending[actor.execute.remote(spec, resume)] = Attempt(spec, number, resume, actor,
                                                                    time.time())
        self.on_event("launch", {"run_id": spec.run_id, "attempt": number, "resume": resume})
