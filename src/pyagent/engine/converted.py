"""Converted weights, cached: a weight-only precision is computed once per model and precision.

Converting the embedded model to int8 (rounding steps searched per row, an int4 copy of the LM
head) takes seconds and holds the float32 matrices and their conversions at once. The result is
written next to the other caches as one safetensors file with a SHA-256 manifest, keyed by the
model's files (names, sizes, modification times) and the conversion's format. A later load
builds the model's modules without weights (on PyTorch's meta device), fuses and converts them
as shapes only, and takes every tensor from the file: nothing float32 is held that the converted
model does not keep. A file that is missing, incomplete or corrupt is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pyagent.engine.model import cache_root, sha256_file

FORMAT = 1  # bump when a conversion's tensors change
SMALLEST = 64 << 20  # bytes: smaller conversions are quicker to redo than to read back


def converted_path(directory: Path, scheme: str) -> Path:
    """Where `directory`'s model converted to `scheme` is cached."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".json"))
    key = hashlib.sha256(json.dumps(
        [FORMAT, scheme, str(directory.resolve()),
         [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]).encode())
    return cache_root() / "converted" / key.hexdigest()[:24] / f"{scheme}.safetensors"


def _manifest(path: Path) -> Path:
    return path.with_suffix(".json")


def usable(path: Path) -> bool:
    """Whether `path` holds a complete conversion (its manifest's checksum matches)."""
    try:
        manifest = json.loads(_manifest(path).read_text())
        return manifest["format"] == FORMAT and sha256_file(path) == manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save(model: Any, path: Path) -> None:
    """Write `model`'s tensors (each shared one once) to `path`, atomically, with a manifest
    (unless they hold fewer than `SMALLEST` bytes)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor.contiguous()
    if sum(t.nbytes for t in tensors.values()) < SMALLEST:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary)
        digest = sha256_file(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    _manifest(path).write_text(json.dumps({"format": FORMAT, "sha256": digest}))


DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I8": "int8", "U8": "uint8",
          "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _read_aligned(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file, each read into its own PyTorch allocation.

    safetensors' loaders return views into the file's bytes, aligned to 8 bytes, while
    PyTorch's CPU kernels (the int8 and int4 matrix products among them) rely on its
    allocator's 64: a misaligned weight crashes them. Reading each tensor straight into a
    fresh tensor also keeps the file's pages out of the process's memory."""
    import torch

    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        tensors = {}
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=getattr(torch, DTYPES[entry["dtype"]]))
            handle.seek(8 + size + start)
            raw = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            if handle.readinto(raw) != end - start:
                raise ValueError(f"{path} ends inside tensor {name}")
            tensors[name] = tensor
    return tensors


def load_into(model: Any, path: Path) -> None:
    """Give `model` (built on the meta device, fused and converted as shapes) the tensors saved
    in `path`; a `ValueError` if any of its tensors is left without one."""
    import torch

    model.load_state_dict(_read_aligned(path), strict=False, assign=True)
    empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
             if tensor.is_meta]
    if empty:
        raise ValueError(f"the cached conversion {path} lacks {', '.join(empty[:3])}")
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if hasattr(head, "exact"):  # a screened head rescores from the input embedding's weights
        head.exact = embedding.weight.detach()
    with torch.no_grad():
        model.eval()
