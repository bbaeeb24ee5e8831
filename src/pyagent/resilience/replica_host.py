"""One node's share of the buddy ring: the replicas it holds, durable on its own disk.

A `ReplicaHost` keeps checkpoints of many runs in one SQLite file (WAL, `synchronous=FULL`, one
transaction per write), keyed by (run, epoch, seq), with each run's fence: the epoch and owner
token allowed to write. A write from an older epoch, or from another owner of the same epoch, is
refused, so an owner that was presumed dead and comes back cannot overwrite its successor's
state. Every record is verified against its SHA-256 when read; a corrupt one is skipped (and
counted) until a repair replaces it with a good copy from another host.

The class is plain Python: the Ray layer runs one per node as an actor, and tests run several in
one process.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from pyagent.resilience.checkpoint import CheckpointError, checksum_of

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS replicas (run_id TEXT NOT NULL, epoch INTEGER NOT NULL, "
    "seq INTEGER NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, checksum TEXT NOT NULL, "
    "PRIMARY KEY (run_id, epoch, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS fences (run_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
    "token TEXT NOT NULL)",
)


@dataclass(frozen=True)
class Replica:
    """One stored checkpoint as it travels between hosts: its state as canonical JSON text."""

    run_id: str
    epoch: int
    seq: int
    text: str
    created: float
    checksum: str

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.seq

    def verifies(self) -> bool:
        return checksum_of(self.text) == self.checksum


@dataclass(frozen=True)
class Fence:
    """Who may write a run's checkpoints: the owner `token` of `epoch`."""

    epoch: int
    token: str


@dataclass(frozen=True)
class Holding:
    """What one host holds of a run: its fence and each verified record's checksum by
    (epoch, seq)."""

    fence: Fence | None
    records: dict[tuple[int, int], str]


@dataclass(frozen=True)
class Refused:
    """A write a host would not take, and why (`stale`: a newer owner holds the run)."""

    reason: str
    stale: bool = False
    fence: Fence | None = None


