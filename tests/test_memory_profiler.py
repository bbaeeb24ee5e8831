"""The memory profiler on real allocations: sampling, GC pauses, top allocators, commands and
leak verdicts on stable, sawtooth and leaking workloads."""

from __future__ import annotations

import gc
import json
import mmap
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

from pyagent.bench.memory import (
    LEAK_THRESHOLD,
    MIN_LEAK_ITERATIONS,
    MemoryProfileError,
    MemoryProfiler,
    find_leak,
    profile_command,
    profile_memory,
)

MIB = 1 << 20
FAST = 0.02  # sampling interval for tests


def resident(size: int) -> mmap.mmap:
    """`size` bytes that are really resident, in fresh pages of their own: an anonymous mapping
    with every page written, unmapped when dropped (heap memory could reuse pages that an earlier
    test freed but the allocator kept, and then RSS would not move)."""
    pages = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        pages[offset] = 1
    return pages


def test_a_leak_of_1_mib_per_iteration_is_found_within_20_iterations():
    kept: list[bytes] = []
    verdict = find_leak(lambda: kept.append(resident(MIB)), iterations=20)
    assert verdict.leaking, verdict.reason
    assert verdict.low <= MIB * 1.1 and verdict.high >= MIB * 0.9
    assert verdict.bytes_per_iteration == pytest.approx(MIB, rel=0.1)
    assert verdict.p_value < 0.05 and verdict.detected_at is not None
    assert verdict.detected_at <= 20 and verdict.pattern.kind == "linear"
    assert len(verdict.rss) == 20 and len(kept) == 22  # two warm-up iterations
    assert gc.get_freeze_count() == 0  # the heap frozen for the iterations is thawed


def test_a_leak_is_flagged_at_the_fewest_iterations_allowed():
    kept: list[mmap.mmap] = []
    verdict = find_leak(lambda: kept.append(resident(MIB)), iterations=MIN_LEAK_ITERATIONS)
    assert MIN_LEAK_ITERATIONS == 5
    assert verdict.leaking and verdict.detected_at == MIN_LEAK_ITERATIONS, verdict.reason
    with MemoryProfiler(FAST) as prof:
        for _ in range(MIN_LEAK_ITERATIONS - 1):
            kept.append(resident(MIB))
            prof.end_iteration()
    assert prof.report.leak is None  # too few iterations for a verdict
    with pytest.raises(MemoryProfileError, match="a leak verdict needs 5 iterations, got 4"):
        prof.leak_verdict()


def test_importing_the_profiler_leaves_scipy_and_statsmodels_unloaded():
    code = ("import sys, pyagent.bench.memory; "
            "print(sorted(m for m in ('scipy', 'statsmodels') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert run.stdout.strip() == "[]"


def test_a_stable_workload_is_not_leaking():
    def work() -> None:
        data = [{"i": i, "s": str(i)} for i in range(50_000)]
        del data

    verdict = find_leak(work)
    assert not verdict.leaking, verdict.reason
    assert verdict.low <= LEAK_THRESHOLD


def test_a_sawtooth_workload_is_not_leaking():
    held: list[bytes] = []

    def work() -> None:
        held.append(resident(2 * MIB))
        if len(held) == 4:
            held.clear()

    verdict = find_leak(work)
    assert not verdict.leaking, verdict.reason
    assert max(verdict.rss) - min(verdict.rss) >= 4 * MIB  # it did rise and fall


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 4}, "iterations must be at least 5, got 4"),
    ({"warmup": -1}, "warmup must not be negative, got -1"),
])
def test_find_leak_rejects_bad_counts(kwargs, message):
    with pytest.raises(MemoryProfileError, match=message):
        find_leak(lambda: None, **kwargs)


@pytest.mark.parametrize("interval", [0, -0.5])
def test_interval_must_be_positive(interval):
    with pytest.raises(MemoryProfileError, match=f"interval_s must be positive, got {interval}"):
        MemoryProfiler(interval_s=interval)
    with pytest.raises(MemoryProfileError, match="interval_s"):
        profile_command([sys.executable, "-c", "pass"], interval_s=interval)


def test_profiler_samples_rss_and_kv_bytes():
    kv = iter(range(10**6))
    with MemoryProfiler(FAST, kv_bytes=lambda: next(kv) * 1024) as prof:
        block = resident(64 * MIB)
        time.sleep(0.3)
        del block
        time.sleep(0.1)
    report = prof.report
    assert report is not None and len(report.samples) >= 10
    assert report.peak_rss - report.start_rss >= 60 * MIB
    assert report.peak_rss - report.end_rss >= 60 * MIB  # freed again
    kvs = [s.kv for s in report.samples]
    assert kvs == sorted(kvs) and report.peak_kv == kvs[-1]
    times = [s.t for s in report.samples]
    assert times == sorted(times) and report.duration_s >= times[-1]
    json.dumps(report.to_dict())


