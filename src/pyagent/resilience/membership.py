"""The `Membership` seam: which nodes are alive, and calls to their replica hosts.

The ring store and its repair see the cluster only through this protocol. `LocalMembership` holds
its hosts in this process (one SQLite file each, called from a thread pool so their fsyncs
overlap): it serves tests, benchmarks and a single machine with several disks. The Ray
implementation (`pyagent.cluster.membership`) reads Ray's node table and calls one host actor
per node.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pyagent.resilience.checkpoint import CheckpointError
from pyagent.resilience.replica_host import ReplicaHost


class HostUnavailable(CheckpointError):
    """A node's replica host did not answer (its node died, or the call timed out)."""


Plan = dict[str, tuple[str, tuple[Any, ...]]]  # node -> (method, args) of one round of calls


@runtime_checkable
class Membership(Protocol):
    """The live nodes of a cluster and their replica hosts."""

    def live(self) -> list[str]:
        """The ids of the nodes that are alive and have a replica host, sorted."""
        ...

    def call_each(self, plan: Plan, timeout_s: float = 10.0) -> dict[str, Any]:
        """Make each node's call of `plan` at once; each node's answer, or the exception it
        raised (`HostUnavailable` when it did not answer within `timeout_s`)."""
        ...

    def call(self, nodes: Iterable[str], method: str, *args: Any,
             timeout_s: float = 10.0) -> dict[str, Any]:
        """`method(*args)` on every node in `nodes`, at once (see `call_each`)."""
        ...


class SameCall:
    """`call` in terms of `call_each`, for membership implementations."""

    def call_each(self, plan: Plan, timeout_s: float = 10.0) -> dict[str, Any]:
        raise NotImplementedError

    def call(self, nodes: Iterable[str], method: str, *args: Any,
             timeout_s: float = 10.0) -> dict[str, Any]:
        return self.call_each({node: (method, args) for node in nodes}, timeout_s)


class LocalMembership(SameCall):
    """Replica hosts in this process, one SQLite file per node under `folder`; `kill(node)`
    makes a node vanish as a crash would (its file stays on disk, unused)."""

    def __init__(self, folder: str | Path, nodes: Iterable[str]):
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._hosts: dict[str, ReplicaHost] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ring-host")
        for node in nodes:
            self.join(node)

    def join(self, node: str) -> ReplicaHost:
        """Start node `node`'s host (a node that comes back keeps what its disk held)."""
        host = ReplicaHost(node, self.folder / f"{node}.db")
        with self._lock:
            self._hosts[node] = host
        return host

    def kill(self, node: str) -> None:
        """Node `node` stops answering."""
        with self._lock:
            host = self._hosts.pop(node)
        host.close()

    def host(self, node: str) -> ReplicaHost:
        with self._lock:
            return self._hosts[node]

    def live(self) -> list[str]:
        with self._lock:
            return sorted(self._hosts)

    def call_each(self, plan: Plan, timeout_s: float = 10.0) -> dict[str, Any]:
        with self._lock:
            targets = {node: self._hosts.get(node) for node in plan}
        futures = {node: self._pool.submit(getattr(host, plan[node][0]), *plan[node][1])
                   for node, host in targets.items() if host is not None}
        wait(futures.values(), timeout=timeout_s)
        answers: dict[str, Any] = {}
        for node, host in targets.items():
            future = futures.get(node)
            if host is None or future is None:
                answers[node] = HostUnavailable(f"node {node} is not alive")
            elif not future.done():
                answers[node] = HostUnavailable(f"node {node} did not answer in {timeout_s} s")
            else:
                error = future.exception()
                answers[node] = error if error is not None else future.result()
        return answers

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()
