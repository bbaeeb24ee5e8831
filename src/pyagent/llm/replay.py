"""The `replay` backend: completions recorded from real runs, replayed by a hash of the request.

A recording is a JSON-lines file, one entry per request, appended and fsynced as each completion
finishes, so a crash loses at most the request in flight. Recording wraps another backend;
replaying needs no model at all, which makes tests and benchmarks reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pyagent.errors import ConfigError, ReplayMissError
from pyagent.llm.base import Backend, collect
from pyagent.types import Completion, CompletionRequest, StreamEvent

FORMAT = 1
_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b")


def request_key(request: CompletionRequest) -> str:
    """SHA-256 of the request's canonical JSON: the same request always maps to the same key.

    What differs from one run to the next without changing what is asked does not count, as
    a cassette's matcher would ignore it: the deadline (`timeout_s`, the time a turn has left)
    and durations in the messages ("after 0.8s", "in 0.03s": tools report how long they
    took)."""
    fields = {k: v for k, v in request.to_dict().items() if k != "timeout_s"}
    for message in fields.get("messages") or []:
        if isinstance(message.get("content"), str):
            message["content"] = _DURATION.sub("<duration>", message["content"])
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class ReplayBackend:
    """`mode="replay"` serves recordings; `mode="record"` calls `inner` and appends what it says."""

    name = "replay"

    def __init__(self, path: str | Path, mode: Literal["replay", "record"] = "replay",
                 inner: Backend | None = None, delay_s: float = 0.0):
        if mode not in ("replay", "record"):
            raise ConfigError(f"replay mode must be 'replay' or 'record', got {mode!r}")
        if mode == "record" and inner is None:
            raise ConfigError("recording needs a backend to record from")
        self.path = Path(path)
        self.mode = mode
        self.inner = inner
        if not 0 <= delay_s <= 3600:
            raise ConfigError(f"replay delay must be from 0 to 3600 seconds, not {delay_s!r}")
        self.delay_s = delay_s  # served completions wait this long: a model's latency, for tests
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            if self.mode == "replay":
                raise ConfigError(f"no recording at {self.path}")
            return {}
        entries: dict[str, dict[str, Any]] = {}
        raw = self.path.read_text(encoding="utf-8")
        lines = raw.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                Completion.from_dict(entry["completion"])
                entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError) as exc:
                if number == len(lines):  # a last line cut short by a crash: not an entry yet
                    continue
                raise ConfigError(f"{self.path}:{number}: not a valid recording entry ({exc})") \
                    from exc
        return entries

    def complete(self, request: CompletionRequest) -> Completion:
        return collect(self.stream(request))

    def stream(self, request: CompletionRequest) -> Iterator[StreamEvent]:
        key = request_key(request)
        if self.mode == "record":
            assert self.inner is not None
            return self._record(key, request, self.inner.stream(request))
        entry = self.entries.get(key)
        if entry is None:
            raise ReplayMissError(f"no recording of this request in {self.path} (key {key[:16]})")
        return self._replay(entry)

    def _replay(self, entry: dict[str, Any]) -> Iterator[StreamEvent]:
        completion = replace(Completion.from_dict(entry["completion"]), backend=self.name)
        if self.delay_s:
            time.sleep(self.delay_s)
        *deltas, last = entry["deltas"] or [""]
        for delta in deltas:
            yield StreamEvent(delta)
        yield StreamEvent(last, completion)

    def _record(self, key: str, request: CompletionRequest,
                events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
        deltas: list[str] = []
        for event in events:
            deltas.append(event.delta)
            if event.completion is not None:
                self._append({
                    "format": FORMAT,
                    "key": key,
                    "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "request": request.to_dict(),
                    "deltas": deltas,
                    "completion": event.completion.to_dict(),
                })
            yield event

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as handle:
                _drop_partial_last_line(handle)
                handle.write(line.encode("utf-8") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.entries[entry["key"]] = entry


def _drop_partial_last_line(handle: Any) -> None:
    """Cut a last line that a crash left unterminated: it never became an entry."""
    end = handle.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        step = min(position, 1 << 16)
        handle.seek(position - step)
        newline = handle.read(step).rfind(b"\n")
        if newline >= 0:
            position = position - step + newline + 1
            break
        position -= step
    if position != end:
        handle.truncate(position)
    handle.seek(0, os.SEEK_END)
