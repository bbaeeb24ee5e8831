"""Run suite items on a backend or through a manifest on the fleet, `concurrency` at a time, as
threads or as asyncio tasks, and record one attempt per item and repeat.

A question item is an episode: each turn is a request (rendered by `suites/prompts.py`), graded
as it arrives, and its feedback goes into the next turn. The episode is written once, as a
generator of requests, and driven by a thread (`backend.complete`) or by a coroutine (the
backend's `acomplete` when it has one: the embedded engine's scheduler then serves every task
from one event loop; other backends run their calls on worker threads under asyncio).

A fleet item (a repair task) runs the manifest on a fresh copy of the item's files, its spans in
the run folder's trace store, and is graded by the suite's checker on the workspace afterwards.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyagent.bench.prices import PriceTable
from pyagent.bench.suites.base import Grade, Item, Suite
from pyagent.bench.suites.prompts import request_for
from pyagent.errors import ConfigError, PyAgentError
from pyagent.llm.base import Backend
from pyagent.observe.traces import TraceStore
from pyagent.types import Completion, CompletionRequest, Usage

EXECUTORS = ("threads", "asyncio")
MAX_TEXT = 400  # characters of each raw answer kept in a record

Episode = Generator[CompletionRequest, Completion, None]


@dataclass(frozen=True)
class RunSettings:
    """How a suite runs: prompt style, how many items at once and on what, repeats, sampling,
    the model's price name, and the fleet mode for manifests."""

    style: str = "chat"
    concurrency: int = 1
    executor: str = "threads"
    repeat: int = 1
    temperature: float = 0.0
    seed: int = 0
    model: str = "gemma-3-270m"
    mode: str = "sequenced"

    def __post_init__(self) -> None:
        if self.style not in ("chat", "completion"):
            raise ConfigError(f"--style must be chat or completion, got {self.style!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, "
                              f"got {self.executor!r}")
        if self.concurrency < 1 or self.repeat < 1:
            raise ConfigError("--concurrency and --repeat must be at least 1")
        if self.repeat > 1 and self.temperature == 0.0:
            raise ConfigError("--repeat above 1 needs --temperature above 0: greedy decoding "
                              "repeats the same answer, so pass^k would measure nothing")


class Attempt:
    """One item's attempt being recorded: per-turn answers and grades, usage and timings."""

    def __init__(self, item: Item, repeat: int):
        self.item, self.repeat = item, repeat
        self.answers: list[str] = []
        self.grades: list[Grade] = []
        self.usage = Usage(0, 0, 0)
        self.ttft_s: float | None = None  # summed over the attempt's calls, as queue_s is
        self.queue_s: float | None = None
        self.calls = 0
        self.started = time.perf_counter()
        self.error: str | None = None

    def add(self, completion: Completion, grade: Grade) -> None:
        self.answers.append(completion.text)
        self.grades.append(grade)
        usage, timings = completion.usage, completion.timings
        self.usage = Usage(self.usage.prompt_tokens + usage.prompt_tokens,
                           self.usage.completion_tokens + usage.completion_tokens,
                           self.usage.cached_tokens + usage.cached_tokens)
        self.calls += 1
        self.ttft_s = (self.ttft_s or 0.0) + timings.time_to_first_token_s
        if timings.queue_s is not None:
            self.queue_s = (self.queue_s or 0.0) + timings.queue_s

    def record(self, cost: str | None, **extra: Any) -> dict[str, Any]:
        item = self.item
        scored = [self.grades[t] for t in item.scored if t < len(self.grades)]
        complete = len(scored) == len(item.scored) and self.error is None
        score = sum(g.score for g in scored) / len(item.scored) if complete else 0.0
        return {
            "item_id": item.id, "suite": item.suite, "family": item.family,
            "difficulty": item.difficulty, "split": item.split, "repeat": self.repeat,
            "score": score, "correct": complete and all(g.correct for g in scored),
            "parsed": " | ".join(g.parsed for g in self.grades),
            "expected": " | ".join(item.turns[t].answer for t in item.scored) if item.turns
            else "", "detail": " | ".join(g.detail for g in self.grades),
            "answer": " | ".join(a[:MAX_TEXT] for a in self.answers),
            "latency_s": time.perf_counter() - self.started, "ttft_s": self.ttft_s,
            "queue_s": self.queue_s, "calls": self.calls,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "cached_tokens": self.usage.cached_tokens, "cost": cost, "error": self.error,
            **extra}


