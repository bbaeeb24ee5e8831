"""Synthetic trace stores and result pairs with known answers, to check the analyzer.

`trace_set` writes a real trace store (events through an `EventBus` into a `TraceStore`) whose
runs spend a known share of their critical path on each kind: one injected kind takes 40-70%,
the others share the rest at no more than 3/4 of it. Distractors: agents running in parallel
with the main one (off the critical path, heavy in another kind), KV refusals and queueing
in small doses, a sawtooth KV gauge. Memory pressure is injected as agent attempts that fail
on a KV refusal and are retried, and a KV gauge climbing to capacity.

`result_pair` writes two result files of five metrics with lognormal noise and rare outliers,
the candidate's one metric shifted by a factor in its worse direction (or none).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.bench.critical_path import KINDS
from pyagent.observe.events import Event, EventBus
from pyagent.observe.traces import TraceStore

INJECTED = ("model", "queue", "tools", "memory")
TOOLS = ("shell", "read_file", "write_file", "run_tests")
REFUSALS = (("RequestError", "the request needs 4096 tokens of KV, but the engine's KV budget "
                             "there is 2048 tokens"),
            ("OverloadedError", "the engine is busy: 8 requests running and 64 waiting"))
T0 = 1_700_000_000.0
KV_CAPACITY = 512 * 2**20
# name -> (which way is better, typical value)
METRICS = {"latency_s": ("lower", 1.2), "ttft_s": ("lower", 0.08),
           "decode_tok_s": ("higher", 18.0), "peak_rss_bytes": ("lower", 1.9e9),
           "accuracy": ("higher", 0.7)}


@dataclass
class SpanSpec:
    """A span to write: its times, attributes, error (type, message) and children."""

    kind: str
    name: str
    start: float
    end: float = 0.0
    attributes: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    children: list[SpanSpec] = field(default_factory=list)


@dataclass(frozen=True)
class TraceSet:
    """A synthetic store, the kind injected, and the true share of each kind."""

    path: Path
    injected: str
    truth: dict[str, float]


class _Run:
    """Lays out one run's spans back to back and books their seconds per kind."""

    def __init__(self, rng: np.random.Generator, start: float, scale: dict[str, float]):
        self.rng = rng
        self.t = start
        self.scale = scale
        self.truth: dict[str, float] = defaultdict(float)
        self.lost = False
        self.calls = 0  # the conversation grows by every call (a sequenced run)

    def wait(self, kind: str, raw: float) -> float:
        seconds = raw * self.scale["memory" if self.lost else kind]
        self.truth["memory" if self.lost else kind] += seconds
        self.t += seconds
        return seconds

    def gap(self) -> None:
        self.wait("other", self.rng.uniform(0.2, 1.0))

    def llm(self, fail: tuple[str, str] | None = None) -> SpanSpec:
        span = SpanSpec("llm_call", "chat m", self.t)
        queue = self.wait("queue", self.rng.uniform(0.2, 1.0))
        prefill = self.wait("model", self.rng.uniform(0.2, 1.0))
        decode = self.wait("model", self.rng.uniform(0.2, 1.0))
        prompt = 400 + 350 * self.calls + int(self.rng.integers(0, 50))
        self.calls += 1
        span.end, span.error = self.t, fail
        span.attributes = {"gen_ai.usage.input_tokens": prompt,
                           "gen_ai.usage.output_tokens": max(1, int(decode * 18)),
                           "pyagent.usage.cached_tokens": int(prompt * self.rng.uniform(0, 0.5)),
                           "pyagent.time_to_first_token_s": queue + prefill}
        if queue > 0:
            span.attributes["pyagent.queue_s"] = queue
        return span

    def tool(self) -> SpanSpec:
        name = str(self.rng.choice(TOOLS))
        span = SpanSpec("tool_call", f"execute_tool {name}", self.t,
                     attributes={"gen_ai.tool.name": name,
                                 "pyagent.tool.output_chars": int(self.rng.integers(100, 3000))})
        self.wait("tools", self.rng.uniform(0.2, 1.0))
        span.end = self.t
        return span

    def agent(self, attempt: int, fail: bool) -> SpanSpec:
        """An agent turn: tool rounds then an answer, or a refusal ending a failed attempt."""
        self.lost = fail
        span = SpanSpec("agent", "invoke_agent coder", self.t,
                        attributes={"pyagent.attempt": attempt})
        rounds = int(self.rng.integers(2, 5))
        for _ in range(rounds):
            span.children += [self.llm(), self.tool()]
            self.gap()
        refusal = REFUSALS[int(self.rng.integers(0, 2))] if fail else None
        span.children.append(self.llm(refusal))
        span.end, span.error = self.t, refusal
        self.lost = False
        return span

    def parallel(self, within: SpanSpec) -> SpanSpec:
        """An agent inside `within`'s time, heavy in tools and model (off the critical path)."""
        length = within.end - within.start
        start = within.start + length * self.rng.uniform(0.0, 0.2)
        end = within.start + length * self.rng.uniform(0.7, 0.95)
        span = SpanSpec("agent", "invoke_agent helper", start, end)
        cut = np.sort(self.rng.uniform(start, end, 5))
        span.children = [SpanSpec("tool_call", "execute_tool shell", cut[0], cut[2],
                               {"gen_ai.tool.name": "shell"}),
                         SpanSpec("llm_call", "chat m", cut[2], cut[4],
                               {"pyagent.time_to_first_token_s": (cut[3] - cut[2]),
                                "pyagent.queue_s": (cut[3] - cut[2]) / 2})]
        return span


