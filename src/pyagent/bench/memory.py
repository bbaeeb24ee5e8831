"""Memory profiling: process-tree RSS (and KV bytes) sampled in the background, GC pauses per
generation, Python heap top allocators on demand, and leak detection from repeated iterations.

    with MemoryProfiler(kv_bytes=lambda: engine.cache.memory().bytes) as prof:
        serve()
    report = prof.report

A sample costs one `memory_info()` per process plus a read of /proc/PID/task/*/children
(~30 us for a process without children: 0.006% of a core at 0.5 s). tracemalloc costs far
more (4-10x on allocation-heavy code), so it only runs once `snapshot()` asks for it, and
stops with the profiler.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psutil

from pyagent.errors import PyAgentError
from pyagent.observe.metrics.trend import Pattern, Trend, classify, fewest_points, mann_kendall

LEAK_THRESHOLD = 64 * 1024  # bytes per iteration the Sen slope's lower bound must exceed
LEAK_ALPHA = 0.05
MIN_LEAK_ITERATIONS = fewest_points(LEAK_ALPHA)  # 5: fewer cannot reach p < 0.05
RSS_RESOLUTION = 64 * 1024  # RSS changes smaller than this are noise to `classify`
GENERATIONS = 3
HIDDEN_FRAMES = (tracemalloc.__file__, __file__, str(Path(psutil.__file__).parent / "*"),
                 "<frozen importlib._bootstrap>", "<unknown>")  # the profiler's own allocations

P = ParamSpec("P")
R = TypeVar("R")


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), which hands free heap pages back to the OS so that RSS counts
    only memory in use; a no-op where the C library has none."""
    try:
        return functools.partial(ctypes.CDLL(None).malloc_trim, 0)
    except (OSError, AttributeError):
        return lambda: None


MALLOC_TRIM = _malloc_trim()


class MemoryProfileError(PyAgentError):
    """A profiler was misused, or what it profiles could not be run or read."""


@dataclass(frozen=True)
class Sample:
    """One background sample: seconds since start, process-tree RSS and KV bytes (or None)."""

    t: float
    rss: int
    kv: int | None


@dataclass
class GCStats:
    """Collections per generation: how many, objects collected, and each pause in seconds."""

    counts: list[int] = field(default_factory=lambda: [0] * GENERATIONS)
    collected: list[int] = field(default_factory=lambda: [0] * GENERATIONS)
    pauses_s: list[list[float]] = field(default_factory=lambda: [[] for _ in range(GENERATIONS)])

    def to_dict(self) -> dict[str, Any]:
        summary = [{"total_s": sum(p), "median_s": statistics.median(p) if p else 0.0,
                    "max_s": max(p, default=0.0)} for p in self.pauses_s]
        return {**asdict(self), "summary": summary}


class _GCRecorder:
    """A `gc.callbacks` entry that times every collection."""

    def __init__(self) -> None:
        self.stats = GCStats()
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        generation = info["generation"]
        self.stats.counts[generation] += 1
        self.stats.collected[generation] += info["collected"]
        self.stats.pauses_s[generation].append(time.perf_counter() - self.started)


@dataclass(frozen=True)
class Allocation:
    """A source line whose Python heap allocations changed between two snapshots."""

    where: str
    size_diff: int
    size: int
    count_diff: int
    count: int


@dataclass(frozen=True)
class LeakVerdict:
    """Whether RSS grows from iteration to iteration, measured after a forced collection.

    `bytes_per_iteration` is Sen's slope with its 95% interval; `detected_at` is the smallest
    number of leading iterations on which the verdict is already "leaking"."""

    leaking: bool
    reason: str
    bytes_per_iteration: float
    low: float
    high: float
    p_value: float
    threshold: int
    iterations: int
    detected_at: int | None
    pattern: Pattern
    blocks_per_iteration: float  # Sen's slope of sys.getallocatedblocks()
    rss: list[int]
    heap_blocks: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MemoryReport:
    """What a profiler saw: samples, RSS extremes, GC, growth pattern, and leak verdict."""

    interval_s: float
    duration_s: float
    samples: list[Sample]
    start_rss: int
    end_rss: int
    peak_rss: int  # the highest sample: a peak between samples goes unseen
    peak_kv: int | None
    gc: GCStats | None  # None when the profiled process is not this interpreter
    pattern: Pattern  # `classify` over the RSS samples
    leak: LeakVerdict | None = None  # when iterations were marked
    returncode: int | None = None  # when a command was profiled

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gc": self.gc.to_dict() if self.gc else None}