class SuiteRunner:
    """Runs items of `suites` (by name) on `backend`, or through `manifest` for fleet items
    (their spans in `folder`/traces.db, their workspaces in `folder`/workspaces)."""

    def __init__(self, backend: Backend, suites: Mapping[str, Suite], settings: RunSettings,
                 prices: PriceTable | None = None, manifest: Path | None = None,
                 folder: Path | None = None,
                 progress: Callable[[dict[str, Any]], None] = lambda _record: None,
                 label: str = ""):
        self.backend, self.suites, self.settings = backend, suites, settings
        self.label = label  # before each fleet run's id, so that several runners share a folder
        self.prices = prices or PriceTable()
        self.manifest, self.folder, self.progress = manifest, folder, progress
        self._lock = threading.Lock()
        self._traces: TraceStore | None = None

    def run(self, items: Sequence[Item]) -> list[dict[str, Any]]:
        """Every item `repeat` times; the attempt records in the order of `items`."""
        jobs = [(item, r) for item in items for r in range(self.settings.repeat)]
        if any(item.is_fleet_task for item in items):
            if self.manifest is None or self.folder is None:
                raise ConfigError("fleet tasks (repair) need --manifest: the manifest that "
                                  "runs them")
            self._traces = TraceStore(self.folder / "traces.db")
        try:
            if self.settings.executor == "asyncio":
                return asyncio.run(self._run_async(jobs))
            with ThreadPoolExecutor(self.settings.concurrency, "pyagent-bench") as pool:
                return list(pool.map(lambda job: self._attempt(*job), jobs))
        finally:
            if self._traces is not None:
                self._traces.close()
                self._traces = None

    async def _run_async(self, jobs: list[tuple[Item, int]]) -> list[dict[str, Any]]:
        slots = asyncio.Semaphore(self.settings.concurrency)

        async def one(item: Item, repeat: int) -> dict[str, Any]:
            async with slots:
                if item.is_fleet_task:
                    return await asyncio.to_thread(self._attempt, item, repeat)
                return await self._episode_async(item, repeat)

        return list(await asyncio.gather(*(one(item, r) for item, r in jobs)))

    # --- question items --------------------------------------------------------------------------

    def _episode(self, attempt: Attempt) -> Episode:
        """Yields each turn's request and receives its completion; grades as it goes."""
        item, settings = attempt.item, self.settings
        suite = self.suites[item.suite]
        verdicts: list[bool] = []
        seed = None if settings.temperature == 0 else settings.seed * 1000 + attempt.repeat
        for turn in range(len(item.turns)):
            request = request_for(item, turn, attempt.answers, verdicts, settings.style,
                                  settings.temperature, seed)
            completion = yield request
            grade = suite.grade(item, turn, completion.text)
            attempt.add(completion, grade)
            verdicts.append(grade.correct)

    def _attempt(self, item: Item, repeat: int) -> dict[str, Any]:
        if item.is_fleet_task:
            return self._fleet_attempt(item, repeat)
        attempt = Attempt(item, repeat)
        episode = self._episode(attempt)
        try:
            request = next(episode)
            while True:
                request = episode.send(self.backend.complete(request))
        except StopIteration:
            pass
        except PyAgentError as exc:
            attempt.error = f"{type(exc).__name__}: {exc}"
        return self._finish(attempt)

    async def _episode_async(self, item: Item, repeat: int) -> dict[str, Any]:
        attempt = Attempt(item, repeat)
        episode = self._episode(attempt)
        complete = getattr(self.backend, "acomplete", None)
        try:
            request = next(episode)
            while True:
                completion = await (complete(request) if complete is not None
                                    else asyncio.to_thread(self.backend.complete, request))
                request = episode.send(completion)
        except StopIteration:
            pass
        except PyAgentError as exc:
            attempt.error = f"{type(exc).__name__}: {exc}"
        return self._finish(attempt)

    def _finish(self, attempt: Attempt, **extra: Any) -> dict[str, Any]:
        cost = None
        if attempt.calls:
            priced = self.prices.cost(attempt.usage, self.settings.model)
            cost = None if priced is None else str(priced.total)
        record = attempt.record(cost, **extra)
        with self._lock:
            self.progress(record)
        return record

    # --- fleet items -----------------------------------------------------------------------------

    def _fleet_attempt(self, item: Item, repeat: int) -> dict[str, Any]:
        from pyagent.bench.fleet import run_on_workspace

        assert self.manifest is not None and self._traces is not None
        attempt = Attempt(item, repeat)
        name = f"{self.label}{_safe(item.id)}-r{repeat}"
        workspace = self._traces.path.parent / "workspaces" / name
        try:
            run = run_on_workspace(self.manifest, item.files or {}, item.task, workspace,
                                   self.backend, self._traces, self.settings.mode, run_id=name)
        except PyAgentError as exc:
            attempt.error = f"{type(exc).__name__}: {exc}"
            return self._finish(attempt)
        attempt.grades.append(self.suites[item.suite].check(item, workspace))
        attempt.usage, attempt.calls = run.usage, run.llm_calls
        attempt.ttft_s, attempt.queue_s = run.first_token_s, run.queue_s
        return self._finish(attempt, run_id=run.run_id, run_status=run.status,
                            tool_calls=run.tool_calls)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")
