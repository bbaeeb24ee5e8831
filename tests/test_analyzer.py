"""The performance analyzer: bottlenecks on synthetic trace stores with a known answer, the
critical path through parallel children, opportunities, regressions by asv's rule, trends and
forecasts, the score, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pyagent.bench.analyzer import analyze_results, analyze_traces, compare, score, trends
from pyagent.bench.breakdown import memory_series
from pyagent.bench.critical_path import critical_path
from pyagent.bench.regression import compare_samples, direction, smallest_p
from pyagent.bench.synthetic import (
    BALANCED_MAX,
    INJECTED,
    KV_REFUSAL,
    OVERLOADED,
    Scenario,
    SpanSpec,
    balanced,
    double,
    publish,
    result_pair,
    single,
    trace_set,
)
from pyagent.errors import ConfigError
from pyagent.observe.events import EventBus
from pyagent.observe.traces import SpanRecord, TraceStore


def span(span_id: str, parent: str | None, kind: str, start: float, end: float,
         status: str = "ok", **attributes: object) -> SpanRecord:
    return SpanRecord(span_id, "r", parent, kind, f"{kind} {span_id}", status, start, end,
                      end - start, dict(attributes))


def write(path: Path, runs: dict[str, SpanSpec]) -> Path:
    bus = EventBus()
    with TraceStore(path) as store:
        store.attach(bus)
        for run_id, root in runs.items():
            publish(bus, run_id, root)
    return path


# --- bottlenecks ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", INJECTED)
@pytest.mark.parametrize("seed", [1, 2])
def test_an_injected_bottleneck_is_found_ranked_first_with_its_share(tmp_path, kind, seed):
    found = trace_set(tmp_path / "traces.db", kind, seed)
    analysis = analyze_traces(found.path)
    top = analysis.bottlenecks[0]
    assert top.kind == kind
    assert top.share == pytest.approx(found.truth[kind], abs=0.01)
    for other, share in analysis.time["shares"].items():
        assert share == pytest.approx(found.truth[other], abs=0.01)
    assert sum(analysis.time["shares"].values()) == pytest.approx(1.0)


def test_memory_pressure_shows_refusals_and_a_leaking_kv_gauge_separately(tmp_path):
    refusals = analyze_traces(trace_set(tmp_path / "refusals.db", "memory", 3).path)
    memory = refusals.bottlenecks[0]
    assert memory.kind == "memory" and memory.evidence["kv_refusals"] >= 1
    assert not any(s["growing"] for s in memory.evidence["series"])
    assert refusals.opportunities[0].flag == "--kv-policy pyagent --kv-budget 0.5"
    time = single(np.random.default_rng(3), "tools", 0.75, 0.8, others=("model", "other"))
    leak = Scenario("kv_leak", time.shares, (), "leak-linear", 0.5)
    found = trace_set(tmp_path / "leak.db", leak, 3)
    analysis = analyze_traces(found.path)
    assert [b.kind for b in analysis.bottlenecks] == found.bottlenecks() == ["tools", "memory"]
    assert analysis.bottlenecks[1].share == 0.0
    assert [s["pattern"] for s in analysis.bottlenecks[1].evidence["series"]] == ["linear"]


@pytest.mark.parametrize("seed", [4, 5])
def test_a_balanced_store_reports_no_bottleneck(tmp_path, seed):
    found = trace_set(tmp_path / "traces.db", balanced(np.random.default_rng(seed)), seed,
                      jitter_s=0.005)
    assert max(found.truth.values()) <= BALANCED_MAX and found.bottlenecks() == []
    analysis = analyze_traces(found.path)
    assert analysis.bottlenecks == []
    for kind, share in analysis.time["shares"].items():
        assert share == pytest.approx(found.truth[kind], abs=0.005)


def test_a_kind_injected_below_the_threshold_is_not_reported_and_two_above_rank(tmp_path):
    below = single(np.random.default_rng(6), "queue", 0.15, 0.2)
    found = trace_set(tmp_path / "below.db", below, 6, jitter_s=0.005)
    assert found.truth["queue"] < 0.25
    reported = [b.kind for b in analyze_traces(found.path).bottlenecks]
    assert "queue" not in reported and reported == found.bottlenecks()
    two = double(np.random.default_rng(7), ("model", "tools"))
    found = trace_set(tmp_path / "two.db", two, 7, jitter_s=0.005)
    assert [b.kind for b in analyze_traces(found.path).bottlenecks] == list(two.injected)


def test_time_lost_to_a_refusal_goes_to_its_cause():
    def failed(error_type: str, message: str) -> list[SpanRecord]:
        error = {"error.type": error_type, "exception.message": message}
        return [span("a", None, "agent", 0, 4, "error", **error),
                span("t", "a", "tool_call", 0, 3, **{"gen_ai.tool.name": "shell"}),
                span("l", "a", "llm_call", 3, 4, "error", **error)]

    kv = critical_path("r", failed(*KV_REFUSAL)).seconds()
    assert kv == {"model": 0.0, "queue": 0.0, "tools": 0.0, "memory": 4.0, "other": 0.0}
    busy = critical_path("r", failed(*OVERLOADED)).seconds()
    assert busy == {"model": 0.0, "queue": 4.0, "tools": 0.0, "memory": 0.0, "other": 0.0}


def test_memory_used_and_released_by_each_run_does_not_keep_growing():
    rng = np.random.default_rng(8)
    times = np.arange(120.0)
    teeth = 0.15 + 0.4 * (times % 60) / 60 + rng.normal(0, 0.01, times.size)
    ramp = 0.15 + 0.4 * times / 120 + rng.normal(0, 0.01, times.size)
    used = memory_series("kv", times, teeth * 2**29, 2**29)
    leak = memory_series("kv", times, ramp * 2**29, 2**29)
    assert used.growth > 0.2 and used.released > 0.3 and not used.growing
    assert leak.growing and leak.released == 0.0


def test_critical_path_takes_the_child_that_ends_last_and_skips_parallel_ones():
    spans = [span("a", None, "agent", 0, 10),
             span("t", "a", "tool_call", 1, 6, **{"gen_ai.tool.name": "shell"}),
             span("l", "a", "llm_call", 2, 9, **{"pyagent.queue_s": 1.0,
                                                 "pyagent.time_to_first_token_s": 3.0}),
             span("p", "a", "tool_call", 3, 5, **{"gen_ai.tool.name": "read_file"})]
    path = critical_path("r", spans)
    assert path.wall_s == 10
    details: dict[tuple[str, str], float] = {}
    for segment in path.segments:
        key = (segment.kind, segment.detail)
        details[key] = details.get(key, 0.0) + segment.seconds
    # 9-10 and 0-1 the agent's own; l from 2 to 9; the shell call clipped to 1-2; read_file
    # ran inside l's time, in parallel: off the path
    assert details == {("other", "agent"): 2.0, ("queue", "admission"): 1.0,
                       ("model", "prefill"): 2.0, ("model", "decode"): 4.0,
                       ("tools", "shell"): 1.0}


def test_critical_path_follows_nested_overlapping_chains():
    spans = [span("run", None, "run", 0, 20),
             span("x", "run", "agent", 1, 12), span("y", "run", "agent", 2, 19),
             span("y1", "y", "tool_call", 3, 8, **{"gen_ai.tool.name": "shell"}),
             span("y2", "y", "llm_call", 8, 18),
             span("x1", "x", "tool_call", 1, 11, **{"gen_ai.tool.name": "run_tests"})]
    seconds = critical_path("r", spans).seconds()
    # run 19-20, y (ends last) 2-19: own 18-19 and 2-3, y2 10 s of compute, y1 5 s; then x
    # clipped to 1-2 (its run_tests call), run 0-1
    assert seconds == {"model": 10.0, "queue": 0.0, "tools": 6.0, "memory": 0.0, "other": 4.0}


def test_prefix_caching_estimate_from_measured_prefill(tmp_path):
    def call(start: float, prompt: int, output: int, ttft: float) -> SpanSpec:
        return SpanSpec("llm_call", "chat m", start, start + ttft + 1.0, {
            "gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": output,
            "pyagent.usage.cached_tokens": 0, "pyagent.time_to_first_token_s": ttft})

    agent = SpanSpec("agent", "invoke_agent a", 0.0, 5.2,
                     children=[call(0.0, 1000, 100, 1.0), call(2.0, 1200, 50, 1.2)])
    root = SpanSpec("run", "run x", 0.0, 5.2, {"pyagent.mode": "sequenced"}, children=[
        SpanSpec("step", "step s", 0.0, 5.2, children=[agent])])
    analysis = analyze_traces(write(tmp_path / "traces.db", {"r1": root}))
    prefix = next(o for o in analysis.opportunities if o.lever == "prefix caching")
    # 2.2 s of prefill over 2200 uncached tokens; the second call repeats 1000 + 100 of them
    assert prefix.evidence["prefill_s_per_token"] == pytest.approx(0.001)
    assert prefix.saving_s == pytest.approx(1.1)
    assert prefix.share == pytest.approx(1.1 / 5.2)


def test_compaction_estimate_from_old_tool_results(tmp_path):
    steps, t = [], 0.0

    def call(prompt: int) -> SpanSpec:
        nonlocal t
        t += 0.001 * prompt + 0.5  # prefill at 1 ms a token, then decode
        return SpanSpec("llm_call", "chat m", t - 0.001 * prompt - 0.5, t, {
            "gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": 10,
            "pyagent.usage.cached_tokens": 0, "pyagent.time_to_first_token_s": 0.001 * prompt})

    for index in range(4):  # each step: a call, a 2,200-character tool result, a call
        start = t
        first = call(1000 + 1200 * index)
        t += 0.1
        tool = SpanSpec("tool_call", "execute_tool shell", t - 0.1, t, {
            "gen_ai.tool.name": "shell", "pyagent.tool.output_chars": 2200})
        second = call(1600 + 1200 * index)
        steps.append(SpanSpec("step", f"step {index}", start, t, children=[
            SpanSpec("agent", "invoke_agent a", start, t, children=[first, tool, second])]))
    root = SpanSpec("run", "run x", 0.0, t, {"pyagent.mode": "handover"}, children=steps)
    analysis = analyze_traces(write(tmp_path / "traces.db", {"r1": root}))
    compaction = next(o for o in analysis.opportunities if o.lever == "compaction")
    # only step 3 carries a result older than the 2 newest: 2,000 characters cut, 500 tokens,
    # in each of its two calls, at the measured 1 ms of prefill a token
    assert compaction.flag == "--compact-keep 2"
    assert compaction.evidence["prompt_tokens_saved"] == 1000
    assert compaction.saving_s == pytest.approx(1.0)


def suite(path: Path, rng: np.random.Generator, decode_scale: float = 1.0,
          errors: int = 0) -> Path:
    records = []
    for index in range(30):
        queue, prefill = rng.uniform(0, 0.02), rng.uniform(0.05, 0.1)
        decode = decode_scale * rng.uniform(0.8, 1.2)
        records.append({"item_id": f"i{index}", "family": ("arith", "logic")[index % 2],
                        "difficulty": 1, "score": 1.0, "correct": True,
                        "latency_s": queue + prefill + decode, "ttft_s": queue + prefill,
                        "queue_s": queue, "prompt_tokens": 100, "completion_tokens": 20,
                        "cached_tokens": 0,
                        "error": "kv budget exceeded" if index < errors else None})
    samples = [{"t": float(t), "rss": int(1e9 + 1e7 * t), "kv": None} for t in range(30)]
    path.write_text(json.dumps({"records": records, "meta": {},
                                "memory": {"samples": samples, "peak_rss": int(1.3e9)}}))
    return path


def test_suite_results_decode_bound_with_the_measured_int8_change(tmp_path):
    rng = np.random.default_rng(0)
    before = suite(tmp_path / "f32.json", rng)
    after = suite(tmp_path / "int8.json", rng, decode_scale=1 / 1.62)
    analysis = analyze_results([before], after=[after])
    assert analysis.bottlenecks[0].kind == "model"
    assert analysis.bottlenecks[0].evidence["decode_s"] > 0.8 * analysis.time["wall_s"]
    int8 = next(o for o in analysis.opportunities if o.flag == "--dtype int8")
    assert int8.measured is not None
    assert int8.measured.change == pytest.approx(1 / 1.62 - 1, abs=0.05)
    assert int8.share == pytest.approx(analysis.measured.change * -1, abs=0.06)
    assert analysis.memory[0].pattern == "linear"
    failing = analyze_results([suite(tmp_path / "kv.json", rng, errors=3)])
    assert failing.bottlenecks[0].kind == "model"
    assert failing.time["shares"]["memory"] == pytest.approx(0.1, abs=0.02)
    assert {c.name: c.value for c in failing.score.components}["errors"] == pytest.approx(0.1)
    assert failing.score.value < analysis.score.value
    text = analysis.markdown()
    assert "## Bottlenecks" in text and "`--dtype int8`" in text
    json.dumps(analysis.to_dict(), allow_nan=False)


# --- regressions ----------------------------------------------------------------------------

def test_a_known_regression_is_found_and_noise_is_not(tmp_path):
    base, cand = result_pair(tmp_path, 5, 20, ("latency_s", 1.5))
    analysis = compare([base], [cand])
    assert [(c.metric, c.verdict) for c in analysis.changes if c.flagged] == [
        ("latency_s", "regression")]
    assert analysis.score.value == 90
    base, cand = result_pair(tmp_path, 6, 20)
    assert not [c for c in compare([base], [cand]).changes if c.flagged]


def test_improvements_follow_the_metric_direction():
    rng = np.random.default_rng(1)
    base = rng.lognormal(0, 0.05, 12)
    assert compare_samples("throughput_tok_s", base, base * 1.5, "higher").verdict == \
        "improvement"
    assert compare_samples("throughput_tok_s", base, base / 1.5, "higher").verdict == \
        "regression"
    assert compare_samples("widgets", base, base * 1.5, "unknown").verdict == "changed"
    assert compare_samples("delta_s", -base, -base * 1.5, "lower").verdict == "no ratio"


def test_a_significant_change_below_the_factor_is_not_a_regression():
    rng = np.random.default_rng(2)
    base = rng.lognormal(0, 0.005, 30)
    change = compare_samples("latency_s", base, base * 1.05, "lower")
    assert change.p_value < 1e-6
    assert change.verdict == "below factor"
    assert not change.flagged


def test_too_few_samples_say_so_and_single_values_are_never_significant():
    assert smallest_p(4, 4) > 0.01 > smallest_p(5, 5)
    few = compare_samples("latency_s", [1.0, 1.1, 1.0], [3.0, 3.1, 3.2], "lower")
    assert (few.verdict, few.p_value) == ("insufficient samples", None)
    single = compare_samples("latency_s", [1.0], [5.0], "lower")
    assert (single.verdict, single.ratio) == ("single value", 5.0)


def test_direction_from_the_name_and_overrides():
    assert direction("suite.arith.latency_s") == "lower"
    assert direction("latency.p50") == "lower"
    assert direction("error_rate") == "lower"
    assert direction("decode.tok_s") == "higher"
    assert direction("suite.all.correct") == "higher"
    assert direction("memory.peak_rss") == "lower"
    assert direction("widgets") == "unknown"
    assert direction("widgets", {"wid*": "higher"}) == "higher"


def test_repeated_files_pool_into_samples(tmp_path):
    def result(name: str, value: float) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"run": {"latency_s": value}, "meta": {"threads": 2}}))
        return path

    base = [result(f"b{i}.json", 1.0 + 0.01 * i) for i in range(6)]
    cand = [result(f"c{i}.json", 2.0 + 0.01 * i) for i in range(6)]
    (change,) = compare(base, cand).changes
    assert (change.metric, change.n_baseline, change.verdict) == ("run.latency_s", 6,
                                                                   "regression")


# --- trends -----------------------------------------------------------------------------------

def test_trend_and_forecast_of_a_linear_series_contain_the_truth(tmp_path):
    rng = np.random.default_rng(4)
    paths = []
    for day in range(12):
        path = tmp_path / f"r{day}.json"
        value = 2.0 + 0.1 * day
        path.write_text(json.dumps({
            "meta": {"date": f"2026-03-{day + 1:02d}T12:00:00+00:00"},
            "latency_s": (value + rng.normal(0, 0.03, 5)).tolist()}))
        paths.append(path)
    analysis = trends(list(reversed(paths)))  # order comes from the dates
    (found,) = analysis.trends
    assert found.verdict == "worsening"
    assert found.trend.slope_low <= 0.1 <= found.trend.slope_high
    assert found.trend.slope == pytest.approx(0.1, abs=0.02)
    for k, point in enumerate(found.forecast, 1):
        truth = 2.0 + 0.1 * (11 + k)
        assert point.time == pytest.approx(11 + k)
        assert point.low < truth < point.high
        assert point.high - point.low < 0.3
    assert analysis.score.value == 90


# --- score ------------------------------------------------------------------------------------

def test_the_score_falls_with_each_penalty_and_stays_in_range():
    base = dict(top_share=0.6, saving_shares=[0.1], regressions=0, error_rate=0.02,
                memory_growth=0.1)
    reference = score(**base).value
    for key, worse in [("top_share", 0.9), ("saving_shares", [0.1, 0.3]), ("regressions", 2),
                       ("error_rate", 0.1), ("memory_growth", 0.4)]:
        assert score(**{**base, key: worse}).value < reference, key
    assert [score(regressions=n).value for n in range(5)] == [100, 90, 80, 70, 70]
    worst = score(1.0, [1.0], 10, 1.0, 5.0)
    assert worst.value == 0 and sum(c.penalty for c in worst.components) == 100
    assert score().value == 100


# --- bad input ----------------------------------------------------------------------------------

def one_line_error(call, path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_bad_inputs_are_one_line_config_errors_naming_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    assert "no such file" in one_line_error(lambda: compare([missing], [missing]), missing)
    not_result = tmp_path / "list.json"
    not_result.write_text('["a", "b"]')
    assert "not a result" in one_line_error(lambda: trends([not_result] * 3), not_result)
    assert "not a benchmark-suite result" in one_line_error(
        lambda: analyze_results([not_result]), not_result)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert "not JSON" in one_line_error(lambda: compare([garbage], [garbage]), garbage)
    empty = tmp_path / "traces.db"
    TraceStore(empty).close()
    assert "no runs" in one_line_error(lambda: analyze_traces(empty), empty)
    one_line_error(lambda: analyze_traces(tmp_path / "none.db"), tmp_path / "none.db")
    store = trace_set(tmp_path / "t.db", "tools", 1, runs=1).path
    assert "'nope'" in one_line_error(lambda: analyze_traces(store, ["nope"]), store)