class ProcessTree:
    """A process and, optionally, all its descendants, whose RSS is summed."""

    def __init__(self, pid: int | None = None, include_children: bool = True):
        try:
            self.root = psutil.Process(pid)
        except psutil.Error as exc:
            raise MemoryProfileError(f"cannot profile process {pid}: {exc}") from exc
        self.include_children = include_children
        self.procfs = Path(f"/proc/{self.root.pid}/task/{self.root.pid}/children").exists()
        self._known: dict[int, psutil.Process] = {}

    def descendants(self) -> list[int]:
        """Descendant pids: from /proc/PID/task/*/children where the kernel has it (~20 us),
        else from psutil, which reads every process on the machine (~1 ms)."""
        if not self.procfs:
            return [child.pid for child in self.root.children(recursive=True)]
        found: list[int] = []
        queue = [self.root.pid]
        while queue:
            tasks = f"/proc/{queue.pop()}/task"
            try:
                threads = os.listdir(tasks)
            except OSError:
                continue  # the process ended meanwhile
            for thread in threads:
                try:
                    with open(f"{tasks}/{thread}/children") as file:
                        children = [int(pid) for pid in file.read().split()]
                except OSError:
                    continue  # the thread ended meanwhile
                found += children
                queue += children
        return found

    def rss(self) -> int | None:
        """The summed RSS in bytes; None once the root process is gone."""
        try:
            total = self.root.memory_info().rss
            pids = self.descendants() if self.include_children else []
        except psutil.Error:
            return None
        known: dict[int, psutil.Process] = {}
        for pid in pids:
            try:
                process = self._known.get(pid) or psutil.Process(pid)
                total += process.memory_info().rss
            except psutil.Error:
                continue  # exited between listing and reading
            known[pid] = process
        self._known = known
        return total or None  # a zombie reads as zero


def _leaking(trend: Trend) -> bool:
    return trend.direction == "increasing" and trend.slope_low > LEAK_THRESHOLD


def _verdict(rss: list[int], blocks: list[int]) -> LeakVerdict:
    trend = mann_kendall(rss, alpha=LEAK_ALPHA)
    leaking = _leaking(trend)
    detected_at = next((k for k in range(MIN_LEAK_ITERATIONS, len(rss) + 1)
                        if _leaking(mann_kendall(rss[:k], alpha=LEAK_ALPHA))), None)
    if leaking:
        reason = (f"RSS grows {trend.slope / 1024:.0f} KiB per iteration "
                  f"(95% CI {trend.slope_low / 1024:.0f}-{trend.slope_high / 1024:.0f} KiB, "
                  f"p={trend.p_value:.2g})")
    elif trend.direction == "increasing":
        reason = (f"RSS rises significantly, but its slope's lower bound "
                  f"({trend.slope_low / 1024:.1f} KiB) is within {LEAK_THRESHOLD // 1024} KiB")
    else:
        reason = f"no significant RSS increase (p={trend.p_value:.2g})"
    return LeakVerdict(leaking, reason, trend.slope, trend.slope_low, trend.slope_high,
                       trend.p_value, LEAK_THRESHOLD, len(rss), detected_at,
                       classify(rss, resolution=RSS_RESOLUTION), mann_kendall(blocks).slope,
                       rss, blocks)


