"""Weight-only precisions for the large matrices: int8 or bfloat16.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth; Gemma 3
270M's LM head alone (262,144 x 640) is 671 MB in float32. Weight-only int8 keeps one byte per
weight with a float scale per output row (symmetric, per channel, clipped where that lowers the
row's rounding error). Activations, the KV cache, norms and embeddings stay in the model's dtype.
The input embedding stays in float even when it shares its weights with the LM head: a lookup
reads one row.

On CPUs with AVX-512 VNNI, int8 layers multiply through engine/avx512.py: the weights in tiles,
each unpacked once per pass for all its rows, the activations in int8 per group of 32. Every row
of a pass, prompt chunk or decoding step, goes through the same kernel, and a row's result never
depends on the others. Elsewhere they multiply through `torch._weight_int8pack_mm` (bfloat16
activations, each row on its own, its cost growing with the rows), and inside `dense_prompt()`
through their weights converted to bfloat16 (exactly: int8 values fit its mantissa), with the row
scales applied to the product: for a prompt chunk of many rows that GEMM is far faster.

Weight-only bfloat16 keeps two bytes per weight and multiplies through oneDNN (AMX on recent
Xeons), whose cost barely grows up to 16 rows: the precision for batched decoding there. Its
kernels depend on the batch's shape, which the scheduler keeps fixed (see engine/scheduler.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from pyagent.engine import avx512
from pyagent.engine.model import QUANTIZE
from pyagent.engine.screened_head import ScreenedHead
from pyagent.errors import ModelError

ACTIVATIONS = torch.bfloat16  # what the CPU int8 kernel multiplies with
ROWS_PER_CHUNK = 8192  # rows quantized at a time: a few MB of float temporaries, not the matrix
DENSE_ROWS = 16  # prompt chunks from this many tokens take the dense path (see dense_prompt)
_DENSE: ContextVar[bool] = ContextVar("pyagent_dense_int8", default=False)


@contextmanager
def dense_prompt() -> Iterator[None]:
    """Within this block (on this thread), int8 layers multiply through bfloat16 GEMM."""
    token = _DENSE.set(True)
    try:
        yield
    finally:
        _DENSE.reset(token)


CLIP_RATIOS = torch.linspace(1.0, 0.5, 26)  # of a row's largest weight, tried as its int8 range


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-row int8 steps that minimize each row's squared rounding error over clipping ranges
    from the row's largest magnitude down to half of it. The embedded model's weights come from
    GGUF blocks of 32 with scales of their own, so a row's largest weight often sits in one
    block: clipping it loses less than coarse steps everywhere else (perplexity +0.1% against
    float32, where absolute-maximum scales cost +0.9%)."""
    largest = weight.abs().amax(dim=1).clamp(min=1e-12)
    best, best_error = largest / 127, torch.full_like(largest, float("inf"))
    for ratio in CLIP_RATIOS:
        step = largest * ratio / 127
        error = ((torch.round(weight / step[:, None]).clamp(-127, 127) * step[:, None] - weight)
                 .square().sum(dim=1))
        better = error < best_error
        best, best_error = torch.where(better, step, best), torch.where(better, error, best_error)
    return best


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights and a scale per output row: in VNNI tiles
    (engine/avx512.py) where the CPU has VNNI, else as a matrix for PyTorch's kernels."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()  # on the meta device: shapes only (engine/converted.py)
        scales = torch.empty(weight.shape[0], device=weight.device)
        packed = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        for start in range(0, 0 if weight.is_meta else weight.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            scales[rows] = row_scales(weight[rows].float())
            packed[rows] = torch.round(weight[rows].float() / scales[rows, None]).clamp(-127, 127)
        self.tiled = avx512.available(weight.shape[1])
        if self.tiled:
            tiles, scales = avx512.int8_tiles(packed, scales)
            self.register_buffer("tiles", tiles)
            self.register_buffer("scales", scales)
        else:
            self.register_buffer("weight", packed)
            self.register_buffer("scales", scales.to(ACTIVATIONS))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                   requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.tiled:
            out = avx512.int8_mm(flat, self.tiles, self.scales)[:, :self.out_features].to(x.dtype)
        elif _DENSE.get():
            out = (nn.functional.linear(flat.to(ACTIVATIONS), self.weight.to(ACTIVATIONS))
                   * self.scales).to(x.dtype)
        else:
            out = torch._weight_int8pack_mm(flat.to(ACTIVATIONS), self.weight, self.scales
                                            ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class BF16Linear(nn.Module):
    """A linear layer holding bfloat16 weights; it multiplies in bfloat16, returns the input's
    dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                   requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


SCHEMES = {"int8": Int8Linear, "bf16": BF16Linear}
ROW_WISE = ("int8",)  # schemes whose decode kernels compute each row on its own


def layout(scheme: str) -> str:
    """`scheme` as this machine lays its tensors out (what the converted-weight cache keys)."""
    return f"{scheme}-vnni" if scheme in ROW_WISE and avx512.kernels() is not None else scheme


def weight_precision(model: Any) -> str:
    """What the model's linear layers multiply in: 'int8', 'bf16', or the model's dtype."""
    for module in model.modules():
        for scheme, kind in SCHEMES.items():
            if isinstance(module, kind):
                return scheme
    return str(model.dtype).removeprefix("torch.")


def quantize(model: Any, scheme: str) -> int:
    """Replace the model's linear layers (decoder projections and the LM head) by weight-only
    `scheme` ones in place; the number of weights converted. With int8, an LM head tied to the
    input embedding becomes a `ScreenedHead` (int4 screening, exact top logits)."""
    if scheme not in QUANTIZE:
        raise ModelError(f"quantize must be one of {', '.join(QUANTIZE)}, got {scheme!r}")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)]
    embedding = model.get_input_embeddings()
    for name, module in targets:
        parent, _, attribute = name.rpartition(".")
        tied = module.weight is getattr(embedding, "weight", None)
        screened = scheme in ROW_WISE and tied and ScreenedHead.fits(module.weight)
        converted = (ScreenedHead(embedding.weight) if screened
                     else SCHEMES[scheme](module))
        setattr(model.get_submodule(parent) if parent else model, attribute, converted)
    return sum(module.weight.numel() for _, module in targets)
