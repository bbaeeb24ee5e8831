"""The `pyagent` command, run as a user runs it: a real process."""

import json
import socket
import subprocess
import sys
import time

import openai
import pytest

from conftest import fails_with, pyagent


@pytest.mark.parametrize("command", [[], ["models"], ["models", "list"], ["models", "prepare"],
                                     ["generate"], ["serve"], ["demo"]])
def test_every_command_has_help(command):
    result = pyagent(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_unknown_model_is_one_clear_error():
    fails_with(pyagent("generate", "hi", "--model", "nope"), "unknown model 'nope'")


def test_invalid_sampling_value_is_one_clear_error():
    fails_with(pyagent("generate", "hi", "--temperature", "5"), "temperature must be")


def test_unknown_backend_is_one_clear_error():
    fails_with(pyagent("generate", "hi", "--backend", "bogus"), "unknown backend 'bogus'")


def test_unreachable_server_is_one_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fails_with(pyagent("generate", "hi", "--backend", "openai", "--model", "m",
                       "--base-url", f"http://127.0.0.1:{port}/v1"), "cannot reach")


def test_record_with_one_backend_and_replay_with_another(tiny_model_dir, tmp_path):
    recording = tmp_path / "rec.jsonl"
    recorded = pyagent("generate", "The quick", "--model", str(tiny_model_dir), "--max-tokens",
                       "6", "--record", str(recording), "--json")
    assert recorded.returncode == 0, recorded.stderr
    replayed = pyagent("generate", "The quick", "--max-tokens", "6", "--backend", "replay",
                       "--recording", str(recording), "--json")
    assert replayed.returncode == 0, replayed.stderr
    first, second = json.loads(recorded.stdout), json.loads(replayed.stdout)
    assert (second["text"], second["usage"]) == (first["text"], first["usage"])
    assert second["backend"] == "replay"
    fails_with(pyagent("generate", "other", "--backend", "replay", "--recording", str(recording)),
               "no recording of this request")


def test_models_list_shows_the_embedded_model():
    result = pyagent("models", "list")
    assert result.returncode == 0, result.stderr
    assert "gemma-3-270m" in result.stdout


@pytest.mark.model
def test_generate_streams_text_and_reports_usage(engine):
    result = pyagent("generate", "The three primary colors are", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "red" in result.stdout
    assert "TTFT" in result.stderr


@pytest.mark.model
def test_demo_runs_on_the_embedded_model(engine, tmp_path):
    result = pyagent("demo", "--data", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr
    assert "red, blue" in result.stdout and "def is_even" in result.stdout
    assert "tokens and timings, measured" in result.stderr
    assert "done step code" in result.stderr and "done step test" in result.stderr
    run_id = result.stdout.split("pyagent runs show ")[1].split()[0]
    shown = pyagent("runs", "show", run_id, "--data", str(tmp_path))
    assert shown.returncode == 0 and "coder" in shown.stdout


@pytest.mark.model
def test_serve_answers_an_openai_client(engine):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pyagent", "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0)
        deadline = time.monotonic() + 240
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        assert models.data[0].id == "gemma-3-270m"
        response = client.completions.create(model="gemma-3-270m", max_tokens=8, temperature=0,
                                             prompt="The three primary colors are")
        assert "red" in response.choices[0].text
    finally:
        server.terminate()
        server.wait(timeout=30)
