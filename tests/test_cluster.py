"""Fleets on a real multi-node Ray cluster on this machine: `pyagent run --ray` with nodes killed
(SIGKILL) during the batch, a history of every acknowledged checkpoint checked afterwards, and no
completed step run twice."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from pyagent.cluster.connect import FAST_FAILURE_DETECTION  # noqa: E402
from pyagent.resilience.history import check_history, read_history  # noqa: E402

EXAMPLE = Path(__file__).parents[1] / "examples" / "bugfix"
TASK = "Fix remove() in stock.py"


def pyagent(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pyagent", *args], capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def cluster():
    """A head (no CPUs: it runs no run, only a replica host) and three worker nodes."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION})
    for _ in range(3):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One straight run of the example on the tiny model, recorded: what every run replays,
    and the outputs a resumed run must reproduce exactly."""
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("recorded")
    model = build_tiny_model(root / "tiny", context=16384)
    workspace = root / "workspace"
    shutil.copytree(EXAMPLE / "project", workspace)
    result = pyagent("run", str(EXAMPLE / "manifest.yaml"), "--task", TASK, "--workspace",
                     str(workspace), "--model", str(model), "--data", str(root / "data"),
                     "--run-id", "straight", "--record", str(root / "rec.jsonl"))
    assert result.returncode == 3, result.stderr  # the tiny model does not fix the bug
    from pyagent.resilience.sqlite_store import SQLiteCheckpointStore

    store = SQLiteCheckpointStore(root / "data" / "checkpoints.db")
    outputs = store.get("straight").state["outputs"]
    store.close()
    return model, root / "rec.jsonl", outputs


def said(outputs: dict) -> dict:
    """A run's outputs as a resumed run must reproduce them."""
    return {k: (v["status"], v["output"] if "agent" in v else None) for k, v in outputs.items()}


def batch_args(model, recording, data, tasks, *extra):
    return ["run", str(EXAMPLE / "manifest.yaml"), "--tasks", str(tasks), "--workspace",
            str(EXAMPLE / "project"), "--backend", "replay", "--recording", str(recording),
            "--replay-delay", "0.3", "--model", str(model), "--data", str(data), *extra]


def acknowledged(history: Path) -> int:
    if not history.exists():
        return 0
    return sum(op["phase"] == "ok" for op in read_history(history))


def chaos(cluster, process, history):
    """Kill two workers at once (k of the k+1 replicas; their disks go with them) and start two
    fresh nodes in their place, then one more later; the times of the kills. (Ray starts nodes
    from the main thread only.)"""
    killed = []
    for wanted, count in ((8, 2), (30, 1)):
        deadline = time.monotonic() + 240
        while acknowledged(history) < wanted and process.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is not None:
            break
        victims = list(cluster.worker_nodes)[:count]
        for node in victims:
            cluster.remove_node(node, allow_graceful=False)
            killed.append(time.time())
        for _ in victims:
            cluster.add_node(num_cpus=2)
    return killed


def test_runs_survive_nodes_killed_mid_batch_with_no_acknowledged_checkpoint_lost(
        cluster, recorded, tmp_path):
    model, recording, straight = recorded
    data, history = tmp_path / "data", tmp_path / "history.jsonl"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"c-{i}", "task": TASK}) + "\n"
                             for i in range(1, 7)))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pyagent", *batch_args(
                model, recording, data, tasks, "--ray", cluster.address, "--replicas", "2",
                "--history", str(history))], stdout=stdout, stderr=stderr)
        killed = chaos(cluster, process, history)
        process.wait(timeout=540)
    stdout, stderr = out.read_text(), err.read_text()
    assert len(killed) == 3, "the batch ended before the nodes could be killed"
    assert process.returncode == 3, stderr[-3000:]  # every run ran to its end: goal not met
    assert stdout.count("goal not met") == 6  # each run's row
    assert "failover" in stderr

    from pyagent.cluster.connect import connect
    from pyagent.cluster.membership import RayMembership, ring_dir
    from pyagent.resilience.ring_store import RingCheckpointStore

    connect(cluster.address)
    store = RingCheckpointStore(RayMembership(ring_dir(data)), k=2)
    report = check_history(read_history(history), store.get)
    assert report.acknowledged > 30 and report.ok, report.violations
    from pyagent.observe.traces import TraceStore

    with TraceStore(data / "traces.db") as traces:
        for i in range(1, 7):
            state = store.get(f"c-{i}").state
            assert state["status"] == "goal_not_met"
            # resumed on other nodes, the run still reproduces the straight run exactly: every
            # agent's words and every step's and check's status (a check's test output differs
            # only in its durations)
            assert said(state["outputs"]) == said(straight)
            steps = [(s.attributes["pyagent.step.id"], s.attributes["pyagent.loop.iteration"])
                     for s in traces.spans(f"c-{i}") if s.kind == "step" and s.status == "ok"]
            assert len(steps) == len(set(steps)), f"c-{i} ran a completed step twice"
    listed = pyagent("runs", "list", "--data", str(data), "--ray", cluster.address)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if "│ c-" in line]
    assert len(rows) == 6 and all("goal_not_met" in row for row in rows)
    assert all(len(row.split("│")[6].split()) == 3 for row in rows)  # k+1 holders each


def test_a_cluster_address_that_does_not_answer_is_one_clear_line(recorded, tmp_path):
    model, recording, _ = recorded
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(TASK + "\n")
    result = pyagent(*batch_args(model, recording, tmp_path / "data", tasks,
                                 "--ray", "127.0.0.1:1"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --ray 127.0.0.1:1: no Ray cluster answers there (Connection refused); start "
        "one with `ray start --head`"]
    bad = pyagent(*batch_args(model, recording, tmp_path / "data", tasks, "--ray", "auto",
                              "--replicas", "2", "--write-quorum", "1"))
    assert bad.returncode == 1 and "must be a majority of the 3 replicas" in bad.stderr


def test_runs_share_one_embedded_engine_per_node(cluster, recorded, tmp_path):
    model, _, _ = recorded
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(TASK + "\n" + TASK + " (again)\n")
    result = pyagent("run", str(EXAMPLE / "manifest.yaml"), "--tasks", str(tasks),
                     "--workspace", str(EXAMPLE / "project"), "--model", str(model), "--data",
                     str(tmp_path / "data"), "--run-id", "e", "--ray", cluster.address)
    assert result.returncode == 3, result.stderr[-3000:]
    nodes = {line.split("│")[3].strip() for line in result.stdout.splitlines()
             if line.startswith("│ e-")}
    assert f"stopped {len(nodes)} node engine(s)" in result.stderr  # one per node, not per run
    from pyagent.observe.traces import TraceStore

    with TraceStore(tmp_path / "data" / "traces.db") as traces:
        for run_id in ("e-1", "e-2"):
            calls = [s for s in traces.spans(run_id) if s.kind == "llm_call"]
            assert calls and all(s.attributes.get("gen_ai.usage.output_tokens") for s in calls)


def test_too_few_nodes_for_the_quorum_is_refused_before_any_run(cluster, recorded, tmp_path):
    model, recording, _ = recorded
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(TASK + "\n")
    result = pyagent(*batch_args(model, recording, tmp_path / "data", tasks, "--ray",
                                 cluster.address, "--replicas", "9"))
    assert result.returncode == 1
    assert "error: the ring needs 10 live nodes for k=9 and write quorum 10; the cluster has 4" \
        in result.stderr