def test_gc_pauses_are_recorded_per_generation_and_the_hook_removed():
    before = list(gc.callbacks)
    with MemoryProfiler(FAST) as prof:
        assert len(gc.callbacks) == len(before) + 1
        for _ in range(3):
            cycles = [[] for _ in range(1000)]
            for c in cycles:
                c.append(c)
            del cycles, c
            gc.collect()
    stats = prof.report.gc
    assert stats.counts[2] >= 3 and stats.collected[2] >= 3000
    assert [len(p) for p in stats.pauses_s] == stats.counts
    assert all(p > 0 for p in stats.pauses_s[2])
    assert gc.callbacks == before


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "memory-profiler"]


def test_the_sampler_stops_with_its_profiler_and_never_outlives_it():
    callbacks = list(gc.callbacks)
    prof = MemoryProfiler(FAST).start()
    assert prof.running and len(sampler_threads()) == 1
    prof.stop()
    assert not prof.running and sampler_threads() == []

    MemoryProfiler(FAST).start()  # dropped while running
    gc.collect()
    deadline = time.monotonic() + 2
    while sampler_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sampler_threads() == [] and gc.callbacks == callbacks


def test_start_and_stop_are_checked():
    prof = MemoryProfiler(FAST)
    with pytest.raises(MemoryProfileError, match="not running"):
        prof.stop()
    with prof, pytest.raises(MemoryProfileError, match="already running"):
        prof.start()


def test_a_failing_kv_callable_is_reported():
    def broken() -> int:
        raise RuntimeError("cache gone")

    with pytest.raises(MemoryProfileError, match="kv_bytes\\(\\) failed: .*cache gone"):
        MemoryProfiler(FAST, kv_bytes=broken).start()
    calls = iter(range(3))
    prof = MemoryProfiler(FAST, kv_bytes=lambda: 100 // (2 - next(calls))).start()
    time.sleep(0.2)
    with pytest.raises(MemoryProfileError, match="ZeroDivisionError"):
        prof.stop()
    assert sampler_threads() == []


def test_top_allocators_point_at_the_allocating_line():
    assert not tracemalloc.is_tracing()
    with MemoryProfiler(FAST) as prof:
        before = prof.snapshot()
        assert tracemalloc.is_tracing()
        strings = [str(i) * 10 for i in range(20_000)]  # the allocating line
        after = prof.snapshot()
        top = prof.top_allocators(before, after, limit=3)
    assert not tracemalloc.is_tracing()
    assert top[0].where.startswith(__file__) and top[0].count_diff >= 20_000
    assert top[0].size_diff >= 20_000 * 50 and len(top) <= 3
    del strings


def test_the_decorator_returns_the_value_and_keeps_the_report():
    @profile_memory(interval_s=FAST)
    def build(n: int) -> int:
        data = resident(n * MIB)
        time.sleep(0.1)
        return len(data)

    assert build.last_report is None
    assert build(32) == 32 * MIB
    assert build.last_report.peak_rss - build.last_report.start_rss >= 30 * MIB

    @profile_memory(interval_s=FAST)
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fail()
    assert fail.last_report is not None


def test_iterations_marked_in_a_profile_give_a_leak_verdict():
    kept = []
    with MemoryProfiler(FAST) as prof:
        for _ in range(6):
            kept.append(resident(MIB))
            prof.end_iteration()
    assert prof.report.leak is not None and prof.report.leak.leaking
    json.dumps(prof.report.to_dict())
    with MemoryProfiler(FAST) as prof:
        prof.end_iteration()
    assert prof.report.leak is None


CHILD = "import os, time; x = os.urandom(80 << 20); time.sleep(0.4); raise SystemExit(3)"


def test_profile_command_samples_the_command_until_it_exits():
    report = profile_command([sys.executable, "-c", CHILD], interval_s=FAST)
    assert report.returncode == 3 and report.gc is None
    assert report.peak_rss >= 80 * MIB
    assert report.samples[-1].t >= 0.3


def test_profile_command_includes_grandchildren():
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {CHILD!r}])"
    report = profile_command([sys.executable, "-c", parent], interval_s=FAST)
    assert report.returncode == 0
    assert report.peak_rss >= 80 * MIB + 5 * MIB  # the grandchild plus its parent


def test_a_missing_command_is_named():
    with pytest.raises(MemoryProfileError, match="cannot run 'no-such-command-xyz'"):
        profile_command(["no-such-command-xyz", "--flag"])
    with pytest.raises(MemoryProfileError, match="no command"):
        profile_command([])


SAWTOOTH = ("import time\n"
            "for cycle in range(4):\n"
            "    held = []\n"
            "    for block in range(4):\n"
            "        held.append(b'x' * (16 << 20))\n"
            "        time.sleep(0.15)\n"
            "    del held\n"
            "    time.sleep(0.15)\n")


def test_bench_memory_names_a_command_s_sawtooth():
    run = subprocess.run([sys.executable, "-m", "pyagent", "bench", "memory", "--interval",
                          "0.05", "--", sys.executable, "-c", SAWTOOTH],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "growth pattern sawtooth" in run.stdout, run.stdout
