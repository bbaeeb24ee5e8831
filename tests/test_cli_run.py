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


def show_rows(stdout):
    """The step rows of `runs show`: step, round, agent, status, in, out, cached."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in stdout.splitlines()
            if line.startswith("│") and "│ step " not in line]
    return [(r[0], int(r[1]), r[3], r[4], int(r[5]), int(r[6]), int(r[7])) for r in rows]


def totals_of(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("tokens: "))
    words = line.replace("(", " ").split()
    return int(words[1]), int(words[5])  # prompt, output


def test_run_then_list_and_show(tiny_long, workspace, tmp_path):
    data = tmp_path / ("a-data-folder-with-a-long-name-" * 3)  # lines longer than 80 columns
    result = pyagent(*run_args(tiny_long, workspace, data, "first"))
    assert result.returncode == 3, result.stderr  # random weights do not fix the bug
    assert "run first: goal not met" in result.stdout and "done step code" in result.stderr
    assert "goal check failed (The project's tests pass.): run_tests: [exit code 1" in result.stdout
    assert "loop 'fix' ran out of rounds without its condition holding" in result.stdout
    assert f"checkpoints in {data})" in result.stdout  # never wrapped, whatever its length
    listed = pyagent("runs", "list", "--data", str(data))
    assert "first" in listed.stdout and "goal_not_met" in listed.stdout
    assert f"runs in {data}" in listed.stdout and f" {EXAMPLE / 'manifest.yaml'} " in listed.stdout
    shown = pyagent("runs", "show", "first", "--data", str(data))
    assert shown.returncode == 0 and "coder" in shown.stdout and "tester" in shown.stdout
    assert "cost unknown" in shown.stdout and "no price known for model" in shown.stderr
    rows = show_rows(shown.stdout)
    assert [(step, rnd) for step, rnd, *_ in rows] == [
        ("code", 1), ("test", 1), ("code", 2), ("test", 2), ("code", 3), ("test", 3)]
    assert {status for *_, status, _, _, _ in rows} == {"ok"}
    assert totals_of(shown.stdout) == (sum(r[4] for r in rows), sum(r[5] for r in rows))
    assert "skipped (condition false): audit" in shown.stdout
    assert "goal (The project's tests pass.): not met" in shown.stdout
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
    assert handover.returncode == 3, handover.stderr
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
    assert result.returncode == 1 and "broken.yaml:25: unknown agent 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr
    for command in (("resume", "nope"), ("runs", "show", "nope"), ("runs", "list"),
                    ("runs", "report", "nope")):
        missing = pyagent(*command, "--data", str(tmp_path / "nothing"))
        assert missing.returncode == 1 and "no runs in" in missing.stderr
        assert not (tmp_path / "nothing").exists()  # reading creates nothing


HOSTILE = {
    "selfref.yaml": ("name: x\nagents: &a [*a]\n", "selfref.yaml:2: an alias refers to a node"),
    "dup.yaml": ("name: x\nname: y\n", "dup.yaml:2: duplicate key 'name' (first at line 1)"),
    "open.yaml": ('name: "x\nagents: a\n', "open.yaml:1: not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_yaml_is_one_line_and_exit_1(name, workspace, tmp_path):
    text, expected = HOSTILE[name]
    (tmp_path / name).write_text(text)
    result = pyagent("run", str(tmp_path / name), "--task", "x", "--workspace", str(workspace),
                     "--data", str(tmp_path / "d"))
    assert result.returncode == 1 and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_template_that_fails_at_run_time_marks_the_run_failed(tiny_long, workspace, tmp_path):
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("project"))
    path = folder / "manifest.yaml"
    path.write_text(path.read_text().replace("Task: {{ task }}", "{{ 'a' * 10**10 }}"))
    data = tmp_path / "data"
    result = pyagent("run", str(path), "--task", "x", "--workspace", str(workspace),
                     "--model", str(tiny_long), "--data", str(data), "--run-id", "big")
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert (f"{path}:20: steps.0.loop.steps.0.instruction: cannot render: SecurityError: the "
            "template asks for 10,000,000,000 characters") in result.stdout
    listed = pyagent("runs", "list", "--data", str(data))
    assert "│ big " in listed.stdout and "error" in listed.stdout


def test_a_run_killed_with_sigkill_resumes(tiny_long, workspace, tmp_path):
    data = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-m", "pyagent",
                                *run_args(tiny_long, workspace, data, "killed")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it in the middle of a step
        if (data / "checkpoints.db").exists():
            store = SQLiteCheckpointStore(data / "checkpoints.db")
            count = len(store.list("killed"))
            store.close()
            with TraceStore(data / "traces.db") as traces:
                in_step = any(s.kind == "step" and s.status == "running"
                              for s in traces.spans("killed"))
            if count >= 3 and in_step:
                break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    store = SQLiteCheckpointStore(data / "checkpoints.db")
    before = store.get("killed").state
    store.close()
    assert before["status"] == "running"
    listed = pyagent("runs", "list", "--data", str(data))
    assert "│ killed │ interrupted " in listed.stdout  # its process is gone
    elsewhere = tmp_path / "elsewhere"  # the manifest was given by a relative path
    elsewhere.mkdir()
    resumed = pyagent("resume", "killed", "--data", str(data), cwd=elsewhere)
    assert resumed.returncode == 3, resumed.stderr
    assert "run killed: goal not met" in resumed.stdout
    traces = TraceStore(data / "traces.db")
    spans = traces.spans("killed")
    traces.close()
    completed = [(s.attributes["pyagent.step.id"], s.attributes["pyagent.loop.iteration"])
                 for s in spans if s.kind == "step" and s.status == "ok"]
    assert len(completed) == len(set(completed))  # no completed step ran twice
    assert set(before["outputs"]) <= {step for step, _ in completed}
    assert not [s for s in spans if s.status == "running"]
    interrupted = [s for s in spans if s.status == "interrupted"]
    assert {s.kind for s in interrupted} >= {"run", "step"}  # the killed attempt, closed
    shown = pyagent("runs", "show", "killed", "--data", str(data))
    rows = show_rows(shown.stdout)
    assert "interrupted" in {row[3] for row in rows}
    assert totals_of(shown.stdout) == (sum(r[4] for r in rows), sum(r[5] for r in rows))


def kill_after(args, data, run_id, checkpoints, cwd=None):
    """Start `pyagent run`, SIGKILL it once `checkpoints` are stored; the state it left."""
    process = subprocess.Popen([sys.executable, "-m", "pyagent", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (data / "checkpoints.db").exists():
            store = SQLiteCheckpointStore(data / "checkpoints.db")
            count = len(store.list(run_id))
            store.close()
            if count >= checkpoints:
                break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def commits(wal: bytes) -> list[int]:
    """Offsets in a SQLite write-ahead log just past each committing frame."""
    page = int.from_bytes(wal[8:12], "big")
    ends, offset = [], 32
    while offset + 24 + page <= len(wal):
        offset += 24 + page
        if int.from_bytes(wal[offset - 24 - page + 4:offset - page - 16], "big"):
            ends.append(offset)
    return ends


def test_resume_is_exact_or_refuses(tiny_long, workspace, tmp_path):
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("project"))
    data = tmp_path / "data"
    args = ["run", "example/manifest.yaml", "--task", "Fix remove()", "--workspace",
            str(workspace), "--model", str(tiny_long), "--data", str(data), "--run-id", "r"]
    kill_after(args, data, "r", 4, cwd=tmp_path)
    wal = data / "checkpoints.db-wal"
    damaged = bytearray(wal.read_bytes())  # the last two commits in the write-ahead log go bad
    start = commits(damaged)[-3]  # (of any two saves in a row, one is a step's)
    damaged[start:] = bytes(len(damaged) - start)
    wal.write_bytes(bytes(damaged))
    refused = pyagent("resume", "r", "--data", str(data))
    assert refused.returncode == 1, refused.stdout
    assert "the store lost checkpoints" in refused.stderr and "refusing" in refused.stderr


def test_resume_refuses_an_edited_manifest(tiny_long, workspace, tmp_path):
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("project"))
    data = tmp_path / "data"
    args = ["run", str(folder / "manifest.yaml"), "--task", "Fix remove()", "--workspace",
            str(workspace), "--model", str(tiny_long), "--data", str(data), "--run-id", "e"]
    kill_after(args, data, "e", 3)
    manifest = folder / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("max_iterations: 3", "max_iterations: 1"))
    refused = pyagent("resume", "e", "--data", str(data))
    assert refused.returncode == 1 and "changed since run 'e' started" in refused.stderr
    forced = pyagent("resume", "e", "--data", str(data), "--force")
    assert forced.returncode == 3, forced.stderr
