"""The `CheckpointStore` seam: a run's state stored after every step, by run id and sequence.

Stores hold each state as canonical JSON with its SHA-256, and verify the checksum on every read.
A store can wrap another (a replicating store puts locally, then on its buddies), since the
protocol is all a caller sees. Adding a store is one module and one line in `STORES`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pyagent.errors import ConfigError, PyAgentError


class CheckpointError(PyAgentError):
    """A checkpoint cannot be stored or read; the message names the run, sequence or file."""


class CheckpointExistsError(CheckpointError):
    """A checkpoint with this run id and sequence number is already stored."""


class CorruptCheckpointError(CheckpointError):
    """A stored checkpoint no longer matches its checksum."""


@dataclass(frozen=True)
class Checkpoint:
    """One stored state of a run; `checksum` is the SHA-256 of the canonical JSON of `state`."""

    run_id: str
    seq: int
    state: dict[str, Any]
    created: float
    checksum: str


@runtime_checkable
class CheckpointStore(Protocol):
    """Checkpoints by run id and sequence number (0, 1, ... per run); every put is atomic."""

    def put(self, run_id: str, seq: int, state: dict[str, Any]) -> Checkpoint:
        """Store `state` as checkpoint `seq` of `run_id`; an existing seq raises."""
        ...

    def get(self, run_id: str, seq: int | None = None) -> Checkpoint | None:
        """Checkpoint `seq` of `run_id` (the latest when None), or None if there is none."""
        ...

    def list(self, run_id: str) -> list[Checkpoint]:
        """Every checkpoint of `run_id`, ordered by seq."""
        ...

    def runs(self) -> list[str]:
        """The ids of the runs with at least one checkpoint, sorted."""
        ...

    def delete_run(self, run_id: str) -> None:
        """Forget every checkpoint of `run_id`."""
        ...

    def close(self) -> None:
        """Release the store; later calls raise `CheckpointError`."""
        ...


def check_key(run_id: str, seq: int) -> None:
    """Refuse a run id that is not a non-empty string or a seq that is not an int >= 0."""
    if not isinstance(run_id, str) or not run_id:
        raise CheckpointError(f"a run id must be a non-empty string, not {run_id!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise CheckpointError(f"run {run_id!r}: seq must be an int >= 0, not {seq!r}")


def _refuse_unserializable(value: Any, path: str, open_ids: set[int]) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"state at {path} is {value}, which JSON cannot hold")
        return
    if not isinstance(value, dict | list | tuple):
        raise CheckpointError(
            f"state at {path} is a {type(value).__name__}, which JSON cannot hold")
    if id(value) in open_ids:
        raise CheckpointError(f"state at {path} contains itself")
    open_ids.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"state at {path} has a non-string key {key!r}")
            _refuse_unserializable(item, f"{path}[{key!r}]", open_ids)
    else:
        for index, item in enumerate(value):
            _refuse_unserializable(item, f"{path}[{index}]", open_ids)
    open_ids.discard(id(value))


def canonical_json(state: dict[str, Any]) -> str:
    """The canonical JSON text of `state`; what cannot round-trip is refused, naming its path."""
    if not isinstance(state, dict):
        raise CheckpointError(f"a checkpoint state must be a dict, not {type(state).__name__}")
    _refuse_unserializable(state, "state", set())
    return json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def checksum_of(text: str) -> str:
    """The SHA-256 hex digest of canonical JSON text."""
    return hashlib.sha256(text.encode()).hexdigest()


def new_checkpoint(run_id: str, seq: int, state: dict[str, Any]) -> tuple[Checkpoint, str]:
    """A checkpoint to store now, with its canonical JSON text; its state is a fresh copy."""
    check_key(run_id, seq)
    text = canonical_json(state)
    return Checkpoint(run_id, seq, json.loads(text), time.time(), checksum_of(text)), text


def load_checkpoint(run_id: str, seq: int, text: str, created: float,
                    checksum: str) -> Checkpoint:
    """Rebuild a stored checkpoint, raising `CorruptCheckpointError` unless it verifies."""
    if checksum_of(text) != checksum:
        raise CorruptCheckpointError(
            f"checkpoint {seq} of run {run_id!r} does not match its checksum")
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise CorruptCheckpointError(
            f"checkpoint {seq} of run {run_id!r} is not valid JSON: {exc}") from None
    return Checkpoint(run_id, seq, state, created, checksum)


def _sqlite(location: str) -> CheckpointStore:
    from pyagent.resilience.sqlite_store import SQLiteCheckpointStore

    if not location.startswith("///") or len(location) == 3:
        raise ConfigError(f"a SQLite store is 'sqlite:///PATH', not 'sqlite:{location}'")
    return SQLiteCheckpointStore(location[3:])


def _memory(location: str) -> CheckpointStore:
    from pyagent.resilience.memory_store import MemoryCheckpointStore

    if location:
        raise ConfigError(f"an in-memory store is 'memory:', not 'memory:{location}'")
    return MemoryCheckpointStore()


STORES: dict[str, Callable[[str], CheckpointStore]] = {
    "sqlite": _sqlite,
    "memory": _memory,
}
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(.*)", re.DOTALL)


def open_store(url_or_path: str | os.PathLike[str]) -> CheckpointStore:
    """Open a store from `memory:`, `sqlite:///PATH` (`sqlite:////abs` for an absolute path)
    or a path ending in .db, .sqlite or .sqlite3."""
    text = os.fspath(url_or_path)
    match = _SCHEME.fullmatch(text) if isinstance(url_or_path, str) else None
    if match:
        scheme, location = match.groups()
        if scheme.lower() not in STORES:
            raise ConfigError(f"unknown checkpoint store {scheme!r} in {text!r}; "
                              f"choose one of {', '.join(STORES)}")
        return STORES[scheme.lower()](location)
    if text.lower().endswith(SQLITE_SUFFIXES):
        return STORES["sqlite"]("///" + text)
    raise ConfigError(f"cannot tell which checkpoint store {text!r} means; use a path ending "
                      f"in {', '.join(SQLITE_SUFFIXES)}, 'sqlite:///PATH' or 'memory:'")
