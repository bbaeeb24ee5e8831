"""How a `BlockPool` (engine/kvcache.py) lays out and encodes keys and values: as they are in a
float dtype, or quantized to int8 or int4. A format owns the pool's planes' layout and their
`store`, `load` and `move`; the pool keeps the block bookkeeping.

Every plane is [layers, blocks, ...]: the pool grows, copies and accounts planes along the
blocks axis whatever follows it.

- float (`Plain`): `k` and `v` [layers, blocks, block_size, heads, dim] in the storage dtype.
- int8 (`Int8`): every token's key and value of every head on its own, symmetric absmax per
  group of QUANT_GROUP channels: `k`, `v` int8 codes and `k_scale`, `v_scale`
  [..., block_size, heads, dim / QUANT_GROUP] float32. A token written later never changes an
  earlier one. 544 bytes of key and value per head and token for head_dim 256 (float32: 2048).
- int4 (`Int4`), after KIVI (Liu et al., 2024) and transformers' quantized cache: 16 levels,
  asymmetric (a zero point, the minimum, and a step of (max - min) / 15), two codes per byte
  (even channel in the low nibble; an odd dim gets one padding code).
  - Values per token: each token's value of each head on its own, per group of
    INT4_VALUE_GROUP channels: `v` [..., block_size, heads, dim / 2] uint8, `v_zero`, `v_step`
    [..., block_size, heads, dim / INT4_VALUE_GROUP] float16.
  - Keys per channel: a block's keys of one head share a zero point and a step per channel,
    over the tokens the block holds: `k` [..., block_size, heads, dim / 2] uint8, `k_zero`,
    `k_step` [layers, blocks, heads, dim] float16 (no token axis). Key outliers sit in fixed
    channels (on Gemma 3 270M some key channels have a mean near 78 and a spread near 1 within
    a block), so a per-token grid spends its 16 levels on that offset and resolves the other
    channels poorly; a per-channel grid follows each channel's own range.
  Bytes per head and token for head_dim 256 and 16-token blocks: keys 128 + 4 * 256 / 16 = 192,
  values 128 + 4 * 256 / 32 = 160; 352 in all, against 544 for int8 and 2048 for float32.

Why asymmetric, and groups of 32 value channels: on keys and values of Gemma 3 270M after a
1k-token text (relative L2 error, all layers), keys per channel per block are at 3.4%
asymmetric and 6.7% symmetric (the outlier channels are offset, not centred), against 13.9% per
token in groups of 64 channels, and 7.0% per token at the same bytes (groups of 16). Values per
token are at 8.7% asymmetric in groups of 32 channels (160 bytes per token and head), 10.6% in
groups of 64 (144 bytes), and symmetric at 11.7% in groups of 32 (144 bytes) and 9.7% in groups
of 16 (160 bytes): at equal bytes the zero point buys more than smaller groups, and groups of 32
cut the error by a fifth for 4.5% more bytes than groups of 64.

Zero points and steps are float16 (the largest key and value magnitudes seen on that text are 109
and 149; magnitudes beyond float16's 65504 saturate), rounded outward: the zero point down, then
the step up from it, so the grid spans [min, max] of what it encodes and every element lands
within half a step of its value (nothing is clipped).

Appending to a partly filled block (decode writes one token at a time, a prefill chunk may end
inside a block): the writes of a block are contiguous from its first slot, so the slots before
the first one written hold the block's tokens so far. Their keys are decoded and every channel's
grid is kept where the new tokens fall inside it: there re-encoding the old tokens reproduces
their codes, and the new tokens are within half a step. Where a new token leaves a channel's
range, that channel gets the grid of the union of its old grid and the new tokens, and the old
tokens are re-encoded onto it from their decoded values. Ranges only grow, so a key that went
through r such growths after it was written is within (r + 1) / 2 steps of the block's final
grid (r <= block_size - 1), and a block filled in one write (a prefill chunk covering it) is
encoded once. Measured on Gemma 3 270M keys written one token at a time: 4.5% against 3.4% when
each block is encoded at once, still better than per token at the same bytes (7.0%).

Moving tokens (eviction packs survivors into fewer blocks): values and their grids are copied as
they are (lossless); keys are decoded from their source blocks and each target block gets a new
per-channel grid over the tokens it then holds (its slots up to the last one written), which
adds at most half a step of that grid to each key each time it moves (survivors of partly kept
blocks are packed again at every eviction that keeps their block only partly).
"""

from __future__ import annotations

import torch

QUANT_GROUP = 64  # int8: channels that share one scale
INT4_VALUE_GROUP = 32  # int4: value channels of a token that share one zero point and step
INT4 = torch.uint4  # the storage dtype that selects int4 (codes are kept two per uint8)
LEVELS = 15  # int4 codes are 0..15: 15 steps between the zero point and the top of the range
FLOAT16_MAX = float(torch.finfo(torch.float16).max)
_DOWN = torch.tensor(-torch.inf, dtype=torch.float16)
_UP = torch.tensor(torch.inf, dtype=torch.float16)


