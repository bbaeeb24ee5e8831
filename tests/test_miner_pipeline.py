"""`pyagent mine` end to end on real repair tasks, real tools, the sandbox, a trace store and
MiniLM, with a scripted learner in place of the model.

The learner stands for a model that fixes a bug only when its prompt shows it how: the fix as a
hint in the task (what rationalization gives it) or a demonstration before its instruction (what
a specialist gives it). A replay recording cannot play this part: it is keyed by the exact
prompt, and each specialist's prompt is new by design.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from pyagent.bench.runner import RunSettings, SuiteRunner
from pyagent.bench.suites.repair import RepairSuite
from pyagent.fleet.detector import Embedder
from pyagent.miner.pipeline import Miner, MineSettings
from pyagent.observe.traces import TraceReader
from pyagent.types import Completion, StreamEvent, Timings, ToolCall, Usage

FAMILY = "off_by_one"
AGENTS = {"agents": [{"name": "coder", "role": "You fix bugs in Python code.",
                      "tools": ["list_files", "read_file", "write_file"],
                      "permissions": {"paths": ["src/**"]},
                      "limits": {"max_tool_calls": 4}}]}
MANIFEST = {"name": "fix", "agents": "agents.yaml",
            "goal": {"description": "The file is there (the suite's checker runs the tests).",
                     "checks": [{"tool": "read_file", "arguments": {"path": "src/solution.py"},
                                 "expect": "output != ''"}]},
            "steps": [{"id": "code", "agent": "coder", "instruction": "Task: {{ task }}"}]}
HINT = re.compile(r"line (\d+) of (\S+) must read `(.*)`\.")


class Learner:
    """Reads and fixes the file the task names when a hint or a demonstration shows the way;
    otherwise answers without acting. `fixes` maps a buggy file to its fixed text: what a
    demonstration teaches it."""

    name = "learner"

    def __init__(self, fixes: dict[str, str]):
        self.fixes = fixes

    def stream(self, request):
        yield StreamEvent("", self.complete(request))

    def complete(self, request):
        messages = list(request.messages)
        start = max(i for i, m in enumerate(messages) if m.role == "user")
        shown = any(m.tool_calls for m in messages[:start])
        task = messages[start].content
        hint = HINT.search(task)
        path = re.search(r"in (src/\S+\.py)", task).group(1)
        done = [m for m in messages[start:] if m.role == "tool"]
        if not (hint or shown) or len(done) == 2:
            return self._reply("I cannot tell where the bug is." if not done else "Fixed.")
        if not done:
            return self._reply("", ToolCall("r", "read_file", json.dumps({"path": path})))
        text = done[0].content
        if hint:
            lines = text.splitlines(keepends=True)
            number = int(hint.group(1))
            indent = lines[number - 1][:len(lines[number - 1]) - len(lines[number - 1].lstrip())]
            lines[number - 1] = f"{indent}{hint.group(3)}\n"
            fixed = "".join(lines)
        else:
            fixed = self.fixes.get(text, text)
        return self._reply("", ToolCall("w", "write_file",
                                        json.dumps({"path": path, "content": fixed})))

    def _reply(self, text, call=None):
        return Completion(text, "tool_calls" if call else "stop", Usage(50, 10, 0),
                          Timings(0.01, 0.02, 10), "learner", self.name,
                          (call,) if call else ())


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    (root / "agents.yaml").write_text(yaml.safe_dump(AGENTS))
    (root / "manifest.yaml").write_text(yaml.safe_dump(MANIFEST))
    suite = RepairSuite()
    train = suite.items("train", 4, 0, [1], [FAMILY])
    fixes = {i.files[i.data["path"]]: i.data["original"]
             for split, n in (("train", 4), ("validation", 5), ("test", 5))
             for i in suite.items(split, n, 0, [1], [FAMILY])}
    learner = Learner(fixes)
    data = root / "data"
    records = SuiteRunner(learner, {"repair": suite}, RunSettings(concurrency=2),
                          manifest=root / "manifest.yaml", folder=data).run(train)
    (data / "suites.json").write_text(json.dumps({"records": records}))
    before = {p.name: p.read_text() for p in (root / "manifest.yaml", root / "agents.yaml")}
    settings = MineSettings(data, root / "manifest.yaml", root / "out", clusters=1,
                            min_cluster=3, validation=5, test=5, families=(FAMILY,),
                            concurrency=2)
    report = Miner(settings, suite, learner, Embedder()).run()
    return root, report, before


def test_failures_become_a_specialist_promoted_on_validation_and_held_on_test(mined):
    _, report, _ = mined
    assert report["failures"] == 4 and len(report["clusters"]) == 1
    assert "no tool calls" in report["clusters"][0]["label"]
    sources = [d["source"] for d in report["demonstrations"]]
    assert len(sources) == 4 and all("rationalized" in s for s in sources)
    mined_candidate, control = report["candidates"]
    assert (mined_candidate["kind"], control["kind"]) == ("mined", "control")
    assert mined_candidate["tools"] == ["read_file", "write_file"]  # what the demos used
    assert mined_candidate["procedure"] == ["read_file", "write_file"]  # their shared order
    assert len(mined_candidate["demonstrations"]) == 2
    [decision] = report["validation"]["decisions"]
    assert decision["promoted"], decision["reason"]
    assert report["validation"]["scores"]["incumbent"] == [0.0] * 5
    assert report["promoted"] == ["specialist-c0"]
    claim = report["test"]["against_incumbent"]["promoted"]
    assert claim["before"] == 0.0 and claim["after"] == 1.0 and claim["low"] > 0
    assert report["cost"]["extra_solved_on_test"] == 5
    assert report["cost"]["tokens_per_extra_solved"] > 0


def test_the_proposal_is_files_beside_the_users_which_stay_as_they_were(mined):
    root, _, before = mined
    out = root / "out"
    assert {p: (root / p).read_text() for p in before} == before
    proposed = yaml.safe_load((out / "manifest.yaml").read_text())
    assert proposed["steps"][0]["routes"] == [{"agent": "specialist-c0"}]
    agents = yaml.safe_load((out / "agents.yaml").read_text())["agents"]
    specialist = next(a for a in agents if a["name"] == "specialist-c0")
    assert specialist["demonstrations"][0]["steps"][1]["call"] == "write_file"
    assert "Hint" not in json.dumps(specialist["demonstrations"])  # learnt without the hint
    assert (out / "candidates" / "control-random" / "manifest.yaml").is_file()
    assert "specialist-c0" in (out / "mine.html").read_text()
    assert json.loads((out / "mine.json").read_text())["promoted"] == ["specialist-c0"]


def test_everything_the_miner_did_is_in_its_trace_store(mined):
    root, _, _ = mined
    with TraceReader(root / "out" / "traces.db") as reader:
        runs = {run.run_id: reader.spans(run.run_id) for run in reader.runs()}
    mine_run = next(spans for run_id, spans in runs.items() if run_id.startswith("mine-"))
    phases = [s.attributes["pyagent.step.id"] for s in mine_run if s.kind == "step"]
    assert phases == ["signatures", "demonstrations", "synthesis", "validation", "test"]
    assert sum(run_id.startswith("validation-specialist-c0-") for run_id in runs) == 5
    assert sum(run_id.startswith("rationalize-") for run_id in runs) == 4


def test_the_dashboard_s_api_shows_the_miner_s_run_and_its_phases(mined):
    import httpx

    from test_observer import serving

    root, _, _ = mined
    with serving(root / "out") as (_, url):
        runs = {r["run_id"]: r for r in httpx.get(f"{url}/api/runs").json()["runs"]}
        mine_run = next(run_id for run_id in runs if run_id.startswith("mine-"))
        assert runs[mine_run]["status"] == "succeeded"
        assert sum(run_id.startswith("test-promoted-") for run_id in runs) == 5
        lineage = httpx.get(f"{url}/api/runs/{mine_run}/lineage").json()
    assert [c["name"] for c in lineage["root"]["children"]] == [
        "signatures", "demonstrations", "synthesis", "validation", "test"]


def test_bad_input_is_one_line(tmp_path):
    def mine(*args):
        return subprocess.run([sys.executable, "-m", "pyagent", "mine", *args],
                              capture_output=True, text=True, timeout=120)

    result = mine("--data", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "--data" in result.stderr and "no such folder" in \
        result.stderr and "Traceback" not in result.stderr
    result = mine("--data", str(tmp_path), "--suite", "nope")
    assert result.returncode == 1 and "unknown; suites: reasoning, repair" in result.stderr
    result = mine("--data", str(tmp_path), "--out", str(tmp_path))
    assert result.returncode == 1 and "--out must differ from --data" in result.stderr