class ReplicaHost:
    """The replicas kept on one node's disk, at `path`."""

    def __init__(self, node_id: str, path: str | os.PathLike[str]):
        self.node_id = node_id
        self.path = Path(path)
        self.corrupt_seen = 0  # records that failed their checksum on read
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            for statement in SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise CheckpointError(f"node {node_id}: cannot open replica store {self.path}: "
                                  f"{exc}") from None

    # --- writes ------------------------------------------------------------------------------

    def claim(self, run_id: str, fence: Fence) -> Fence | Refused:
        """Let `fence`'s owner write `run_id` from now on, if its epoch is newer than the one
        held (or it is the same owner again); returns the fence now held, or why not."""
        with self._write() as db:
            held = self._fence(db, run_id)
            if held is None or fence.epoch > held.epoch or held == fence:
                self._set_fence(db, run_id, fence)
                return fence
        return Refused(f"node {self.node_id} holds epoch {held.epoch} of run {run_id!r}",
                       stale=True, fence=held)

    def put(self, replica: Replica, token: str) -> Replica | Refused:
        """Store a new checkpoint written by owner `token` of `replica.epoch`; returns it once it
        is durable on this disk, or why it was refused."""
        if not replica.verifies():
            return Refused(f"node {self.node_id}: checkpoint {replica.seq} of run "
                           f"{replica.run_id!r} arrived damaged (checksum mismatch)")
        with self._write() as db:
            held = self._fence(db, replica.run_id)
            if held is not None and replica.epoch <= held.epoch and \
                    (replica.epoch, token) != (held.epoch, held.token):
                return Refused(f"node {self.node_id} holds epoch {held.epoch} of run "
                               f"{replica.run_id!r}; epoch {replica.epoch} may not write",
                               stale=True, fence=held)
            if held is None or replica.epoch > held.epoch:
                self._set_fence(db, replica.run_id, Fence(replica.epoch, token))
            present = self._row(db, replica.run_id, replica.epoch, replica.seq)
            if present is not None and present.verifies():
                if present.checksum == replica.checksum:
                    return present  # a retried put: already durable
                return Refused(f"run {replica.run_id!r} already has checkpoint {replica.seq} "
                               f"of epoch {replica.epoch} on node {self.node_id}")
            self._insert(db, replica)
        return replica

    def adopt(self, replicas: list[Replica], fence: Fence | None) -> int:
        """Take copies made by a repair: records that verify and are missing or corrupt here,
        and `fence` when it is newer than the one held; returns how many records were stored."""
        stored = 0
        with self._write() as db:
            for replica in replicas:
                if not replica.verifies():
                    continue
                present = self._row(db, replica.run_id, replica.epoch, replica.seq)
                if present is None or not present.verifies():
                    self._insert(db, replica)
                    stored += 1
            if fence is not None and replicas:
                held = self._fence(db, replicas[0].run_id)
                if held is None or fence.epoch > held.epoch:
                    self._set_fence(db, replicas[0].run_id, fence)
        return stored

    def drop_records(self, run_id: str) -> None:
        """Forget `run_id`'s records but keep its fence (a repair moved them elsewhere; the
        fence still refuses a stale owner that writes here)."""
        with self._write() as db:
            db.execute("DELETE FROM replicas WHERE run_id = ?", (run_id,))

    def delete_run(self, run_id: str) -> None:
        """Forget `run_id` entirely: its records and its fence."""
        with self._write() as db:
            db.execute("DELETE FROM replicas WHERE run_id = ?", (run_id,))
            db.execute("DELETE FROM fences WHERE run_id = ?", (run_id,))

    # --- reads -------------------------------------------------------------------------------

    def fence(self, run_id: str) -> Fence | None:
        """The fence held for `run_id`, if any."""
        with self._read() as db:
            return self._fence(db, run_id)

    def latest(self, run_id: str, at_most: tuple[int, int] | None = None) -> Replica | None:
        """The highest (epoch, seq) record of `run_id` that verifies (no higher than `at_most`)."""
        for replica in self._verified(run_id, "ORDER BY epoch DESC, seq DESC"):
            if at_most is None or replica.key <= at_most:
                return replica
        return None

    def get(self, run_id: str, seq: int) -> Replica | None:
        """Checkpoint `seq` of `run_id` from its newest epoch that verifies here."""
        return next(iter(self._verified(run_id, "AND seq = ? ORDER BY epoch DESC", seq)), None)

    def records(self, run_id: str) -> list[Replica]:
        """Every record of `run_id` that verifies, by (epoch, seq)."""
        return list(self._verified(run_id, "ORDER BY epoch, seq"))

    def inventory(self) -> dict[str, Holding]:
        """What this host holds of each run: its fence and the (epoch, seq) and checksum of
        every record that verifies; what a repair compares between hosts."""
        return {run_id: Holding(self.fence(run_id),
                                {r.key: r.checksum for r in self.records(run_id)})
                for run_id in self.runs()}

    def fetch(self, run_id: str, keys: list[tuple[int, int]]) -> list[Replica]:
        """The records of `run_id` with these (epoch, seq) keys that verify here."""
        wanted = set(map(tuple, keys))
        return [r for r in self.records(run_id) if r.key in wanted]

    def runs(self) -> list[str]:
        """The runs with records or a fence here, sorted."""
        with self._read() as db:
            rows = db.execute("SELECT run_id FROM replicas UNION SELECT run_id FROM fences "
                              "ORDER BY 1").fetchall()
        return [row[0] for row in rows]

    def ping(self) -> str:
        """This host's node id (a liveness probe)."""
        return self.node_id

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- internals ---------------------------------------------------------------------------

    def _verified(self, run_id: str, clause: str, *params: object) -> list[Replica]:
        with self._read() as db:
            rows = db.execute(f"SELECT run_id, epoch, seq, state, created, checksum FROM replicas "
                              f"WHERE run_id = ? {clause}", (run_id, *params)).fetchall()
        replicas = [Replica(*row) for row in rows]
        good = [r for r in replicas if r.verifies()]
        self.corrupt_seen += len(replicas) - len(good)
        return good

    @staticmethod
    def _row(db: sqlite3.Connection, run_id: str, epoch: int, seq: int) -> Replica | None:
        row = db.execute("SELECT run_id, epoch, seq, state, created, checksum FROM replicas "
                         "WHERE run_id = ? AND epoch = ? AND seq = ?",
                         (run_id, epoch, seq)).fetchone()
        return Replica(*row) if row else None

    @staticmethod
    def _insert(db: sqlite3.Connection, replica: Replica) -> None:
        db.execute("INSERT OR REPLACE INTO replicas VALUES (?, ?, ?, ?, ?, ?)",
                   (replica.run_id, replica.epoch, replica.seq, replica.text, replica.created,
                    replica.checksum))

    @staticmethod
    def _fence(db: sqlite3.Connection, run_id: str) -> Fence | None:
        row = db.execute("SELECT epoch, token FROM fences WHERE run_id = ?",
                         (run_id,)).fetchone()
        return Fence(*row) if row else None

    @staticmethod
    def _set_fence(db: sqlite3.Connection, run_id: str, fence: Fence) -> None:
        db.execute("INSERT OR REPLACE INTO fences VALUES (?, ?, ?)",
                   (run_id, fence.epoch, fence.token))

    def _write(self) -> _Transaction:
        return _Transaction(self, "BEGIN IMMEDIATE")

    def _read(self) -> _Transaction:
        return _Transaction(self, "BEGIN")


class _Transaction:
    """The host's lock and one SQLite transaction; SQLite errors become `CheckpointError`."""

    def __init__(self, host: ReplicaHost, begin: str):
        self.host, self.begin = host, begin

    def __enter__(self) -> sqlite3.Connection:
        self.host._lock.acquire()
        try:
            self.host._db.execute(self.begin)
        except sqlite3.Error as exc:
            self.host._lock.release()
            raise CheckpointError(f"node {self.host.node_id}: replica store "
                                  f"{self.host.path}: {exc}") from None
        return self.host._db

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self.host._db.commit()
            else:
                self.host._db.rollback()
        except sqlite3.Error as error:
            raise CheckpointError(f"node {self.host.node_id}: replica store "
                                  f"{self.host.path}: {error}") from None
        finally:
            self.host._lock.release()