def grouped(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """[..., dim] -> [..., groups, group]; the last group is padded with its last channel (a
    padding that never widens the group's range)."""
    pad = -tensor.shape[-1] % group
    if pad:
        tensor = torch.cat([tensor, tensor[..., -1:].expand(*tensor.shape[:-1], pad)], -1)
    return tensor.unflatten(-1, (-1, group))


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., n] -> [..., ceil(n / 2)] uint8, two per byte (even channel low)."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(packed: torch.Tensor, count: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The first `count` codes of each row of `pack4`'s output, as `dtype`."""
    codes = torch.empty((*packed.shape, 2), dtype=dtype)
    codes[..., 0] = packed & 15
    codes[..., 1] = packed >> 4
    return codes.flatten(-2)[..., :count]


def int4_grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 zero point and step of a 16-level grid spanning [low, high] (rounded outward:
    the zero point down, the step up from it)."""
    low = low.float().clamp(-FLOAT16_MAX, FLOAT16_MAX)
    high = high.float().clamp(-FLOAT16_MAX, FLOAT16_MAX)
    zero = low.half()
    zero = torch.where(zero.float() > low, torch.nextafter(zero, _DOWN), zero)
    exact = ((high - zero.float()) / LEVELS).clamp(min=2.0**-24)  # float16's smallest step
    step = exact.half()
    step = torch.where(step.float() < exact, torch.nextafter(step, _UP), step)
    return zero, step


def int4_encode(tensor: torch.Tensor, zero: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 of `tensor` on the grid (`zero`, `step` broadcast against it)."""
    codes = torch.round((tensor.float() - zero.float()) / step.float())
    return codes.clamp(0, LEVELS).to(torch.uint8)


