"""Specialist synthesis: advice from symptoms, demonstrations from the nearest verified successes,
the tools those use, and provenance for every part."""

import numpy as np
import pytest

from pyagent.fleet.agent import AgentSpec, Demonstration
from pyagent.miner.clusters import Cluster
from pyagent.miner.signatures import Signature
from pyagent.miner.specialists import Success, advice_for, control_members, synthesize, target

CODER = AgentSpec(name="coder", role="You fix bugs.", tools=["list_files", "read_file",
                                                              "write_file"])


def words_overlap(a, b):
    """Jaccard similarity of the word sets: a stand-in for MiniLM that needs no model."""
    sets_a, sets_b = [set(t.split()) for t in a], [set(t.split()) for t in b]
    return np.array([[len(x & y) / len(x | y) for y in sets_b] for x in sets_a])


def failure(key, task, step="code", agent="coder", symptoms=("no file written",)):
    return Signature(key=key, source="fleet", item_id=key, family="off_by_one", task=task,
                     score=0.0, step=step, agent=agent, symptoms=symptoms)


def success(task, source, agent="coder", step="code"):
    demo = Demonstration(task=task, answer="Fixed.", source=source, steps=[
        {"call": "read_file", "arguments": {"path": "src/solution.py"}, "result": "x = 1"},
        {"call": "write_file", "arguments": {"path": "src/solution.py", "content": "x = 2"},
         "result": "wrote 6 bytes"}])
    return Success(step, agent, demo)


def test_advice_answers_each_symptom_once_in_order():
    chosen = advice_for([("the same call repeated", 0.9), ("no file written", 0.8),
                         ("write_file failed: '…' is not a file", 0.6),
                         ("read_file failed: PATH not found", 0.5), ("verdict: N tests fail", 0.5)])
    assert [a.id for a, _, _ in chosen] == ["no-repeats", "save", "real-arguments", "tests-fail"]
    assert chosen[2][1:] == ("write_file failed: '…' is not a file", 0.6)
    assert advice_for([("something new", 1.0)]) == []


def test_a_specialist_gets_advice_the_nearest_demonstrations_and_their_tools():
    members = [failure(f"m{i}", f"The tests in tests/test_solution.py fail. sort list {i}")
               for i in range(4)]
    successes = [success("The tests fail. parse dates in a calendar", "run far"),
                 success("The tests in tests/test_solution.py fail. sort list 9", "run near"),
                 success("The tests in tests/test_solution.py fail. sort list", "run other",
                         agent="tester")]
    candidate = synthesize("coder-c0", members, [("no file written", 1.0),
                                                 ("the same call repeated", 0.75)],
                           {"coder": CODER}, successes, words_overlap, cluster=0)
    assert (candidate.step, candidate.replaces, candidate.kind) == ("code", "coder", "mined")
    agent = candidate.agent
    assert agent.name == "coder-c0" and agent.role.startswith("You fix bugs.\n\n")
    assert "finish by calling write_file" in agent.role and "Never repeat a call" in agent.role
    assert [d.source for d in agent.demonstrations] == ["run near", "run far"]  # coder's only
    assert agent.tools == ["read_file", "write_file"]  # list_files: no demonstration used it
    assert agent.procedure == ["read_file", "write_file"]  # the order both demonstrations share
    provenance = candidate.provenance
    assert [p["source"] for p in provenance["instructions"]] == ["template save",
                                                                  "template no-repeats"]
    assert provenance["members"] == ["m0", "m1", "m2", "m3"]
    assert CODER.name == "coder" and not CODER.demonstrations  # the incumbent is untouched


def test_without_demonstrations_the_incumbents_tools_stay_and_reflection_is_recorded():
    members = [failure("a", "fix it"), failure("b", "fix it too")]
    candidate = synthesize("coder-r", members, [], {"coder": CODER}, [], words_overlap,
                           reflection=("  Read before you write.  ", "the prompt"))
    assert candidate.agent.tools == CODER.tools and not candidate.agent.demonstrations
    assert candidate.agent.role == "You fix bugs.\n\nRead before you write."
    assert candidate.provenance["instructions"] == [
        {"source": "reflection", "prompt": "the prompt", "text": "Read before you write."}]
    assert "no demonstration found" in candidate.provenance["tools"]
    assert candidate.agent.procedure == [] and candidate.provenance["procedure"].startswith("none")


def test_demonstrations_that_call_in_different_orders_give_no_procedure():
    members = [failure("a", "sort a list"), failure("b", "sort a list too")]
    reread = success("sort a list again", "run reread")
    reread.demonstration.steps.insert(0, reread.demonstration.steps[0])
    candidate = synthesize("coder-d", members, [], {"coder": CODER},
                           [success("sort a list", "run plain"), reread], words_overlap)
    assert len(candidate.agent.demonstrations) == 2 and candidate.agent.procedure == []


def test_the_target_is_where_most_members_failed():
    members = [failure("a", "t"), failure("b", "t", step="test", agent="tester"),
               failure("c", "t", step="test", agent="tester")]
    assert target(members) == ("test", "tester")
    with pytest.raises(ValueError, match="no member names"):
        target([failure("q", "t", step=None, agent=None)])


def test_the_control_is_a_seeded_random_sample_the_size_of_the_largest_cluster():
    everyone = [failure(f"s{i}", "t") for i in range(10)]
    largest = Cluster(0, "x", tuple(everyone[:4]), ("s0",), ())
    sample = control_members([largest], everyone, seed=3)
    assert len(sample) == 4 and sample == control_members([largest], everyone, seed=3)
    assert sample != control_members([largest], everyone, seed=4)


def test_the_advice_names_the_edit_tool_the_specialist_holds():
    members = [failure("a", "sort a list"), failure("b", "sort a list too")]
    demo = Demonstration(task="sort a list", source="reference", steps=[
        {"call": "read_file", "arguments": {"path": "src/solution.py"}, "result": "x = 1"},
        {"call": "replace_lines", "arguments": {"path": "src/solution.py", "start_line": 1,
                                                "text": "x = 2"}, "result": "replaced"}])
    incumbent = CODER.model_copy(update={"tools": [*CODER.tools, "replace_lines"]})
    candidate = synthesize("coder-l", members, [("no file written", 1.0)],
                           {"coder": incumbent}, [Success("code", "coder", demo)],
                           words_overlap)
    assert candidate.agent.tools == ["read_file", "replace_lines"]
    assert "finish by calling replace_lines with the line's number" in candidate.agent.role
    assert "write_file" not in candidate.agent.role
    assert candidate.provenance["instructions"][0]["text"].endswith(
        "replace_lines with the line's number and its corrected text.")
