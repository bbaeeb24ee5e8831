"""The orchestrator on a real (tiny, random-weight) model, real tools, a real trace store and
real checkpoints: both modes, conditions and loops, crash and resume."""

import dataclasses
import shutil
import sqlite3
from pathlib import Path

import pytest

from pyagent.errors import ConfigError, PyAgentError
from pyagent.fleet.manifest import RouteSpec, load_manifest
from pyagent.fleet.orchestrator import Orchestrator
from pyagent.fleet.tools.registry import TOOLS
from pyagent.llm.embedded import EmbeddedBackend
from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.resilience.sqlite_store import SQLiteCheckpointStore

EXAMPLE = Path(__file__).parents[1] / "examples" / "bugfix"


class Crash(BaseException):
    """Stands for the process dying: nothing in the runtime catches it."""


class CountingBackend:
    """The embedded backend, counting calls, crashing on a chosen call."""

    name = "embedded"

    def __init__(self, engine, crash_on: int | None = None):
        self.inner = EmbeddedBackend(engine)
        self.calls = 0
        self.crash_on = crash_on

    def complete(self, request):
        raise AssertionError("agent turns stream, so that a timeout interrupts a generation")

    def stream(self, request):
        self.calls += 1
        if self.calls == self.crash_on:
            raise Crash
        return self.inner.stream(request)


@pytest.fixture
def setup(tmp_path, agent_engine):
    workspace = tmp_path / "workspace"
    shutil.copytree(EXAMPLE / "project", workspace)
    manifest = load_manifest(EXAMPLE / "manifest.yaml", set(TOOLS))
    small = {name: agent.model_copy(update={"limits": agent.limits.model_copy(
        update={"max_tokens": 48, "max_tool_calls": 1})}) for name, agent in
        manifest.agents.items()}
    manifest = dataclasses.replace(manifest, agents=small)
    bus = EventBus()
    traces = TraceStore(tmp_path / "traces.db")
    traces.attach(bus)
    store = SQLiteCheckpointStore(tmp_path / "checkpoints.db")
    yield manifest, workspace, bus, traces, store
    traces.close()
    store.close()


def orchestrator(setup, backend, mode="sequenced"):
    manifest, workspace, bus, _, store = setup
    return Orchestrator(manifest, lambda agent: backend, workspace, bus, store, mode)


def test_a_run_completes_and_is_traced_and_checkpointed(setup, agent_engine):
    backend = CountingBackend(agent_engine)
    result = orchestrator(setup, backend).run("Fix remove() in src/inventory/stock.py")
    # random weights fix nothing: the run says so, and why
    assert result.status == "goal_not_met"
    assert result.error.startswith("goal check failed (The project's tests pass.): run_tests: ")
    assert "loop 'fix' ran out of rounds without its condition holding" in result.error
    assert {"code", "test", "audit"} <= set(result.outputs)
    assert result.outputs["audit"]["status"] == "skipped"
    _, _, _, traces, store = setup
    checkpoints = store.list(result.run_id)
    final = checkpoints[-1].state
    assert len(checkpoints) == result.checkpoints and final["status"] == "goal_not_met"
    assert final["exhausted"] == ["fix"] and final["goal"]["met"] is False
    spans = traces.spans(result.run_id)
    kinds = {s.kind for s in spans}
    assert {"run", "step", "agent", "llm_call"} <= kinds
    assert sum(1 for s in spans if s.kind == "llm_call") == backend.calls
    totals = traces.totals(result.run_id)
    ran = [o for o in result.outputs.values() if o["status"] == "ok"]
    assert totals.input_tokens == sum(o["usage"][0] for o in ran)
    llm = next(s for s in spans if s.kind == "llm_call")
    assert traces.lineage(llm.span_id)[0].kind == "run"


def test_sequenced_runs_reuse_the_kv_of_earlier_steps(setup, agent_engine):
    sequenced = orchestrator(setup, CountingBackend(agent_engine)).run("Fix remove()")
    handover = orchestrator(setup, CountingBackend(agent_engine), "handover").run("Fix remove()")
    cached = {name: sum(o.get("usage", [0, 0, 0])[2] for o in result.outputs.values())
              for name, result in (("sequenced", sequenced), ("handover", handover))}
    assert cached["sequenced"] > cached["handover"]


def test_a_crashed_run_resumes_without_repeating_completed_steps(setup, agent_engine):
    crashing = CountingBackend(agent_engine, crash_on=3)
    runner = orchestrator(setup, crashing)
    with pytest.raises(Crash):
        runner.run("Fix remove()", run_id="crashy")
    _, _, _, traces, store = setup
    before = store.get("crashy").state
    assert before["status"] == "running" and before["outputs"]
    resumed = orchestrator(setup, CountingBackend(agent_engine)).resume("crashy")
    assert resumed.status == "goal_not_met", resumed.error
    completed = [(s.attributes["pyagent.step.id"], s.attributes["pyagent.loop.iteration"])
                 for s in traces.spans("crashy") if s.kind == "step" and s.status == "ok"]
    assert len(completed) == len(set(completed))  # no completed step ran twice
    crashed = [s for s in traces.spans("crashy") if s.kind == "step" and s.status == "error"]
    assert len(crashed) == 1  # the step in flight at the crash, run again on resume
    assert crashed[0].attributes["error.type"] == "Crash"
    seqs = [c.seq for c in store.list("crashy")]
    assert seqs == list(range(len(seqs)))
    again = orchestrator(setup, CountingBackend(agent_engine)).resume("crashy")
    assert again.outputs == resumed.outputs  # a finished run is not run again


