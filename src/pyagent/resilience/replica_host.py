"""One node's share of the buddy ring: the replicas it holds, durable on its own disk.

A `ReplicaHost` keeps checkpoints of many runs in one SQLite file (WAL, `synchronous=FULL`, one
transaction per write), keyed by (run, epoch, seq), with each run's fence: the epoch and owner
token allowed to write. A write from an older epoch, or from another owner of the same epoch, is
refused, so an owner that was presumed dead and comes back cannot overwrite its successor's
state. A deleted run keeps a tombstone fence, so a node that comes back with old copies cannot
bring it back.

Every record carries the SHA-256 of its state and a seal over its key (run, epoch, seq) and that
checksum; a record is checked on arrival and whenever it is read, and one that fails is moved to a
quarantine table (counted in `corrupt_seen`), so that a repair replaces it with a good copy from
another host. `scrub` checks records at rest a bounded number at a time.

The class is plain Python: the Ray layer runs one per node as an actor, and tests run several in
one process.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from pyagent.resilience.checkpoint import CheckpointError, checksum_of

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS replicas (run_id TEXT NOT NULL, epoch INTEGER NOT NULL, "
    "seq INTEGER NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, checksum TEXT NOT NULL, "
    "seal TEXT NOT NULL, PRIMARY KEY (run_id, epoch, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS fences (run_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, "
    "token TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS quarantine (run_id TEXT, epoch INTEGER, seq INTEGER, "
    "state TEXT, created REAL, checksum TEXT, seal TEXT)",
)
_COLUMNS = "run_id, epoch, seq, state, created, checksum, seal"
TOMBSTONE = 1 << 62  # the epoch of a deleted run's fence: no writer can ever pass it
SCRUB_BATCH = 200


def seal_of(run_id: str, epoch: int, seq: int, checksum: str) -> str:
    """The SHA-256 that binds a record's state checksum to its key."""
    return hashlib.sha256(f"{run_id}\0{epoch}\0{seq}\0{checksum}".encode()).hexdigest()


@dataclass(frozen=True)
class Replica:
    """One stored checkpoint as it travels between hosts: its state as canonical JSON text."""

    run_id: str
    epoch: int
    seq: int
    text: str
    created: float
    checksum: str
    seal: str

    @classmethod
    def sealed(cls, run_id: str, epoch: int, seq: int, text: str, created: float,
               checksum: str) -> Replica:
        return cls(run_id, epoch, seq, text, created, checksum,
                   seal_of(run_id, epoch, seq, checksum))

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.seq

    def verifies(self) -> bool:
        """Whether the state matches its checksum and the seal matches the key."""
        return checksum_of(self.text) == self.checksum and \
            seal_of(self.run_id, self.epoch, self.seq, self.checksum) == self.seal


@dataclass(frozen=True)
class Fence:
    """Who may write a run's checkpoints: the owner `token` of `epoch`."""

    epoch: int
    token: str

    @property
    def deleted(self) -> bool:
        return self.epoch >= TOMBSTONE


DELETED = Fence(TOMBSTONE, "deleted")


@dataclass(frozen=True)
class Holding:
    """What one host holds of a run: its fence and each record's checksum by (epoch, seq)."""

    fence: Fence | None
    records: dict[tuple[int, int], str]


@dataclass(frozen=True)
class Refused:
    """A write a host would not take, and why (`stale`: a newer owner holds the run, or it was
    deleted; `exists`: that (epoch, seq) holds other bytes)."""

    reason: str
    stale: bool = False
    exists: bool = False
    fence: Fence | None = None


