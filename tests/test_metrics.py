"""The metric aggregator: types, labels, quantiles, windows, threads, exposition, event feed."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyagent.errors import PyAgentError
from pyagent.observe.events import EventBus
from pyagent.observe.metrics import (
    OVERFLOW,
    MetricError,
    MetricsFeed,
    MetricSource,
    MetricsRegistry,
    Rate,
    Sketch,
    to_json,
    to_prometheus,
)
from pyagent.observe.metrics.sketch import BatchMapping

ALPHA = 0.01
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> MetricsRegistry:
    return MetricsRegistry(clock=clock)


def within_alpha(estimate: float | None, exact: float) -> bool:
    return estimate is not None and abs(estimate - exact) <= ALPHA * abs(exact) + 1e-12


# --- metric types ------------------------------------------------------------------------------

def test_counter_counts_up_and_refuses_to_go_down(registry: MetricsRegistry) -> None:
    calls = registry.counter("calls_total", "Calls.")
    calls.inc()
    calls.inc(2)
    calls.inc(0.5)
    with pytest.raises(MetricError, match=r"calls_total.*-1"):
        calls.inc(-1)
    assert registry.query("calls_total", "value") == 3.5
    assert isinstance(registry, MetricSource)


def test_gauge_sets_and_moves_and_adds_up_across_series(registry: MetricsRegistry) -> None:
    queue = registry.gauge("queue_depth", "Queued requests.", ("agent",))
    queue.labels(agent="coder").set(5)
    queue.labels(agent="coder").inc(2)
    queue.labels(agent="coder").dec(4)
    queue.labels(agent="tester").set(-1.5)
    assert registry.query("queue_depth", "value", {"agent": "coder"}) == 3
    assert registry.query("queue_depth", "value") == 1.5
    with pytest.raises(MetricError, match="does not apply to gauge 'queue_depth'"):
        registry.query("queue_depth", "p99")


def test_histogram_statistics_match_numpy(registry: MetricsRegistry) -> None:
    values = np.random.default_rng(3).lognormal(0, 1, 3000)
    latency = registry.histogram("latency_seconds", "Latency.")
    for value in values:
        latency.observe(float(value))
    assert registry.query("latency_seconds", "count") == 3000
    assert registry.query("latency_seconds", "sum") == pytest.approx(values.sum())
    assert registry.query("latency_seconds", "mean") == pytest.approx(values.mean())
    assert registry.query("latency_seconds", "min") == values.min()
    assert registry.query("latency_seconds", "max") == values.max()
    assert registry.query("latency_seconds", "stddev") == pytest.approx(values.std())
    assert within_alpha(registry.query("latency_seconds", "p50"),
                        np.quantile(values, 0.5, method="lower"))
    with pytest.raises(MetricError, match="does not apply to histogram"):
        registry.query("latency_seconds", "value")


def test_timer_times_blocks_and_functions_sync_and_async(registry: MetricsRegistry,
                                                         clock: Clock) -> None:
    timer = registry.timer("step_seconds", "Step duration.", ("step",))
    child = timer.labels(step="plan")
    with child.time():
        clock.advance(1.5)

    @child.time()
    def work() -> str:
        clock.advance(0.25)
        return "done"

    @child.time()
    async def awork() -> str:
        await asyncio.sleep(0)
        clock.advance(4.0)
        return "async done"

    assert work() == "done"
    assert asyncio.run(awork()) == "async done"
    with pytest.raises(ValueError), child.time():
        clock.advance(2.0)
        raise ValueError("failures are timed too")
    assert registry.query("step_seconds", "count") == 4
    assert registry.query("step_seconds", "sum") == 7.75
    assert registry.query("step_seconds", "min") == 0.25
    assert registry.query("step_seconds", "max") == 4.0


def test_rate_over_a_window_and_as_a_view(registry: MetricsRegistry, clock: Clock) -> None:
    requests = registry.counter("requests_total", "Requests.")
    requests.inc(10)  # at t = 1000, bucket [1000, 1010)
    clock.advance(100)
    requests.inc(30)  # at t = 1100
    clock.advance(5)
    # The last 60 s cover the buckets from [1040, 1050) on: 30 requests over 65 s.
    assert registry.query("requests_total", "rate", window_s=60) == pytest.approx(30 / 65)
    assert registry.query("requests_total", "value", window_s=60) == 30
    assert registry.query("requests_total", "rate") == pytest.approx(40 / 105)
    view = Rate(requests.labels(), window_s=60)
    assert view.per_second() == pytest.approx(30 / 65)
    latency = registry.histogram("latency_seconds")  # declared at t = 1105
    for _ in range(12):
        latency.observe(0.1)
    clock.advance(4)  # the window reaches back before the declaration: 12 in 4 s
    assert registry.query("latency_seconds", "rate", window_s=10) == 3
    with pytest.raises(MetricError, match="window_s"):
        Rate(requests.labels(), window_s=3600)


# --- labels --------------------------------------------------------------------------------------

def test_labels_are_cached_and_checked(registry: MetricsRegistry) -> None:
    calls = registry.counter("llm_calls_total", "Calls.", ("agent", "model"))
    child = calls.labels(agent="coder", model="gemma")
    assert calls.labels(model="gemma", agent="coder") is child
    with pytest.raises(MetricError, match=r"llm_calls_total.*needs the label\(s\) model"):
        calls.labels(agent="coder")
    with pytest.raises(MetricError, match=r"llm_calls_total.*has no label\(s\) colour"):
        calls.labels(agent="coder", model="gemma", colour="red")
    with pytest.raises(MetricError, match=r"has no label\(s\) colour"):
        registry.query("llm_calls_total", "value", {"colour": "red"})
    with pytest.raises(MetricError, match="record through .labels"):
        calls.inc()
    assert registry.query("llm_calls_total", "value", {"agent": "tester"}) is None
    assert registry.query("no_such_metric", "value") is None


def test_declarations_must_agree(registry: MetricsRegistry) -> None:
    first = registry.counter("tokens_total", "Tokens.", ("kind",))
    assert registry.counter("tokens_total", "Tokens.", ("kind",)) is first
    with pytest.raises(MetricError, match="'tokens_total' is already declared as a counter"):
        registry.histogram("tokens_total", "Tokens.", ("kind",))
    with pytest.raises(MetricError, match="'tokens_total' is already declared"):
        registry.counter("tokens_total", "Tokens.", ("kind", "agent"))
    for name, labels in (("bad name", ()), ("ok_name", ("__reserved",)), ("ok", ("a", "a")),
                         ("ok_too", (OVERFLOW,))):
        with pytest.raises(MetricError, match=name):
            registry.gauge(name, "", labels)
    with pytest.raises(MetricError, match="quantile"):
        registry.histogram("h_seconds", "", ("quantile",))
    with pytest.raises(PyAgentError, match="unknown statistic 'p999x'"):
        registry.query("tokens_total", "p999x")
    for settings in ({"bucket_s": 0}, {"bucket_s": 60, "max_window_s": 30},
                     {"relative_accuracy": 1.0}, {"max_label_sets": 0}):
        with pytest.raises(MetricError):
            MetricsRegistry(**settings)


# --- quantiles, merging and windows -----------------------------------------------------------

def test_batched_keys_match_the_ddsketch_mapping() -> None:
    values = np.random.default_rng(5).lognormal(-3, 4, 20_000)
    mapping = BatchMapping(ALPHA)
    assert mapping.keys(values).tolist() == [mapping.key(v) for v in values.tolist()]


@pytest.mark.parametrize("batch", [1, 64, 1024])
def test_quantiles_are_within_the_relative_accuracy(clock: Clock, batch: int) -> None:
    registry = MetricsRegistry(clock=clock, batch=batch)
    rng = np.random.default_rng(batch)
    values = np.concatenate([rng.lognormal(0, 1.5, 4000), -rng.exponential(2, 1000),
                             np.zeros(50)])
    rng.shuffle(values)
    histogram = registry.histogram("value", "Signed values.")
    for value in values.tolist():
        histogram.observe(value)
    for q in QUANTILES:
        exact = np.quantile(values, q, method="lower")
        assert within_alpha(registry.query("value", f"p{q * 100:g}"), exact), q


def test_quantiles_merge_across_label_sets(registry: MetricsRegistry) -> None:
    rng = np.random.default_rng(11)
    latency = registry.histogram("llm_latency_seconds", "", ("agent", "model"))
    parts = {("coder", "small"): rng.lognormal(-1, 0.5, 2000),
             ("coder", "large"): rng.lognormal(1, 0.5, 1500),
             ("tester", "small"): rng.lognormal(0, 0.5, 1000)}
    for (agent, model), values in parts.items():
        child = latency.labels(agent=agent, model=model)
        for value in values.tolist():
            child.observe(value)
    coder = np.concatenate([parts["coder", "small"], parts["coder", "large"]])
    assert registry.query("llm_latency_seconds", "count", {"agent": "coder"}) == len(coder)
    assert registry.query("llm_latency_seconds", "sum", {"agent": "coder"}) == pytest.approx(
        coder.sum())
    small = np.concatenate([parts["coder", "small"], parts["tester", "small"]])
    for q in (0.5, 0.9, 0.99):
        assert within_alpha(registry.query("llm_latency_seconds", f"p{q * 100:g}",
                                           {"agent": "coder"}),
                            np.quantile(coder, q, method="lower"))
        assert within_alpha(registry.query("llm_latency_seconds", f"p{q * 100:g}",
                                           {"model": "small"}),
                            np.quantile(small, q, method="lower"))


def test_sliding_windows_drop_old_observations_but_keep_them_all_time(clock: Clock) -> None:
    registry = MetricsRegistry(clock=clock, bucket_s=10, max_window_s=120, batch=16)
    latency = registry.histogram("latency_seconds")
    errors = registry.counter("errors_total")
    for value in (100.0, 200.0, 300.0):  # t = 1000: slow and old
        latency.observe(value)
    errors.inc(5)
    clock.advance(95)
    for value in (1.0, 2.0):  # t = 1095
        latency.observe(value)
    errors.inc()
    clock.advance(10)  # t = 1105: the last 30 s reach back to the bucket [1070, 1080)
    assert registry.query("latency_seconds", "count", window_s=30) == 2
    assert registry.query("latency_seconds", "max", window_s=30) == 2.0
    assert registry.query("latency_seconds", "mean", window_s=30) == 1.5
    assert registry.query("errors_total", "value", window_s=30) == 1
    assert registry.query("latency_seconds", "count") == 5
    assert registry.query("latency_seconds", "max") == 300.0
    assert registry.query("errors_total", "value") == 6
    clock.advance(500)  # long past the longest window: the ring empties, totals stay
    assert registry.query("latency_seconds", "count", window_s=120) == 0
    assert registry.query("latency_seconds", "p99", window_s=120) is None
    assert registry.query("latency_seconds", "count") == 5
    assert within_alpha(registry.query("latency_seconds", "p50"), 100.0)
    with pytest.raises(MetricError, match="window_s must lie in"):
        registry.query("latency_seconds", "count", window_s=121)


def test_sketches_merge_like_their_union() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(5, 1, 1000), rng.normal(50, 5, 800)
    left, right = Sketch(), Sketch()
    left.add_batch(a)
    right.add_batch(b)
    left.merge(right)
    both = np.concatenate([a, b])
    assert left.count == len(both)
    assert left.stddev == pytest.approx(both.std())
    assert (left.minimum, left.maximum) == (both.min(), both.max())
    assert within_alpha(left.quantile(0.75), np.quantile(both, 0.75, method="lower"))


# --- concurrency, cardinality and bad input ------------------------------------------------------

def test_threads_recording_at_once_lose_nothing(clock: Clock) -> None:
    registry = MetricsRegistry(clock=clock, batch=37)
    latency = registry.histogram("latency_seconds", "", ("worker",))
    calls = registry.counter("calls_total")
    threads, per_thread = 4, 20_000
    shared = latency.labels(worker="shared")
    counts: list[float | None] = []

    def work() -> None:
        for _ in range(per_thread):
            shared.observe(1.0)
            calls.inc()

    def read() -> None:
        for _ in range(50):
            counts.append(registry.query("latency_seconds", "count"))

    workers = [threading.Thread(target=work) for _ in range(threads)] + [
        threading.Thread(target=read)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert registry.query("latency_seconds", "count") == threads * per_thread
    assert registry.query("latency_seconds", "sum") == threads * per_thread
    assert registry.query("calls_total", "value") == threads * per_thread
    assert counts == sorted(counts)  # every read saw at least what the one before it saw


def test_too_many_label_sets_overflow_into_one_series(clock: Clock,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    registry = MetricsRegistry(clock=clock, max_label_sets=3)
    calls = registry.counter("tool_calls_total", "", ("tool",))
    with caplog.at_level(logging.WARNING):
        for index in range(6):
            calls.labels(tool=f"tool{index}").inc(index + 1)
        calls.labels(tool="tool0").inc(100)
    warnings = [r for r in caplog.records if "tool_calls_total" in r.getMessage()]
    assert len(warnings) == 1
    assert registry.query("tool_calls_total", "value", {"tool": "tool0"}) == 101
    assert registry.query("tool_calls_total", "value", {OVERFLOW: "true"}) == 4 + 5 + 6
    assert registry.query("tool_calls_total", "value") == 101 + 2 + 3 + 4 + 5 + 6
    assert len(calls.series()) == 4
    [family] = text_string_to_metric_families(to_prometheus(registry))
    assert {s.labels.get(OVERFLOW) for s in family.samples} == {None, "true"}


@pytest.mark.parametrize("bad", ["1.5", None, math.nan, math.inf, -math.inf, True, 10**400,
                                 [1.0]])
def test_bad_observations_are_rejected_and_nothing_is_lost(registry: MetricsRegistry,
                                                           bad: object) -> None:
    latency = registry.histogram("latency_seconds")
    queue = registry.gauge("queue_depth")
    calls = registry.counter("calls_total")
    latency.observe(2.0)
    latency.observe(4)
    queue.set(3)
    calls.inc(2)
    for record in (latency.observe, queue.set, queue.inc, calls.inc):
        with pytest.raises(MetricError) as error:
            record(bad)  # type: ignore[arg-type]
        assert repr(bad)[:20] in str(error.value)
        assert "'latency_seconds'" in str(error.value) or "'queue_depth'" in str(
            error.value) or "'calls_total'" in str(error.value)
    assert registry.query("latency_seconds", "count") == 2
    assert registry.query("latency_seconds", "mean") == 3.0
    assert registry.query("queue_depth", "value") == 3
    assert registry.query("calls_total", "value") == 2


# --- exposition -------------------------------------------------------------------------------

def populated(registry: MetricsRegistry) -> None:
    calls = registry.counter("pyagent_llm_calls_total", "LLM calls.", ("agent",))
    calls.labels(agent="coder").inc(3)
    calls.labels(agent='say "hi"\n').inc()
    registry.gauge("pyagent_queue_depth", "Queued.").set(2)
    latency = registry.histogram("pyagent_llm_latency_seconds", "Latency.", ("agent",))
    for value in range(1, 101):
        latency.labels(agent="coder").observe(value / 100)
    registry.timer("pyagent_idle_seconds", "Never used.", ("agent",))


def test_prometheus_text_parses_back(registry: MetricsRegistry) -> None:
    populated(registry)
    families = {f.name: f for f in text_string_to_metric_families(to_prometheus(registry))}
    calls = families["pyagent_llm_calls"]
    assert calls.type == "counter"
    assert {s.labels["agent"]: s.value for s in calls.samples} == {"coder": 3.0,
                                                                   'say "hi"\n': 1.0}
    assert families["pyagent_queue_depth"].samples[0].value == 2.0
    latency = families["pyagent_llm_latency_seconds"]
    assert latency.type == "summary"
    samples = {(s.name, s.labels.get("quantile")): s.value for s in latency.samples}
    assert samples["pyagent_llm_latency_seconds_count", None] == 100
    assert samples["pyagent_llm_latency_seconds_sum", None] == pytest.approx(50.5)
    assert within_alpha(samples["pyagent_llm_latency_seconds", "0.99"], 0.99)
    assert families["pyagent_idle_seconds"].samples == []


def test_json_snapshot_round_trips(registry: MetricsRegistry) -> None:
    populated(registry)
    snapshot = registry.snapshot()
    assert json.loads(json.dumps(snapshot)) == snapshot
    parsed = json.loads(to_json(registry))
    latency = parsed["metrics"]["pyagent_llm_latency_seconds"]
    assert latency["type"] == "histogram"
    [series] = latency["series"]
    assert series["labels"] == {"agent": "coder"}
    assert series["count"] == 100 and series["max"] == 1.0
    assert within_alpha(series["p90"], 0.9)
    assert parsed["metrics"]["pyagent_queue_depth"]["series"] == [{"labels": {}, "value": 2.0}]


# --- the event feed ---------------------------------------------------------------------------

def test_feed_turns_runtime_events_into_metrics(registry: MetricsRegistry) -> None:
    bus = EventBus()
    feed = MetricsFeed(registry)
    detach = feed.attach(bus)
    with (bus.span("run", "run demo.yaml", "r1") as run,
          run.child("step", "step plan", **{"pyagent.step.id": "plan"}) as step,
          step.child("agent", "invoke_agent coder", **{"gen_ai.agent.name": "coder"}) as agent):
        for input_tokens in (120, 80):
            with agent.child("llm_call", "chat gemma-3-270m",
                             **{"gen_ai.request.model": "gemma-3-270m"}) as call:
                call.update({"gen_ai.usage.input_tokens": input_tokens,
                             "gen_ai.usage.output_tokens": 30,
                             "pyagent.usage.cached_tokens": 64,
                             "pyagent.time_to_first_token_s": 0.05})
        with agent.child("tool_call", "execute_tool read_file",
                         **{"gen_ai.tool.name": "read_file"}):
            pass
        with pytest.raises(PermissionError), agent.child(
                "tool_call", "execute_tool run_command", **{"gen_ai.tool.name": "run_command"}):
            raise PermissionError("not allowed")
        with (agent.child("tool_call", "execute_tool delegate",
                          **{"gen_ai.tool.name": "delegate"}) as delegate,
              delegate.child("agent", "invoke_agent tester",
                             **{"gen_ai.agent.name": "tester"}) as sub,
              pytest.raises(TimeoutError),
              sub.child("llm_call", "chat backend-default", **{"gen_ai.request.model": ""})):
            raise TimeoutError("backend too slow")
    coder = {"agent": "coder", "model": "gemma-3-270m"}
    assert registry.query("pyagent_llm_calls_total", "value", {**coder, "status": "ok"}) == 2
    assert registry.query("pyagent_tokens_total", "value", {**coder, "kind": "input"}) == 200
    assert registry.query("pyagent_tokens_total", "value", {"kind": "output"}) == 60
    assert registry.query("pyagent_tokens_total", "value", {"kind": "cached"}) == 128
    assert registry.query("pyagent_llm_latency_seconds", "count", coder) == 2
    assert registry.query("pyagent_time_to_first_token_seconds", "max", coder) == 0.05
    failed = {"agent": "tester", "model": "backend-default", "status": "error"}
    assert registry.query("pyagent_llm_calls_total", "value", failed) == 1
    assert registry.query("pyagent_tool_calls_total", "value", {"status": "ok"}) == 2
    assert registry.query("pyagent_tool_calls_total", "value",
                          {"tool": "run_command", "status": "error"}) == 1
    assert registry.query("pyagent_tool_latency_seconds", "count", {"tool": "read_file"}) == 1
    assert registry.query("pyagent_tool_latency_seconds", "count", {"tool": "run_command"}) is None
    assert registry.query("pyagent_errors_total", "value", {"kind": "tool_call"}) == 1
    assert registry.query("pyagent_errors_total", "value",
                          {"kind": "llm_call", "error_type": "TimeoutError"}) == 1
    assert registry.query("pyagent_steps_total", "value", {"status": "ok"}) == 1
    assert feed._agents == {}  # agent spans are forgotten once they end
    detach()
    with bus.span("step", "step again", "r2"):
        pass
    assert registry.query("pyagent_steps_total", "value") == 1