def _shares(rng: np.random.Generator, injected: str) -> dict[str, float]:
    """The injected kind 40-70%; the others split the rest, none above 3/4 of it."""
    top = rng.uniform(0.4, 0.7)
    rest = [k for k in KINDS if k != injected]
    weights = {"model": 3.0, "tools": 3.0, "queue": 1.0, "memory": 0.5, "other": 1.0}
    while True:
        split = rng.dirichlet([weights[k] for k in rest]) * (1 - top)
        shares = {injected: top, **dict(zip(rest, split, strict=True))}
        for kind in ("queue", "memory"):  # small doses only, or none
            if kind != injected and shares[kind] < 0.03:
                shares[kind] = 0.0
        if max(shares[k] for k in rest) <= 0.75 * top:
            total = sum(shares.values())
            return {k: v / total for k, v in shares.items()}


def _plan_run(rng: np.random.Generator, start: float, shares: dict[str, float],
              wall: float) -> tuple[SpanSpec, dict[str, float]]:
    """One run whose kinds take `shares` of about `wall` seconds: laid out once with unit
    weights to learn each kind's raw total, then again with scales that hit the shares."""
    seed = int(rng.integers(0, 2**31))
    steps = int(rng.integers(2, 5))
    failing = set(rng.choice(steps, size=min(steps, 2), replace=False)) \
        if shares["memory"] > 0 else set()
    unit = dict.fromkeys(KINDS, 1.0)
    raw = _layout(np.random.default_rng(seed), start, steps, failing, unit)[1]
    scale = {k: (shares[k] * wall / raw[k] if raw.get(k) else 0.0) for k in KINDS}
    return _layout(np.random.default_rng(seed), start, steps, failing, scale)


def _layout(rng: np.random.Generator, start: float, steps: int, failing: set[int],
            scale: dict[str, float]) -> tuple[SpanSpec, dict[str, float]]:
    run = _Run(rng, start, scale)
    root = SpanSpec("run", "run synthetic", start, attributes={"pyagent.mode": "sequenced"})
    for index in range(steps):
        run.gap()
        step = SpanSpec("step", f"step s{index}", run.t)
        run.gap()
        attempts = [True, False] if index in failing else [False]
        for attempt, fail in enumerate(attempts, 1):
            agent = run.agent(attempt, fail)
            step.children.append(agent)
            if not fail and rng.random() < 0.5:
                step.children.append(run.parallel(agent))
        run.gap()
        step.end = run.t
        root.children.append(step)
    run.gap()
    root.end = run.t
    return root, dict(run.truth)


