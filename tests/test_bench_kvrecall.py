"""The KV recall benchmark: held-out samples, summaries and goals, and a quick run on the model."""

import dataclasses
import json
import subprocess
import sys

import pytest

from pyagent.bench.kvrecall import (
    DEV_TEMPLATES,
    QUICK,
    RUN_SEEDS,
    SEEDS_PER_RUN,
    SPLITS,
    TEST_TEMPLATES,
    RecallBench,
    Row,
    build_sample,
    goals,
    markdown,
    parse_lengths,
    parse_methods,
    parse_savings,
    summarize,
)
from pyagent.bench.kvtasks import TaskBuilder
from pyagent.errors import ConfigError


@pytest.fixture(scope="module")
def builder(tiny_engine):
    return TaskBuilder(tiny_engine.tokenizer)


def test_samples_are_reproducible_per_seed(builder):
    first = build_sample(builder, SPLITS["test"], 1024, 7, facts=6)
    assert build_sample(builder, SPLITS["test"], 1024, 7, facts=6) == first
    other = build_sample(builder, SPLITS["test"], 1024, 8, facts=6)
    assert other.context != first.context
    assert [f.number for f in other.facts] != [f.number for f in first.facts]


def test_decoys_look_like_facts_but_are_never_asked(builder, tiny_engine):
    plain = build_sample(builder, SPLITS["test"], 1024, 7, facts=4)
    with_decoys = build_sample(builder, SPLITS["test"], 1024, 7, facts=4, decoys=4)
    assert len(with_decoys.facts) == 4
    text = tiny_engine.tokenizer.decode(with_decoys.context)
    lines = [line for line in text.splitlines() if any(c.isdigit() for c in line)]
    plain_lines = [line for line in tiny_engine.tokenizer.decode(plain.context).splitlines()
                   if any(c.isdigit() for c in line)]
    assert len(lines) >= len(plain_lines) + 4


def test_dev_and_test_seeds_and_templates_are_disjoint(builder):
    dev, test = SPLITS["dev"], SPLITS["test"]
    assert max(dev.seeds(RUN_SEEDS - 1, SEEDS_PER_RUN)) < min(test.seeds(0, 1))
    assert not {t.name for t in DEV_TEMPLATES} & {t.name for t in TEST_TEMPLATES}
    assert len(DEV_TEMPLATES) + len(TEST_TEMPLATES) >= 8
    for split in (dev, test):
        sample = build_sample(builder, split, 1024, split.seeds(0, 1)[0], facts=8)
        assert {f.template for f in sample.facts} == {t.name for t in split.templates}


def test_facts_are_planted_at_their_positions_and_answered_by_their_number(builder,
                                                                             tiny_engine):
    decode = tiny_engine.tokenizer.decode
    sample = build_sample(builder, SPLITS["dev"], 1024, 3, facts=8)
    assert len(sample.context) == 1024 and sample.context[0] == builder.bos
    assert len(sample.continuation) == 129
    templates = {t.name: t for t in DEV_TEMPLATES}
    for fact in sample.facts:
        line = decode(sample.context[fact.start:fact.end])
        assert line.startswith("\n") and line.endswith("\n") and fact.number in line
        assert line.strip().startswith(templates[fact.template].fact.split("{")[0].strip())
        assert 3 <= len(fact.number) <= 6 and fact.number.isdigit()
        assert decode(fact.target).strip() == fact.number
        assert fact.target == builder.ids(templates[fact.template].gap + fact.number)
        assert decode(fact.question).startswith("\nQuestion: ")
    filler = len(sample.context) - 1 - sum(f.end - f.start for f in sample.facts)
    for fact in sample.facts:  # BOS, the filler before its depth, and the facts planted before
        before = sum(f.end - f.start for f in sample.facts if f.depth < fact.depth)
        assert fact.start == 1 + int(fact.depth * filler) + before


