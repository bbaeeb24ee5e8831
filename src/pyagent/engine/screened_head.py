"""The LM head as a screen and a rescore: int4 logits for the whole vocabulary, exact logits for
the likeliest tokens.

Gemma 3's vocabulary has 262,144 rows, so its LM head is most of what one decoded token reads
from memory (168 M of 268 M weights). `ScreenedHead` multiplies through a 4-bit copy of the head
(groups of 32 weights along the hidden axis, each with a step and an offset: 84 MB, on the
AVX-512 VNNI kernel of engine/avx512.py, else PyTorch's `_weight_int4pack_mm_for_cpu`), then
recomputes the `top` highest logits of each row exactly, from the float weights the input
embedding already holds. The tokens that greedy
decoding, top-k and top-p sampling choose from therefore get the float32 model's logits; only
the far tail keeps its int4 estimate. A row is computed on its own, so its logits never depend on
the other rows of a batch.
"""

from __future__ import annotations

import torch
from torch import nn

from pyagent.engine import avx512

GROUP = 32  # weights per int4 group along the hidden axis
TOP = 1024  # logits per row recomputed from the float weights
INNER_K_TILES = 2  # the CPU kernel's packing parameter


def int4_codes(weight: torch.Tensor, group: int = GROUP
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per `group` inputs of `weight` ([out, in]): codes 0..15 ([out, in],
    uint8) and each group's float step and low ([out, in / group]), where a weight is
    `code * step + low`."""
    rows, columns = weight.shape
    codes = torch.empty(rows, columns, dtype=torch.uint8)
    steps, lows = torch.empty(rows, columns // group), torch.empty(rows, columns // group)
    for start in range(0, rows, 8192):  # a few MB of float temporaries at a time
        part = weight[start:start + 8192].float().reshape(-1, columns // group, group)
        low, high = part.amin(-1), part.amax(-1)
        step = ((high - low) / 15).clamp(min=1e-10)
        codes[start:start + 8192] = torch.round((part - low[..., None]) / step[..., None]
                                                ).clamp(0, 15).reshape(-1, columns)
        steps[start:start + 8192], lows[start:start + 8192] = step, low
    return codes, steps, lows


def int4_groups(weight: torch.Tensor, group: int = GROUP
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` ([out, in]) in int4 for PyTorch's kernel: its packed codes and its
    [in / group, out, 2] bfloat16 (step, offset) grid, where a weight is
    `(code - 8) * step + offset`."""
    if weight.shape[0] % 16:  # the kernel packs rows in sixteens: pad with zero rows
        weight = torch.cat([weight, weight.new_zeros(16 - weight.shape[0] % 16, weight.shape[1])])
    codes, steps, lows = int4_codes(weight, group)
    packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes[start:start + 8192].to(torch.int32), INNER_K_TILES)
        for start in range(0, weight.shape[0], 8192)])
    grid = torch.stack([steps, lows + 8 * steps], dim=-1).transpose(0, 1)
    return packed, grid.contiguous().to(torch.bfloat16)


def _shapes(weight: torch.Tensor, tiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty tensors shaped like the head's int4 layout of `weight`, on the meta device."""
    rows, columns = weight.shape
    rows += -rows % 16
    if tiled:
        return (torch.empty(rows // 16, columns // GROUP, 4, 64, dtype=torch.uint8,
                            device="meta"),
                torch.empty(rows // 16, columns // GROUP, 2, 16, dtype=torch.float16,
                            device="meta"))
    return (torch.empty(rows, columns // 2, dtype=torch.uint8, device="meta"),
            torch.empty(columns // GROUP, rows, 2, dtype=torch.bfloat16, device="meta"))


class ScreenedHead(nn.Module):
    """An LM head tied to float weights: int4 screening, then exact logits for the top rows."""

    def __init__(self, weight: torch.Tensor, top: int = TOP):
        super().__init__()
        self.tiled = avx512.available(weight.shape[1])
        if weight.is_meta:
            packed, grid = _shapes(weight, self.tiled)
        elif self.tiled:
            packed, grid = avx512.int4_tiles(*int4_codes(weight.detach()))
        else:
            packed, grid = int4_groups(weight.detach())
        self.register_buffer("packed", packed)
        self.register_buffer("grid", grid)
        self.exact = weight.detach()  # the float weights, shared with the input embedding
        self.top = min(top, weight.shape[0])
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """Whether the int4 kernel takes `weight`'s shape (whole groups along its inputs)."""
        return weight.shape[1] % GROUP == 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, self.in_features)
        if self.tiled:
            logits = avx512.int4_mm(flat, self.packed, self.grid)[:, :self.out_features]
        else:
            logits = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, GROUP, self.grid
            )[:, :self.out_features].float()
        # in vocabulary order: a token's exact logit must not depend on where topk put it
        top = (avx512.top_ids(logits, self.top) if self.tiled else
               logits.topk(self.top, dim=-1, sorted=False).indices.sort(dim=-1).values)
        if self.tiled and flat.dtype == self.exact.dtype == torch.float32:
            exact = avx512.rescore(flat.contiguous(), self.exact, top)
        else:
            rows = self.exact.index_select(0, top.flatten()).view(*top.shape, -1)
            # an elementwise product and a sum: each logit reduces the same way in any batch
            exact = (rows.to(flat.dtype) * flat[:, None, :]).sum(dim=-1)
        logits.scatter_(1, top, exact.float())
        return logits.to(hidden.dtype).reshape(*hidden.shape[:-1], self.out_features)
