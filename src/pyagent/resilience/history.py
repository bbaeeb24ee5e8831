"""A history of checkpoint operations and its checker (in the manner of Jepsen).

Writers append each put as it is invoked and as it ends: `ok` (acknowledged), `fail` (no replica
took it: it must never be read), or `info` (indeterminate: some replica took it, or the writer
learnt afterwards that it had been fenced; either outcome is allowed). Claims of a run by a new
epoch are logged when they complete. After faults and recovery, `check_history` proves the model:
- every acknowledged checkpoint is still readable with exactly the bytes it was acknowledged with;
- no failed put is ever read;
- no put was acknowledged to an owner whose epoch had already been superseded by a claim that
  completed before the put began (a stale owner told "saved").
A put invoked but never ended (its writer died) is indeterminate too.

The log is JSON lines appended with one `write` each (O_APPEND), so processes on one machine can
share it; a line cut short by a crash is ignored.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyagent.resilience.checkpoint import Checkpoint


class HistoryLog:
    """Appends operations to the JSON-lines file at `path`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, op: str, phase: str, run_id: str, epoch: int, seq: int, checksum: str,
               error: str | None = None) -> None:
        line = json.dumps({"op": op, "phase": phase, "run": run_id, "epoch": epoch, "seq": seq,
                           "checksum": checksum, "time": time.time(), "pid": os.getpid(),
                           "thread": threading.get_ident(), **({"error": error} if error else {})})
        with self._lock:
            os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __getstate__(self) -> dict[str, str]:  # travels to other processes as its path
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


@dataclass(frozen=True)
class HistoryReport:
    """What the checker found: counts by outcome, and every violation in words."""

    acknowledged: int
    failed: int
    indeterminate: int
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


def read_history(path: str | os.PathLike[str]) -> list[dict]:
    """The operations in a history file (a last line cut short by a crash is skipped)."""
    operations = []
    for line in Path(path).read_text().splitlines():
        try:
            operations.append(json.loads(line))
        except ValueError:
            continue
    return operations


def check_history(operations: list[dict],
                  read: Callable[[str, int], Checkpoint | None]) -> HistoryReport:
    """Check the operations against the model, reading each checkpoint via `read(run, seq)`."""
    puts = [op for op in operations if op["op"] == "put"]
    ends = {_key(op): op for op in puts if op["phase"] != "invoke"}
    invoked = {_key(op): op for op in puts if op["phase"] == "invoke"}
    claims = [op for op in operations if op["op"] == "claim" and op["phase"] == "ok"]
    acknowledged = [op for op in ends.values() if op["phase"] == "ok"]
    violations = []
    for op in acknowledged:
        where = f"run {op['run']!r}: acknowledged checkpoint {op['seq']} (epoch {op['epoch']})"
        found = read(op["run"], op["seq"])
        if found is None:
            violations.append(f"{where} is gone")
        elif found.checksum != op["checksum"]:
            violations.append(f"{where} now reads different bytes")
        began = invoked.get(_key(op), op)["time"]
        newer = [c for c in claims if c["run"] == op["run"] and c["epoch"] > op["epoch"] and
                 c["time"] < began]
        if newer:
            violations.append(f"{where} was acknowledged to a stale owner: epoch "
                              f"{newer[0]['epoch']} had claimed the run before the put began")
    saved = {(op["run"], op["seq"], op["checksum"]) for op in acknowledged}
    for op in (op for op in ends.values() if op["phase"] == "fail"):
        found = read(op["run"], op["seq"])
        if found is not None and found.checksum == op["checksum"] and \
                (op["run"], op["seq"], op["checksum"]) not in saved:
            violations.append(f"run {op['run']!r}: checkpoint {op['seq']} (epoch {op['epoch']}) "
                              "was refused as not saved, yet reads back")
    outcomes = [op["phase"] for op in ends.values()]
    return HistoryReport(outcomes.count("ok"), outcomes.count("fail"),
                         outcomes.count("info") + sum(k not in ends for k in invoked),
                         violations)


def _key(op: dict) -> tuple:
    return op["run"], op["epoch"], op["seq"], op["pid"], op.get("thread")
