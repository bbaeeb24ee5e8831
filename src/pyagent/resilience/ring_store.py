"""`RingCheckpointStore`: each run's checkpoints on its owner node and k successors.

Guarantees, with `k` successors (k+1 replicas) and write quorum `w` (default k+1), as long as
no more than w-1 nodes fail at once (die, lose their disk, or stop answering):
- a `put` returns only after `w` hosts of the run's replica set made the checkpoint durable on
  their disks; otherwise it raises, and nothing claims it was saved (copies that reached fewer
  than `w` hosts may still be read later: such a put is indeterminate, not lost);
- with w = k+1, an acknowledged checkpoint survives any k nodes dying at once; with a smaller w
  it survives only w-1 (the other replicas are made later, by a repair), in exchange for puts
  that do not wait for the slowest replica and that still succeed while k+1-w replicas are down;
  a write quorum must be a majority of the replicas;
- each writer first claims the run with a new epoch, fencing every live host; each put also reads
  the fences of the live hosts outside the replica set, in the same round, so a writer that was
  presumed dead and comes back is told `FencedError`, never "saved", even when the ring's
  membership changed under it (a fenced writer's copies may remain, at an epoch that reads never
  prefer);
- reads ask every live host and take the highest (epoch, seq) whose checks pass; up to w-1 hosts
  may fail to answer (an acknowledged checkpoint is on at least w); a deleted run stays deleted.

Puts that find too few live replicas wait up to `quorum_wait_s` for nodes to come back, and puts
whose replicas stop answering are retried on the ring as membership changes, until `timeout_s`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from pyagent.resilience.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointExistsError,
    check_key,
    load_checkpoint,
    new_checkpoint,
)
from pyagent.resilience.history import HistoryLog
from pyagent.resilience.membership import Membership
from pyagent.resilience.replica_host import Fence, Refused, Replica
from pyagent.resilience.ring import HashRing

RETRY_S = 0.1  # pause between attempts while the membership catches up with a death


class QuorumError(CheckpointError):
    """Fewer replicas than the write quorum could make a checkpoint durable: it is not saved."""


class FencedError(CheckpointError):
    """A newer owner holds the run (or it was deleted): this writer must stop."""


def check_quorum(k: int, write_quorum: int | None) -> int:
    """The write quorum for k successors (default k+1); refuses settings that cannot work."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise CheckpointError(f"k (successors per run) must be an int >= 0, not {k!r}")
    replicas = k + 1
    write_quorum = replicas if write_quorum is None else write_quorum
    if isinstance(write_quorum, bool) or not isinstance(write_quorum, int) or \
            not replicas // 2 < write_quorum <= replicas:
        raise CheckpointError(
            f"write quorum {write_quorum!r} must be a majority of the {replicas} replicas "
            f"(from {replicas // 2 + 1} to {replicas})")
    return write_quorum