def test_bad_modes_and_unknown_runs_are_refused(setup, agent_engine):
    with pytest.raises(ConfigError, match="mode must be one of"):
        orchestrator(setup, CountingBackend(agent_engine), "parallel")
    with pytest.raises(ConfigError, match="no checkpoints for run 'nope'"):
        orchestrator(setup, CountingBackend(agent_engine)).resume("nope")


def test_compaction_shortens_old_tool_results_for_good():
    from pyagent.fleet.compaction import Compaction

    transcript = [{"role": "user", "content": "go"}] + [
        {"role": "tool", "content": f"result {i}\n" + "x" * 500, "tool_call_id": str(i)}
        for i in range(4)]
    removed = Compaction(keep_recent=1, min_chars=100).apply(transcript)
    assert removed > 1000 and transcript[0]["content"] == "go"
    assert [m["content"].startswith(f"result {i}\n[... ") for i, m in
            enumerate(transcript[1:])] == [True, True, True, False]
    assert Compaction(keep_recent=1, min_chars=100).apply(transcript) == 0  # already done
    with pytest.raises(ConfigError, match="keep_recent >= 0"):
        Compaction(keep_recent=-1)


def test_a_compacted_run_sends_fewer_prompt_tokens(setup, agent_engine):
    from pyagent.fleet.compaction import Compaction

    manifest, workspace, bus, traces, store = setup
    plain = orchestrator(setup, CountingBackend(agent_engine)).run("Fix remove()")
    compact = Orchestrator(manifest, lambda agent: CountingBackend(agent_engine), workspace, bus,
                           store, "sequenced", Compaction(keep_recent=0, min_chars=40)
                           ).run("Fix remove()")
    assert compact.status == "goal_not_met", compact.error
    elided = sum(s.attributes["pyagent.compaction.elided_chars"]
                 for s in traces.spans(compact.run_id) if s.kind == "step")
    assert elided > 0
    per_call = {run: traces.totals(run).input_tokens / traces.totals(run).llm_calls
                for run in (plain.run_id, compact.run_id)}  # the runs may differ in calls
    assert per_call[compact.run_id] < per_call[plain.run_id]


def test_a_run_whose_goal_holds_succeeds(setup, agent_engine):
    _, workspace, _, _, store = setup
    stock = workspace / "src" / "inventory" / "stock.py"
    stock.write_text(stock.read_text().replace("updated[item] + count", "updated[item] - count"))
    result = orchestrator(setup, CountingBackend(agent_engine)).run("Fix remove()")
    assert result.status == "succeeded" and result.error is None
    assert store.get(result.run_id).state["goal"]["checks"][0]["passed"] is True


def test_a_goal_whose_tests_did_not_run_is_not_met(setup, agent_engine):
    _, workspace, _, _, _ = setup
    shutil.rmtree(workspace / "tests")
    result = orchestrator(setup, CountingBackend(agent_engine)).run("Fix remove()")
    assert result.status == "goal_not_met"
    assert "run_tests: failed: no tests ran" in result.error


def test_a_template_failing_at_run_time_ends_the_run_as_error(tmp_path, setup, agent_engine):
    _, workspace, bus, traces, store = setup
    folder = tmp_path / "broken"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("project"))
    path = folder / "manifest.yaml"  # round 1 of the loop names the test step's output
    path.write_text(path.read_text().replace("Task: {{ task }}", "{{ steps.test.output }}"))
    broken = load_manifest(path, set(TOOLS))
    result = Orchestrator(broken, lambda agent: CountingBackend(agent_engine), workspace, bus,
                          store).run("Fix remove()", run_id="broken")
    assert result.status == "error"
    assert result.error == (f"{path}:20: steps.0.loop.steps.0.instruction: cannot render: "
                            "UndefinedError: 'dict object' has no attribute 'test'")
    assert store.get("broken").state["status"] == "error"
    assert [r.status for r in traces.runs() if r.run_id == "broken"] == ["ok"]  # span closed


def test_resume_refuses_an_edited_manifest_unless_forced(tmp_path, setup, agent_engine):
    _, workspace, bus, traces, store = setup
    folder = tmp_path / "copy"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("project"))
    copied = load_manifest(folder / "manifest.yaml", set(TOOLS))
    crashing = CountingBackend(agent_engine, crash_on=2)
    with pytest.raises(Crash):
        Orchestrator(copied, lambda agent: crashing, workspace, bus, store).run("x", "edited")
    (folder / "agents.yaml").write_text((folder / "agents.yaml").read_text() + "\n# edited\n")
    again = Orchestrator(copied, lambda agent: CountingBackend(agent_engine), workspace, bus,
                         store, traces=traces)
    with pytest.raises(ConfigError, match=r"changed since run 'edited' started.*--force"):
        again.resume("edited")
    assert again.resume("edited", force=True).status == "goal_not_met"


