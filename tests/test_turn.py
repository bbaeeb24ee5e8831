"""Agent turns with the calls a remote model can make (scripted here, since the embedded engine's
grammar never lets a model make them): delegation to sub-agents and its lineage, calls to tools an
agent does not hold, arguments that are not JSON, more parallel calls than the agent may make."""

import json
import time

import pytest

from pyagent.fleet.agent import AgentSpec, Limits
from pyagent.fleet.tools.base import Workspace
from pyagent.fleet.turn import DELEGATE, Team, offered_tools, run_turn
from pyagent.observe.events import EventBus
from pyagent.observe.traces import TraceStore
from pyagent.types import Completion, Message, StreamEvent, Timings, ToolCall, Usage


class ScriptedModel:
    """A backend that replies with the next scripted (text, tool calls) and records requests."""

    name = "scripted"

    def __init__(self, *replies):
        self.replies = list(replies)
        self.requests = []

    def complete(self, request):
        self.requests.append(request)
        text, calls = self.replies.pop(0)
        return Completion(text, "tool_calls" if calls else "stop", Usage(10, 2, 4),
                          Timings(0.01, 0.02, 2), "scripted", self.name, tuple(calls))

    def stream(self, request):
        yield StreamEvent("", self.complete(request))


def call(name, arguments, id_="c1"):
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id_, name, text)


@pytest.fixture
def world(tmp_path):
    (tmp_path / "notes.txt").write_text("the answer is 42\n")
    bus = EventBus()
    traces = TraceStore(tmp_path / "traces.db")
    traces.attach(bus)
    yield tmp_path, bus, traces
    traces.close()


def agents(**limits):
    lead = AgentSpec(name="lead", role="You lead.", tools=["list_files"], subagents=["reader"],
                     limits=Limits(**limits))
    reader = AgentSpec(name="reader", role="You read.", tools=["read_file"])
    return {"lead": lead, "reader": reader}


def test_a_sub_agent_works_in_its_own_context_and_its_lineage_is_traced(world):
    root, bus, traces = world
    team_agents = agents()
    lead_model = ScriptedModel(
        ("", [call(DELEGATE, {"agent": "reader", "task": "What does notes.txt say?"})]),
        ("It says 42.", []))
    reader_model = ScriptedModel(("", [call("read_file", {"path": "notes.txt"})]),
                                 ("42", []))
    models = {"lead": lead_model, "reader": reader_model}
    team = Team(team_agents, lambda agent: models[agent.name], Workspace(root))
    with bus.span("run", "run test", "r1") as span:
        result = run_turn(team_agents["lead"], [Message("user", "Find the answer.")], team, span)
    assert result.output == "It says 42." and result.tool_calls == 1
    assert result.usage == Usage(40, 8, 16)  # the sub-agent's two calls count too
    assert [t.name for t in lead_model.requests[0].tools] == ["list_files", DELEGATE]
    sub_first = reader_model.requests[0].messages
    assert [m.role for m in sub_first] == ["system", "user"]  # a fresh context
    assert sub_first[1].content == "What does notes.txt say?"
    assert "the answer is 42" in reader_model.requests[1].messages[-1].content
    assert lead_model.requests[1].messages[-1] == Message("tool", "42", tool_call_id="c1")
    read = next(s for s in traces.spans("r1") if s.name == "execute_tool read_file")
    chain = [(s.kind, s.name) for s in traces.lineage(read.span_id)]
    assert chain == [("run", "run test"), ("tool_call", "execute_tool delegate"),
                     ("agent", "invoke_agent reader"), ("tool_call", "execute_tool read_file")]
    sub = next(s for s in traces.spans("r1") if s.name == "invoke_agent reader")
    assert sub.attributes["pyagent.parent_agent"] == "lead"
    assert sub.attributes["pyagent.depth"] == 1


def test_wrong_calls_become_errors_the_agent_reads_and_the_trace_keeps(world):
    root, bus, traces = world
    team_agents = agents(max_tool_calls=3)
    model = ScriptedModel(
        ("", [call("write_file", {"path": "x", "content": "y"}, "a"),
              call("list_files", "{not json", "b"),
              call(DELEGATE, {"agent": "lead", "task": "loop"}, "c"),
              call("list_files", {}, "d")]),
        ("gave up", []))
    team = Team(team_agents, lambda agent: model, Workspace(root))
    with bus.span("run", "run test", "r2") as span:
        result = run_turn(team_agents["lead"], [Message("user", "Go.")], team, span)
    assert result.output == "gave up"
    replies = {m.tool_call_id: m.content for m in model.requests[1].messages if m.role == "tool"}
    assert replies["a"].startswith("failed: agent 'lead' may not call 'write_file'")
    assert "not valid JSON" in replies["b"]
    assert "may delegate only to reader; got 'lead'" in replies["c"]
    assert replies["d"] == "not run: agent 'lead' has used all 3 of its tool calls"
    assert not (root / "x").exists()
    failed = [s for s in traces.spans("r2") if s.kind == "tool_call"]
    assert [s.status for s in failed] == ["error", "error", "error"]
    assert failed[0].attributes["error.type"] == "ToolError"


def test_once_out_of_tool_calls_the_agent_must_answer(world):
    root, bus, _ = world
    team_agents = agents(max_tool_calls=1)
    model = ScriptedModel(("", [call("list_files", {})]), ("done", []))
    team = Team(team_agents, lambda agent: model, Workspace(root))
    with bus.span("run", "run test", "r3") as span:
        run_turn(team_agents["lead"], [Message("user", "Go.")], team, span)
    assert [r.tool_choice for r in model.requests] == ["auto", "none"]


