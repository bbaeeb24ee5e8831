"""PyAgent's attention function, registered with transformers as `pyagent_paged`.

A model whose `config._attn_implementation` is `pyagent_paged` calls `paged_attention` in every
layer. Given a `PagedForward` (passed as the `paged` keyword through the model's forward), the
function writes the layer's new keys and values into the paged cache, reads the layer's blocks
back and attends over them, with a mask built from the positions the blocks hold (causal, and the
sliding window where the layer has one). Without it, the model runs exactly as with SDPA (the
same masks are registered for it), so `model.generate` still works. engine/gemma3.py's fused
decoder calls `BatchForward.attend` directly.

A pass of at most `FEW_QUERIES` queries per sequence (decoding, and a draft's verification)
attends without a mask: each query over exactly the run of slots it sees, the sequences of a
batch in one kernel call (engine/avx512.py). A token's result then never depends on the pass it
is computed in. Where the cache stores float32 keys (`InPlace`), a layer stores the whole pass's
keys and values at once and the kernel reads every sequence's blocks through its block table:
nothing is gathered.

Layers of the global group can also collect per-token attention statistics for eviction policies
(accumulated mass, entropy-weighted mass, peak focused attention, the last query's attention, the
step a token was last attended) and keep the most recent queries for observation-window scoring.
Attention is computed in query chunks, so no L x L matrix is ever materialized.

A `BatchForward` runs several sequences in one forward pass: their new tokens lie side by side in
one row, so every projection and MLP reads its weights once for all of them, and each sequence
attends only over its own blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pyagent.engine import avx512
from pyagent.engine.kvcache import BlockPool, LayerGroup, PagedKVCache, Sequence, WritePlan

NAME = "pyagent_paged"
SCORE_ELEMENTS = 1 << 22  # largest scores tensor computed at once (floats)
FEW_QUERIES = 16  # passes of this many queries or fewer attend through `_attend_spans`


@dataclass
class Stored:
    """One layer's keys and values of one sequence ([kv_heads, l, dim]), the positions they
    hold, and the layer's group, once the pass's new ones are stored."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    group: LayerGroup


