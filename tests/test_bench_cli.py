"""`pyagent bench run` as a user runs it: a real process on a tiny model, every output format,
a recording replayed to the same grades, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

from conftest import fails_with, pyagent


def test_bench_run_writes_every_format_and_replays_to_the_same_grades(agent_model_dir,
                                                                      tmp_path: Path):
    recording, first, second = tmp_path / "rec.jsonl", tmp_path / "first", tmp_path / "second"
    common = ("bench", "run", "reasoning", "--limit", "1")
    ran = pyagent(*common, "--model", str(agent_model_dir), "--record", str(recording),
                  "--concurrency", "4", "--out", str(first))
    assert ran.returncode == 0, ran.stderr
    assert "accuracy % by family and difficulty" in ran.stdout
    for name in ("suites.json", "suites.sqlite", "suites.html", "suites-attempts.csv",
                 "suites-families.csv", "suites-difficulties.csv", "suites-overall.csv"):
        assert (first / name).is_file(), name
    result = json.loads((first / "suites.json").read_text())
    families = {r["family"] for r in result["records"]}
    assert len(families) == 7 and result["meta"]["command"]
    with (first / "suites-attempts.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(result["records"]) == 21
    with sqlite3.connect(first / "suites.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM attempts").fetchone() == (21,)
    replayed = pyagent(*common, "--backend", "replay", "--recording", str(recording),
                       "--executor", "asyncio", "--concurrency", "4", "--out", str(second))
    assert replayed.returncode == 0, replayed.stderr
    again = json.loads((second / "suites.json").read_text())
    assert [(r["item_id"], r["parsed"], r["score"]) for r in again["records"]] == \
        [(r["item_id"], r["parsed"], r["score"]) for r in result["records"]]


def test_bench_run_bad_input_is_one_clear_error(tmp_path: Path):
    out = str(tmp_path / "out")
    fails_with(pyagent("bench", "run", "nonsense", "--out", out), "unknown suite or family")
    fails_with(pyagent("bench", "run", "reasoning.nope", "--out", out), "has no family 'nope'")
    fails_with(pyagent("bench", "run", "reasoning", "--split", "dev", "--out", out),
               "unknown split 'dev'")
    fails_with(pyagent("bench", "run", "reasoning", "--repeat", "3", "--out", out),
               "needs --temperature")
    fails_with(pyagent("bench", "run", "reasoning", "--difficulty", "x", "--out", out),
               "--difficulty must be integers")
    fails_with(pyagent("bench", "run", "reasoning", "--limit", "0", "--out", out),
               "--limit must be at least 1")
    fails_with(pyagent("bench", "run", "lateral", "--difficulty", "1", "--out", out),
               "family 'lateral' cannot make items at difficulty 1")
    fails_with(pyagent("bench", "run", "convergent", "--difficulty", "0", "--out", out),
               "difficulties must be integers >= 1")
    assert not Path(out).exists()


def test_bench_analyze_finds_the_bottleneck_and_gates_on_regressions(tmp_path: Path):
    from pyagent.bench.synthetic import result_pair, trace_set

    store = trace_set(tmp_path / "traces.db", "tools", seed=3).path
    analyzed = pyagent("bench", "analyze", str(store), "--out", str(tmp_path / "analysis"))
    assert analyzed.returncode == 0, analyzed.stderr
    assert "## Bottlenecks" in analyzed.stdout and "| 1 | tools |" in analyzed.stdout
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert data["bottlenecks"][0]["kind"] == "tools" and data["meta"]["command"]
    assert (tmp_path / "analysis" / "analysis.html").is_file()
    baseline, candidate = result_pair(tmp_path, seed=5, n=20, shift=("latency_s", 1.8))
    gated = pyagent("bench", "analyze", "--baseline", str(baseline), str(candidate),
                    "--fail-on-regression")
    fails_with(gated, "significant regression(s): latency_s")
    same = pyagent("bench", "analyze", "--baseline", str(baseline), str(baseline),
                   "--fail-on-regression")
    assert same.returncode == 0, same.stderr
    fails_with(pyagent("bench", "analyze", str(tmp_path / "missing.json")), "missing.json")
