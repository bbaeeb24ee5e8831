"""Converted weights are cached and reused (aligned, identical), a damaged conversion is rebuilt,
and `auto` picks a precision by the CPU and the workload and says why."""

import pytest
import torch

from pyagent.engine import converted
from pyagent.engine.generate import Engine
from pyagent.engine.model import choose_precision, load
from pyagent.engine.quantize import layout
from pyagent.engine.registry import resolve_model
from pyagent.errors import ModelError
from pyagent.types import CompletionRequest, SamplingParams


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory where even the tiny model's conversion is kept."""
    monkeypatch.setenv("PYAGENT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(converted, "SMALLEST", 0)
    return tmp_path / "cache"


def greedy_text(loaded) -> str:
    request = CompletionRequest(prompt="a b c d a b", sampling=SamplingParams(
        max_tokens=24, ignore_eos=True, temperature=0.0, logprobs=3))
    done = Engine(loaded).generate(request)
    return done.text, done.logprobs


def test_a_conversion_is_cached_and_loads_to_the_same_model(tiny_model_dir, cache):
    spec = resolve_model(str(tiny_model_dir))
    path = converted.converted_path(tiny_model_dir, layout("int8"))
    assert not path.exists()
    first = load(spec, dtype="int8")
    assert converted.usable(path) and path.is_relative_to(cache)
    messages: list[str] = []
    again = load(spec, dtype="int8", report=messages.append)
    assert any(str(path) in m for m in messages)  # read back, not converted again
    for name, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, first.model.state_dict()[name]), name
        assert tensor.data_ptr() % 64 == 0, f"{name} is not aligned for the CPU kernels"
    assert greedy_text(again) == greedy_text(first)
    assert again.precision == "int8" and again.chosen is None


def test_a_damaged_conversion_is_rebuilt_not_used(tiny_model_dir, cache):
    spec = resolve_model(str(tiny_model_dir))
    reference = greedy_text(load(spec, dtype="int8"))
    path = converted.converted_path(tiny_model_dir, layout("int8"))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not converted.usable(path)
    assert greedy_text(load(spec, dtype="int8")) == reference
    assert converted.usable(path)  # rewritten
    path.write_bytes(path.read_bytes()[:100])  # truncated: the manifest no longer matches
    assert not converted.usable(path)
    assert greedy_text(load(spec, dtype="int8")) == reference


def test_small_conversions_are_not_kept(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYAGENT_CACHE_DIR", str(tmp_path / "cache"))
    load(resolve_model(str(tiny_model_dir)), dtype="int8")
    assert not converted.converted_path(tiny_model_dir, layout("int8")).exists()


def test_auto_picks_by_cpu_and_workload_and_says_why():
    assert choose_precision("stream", set()) == (
        "int8", "stream workload, no AMX: int8 weights decode fastest")
    assert choose_precision("batch", {"amx_bf16"})[0] == "bf16-weights"
    assert choose_precision("stream", {"amx_bf16"})[0] == "int8"
    assert choose_precision("batch", {"avx512_bf16"})[0] == "int8"
    with pytest.raises(ModelError, match="workload must be one of stream, batch, got 'bulk'"):
        choose_precision("bulk")


def test_auto_is_the_default_of_the_python_api(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir))
    chosen, why = choose_precision("stream")
    assert engine.loaded.precision == chosen and engine.loaded.chosen == why
    assert Engine.load(str(tiny_model_dir), dtype="float32").loaded.chosen is None