class _Sampler(threading.Thread):
    """The background thread; it holds no reference to its profiler, so it cannot keep one
    alive, and the profiler's finalizer halts it."""

    def __init__(self, tree: ProcessTree, kv_bytes: Callable[[], int] | None,
                 interval_s: float):
        super().__init__(name="memory-profiler", daemon=True)
        self.tree = tree
        self.kv_bytes, self.interval_s = kv_bytes, interval_s
        self.samples: list[Sample] = []
        self.error: MemoryProfileError | None = None
        self.halt = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        rss = self.tree.rss()
        if rss is None:
            return
        try:
            kv = self.kv_bytes() if self.kv_bytes else None
        except Exception as exc:
            raise MemoryProfileError(f"kv_bytes() failed: {exc!r}") from exc
        self.samples.append(Sample(time.perf_counter() - self.t0, rss, kv))

    def run(self) -> None:
        try:
            while not self.halt.wait(self.interval_s):
                self.sample()
        except MemoryProfileError as exc:  # raised again by MemoryProfiler.stop
            self.error = exc


def _halt(sampler: _Sampler, recorder: _GCRecorder | None) -> None:
    sampler.halt.set()
    if recorder in gc.callbacks:
        gc.callbacks.remove(recorder)


def _check_interval(interval_s: float) -> None:
    if not interval_s > 0:
        raise MemoryProfileError(f"interval_s must be positive, got {interval_s!r}")


class MemoryProfiler:
    """Samples the RSS of a process tree (this process and its children by default) and, when
    given, `kv_bytes()` (called from the sampler thread) every `interval_s` seconds; records
    GC pauses while profiling this interpreter. Use `start()`/`stop()`, or `with`."""

    def __init__(self, interval_s: float = 0.5, kv_bytes: Callable[[], int] | None = None,
                 include_children: bool = True, pid: int | None = None):
        _check_interval(interval_s)
        self.interval_s, self.kv_bytes = interval_s, kv_bytes
        self.tree = ProcessTree(pid, include_children)
        self._own = self.tree.root.pid == os.getpid()
        self.report: MemoryReport | None = None  # set by stop()
        self._sampler: _Sampler | None = None
        self._recorder: _GCRecorder | None = None
        self._finalizer: weakref.finalize | None = None
        self._iterations: list[tuple[int, int]] = []
        self._traced = False

    @property
    def running(self) -> bool:
        return self._sampler is not None

    def start(self) -> MemoryProfiler:
        if self.running:
            raise MemoryProfileError("the memory profiler is already running")
        self._iterations = []
        sampler = _Sampler(self.tree, self.kv_bytes, self.interval_s)
        sampler.sample()
        self._sampler = sampler
        self._recorder = _GCRecorder() if self._own else None
        if self._recorder:
            gc.callbacks.append(self._recorder)
        self._finalizer = weakref.finalize(self, _halt, sampler, self._recorder)
        sampler.start()
        return self

    def stop(self) -> MemoryReport:
        """Stop sampling (and tracemalloc, if `snapshot()` started it); build the report."""
        sampler, finalizer = self._sampler, self._finalizer
        if sampler is None or finalizer is None:
            raise MemoryProfileError("the memory profiler is not running")
        finalizer()
        sampler.join()
        self._sampler = None
        if self._traced:
            tracemalloc.stop()
            self._traced = False
        if sampler.error:
            raise sampler.error
        sampler.sample()
        self.report = self._report(sampler)
        return self.report

    def __enter__(self) -> MemoryProfiler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def end_iteration(self) -> None:
        """Mark the end of one iteration of repeated work: collect garbage and trim the C heap
        (without the trim, a leak that fills free but resident heap pages leaves RSS flat until
        they run out), then record the tree's RSS and the count of allocated Python blocks."""
        gc.collect()
        MALLOC_TRIM()
        rss = self.tree.rss()
        if rss is None:
            raise MemoryProfileError(f"process {self.tree.root.pid} has exited")
        self._iterations.append((rss, sys.getallocatedblocks()))

    def leak_verdict(self) -> LeakVerdict:
        """The leak verdict over the iterations marked since `start()` (at least
        MIN_LEAK_ITERATIONS)."""
        if len(self._iterations) < MIN_LEAK_ITERATIONS:
            raise MemoryProfileError(f"a leak verdict needs {MIN_LEAK_ITERATIONS} iterations, "
                                     f"got {len(self._iterations)}")
        rss, blocks = (list(column) for column in zip(*self._iterations, strict=True))
        return _verdict(rss, blocks)

    def snapshot(self) -> tracemalloc.Snapshot:
        """A snapshot of the Python heap (starting tracemalloc, one frame, if it is off)."""
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self._traced = True
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, pattern) for pattern in HIDDEN_FRAMES])

    @staticmethod
    def top_allocators(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot,
                       limit: int = 10) -> list[Allocation]:
        """The source lines whose allocations changed most between two snapshots."""
        diffs = after.compare_to(before, "lineno")[:limit]
        return [Allocation(f"{d.traceback[0].filename}:{d.traceback[0].lineno}", d.size_diff,
                           d.size, d.count_diff, d.count) for d in diffs]

    def _report(self, sampler: _Sampler) -> MemoryReport:
        samples = sampler.samples
        rss = [s.rss for s in samples]
        kv = [s.kv for s in samples if s.kv is not None]
        leak = self.leak_verdict() if len(self._iterations) >= MIN_LEAK_ITERATIONS else None
        return MemoryReport(
            self.interval_s, time.perf_counter() - sampler.t0, samples,
            rss[0] if rss else 0, rss[-1] if rss else 0, max(rss, default=0),
            max(kv, default=None), self._recorder.stats if self._recorder else None,
            classify(rss, [s.t for s in samples], resolution=RSS_RESOLUTION), leak)


