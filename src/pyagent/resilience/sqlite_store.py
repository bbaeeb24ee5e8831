"""A `CheckpointStore` in one SQLite file: WAL, `synchronous=FULL`, one transaction per put."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyagent.resilience.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointExistsError,
    check_key,
    load_checkpoint,
    new_checkpoint,
)

# MIGRATIONS[i] takes the schema from version i to i + 1; append, never edit.
MIGRATIONS: list[tuple[str, ...]] = [
    ("CREATE TABLE checkpoints (run_id TEXT NOT NULL, seq INTEGER NOT NULL, "
     "state TEXT NOT NULL, created REAL NOT NULL, checksum TEXT NOT NULL, "
     "PRIMARY KEY (run_id, seq)) WITHOUT ROWID",),
]
SCHEMA_VERSION = len(MIGRATIONS)
_COLUMNS = "run_id, seq, state, created, checksum"


class SQLiteCheckpointStore:
    """Checkpoints in the SQLite file at `path`; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise CheckpointError(f"cannot open checkpoint store {self.path}: {exc}") from None
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            db.close()
            raise CheckpointError(
                f"{self.path} is not a readable checkpoint store: {exc}") from None
        if mode.lower() != "wal":
            db.close()
            raise CheckpointError(f"checkpoint store {self.path} cannot use WAL journaling")
        self._db: sqlite3.Connection | None = db
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def _migrate(self) -> None:
        with self._transaction(write=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if "schema_version" not in tables:
                if tables:
                    raise CheckpointError(f"{self.path} is not a checkpoint store")
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                db.execute("INSERT INTO schema_version VALUES (0)")
            version = db.execute("SELECT version FROM schema_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CheckpointError(
                    f"checkpoint store {self.path} has schema version {version}, newer than "
                    f"the {SCHEMA_VERSION} this PyAgent reads; upgrade PyAgent to open it")
            for migration in MIGRATIONS[version:]:
                for statement in migration:
                    db.execute(statement)
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one transaction; SQLite errors become `CheckpointError`."""
        with self._lock:
            db = self._db
            if db is None:
                raise CheckpointError(f"checkpoint store {self.path} is closed")
            try:
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield db
                except BaseException:
                    db.rollback()
                    raise
                db.commit()
            except sqlite3.Error as exc:
                raise CheckpointError(
                    f"checkpoint store {self.path} is unreadable or corrupt: {exc}") from None

    def put(self, run_id: str, seq: int, state: dict[str, Any]) -> Checkpoint:
        checkpoint, text = new_checkpoint(run_id, seq, state)
        with self._transaction(write=True) as db:
            inserted = db.execute(
                f"INSERT OR IGNORE INTO checkpoints ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (run_id, seq, text, checkpoint.created, checkpoint.checksum)).rowcount
        if not inserted:
            raise CheckpointExistsError(
                f"run {run_id!r} already has checkpoint {seq} in {self.path}")
        return checkpoint

    def get(self, run_id: str, seq: int | None = None) -> Checkpoint | None:
        if seq is None:
            rows = self._select("WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,))
        else:
            check_key(run_id, seq)
            rows = self._select("WHERE run_id = ? AND seq = ?", (run_id, seq))
        return rows[0] if rows else None

    def list(self, run_id: str) -> list[Checkpoint]:
        return self._select("WHERE run_id = ? ORDER BY seq", (run_id,))

    def _select(self, where: str, params: tuple[Any, ...]) -> list[Checkpoint]:
        with self._transaction() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM checkpoints {where}", params).fetchall()
        return [load_checkpoint(*row) for row in rows]

    def runs(self) -> list[str]:
        with self._transaction() as db:
            rows = db.execute("SELECT DISTINCT run_id FROM checkpoints ORDER BY run_id")
            return [row[0] for row in rows]

    def delete_run(self, run_id: str) -> None:
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