def test_one_tool_list_for_many_agents_keeps_the_prompt_stable():
    team_agents = agents()
    shared = offered_tools(team_agents.values())
    assert [t.name for t in shared] == ["list_files", "read_file", DELEGATE]
    assert shared[-1].parameters["properties"]["agent"]["enum"] == ["reader"]
    assert offered_tools([team_agents["reader"]]) == shared[1:2]


def test_the_wall_time_interrupts_a_generation_in_progress(world, agent_engine):
    from pyagent.fleet.turn import LimitExceeded
    from pyagent.llm.embedded import EmbeddedBackend

    root, bus, traces = world
    writer = AgentSpec(name="writer", role="You write at length.", tools=[],
                       limits=Limits(max_tokens=6000, wall_time_s=0.5))
    team = Team({"writer": writer}, lambda _: EmbeddedBackend(agent_engine), Workspace(root))
    start = time.monotonic()
    with pytest.raises(LimitExceeded, match="ran past its wall time of 0.5 s"), \
            bus.span("run", "run test", "slow") as span:
        run_turn(writer, [Message("user", "Write a long story.")], team, span)
    assert time.monotonic() - start < 3  # 6000 tokens take far longer: the generation was cut
    assert agent_engine.scheduler.load()["running"] == 0  # and its request cancelled
    [call] = [s for s in traces.spans("slow") if s.kind == "llm_call"]
    assert call.status == "error" and call.attributes["error.type"] == "LimitExceeded"


@pytest.mark.parametrize("pings", [False, True])
def test_the_wall_time_interrupts_a_server_that_sends_no_reply(world, pings):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pyagent.fleet.turn import LimitExceeded
    from pyagent.llm.openai import OpenAIBackend

    release = threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # reads the request, then sends nothing (or only keep-alive pings)
            self.rfile.read(int(self.headers["Content-Length"]))
            if pings:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                while not release.wait(0.2):
                    self.wfile.write(b": ping\n\n")
                    self.wfile.flush()
            release.wait(30)

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root, bus, _ = world
    agent = AgentSpec(name="waiter", role="You wait.", tools=[], limits=Limits(wall_time_s=1))
    backend = OpenAIBackend(f"http://127.0.0.1:{server.server_port}/v1", model="m")
    team = Team({"waiter": agent}, lambda _: backend, Workspace(root))
    start = time.monotonic()
    try:
        with pytest.raises(LimitExceeded, match="ran past its wall time of 1 s"), \
                bus.span("run", "run test", "stalled") as span:
            run_turn(agent, [Message("user", "Hello?")], team, span)
        assert time.monotonic() - start < 5  # not the 30 s the server stalls, nor retries
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_demonstrations_come_before_the_instruction_and_stay_out_of_the_transcript(world):
    root, bus, _ = world
    demo = {"task": "What is in a.txt?", "answer": "It says hi.", "source": "run r0",
            "steps": [{"call": "read_file", "arguments": {"path": "a.txt"}, "result": "hi"}]}
    reader = AgentSpec(name="reader", role="You read.", tools=["read_file"],
                       demonstrations=[demo])
    model = ScriptedModel(("", [call("read_file", {"path": "notes.txt"})]), ("42", []))
    team = Team({"reader": reader}, lambda agent: model, Workspace(root))
    earlier = [Message("user", "Earlier step."), Message("assistant", "Done.")]
    with bus.span("run", "run test", "r3") as span:
        result = run_turn(reader, [*earlier, Message("user", "Read notes.txt.")], team, span)
    first, second = (r.messages for r in model.requests)
    assert [m.role for m in first] == ["user", "assistant", "user", "assistant", "tool",
                                       "assistant", "user"]
    assert first[:2] == tuple(earlier)  # the conversation before stays a shared prefix
    assert first[2].content == "What is in a.txt?"
    assert first[3].tool_calls[0].name == "read_file"
    assert json.loads(first[3].tool_calls[0].arguments) == {"path": "a.txt"}
    assert first[4] == Message("tool", "hi", tool_call_id=first[3].tool_calls[0].id)
    assert first[5].content == "It says hi." and first[6].content == "Read notes.txt."
    assert second[:7] == first and "the answer is 42" in second[-1].content
    assert [m.role for m in result.messages] == ["assistant", "tool", "assistant"]
    assert result.output == "42"


def test_a_procedure_fixes_each_call_s_tool_then_the_agent_answers(world):
    root, bus, traces = world
    reader = AgentSpec(name="reader", role="You read.", tools=["list_files", "read_file"],
                       procedure=["list_files", "read_file"])
    model = ScriptedModel(
        ("", [call("list_files", {}, "a")]),
        ("", [call("list_files", {}, "b"), call("read_file", {"path": "notes.txt"}, "c")]),
        ("It says 42.", []))
    team = Team({"reader": reader}, lambda agent: model, Workspace(root))
    with bus.span("run", "run test", "r4") as span:
        result = run_turn(reader, [Message("user", "Read the notes.")], team, span)
    assert [(r.tool_choice, r.allowed_tools) for r in model.requests] == [
        ("required", ("list_files",)), ("required", ("read_file",)),
        ("none", ("list_files", "read_file"))]
    assert [t.name for t in model.requests[0].tools] == ["list_files", "read_file"]
    replies = {m.tool_call_id: m.content for m in model.requests[2].messages if m.role == "tool"}
    assert replies["b"] == "not run: agent 'reader''s procedure calls read_file next"
    assert "the answer is 42" in replies["c"]
    assert result.tool_calls == 2 and result.output == "It says 42."
    ran = [s.name for s in traces.spans("r4") if s.kind == "tool_call"]
    assert ran == ["execute_tool list_files", "execute_tool read_file"]