class ReplicaHost:
    """The replicas kept on one node's disk, at `path`."""

    def __init__(self, node_id: str, path: str | os.PathLike[str]):
        self.node_id = node_id
        self.path = Path(path)
        self.corrupt_seen = 0  # records that failed their checks, moved to quarantine
        self._scrubbed: tuple[str, int, int] = ("", -1, -1)  # where the next scrub starts
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
            if held is None or (fence.epoch > held.epoch and not held.deleted) or held == fence:
                self._set_fence(db, run_id, fence)
                return fence
        return Refused(f"node {self.node_id} holds "
                       f"{'a deletion' if held.deleted else f'epoch {held.epoch}'} of run "
                       f"{run_id!r}", stale=True, fence=held)

    def put(self, replica: Replica, token: str) -> Replica | Refused:
        """Store a new checkpoint written by owner `token` of `replica.epoch`; returns it once it
        is durable on this disk, or why it was refused."""
        if not replica.verifies():
            return Refused(f"node {self.node_id}: checkpoint {replica.seq} of run "
                           f"{replica.run_id!r} arrived damaged (checksum mismatch)")
        with self._write() as db:
            held = self._fence(db, replica.run_id)
            if held is not None and (held.deleted or (
                    replica.epoch <= held.epoch and
                    (replica.epoch, token) != (held.epoch, held.token))):
                what = "a deletion" if held.deleted else f"epoch {held.epoch}"
                return Refused(f"node {self.node_id} holds {what} of run {replica.run_id!r}; "
                               f"epoch {replica.epoch} may not write", stale=True, fence=held)
            if held is None or replica.epoch > held.epoch:
                self._set_fence(db, replica.run_id, Fence(replica.epoch, token))
            present = self._row(db, replica.run_id, replica.epoch, replica.seq)
            if present is not None and present.verifies():
                if present.checksum == replica.checksum:
                    return present  # a retried put: already durable
                return Refused(f"run {replica.run_id!r} already has checkpoint {replica.seq} "
                               f"of epoch {replica.epoch} on node {self.node_id}", exists=True)
            self._insert(db, replica)
        return replica

    def adopt(self, replicas: list[Replica], fence: Fence | None) -> int:
        """Take copies made by a repair: records that verify and are missing or damaged here
        (none for a deleted run), and `fence` when it is newer than the one held; returns how
        many records were stored."""
        stored = 0
        with self._write() as db:
            for replica in replicas:
                held = self._fence(db, replica.run_id)
                if not replica.verifies() or (held is not None and held.deleted):
                    continue
                present = self._row(db, replica.run_id, replica.epoch, replica.seq)
                if present is None or not present.verifies():
                    self._insert(db, replica)
                    stored += 1
            if fence is not None and replicas:
                self._raise_fence(db, replicas[0].run_id, fence)
        return stored

    def fence_up(self, run_id: str, fence: Fence) -> Fence | None:
        """Raise `run_id`'s fence to `fence` if it is newer (a repair spreading the newest
        fence, or a deletion); returns the fence now held."""
        with self._write() as db:
            self._raise_fence(db, run_id, fence)
            if fence.deleted:
                db.execute("DELETE FROM replicas WHERE run_id = ?", (run_id,))
            return self._fence(db, run_id)

    def drop_records(self, run_id: str, keys: list[tuple[int, int]]) -> int:
        """Forget these records of `run_id` but keep its fence (a repair copied them to the
        nodes the ring now names; the fence still refuses a stale owner here)."""
        with self._write() as db:
            return sum(db.execute("DELETE FROM replicas WHERE run_id = ? AND epoch = ? AND "
                                  "seq = ?", (run_id, epoch, seq)).rowcount
                       for epoch, seq in keys)

    def delete_run(self, run_id: str) -> None:
        """Forget `run_id`'s records and leave a tombstone: no owner may write it again, and
        copies elsewhere are dropped when a repair meets the tombstone."""
        self.fence_up(run_id, DELETED)

    # --- reads -------------------------------------------------------------------------------

    def fence(self, run_id: str) -> Fence | None:
        """The fence held for `run_id`, if any."""
        with self._read() as db:
            return self._fence(db, run_id)

    def head(self, run_id: str) -> tuple[Fence | None, Replica | None]:
        """The run's fence and its highest (epoch, seq) record that verifies (none once it was
        deleted)."""
        fence = self.fence(run_id)
        if fence is not None and fence.deleted:
            return fence, None
        return fence, self._first(run_id, "ORDER BY epoch DESC, seq DESC")

    def get(self, run_id: str, seq: int) -> Replica | None:
        """Checkpoint `seq` of `run_id` from its newest epoch that verifies here."""
        return self._first(run_id, "AND seq = ? ORDER BY epoch DESC", seq)

    def records(self, run_id: str) -> list[Replica]:
        """Every record of `run_id` that verifies, by (epoch, seq)."""
        return self._verified(run_id, "ORDER BY epoch, seq")

    def holding(self, run_id: str) -> Holding:
        """What this host holds of `run_id`, from its index (states are not read)."""
        with self._read() as db:
            rows = db.execute("SELECT epoch, seq, checksum FROM replicas WHERE run_id = ?",
                              (run_id,)).fetchall()
            return Holding(self._fence(db, run_id), {(e, s): c for e, s, c in rows})

    def inventory(self) -> dict[str, Holding]:
        """What this host holds of every run, from its index: what a repair compares between
        hosts (damaged records are found by reads and `scrub`)."""
        with self._read() as db:
            held = {run: Holding(Fence(epoch, token), {})
                    for run, epoch, token in db.execute("SELECT run_id, epoch, token "
                                                        "FROM fences")}
            for run, epoch, seq, checksum in db.execute(
                    "SELECT run_id, epoch, seq, checksum FROM replicas"):
                held.setdefault(run, Holding(None, {})).records[(epoch, seq)] = checksum
        return held

    def fetch(self, run_id: str, keys: list[tuple[int, int]]) -> list[Replica]:
        """The records of `run_id` with these (epoch, seq) keys that verify here."""
        wanted = set(map(tuple, keys))
        return [r for r in self.records(run_id) if r.key in wanted]

    def scrub(self, limit: int = SCRUB_BATCH) -> int:
        """Check the next `limit` records at rest (wrapping around), quarantining damaged
        ones; how many were damaged."""
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM replicas WHERE (run_id, epoch, seq) > "
                              "(?, ?, ?) ORDER BY run_id, epoch, seq LIMIT ?",
                              (*self._scrubbed, limit)).fetchall()
        replicas = [Replica(*row) for row in rows]
        self._scrubbed = (replicas[-1].run_id, replicas[-1].epoch, replicas[-1].seq) \
            if len(replicas) == limit else ("", -1, -1)
        return self._quarantine([r for r in replicas if not r.verifies()])

    def runs(self) -> list[str]:
        """The runs with records or a live (not deleted) fence here, sorted."""
        with self._read() as db:
            rows = db.execute("SELECT run_id FROM replicas UNION SELECT run_id FROM fences "
                              "WHERE epoch < ? ORDER BY 1", (TOMBSTONE,)).fetchall()
        return [row[0] for row in rows]

    def ping(self) -> str:
        """This host's node id (a liveness probe)."""
        return self.node_id

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- internals ---------------------------------------------------------------------------

    def _first(self, run_id: str, clause: str, *params: object) -> Replica | None:
        """The first record in `clause`'s order that verifies (reading one at a time, so a read
        costs one record however long the run's history, unless some are damaged)."""
        while True:
            found = self._verified(run_id, clause + " LIMIT 1", *params)
            if found:
                return found[0]
            with self._read() as db:
                left = db.execute(f"SELECT 1 FROM replicas WHERE run_id = ? {clause} LIMIT 1",
                                  (run_id, *params)).fetchone()
            if left is None:  # none left: the damaged one (if any) went to quarantine
                return None

    def _verified(self, run_id: str, clause: str, *params: object) -> list[Replica]:
        with self._read() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM replicas WHERE run_id = ? {clause}",
                              (run_id, *params)).fetchall()
        replicas = [Replica(*row) for row in rows]
        good = [r for r in replicas if r.verifies()]
        if len(good) < len(replicas):
            self._quarantine([r for r in replicas if not r.verifies()])
        return good

    def _quarantine(self, damaged: list[Replica]) -> int:
        if damaged:
            with self._write() as db:
                for r in damaged:
                    db.execute(f"INSERT INTO quarantine ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (r.run_id, r.epoch, r.seq, r.text, r.created, r.checksum, r.seal))
                    db.execute("DELETE FROM replicas WHERE run_id = ? AND epoch = ? AND seq = ?",
                               (r.run_id, r.epoch, r.seq))
                self.corrupt_seen += len(damaged)
        return len(damaged)

    @staticmethod
    def _row(db: sqlite3.Connection, run_id: str, epoch: int, seq: int) -> Replica | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM replicas WHERE run_id = ? AND epoch = ? AND "
                         "seq = ?", (run_id, epoch, seq)).fetchone()
        return Replica(*row) if row else None

    @staticmethod
    def _insert(db: sqlite3.Connection, replica: Replica) -> None:
        db.execute(f"INSERT OR REPLACE INTO replicas ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (replica.run_id, replica.epoch, replica.seq, replica.text, replica.created,
                    replica.checksum, replica.seal))

    @staticmethod
    def _fence(db: sqlite3.Connection, run_id: str) -> Fence | None:
        row = db.execute("SELECT epoch, token FROM fences WHERE run_id = ?",
                         (run_id,)).fetchone()
        return Fence(*row) if row else None

    @staticmethod
    def _set_fence(db: sqlite3.Connection, run_id: str, fence: Fence) -> None:
        db.execute("INSERT OR REPLACE INTO fences VALUES (?, ?, ?)",
                   (run_id, fence.epoch, fence.token))

    def _raise_fence(self, db: sqlite3.Connection, run_id: str, fence: Fence) -> None:
        held = self._fence(db, run_id)
        if held is None or fence.epoch > held.epoch:
            self._set_fence(db, run_id, fence)

    def _write(self) -> _Transaction:
        return _Transaction(self, "BEGIN IMMEDIATE")

    def _read(self) -> _Transaction:
        return _Transaction(self, "BEGIN")


class _Transaction:
    """The host's lock and one SQLite transaction; SQLite errors, in it or around it, become a
    `CheckpointError` that names the node and its file."""

    def __init__(self, host: ReplicaHost, begin: str):
        self.host, self.begin = host, begin

    def _error(self, exc: BaseException) -> CheckpointError:
        return CheckpointError(f"node {self.host.node_id}: replica store {self.host.path}: {exc}")

    def __enter__(self) -> sqlite3.Connection:
        self.host._lock.acquire()
        try:
            self.host._db.execute(self.begin)
        except sqlite3.Error as exc:
            self.host._lock.release()
            raise self._error(exc) from None
        return self.host._db

    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            if exc_type is None:
                self.host._db.commit()
            else:
                self.host._db.rollback()
        except sqlite3.Error as error:
            raise self._error(error) from None
        finally:
            self.host._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise self._error(exc) from None
        return False
