"""Repair of the buddy ring: every run back to k+1 verified copies on the nodes the ring names.

After a node dies, the runs it held have fewer copies; after a node joins, the ring names it for
some runs that others hold. A repair pass compares what every live host holds (`inventory`),
copies each missing or corrupt record from a host whose copy verifies to each node of the run's
replica set (with the run's newest fence, so a stale owner stays refused there), and only then
drops the records from nodes that are no longer in the set (keeping their fences).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyagent.resilience.membership import Membership
from pyagent.resilience.replica_host import Fence, Holding
from pyagent.resilience.ring import HashRing


@dataclass
class RepairReport:
    """What one pass did."""

    runs: int = 0
    copied: int = 0  # records stored on a node that lacked them or held a corrupt copy
    bytes_copied: int = 0
    moved_away: int = 0  # runs whose records left a node the ring no longer names
    under_replicated: list[str] = field(default_factory=list)  # runs still short of k+1 copies


def repair(membership: Membership, k: int, timeout_s: float = 30.0) -> RepairReport:
    """One pass over every run that any live host holds."""
    live = membership.live()
    ring = HashRing(live)
    report = RepairReport()
    inventories = {node: held for node, held in
                   membership.call(live, "inventory", timeout_s=timeout_s).items()
                   if isinstance(held, dict)}
    runs = sorted(set().union(*inventories.values())) if inventories else []
    for run_id in runs:
        holdings: dict[str, Holding] = {n: inv[run_id] for n, inv in inventories.items()
                                        if run_id in inv}
        keys = {key for h in holdings.values() for key in h.records}
        if not keys:
            continue  # only fences are left: nothing to copy
        report.runs += 1
        fences = [h.fence for h in holdings.values() if h.fence is not None]
        fence: Fence | None = max(fences, key=lambda f: f.epoch) if fences else None
        wanted = ring.replicas(run_id, k + 1)
        complete = True
        for node in wanted:
            if node not in inventories:
                complete = False
                continue
            have = holdings[node].records if node in holdings else {}
            missing = sorted(keys - set(have))
            if missing and not _copy(membership, run_id, missing, holdings, node, fence,
                                     report, timeout_s):
                complete = False
        if complete and len(wanted) == k + 1:
            for node in sorted(set(holdings) - set(wanted)):
                if holdings[node].records:
                    membership.call([node], "drop_records", run_id, timeout_s=timeout_s)
                    report.moved_away += 1
        else:
            report.under_replicated.append(run_id)
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
        if isinstance(stored, int):
            report.copied += stored
            report.bytes_copied += sum(len(r.text.encode()) for r in replicas)
        else:
            return False
    return not wanted
