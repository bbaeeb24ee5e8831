"""`pyagent fuzz` as a user runs it: real processes on a tiny model, the garak-style logs, the
trace store and metrics, a clean stop on SIGTERM, reproducibility by seed, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fails_with, pyagent
from pyagent.observe.events import EventBus
from pyagent.observe.metrics import MetricsFeed, MetricsRegistry
from pyagent.observe.traces import TraceReader
from pyagent.security.fuzzrun import read_records

CAMPAIGN = ("fuzz", "--attack", "direct-canary-call", "--attack", "important-tool",
            "--channel", "tool_output", "--defense", "none", "--defense", "delimit",
            "--task", "meeting-time")


def test_campaign_logs_every_attempt_and_is_reproducible_by_seed(agent_model_dir,
                                                                  tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    ran = pyagent(*CAMPAIGN, "--model", str(agent_model_dir), "--seed", "7", "--out", str(first))
    assert ran.returncode == 0, ran.stderr
    records = read_records(first / "fuzz.report.jsonl")
    # a benign run + 2 attacks on one channel, under each of 2 defense sets
    assert len(records) == 2 * (1 + 2)
    assert {r["task"] for r in records} == {"meeting-time"}
    entries = [json.loads(line) for line in (first / "fuzz.report.jsonl").read_text().splitlines()]
    assert entries[0]["entry_type"] == "start_run setup"
    assert entries[-1]["entry_type"] == "completion"
    assert sum(e["entry_type"] == "eval" for e in entries) == len(records)
    hits = (first / "fuzz.hitlog.jsonl").read_text().splitlines()
    assert len(hits) == sum(r["hit"] for r in records)
    summary = json.loads((first / "fuzz.json").read_text())
    assert set(summary["summary"]["by_defense"]) == {"none", "delimit"}
    assert (first / "fuzz.html").read_text().count("<svg") >= 2
    with TraceReader(first / "traces.db") as reader:
        verdicts = [e for _, e in reader.events_after(0, limit=100_000)
                    if e.kind == "goal" and e.phase == "end"]
    assert len(verdicts) == len(records)
    registry = MetricsRegistry()  # what `pyagent observe` computes from the trace store
    feed, bus = MetricsFeed(registry), EventBus()
    feed.attach(bus)
    for event in verdicts:
        bus.publish(event)
    attacked = [r for r in records if r["attack"] is not None]
    assert registry.query("pyagent_fuzz_utility_total", "value", {"attacked": "true"}) == \
        len(attacked)
    for defense in ("none", "delimit"):
        mine = [r for r in attacked if r["defense"] == defense]
        assert registry.query("pyagent_fuzz_attack_success_ratio", "value",
                              {"defense": defense}) == sum(r["hit"] for r in mine) / len(mine)
    again = pyagent(*CAMPAIGN, "--model", str(agent_model_dir), "--seed", "7", "--out",
                    str(second))
    assert again.returncode == 0, again.stderr
    twice = read_records(second / "fuzz.report.jsonl")
    strip = ("wall_s", "run")
    assert [{k: v for k, v in r.items() if k not in strip} for r in twice] == \
        [{k: v for k, v in r.items() if k not in strip} for r in records]
    rebuilt = pyagent("fuzz", "report", str(first))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "delimit" in rebuilt.stdout


def test_continuous_mode_stops_cleanly_on_sigterm(agent_model_dir, tmp_path: Path):
    out, scratch = tmp_path / "continuous", tmp_path / "scratch"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "pyagent", "fuzz", "--continuous", "--interval", "0.5",
         "--attack", "direct-canary", "--channel", "document", "--defense", "none",
         "--model", str(agent_model_dir), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(scratch)})
    report = out / "fuzz.report.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if report.is_file() and len(read_records(report)) >= 2:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "stopped" in stderr
    lines = report.read_text().splitlines()
    assert json.loads(lines[-1])["entry_type"] == "completion"  # closed, not cut
    records = read_records(report)
    assert len(records) >= 2
    data = json.loads((out / "fuzz.json").read_text())
    assert data["complete"] is False and len(data["records"]) == len(records)
    assert not list(scratch.glob("pyagent-fuzz-*"))  # every temporary workspace removed


def test_adaptive_and_static_spend_the_same_budget(agent_model_dir, tmp_path: Path):
    out = tmp_path / "adaptive"
    ran = pyagent("fuzz", "--adaptive", "12", "--goal", "write_canary", "--defense", "none",
                  "--model", str(agent_model_dir), "--out", str(out))
    assert ran.returncode == 0, ran.stderr
    data = json.loads((out / "fuzz.json").read_text())["adaptive"]
    for name in ("static", "adaptive"):
        assert 12 <= data[name]["calls"] <= 12 + 4  # the last run may overshoot by its calls
        assert data[name]["fielded"] >= 1
    assert data["adaptive"]["white_box_passes"] >= 1


@pytest.mark.parametrize(("args", "message"), [
    (("--defense", "bogus"), "unknown defense 'bogus'"),
    (("--family", "nope"), "no family 'nope' in the corpus"),
    (("--channel", "smoke"), "unknown channel 'smoke'"),
    (("--mutator", "base64+zap"), "unknown mutator 'zap'"),
    (("--position", "top"), "unknown position 'top'"),
    (("--target", "moon"), "unknown target 'moon'"),
    (("--task", "dance"), "has none of the tasks dance"),
    (("--adaptive", "5", "--backend", "replay", "--recording", "x.jsonl"),
     "--adaptive needs the embedded backend"),
])
def test_bad_input_is_one_clear_error(args: tuple[str, ...], message: str, tmp_path: Path,
                                      agent_model_dir):
    fails_with(pyagent("fuzz", *args, "--model", str(agent_model_dir), "--out",
                       str(tmp_path / "out")), message)


def test_a_corrupt_corpus_names_its_line(tmp_path: Path):
    corpus = tmp_path / "attacks.yaml"
    corpus.write_text("attacks:\n  - id: a\n    family: direct\n    goal: fly\n    text: x\n")
    fails_with(pyagent("fuzz", "--attacks", str(corpus), "--out", str(tmp_path / "o")),
               "attacks.yaml")


def test_report_skips_a_last_line_cut_by_a_kill_and_names_a_bad_one(tmp_path: Path):
    report = tmp_path / "fuzz.report.jsonl"
    attempt = {"entry_type": "attempt", "defense": "none", "attack": None, "utility": True,
               "hit": False, "attempted": False, "controls": {}, "mutators": []}
    report.write_text(json.dumps(attempt) + '\n{"entry_type": "attem')
    assert len(read_records(report)) == 1
    report.write_text('{"entry_type": "att\n' + json.dumps(attempt) + "\n")
    fails_with(pyagent("fuzz", "report", str(tmp_path)), "fuzz.report.jsonl:1: not a JSON line")
    fails_with(pyagent("fuzz", "report", str(tmp_path / "nowhere")), "cannot read")
    report.write_text(json.dumps({"entry_type": "attempt", "hit": True}) + "\n")
    fails_with(pyagent("fuzz", "report", str(tmp_path)), "an attempt without attack, attempted")