def test_options_are_checked():
    assert parse_savings("0.4,0.75") == (0.4, 0.75)
    assert parse_lengths("4096,8192") == (4096, 8192)
    for bad in ("4k", "100"):
        with pytest.raises(ConfigError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("0.4,x", "1.5", "0"):
        with pytest.raises(ConfigError, match="--savings"):
            parse_savings(bad)
    assert parse_methods("tova, snapkv") == ("tova", "snapkv")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        parse_methods("tova,nope")
    with pytest.raises(ConfigError, match="run seed"):
        SPLITS["test"].seeds(RUN_SEEDS, 1)


def test_too_many_facts_for_the_context_is_refused(builder):
    with pytest.raises(ConfigError, match="do not fit"):
        build_sample(builder, SPLITS["test"], 64, 0, facts=8)


def _row(method, saving, protocol, fact, exact=None, nll=None, status="ok"):
    ok = status == "ok"
    return dataclasses.asdict(Row(
        1024, 5, method, saving, protocol, "t", fact, 0.5, status, 1000,
        None if method == "full" else 600, 700, kv_bytes=500 if ok else None,
        peak_bytes=650 if ok else None, peak_bounded=True if ok else None,
        exact=exact, logprob=-1.0 if exact is not None else None, nll=nll,
        note="" if ok else "below the sliding-window layers"))


def test_summary_goals_and_report_from_rows():
    rows = []
    for protocol in ("query_aware", "query_agnostic"):
        rows += [_row("full", 0.0, protocol, i, exact=True) for i in range(4)]
        rows += [_row("pyagent", 0.4, protocol, i, exact=i < 3) for i in range(4)]
        rows += [_row("tova", 0.4, protocol, i, exact=i < 2) for i in range(4)]
        rows += [_row("h2o", 0.4, protocol, i, status="infeasible") for i in range(4)]
    rows += [_row("full", 0.0, "continuation", -1, nll=2.0),
             _row("pyagent", 0.4, "continuation", -1, nll=2.01),
             _row("tova", 0.4, "continuation", -1, nll=2.1),
             _row("h2o", 0.4, "continuation", -1, status="infeasible")]
    summary = summarize(rows)
    by_key = {(e["saving"], e["protocol"], e["method"]): e for e in summary}
    ours = by_key[(0.4, "query_aware", "pyagent")]
    assert ours["recall"] == 0.75 and ours["full_recall"] == 1.0
    assert ours["delta_recall"][0] == pytest.approx(-0.25)
    assert by_key[(0.4, "continuation", "pyagent")]["delta_nll"][0] == pytest.approx(0.01)
    assert "recall" not in by_key[(0.4, "query_aware", "h2o")]
    result = {"plan": dataclasses.asdict(dataclasses.replace(QUICK, savings=(0.4, 0.75))),
              "split": "test", "run_seed": 0, "seeds": {1024: [5]}, "prefill_chunk": 512,
              "methods": ["full", "pyagent", "tova", "h2o"], "rows": rows, "summary": summary,
              "template_recall": {"t": {"n": 4, "recall": 1.0}}}
    result["goals"] = goals(result)
    verdicts = {g["target"]: g for g in result["goals"]}
    assert verdicts["1024 tokens, -40% KV, query-aware: recall >= the best baseline's"]["met"]
    assert not verdicts["1024 tokens, -40% KV, query-aware: recall >= 95% of the full "
                        "cache's"]["met"]
    assert verdicts["1024 tokens, -40% KV: continuation NLL loss <= 0.02 nats"]["met"]
    assert verdicts["1024 tokens, -75% KV: continuation NLL loss <= 0.02 nats"]["measured"] \
        == "not measured in this run"
    text = markdown(result)
    assert "## 1024 tokens, -40% total KV" in text
    assert "| pyagent | 75% (3/4) |" in text and "| h2o | infeasible |" in text
    json.dumps(result)


@pytest.mark.model
def test_a_quick_run_scores_every_fact_with_the_full_cache_as_reference(engine):
    plan = dataclasses.replace(QUICK, facts=4)
    result = RecallBench(engine.loaded, plan, methods=("pyagent",)).run()
    rows = result["rows"]
    assert len(rows) == (1 + len(plan.savings)) * (2 * plan.facts + 1)
    fields = {f.name for f in dataclasses.fields(Row)}
    for row in rows:
        assert set(row) == fields
        if row["status"] == "ok":
            assert None not in (row["kv_bytes"], row["peak_bytes"], row["peak_bounded"])
            assert (row["nll"] is not None) == (row["protocol"] == "continuation")
            assert (row["exact"] is not None) == (row["protocol"] != "continuation")
        else:
            assert row["status"] == "infeasible" and row["note"]
    full = [r for r in rows if r["method"] == "full" and r["protocol"] == "query_aware"]
    assert sum(r["exact"] for r in full) >= 0.75 * len(full)
    assert all(r["budget_bytes"] < r["full_bytes"] for r in rows if r["method"] != "full")
    assert len(result["goals"]) == 5
    json.dumps(result)


def test_the_command_refuses_bad_options_before_loading_the_model():
    result = subprocess.run([sys.executable, "-m", "pyagent", "bench", "kv-recall",
                             "--savings", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--savings must each be in (0, 1)" in result.stderr
    assert "Traceback" not in result.stderr
