"""Synthetic trace stores and result pairs with known answers, to check the analyzer.

`trace_set` writes a real trace store (events through an `EventBus` into a `TraceStore`) for a
`Scenario`: the share of each kind on the runs' critical path and the shape of the KV gauge.
The true shares are booked while the runs are laid out (every second of a run's critical path
goes to one kind), never read back through the analyzer. Scenarios:

- `balanced`: every kind below the bottleneck threshold (at most `BALANCED_MAX` of the critical
  path); five kinds summing to one, this takes some time lost to KV refusals (memory);
- `single`: one kind injected at a drawn share (0.15-0.8 in the benchmark, on both sides of
  the threshold), the others sharing the rest;
- `double`: two kinds above the threshold, at least `DOUBLE_GAP` apart, the others below;
- `kv_leak`: no KV refusals, a KV gauge that leaks (a linear climb or a step) by a drawn share
  of capacity, the time drawn as in `single` for another kind.

Noise in every scenario: agents running in parallel with the main one (off the critical path,
heavy in tools, model and queueing, some failing on a KV refusal), attempts rejected by an
overloaded engine (the scheduler's queue is full: time lost to admission, queue) and attempts
failing on a KV budget refusal (time lost to memory pressure), each retried; durations drawn at
random; event times jittered. KV gauges that do not leak: a sawtooth (requests come and go),
per-run climbs (each run's conversation grows and is released when it ends), or full (near
capacity, in stores with KV refusals).

`result_pair` writes two result files of five metrics with lognormal noise and rare outliers,
the candidate's one metric shifted by a factor in its worse direction (or none).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.bench.analyzer import Settings
from pyagent.bench.critical_path import KINDS
from pyagent.observe.events import Event, EventBus
from pyagent.observe.traces import TraceStore

INJECTED = ("model", "queue", "tools", "memory")
PAIRS = tuple(itertools.combinations(INJECTED, 2))
TOOLS = ("shell", "read_file", "write_file", "run_tests")
KV_REFUSAL = ("RequestError", "this request may need 4096 tokens of KV in the global layers "
              "(3584 prompt + 512 max_tokens, in blocks of 16), but the engine's KV budget "
              "there is 2048 tokens")
OVERLOADED = ("OverloadedError", "the engine is busy: 8 requests running and 64 waiting "
              "(max_queue 64)")
REFUSALS = {"kv": KV_REFUSAL, "busy": OVERLOADED}
LOST = {"kv": "memory", "busy": "queue"}  # where the time of an attempt that fails so goes
T0 = 1_700_000_000.0
KV_CAPACITY = 512 * 2**20
KV_NOISE = 0.01  # the gauge's measurement noise, share of capacity
GAUGES = ("sawtooth", "per-run", "full", "leak-linear", "leak-step")
THRESHOLD, GROWTH = Settings().bottleneck_share, Settings().memory_growth  # the defaults
BALANCED_MAX = 0.24
DOUBLE_GAP = 0.02
WEIGHTS = {"model": 3.0, "tools": 3.0, "queue": 1.0, "memory": 0.5, "other": 1.0}
BALANCED_WEIGHTS = {"model": 24.0, "tools": 24.0, "queue": 20.0, "memory": 12.0, "other": 20.0}
SMALL_DOSE = 0.03  # queue and memory below this are dropped (none at all)
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
class Scenario:
    """What to inject: each kind's target share of the critical path, the kinds injected
    (largest share first), the KV gauge's shape and, for a leak, its rise (share of capacity)."""

    name: str
    shares: dict[str, float]
    injected: tuple[str, ...] = ()
    gauge: str = "sawtooth"
    growth: float = 0.0


@dataclass(frozen=True)
class TraceSet:
    """A synthetic store, its scenario, the true share of each kind on the critical path, and
    the KV gauge's true growth (as the analyzer defines growth, from the gauge before noise)."""

    path: Path
    scenario: Scenario
    truth: dict[str, float]
    kv_growth: float

    @property
    def injected(self) -> str | None:
        return self.scenario.injected[0] if self.scenario.injected else None

    def bottlenecks(self, threshold: float = THRESHOLD, growth: float = GROWTH) -> list[str]:
        """The true answer: kinds at `threshold` of the critical path or more, largest first,
        and memory when the gauge leaks by `growth` of capacity or more."""
        kinds = sorted((k for k in KINDS if self.truth[k] >= threshold),
                       key=lambda k: -self.truth[k])
        leak = self.scenario.gauge.startswith("leak") and self.kv_growth >= growth
        return [*kinds, "memory"] if leak and "memory" not in kinds else kinds


