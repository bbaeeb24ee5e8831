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
    stray = Replica.sealed("r", 1, 1, text, checkpoint.created, checkpoint.checksum)
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
    assert cluster.host(owner).corrupt_seen == 1  # and the damaged one went to quarantine
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
    answer = host.put(Replica.sealed("r", 1, 0, '{"a":1}', 0.0, "0" * 64), "token")
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


def test_damage_found_at_rest_by_a_scrub_is_repaired(cluster):
    store = RingCheckpointStore(cluster, k=1)
    store.put("r", 0, {"v": 0})
    owner = store.replica_set("r")[0]
    with sqlite3.connect(cluster.host(owner).path) as db:
        db.execute("UPDATE replicas SET state = replace(state, '0', '7')")
    report = repair(cluster, k=1)  # nobody read it: the scrub finds it
    assert report.damaged == 1 and report.copied == 1
    assert [r.state for r in store.list("r")] == [{"v": 0}]


def test_a_record_moved_to_another_key_on_disk_fails_its_seal(cluster):
    store = RingCheckpointStore(cluster, k=1)
    for seq in range(5):
        store.put("r", seq, {"s": seq})
    owner = store.replica_set("r")[0]
    with sqlite3.connect(cluster.host(owner).path) as db:  # seq 0's bytes claim epoch 3
        db.execute("UPDATE replicas SET epoch = 3 WHERE seq = 0")
    assert store.get("r").state == {"s": 4} and len(store.list("r")) == 5
    assert cluster.host(owner).corrupt_seen == 1


def test_a_stale_owner_is_refused_even_when_new_nodes_became_its_replica_set(tmp_path):
    """After a failover, two nodes join and become the run's whole replica set before any
    repair: they never saw the new owner's fence, but the old owner is still refused."""
    nodes, joining = [f"n{i}" for i in range(5)], ["n5", "n6"]
    run = next(f"r{i}" for i in range(10000)
               if set(HashRing(nodes + joining).replicas(f"r{i}", 2)) == set(joining))
    cluster = LocalMembership(tmp_path / "disks", nodes)
    history = HistoryLog(tmp_path / "history.jsonl")
    old = RingCheckpointStore(cluster, k=1, history=history)
    new = RingCheckpointStore(cluster, k=1, history=history)
    for seq in range(3):
        old.put(run, seq, {"by": "old"})
    new.claim(run)
    for node in joining:
        cluster.join(node)
    with pytest.raises(FencedError, match="took the run over from epoch 1"):
        old.put(run, 3, {"by": "old, stale"})
    new.put(run, 3, {"by": "new"})
    assert new.get(run).state == {"by": "new"}
    report = check_history(read_history(history.path), new.get)
    assert report.ok and report.indeterminate == 1, report.violations
    cluster.close()


class PausedRepair(LocalMembership):
    """Runs `meanwhile` right after a repair pass read the inventories."""

    meanwhile = None

    def call(self, nodes, method, *args, **kw):
        answers = super().call(nodes, method, *args, **kw)
        if method == "inventory" and self.meanwhile:
            run, self.meanwhile = self.meanwhile, None
            run()
        return answers


def test_repair_never_drops_a_put_acknowledged_while_it_ran(tmp_path):
    cluster = PausedRepair(tmp_path / "disks", NODES)
    store = RingCheckpointStore(cluster, k=1)
    a, b = store.replica_set("r")
    store.put("r", 0, {"s": 0})
    store.put("r", 1, {"s": 1})
    cluster.kill(b)
    repair(cluster, k=1)  # a third node takes b's place
    cluster.join(b)  # b comes back with its disk: three nodes hold the run

    def meanwhile():
        cluster.kill(b)
        store.put("r", 2, {"s": 2})  # acknowledged on a and the third node

    cluster.meanwhile = meanwhile
    repair(cluster, k=1)
    cluster.kill(a)  # one death after the acknowledgement (k=1)
    assert store.get("r", 2).state == {"s": 2}
    cluster.close()


def test_one_broken_host_does_not_stop_reads_or_claims(cluster):
    store = RingCheckpointStore(cluster, k=1, timeout_s=1.0)
    for i in range(6):
        store.put(f"r{i}", 0, {"i": i})
    broken = cluster.host(store.replica_set("r0")[0])
    broken._db.close()  # its store fails every call, with the node's name
    assert [store.get(f"r{i}").state for i in range(6)] == [{"i": i} for i in range(6)]
    assert RingCheckpointStore(cluster, k=1).claim("r3").epoch == 2


def test_a_put_that_reached_too_few_replicas_is_indeterminate_never_acknowledged(tmp_path):
    cluster = LocalMembership(tmp_path / "disks", NODES[:2])
    history = HistoryLog(tmp_path / "history.jsonl")
    store = RingCheckpointStore(cluster, k=1, timeout_s=0.3, history=history)
    store.put("r", 0, {"v": 0})
    cluster.host(store.replica_set("r")[1])._db.close()
    with pytest.raises(QuorumError, match="1 of the 2 replicas it needs made it durable"):
        store.put("r", 1, {"v": 1})
    report = check_history(read_history(history.path), store.get)
    assert (report.acknowledged, report.failed, report.indeterminate) == (1, 0, 1)
    assert report.ok
    cluster.close()


def test_the_checker_catches_a_stale_owner_told_saved_and_a_refused_put_read_back():
    from types import SimpleNamespace

    def put(phase, epoch, seq, checksum, time, thread=1):
        return {"op": "put", "phase": phase, "run": "r", "epoch": epoch, "seq": seq,
                "checksum": checksum, "time": time, "pid": 1, "thread": thread}

    history = [put("invoke", 1, 0, "a", 0.0), put("ok", 1, 0, "a", 0.1),
               {"op": "claim", "phase": "ok", "run": "r", "epoch": 2, "seq": -1,
                "checksum": "", "time": 0.2, "pid": 2, "thread": 2},
               put("invoke", 1, 1, "b", 0.3), put("ok", 1, 1, "b", 0.4),
               put("invoke", 1, 2, "c", 0.5), put("fail", 1, 2, "c", 0.6)]
    stored = {0: "a", 1: "b", 2: "c"}
    report = check_history(history, lambda run, seq: SimpleNamespace(checksum=stored[seq]))
    assert len(report.violations) == 2
    assert "acknowledged to a stale owner" in report.violations[0]
    assert "refused as not saved, yet reads back" in report.violations[1]


def test_a_deleted_run_stays_deleted_when_a_node_with_old_copies_comes_back(cluster):
    store = RingCheckpointStore(cluster, k=1)
    store.put("r", 0, {"v": 0})
    away = store.replica_set("r")[0]
    cluster.kill(away)
    store.delete_run("r")
    cluster.join(away)  # back with its copy
    assert store.get("r") is None and store.runs() == []
    assert repair(cluster, k=1).buried == 1
    assert cluster.host(away).records("r") == []
    with pytest.raises(FencedError, match="deleted"):
        store.put("r", 1, {"v": 1})