def test_resume_refuses_when_the_store_lost_checkpoints_the_trace_saw(setup, agent_engine):
    manifest, workspace, bus, traces, store = setup
    crashing = CountingBackend(agent_engine, crash_on=4)
    with pytest.raises(Crash):
        orchestrator(setup, crashing).run("Fix remove()", run_id="lossy")
    newest = store.get("lossy").seq
    with sqlite3.connect(store.path) as db:  # what a damaged write-ahead log does
        db.execute("DELETE FROM checkpoints WHERE run_id = 'lossy' AND seq >= ?", (newest - 1,))
    resuming = Orchestrator(manifest, lambda agent: CountingBackend(agent_engine), workspace,
                            bus, store, traces=traces)
    with pytest.raises(PyAgentError, match=r"trace records checkpoint \d+ as written, but the "
                                           f"checkpoint store's newest is {newest - 2}: the store "
                                           "lost checkpoints"):
        resuming.resume("lossy")


def test_runs_show_rows_are_attempts_that_add_up(tmp_path, agent_engine):
    from pyagent.errors import BackendError
    from pyagent.runtime import Runtime, backend_factory
    from pyagent.runtime import orchestrator as make_orchestrator

    class FlakyTester(CountingBackend):
        """Fails the tester's first call, so its step is retried."""

        def stream(self, request):
            if not getattr(self, "failed", False) and \
                    request.messages[-1].content.startswith("[tester]"):
                self.failed = True
                raise BackendError("the server went away")
            return super().stream(request)

    workspace = tmp_path / "workspace"
    shutil.copytree(EXAMPLE / "project", workspace)
    runtime = Runtime.open(tmp_path / "data")
    backend = FlakyTester(agent_engine)
    try:
        runner = make_orchestrator(EXAMPLE / "manifest.yaml", workspace, "sequenced", runtime,
                                   backend_factory({}, lambda: None))
        runner.team = dataclasses.replace(runner.team, backend_for=lambda agent: backend)
        result = runner.run("Fix remove()", run_id="flaky")
        rows = runtime.step_rows("flaky")
        totals = runtime.run_tokens("flaky").totals()
    finally:
        runtime.close()
    assert result.status == "goal_not_met"
    assert [(r.step, r.round, r.attempt, r.status) for r in rows][:3] == [
        ("code", 1, 1, "ok"), ("test", 1, 1, "error"), ("test", 1, 2, "ok")]
    assert sum(r.tokens.prompt_tokens for r in rows) == totals.prompt_tokens
    assert sum(r.tokens.completion_tokens for r in rows) == totals.completion_tokens
    assert sum(r.tokens.calls for r in rows) == totals.calls == backend.calls


def test_a_run_names_its_owner_process_before_its_first_step(setup, agent_engine):
    import os

    _, _, _, _, store = setup
    with pytest.raises(Crash):
        orchestrator(setup, CountingBackend(agent_engine, crash_on=1)).run("x", run_id="owned")
    assert store.get("owned").state["owner"]["pid"] == os.getpid()


def test_a_step_killed_after_its_agent_ended_shows_as_interrupted(tmp_path):
    from pyagent.runtime import Runtime

    runtime = Runtime.open(tmp_path / "data")
    try:
        run = runtime.bus.span("run", "run", "late", None).start()
        step = run.child("step", "step code", **{"pyagent.step.id": "code"}).start()
        with step.child("agent", "invoke_agent coder", **{"gen_ai.agent.name": "coder"}):
            pass  # the agent finished; the process died before the step ended
        runtime.traces.interrupt("late", runtime.bus)
        runtime.traces.flush()
        rows = runtime.step_rows("late")
    finally:
        runtime.close()
    assert [(r.step, r.agent, r.status, r.tokens.calls) for r in rows] == [
        ("code", "coder", "ok", 0), ("code", "", "interrupted", 0)]


def test_a_route_hands_a_step_to_another_agent_by_the_task(setup, agent_engine):
    manifest = setup[0]
    fix = manifest.steps[0]
    code = fix.loop.steps[0].model_copy(update={"routes": [
        RouteSpec(agent="auditor", when="'lint' in task")]})
    routed = fix.model_copy(update={"loop": fix.loop.model_copy(update={
        "steps": [code, *fix.loop.steps[1:]], "max_iterations": 1})})
    manifest = dataclasses.replace(manifest, steps=(routed, *manifest.steps[1:]))
    backend = CountingBackend(agent_engine)
    runner = Orchestrator(manifest, lambda agent: backend, *setup[1:3], setup[4])
    taken = runner.run("lint the stock module")
    kept = runner.run("Fix remove() in src/inventory/stock.py")
    assert taken.outputs["code"]["agent"] == "auditor"
    assert kept.outputs["code"]["agent"] == "coder"
