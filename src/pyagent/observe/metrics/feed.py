"""`MetricsFeed`: turns the runtime's events into metrics.

From `llm_call` spans, per agent and model: `pyagent_llm_calls_total{status}`,
`pyagent_tokens_total{kind="input|output|cached"}`, `pyagent_llm_latency_seconds` (from
`duration_s`) and `pyagent_time_to_first_token_seconds` (when the span carries
`pyagent.time_to_first_token_s`). From `tool_call` spans: `pyagent_tool_calls_total{tool,status}`
and `pyagent_tool_latency_seconds{tool}`. From `step` spans: `pyagent_steps_total{status}`. Every
span that ends in phase "error" counts in `pyagent_errors_total{kind,error_type}`, `kind` being the
span's kind. Latencies come from spans that end well; `status` is "ok" or "error".

From the fuzzer's verdicts (`goal` spans carrying `pyagent.fuzz.outcome`):
`pyagent_fuzz_attempts_total{target,family,channel,defense,outcome}` (outcome: hit, attempted,
miss, benign), `pyagent_fuzz_utility_total{defense,attacked,status}`, and the gauge
`pyagent_fuzz_attack_success_ratio{defense}`: hits over attacks since the observer started.

An LLM call's agent is the `gen_ai.agent.name` of its parent `agent` span: the feed remembers
open agent spans by id and forgets each when it ends.
"""

from __future__ import annotations

from collections.abc import Callable

from pyagent.observe.events import Event, EventBus
from pyagent.observe.metrics.registry import MetricsRegistry

TIME_TO_FIRST_TOKEN = "pyagent.time_to_first_token_s"
TOKEN_KINDS = (("input", "gen_ai.usage.input_tokens"), ("output", "gen_ai.usage.output_tokens"),
               ("cached", "pyagent.usage.cached_tokens"))
UNKNOWN_AGENT = "unknown"


class MetricsFeed:
    """Records the runtime's events as metrics in `registry` once attached to an event bus."""

    def __init__(self, registry: MetricsRegistry):
        model = ("agent", "model")
        self.llm_calls = registry.counter("pyagent_llm_calls_total", "LLM calls.",
                                          (*model, "status"))
        self.tokens = registry.counter("pyagent_tokens_total", "Tokens, by kind.", (*model, "kind"))
        self.llm_latency = registry.histogram("pyagent_llm_latency_seconds",
                                              "Duration of LLM calls that succeeded.", model)
        self.time_to_first_token = registry.histogram(
            "pyagent_time_to_first_token_seconds", "Time to the first token of LLM calls.", model)
        self.tool_calls = registry.counter("pyagent_tool_calls_total", "Tool calls.",
                                           ("tool", "status"))
        self.tool_latency = registry.histogram("pyagent_tool_latency_seconds",
                                               "Duration of tool calls that succeeded.", ("tool",))
        self.errors = registry.counter("pyagent_errors_total", "Spans that ended in an error.",
                                       ("kind", "error_type"))
        self.steps = registry.counter("pyagent_steps_total", "Manifest steps run.", ("status",))
        self.fuzz_attempts = registry.counter(
            "pyagent_fuzz_attempts_total", "Fuzzer attempts, by outcome.",
            ("target", "family", "channel", "defense", "outcome"))
        self.fuzz_utility = registry.counter(
            "pyagent_fuzz_utility_total", "Fuzzed tasks by whether their checker passed.",
            ("defense", "attacked", "status"))
        self.fuzz_asr = registry.gauge(
            "pyagent_fuzz_attack_success_ratio", "Attacks that reached their goal, of all "
            "attacks judged since the observer started.", ("defense",))
        self._fuzz: dict[str, list[int]] = {}  # defense -> [hits, attacks]
        self._agents: dict[str, str] = {}  # open agent span id -> agent name

    def attach(self, bus: EventBus) -> Callable[[], None]:
        """Record every event `bus` publishes from now on; returns a function that stops it."""
        return bus.subscribe(self.record)

    def record(self, event: Event) -> None:
        """Turn one event into metrics."""
        if event.kind == "agent":
            if event.phase == "start":
                self._agents[event.span_id] = str(event.attributes.get("gen_ai.agent.name",
                                                                       UNKNOWN_AGENT))
            else:
                self._agents.pop(event.span_id, None)
        if event.phase == "start":
            return
        ok = event.phase == "end"
        status = "ok" if ok else "error"
        if not ok:
            self.errors.labels(kind=event.kind,
                               error_type=event.attributes.get("error.type", "unknown")).inc()
        if event.kind == "llm_call":
            self._llm_call(event, status)
        elif event.kind == "tool_call":
            tool = event.attributes.get("gen_ai.tool.name") or event.name.removeprefix(
                "execute_tool ")
            self.tool_calls.labels(tool=tool, status=status).inc()
            if ok:
                self.tool_latency.labels(tool=tool).observe(event.attributes["duration_s"])
        elif event.kind == "step":
            self.steps.labels(status=status).inc()
        elif event.kind == "goal" and "pyagent.fuzz.outcome" in event.attributes:
            self._fuzz_verdict(event.attributes)

    def _fuzz_verdict(self, attributes: dict) -> None:
        outcome, defense = str(attributes["pyagent.fuzz.outcome"]), \
            str(attributes.get("pyagent.fuzz.defense", ""))
        self.fuzz_attempts.labels(target=str(attributes.get("pyagent.fuzz.target", "")),
                                  family=str(attributes.get("pyagent.fuzz.family", "")),
                                  channel=str(attributes.get("pyagent.fuzz.channel", "")),
                                  defense=defense, outcome=outcome).inc()
        attacked = outcome != "benign"
        self.fuzz_utility.labels(defense=defense, attacked=str(attacked).lower(),
                                 status="passed" if attributes.get("pyagent.fuzz.utility")
                                 else "failed").inc()
        if attacked:
            tally = self._fuzz.setdefault(defense, [0, 0])
            tally[0] += outcome == "hit"
            tally[1] += 1
            self.fuzz_asr.labels(defense=defense).set(tally[0] / tally[1])

    def _llm_call(self, event: Event, status: str) -> None:
        attributes = event.attributes
        series = {"agent": self._agents.get(event.parent_id or "", UNKNOWN_AGENT),
                  "model": attributes.get("gen_ai.request.model") or event.name.removeprefix(
                      "chat ")}
        self.llm_calls.labels(**series, status=status).inc()
        if status != "ok":
            return
        for kind, key in TOKEN_KINDS:
            tokens = attributes.get(key)
            if tokens is not None:
                self.tokens.labels(**series, kind=kind).inc(tokens)
        self.llm_latency.labels(**series).observe(attributes["duration_s"])
        if TIME_TO_FIRST_TOKEN in attributes:
            self.time_to_first_token.labels(**series).observe(attributes[TIME_TO_FIRST_TOKEN])