@dataclass
class PagedForward:
    """What one forward pass of one sequence needs inside every attention layer."""

    cache: PagedKVCache
    sequence: Sequence
    plan: WritePlan
    collect: bool = False  # gather statistics in the global layers
    window: int = 0  # recent queries to keep per global layer (0: none)
    probe: bool = False  # record the most attention each held global token gets ("recon")

    def store(self, module, key: torch.Tensor, value: torch.Tensor) -> Stored:
        """Store the layer's new keys and values; what its queries attend over."""
        keys, values, positions = self.cache.update(self.plan, module.layer_idx, key, value)
        group = self.cache.pools[self.cache.group_of[module.layer_idx]].group
        return Stored(keys, values, positions, group)

    def span_table(self, positions: torch.Tensor, group: LayerGroup, queries: int
                   ) -> torch.Tensor | None:
        """The slots each query sees ([queries, 2]; `positions`: the group's key positions)
        when this pass attends through spans (few queries, nothing collected or probed); else
        None."""
        if queries > FEW_QUERIES or (group.window is None
                                     and (self.probe or self.window or self.collect)):
            return None
        spans = self.plan.spans.get(group.name)
        if spans is None:  # the same for every layer of the group in this pass
            spans = self.plan.spans[group.name] = self._spans(positions, group.window)
        return spans

    def attend_masked(self, module, query: torch.Tensor, stored: Stored, scaling: float
                      ) -> torch.Tensor:
        """Attention with a mask (prompt chunks), collecting or probing what the policy needs."""
        layer, group = module.layer_idx, stored.group
        keys, values = stored.keys, stored.values
        mask = None
        if query.shape[2] > 1 or group.window is not None:
            mask = self.plan.masks.get(group.name)
            if mask is None:  # the same for every layer of the group in this pass
                mask = self.plan.masks[group.name] = self._mask(stored.positions, group.window)
        if group.window is None and self.probe:
            return self._attend_probing(query, keys, values, mask, scaling)
        if group.window is None and self.window:
            self._remember(layer, query)
            self.sequence.query_scale = scaling
        if group.window is None and self.collect:
            return self._attend_with_stats(group.layers, layer, query, keys, values, mask,
                                           scaling)
        out = F.scaled_dot_product_attention(query, keys[None], values[None], attn_mask=mask,
                                             scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)

    def _spans(self, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """For each query, the slots [start, end) of the keys it sees ([n, 2]): keys are held in
        the order of their positions, so what a query sees (causal, within the window) is one
        run of slots."""
        query_pos = self.plan.query_positions
        ends = torch.searchsorted(key_pos, query_pos, right=True)
        starts = (torch.zeros_like(ends) if window is None else
                  torch.searchsorted(key_pos, query_pos - window, right=True))
        return torch.stack([starts, ends], dim=1)

    def _mask(self, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """Which keys each query sees: causal, and within the sliding window if any."""
        query_pos = self.plan.query_positions
        mask = key_pos[None, :] <= query_pos[:, None]
        if window is not None:
            mask &= key_pos[None, :] > query_pos[:, None] - window
        return mask

    def _remember(self, layer: int, query: torch.Tensor) -> None:
        seq = self.sequence
        previous = seq.recent_queries.get(layer)
        joined = query[0] if previous is None else torch.cat([previous, query[0]], dim=1)
        seq.recent_queries[layer] = joined[:, -self.window:]
        if layer == min(seq.recent_queries):
            seq.recent_positions = torch.cat(
                [seq.recent_positions, self.plan.query_positions])[-self.window:]

    def _attend_with_stats(self, layers: tuple[int, ...], layer: int, query: torch.Tensor,
                           keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                           scaling: float) -> torch.Tensor:
        stats = self.sequence.tables["global"].stats
        count, length = query.shape[2], keys.shape[1]

        def observe(start: int, end: int, probs: torch.Tensor) -> None:
            visible = mask[start:end].sum(-1) if mask is not None else torch.full((1,), length)
            _observe(stats, probs.flatten(0, 1), visible, 1.0 / len(layers), self.sequence.step,
                     last=(end == count), first_layer=layer == layers[0])

        return _attend_in_chunks(query, keys, values, mask, scaling, observe)

    def _attend_probing(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attend, and raise each held token's "recon" statistic to the most attention any
        head's query paid it in this layer."""
        recon = self.sequence.tables["global"].stats["recon"]
        held = keys.shape[1] - query.shape[2]  # the keys before the pass's own

        def observe(_start: int, _end: int, probs: torch.Tensor) -> None:
            recon[:held] = torch.maximum(recon[:held], probs[..., :held].amax(dim=(0, 1, 2)))

        return _attend_in_chunks(query, keys, values, mask, scaling, observe)


def _attend_spans(queries: list[torch.Tensor], stored: list[Stored], spans: list[torch.Tensor],
                  scaling: float) -> list[torch.Tensor]:
    """Attention of a few queries of each sequence ([1, heads, n, dim] each) over the keys and
    values `stored` for it, each query over exactly the keys it sees (`spans`, [n, 2]): the
    sequences whose keys are not attended where the cache stores them (quantized or trimmed
    ones; see `InPlace`). In float32 on AVX-512 one kernel call computes every (query, head) on
    its own; elsewhere two small matrix products per query. Per sequence, [1, n, heads, dim]."""
    dim = queries[0].shape[3]
    if (all(q.dtype == s.keys.dtype == torch.float32 for q, s in zip(queries, stored, strict=True))
            and avx512.available(dim)):
        counts = [q.shape[2] for q in queries]
        whole = torch.tensor([0])  # each sequence's keys as one block
        out = avx512.attend_spans(
            torch.cat([q[0].transpose(0, 1) for q in queries]).contiguous(),
            [s.keys.transpose(0, 1).contiguous()[None] for s in stored],
            [s.values.transpose(0, 1).contiguous()[None] for s in stored],
            [whole] * len(stored), counts, torch.cat(spans), scaling)
        return [part[None] for part in out.split(counts)]
    return [_attend_spans_each(q, s.keys, s.values, table, scaling)
            for q, s, table in zip(queries, stored, spans, strict=True)]


def _attend_spans_each(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       spans: torch.Tensor, scaling: float) -> torch.Tensor:
    """`_attend_spans` for one sequence, two small products per query."""
    heads, dim = query.shape[1], query.shape[3]
    kv_heads = keys.shape[0]
    rows = query[0].reshape(kv_heads, heads // kv_heads, -1, dim)
    out = []
    for i, (start, end) in enumerate(spans.tolist()):
        scores = torch.bmm(rows[:, :, i], keys[:, start:end].transpose(1, 2)) * scaling
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out.append(torch.bmm(probs, values[:, start:end]).reshape(1, heads, dim))
    return torch.stack(out, dim=1)


def _attend_in_chunks(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor | None, scaling: float, observe) -> torch.Tensor:
    """Attention of `query` ([1, heads, n, dim]) over `keys` and `values` ([kv_heads, l, dim]),
    computed in chunks of queries; `observe(start, end, probs)` sees each chunk's probabilities
    ([kv_heads, group, queries, keys])."""
    heads, count, dim = query.shape[1], query.shape[2], query.shape[3]
    kv_heads, length = keys.shape[0], keys.shape[1]
    grouped = query[0].reshape(kv_heads, heads // kv_heads, count, dim)
    out = torch.empty_like(grouped)
    rows = max(1, SCORE_ELEMENTS // (heads * length))
    for start in range(0, count, rows):
        end = min(count, start + rows)
        scores = torch.einsum("kgnd,kld->kgnl", grouped[:, :, start:end], keys) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask[start:end], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        out[:, :, start:end] = torch.einsum("kgnl,kld->kgnd", probs.to(values.dtype), values)
        observe(start, end, probs)
    return out.reshape(1, heads, count, dim).transpose(1, 2)


@dataclass
class InPlace:
    """A layer group's attention in a pass where every sequence reads its keys and values
    where the cache stores them (float32 blocks, few queries each, nothing trimmed, collected
    or probed): per layer, one store of the whole pass's keys and values and one kernel call
    that reads every sequence's blocks through its table, with no gathered copy."""

    pool: BlockPool
    blocks: torch.Tensor  # where the pass's tokens go (block, slot), all sequences in order
    offsets: torch.Tensor
    tables: list[torch.Tensor]  # per sequence, the blocks its slots are in
    counts: list[int]  # per sequence, its queries
    spans: torch.Tensor  # [queries, 2]: the slots each query sees

    @classmethod
    def of(cls, batch: BatchForward, name: str, query: torch.Tensor) -> InPlace | None:
        """The group `name`'s in-place attention for `batch`, or None where a sequence cannot
        have it."""
        parts = batch.parts
        if (any(part is None for part in parts) or query.dtype != torch.float32
                or not avx512.available(query.shape[-1])):
            return None
        cache = parts[0].cache
        pool = cache.pools[name]
        if pool.quantized or pool.k.dtype != torch.float32:
            return None
        spans = []
        for part, size in zip(parts, batch.sizes, strict=True):
            if name in part.plan.history:
                return None
            table = part.span_table(cache.key_positions(part.plan, name), pool.group, size)
            if table is None:
                return None
            spans.append(table)
        slots = [part.plan.slots[name] for part in parts]
        return cls(pool, torch.cat([blocks for blocks, _ in slots]),
                   torch.cat([offsets for _, offsets in slots]),
                   [part.plan.tables[name] for part in parts], list(batch.sizes),
                   torch.cat(spans))

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        index = self.pool.layer_index[layer]
        self.pool.store(index, self.blocks, self.offsets, key[0].transpose(0, 1),
                        value[0].transpose(0, 1))
        keys, values = [self.pool.k[index]] * len(self.counts), [self.pool.v[index]] * len(
            self.counts)
        out = avx512.attend_spans(query[0].transpose(0, 1).contiguous(), keys, values,
                                  self.tables, self.counts, self.spans, scaling)
        return out[None]


@dataclass
class BatchForward:
    """Several sequences' new tokens in one forward pass: `parts[i]` owns the next `sizes[i]`;
    a part that is None pads the pass (its rows touch no cache and attend to nothing)."""

    parts: list[PagedForward | None]
    sizes: list[int]
    in_place: dict[str, InPlace | None] = field(default_factory=dict)  # per group, once a pass

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        cache = next(part.cache for part in self.parts if part is not None)
        name = cache.group_of[module.layer_idx]
        if name not in self.in_place:
            self.in_place[name] = InPlace.of(self, name, query)
        in_place = self.in_place[name]
        if in_place is not None:
            return in_place.attend(module.layer_idx, query, key, value, scaling)
        queries, keys, values = (t.split(self.sizes, dim=2) for t in (query, key, value))
        outs: list[torch.Tensor | None] = [None] * len(self.parts)
        spanned: list[tuple[int, Stored, torch.Tensor]] = []  # attended together below
        for i, (part, q, k, v) in enumerate(zip(self.parts, queries, keys, values,
                                                strict=True)):
            if part is None:  # padding
                outs[i] = q.new_zeros(q.shape).transpose(1, 2)
                continue
            stored = part.store(module, k, v)
            spans = part.span_table(stored.positions, stored.group, q.shape[2])
            if spans is None:
                outs[i] = part.attend_masked(module, q, stored, scaling)
            else:
                spanned.append((i, stored, spans))
        if spanned:
            together = _attend_spans([queries[i] for i, _, _ in spanned],
                                     [stored for _, stored, _ in spanned],
                                     [spans for _, _, spans in spanned], scaling)
            for (i, _, _), out in zip(spanned, together, strict=True):
                outs[i] = out
        return torch.cat(outs, dim=1)


def _observe(stats: dict[str, torch.Tensor], probs: torch.Tensor, visible: torch.Tensor,
             share: float, step: int, last: bool, first_layer: bool) -> None:
    """Fold one chunk of attention ([heads, queries, keys]) into per-token statistics."""
    length = probs.shape[-1]
    log_visible = torch.log(visible.clamp(min=2).float())  # [queries]
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(-1) / log_visible  # [heads, q]
    focus = (1.0 - entropy).clamp(0.0, 1.0)
    focused = (focus[..., None] * probs).mean(0)  # [queries, keys]
    mean = probs.mean(0)
    stats["mass"][:length] += mean.sum(0) * share
    stats["focus"][:length] += focused.sum(0) * share
    stats["peak"][:length] = torch.maximum(stats["peak"][:length], focused.max(0).values)
    above = (mean > 1.0 / visible[:, None].float()).any(0)
    stats["attended_at"][:length][above] = float(step)
    if last:
        if first_layer:
            stats["last"].zero_()
        stats["last"][:length] += mean[-1] * share


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    paged: BatchForward | None = None, **kwargs):
    """The attention function transformers calls for `pyagent_paged` models."""
    if paged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return paged.attend(module, query, key, value, scale), None


AttentionInterface.register(NAME, paged_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # outside a paged forward: exactly SDPA
