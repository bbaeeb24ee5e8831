"""The buddy ring on Ray: one replica-host actor per node, pinned there, keeping its replicas on
that node's disk; membership is Ray's node table.

A host stores its replicas in `RING_DIR/HOSTNAME-SLOT.db`, taking the lowest slot no live process
holds (an exclusive `flock`). A node that restarts on the same machine therefore finds the
replicas it held before (they are verified and repaired like any others), and several nodes on one
machine (as in tests) each get their own file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pyagent.cluster.connect import NAMESPACE
from pyagent.errors import PyAgentError
from pyagent.resilience.membership import HostUnavailable, Plan, SameCall
from pyagent.resilience.replica_host import Replica, ReplicaHost

HOST_PREFIX = "ring-host-"
NODES_TTL_S = 0.2  # how long a read of Ray's node table is reused
INLINE_BYTES = 100 << 10  # Ray's own limit for passing an argument inline


def ring_dir(data: Path) -> str:
    """Where each node keeps its replicas: `DATA/ring`, a path every node must be able to use."""
    return str((data / "ring").resolve())


class NodeHost(ReplicaHost):
    """A `ReplicaHost` on the disk of the node it runs on (the actor's class)."""

    def __init__(self, node_id: str, ring_dir: str):
        self._slot_lock, path = _claim_slot(Path(ring_dir))
        super().__init__(node_id, path)

    def where(self) -> str:
        return str(self.path)


def _claim_slot(ring_dir: Path) -> tuple[int, Path]:
    """The lowest free slot's lock (held while this process lives) and database path."""
    ring_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for slot in range(1024):
        fd = os.open(ring_dir / f"{host}-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd, ring_dir / f"{host}-{slot}.db"
    raise PyAgentError(f"{ring_dir}: every replica slot of host {host} is taken")


def _large(value: Any) -> bool:
    """Whether a call's argument is worth one copy in the object store for several calls (Ray
    sends small ones inline with each call, which is faster)."""
    replicas = value if isinstance(value, list) else [value]
    return sum(len(r.text) for r in replicas if isinstance(r, Replica)) > INLINE_BYTES


class RayMembership(SameCall):
    """The nodes Ray reports alive that run a replica host, and calls to those hosts."""

    def __init__(self, ring_dir: str) -> None:
        self.ring_dir = ring_dir
        digest = hashlib.sha256(ring_dir.encode()).hexdigest()[:8]
        self.prefix = f"{HOST_PREFIX}{digest}-"  # one ring per folder, even on one cluster
        self._handles: dict[str, Any] = {}
        self._alive: list[str] = []
        self._read_at = 0.0

    def alive_nodes(self) -> list[str]:
        """The ids of the nodes Ray's node table reports alive."""
        now = time.monotonic()
        if now - self._read_at > NODES_TTL_S:
            self._alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
            self._read_at = now
        return self._alive

    def ensure_hosts(self, timeout_s: float = 60.0) -> list[str]:
        """Start a replica host on every live node that lacks one; the nodes with a host."""
        started = {}
        for node in self.alive_nodes():
            if self._handle(node) is None:
                started[node] = ray.remote(NodeHost).options(
                    name=self.prefix + node, namespace=NAMESPACE, lifetime="detached",
                    get_if_exists=True, num_cpus=0, max_concurrency=16, max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(node, self.ring_dir)
        answers = self._gather({node: h.ping.remote() for node, h in started.items()},
                               timeout_s)
        for node, answer in answers.items():
            if answer == node:
                self._handles[node] = started[node]
        return self.live()

    def live(self) -> list[str]:
        return [node for node in self.alive_nodes() if self._handle(node) is not None]

    def call_each(self, plan: Plan, timeout_s: float = 10.0) -> dict[str, Any]:
        stored: dict[int, Any] = {}  # a large argument goes to the object store once

        def shared(value: Any) -> Any:
            if len(plan) < 2 or not _large(value):
                return value
            return stored.setdefault(id(value), ray.put(value))

        refs, answers = {}, {}
        for node, (method, args) in plan.items():
            handle = self._handle(node)
            if handle is None:
                answers[node] = HostUnavailable(f"node {node[:12]} has no replica host")
            else:
                refs[node] = getattr(handle, method).remote(*map(shared, args))
        answers.update(self._gather(refs, timeout_s))
        if any(isinstance(a, HostUnavailable) for a in answers.values()):
            self._read_at = 0.0  # read the node table afresh next time
        return answers

    def _gather(self, refs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if not refs:
            return {}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        answers: dict[str, Any] = {}
        for node, ref in refs.items():
            if ref not in done:
                answers[node] = HostUnavailable(f"node {node[:12]} did not answer in "
                                                f"{timeout_s:g} s")
                continue
            try:
                answers[node] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, PyAgentError):
                    answers[node] = cause
                else:
                    self._handles.pop(node, None)
                    answers[node] = HostUnavailable(f"node {node[:12]}: "
                                                    f"{type(exc).__name__}")
        return answers

    def _handle(self, node: str) -> Any | None:
        handle = self._handles.get(node)
        if handle is None:
            try:
                handle = ray.get_actor(self.prefix + node, namespace=NAMESPACE)
            except ValueError:
                return None
            self._handles[node] = handle
        return handle
