"""Each benchmark's headline figures and its targets (as BENCHMARKS.md states them), judged from
the result's own figures. A benchmark not listed here gets a summary line without targets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyagent.bench.kvreport import targets as kv_targets
from pyagent.bench.report.fmt import quantity, unit_of
from pyagent.errors import ConfigError

Data = Mapping[str, Any]
SEP = "|"  # joins the keys of a path


@dataclass(frozen=True)
class Check:
    """A target, what was measured, and whether it was met."""

    target: str
    measured: str
    met: bool


@dataclass
class Summary:
    """One result's line in a report's summary."""

    name: str
    headlines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def at(data: Any, path: str) -> Any:
    """The value at `path` of `data`, keys joined by "|" (keys hold dots); a missing one is an
    error naming the field."""
    value = data
    for part in path.split(SEP):
        if not isinstance(value, Mapping) or part not in value:
            raise ConfigError(f"field {path.replace(SEP, '.')}: missing")
        value = value[part]
    return value


def num(data: Any, path: str) -> float:
    """The number at a dotted `path`; anything else is an error naming the field."""
    value = at(data, path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"field {path.replace(SEP, '.')}: expected a number, got {value!r}")
    return value


def figure(data: Data, path: str, name: str | None = None) -> str:
    """`name: value unit` for the number at `path`."""
    where = path.split(SEP)
    return f"{name or where[-1]}: {quantity(num(data, path), unit_of('.'.join(where)))[0]}"


def engine(data: Data) -> Summary:
    summary = at(data, "summary")
    out = Summary("engine", [figure(data, f"summary|{e}|decode_tok_s|median", f"{e} decode")
                             for e in summary  # None: a worker that only loads
                             if at(data, f"summary|{e}|decode_tok_s") is not None])
    ratios = at(data, "ratios_over_llamacpp")
    if "embedded-int8" in ratios:
        ratio = num(data, "ratios_over_llamacpp|embedded-int8|decode_tok_s")
        out.checks.append(Check("int8 decode >= 0.5x llama.cpp", f"{ratio:.2f}x", ratio >= 0.5))
    if "embedded-auto" in ratios:  # the engine-speed targets, on the default (auto, drafts)
        ratio = num(data, "ratios_over_llamacpp|embedded-auto|decode_tok_s")
        out.checks.append(Check("default decode >= 1.0x llama.cpp", f"{ratio:.2f}x",
                                ratio >= 1.0))
        rewrite = (num(data, "summary|embedded-auto|rewrite_tok_s|median")
                   / num(data, "summary|llamacpp|decode_tok_s|median"))
        out.checks.append(Check("default agent rewrite >= 2x llama.cpp's plain decode",
                                f"{rewrite:.2f}x", rewrite >= 2.0))
    if "identical" in data:
        same, compared = num(data, "identical|identical"), num(data, "identical|compared")
        out.checks.append(Check("greedy text the same with and without drafts",
                                f"{same:g} of {compared:g}", same == compared > 0))
    return out


def batching(data: Data) -> Summary:
    out = Summary("batching")
    for weights in at(data, "results"):
        out.headlines.append(figure(data, f"results|{weights}|aggregate_tok_s",
                                    f"{weights}, 8 clients"))
        ratio = num(data, f"results|{weights}|ttft_p95_ratio")
        out.checks.append(Check(f"{weights}: p95 TTFT under load < 2x unloaded", f"{ratio:.2f}x",
                                ratio < 2))
        if "throughput_ratio" in at(data, f"results|{weights}"):  # the engine-speed target
            ratio = num(data, f"results|{weights}|throughput_ratio")
            out.checks.append(Check(f"{weights}: 8 concurrent >= 4x single stream",
                                    f"{ratio:.2f}x", ratio >= 4))
    return out


def driver_thread(data: Data) -> Summary:
    return Summary("driver thread", [figure(data, f"decode_pass_ms|{where}", where)
                                     for where in at(data, "decode_pass_ms")])


def precision_quality(data: Data) -> Summary:
    out = Summary("precision quality")
    for weights, paths in at(data, "perplexity_ratio").items():
        for path in paths if weights != "float32" else ():
            ratio = num(data, f"perplexity_ratio|{weights}|{path}")
            out.checks.append(Check(f"{weights} {path}: perplexity within 1% of float32",
                                    f"{(ratio - 1) * 100:+.2f}%", ratio <= 1.01))
    return out


def kv(data: Data) -> Summary:
    speed = num(data, "prefix_sharing|ttft_speedup")
    return Summary("KV cache", [f"shared-prefix first token {speed:.1f}x sooner",
                                figure(data, "speed|median_tokens_per_s|paged+pyagent",
                                       "decode with eviction")],
                   [Check(c["target"], c["measured"], c["met"]) for c in kv_targets(data)])


def fleet_modes(data: Data) -> Summary:
    runs = [example for example in at(data, "summary") if example != "all"]  # "all": sums
    wall = {mode: sum(num(data, f"summary|{example}|{mode}|wall_s") for example in runs)
            for mode in ("sequenced", "handover")}
    ratio = wall["sequenced"] / wall["handover"]
    return Summary("fleet modes", [figure(data, f"summary|{example}|wall_ratio_sequenced_over_"
                                          "handover", f"{example}: sequenced / handover wall")
                                   for example in runs],
                   [Check("sequenced mode takes >= 30% less time than hand-over",
                          f"{(1 - ratio) * 100:.0f}% less", ratio <= 0.7)])


def orchestration_overhead(data: Data) -> Summary:
    ours = num(data, "results|pyagent + sqlite checkpoints|us_per_step_median")
    theirs = num(data, "results|langgraph + sqlite checkpoints|us_per_step_median")
    return Summary("orchestration overhead",
                   [figure(data, f"results|{v}|us_per_step_median", v)
                    for v in at(data, "results")],
                   [Check("per-step overhead with SQLite checkpoints below LangGraph's",
                          f"{ours / theirs:.2f}x LangGraph's", ours < theirs)])


def metrics_overhead(data: Data) -> Summary:
    ours = num(data, "timings|PyAgent Histogram.observe, amortized with folding|median_ns")
    prometheus = num(data, "timings|prometheus_client Histogram.observe|median_ns")
    error = max(num(data, f"quantile_error|{q}|relative_error")
                for q in at(data, "quantile_error"))
    return Summary("metrics overhead", [f"PyAgent observe: {ours:.0f} ns",
                                        f"prometheus_client observe: {prometheus:.0f} ns"],
                   [Check("an observation costs less than prometheus_client's",
                          f"{ours / prometheus:.2f}x", ours < prometheus),
                    Check("quantile error <= 1%", f"at most {error * 100:.2f}%", error <= 0.01)])


def memory_profiler(data: Data) -> Summary:
    overhead = num(data, "results|overhead|MemoryProfiler (0.5 s)|overhead_pct")
    leaks = at(data, "results|leaks")
    fewest = at(data, "results|leaks|leak 1 MiB/iteration|fewest_iterations")
    false = sum(num(data, f"results|leaks|{w}|leaking_runs") for w, v in leaks.items()
                if isinstance(v, Mapping) and not w.startswith("leak"))
    return Summary("memory profiler", [figure(data, "results|sample_cost_us", "one sample")],
                   [Check("profiler overhead <= 5%", f"{overhead:+.1f}%", overhead <= 5),
                    Check("a 1 MiB/iteration leak found within 20 iterations",
                          f"after {fewest}", isinstance(fewest, int) and fewest <= 20),
                    Check("no leak reported on stable or sawtooth memory",
                          f"{false} false positives", false == 0)])


def token_strategies(data: Data) -> Summary:
    prices = at(data, "checks|prices")
    return Summary("token strategies",
                   [f"{model}: caching, compaction and batch prices save "
                    f"{num(data, f'money|{model}|compound_saving') * 100:.0f}%"
                    for model in at(data, "money")],
                   [Check("tracker totals equal the recorded usage",
                          str(at(data, "checks|usage_sums")),
                          at(data, "checks|totals_equal_usage") is True),
                    Check("costs equal genai-prices' own calc_price",
                          f"{sum(bool(p.get('equal')) for p in prices)}/{len(prices)} equal",
                          all(p.get("equal") is True for p in prices))])


BENCHMARKS: dict[str, Callable[[Data], Summary]] = {
    "engine": engine, "batching": batching, "driver_thread": driver_thread,
    "precision_quality": precision_quality, "kv": kv, "fleet_modes": fleet_modes,
    "orchestration_overhead": orchestration_overhead, "metrics_overhead": metrics_overhead,
    "memory_profiler": memory_profiler, "token_strategies": token_strategies,
}


def benchmark_name(name: str, data: Data) -> str:
    """The benchmark a result belongs to: its `benchmark` field, `kv` for the KV suite's shape,
    else the file's name."""
    if isinstance(data.get("benchmark"), str):
        return data["benchmark"]
    if {"plan", "methods", "rows", "speed"} <= data.keys():
        return "kv"
    return name


def summarize(name: str, data: Data) -> Summary:
    """The summary line of benchmark result `data` (file `name`)."""
    spec = BENCHMARKS.get(benchmark_name(name, data))
    summary = spec(data) if spec else Summary(name)
    summary.name = name
    if isinstance(data.get("targets"), list):  # targets a result judged itself
        summary.checks += [Check(str(c.get("target")), str(c.get("measured")),
                                 c.get("met") is True)
                           for c in data["targets"] if isinstance(c, Mapping)]
    return summary
