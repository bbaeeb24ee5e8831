"""Repair of the buddy ring: every run back to k+1 good copies on the nodes the ring names.

After a node dies, the runs it held have fewer copies; after a node joins, the ring names it for
some runs that others hold. A repair pass:
1. has every host check a batch of its records at rest (`scrub`: damaged ones are quarantined);
2. compares what every live host holds (`inventory`, from their indexes);
3. for each run, raises the fence of every node of its replica set to the newest fence (so a
   stale owner is refused there too), and copies each missing record from a host whose copy
   verifies;
4. only then, if the membership did not change during the pass and a fresh look confirms that
   every node of the set holds them, drops those records from nodes the ring no longer names
   (their fences stay);
5. spreads a deleted run's tombstone to every live host that still holds copies of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyagent.resilience.membership import Membership
from pyagent.resilience.replica_host import DELETED, Fence, Holding
from pyagent.resilience.ring import HashRing


@dataclass
class RepairReport:
    """What one pass did."""

    runs: int = 0
    copied: int = 0  # records stored on a node that lacked them or held a damaged copy
    bytes_copied: int = 0
    damaged: int = 0  # records the hosts' scrubs quarantined
    moved_away: int = 0  # runs whose records left a node the ring no longer names
    buried: int = 0  # deleted runs whose copies were dropped from a node that came back
    under_replicated: list[str] = field(default_factory=list)  # runs still short of k+1 copies


def repair(membership: Membership, k: int, timeout_s: float = 30.0) -> RepairReport:
    """One pass over every run that any live host holds."""
    live = membership.live()
    ring = HashRing(live)
    report = RepairReport()
    report.damaged = sum(n for n in membership.call(live, "scrub", timeout_s=timeout_s).values()
                         if isinstance(n, int))
    inventories = {node: held for node, held in
                   membership.call(live, "inventory", timeout_s=timeout_s).items()
                   if isinstance(held, dict)}
    runs = sorted(set().union(*inventories.values())) if inventories else []
    moves: list[tuple[str, list[str], dict[str, list[tuple[int, int]]]]] = []
    for run_id in runs:
        holdings: dict[str, Holding] = {n: inv[run_id] for n, inv in inventories.items()
                                        if run_id in inv}
        fences = [h.fence for h in holdings.values() if h.fence is not None]
        if any(f.deleted for f in fences):
            for node, holding in holdings.items():
                if holding.records or not (holding.fence and holding.fence.deleted):
                    membership.call([node], "fence_up", run_id, DELETED, timeout_s=timeout_s)
                    report.buried += bool(holding.records)
            continue
        keys = {key for h in holdings.values() for key in h.records}
        if not keys:
            continue  # only fences are left: nothing to copy
        report.runs += 1
        fence = max(fences, key=lambda f: f.epoch) if fences else None
        wanted = ring.replicas(run_id, k + 1)
        complete = len(wanted) == k + 1
        for node in wanted:
            if node not in inventories:
                complete = False
                continue
            held = holdings.get(node, Holding(None, {}))
            if fence is not None and held.fence != fence and \
                    (held.fence is None or held.fence.epoch < fence.epoch):
                membership.call([node], "fence_up", run_id, fence, timeout_s=timeout_s)
            missing = sorted(keys - set(held.records))
            if missing and not _copy(membership, run_id, missing, holdings, node, fence,
                                     report, timeout_s):
                complete = False
        extra = {node: sorted(h.records) for node, h in holdings.items()
                 if node not in wanted and h.records}
        if not complete:
            report.under_replicated.append(run_id)
        elif extra:
            moves.append((run_id, wanted, extra))
    if moves and sorted(membership.live()) == sorted(live):
        for run_id, wanted, extra in moves:
            report.moved_away += _move_away(membership, run_id, wanted, extra, timeout_s)
    return report


def _copy(membership: Membership, run_id: str, missing: list[tuple[int, int]],
          holdings: dict[str, Holding], node: str, fence: Fence | None, report: RepairReport,
          timeout_s: float) -> bool:
    """Copy the `missing` records of `run_id` to `node` from the hosts that hold them."""
    wanted = set(missing)
    replicas = []
    for source, holding in holdings.items():
        if source == node or not wanted & set(holding.records):
            continue
        keys = sorted(wanted & set(holding.records))
        fetched = membership.call([source], "fetch", run_id, keys, timeout_s=timeout_s)[source]
        if isinstance(fetched, list):
            good = [r for r in fetched if r.verifies()]
            replicas += good
            wanted -= {r.key for r in good}
        if not wanted:
            break
    if replicas:
        stored = membership.call([node], "adopt", replicas, fence, timeout_s=timeout_s)[node]
        if not isinstance(stored, int):
            return False
        report.copied += stored
        report.bytes_copied += sum(len(r.text.encode()) for r in replicas)
    return not wanted


def _move_away(membership: Membership, run_id: str, wanted: list[str],
               extra: dict[str, list[tuple[int, int]]], timeout_s: float) -> int:
    """Drop the records in `extra` from their nodes once every node in `wanted` is confirmed,
    afresh, to hold them all; how many nodes dropped some."""
    keys = {key for found in extra.values() for key in found}
    now = membership.call(wanted, "holding", run_id, timeout_s=timeout_s)
    if not all(isinstance(h, Holding) and keys <= set(h.records) for h in now.values()):
        return 0
    dropped = membership.call(list(extra), "drop_records", run_id, sorted(keys),
                              timeout_s=timeout_s)
    return sum(isinstance(n, int) and n > 0 for n in dropped.values())