# --- scenarios ---------------------------------------------------------------------------------

def _split(rng: np.random.Generator, kinds: Sequence[str], total: float, below: float,
           weights: dict[str, float] = WEIGHTS) -> dict[str, float]:
    """`total` split among `kinds` (Dirichlet on `weights`), queue and memory in doses of
    SMALL_DOSE or more (or none), each kind below `below`."""
    for _ in range(100_000):
        split = dict(zip(kinds, rng.dirichlet([weights[k] for k in kinds]), strict=True))
        for kind in ("queue", "memory"):
            if split.get(kind, 1.0) * total < SMALL_DOSE:
                split[kind] = 0.0
        norm = sum(split.values())
        split = {k: float(v / norm * total) for k, v in split.items()}
        if max(split.values()) < below:
            return split
    raise ValueError(f"cannot split {total:.2f} among {kinds} below {below:.2f}")


def _gauge(rng: np.random.Generator, shares: dict[str, float]) -> str:
    """A gauge that does not leak: full only where KV refusals happen."""
    return str(rng.choice(GAUGES[:3] if shares["memory"] > 0 else GAUGES[:2]))


def balanced(rng: np.random.Generator) -> Scenario:
    """No kind at the threshold: each at most BALANCED_MAX of the critical path."""
    shares = _split(rng, KINDS, 1.0, BALANCED_MAX + 1e-12, BALANCED_WEIGHTS)
    return Scenario("balanced", shares, (), _gauge(rng, shares))


def single(rng: np.random.Generator, kind: str, low: float = 0.15, high: float = 0.8,
           dominant: bool = False, others: Sequence[str] | None = None) -> Scenario:
    """`kind` at a share drawn from [low, high]; the other kinds (`others`, default all) share
    the rest, below 3/4 of it when `dominant`."""
    share = float(rng.uniform(low, high))
    rest = [k for k in (others or KINDS) if k != kind]
    shares = {kind: share, **_split(rng, rest, 1 - share, 0.75 * share if dominant else 1.0)}
    shares = {k: shares.get(k, 0.0) for k in KINDS}
    return Scenario("single", shares, (kind,), _gauge(rng, shares))


def double(rng: np.random.Generator, kinds: tuple[str, str]) -> Scenario:
    """Two kinds above the threshold (0.3-0.5, and 0.27 to DOUBLE_GAP less), in a random
    order; the others share the rest, each below 0.22."""
    first = float(rng.uniform(0.3, 0.5))
    second = float(rng.uniform(0.27, min(first - DOUBLE_GAP, 0.8 - first)))
    top, runner = (kinds if rng.random() < 0.5 else kinds[::-1])
    rest = [k for k in KINDS if k not in kinds]
    shares = {top: first, runner: second, **_split(rng, rest, 1 - first - second, 0.22)}
    return Scenario("double", shares, (top, runner), _gauge(rng, shares))


def kv_leak(rng: np.random.Generator, low: float = 0.05, high: float = 0.6) -> Scenario:
    """A KV gauge climbing (linearly or in a step) by a share of capacity drawn from
    [low, high], no KV refusals; the time as `single` gives it for model, queue or tools."""
    kind = str(rng.choice(["model", "queue", "tools"]))
    time = single(rng, kind, others=[k for k in KINDS if k != "memory"])
    gauge = str(rng.choice(GAUGES[3:]))
    return Scenario("kv_leak", time.shares, (), gauge, float(rng.uniform(low, high)))


# --- layout ------------------------------------------------------------------------------------

