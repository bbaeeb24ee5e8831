"""The buddy ring without Ray: placement, rebalancing, fencing, corruption, quorum, and a
history of random kills checked against the model."""

import random
import sqlite3
from collections import Counter

import pytest

from pyagent.resilience.checkpoint import CheckpointExistsError, CheckpointStore, new_checkpoint
from pyagent.resilience.history import HistoryLog, check_history, read_history
from pyagent.resilience.membership import LocalMembership
from pyagent.resilience.repair import repair
from pyagent.resilience.replica_host import Fence, Refused, Replica, ReplicaHost
from pyagent.resilience.ring import HashRing
from pyagent.resilience.ring_store import FencedError, QuorumError, RingCheckpointStore

NODES = [f"node{i}" for i in range(5)]


@pytest.fixture
def cluster(tmp_path):
    membership = LocalMembership(tmp_path / "disks", NODES)
    yield membership
    membership.close()


def test_replica_sets_are_distinct_nodes_spread_evenly():
    ring = HashRing(NODES)
    owners = Counter()
    for i in range(2000):
        chosen = ring.replicas(f"run-{i}", 3)
        assert len(chosen) == len(set(chosen)) == 3
        owners[chosen[0]] += 1
    assert set(owners) == set(NODES)
    assert max(owners.values()) < 2 * min(owners.values())  # no node owns twice another's share
    assert HashRing(["a"]).replicas("x", 3) == ["a"]
    assert HashRing([]).replicas("x", 3) == []


def test_a_node_leaving_or_joining_moves_only_the_runs_it_touches():
    before, after = HashRing(NODES), HashRing(NODES[:-1])
    moved = [i for i in range(2000) if before.replicas(f"r{i}", 2) != after.replicas(f"r{i}", 2)]
    assert all(NODES[-1] in before.replicas(f"r{i}", 2) for i in moved)
    assert len(moved) < 2000 * 2 / len(NODES) * 1.3  # about k+1 / nodes of the runs
    for i in range(2000):  # the survivors keep their order: the dead node's place is filled
        kept = [n for n in before.replicas(f"r{i}", 2) if n != NODES[-1]]
        assert after.replicas(f"r{i}", 2)[:len(kept)] == kept


def test_the_ring_store_is_a_checkpoint_store_whose_puts_land_on_k_plus_1_disks(cluster):
    store = RingCheckpointStore(cluster, k=2)
    assert isinstance(store, CheckpointStore)
    for seq in range(3):
        store.put("r1", seq, {"step": seq, "text": "é" * seq})
    assert store.get("r1").state == {"step": 2, "text": "éé"}
    assert [c.seq for c in store.list("r1")] == [0, 1, 2]
    assert store.get("r1", 1).state["step"] == 1 and store.get("r1", 7) is None
    assert store.runs() == ["r1"] and store.get("nope") is None
    assert sorted(store.placed["r1"]) == sorted(store.replica_set("r1")) == store.holders("r1")
    with pytest.raises(CheckpointExistsError, match="already has checkpoint 2"):
        store.put("r1", 2, {"other": True})
    store.delete_run("r1")
    assert store.runs() == [] and store.get("r1") is None


def test_an_acknowledged_put_survives_k_nodes_dying_at_once(cluster):
    store = RingCheckpointStore(cluster, k=2)
    for i in range(20):
        store.put(f"run{i}", 0, {"i": i})
    for node in store.replica_set("run7")[:2]:  # two of its three replicas, together
        cluster.kill(node)
    for i in range(20):
        assert store.get(f"run{i}").state == {"i": i}


def test_a_put_with_fewer_live_nodes_than_the_quorum_is_refused_and_never_saved(cluster):
    store = RingCheckpointStore(cluster, k=2, timeout_s=1.0)
    for node in NODES[:3]:
        cluster.kill(node)
    with pytest.raises(QuorumError, match=r"not saved: 2 node\(s\) alive, fewer than the "
                                          r"write quorum of 3"):
        store.put("r", 0, {"x": 1})
    assert store.get("r") is None and store.runs() == []


def test_a_smaller_write_quorum_acknowledges_with_a_replica_down(cluster):
    store = RingCheckpointStore(cluster, k=2, write_quorum=2, timeout_s=1.0)
    target = store.replica_set("r")
    cluster.kill(target[1])
    survivors = [n for n in NODES if n != target[1]]
    store.put("r", 0, {"x": 1})  # the ring now names another node in its place
    assert len(store.placed["r"]) == 3 and set(store.placed["r"]) <= set(survivors)
    with pytest.raises(Exception, match="must be a majority of the 3 replicas"):
        RingCheckpointStore(cluster, k=2, write_quorum=1)