def publish(bus: EventBus, run_id: str, span: SpanSpec, parent: str | None = None,
            jitter: Callable[[], float] = lambda: 0.0) -> None:
    """Publish `span` and its children as the events a live run would (start, children, end
    or error), at the span's own times plus `jitter()` seconds each."""
    span_id = uuid.uuid4().hex[:16]
    start, end = span.start + jitter(), span.end + jitter()
    bus.publish(Event(span.kind, "start", span.name, run_id, span_id, parent,  # type: ignore[arg-type]
                      start, {}))
    for child in span.children:
        publish(bus, run_id, child, span_id, jitter)
    attributes = {**span.attributes, "duration_s": end - start}
    if span.error:
        attributes["error.type"], attributes["exception.message"] = span.error
    bus.publish(Event(span.kind, "error" if span.error else "end",  # type: ignore[arg-type]
                      span.name, run_id, span_id, parent, end, attributes))


def trace_set(path: Path, injected: str, seed: int, runs: int = 2,
              jitter_s: float = 0.0) -> TraceSet:
    """Write a trace store of `runs` runs with `injected` as the known bottleneck; each event's
    time is off by normal noise of `jitter_s` seconds (clocks read a little apart)."""
    rng = np.random.default_rng(seed)

    def jitter() -> float:
        return float(rng.normal(0.0, jitter_s)) if jitter_s else 0.0

    shares = _shares(rng, injected)
    truth: dict[str, float] = defaultdict(float)
    bus = EventBus()
    with TraceStore(path) as store:
        store.attach(bus)
        t = T0
        for index in range(runs):
            root, seconds = _plan_run(rng, t, shares, rng.uniform(20, 60))
            publish(bus, f"run-{index}", root, None, jitter)
            for kind, value in seconds.items():
                truth[kind] += value
            t = root.end + rng.uniform(1, 5)
        _kv_samples(store, rng, injected == "memory", T0, t)
    total = sum(truth.values())
    return TraceSet(path, injected, {k: truth.get(k, 0.0) / total for k in KINDS})


def _kv_samples(store: TraceStore, rng: np.random.Generator, climbing: bool, start: float,
                end: float) -> None:
    """A KV gauge every second: climbing to capacity, or a sawtooth (requests come and go)."""
    times = np.arange(start, end, 1.0)
    if climbing:
        level = np.linspace(0.3, 1.0, times.size)
    else:
        level = 0.2 + 0.4 * ((times - start) % 17.0) / 17.0
    level = np.clip(level + rng.normal(0, 0.01, times.size), 0, 1)
    for t, value in zip(times, level, strict=True):
        store.record_samples("synthetic:1", float(t),
                             [("pyagent_kv_bytes", {"model": "m"}, float(value * KV_CAPACITY)),
                              ("pyagent_kv_capacity_bytes", {"model": "m"}, KV_CAPACITY)])


def samples(rng: np.random.Generator, typical: float, n: int, sigma: float,
            outliers: float = 0.03) -> np.ndarray:
    """`n` lognormal samples around `typical`, a share `outliers` of them 2-4x off."""
    values = typical * rng.lognormal(0.0, sigma, n)
    hit = rng.random(n) < outliers
    return np.where(hit, values * rng.uniform(2, 4, n), values)


def result_pair(folder: Path, seed: int, n: int, shift: tuple[str, float] | None = None,
                ) -> tuple[Path, Path]:
    """Baseline and candidate result files, `n` samples a metric a side; `shift` = (metric,
    factor) makes that metric worse by `factor` in the candidate."""
    rng = np.random.default_rng(seed)
    sides = []
    for side in ("baseline", "candidate"):
        data: dict[str, Any] = {"meta": {"seed": seed, "side": side}}
        for name, (better, typical) in METRICS.items():
            factor = shift[1] if shift and shift[0] == name and side == "candidate" else 1.0
            center = typical * factor if better == "lower" else typical / factor
            sigma = 0.03 + 0.2 * ((seed * 7 + len(name)) % 10) / 10
            data[name] = samples(rng, center, n, sigma).tolist()
        path = folder / f"{seed}-{side}.json"
        path.write_text(json.dumps(data))
        sides.append(path)
    return sides[0], sides[1]