class _Run:
    """Lays out one run's spans back to back and books their seconds per kind."""

    def __init__(self, rng: np.random.Generator, start: float, scale: dict[str, float]):
        self.rng = rng
        self.t = start
        self.scale = scale
        self.truth: dict[str, float] = defaultdict(float)
        self.lost: str | None = None  # the kind an attempt that will fail loses its time to
        self.calls = 0  # the conversation grows by every call (a sequenced run)

    def wait(self, kind: str, raw: float) -> float:
        kind = self.lost or kind
        seconds = raw * self.scale[kind]
        self.truth[kind] += seconds
        self.t += seconds
        return seconds

    def gap(self) -> None:
        self.wait("other", self.rng.uniform(0.2, 1.0))

    def llm(self) -> SpanSpec:
        span = SpanSpec("llm_call", "chat m", self.t)
        queue = self.wait("queue", self.rng.uniform(0.2, 1.0))
        prefill = self.wait("model", self.rng.uniform(0.2, 1.0))
        decode = self.wait("model", self.rng.uniform(0.2, 1.0))
        prompt = self.prompt()
        span.end = self.t
        span.attributes = {"gen_ai.usage.input_tokens": prompt,
                           "gen_ai.usage.output_tokens": max(1, int(decode * 18)),
                           "pyagent.usage.cached_tokens": int(prompt * self.rng.uniform(0, 0.5)),
                           "pyagent.time_to_first_token_s": queue + prefill}
        if queue > 0:
            span.attributes["pyagent.queue_s"] = queue
        return span

    def prompt(self) -> int:
        self.calls += 1
        return 50 + 350 * self.calls + int(self.rng.integers(0, 50))

    def refused(self, error: tuple[str, str]) -> SpanSpec:
        """A call the engine refuses at once (KV budget, or its queue full)."""
        span = SpanSpec("llm_call", "chat m", self.t,
                        attributes={"gen_ai.usage.input_tokens": self.prompt()}, error=error)
        self.wait("other", self.rng.uniform(0.02, 0.1))
        span.end = self.t
        return span

    def tool(self) -> SpanSpec:
        name = str(self.rng.choice(TOOLS))
        span = SpanSpec("tool_call", f"execute_tool {name}", self.t,
                        attributes={"gen_ai.tool.name": name,
                                    "pyagent.tool.output_chars": int(self.rng.integers(100, 3000))})
        self.wait("tools", self.rng.uniform(0.2, 1.0))
        span.end = self.t
        return span

    def agent(self, attempt: int, outcome: str) -> SpanSpec:
        """An agent attempt: tool rounds then an answer ("ok"), or a refusal ending it ("kv"
        after its rounds, as the prompt outgrows the budget; "busy" at once or after a round);
        all the time of a failed attempt is lost (to memory, or to admission)."""
        self.lost = LOST.get(outcome)
        span = SpanSpec("agent", "invoke_agent coder", self.t,
                        attributes={"pyagent.attempt": attempt})
        rounds = int(self.rng.integers(0, 2) if outcome == "busy" else self.rng.integers(2, 5))
        for _ in range(rounds):
            span.children += [self.llm(), self.tool()]
            self.gap()
        error = REFUSALS.get(outcome)
        span.children.append(self.refused(error) if error else self.llm())
        span.end, span.error = self.t, error
        self.lost = None
        return span

    def parallel(self, within: SpanSpec) -> SpanSpec:
        """A helper agent inside `within`'s time (off the critical path), heavy in tools,
        queueing and model; one in three fails on a KV refusal."""
        length = within.end - within.start
        start = within.start + length * self.rng.uniform(0.0, 0.2)
        end = within.start + length * self.rng.uniform(0.7, 0.95)
        cut = np.sort(self.rng.uniform(start, end, 5))
        error = KV_REFUSAL if self.rng.random() < 1 / 3 else None
        call = SpanSpec("llm_call", "chat m", cut[2], cut[4],
                        {"pyagent.time_to_first_token_s": (cut[3] - cut[2]),
                         "pyagent.queue_s": (cut[3] - cut[2]) / 2}, error)
        return SpanSpec("agent", "invoke_agent helper", start, end, error=error, children=[
            SpanSpec("tool_call", "execute_tool shell", cut[0], cut[2],
                     {"gen_ai.tool.name": "shell"}), call])


def _plan_run(rng: np.random.Generator, start: float, shares: dict[str, float],
              wall: float) -> tuple[SpanSpec, dict[str, float]]:
    """One run whose kinds take `shares` of about `wall` seconds: laid out once with unit
    weights to learn each kind's raw total, then again with scales that hit the shares.
    Attempts failing on a KV refusal come only where memory has a share, attempts rejected by
    an overloaded engine only where queueing has one."""
    seed = int(rng.integers(0, 2**31))
    steps = int(rng.integers(2, 5))
    outcomes = []
    kv = set(rng.choice(steps, size=min(steps, 2), replace=False)) if shares["memory"] else set()
    for index in range(steps):
        busy = bool(shares["queue"] > 0 and rng.random() < 0.25)
        outcomes.append(["busy"] * busy + ["kv"] * (index in kv) + ["ok"])
    unit = dict.fromkeys(KINDS, 1.0)
    raw = _layout(np.random.default_rng(seed), start, outcomes, unit)[1]
    scale = {k: (shares[k] * wall / raw[k] if raw.get(k) else 0.0) for k in KINDS}
    return _layout(np.random.default_rng(seed), start, outcomes, scale)


