"""`pyagent run`, `resume` and `runs` as a user runs them, including a run killed with SIGKILL."""

import os
import shutil
import signal
import subprocess
import sys
import time
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
