"""The KV benchmark: statistics, task generation, and a whole (micro) run on the tiny model."""

import json
import subprocess
import sys

import pytest

from pyagent.bench.kv import METHODS, QUICK, KVBench, Plan
from pyagent.bench.kvreport import markdown, plot, targets
from pyagent.bench.kvtasks import TaskBuilder
from pyagent.bench.stats import bootstrap_ci
from pyagent.errors import ConfigError

MICRO = Plan(lengths=(128,), ratios=(0.75,), continuation_samples=1, continuation_tokens=8,
             passkey_depths=(0.5,), passkey_samples=1, multikey_samples=1, vartrack_hops=(1,),
             replay_context=128, replay_tokens=16, replay_interval=8, speed_tokens=4,
             speed_context=220, speed_repeats=1, prefix_tokens=64)


def test_bootstrap_interval_brackets_the_mean():
    mean, low, high = bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert mean == pytest.approx(0.3)
    assert low < mean < high
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_tasks_have_the_asked_length_and_hide_their_needle(tiny_engine):
    builder = TaskBuilder(tiny_engine.tokenizer)
    decode = tiny_engine.tokenizer.decode
    passkey = builder.passkey(200, 0.5, seed=3)
    assert len(passkey.context) == 200 and passkey.context[0] == tiny_engine.tokenizer.bos_token_id
    assert f"The pass key is {passkey.answer}" in decode(passkey.context)
    multikey = builder.multikey(300, 4, seed=1)
    assert decode(multikey.context).count("special magic numbers for") == 4
    assert multikey.answer in decode(multikey.context)
    chain = builder.variable_tracking(300, 3, seed=2)
    assert decode(chain.context).count("VAR ") == 2 * (3 + 1) + 2 * 3
    assert builder.passkey(200, 0.5, seed=3) == passkey  # reproducible


def test_a_micro_run_scores_every_method_and_renders(tiny_engine, tmp_path):
    result = KVBench(tiny_engine.loaded, MICRO).run()
    rows = result["rows"]
    samples = {r["sample"] for r in rows}
    assert len(samples) == 5  # continuation, passkey, multikey, vartrack, replay
    for sample in samples:
        methods = sorted(r["method"] for r in rows if r["sample"] == sample)
        assert methods == sorted(m.label for m in METHODS)
    for row in rows:
        if row["method"] == "full":
            assert row["kl"] == 0 and row["quality"] == 1
        else:
            assert 0 <= row["quality"] <= 1
    full = {r["sample"]: r["kv_bytes"] for r in rows if r["method"] == "full"}
    assert all(r["kv_bytes"] < full[r["sample"]] for r in rows if r["method"] != "full")
    text = markdown(result)
    assert "## 128-token contexts" in text and "## Reasoning replay" in text
    plot(result, tmp_path / "kv.png")
    assert (tmp_path / "kv.png").read_bytes()[:4] == b"\x89PNG"
    names = [c["target"] for c in targets(result)]
    assert any("bookkeeping" in n for n in names) and any("prefix" in n for n in names)
    assert result["prefix_sharing"]["shared"]["cached_tokens"] > 0
    json.dumps(result)  # the result is plain data


def test_the_full_cache_must_come_first(tiny_engine):
    with pytest.raises(ConfigError, match="full cache as its first method"):
        KVBench(tiny_engine.loaded, MICRO, methods=METHODS[1:])


def test_quick_plan_stays_small():
    assert QUICK.lengths == (1024,) and len(QUICK.ratios) == 2


@pytest.mark.model
def test_bench_kv_quick_runs_from_the_command_line(engine, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pyagent", "bench", "kv", "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    assert "KV benchmark targets" in result.stdout
    data = json.loads((tmp_path / "kv-quick.json").read_text())
    assert data["meta"]["command"].startswith("pyagent bench kv --quick") or \
        "bench kv --quick" in data["meta"]["command"]
    assert (tmp_path / "kv-quick.md").is_file() and (tmp_path / "kv-quick.png").is_file()
