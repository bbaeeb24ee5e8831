"""Consistent hashing: which nodes hold a run's checkpoints.

Each node owns `vnodes` points on a 64-bit ring (SHA-256 of its id and the point's number). A
run's replica set is the first `n` distinct nodes clockwise from the hash of its id: the owner,
then its successors. Adding or removing a node moves only the runs whose sets included it (about
n/nodes of them), which keeps re-replication after a failure or a join small.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

VNODES = 64


def ring_hash(text: str) -> int:
    """A stable 64-bit position on the ring."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class HashRing:
    """The ring over a set of node ids (immutable: a new membership is a new ring)."""

    def __init__(self, nodes: Iterable[str], vnodes: int = VNODES):
        self.nodes = frozenset(nodes)
        points = sorted((ring_hash(f"{node}#{i}"), node) for node in self.nodes
                        for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [node for _, node in points]

    def replicas(self, key: str, n: int) -> list[str]:
        """The first `n` distinct nodes clockwise from `key` (fewer when the ring is smaller):
        the owner first, then its successors."""
        chosen: list[str] = []
        if not self._owners:
            return chosen
        start = bisect.bisect(self._hashes, ring_hash(key))
        for i in range(len(self._owners)):
            node = self._owners[(start + i) % len(self._owners)]
            if node not in chosen:
                chosen.append(node)
                if len(chosen) == min(n, len(self.nodes)):
                    break
        return chosen
