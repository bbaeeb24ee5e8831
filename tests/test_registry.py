import pytest

from pyagent.engine.registry import DEFAULT_MODEL, EMBEDDED, resolve_model
from pyagent.errors import ModelNotFoundError


def test_builtin_names_and_aliases_resolve_to_the_embedded_model():
    for ref in (None, DEFAULT_MODEL, "gemma3-270m", "embedded"):
        assert resolve_model(ref) is EMBEDDED


def test_hf_directory_and_gguf_file_resolve(tiny_model_dir, tmp_path):
    spec = resolve_model(str(tiny_model_dir))
    assert (spec.source, spec.path) == ("hf", tiny_model_dir.resolve())
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).source == "gguf"


def test_unknown_model_lists_the_known_names():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'nope'.*gemma-3-270m"):
        resolve_model("nope")


def test_a_path_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"neither a \.gguf file nor a directory"):
        resolve_model(str(tmp_path))
