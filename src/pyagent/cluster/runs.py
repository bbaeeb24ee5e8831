"""One run as a Ray actor: the orchestrator on whichever node Ray placed it, its checkpoints on
the buddy ring (with its workspace), its trace in the data folder.

`execute(resume=False)` starts the run in a fresh copy of the batch's workspace;
`execute(resume=True)` claims the run with a new epoch (fencing its old owner), rebuilds the
workspace from the latest checkpoint on the ring and continues without repeating a completed
step. A checkpoint the ring would not acknowledge ends the attempt as `interrupted` (the run stays
resumable); a run that ends in any other way reports its status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pyagent.cluster.membership import RayMembership, ring_dir
from pyagent.cluster.snapshots import WorkspaceCheckpoints, unpack
from pyagent.errors import ConfigError
from pyagent.fleet.orchestrator import RUN_ID
from pyagent.resilience.checkpoint import CheckpointError
from pyagent.resilience.history import HistoryLog
from pyagent.resilience.ring_store import RingCheckpointStore, check_quorum

INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class RingSettings:
    """How runs replicate: k successors, the write quorum, how long a put waits for enough live
    nodes, and an optional history file of every put (for audits and the chaos checker)."""

    k: int = 1
    write_quorum: int | None = None
    quorum_wait_s: float = 30.0
    timeout_s: float = 60.0
    history: str | None = None

    def __post_init__(self) -> None:
        check_quorum(self.k, self.write_quorum)

    def store(self, membership: Any) -> RingCheckpointStore:
        return RingCheckpointStore(membership, self.k, self.write_quorum, self.timeout_s,
                                   self.quorum_wait_s,
                                   HistoryLog(self.history) if self.history else None)


@dataclass(frozen=True)
class RunSpec:
    """Everything a node needs to run (or resume) one run of a batch."""

    run_id: str
    task: str
    manifest: str
    data: str
    workspace_files: str  # the batch's starting workspace, packed
    mode: str = "sequenced"
    options: dict[str, Any] = field(default_factory=dict)
    ring: RingSettings = RingSettings()
    force: bool = False  # resume even though the manifest changed

    def __post_init__(self) -> None:
        if not RUN_ID.fullmatch(self.run_id):
            raise ConfigError(f"run id {self.run_id[:80]!r} must be 1 to 128 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")

    @property
    def workspace(self) -> Path:
        return Path(self.data) / "workspaces" / self.run_id


class RunOnNode:
    """The actor's class: one run's attempt, or (started ahead, `warm`) a standby on its node
    that takes over a run when a node dies, without waiting for a process to start."""

    def __init__(self) -> None:
        self.node = ray.get_runtime_context().get_node_id()

    def warm(self) -> str:
        """Import what a run needs, so that taking one over starts at once; this node's id."""
        import pyagent.runtime  # noqa: F401

        return self.node

    def execute(self, spec: RunSpec, resume: bool) -> dict[str, Any]:
        from pyagent.fleet.orchestrator import process_identity
        from pyagent.runtime import Runtime, backend_factory, orchestrator

        started = time.time()
        store = spec.ring.store(RayMembership(ring_dir(Path(spec.data))))
        checkpoints = WorkspaceCheckpoints(store, spec.workspace)
        runtime = Runtime.open(Path(spec.data), checkpoints=checkpoints)
        outcome = {"run_id": spec.run_id, "node": self.node, "resumed": resume,
                   "started": started}
        try:
            if resume:
                store.claim(spec.run_id)
                resume = checkpoints.restore(spec.run_id) is not None  # else: never saved
            if not resume:
                if not spec.workspace_files:
                    raise CheckpointError(f"run {spec.run_id!r} has no readable checkpoint on "
                                          "the ring")
                unpack(spec.workspace_files, spec.workspace)
            runner = orchestrator(Path(spec.manifest), spec.workspace, spec.mode, runtime,
                                  backend_factory(spec.options, lambda: _embedded(spec)),
                                  spec.options.get("compact_keep"),
                                  lambda: {**process_identity(), "node": self.node})
            result = runner.resume(spec.run_id, force=spec.force) if resume else \
                runner.run(spec.task, spec.run_id, spec.options)
            outcome.update(status=result.status, error=result.error,
                           checkpoints=result.checkpoints)
        except CheckpointError as exc:
            outcome.update(status=INTERRUPTED, error=str(exc))
        finally:
            runtime.close()
        outcome.update(epoch=store.epoch(spec.run_id), replicas=store.placed.get(spec.run_id),
                       seconds=time.time() - started)
        return outcome


def _embedded(spec: RunSpec) -> Any:
    """The embedded backend through this node's shared engine."""
    from pyagent.cluster.engine import RayEngineBackend, node_engine

    return RayEngineBackend(node_engine(spec.options.get("model") or "",
                                        spec.options.get("dtype", "float32")))
