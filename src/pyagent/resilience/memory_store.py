"""A `CheckpointStore` in process memory, for tests and single-process runs."""

from __future__ import annotations

import threading
from typing import Any

from pyagent.resilience.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointExistsError,
    check_key,
    load_checkpoint,
    new_checkpoint,
)


class MemoryCheckpointStore:
    """Checkpoints in a dict, each state kept as its canonical JSON text so that what goes in
    and what comes out are deep copies, verified against the checksum like any stored state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, dict[int, tuple[str, float, str]]] | None = {}

    def _data(self) -> dict[str, dict[int, tuple[str, float, str]]]:
        if self._runs is None:
            raise CheckpointError("the in-memory checkpoint store is closed")
        return self._runs

    def put(self, run_id: str, seq: int, state: dict[str, Any]) -> Checkpoint:
        checkpoint, text = new_checkpoint(run_id, seq, state)
        with self._lock:
            run = self._data().setdefault(run_id, {})
            if seq in run:
                raise CheckpointExistsError(f"run {run_id!r} already has checkpoint {seq}")
            run[seq] = (text, checkpoint.created, checkpoint.checksum)
        return checkpoint

    def get(self, run_id: str, seq: int | None = None) -> Checkpoint | None:
        if seq is not None:
            check_key(run_id, seq)
        with self._lock:
            run = self._data().get(run_id)
            if not run:
                return None
            seq = max(run) if seq is None else seq
            row = run.get(seq)
        return None if row is None else load_checkpoint(run_id, seq, *row)

    def list(self, run_id: str) -> list[Checkpoint]:
        with self._lock:
            rows = sorted(self._data().get(run_id, {}).items())
        return [load_checkpoint(run_id, seq, *row) for seq, row in rows]

    def runs(self) -> list[str]:
        with self._lock:
            return sorted(self._data())

    def delete_run(self, run_id: str) -> None:
        with self._lock:
            self._data().pop(run_id, None)

    def close(self) -> None:
        with self._lock:
            self._runs = None