def test_a_stale_owner_that_comes_back_cannot_overwrite_newer_state(cluster):
    old, new = RingCheckpointStore(cluster, k=1), RingCheckpointStore(cluster, k=1)
    old.put("r", 0, {"by": "old"})
    old.put("r", 1, {"by": "old"})
    assert new.claim("r").epoch == 2  # a failover: the successor takes the run over
    new.put("r", 2, {"by": "new"})
    with pytest.raises(FencedError, match="another owner took the run over"):
        old.put("r", 2, {"by": "old, late"})
    with pytest.raises(FencedError):
        old.put("r", 3, {"by": "old, later"})
    assert new.get("r").state == {"by": "new"} and new.get("r", 2).state == {"by": "new"}
    assert [c.state["by"] for c in new.list("r")] == ["old", "old", "new"]


def test_reads_take_the_highest_epoch_over_a_longer_stale_branch(cluster, tmp_path):
    old, new = RingCheckpointStore(cluster, k=1), RingCheckpointStore(cluster, k=1)
    old.put("r", 0, {"v": "a"})
    new.claim("r")
    # the old owner's seq 1 reached one host before the fence did (never acknowledged)
    checkpoint, text = new_checkpoint("r", 1, {"v": "stale"})
    stray = Replica("r", 1, 1, text, checkpoint.created, checkpoint.checksum)
    spare = next(n for n in NODES if n not in new.replica_set("r"))
    cluster.host(spare).adopt([stray], Fence(1, old.token))
    new.put("r", 1, {"v": "b"})
    assert new.get("r").state == {"v": "b"} and [c.state["v"] for c in new.list("r")] == ["a", "b"]


def test_a_corrupt_replica_is_skipped_then_repaired(cluster):
    store = RingCheckpointStore(cluster, k=1)
    store.put("r", 0, {"v": 0})
    store.put("r", 1, {"v": 1})
    owner, _buddy = store.replica_set("r")
    path = cluster.host(owner).path
    with sqlite3.connect(path) as db:  # flip the owner's bytes on disk
        db.execute("UPDATE replicas SET state = replace(state, '1', '9') WHERE seq = 1")
    assert store.get("r").state == {"v": 1}  # the buddy's copy verifies
    assert cluster.host(owner).corrupt_seen >= 1
    report = repair(cluster, k=1)
    assert report.copied == 1 and not report.under_replicated
    assert [r.seq for r in cluster.host(owner).records("r")] == [0, 1]


def test_repair_restores_k_plus_1_copies_after_a_death_and_rebalances_after_a_join(cluster):
    store = RingCheckpointStore(cluster, k=1)
    for i in range(30):
        store.put(f"run{i}", 0, {"i": i})
        store.put(f"run{i}", 1, {"i": i, "more": True})
    cluster.kill("node2")
    report = repair(cluster, k=1)
    assert report.copied > 0 and not report.under_replicated
    for i in range(30):
        assert store.holders(f"run{i}") == sorted(store.replica_set(f"run{i}"))
    cluster.join("node9")
    report = repair(cluster, k=1)
    assert report.moved_away > 0 and not report.under_replicated
    for i in range(30):
        assert store.holders(f"run{i}") == sorted(store.replica_set(f"run{i}"))
        assert store.get(f"run{i}").state == {"i": i, "more": True}
    assert repair(cluster, k=1).copied == 0  # a second pass finds nothing to do


def test_a_damaged_write_on_the_wire_is_refused(tmp_path):
    host = ReplicaHost("n", tmp_path / "n.db")
    answer = host.put(Replica("r", 1, 0, '{"a":1}', 0.0, "0" * 64), "token")
    assert isinstance(answer, Refused) and "arrived damaged" in answer.reason
    assert host.runs() == []


def test_random_kills_lose_no_acknowledged_checkpoint(tmp_path):
    """Writers put while nodes die (up to k at once) and come back; the history checker then
    reads every acknowledged put back."""
    rng = random.Random(7)
    nodes = [f"n{i}" for i in range(5)]
    cluster = LocalMembership(tmp_path / "disks", nodes)
    history = HistoryLog(tmp_path / "history.jsonl")
    stores = [RingCheckpointStore(cluster, k=2, timeout_s=0.5, history=history)
              for _ in range(3)]
    seqs = Counter()
    dead: list[str] = []
    try:
        for step in range(400):
            if rng.random() < 0.1:  # a fault: k nodes die at once, one dies, or one is back
                if dead and (len(dead) == 2 or rng.random() < 0.5):
                    cluster.join(dead.pop(rng.randrange(len(dead))))  # with an empty disk
                else:
                    for node in rng.sample(cluster.live(), 2 - len(dead)):
                        cluster.kill(node)
                        for path in (tmp_path / "disks").glob(f"{node}.db*"):
                            path.unlink()  # its disk is lost too
                        dead.append(node)
                repair(cluster, k=2)
            writer = rng.randrange(3)
            run = f"run{writer}-{rng.randrange(4)}"
            try:
                stores[writer].put(run, seqs[run], {"step": step, "pad": "x" * rng.randrange(99)})
                seqs[run] += 1
            except QuorumError:
                pass
        report = check_history(read_history(history.path), stores[0].get)
    finally:
        history.close()
        cluster.close()
    assert report.acknowledged > 300 and report.ok, report.violations
