"""What the command line does on a cluster: run a batch, resume runs, list where runs live."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyagent.cluster.connect import connect
from pyagent.cluster.membership import RayMembership, ring_dir
from pyagent.cluster.runs import RingSettings, RunSpec
from pyagent.cluster.snapshots import KEY, pack
from pyagent.cluster.supervisor import BatchReport, Supervisor
from pyagent.errors import ConfigError
from pyagent.fleet.tasks import BatchTask


def batch_specs(tasks: list[BatchTask], manifest: Path, workspace: Path, data: Path, mode: str,
                options: dict[str, Any], ring: RingSettings) -> list[RunSpec]:
    """One spec per task: each run starts from a packed copy of `workspace`."""
    if not workspace.is_dir():
        raise ConfigError(f"workspace {workspace} is not a directory")
    files = pack(workspace)
    options = {**options, "ring": {"k": ring.k, "write_quorum": ring.write_quorum}}
    return [RunSpec(t.run_id, t.task, str(manifest.resolve()), str(data.resolve()), files, mode,
                    options, ring) for t in tasks]


def run_batch(address: str, specs: list[RunSpec], data: Path, cpus_per_run: float,
              on_event: Callable[[str, dict[str, Any]], None], resume: bool = False
              ) -> BatchReport:
    """Connect, run (or resume) every spec on the cluster, and end its node engines."""
    from pyagent.cluster.engine import stop_engines

    connect(address)
    supervisor = Supervisor(ring_dir(data), specs[0].ring.k, cpus_per_run, on_event=on_event)
    stopped = 0
    try:
        report = supervisor.run(specs, resume=resume)
    finally:
        models = {(s.options.get("model") or "", s.options.get("dtype", "float32"))
                  for s in specs}
        for model, dtype in models:
            stopped += stop_engines(sorted(supervisor.nodes_seen), model, dtype)
    report.engines_stopped = stopped
    return report


def resume_specs(address: str, run_ids: list[str], data: Path, history: str | None = None,
                 force: bool = False) -> list[RunSpec]:
    """Specs that continue `run_ids` from the ring with the settings each run started with."""
    connect(address)
    membership = RayMembership(ring_dir(data))
    membership.ensure_hosts()
    specs = []
    for run_id in run_ids:
        probe = RingSettings(k=0, write_quorum=1).store(membership)
        checkpoint = probe.get(run_id)
        if checkpoint is None:
            raise ConfigError(f"no run {run_id!r} on the ring of {data}")
        state = checkpoint.state
        ring = RingSettings(**state["options"].get("ring", {}), history=history)
        specs.append(RunSpec(run_id, state["task"], state["manifest"], str(data.resolve()), "",
                             state["mode"], state["options"], ring, force))
    return specs


@dataclass(frozen=True)
class RingRun:
    """A run as the ring holds it: its state, where it runs and which nodes hold it."""

    run_id: str
    state: dict[str, Any]
    status: str  # a running run whose node is gone is interrupted
    node: str | None
    epoch: int
    holders: list[str]


def ring_runs(address: str, data: Path) -> list[RingRun]:
    """Every run on the ring of `data`, with its placement."""
    connect(address)
    membership = RayMembership(ring_dir(data))
    membership.ensure_hosts()
    store = RingSettings(k=0, write_quorum=1).store(membership)
    alive = set(membership.alive_nodes())
    rows = []
    for run_id in store.runs():
        head = store.head(run_id)
        if head is None:
            continue
        checkpoint, epoch = head
        state = {k: v for k, v in checkpoint.state.items() if k != KEY}
        node = (state.get("owner") or {}).get("node")
        status = state["status"]
        if status == "running" and node not in alive:
            status = "interrupted"
        rows.append(RingRun(run_id, state, status, node, epoch, store.holders(run_id)))
    return rows
