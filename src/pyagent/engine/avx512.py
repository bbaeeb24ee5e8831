"""PyAgent's CPU kernels for decoding on AVX-512 (engine/kernels/avx512.cpp): weight-stationary
int8 and int4 products on VNNI, attention of a few queries over their own keys read straight
from the paged cache's blocks, and the LM head's selection of its top logits and their exact
rescoring. Every one computes a row (or a query and head) on its own, in a fixed
order.

PyTorch's weight-only CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) read
and unpack the weights again for every few rows, so a pass of 9 rows (a token and 8 drafted ones,
or 9 requests in a batch) costs nearly 9 passes. These kernels unpack each block of 16 weight
rows once and multiply it with every activation row, in integers: activations are quantized per
group of 32 inputs to int8 (a step per group, as llama.cpp's Q8_0), and `vpdpbusd` sums four
products at a time exactly. Each output then sums its groups in a fixed order, so a row's result
never depends on the other rows of the pass (speculation and batching rely on it).

The kernels are compiled once per machine with PyTorch's C++ extension tools (a C++ compiler and
about half a minute) into the cache directory, and used on CPUs with AVX-512 VNNI. Elsewhere, or
when they cannot be built, `available()` is False and the weight-only layers keep PyTorch's own
kernels.

Layouts (rows padded to whole blocks of 16 with zero weights):
- int8: unsigned codes (signed weight + 128) in tiles [rows / 16, inputs / 4, 16, 4]: a tile is
  16 rows by 4 consecutive inputs, as `vpdpbusd` reads it; a float scale per row.
- int4: codes 0..15 per group of 32 inputs in tiles [rows / 16, inputs / 32, 4, 64]: byte
  `4 * lane + j` of tile t holds input `8 t + j` in its low nibble and `8 t + 4 + j` in its high
  one; per group a float16 step and low ([rows / 16, inputs / 32, 2, 16]): weight = code *
  step + low.
"""

from __future__ import annotations

import logging
import os
import sysconfig
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from pyagent.engine.model import cache_root, cpu_flags

LANES = 16  # weight rows per block
GROUP = 32  # inputs per activation step (and per int4 step)
NEEDS = ("avx512f", "avx512bw", "avx512_vnni")
SOURCE = Path(__file__).with_name("kernels") / "avx512.cpp"
log = logging.getLogger(__name__)
_BUILDING = threading.Lock()  # one build at a time, and PATH changed by one thread only


def _build_directory() -> Path:
    return cache_root() / "kernels" / f"torch-{torch.__version__}"


def prepare(report: Callable[[str], None]) -> bool:
    """Build the kernels now if this CPU can use them, saying so when that takes a while;
    whether they are available."""
    if set(NEEDS) <= cpu_flags() and not (_build_directory() / "pyagent_avx512.so").exists():
        report("compiling the AVX-512 kernels (once per machine, about half a minute)")
    return kernels() is not None


def kernels() -> Any | None:
    """The compiled kernels, or None where the CPU lacks AVX-512 VNNI or they cannot be
    built (built once, whichever thread asks first)."""
    with _BUILDING:
        return _built()


@cache
def _built() -> Any | None:
    if not set(NEEDS) <= cpu_flags():
        return None
    from torch.utils.cpp_extension import load

    build = _build_directory()
    build.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "")
    # PyTorch runs `ninja` from PATH: the one installed with PyAgent, even if not activated
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), path])
    try:
        return load("pyagent_avx512", [str(SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni",
                                  "-mf16c"],
                    extra_ldflags=["-fopenmp"],  # the libgomp PyTorch has loaded: one pool
                    verbose=False)
    except Exception as error:  # no compiler, headers or ninja: PyTorch's kernels still work
        log.warning("AVX-512 kernels unavailable, using PyTorch's: %s",
                    str(error).splitlines()[0])
        return None
    finally:
        os.environ["PATH"] = path


def available(inputs: int) -> bool:
    """Whether layers with `inputs` inputs can use these kernels here."""
    return inputs % GROUP == 0 and kernels() is not None


def _pad_rows(matrix: torch.Tensor, value: int | float) -> torch.Tensor:
    extra = -matrix.shape[0] % LANES
    return matrix if not extra else torch.cat(
        [matrix, matrix.new_full((extra, *matrix.shape[1:]), value)])


def int8_tiles(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 codes [rows, inputs] and their rows' scales in the int8 layout: (tiles,
    float32 scales padded to whole blocks)."""
    inputs = codes.shape[1]
    unsigned = (_pad_rows(codes, 0).to(torch.int16) + 128).to(torch.uint8)
    tiles = unsigned.view(-1, LANES, inputs // 4, 4).transpose(1, 2).contiguous()
    return tiles, _pad_rows(scales.float(), 0.0)


def int8_codes(tiles: torch.Tensor, rows: int) -> torch.Tensor:
    """The signed int8 codes [rows, inputs] that `int8_tiles` laid out."""
    blocks, quads = tiles.shape[:2]
    return (tiles.transpose(1, 2).reshape(blocks * LANES, quads * 4)[:rows].to(torch.int16)
            - 128).to(torch.int8)


def int4_tiles(codes: torch.Tensor, steps: torch.Tensor, lows: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..15 [rows, inputs] and float steps and lows [rows, inputs / 32] in the int4
    layout: (tiles, grid)."""
    groups = codes.shape[1] // GROUP
    # [block, lane, group, t, half, j] -> [block, group, t, half, lane, j]
    blocks = _pad_rows(codes.to(torch.uint8), 0).view(-1, LANES, groups, 4, 2, 4)
    blocks = blocks.permute(0, 2, 3, 4, 1, 5)
    tiles = (blocks[:, :, :, 0] | (blocks[:, :, :, 1] << 4)).reshape(-1, groups, 4, 64)
    grid = torch.stack([_pad_rows(steps, 0.0), _pad_rows(lows, 0.0)], dim=-1)  # [r, g, 2]
    grid = grid.view(-1, LANES, groups, 2).permute(0, 2, 3, 1).to(torch.float16)
    return tiles.contiguous(), grid.contiguous()


def int8_mm(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [n, inputs] times the int8 tiles' weights: [n, padded rows] float32."""
    return kernels().int8_mm(x, tiles, scales)


def int4_mm(x: torch.Tensor, tiles: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """x [n, inputs] times the int4 tiles' weights: [n, padded rows] float32."""
    return kernels().int4_mm(x, tiles, grid)


def attend_spans(queries: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 tables: list[torch.Tensor], counts: list[int], spans: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """Attention of the queries of several sequences in one call: queries [n, heads, dim]
    (float32), the first `counts[0]` rows of the first sequence and so on; each query over the
    slots [start, end) of its row of `spans` ([n, 2] int64). A sequence's keys and values are
    read where they are stored: planes [blocks, block_size, kv_heads, dim] (sequences may share
    them) and the table of blocks that holds its slots in order (int64; slot j is in block
    `table[j // block_size]`). [n, heads, dim]."""
    return kernels().attend_spans(queries, keys, values, tables, counts, spans, scaling)


def top_ids(values: torch.Tensor, top: int) -> torch.Tensor:
    """The ids of the `top` largest of every row of `values` ([n, vocabulary] float32, rows
    contiguous), in ascending order: [n, top] int64. The set torch.topk chooses (at a tie on
    the boundary, the lowest ids)."""
    return kernels().top_ids(values, top)


def rescore(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exact logits of the tokens `ids` ([n, top]) for hidden states [n, inputs], from the
    float32 rows of `weight`: [n, top]."""
    return kernels().rescore(hidden, weight, ids)
