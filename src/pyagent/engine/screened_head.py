"""The LM head as a screen and a rescore: int4 logits for the whole vocabulary, exact logits for
the likeliest tokens.

Gemma 3's vocabulary has 262,144 rows, so its LM head is most of what one decoded token reads
from memory (168 M of 268 M weights). `ScreenedHead` multiplies through a 4-bit copy of the head
(groups of 32 weights along the hidden axis, each with a bfloat16 step and offset: 84 MB, on
PyTorch's `_weight_int4pack_mm_for_cpu`), then recomputes the `top` highest logits of each row
exactly, from the float weights the input embedding already holds. The tokens that greedy
decoding, top-k and top-p sampling choose from therefore get the float32 model's logits; only
the far tail keeps its int4 estimate. A row is computed on its own, so its logits never depend on
the other rows of a batch.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # weights per int4 group along the hidden axis
TOP = 1024  # logits per row recomputed from the float weights
INNER_K_TILES = 2  # the CPU kernel's packing parameter


def int4_groups(weight: torch.Tensor, group: int = GROUP
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` ([out, in]) to asymmetric int4 per `group` inputs: the kernel's packed
    codes and its [in / group, out, 2] bfloat16 (step, offset) grid, where a weight is
    `(code - 8) * step + offset`."""
    rows, columns = weight.shape
    if rows % 16:  # the kernel packs rows in sixteens: pad with zero rows
        weight = torch.cat([weight, weight.new_zeros(16 - rows % 16, columns)])
    packed, grids = [], []
    for start in range(0, rows, 8192):  # a few MB of float temporaries at a time
        part = weight[start:start + 8192].float().reshape(-1, columns // group, group)
        low, high = part.amin(-1), part.amax(-1)
        step = ((high - low) / 15).clamp(min=1e-10)
        codes = torch.round((part - low[..., None]) / step[..., None]).clamp(0, 15)
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.to(torch.int32).reshape(-1, columns), INNER_K_TILES))
        grids.append(torch.stack([step, low + 8 * step], dim=-1))
    grid = torch.cat(grids).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.cat(packed), grid


def _shapes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty tensors shaped like `int4_groups(weight)`'s, on the meta device."""
    rows, columns = weight.shape
    rows += -rows % 16
    return (torch.empty(rows, columns // 2, dtype=torch.uint8, device="meta"),
            torch.empty(columns // GROUP, rows, 2, dtype=torch.bfloat16, device="meta"))


class ScreenedHead(nn.Module):
    """An LM head tied to float weights: int4 screening, then exact logits for the top rows."""

    def __init__(self, weight: torch.Tensor, top: int = TOP):
        super().__init__()
        packed, grid = int4_groups(weight.detach()) if not weight.is_meta else _shapes(weight)
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
        logits = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(torch.bfloat16), self.packed, GROUP, self.grid)[:, :self.out_features].float()
        # in vocabulary order: a token's exact logit must not depend on where topk put it
        top = logits.topk(self.top, dim=-1, sorted=False).indices.sort(dim=-1).values
        rows = self.exact.index_select(0, top.flatten()).view(*top.shape, -1)
        # an elementwise product and a sum: each logit reduces the same way in any batch
        exact = (rows.to(flat.dtype) * flat[:, None, :]).sum(dim=-1)
        logits.scatter_(1, top, exact.float())
        return logits.to(hidden.dtype).reshape(*hidden.shape[:-1], self.out_features)