def _layout(rng: np.random.Generator, start: float, outcomes: list[list[str]],
            scale: dict[str, float]) -> tuple[SpanSpec, dict[str, float]]:
    run = _Run(rng, start, scale)
    root = SpanSpec("run", "run synthetic", start, attributes={"pyagent.mode": "sequenced"})
    for index, attempts in enumerate(outcomes):
        run.gap()
        step = SpanSpec("step", f"step s{index}", run.t)
        run.gap()
        for attempt, outcome in enumerate(attempts, 1):
            agent = run.agent(attempt, outcome)
            step.children.append(agent)
            if outcome == "ok" and rng.random() < 0.5:
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


def trace_set(path: Path, scenario: Scenario | str, seed: int, runs: int = 2,
              jitter_s: float = 0.0) -> TraceSet:
    """Write a trace store of `runs` runs for `scenario` (a kind's name: that kind injected as
    the clear bottleneck, 40-70% with the others below 3/4 of it); each event's time is off by
    normal noise of `jitter_s` seconds (clocks read a little apart)."""
    rng = np.random.default_rng(seed)
    if isinstance(scenario, str):
        scenario = single(rng, scenario, 0.4, 0.7, dominant=True)

    def jitter() -> float:
        return float(rng.normal(0.0, jitter_s)) if jitter_s else 0.0

    truth: dict[str, float] = defaultdict(float)
    windows = []
    bus = EventBus()
    with TraceStore(path) as store:
        store.attach(bus)
        t = T0
        for index in range(runs):
            root, seconds = _plan_run(rng, t, scenario.shares, rng.uniform(20, 60))
            publish(bus, f"run-{index}", root, None, jitter)
            for kind, value in seconds.items():
                truth[kind] += value
            windows.append((root.start, root.end))
            t = root.end + rng.uniform(1, 5)
        growth = _kv_samples(store, rng, scenario, windows)
    total = sum(truth.values())
    return TraceSet(path, scenario, {k: truth.get(k, 0.0) / total for k in KINDS}, growth)


def kv_level(rng: np.random.Generator, scenario: Scenario, times: np.ndarray,
             windows: list[tuple[float, float]]) -> np.ndarray:
    """The KV gauge before noise, share of capacity, at `times` (see the module's doc)."""
    start, end = windows[0][0], windows[-1][1]
    where = (times - start) / (end - start)
    if scenario.gauge == "sawtooth":
        period = rng.uniform(10, 25)
        return 0.2 + rng.uniform(0.2, 0.4) * ((times - start) % period) / period
    if scenario.gauge == "per-run":
        level = np.full(times.size, rng.uniform(0.1, 0.2))
        for lo, hi in windows:
            inside = (times >= lo) & (times < hi)
            level[inside] += rng.uniform(0.3, 0.5) * (times[inside] - lo) / (hi - lo)
        return level
    if scenario.gauge == "full":
        return rng.uniform(0.85, 0.95) + rng.normal(0, 0.03, times.size)
    base = rng.uniform(0.1, 0.3)
    if scenario.gauge == "leak-linear":
        return base + scenario.growth * where
    return base + scenario.growth * (where >= rng.uniform(0.3, 0.7))  # leak-step


def _kv_samples(store: TraceStore, rng: np.random.Generator, scenario: Scenario,
                windows: list[tuple[float, float]]) -> float:
    """A KV gauge every second within the runs' time; returns its true growth: the median of
    the last fifth of the level before noise less that of the first fifth."""
    times = np.arange(windows[0][0] + 0.5, windows[-1][1], 1.0)
    clean = np.clip(kv_level(rng, scenario, times, windows), 0, 1)
    fifth = max(1, times.size // 5)
    growth = float(np.median(clean[-fifth:]) - np.median(clean[:fifth]))
    level = np.clip(clean + rng.normal(0, KV_NOISE, times.size), 0, 1)
    for t, value in zip(times, level, strict=True):
        store.record_samples("synthetic:1", float(t),
                             [("pyagent_kv_bytes", {"model": "m"}, float(value * KV_CAPACITY)),
                              ("pyagent_kv_capacity_bytes", {"model": "m"}, KV_CAPACITY)])
    return growth


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