def profile_memory(interval_s: float = 0.5, kv_bytes: Callable[[], int] | None = None,
                   include_children: bool = True
                   ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: profile each call; the wrapper's `last_report` holds the latest report."""
    _check_interval(interval_s)

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            profiler = MemoryProfiler(interval_s, kv_bytes, include_children)
            try:
                with profiler:
                    return fn(*args, **kwargs)
            finally:
                wrapper.last_report = profiler.report  # type: ignore[attr-defined]

        wrapper.last_report = None  # type: ignore[attr-defined]
        return wrapper

    return decorate


def profile_command(argv: Sequence[str], interval_s: float = 0.5) -> MemoryReport:
    """Run `argv` and sample its process tree until it exits; the report has its return code."""
    _check_interval(interval_s)
    if not argv:
        raise MemoryProfileError("no command to profile")
    try:
        process = subprocess.Popen(list(argv))
    except OSError as exc:
        raise MemoryProfileError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
    profiler = MemoryProfiler(interval_s, pid=process.pid).start()
    try:
        returncode = process.wait()
    finally:
        if process.poll() is None:  # interrupted: do not leave the command running
            process.kill()
            process.wait()
        report = profiler.stop()
    return replace(report, returncode=returncode)


def find_leak(fn: Callable[[], object], iterations: int = 20, warmup: int = 2) -> LeakVerdict:
    """Run `fn` `warmup` times, then `iterations` times, each followed by a forced collection
    and an RSS reading; leaking when Mann-Kendall finds RSS increasing (p < 0.05) and the
    lower 95% bound of Sen's slope exceeds LEAK_THRESHOLD (64 KiB) per iteration.

    Objects alive before the first measured iteration are frozen (`gc.freeze`, unless
    something else froze objects already), so that each forced collection walks only what the
    iterations made: a full collection takes ~0.2 s once torch and transformers are imported.
    Frozen objects are still freed by reference counting; only their cycles wait for the
    unfreeze, and since they predate the iterations they cannot make RSS grow per iteration."""
    if iterations < MIN_LEAK_ITERATIONS:
        raise MemoryProfileError(f"iterations must be at least {MIN_LEAK_ITERATIONS}, "
                                 f"got {iterations}")
    if warmup < 0:
        raise MemoryProfileError(f"warmup must not be negative, got {warmup}")
    for _ in range(warmup):
        fn()
    gc.collect()
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    profiler = MemoryProfiler()
    try:
        for _ in range(iterations):
            fn()
            profiler.end_iteration()
    finally:
        if freeze:
            gc.unfreeze()
    return profiler.leak_verdict()
