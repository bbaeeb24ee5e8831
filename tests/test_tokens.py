"""Token and cost tracking: recorded calls, real traces on a real bus and SQLite store, savings
reports and paired comparisons, priced with genai-prices' real data."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest

from pyagent.bench import tokens
from pyagent.bench.prices import BATCH_DISCOUNT_UNKNOWN, PriceTable, UsageError
from pyagent.bench.tokens import TokenTracker, Totals, compare_runs, compound_saving
from pyagent.errors import PyAgentError
from pyagent.observe.events import EventBus, Span
from pyagent.observe.traces import TraceStore
from pyagent.types import Usage

WHEN = datetime(2026, 11, 1, tzinfo=UTC)  # after the bundled batch rates start (2026-10-14)
EXAMPLE = Path(__file__).parents[1] / "examples" / "prices.yaml"
CALLS = [  # (usage, model, run, step, agent)
    (Usage(10_000, 500, 8_000), "gpt-4o", "r1", "plan", "planner"),
    (Usage(12_345, 678, 4_096), "claude-sonnet-4-5", "r1", "code", "coder"),
    (Usage(3_000, 120, 0), "gemma-3-270m", "r1", "code", "coder"),
    (Usage(250_000, 2_000, 100_000), "gemini-2.5-pro", "r2", "plan", "planner"),
    (Usage(777, 77, 7), "gpt-4o", "r2", "code", "helper"),
]


def reference_total(usage: Usage, model: str, cached: bool = True) -> Decimal:
    return genai_prices.calc_price(
        genai_prices.Usage(input_tokens=usage.prompt_tokens,
                           cache_read_tokens=usage.cached_tokens if cached else 0,
                           output_tokens=usage.completion_tokens),
        model, genai_request_timestamp=WHEN).total_price


def filled(prices: PriceTable | None = None) -> TokenTracker:
    tracker = TokenTracker(prices)
    for usage, model, run, step, agent in CALLS:
        tracker.record(usage, model=model, run_id=run, step=step, agent=agent, at=WHEN)
    return tracker


def test_totals_equal_the_recorded_usage_exactly() -> None:
    totals = filled().totals()
    assert totals.calls == len(CALLS)
    assert totals.prompt_tokens == sum(u.prompt_tokens for u, *_ in CALLS)
    assert totals.completion_tokens == sum(u.completion_tokens for u, *_ in CALLS)
    assert totals.cached_tokens == sum(u.cached_tokens for u, *_ in CALLS)
    assert totals.total_tokens == sum(u.total_tokens for u, *_ in CALLS)
    assert totals.unknown_calls == 1  # gemma-3-270m: genai-prices has no price for it
    assert totals.cost == sum(reference_total(u, m) for u, m, *_ in CALLS if m != "gemma-3-270m")


def test_groups_keep_unknown_costs_unknown() -> None:
    tracker = filled()
    agents = tracker.by("agent")
    assert set(agents) == {"planner", "coder", "helper"}
    assert agents["coder"].calls == 2 and agents["coder"].unknown_calls == 1
    assert agents["coder"].cost == reference_total(*CALLS[1][:2])
    assert agents["planner"].unknown_calls == 0
    models = tracker.by("model")
    assert models["gpt-4o"].prompt_tokens == 10_777
    # a group of unknown-price calls only has an unknown cost, not $0
    assert models["gemma-3-270m"].cost is None and models["gemma-3-270m"].unknown_calls == 1
    assert {run: t.calls for run, t in tracker.by("run").items()} == {"r1": 3, "r2": 2}
    assert tracker.by("step")["code"].completion_tokens == 678 + 120 + 77
    assert tracker.by("provider") == {None: tracker.totals()}
    with pytest.raises(PyAgentError, match="cannot group by 'color'"):
        tracker.by("color")


def test_a_run_of_unknown_prices_only_costs_unknown() -> None:
    from pyagent.cli import _cost

    tracker = TokenTracker()
    tracker.record(Usage(10, 1), model="private-model")
    totals = tracker.totals()
    assert totals.cost is None and totals.to_dict()["cost"] is None
    assert _cost(totals) == "unknown"
    tracker.record(Usage(10_000, 500, 8_000), model="gpt-4o", at=WHEN)
    assert _cost(tracker.totals()) == "$0.020 + 1 calls unknown"
    assert TokenTracker().totals().cost == 0  # no calls: nothing spent


def test_user_prices_fill_in_what_genai_prices_lacks() -> None:
    tracker = filled(PriceTable(EXAMPLE))
    assert tracker.totals().unknown_calls == 0
    assert tracker.by("model")["gemma-3-270m"].cost == 0
    assert tracker.records[2].cost.source == f"{EXAMPLE}:8"  # type: ignore[union-attr]


def test_unknown_models_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    tracker = TokenTracker()
    with caplog.at_level(logging.WARNING, logger="pyagent.bench.prices"):
        for _ in range(3):
            tracker.record(Usage(10, 1), model="private-model")
    assert len(caplog.records) == 1
    assert tracker.totals().unknown_calls == 3


@pytest.mark.parametrize(("usage", "message"), [
    (Usage(-5, 1), "prompt_tokens"),
    (Usage(5, -1), "completion_tokens"),
    (Usage(5, 1, 6), "cannot exceed"),
])
def test_bad_usage_is_refused_and_earlier_records_are_kept(usage: Usage, message: str) -> None:
    tracker = filled()
    before = tracker.totals()
    with pytest.raises(UsageError, match=message):
        tracker.record(usage, model="gpt-4o")
    assert tracker.totals() == before


def test_caching_report_measures_the_saving_against_no_cache_discount() -> None:
    tracker = filled()
    report = tracker.caching_report()
    priced = [(u, m) for u, m, *_ in CALLS if m != "gemma-3-270m"]
    assert report.cached_tokens == sum(u.cached_tokens for u, *_ in CALLS)
    assert report.cached_share == report.cached_tokens / report.prompt_tokens
    assert report.cost == tracker.totals().cost
    assert report.cost_without_cache == sum(reference_total(u, m, cached=False) for u, m in priced)
    assert report.saved == report.cost_without_cache - report.cost > 0
    assert report.unknown_calls == 1

    single = TokenTracker()
    single.record(Usage(10_000, 500, 8_000), model="gpt-4o", at=WHEN)
    # 8,000 cached tokens at $1.25 instead of $2.50 per million
    assert single.caching_report().saved == Decimal("0.01")
    unknown = TokenTracker()
    unknown.record(Usage(100, 10, 50), model="private-model")
    assert unknown.caching_report().saved is None
    assert unknown.caching_report().cached_share == 0.5


def test_batch_report_reprices_at_batch_rates_where_known() -> None:
    tracker = filled()
    tracker.record(Usage(10_000, 500, 8_000), model="gpt-4o", at=datetime(2026, 9, 1, tzinfo=UTC))
    throughput = {"batch_sizes": [1, 8], "tokens_per_s": [9.2, 41.0]}
    report = tracker.batch_report(throughput)
    assert report.throughput == throughput
    assert (report.calls, report.no_batch_price_calls, report.unknown_calls) == (4, 1, 1)
    expected = sum(genai_prices.calc_price(
        genai_prices.Usage(input_tokens=u.prompt_tokens, cache_read_tokens=u.cached_tokens,
                           output_tokens=u.completion_tokens),
        m, genai_request_timestamp=WHEN, price_context={"processing": "batch"}).total_price
        for u, m, *_ in CALLS if m != "gemma-3-270m")
    assert report.batch_cost == expected
    assert report.saved == report.cost - expected > 0

    flagged = tracker.record(Usage(10, 1), model="gpt-4o", batch=True,
                             at=datetime(2026, 9, 1, tzinfo=UTC))
    assert flagged.cost is not None and flagged.cost.notes == (BATCH_DISCOUNT_UNKNOWN,)


def test_measurements_and_compound_savings() -> None:
    tracker = TokenTracker()
    compression = tracker.add_measurement("compression", 12_000, 9_000, "prompt_tokens",
                                          {"method": "landmarks"})
    pruning = tracker.add_measurement("pruning", 9_000, 8_100, "prompt_tokens")
    assert compression.saving == Decimal("0.25") and pruning.saving == Decimal("0.1")
    assert compound_saving([compression.saving, pruning.saving]) == Decimal("0.325")
    assert compound_saving([0.5, 0.5]) == Decimal("0.75")
    assert compound_saving([]) == 0
    assert tracker.add_measurement("x", 0, 0, "tokens").saving is None
    with pytest.raises(PyAgentError, match="fraction <= 1"):
        compound_saving([1.5])
    with pytest.raises(PyAgentError, match="baseline must be a finite number >= 0"):
        tracker.add_measurement("compression", -1, 5, "tokens")
    with pytest.raises(PyAgentError, match="optimized"):
        tracker.add_measurement("compression", 1, float("nan"), "tokens")
    assert len(tracker.measurements) == 3


def llm_call(parent: Span, model: str, usage: Usage | None) -> None:
    """An LLM-call span as a turn records it; no usage for a call that failed."""
    with parent.child("llm_call", f"chat {model}", **{"gen_ai.request.model": model}) as call:
        if usage is not None:
            call.update({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                         "gen_ai.usage.output_tokens": usage.completion_tokens,
                         "pyagent.usage.cached_tokens": usage.cached_tokens,
                         "gen_ai.usage.cache_creation.input_tokens": usage.cache_write_tokens})


def agent_span(parent: Span, name: str) -> Span:
    return parent.child("agent", f"invoke_agent {name}", **{"gen_ai.agent.name": name})


def fleet_run(bus: EventBus, run_id: str = "run-1") -> None:
    """run -> step plan -> planner; step code -> coder, which delegates to tester."""
    with bus.span("run", "run demo.yaml", run_id) as run:
        with run.child("step", "step plan", **{"pyagent.step.id": "plan"}) as step, \
                agent_span(step, "planner") as planner:
            llm_call(planner, "gpt-4o", Usage(10_000, 500, 8_000))
        with run.child("step", "step code", **{"pyagent.step.id": "code"}) as step, \
                agent_span(step, "coder") as coder:
            llm_call(coder, "claude-sonnet-4-5", Usage(2_000, 100, 0, 1_024))
            with coder.child("tool_call", "execute_tool delegate") as tool, \
                    agent_span(tool, "tester") as tester:
                llm_call(tester, "gemini-2.5-flash", Usage(900, 40, 0))
                llm_call(tester, "gemma-3-270m", Usage(300, 20, 100))
            with pytest.raises(RuntimeError), coder.child("llm_call", "chat gpt-4o"):
                raise RuntimeError("connection reset")
            llm_call(coder, "claude-sonnet-4-5", Usage(2_500, 60, 2_000))


def placements(tracker: TokenTracker) -> list[tuple[str | None, ...]]:
    return [(r.run_id, r.step, r.agent, r.model, r.usage.prompt_tokens) for r in tracker.records]


EXPECTED_PLACES = [
    ("run-1", "plan", "planner", "gpt-4o", 10_000),
    ("run-1", "code", "coder", "claude-sonnet-4-5", 2_000),
    ("run-1", "code", "tester", "gemini-2.5-flash", 900),
    ("run-1", "code", "tester", "gemma-3-270m", 300),
    ("run-1", "code", "coder", "claude-sonnet-4-5", 2_500),
]


def test_from_traces_places_calls_under_their_step_and_nearest_agent(tmp_path: Path) -> None:
    bus = EventBus()
    with TraceStore(tmp_path / "traces.db") as store:
        store.attach(bus)
        fleet_run(bus)
        fleet_run(bus, "run-2")
        tracker = TokenTracker.from_traces(store, "run-1", {"gpt-4o": "openai"})
        assert placements(tracker) == EXPECTED_PLACES
        stored = store.totals("run-1")
        totals = tracker.totals()
        assert (totals.prompt_tokens, totals.completion_tokens, totals.cached_tokens) == (
            stored.input_tokens, stored.output_tokens, stored.cached_tokens)
        assert stored.llm_calls == totals.calls + 1  # the failed call reported no usage
        assert tracker.records[0].provider == "openai"
        written = tracker.records[1]  # its cache writes cost the cache-write rate
        assert written.usage.cache_write_tokens == totals.cache_write_tokens == 1_024
        assert written.cost is not None
        assert written.cost.cache_write == Decimal("3.75") * 1_024 / 1_000_000
        assert tracker.by("agent")["tester"].unknown_calls == 1
        assert tracker.by("step")["code"].calls == 4
        assert TokenTracker.from_traces(store, "no-such-run").totals() == Totals()


def test_attach_records_live_calls_as_the_traces_do(tmp_path: Path) -> None:
    bus = EventBus()
    live = TokenTracker()
    stop = live.attach(bus)
    with TraceStore(tmp_path / "traces.db") as store:
        store.attach(bus)
        fleet_run(bus)
        stop()
        fleet_run(bus, "run-2")  # not recorded any more
        assert placements(live) == EXPECTED_PLACES
        stored = TokenTracker.from_traces(store, "run-1")
        assert [r.cost for r in live.records] == [r.cost for r in stored.records]
    assert live._open == {}  # every span it remembered has ended


def test_attach_remembers_a_bounded_number_of_open_spans(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "MAX_OPEN_SPANS", 3)
    bus = EventBus()
    tracker = TokenTracker()
    tracker.attach(bus)
    run = bus.span("run", "run never-ending", "r9").start()
    steps = [run.child("step", f"step s{i}", **{"pyagent.step.id": f"s{i}"}).start()
             for i in range(4)]
    assert len(tracker._open) == 3  # the oldest two, the run and step s0, were forgotten
    llm_call(steps[0], "gpt-4o", Usage(10, 1))
    llm_call(steps[-1], "gpt-4o", Usage(10, 1))
    assert [(r.run_id, r.step) for r in tracker.records] == [("r9", None), ("r9", "s3")]


def test_compare_runs_pairs_tasks_and_bootstraps_the_difference() -> None:
    baseline = {task: Totals(calls=1, prompt_tokens=tokens, cost=Decimal(cost))
                for task, tokens, cost in [("a", 1_000, "0.010"), ("b", 2_000, "0.020"),
                                           ("c", 3_000, "0.030")]}
    candidate_tracker = TokenTracker()
    candidate_tracker.record(Usage(600, 0), model="gpt-4o", at=WHEN)  # $0.0015
    candidate = {"a": candidate_tracker,
                 "b": Totals(calls=1, prompt_tokens=1_500, cost=Decimal("0.015")),
                 "c": Totals(calls=1, prompt_tokens=2_400, cost=Decimal("0.024"))}
    result = compare_runs(baseline, candidate)
    assert result.tasks == ("a", "b", "c")
    assert (result.tokens.baseline_total, result.tokens.candidate_total) == (6_000, 4_500)
    assert result.tokens.mean_difference == -500
    assert result.tokens.ratio == Decimal("0.75")
    assert result.tokens.ci_low <= -500 <= result.tokens.ci_high
    assert result.cost is not None
    assert result.cost.candidate_total == Decimal("0.0405")
    assert result.cost.mean_difference == (Decimal("0.0405") - Decimal("0.060")) / 3
    json.dumps(result.to_dict())

    unknown = TokenTracker()
    unknown.record(Usage(600, 0), model="private-model")
    partial = compare_runs(baseline, {**candidate, "b": unknown})
    assert partial.cost is None and partial.cost_unknown_tasks == ("b",)


def test_compare_runs_refuses_unpaired_tasks() -> None:
    one = Totals(calls=1, prompt_tokens=10)
    with pytest.raises(PyAgentError, match="missing from the candidate: b, c; "
                                           "missing from the baseline: d"):
        compare_runs({"a": one, "b": one, "c": one}, {"a": one, "d": one})
    with pytest.raises(PyAgentError, match="no tasks given"):
        compare_runs({}, {})


def test_to_dict_is_json_with_exact_money_and_price_sources() -> None:
    tracker = filled()
    tracker.add_measurement("compression", 12_000, 9_000, "prompt_tokens")
    data = json.loads(json.dumps(tracker.to_dict({"batch_sizes": [1, 8]})))
    assert len(data["records"]) == len(CALLS)
    assert Decimal(data["totals"]["cost"]) == tracker.totals().cost
    assert data["records"][2]["cost"] is None
    gemma = next(g for g in data["by"]["model"] if g["name"] == "gemma-3-270m")
    assert gemma["cost"] is None and gemma["unknown_calls"] == 1
    coder = next(g for g in data["by"]["agent"] if g["name"] == "coder")
    assert coder["unknown_calls"] == 1
    assert data["strategies"]["batching"]["throughput"] == {"batch_sizes": [1, 8]}
    assert data["strategies"]["measured"][0]["saving"] == "0.25"
    assert data["prices"]["sources"] == [
        {"kind": "genai-prices", "version": genai_prices.__version__, "data": "bundled data"}]
    assert {m["model"] for m in data["prices"]["models"]} == {
        "gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro"}
    assert data["prices"]["unknown"] == ["gemma-3-270m"]