class RingCheckpointStore:
    """A `CheckpointStore` replicated over the nodes that `membership` reports alive."""

    def __init__(self, membership: Membership, k: int = 1, write_quorum: int | None = None,
                 timeout_s: float = 60.0, quorum_wait_s: float = 0.0,
                 history: HistoryLog | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.write_quorum = check_quorum(k, write_quorum)
        self.membership = membership
        self.k = k
        self.timeout_s, self.quorum_wait_s = timeout_s, quorum_wait_s
        self.history = history
        self.token = uuid.uuid4().hex  # this writer, as fences name it
        self.placed: dict[str, list[str]] = {}  # run -> the hosts that acknowledged its last put
        self._claims: dict[str, Fence] = {}
        self._fenced: set[str] = set()  # runs another owner took from this writer
        self._clock = clock
        self._closed = False

    # --- the CheckpointStore seam --------------------------------------------------------------

    def put(self, run_id: str, seq: int, state: dict[str, Any]) -> Checkpoint:
        self._open()
        checkpoint, text = new_checkpoint(run_id, seq, state)
        if run_id in self._fenced:
            raise FencedError(f"run {run_id!r}: checkpoint {seq} not saved: another owner took "
                              "the run over; this writer stopped writing it")
        fence = self._claims.get(run_id) or self.claim(run_id)
        replica = Replica.sealed(run_id, fence.epoch, seq, text, checkpoint.created,
                                 checkpoint.checksum)
        self._log("put", "invoke", replica.run_id, replica.epoch, replica.seq, replica.checksum)
        landed: list[str] = []
        try:
            self.placed[run_id] = self._replicate(replica, fence, landed)
        except CheckpointError as exc:
            phase = "info" if landed else "fail"  # a copy that landed may be read later
            self._log("put", phase, replica.run_id, replica.epoch, replica.seq,
                      replica.checksum, str(exc))
            raise
        self._log("put", "ok", replica.run_id, replica.epoch, replica.seq, replica.checksum)
        return checkpoint

    def get(self, run_id: str, seq: int | None = None) -> Checkpoint | None:
        self._open()
        if seq is not None:
            check_key(run_id, seq)
        latest = self._latest(run_id)
        if latest is None or seq is None or seq == latest.seq:
            return _checkpoint(latest) if latest else None
        if seq > latest.seq:
            return None
        answers = self._ask("get", run_id, seq)
        found = [r for r in answers if r is not None and r.epoch <= latest.epoch and r.verifies()]
        return _checkpoint(max(found, key=lambda r: r.epoch)) if found else None

    def list(self, run_id: str) -> list[Checkpoint]:
        self._open()
        latest = self._latest(run_id)
        if latest is None:
            return []
        chain: dict[int, Replica] = {}
        for records in self._ask("records", run_id):
            for r in records:
                if r.seq <= latest.seq and r.epoch <= latest.epoch and r.verifies() and (
                        r.seq not in chain or r.epoch > chain[r.seq].epoch):
                    chain[r.seq] = r
        return [_checkpoint(chain[seq]) for seq in sorted(chain)]

    def runs(self) -> list[str]:
        self._open()
        held = set().union(*self._ask("runs"))
        return sorted(run for run in held if self._latest(run) is not None)

    def delete_run(self, run_id: str) -> None:
        """Delete `run_id` on every live host, leaving tombstones (a node that was down comes
        back with its copies, and the next repair drops them)."""
        self._open()
        self._ask("delete_run", run_id)
        self._claims.pop(run_id, None)

    def close(self) -> None:
        self._closed = True

    # --- ownership and placement ----------------------------------------------------------------

    def claim(self, run_id: str) -> Fence:
        """Take over `run_id` with an epoch newer than any host has seen, fencing every live
        host; the writer that held it before is refused from now on."""
        self._open()
        fences = [f for f in self._ask("fence", run_id) if f is not None]
        if any(f.deleted for f in fences):
            raise FencedError(f"run {run_id!r} was deleted")
        fence = Fence(max((f.epoch for f in fences), default=0) + 1, self.token)
        live = self._live_enough(run_id)
        answers = self.membership.call(live, "claim", run_id, fence, timeout_s=self.timeout_s)
        granted = [n for n in self.replica_set(run_id, live) if answers.get(n) == fence]
        if len(granted) < self.write_quorum:
            refused = [a for a in answers.values() if isinstance(a, Refused) and a.stale]
            error = FencedError if refused else QuorumError
            why = refused[0].reason if refused else "; ".join(sorted(
                {str(a) for a in answers.values() if isinstance(a, Exception)}))
            raise error(f"run {run_id!r}: could not claim epoch {fence.epoch}: "
                        f"{len(granted)} of {self.write_quorum} replicas granted it ({why})")
        self._claims[run_id] = fence
        self._fenced.discard(run_id)
        self._log("claim", "ok", run_id, fence.epoch, -1, "")
        return fence

    def epoch(self, run_id: str) -> int | None:
        """The epoch this writer holds `run_id` at, if it claimed it."""
        fence = self._claims.get(run_id)
        return fence.epoch if fence else None

    def head(self, run_id: str) -> tuple[Checkpoint, int] | None:
        """The latest checkpoint of `run_id` and the epoch of the owner that wrote it."""
        self._open()
        latest = self._latest(run_id)
        return (_checkpoint(latest), latest.epoch) if latest else None

    def replica_set(self, run_id: str, live: list[str] | None = None) -> list[str]:
        """The nodes that should hold `run_id` now: its owner on the ring and k successors."""
        return HashRing(self.membership.live() if live is None else live).replicas(
            run_id, self.k + 1)

    def holders(self, run_id: str) -> list[str]:
        """The live nodes that hold at least one verified record of `run_id`."""
        answers = self.membership.call(self.membership.live(), "records", run_id,
                                       timeout_s=self.timeout_s)
        return sorted(n for n, a in answers.items() if isinstance(a, list) and a)

    # --- internals -----------------------------------------------------------------------------

    def _replicate(self, replica: Replica, fence: Fence, landed: list[str]) -> list[str]:
        """Put `replica` on its replica set until `write_quorum` hosts acknowledge it, following
        membership changes until the deadline; the acknowledging nodes (`landed` collects every
        node that took a copy, acknowledged or not)."""
        deadline = self._clock() + self.timeout_s
        while True:
            live = self._live_enough(replica.run_id)
            targets = self.replica_set(replica.run_id, live)
            left = max(0.1, deadline - self._clock())
            plan = {node: ("fence", (replica.run_id,)) for node in live}  # the others' fences
            plan.update({node: ("put", (replica, fence.token)) for node in targets})
            answers = self.membership.call_each(plan, timeout_s=left)
            acks = [n for n in targets if isinstance(answers[n], Replica)]
            landed += [n for n in acks if n not in landed]
            if len(acks) >= self.write_quorum:
                self._check_fences(replica, fence, answers)
                return acks
            refusals = [a for a in answers.values() if isinstance(a, Refused)]
            stale = next((r for r in refusals if r.stale), None)
            if stale is not None:
                self._lose(replica.run_id)
                raise FencedError(f"run {replica.run_id!r}: checkpoint {replica.seq} not saved: "
                                  f"{stale.reason} (another owner took the run over)")
            exists = next((r for r in refusals if r.exists), None)
            if exists is not None:
                raise CheckpointExistsError(exists.reason)
            if self._clock() >= deadline:
                reasons = sorted({str(a) if isinstance(a, Exception) else a.reason
                                  for a in answers.values() if not isinstance(a, Replica)})
                raise QuorumError(
                    f"run {replica.run_id!r}: checkpoint {replica.seq} not saved: {len(acks)} of "
                    f"the {self.write_quorum} replicas it needs made it durable in "
                    f"{self.timeout_s:g} s ({'; '.join(reasons)})")
            time.sleep(RETRY_S)

    def _check_fences(self, replica: Replica, fence: Fence, answers: dict[str, Any]) -> None:
        """Refuse the acknowledgements when a live host outside the replica set, asked in the
        same round, holds a newer fence (a claim that completed before this put began reached
        it, while the replica set changed under this writer)."""
        newer = [f for f in answers.values() if isinstance(f, Fence) and f.epoch > fence.epoch]
        if newer:
            self._lose(replica.run_id)
            raise FencedError(f"run {replica.run_id!r}: checkpoint {replica.seq} not saved: "
                              f"epoch {newer[0].epoch} took the run over from epoch {fence.epoch}")

    def _lose(self, run_id: str) -> None:
        self._claims.pop(run_id, None)
        self._fenced.add(run_id)

    def _live_enough(self, run_id: str) -> list[str]:
        """The live nodes, once there are at least `write_quorum` (waiting up to
        `quorum_wait_s`); a `QuorumError` when there are not."""
        deadline = self._clock() + self.quorum_wait_s
        while True:
            live = self.membership.live()
            if len(live) >= self.write_quorum:
                return live
            if self._clock() >= deadline:
                raise QuorumError(
                    f"run {run_id!r}: not saved: {len(live)} node(s) alive, fewer than the write "
                    f"quorum of {self.write_quorum} (k={self.k}); start nodes or lower k")
            time.sleep(RETRY_S)

    def _latest(self, run_id: str) -> Replica | None:
        heads = self._ask("head", run_id)
        if any(fence is not None and fence.deleted for fence, _ in heads):
            return None
        found = [r for _, r in heads if r is not None and r.verifies()]
        return max(found, key=lambda r: r.key) if found else None

    def _ask(self, method: str, *args: Any) -> list[Any]:
        """The answers of the live hosts to a read. Up to w-1 may fail (every acknowledged
        checkpoint is on at least w); beyond that the read retries, as the membership declares
        the silent ones dead, and fails at the deadline."""
        deadline = self._clock() + self.timeout_s
        while True:
            live = self.membership.live()
            left = max(0.1, deadline - self._clock())
            answers = self.membership.call(live, method, *args, timeout_s=left)
            failed = {n: a for n, a in answers.items() if isinstance(a, Exception)}
            if len(failed) < self.write_quorum and (len(failed) < len(live) or not live):
                return [a for n, a in answers.items() if n not in failed]
            if self._clock() >= deadline:
                errors = "; ".join(sorted({str(a) for a in failed.values()}))
                raise CheckpointError(f"cannot read the ring: {len(failed)} of {len(live)} "
                                      f"nodes did not answer ({errors})")
            time.sleep(RETRY_S)

    def _log(self, op: str, phase: str, run_id: str, epoch: int, seq: int, checksum: str,
             error: str | None = None) -> None:
        if self.history is not None:
            self.history.record(op, phase, run_id, epoch, seq, checksum, error)

    def _open(self) -> None:
        if self._closed:
            raise CheckpointError("the ring checkpoint store is closed")


def _checkpoint(replica: Replica) -> Checkpoint:
    return load_checkpoint(replica.run_id, replica.seq, replica.text, replica.created,
                           replica.checksum)
