"""Provider usage objects (OpenAI Chat and Responses, Anthropic) read into Usage, cache reads and
writes included, priced as genai-prices prices the same response, and carried by a turn's trace
to the token tracker."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import genai_prices
import pytest

from pyagent.bench.prices import PriceTable
from pyagent.bench.tokens import TokenTracker
from pyagent.errors import BackendError
from pyagent.fleet.agent import AgentSpec
from pyagent.fleet.tools.base import Workspace
from pyagent.fleet.turn import Team, run_turn
from pyagent.llm.openai import usage_from
from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.types import Completion, Message, StreamEvent, Timings, Usage

WHEN = datetime(2026, 11, 1, tzinfo=UTC)
ANTHROPIC = {"input_tokens": 100, "cache_creation_input_tokens": 2_000,
             "cache_read_input_tokens": 5_000, "output_tokens": 50,
             "cache_creation": {"ephemeral_5m_input_tokens": 2_000,
                                "ephemeral_1h_input_tokens": 0}}


@pytest.mark.parametrize(("data", "expected"), [
    (ANTHROPIC, Usage(7_100, 50, 5_000, 2_000)),  # Anthropic's input_tokens excludes the cache
    ({"input_tokens": 100, "output_tokens": 50, "cache_creation_input_tokens": None,
      "cache_read_input_tokens": None}, Usage(100, 50)),
    ({"prompt_tokens": 1_000, "completion_tokens": 20, "total_tokens": 1_020,
      "prompt_tokens_details": {"cached_tokens": 768, "cache_write_tokens": 128},
      "completion_tokens_details": None}, Usage(1_000, 20, 768, 128)),
    ({"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": None},
     Usage(10, 2)),
    ({"input_tokens": 900, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 512}},
     Usage(900, 9, 512)),
])
def test_usage_shapes_are_read_with_cache_reads_and_writes(data, expected):
    assert usage_from(data) == expected


def test_an_anthropic_response_costs_what_genai_prices_says():
    usage = usage_from(ANTHROPIC)
    cost = PriceTable().cost(usage, "claude-sonnet-4-5", at=WHEN)
    reference = genai_prices.extract_usage({"usage": ANTHROPIC}, provider_id="anthropic")
    expected = reference.usage
    assert cost is not None
    assert cost.total == genai_prices.calc_price(expected, "claude-sonnet-4-5",
                                                 genai_request_timestamp=WHEN).total_price
    assert cost.cache_write > cost.input  # 2,000 writes at 1.25x the input rate


@pytest.mark.parametrize("data", [{"completion_tokens": 5},
                                  {"prompt_tokens": None, "completion_tokens": 5},
                                  {"prompt_tokens": -1, "completion_tokens": 5}])
def test_unreadable_usage_is_a_backend_error(data):
    with pytest.raises(BackendError, match="unreadable usage from the server"):
        usage_from(data)


class CachingModel:
    """A backend whose one reply reports cache reads and writes."""

    name = "caching"

    def complete(self, request):
        return Completion("done", "stop", Usage(3_000, 20, 1_000, 1_500), Timings(0.01, 0.02, 20),
                          "claude-sonnet-4-5", self.name)

    def stream(self, request):
        yield StreamEvent("", self.complete(request))


def test_a_turns_cache_writes_reach_the_trace_and_the_tracker(tmp_path):
    bus = EventBus()
    agent = AgentSpec(name="solo", role="You answer.", tools=[])
    with TraceStore(tmp_path / "traces.db") as traces:
        traces.attach(bus)
        team = Team({"solo": agent}, lambda _: CachingModel(), Workspace(tmp_path))
        with bus.span("run", "run test", "r1") as span:
            run_turn(agent, [Message("user", "Hi")], team, span)
        [record] = TokenTracker.from_traces(traces, "r1").records
    assert record.usage == Usage(3_000, 20, 1_000, 1_500)
    assert record.cost is not None and record.cost.cache_write == Decimal("0.005625")
