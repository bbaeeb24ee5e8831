"""Failure signatures from recorded runs and suite records, and clusters of signatures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pyagent.bench.fleet import run_manifest
from pyagent.errors import ConfigError
from pyagent.fleet.manifest import load_manifest
from pyagent.fleet.tools.registry import TOOLS
from pyagent.miner.clusters import cluster, over_represented
from pyagent.miner.signatures import Signature, mine, normalize
from pyagent.observe.traces import TraceStore
from pyagent.types import ToolCall
from test_fuzz_attack_review import Script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "bugfix"
STOCK = "src/inventory/stock.py"


def call(name: str, **arguments) -> tuple[str, list[ToolCall]]:
    return "", [ToolCall(f"c-{name}", name, json.dumps(arguments))]


def record_run(data: Path, run_id: str, *replies) -> None:
    """Run the bugfix example with a scripted model; its spans go to `data`/traces.db."""
    workspace = data / "workspaces" / run_id
    shutil.copytree(EXAMPLE / "project", workspace)
    manifest = load_manifest(EXAMPLE / "manifest.yaml", set(TOOLS))
    with TraceStore(data / "traces.db") as traces:
        run_manifest(manifest, workspace, "Fix remove() in src/inventory/stock.py.",
                     Script(*replies), traces, run_id=run_id)


def fixed_stock() -> str:
    text = (EXAMPLE / "project" / STOCK).read_text()
    return text.replace("updated[item] = updated[item] + count",
                        "updated[item] = updated[item] - count")


def test_a_failed_run_gives_where_it_went_wrong_and_how(tmp_path: Path):
    # round 1: a read of a path that is no file, a write that breaks the syntax; the tester
    # answers; rounds 2 and 3: the coder gives up at once
    record_run(tmp_path, "broken", call("read_file", path="file"),
               call("write_file", path=STOCK, content="def remove(:\n"), "I fixed it.",
               "tests ran", "no idea", "tests ran", "no idea", "tests ran")
    [signature] = mine(tmp_path)
    assert signature.key == "broken" and signature.source == "fleet"
    assert (signature.step, signature.agent) == ("code", "coder")
    assert signature.tools[:2] == ("read_file!", "write_file")
    assert signature.errors[0].startswith("read_file: 'file' is not a file")
    assert signature.broken == (STOCK,) and signature.exhausted == ("fix",)
    assert signature.task == "Fix remove() in src/inventory/stock.py."
    assert "I fixed it." in signature.words and signature.tokens > 0
    assert "read_file failed: '…' is not a file in the workspace" in signature.symptoms
    assert "py file written with a syntax error" in signature.symptoms
    assert "loop ran out of rounds" in signature.symptoms
    assert signature.verdict == "goal not met"


def test_a_run_that_succeeded_gives_no_signature(tmp_path: Path):
    record_run(tmp_path, "fixed", call("write_file", path=STOCK, content=fixed_stock()),
               "Fixed.", call("run_tests"), "All pass.", "Lint is clean.")
    assert mine(tmp_path) == []


def test_a_suite_record_decides_a_fleet_run_and_gives_its_verdict(tmp_path: Path):
    record_run(tmp_path, "task-r0", "Nothing to do.", "tests ran", "no", "tests", "no", "t")
    records = [{"item_id": "repair/1", "family": "operator", "run_id": "task-r0", "score": 0.5,
                "correct": False, "detail": "3 passed, 3 failed; failing: test_remove",
                "latency_s": 1.0},
               {"item_id": "lateral/2", "family": "lateral", "score": 0.0, "correct": False,
                "detail": "expected 'cat', got 'dog'", "answer": "dog", "latency_s": 0.2},
               {"item_id": "lateral/3", "family": "lateral", "score": 1.0, "correct": True,
                "detail": "", "answer": "tac", "latency_s": 0.2}]
    (tmp_path / "suites.json").write_text(json.dumps({"records": records}))
    fleet, question = sorted(mine(tmp_path), key=lambda s: s.source)
    assert fleet.item_id == "repair/1" and fleet.score == 0.5 and fleet.family == "operator"
    assert fleet.symptoms == ("no tool calls", "loop ran out of rounds",
                              "verdict: N passed, N failed")
    assert question.source == "suite" and question.key == "lateral/2#0"
    assert question.symptoms == ("verdict: expected '…', got '…'",)
    assert question.words == "dog"


def test_a_missing_data_folder_is_one_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such folder"):
        mine(tmp_path / "nowhere")


def test_normalized_messages_keep_their_shape_and_lose_their_particulars():
    assert normalize("'src/a.py' is not a file in the workspace") == \
        normalize("'file' is not a file in the workspace")
    assert normalize("line 12: expected 3 got 4") == "line N: expected N got N"
    assert normalize("cannot read src/pkg/mod.py now") == "cannot read PATH now"


def synthetic(group: str, index: int, symptoms: tuple[str, ...]) -> Signature:
    return Signature(key=f"{group}-{index}", source="fleet", item_id=None, family=group,
                     task="t", score=0.0, symptoms=symptoms, tokens=10, wall_s=1.0)


def test_clusters_recover_known_groups_and_leave_outliers_as_noise():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3]
    signatures, vectors = [], []
    for group, (name, symptoms) in enumerate([("paths", ("read_file failed", "no file")),
                                              ("syntax", ("syntax error", "loop ran out")),
                                              ("silent", ("no tool calls",))]):
        for index in range(6 + 2 * group):
            signatures.append(synthetic(name, index, symptoms))
            vectors.append(centres[group] + rng.normal(0, 0.03, 8))
    signatures.append(synthetic("odd", 0, ("odd",)))
    vectors.append(3 * np.eye(8)[7])
    found, noise = cluster(signatures, np.array(vectors), min_size=3)
    assert [(c.size, {s.family for s in c.members}) for c in found] == [
        (10, {"silent"}), (8, {"syntax"}), (6, {"paths"})]
    assert [s.key for s in noise] == ["odd-0"]
    assert found[1].label == "loop ran out; syntax error"
    assert found[0].tokens == 100 and found[0].wall_s == 10.0
    assert len(found[2].representatives) == 3
    assert all(key.startswith("paths-") for key in found[2].representatives)


def test_too_few_signatures_make_no_cluster():
    signatures = [synthetic("a", i, ("x",)) for i in range(2)]
    assert cluster(signatures, np.eye(2), min_size=3) == ([], signatures)


def test_a_symptom_everyone_has_ranks_below_one_that_sets_a_cluster_apart():
    everyone = [synthetic("a", i, ("tests fail", "no file")) for i in range(4)] + \
        [synthetic("b", i, ("tests fail",)) for i in range(12)]
    assert [s for s, _ in over_represented(everyone[:4], everyone)] == ["no file", "tests fail"]
