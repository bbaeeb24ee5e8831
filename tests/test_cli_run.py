"""`pyagent run`, `resume` and `runs` as a user runs them, including a run killed with SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from pyagent.observe.traces import TraceStore
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore

EXAMPLE = Path(__file__).parents[1] / "examples" / "bugfix"


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-run"), context=16384)


@pytest.fixture
def workspace(tmp_path):
    target = tmp_path / "workspace"
    shutil.copytree(EXAMPLE / "project", target)
    return target


def pyagent(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pyagent", *args], capture_output=True,
                          text=True, timeout=600, **kw)


def run_args(tiny_long, workspace, data, run_id):
    return ["run", str(EXAMPLE / "manifest.yaml"), "--task", "Fix remove() in stock.py",
            "--workspace", str(workspace), "--model", str(tiny_long), "--data", str(data),
            "--run-id", run_id]


def test_run_then_list_and_show(tiny_long, workspace, tmp_path):
    data = tmp_path / "data"
    result = pyagent(*run_args(tiny_long, workspace, data, "first"))
    assert result.returncode == 0, result.stderr
    assert "run first: ok" in result.stdout and "done step code" in result.stderr
    listed = pyagent("runs", "list", "--data", str(data))
    assert "first" in listed.stdout and "ok" in listed.stdout
    shown = pyagent("runs", "show", "first", "--data", str(data))
    assert shown.returncode == 0 and "coder" in shown.stdout and "tester" in shown.stdout
    assert "cost unknown" in shown.stdout and "no price known for model" in shown.stderr
    traces = TraceStore(data / "traces.db")
    calls = [s for s in traces.spans("first") if s.kind == "llm_call"]
    traces.close()
    prompt = sum(s.attributes["gen_ai.usage.input_tokens"] for s in calls)
    cached = sum(s.attributes["pyagent.usage.cached_tokens"] for s in calls)
    output = sum(s.attributes["gen_ai.usage.output_tokens"] for s in calls)
    (data / "prices.yaml").write_text(
        f"prices:\n  - model: {calls[0].attributes['gen_ai.response.model']}\n"
        "    input_per_mtok: 2\n    output_per_mtok: 10\n    cache_read_per_mtok: 0.5\n")
    priced = pyagent("runs", "show", "first", "--data", str(data))
    expected = (Decimal(prompt - cached) * 2 + Decimal(cached) * Decimal("0.5")
                + Decimal(output) * 10) / 1_000_000
    assert f"tokens: {prompt} prompt ({cached} cached), {output} output" in priced.stdout
    shown_cost = Decimal(priced.stdout.rsplit("cost $", 1)[1].split()[0])
    assert shown_cost == expected
    report = pyagent("runs", "report", "first", "--data", str(data), "--out",
                     str(tmp_path / "reports"))
    assert report.returncode == 0, report.stderr
    written = {p.name for p in (tmp_path / "reports").iterdir()}
    assert written == {"run-first.json", "run-first-calls.csv", "run-first.sqlite",
                       "run-first.html"}
    result = json.loads((tmp_path / "reports" / "run-first.json").read_text())
    assert Decimal(result["tokens"]["totals"]["cost"]) == expected
    assert result["tokens"]["totals"]["calls"] == len(calls)
    other = tmp_path / "other"
    shutil.copytree(EXAMPLE / "project", other)
    handover = pyagent(*run_args(tiny_long, other, data, "second"), "--mode", "handover")
    assert handover.returncode == 0, handover.stderr
    compared = pyagent("runs", "compare", "--baseline", "first", "--candidate", "second",
                       "--data", str(data))
    assert compared.returncode == 0, compared.stderr
    assert "1 tasks" in compared.stdout and f"│ tokens │ {prompt + output} " in compared.stdout
    assert "cost $" in compared.stdout
    unpaired = pyagent("runs", "compare", "--baseline", "first", "--baseline", "second",
                       "--candidate", "second", "--data", str(data))
    assert unpaired.returncode == 1 and "two baseline runs have the same task" in unpaired.stderr
    again = pyagent(*run_args(tiny_long, workspace, data, "first"))
    assert again.returncode == 1 and "already exists; resume it instead" in again.stderr


def test_bad_input_is_one_clear_error(tiny_long, workspace, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text((EXAMPLE / "manifest.yaml").read_text().replace("agent: tester",
                                                                      "agent: nobody"))
    shutil.copy(EXAMPLE / "agents.yaml", tmp_path / "agents.yaml")
    result = pyagent("run", str(broken), "--task", "x", "--workspace", str(workspace),
                     "--model", str(tiny_long), "--data", str(tmp_path / "d"))
    assert result.returncode == 1 and "broken.yaml:17: unknown agent 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr
    missing = pyagent("resume", "nope", "--data", str(tmp_path / "d"))
    assert missing.returncode == 1 and "no run 'nope'" in missing.stderr


def test_a_run_killed_with_sigkill_resumes(tiny_long, workspace, tmp_path):
    data = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-m", "pyagent",
                                *run_args(tiny_long, workspace, data, "killed")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (data / "checkpoints.db").exists():
            store = SQLiteCheckpointStore(data / "checkpoints.db")
            count = len(store.list("killed"))
            store.close()
            if count >= 3:
                break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    store = SQLiteCheckpointStore(data / "checkpoints.db")
    before = store.get("killed").state
    store.close()
    assert before["status"] == "running"
    resumed = pyagent("resume", "killed", "--data", str(data))
    assert resumed.returncode == 0, resumed.stderr
    assert "run killed: ok" in resumed.stdout
    traces = TraceStore(data / "traces.db")
    completed = [(s.attributes["pyagent.step.id"], s.attributes["pyagent.loop.iteration"])
                 for s in traces.spans("killed") if s.kind == "step" and s.status == "ok"]
    traces.close()
    assert len(completed) == len(set(completed))  # no completed step ran twice
    assert set(before["outputs"]) <= {step for step, _ in completed}
