"""A history of checkpoint operations and its checker (in the manner of Jepsen).

Writers append each put as it is invoked and as it ends (`ok`: acknowledged; `fail`: refused,
never claimed saved). After faults and recovery, `check_history` proves the model: every
acknowledged checkpoint is still readable with exactly the bytes it was acknowledged with. A
put that was invoked but never ended (its writer died) is indeterminate: either outcome is
allowed.

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
                           **({"error": error} if error else {})})
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
    """Check that every acknowledged put is readable, via `read(run, seq)`, with the checksum
    it was acknowledged with."""
    ends = {}
    for op in operations:
        if op["op"] == "put" and op["phase"] in ("ok", "fail"):
            ends[(op["run"], op["epoch"], op["seq"], op["pid"])] = op["phase"]
    invoked = [op for op in operations if op["op"] == "put" and op["phase"] == "invoke"]
    violations = []
    for op in (op for op in operations if op["op"] == "put" and op["phase"] == "ok"):
        found = read(op["run"], op["seq"])
        if found is None:
            violations.append(f"run {op['run']!r}: acknowledged checkpoint {op['seq']} "
                              f"(epoch {op['epoch']}) is gone")
        elif found.checksum != op["checksum"]:
            violations.append(f"run {op['run']!r}: acknowledged checkpoint {op['seq']} "
                              f"(epoch {op['epoch']}) now reads different bytes")
    outcomes = list(ends.values())
    return HistoryReport(outcomes.count("ok"), outcomes.count("fail"),
                         sum((o["run"], o["epoch"], o["seq"], o["pid"]) not in ends
                             for o in invoked), violations)