def int4_decode(codes: torch.Tensor, zero: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(zero.float(), codes.float(), step.float())


def _decode_packed(packed: torch.Tensor, zero: torch.Tensor, step: torch.Tensor, count: int,
                   group: int | None = None) -> torch.Tensor:
    """Float32 values of packed codes, decoded in place (the hot path of `load`): the grids
    broadcast against [..., count], or against [..., groups, group] when `group` is given."""
    codes = unpack4(packed, count, torch.float32)
    if group is None:
        return codes.mul_(step.float()).add_(zero.float())
    groups = grouped(codes, group)
    return groups.mul_(step.float()[..., None]).add_(zero.float()[..., None]
                                                     ).flatten(-2)[..., :count]


def quantize_tokens(tensor: torch.Tensor, group: int = INT4_VALUE_GROUP
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4, per token: [..., dim] -> packed codes [..., ceil(dim / 2)], and zero points and
    steps [..., ceil(dim / group)], one per `group` channels."""
    groups = grouped(tensor.float(), group)
    zero, step = int4_grid(groups.amin(-1), groups.amax(-1))
    codes = int4_encode(groups, zero[..., None], step[..., None]).flatten(-2)
    return pack4(codes[..., :tensor.shape[-1]]), zero, step


def dequantize_tokens(packed: torch.Tensor, zero: torch.Tensor, step: torch.Tensor, dim: int,
                      group: int = INT4_VALUE_GROUP) -> torch.Tensor:
    """Float32 [..., dim] from `quantize_tokens`' output."""
    return _decode_packed(packed, zero, step, dim, group)


def quantize_channels(tensor: torch.Tensor, axis: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4, per channel: one grid per channel over the tokens along `axis` of [..., dim]:
    packed codes, and zero points and steps without that axis."""
    zero, step = int4_grid(tensor.amin(axis), tensor.amax(axis))
    codes = int4_encode(tensor, zero.unsqueeze(axis), step.unsqueeze(axis))
    return pack4(codes), zero, step


def dequantize_channels(packed: torch.Tensor, zero: torch.Tensor, step: torch.Tensor, dim: int,
                        axis: int = 0) -> torch.Tensor:
    return _decode_packed(packed, zero.unsqueeze(axis), step.unsqueeze(axis), dim)


class Plain:
    """Keys and values as they are, in a float storage dtype."""

    quantized = False

    def __init__(self, storage: torch.dtype, head_dim: int):
        self.storage = storage
        self.dim = head_dim

    def planes(self, layers: int, block_size: int, heads: int) -> dict[str, torch.Tensor]:
        shape = (layers, 0, block_size, heads)
        return {"k": torch.zeros((*shape, self.dim), dtype=self.storage),
                "v": torch.zeros((*shape, self.dim), dtype=self.storage)}

    def store(self, planes: dict[str, torch.Tensor], index: int, blocks: torch.Tensor,
              offsets: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        planes["k"][index][blocks, offsets] = key.to(self.storage)
        planes["v"][index][blocks, offsets] = value.to(self.storage)

    def load(self, planes: dict[str, torch.Tensor], index: int, table: torch.Tensor, count: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float keys and values [tokens, heads, dim] (any float dtype: the caller converts)."""
        return tuple(planes[name][index].index_select(0, table).flatten(0, 1)[:count]
                     for name in ("k", "v"))

    def move(self, planes: dict[str, torch.Tensor], targets: torch.Tensor,
             target_slots: torch.Tensor, sources: torch.Tensor, source_slots: torch.Tensor
             ) -> None:
        for plane in planes.values():
            plane[:, targets, target_slots] = plane[:, sources, source_slots]


class Int8(Plain):
    """int8 codes, a float32 scale per token, head and QUANT_GROUP channels."""

    quantized = True

    def planes(self, layers: int, block_size: int, heads: int) -> dict[str, torch.Tensor]:
        shape = (layers, 0, block_size, heads)
        groups = -(-self.dim // QUANT_GROUP)
        return {"k": torch.zeros((*shape, self.dim), dtype=torch.int8),
                "v": torch.zeros((*shape, self.dim), dtype=torch.int8),
                "k_scale": torch.zeros((*shape, groups)), "v_scale": torch.zeros((*shape, groups))}

    def store(self, planes, index, blocks, offsets, key, value) -> None:
        for name, tensor in (("k", key), ("v", value)):
            groups = _zero_padded(tensor.float())
            scale = groups.abs().amax(-1).clamp(min=1e-8) / 127
            planes[name + "_scale"][index][blocks, offsets] = scale
            codes = torch.round(groups / scale[..., None]).flatten(-2)[..., :self.dim]
            planes[name][index][blocks, offsets] = codes.to(torch.int8)

    def load(self, planes, index, table, count):
        out = []
        for name in ("k", "v"):
            codes = planes[name][index].index_select(0, table).flatten(0, 1)[:count]
            scale = planes[name + "_scale"][index].index_select(0, table).flatten(0, 1)[:count]
            out.append((_zero_padded(codes.float()) * scale[..., None]
                        ).flatten(-2)[..., :self.dim])
        return out[0], out[1]


def _zero_padded(tensor: torch.Tensor) -> torch.Tensor:
    """[..., dim] -> [..., groups, QUANT_GROUP], zero-padded (int8's layout)."""
    pad = -tensor.shape[-1] % QUANT_GROUP
    if pad:
        tensor = torch.nn.functional.pad(tensor, (0, pad))
    return tensor.unflatten(-1, (-1, QUANT_GROUP))


class Int4(Plain):
    """int4 codes: values per token (a grid per INT4_VALUE_GROUP channels), keys per channel
    (a grid per channel, head and block). See the module docstring for the layout and bounds."""

    quantized = True

    def planes(self, layers: int, block_size: int, heads: int) -> dict[str, torch.Tensor]:
        shape = (layers, 0, block_size, heads)
        packed = -(-self.dim // 2)
        groups = -(-self.dim // INT4_VALUE_GROUP)
        per_block = (layers, 0, heads, self.dim)
        return {"k": torch.zeros((*shape, packed), dtype=torch.uint8),
                "k_zero": torch.zeros(per_block, dtype=torch.float16),
                "k_step": torch.zeros(per_block, dtype=torch.float16),
                "v": torch.zeros((*shape, packed), dtype=torch.uint8),
                "v_zero": torch.zeros((*shape, groups), dtype=torch.float16),
                "v_step": torch.zeros((*shape, groups), dtype=torch.float16)}

    def store(self, planes, index, blocks, offsets, key, value) -> None:
        codes, zero, step = quantize_tokens(value)
        for name, tensor in (("v", codes), ("v_zero", zero), ("v_step", step)):
            planes[name][index][blocks, offsets] = tensor
        if len(offsets) == 1 and int(offsets[0]) > 0:
            self._append_key(planes, index, int(blocks[0]), int(offsets[0]), key[0])
            return
        unique, inverse = torch.unique(blocks, return_inverse=True)
        block_size = planes["k"].shape[2]
        # a block's writes are contiguous from slot 0: the slots before its first one written
        # now hold its tokens so far
        had = torch.full((len(unique),), block_size).scatter_reduce(
            0, inverse, offsets, "amin")[:, None, None] > 0
        fresh = torch.zeros((len(unique), block_size, 1, 1), dtype=torch.bool)
        fresh[inverse, offsets] = True
        placed = torch.zeros((len(unique), block_size, *key.shape[1:]))
        placed[inverse, offsets] = key.float()
        new_low = torch.where(fresh, placed, torch.inf).amin(1)
        new_high = torch.where(fresh, placed, -torch.inf).amax(1)
        old_zero = planes["k_zero"][index][unique]
        old_step = planes["k_step"][index][unique]
        old_low = old_zero.float()
        old_high = int4_decode(torch.full_like(old_low, LEVELS), old_zero, old_step)
        # each channel keeps its grid where the new tokens fall inside it (the old tokens'
        # codes stay as they are); elsewhere it grows to cover the old grid and the new tokens
        inside = had & (new_low >= old_low) & (new_high <= old_high)
        zero, step = int4_grid(torch.where(had, torch.minimum(new_low, old_low), new_low),
                               torch.where(had, torch.maximum(new_high, old_high), new_high))
        zero = torch.where(inside, old_zero, zero)
        step = torch.where(inside, old_step, step)
        old = dequantize_channels(planes["k"][index][unique], old_zero, old_step, self.dim,
                                  axis=1)
        keys = torch.where(fresh, placed, old)
        self._write_keys(planes, slice(index, index + 1), unique, keys[None], zero[None],
                         step[None])

    def _append_key(self, planes, index: int, block: int, offset: int, key: torch.Tensor
                    ) -> None:
        """`store` for one key ([heads, dim]) after `offset` tokens of its block (decoding):
        the same grids, with fewer operations."""
        old_zero, old_step = planes["k_zero"][index, block], planes["k_step"][index, block]
        old_low, key = old_zero.float(), key.float()
        old_high = int4_decode(torch.full_like(old_low, LEVELS), old_zero, old_step)
        inside = (key >= old_low) & (key <= old_high)
        zero, step = int4_grid(torch.minimum(key, old_low), torch.maximum(key, old_high))
        zero = torch.where(inside, old_zero, zero)
        step = torch.where(inside, old_step, step)
        old = _decode_packed(planes["k"][index, block, :offset], old_zero, old_step, self.dim)
        keys = torch.cat([old, key[None]])
        planes["k"][index, block, :offset + 1] = pack4(int4_encode(keys, zero, step))
        planes["k_zero"][index, block] = zero
        planes["k_step"][index, block] = step

    def _block_grid(self, keys: torch.Tensor, end: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel grids of blocks [..., blocks, block_size, heads, dim] over their slots
        before `end` ([blocks])."""
        valid = torch.arange(keys.shape[-3])[None, :] < end[:, None]
        valid = valid[..., None, None]
        low = torch.where(valid, keys, torch.inf).amin(-3)
        high = torch.where(valid, keys, -torch.inf).amax(-3)
        return int4_grid(low, high)

    def _write_keys(self, planes, layers, blocks, keys, zero, step) -> None:
        planes["k"][layers, blocks] = pack4(int4_encode(keys, zero[..., None, :, :],
                                                        step[..., None, :, :]))
        planes["k_zero"][layers, blocks] = zero
        planes["k_step"][layers, blocks] = step

    def load(self, planes, index, table, count):
        keys = dequantize_channels(planes["k"][index].index_select(0, table),
                                   planes["k_zero"][index].index_select(0, table),
                                   planes["k_step"][index].index_select(0, table), self.dim,
                                   axis=1).flatten(0, 1)[:count]
        values = dequantize_tokens(*(planes[name][index].index_select(0, table).flatten(0, 1)
                                     [:count] for name in ("v", "v_zero", "v_step")), self.dim)
        return keys, values

    def move(self, planes, targets, target_slots, sources, source_slots) -> None:
        """Values are copied with their grids; keys are decoded, placed, and every target
        block re-encoded on a grid over its slots up to the last one written."""
        moved = _decode_packed(planes["k"][:, sources, source_slots], planes["k_zero"][:, sources],
                               planes["k_step"][:, sources], self.dim)  # [layers, tokens, ...]
        for name in ("v", "v_zero", "v_step"):
            planes[name][:, targets, target_slots] = planes[name][:, sources, source_slots]
        unique, inverse = torch.unique(targets, return_inverse=True)
        keys = dequantize_channels(planes["k"][:, unique], planes["k_zero"][:, unique],
                                   planes["k_step"][:, unique], self.dim, axis=2)
        keys[:, inverse, target_slots] = moved
        end = torch.zeros(len(unique), dtype=torch.long).scatter_reduce(
            0, inverse, target_slots + 1, "amax")
        zero, step = self._block_grid(keys, end)
        self._write_keys(planes, slice(None), unique, keys, zero, step)


def storage_format(storage: torch.dtype, head_dim: int) -> Plain:
    """The format of a storage dtype: int8, int4 (`INT4`) or a float dtype."""
    if storage == torch.int8:
        return Int8(storage, head_dim)
    if storage == INT4:
        return Int4(storage, head_dim)
    return Plain(storage, head_dim)
