import json

import pytest

from pyagent.errors import ConfigError, ReplayMissError
from pyagent.llm.embedded import EmbeddedBackend
from pyagent.llm.replay import ReplayBackend, request_key
from pyagent.types import CompletionRequest, SamplingParams


def ask(prompt: str) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, sampling=SamplingParams(max_tokens=10,
                                                                    ignore_eos=True))


def test_record_then_replay_without_a_model(tiny_engine, tmp_path):
    path = tmp_path / "rec.jsonl"
    recorder = ReplayBackend(path, mode="record", inner=EmbeddedBackend(tiny_engine))
    recorded = recorder.complete(ask("The quick"))
    streamed = list(recorder.stream(ask("def add")))
    replay = ReplayBackend(path)
    again = replay.complete(ask("The quick"))
    assert (again.text, again.usage, again.timings) == (
        recorded.text, recorded.usage, recorded.timings)
    assert again.backend == "replay"
    assert [e.delta for e in replay.stream(ask("def add"))] == [e.delta for e in streamed]


def test_the_key_depends_on_every_part_of_the_request():
    base = ask("a")
    assert request_key(base) == request_key(ask("a"))
    assert request_key(base) != request_key(ask("b"))
    other = CompletionRequest(prompt="a", sampling=SamplingParams(max_tokens=10, seed=1,
                                                                  ignore_eos=True))
    assert request_key(base) != request_key(other)


def test_the_key_ignores_the_deadline_and_durations_tools_report():
    from pyagent.types import Message

    def turn(output, timeout):
        return CompletionRequest(messages=[Message("user", "fix it"),
                                           Message("user", f"run_tests said: {output}")],
                                 timeout_s=timeout)

    same = request_key(turn("[exit code 1 after 0.8s]\n1 failed in 0.03s", 599.9))
    assert same == request_key(turn("[exit code 1 after 1.2s]\n1 failed in 0.41s", 42.0))
    assert same != request_key(turn("[exit code 0 after 0.8s]\n1 failed in 0.03s", 599.9))


def test_a_miss_names_the_file(tiny_engine, tmp_path):
    path = tmp_path / "rec.jsonl"
    ReplayBackend(path, mode="record", inner=EmbeddedBackend(tiny_engine)).complete(ask("x"))
    with pytest.raises(ReplayMissError, match=r"no recording of this request in .*rec\.jsonl"):
        ReplayBackend(path).complete(ask("y"))


def test_a_missing_recording_or_bad_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no recording at"):
        ReplayBackend(tmp_path / "absent.jsonl")
    with pytest.raises(ConfigError, match="mode"):
        ReplayBackend(tmp_path / "absent.jsonl", mode="rewind")
    with pytest.raises(ConfigError, match="needs a backend"):
        ReplayBackend(tmp_path / "absent.jsonl", mode="record")


def test_a_corrupt_entry_names_file_and_line(tiny_engine, tmp_path):
    path = tmp_path / "rec.jsonl"
    recorder = ReplayBackend(path, mode="record", inner=EmbeddedBackend(tiny_engine))
    recorder.complete(ask("a"))
    recorder.complete(ask("b"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"key": 1}', lines[1]]) + "\n")
    with pytest.raises(ConfigError, match=r"rec.jsonl:2: not a valid recording entry"):
        ReplayBackend(path)


def test_a_line_cut_short_by_a_crash_loses_nothing_recorded(tiny_engine, tmp_path):
    path = tmp_path / "rec.jsonl"
    recorder = ReplayBackend(path, mode="record", inner=EmbeddedBackend(tiny_engine))
    first = recorder.complete(ask("a"))
    with path.open("a") as handle:
        handle.write('{"key": "half-writ')
    assert ReplayBackend(path).complete(ask("a")).text == first.text
    recorder = ReplayBackend(path, mode="record", inner=EmbeddedBackend(tiny_engine))
    second = recorder.complete(ask("b"))
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["completion"]["text"] for e in entries] == [first.text, second.text]
