"""A paged KV cache: fixed-size blocks in a pool with reference counts, per-sequence block tables,
prefix sharing by chained block hashes, copy-on-write, and exact memory accounting.

Layers are grouped by attention type. A sliding-window group (Gemma 3's local layers) keeps only
the blocks its window can still see; a global group grows with the sequence and is the one that
eviction shrinks. Each group has its own `BlockPool`, so a block id names the same 16 tokens in
every layer of its group. Under eviction, a sliding-window group is trimmed inside each forward
pass (`Sequence.trim_window`): a prompt chunk attends over its own keys as computed and stores
only the tokens a later query can see, so no moment holds a window plus a chunk.

Invariants, for every sequence and group: a table's blocks are all full except the last; a block
is written only while its reference count is 1 (a shared block is copied first); a block holding
a registered prefix is never modified, and stays in the pool after its last reader lets it go,
until the pool needs the room. A pool's capacity (`max_blocks`) bounds the blocks sequences hold
and the prefix cache together: cached prefixes fill only room no sequence needs, and are the first
to go, least recently used first. Blocks that eviction drops are freed, never cached. A cached
prefix of the global layers keeps the attention statistics its tokens had gathered, so a sequence
that reuses it can still rank those tokens for eviction.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import torch

from pyagent.engine.kvquant import storage_format
from pyagent.engine.landmarks import TokenTraits
from pyagent.errors import ConfigError, RequestError

DEFAULT_BLOCK_SIZE = 16
# Per-token statistics of the global layers: accumulated attention mass, entropy-weighted mass,
# the peak focused attention received, the latest query's attention, the most attention a query
# reconstructing the context paid it (`Engine.reconstruct`), the step the token was last attended
# above uniform, and the step it was written.
STATS = ("mass", "focus", "peak", "last", "recon", "attended_at", "written_at")
STEP_STATS = ("attended_at", "written_at")  # -1 until set


@dataclass(frozen=True)
class LayerGroup:
    """Layers that share a block table: all global layers, or all layers of one sliding window."""

    name: str
    layers: tuple[int, ...]
    window: int | None  # tokens a query can see (itself included); None: the whole sequence


def layer_groups(config) -> list[LayerGroup]:
    """Group a transformers config's layers by attention type (Gemma 3: sliding and global)."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    full = tuple(i for i, t in enumerate(types) if t != "sliding_attention")
    groups = []
    if full:
        groups.append(LayerGroup("global", full, None))
    if sliding:
        groups.append(LayerGroup("sliding", sliding, int(window)))
    return groups


class BlockPool:
    """Physical KV storage of one layer group, in `planes`: tensors [layers, blocks, ...] whose
    layout and encoding its storage format owns (engine/kvquant.py): keys and values as they are
    in a float dtype, int8 per token, or int4 with values per token and keys per channel of each
    block. `load` gives keys and values back in the compute dtype.

    Storage grows by doubling up to `max_blocks`; past that, blocks that only the prefix cache
    holds are reclaimed, least recently used first.
    """

    def __init__(self, group: LayerGroup, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, max_blocks: int | None = None, initial_blocks: int = 64,
                 storage: torch.dtype | None = None):
        self.group = group
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.compute_dtype = dtype
        self.layer_index = {layer: i for i, layer in enumerate(group.layers)}
        self.format = storage_format(storage or dtype, head_dim)
        self.planes = self.format.planes(len(group.layers), block_size, kv_heads)
        self.positions = torch.zeros((0, block_size), dtype=torch.long)
        self.refcount: list[int] = []
        self.free: list[int] = []
        self.cached: OrderedDict[int, None] = OrderedDict()  # refcount 0, holding a prefix
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.saved_stats: dict[int, dict[str, torch.Tensor]] = {}  # cached block -> its stats
        self.used = 0
        self.peak_used = 0
        self._grow(initial_blocks if max_blocks is None else min(initial_blocks, max_blocks))

    @property
    def capacity(self) -> int:
        return len(self.refcount)

    @property
    def k(self) -> torch.Tensor:
        """Stored keys, [layers, blocks, block_size, heads, ...] (int4: two codes per byte)."""
        return self.planes["k"]

    @property
    def v(self) -> torch.Tensor:
        """Stored values, [layers, blocks, block_size, heads, ...] (int4: two codes per byte)."""
        return self.planes["v"]

    @property
    def quantized(self) -> bool:
        return self.format.quantized

    @cached_property
    def bytes_per_block_per_layer(self) -> int:
        """Every plane's bytes for one block of one layer, whatever its shape after the
        blocks axis (int4 keys' grids are per block, without a token axis)."""
        return sum(math.prod(p.shape[2:]) * p.element_size() for p in self.planes.values())

    @cached_property
    def bytes_per_block(self) -> int:
        return self.bytes_per_block_per_layer * len(self.group.layers)

    def _grow(self, blocks: int) -> None:
        old = self.capacity
        for name, plane in self.planes.items():
            extra = torch.zeros((plane.shape[0], blocks, *plane.shape[2:]), dtype=plane.dtype)
            self.planes[name] = torch.cat([plane, extra], dim=1)
        self.positions = torch.cat(
            [self.positions, torch.zeros((blocks, self.block_size), dtype=torch.long)])
        self.refcount.extend([0] * blocks)
        self.free.extend(range(old + blocks - 1, old - 1, -1))

    def move(self, targets: torch.Tensor, target_slots: torch.Tensor, sources: torch.Tensor,
             source_slots: torch.Tensor) -> None:
        """Copy the tokens in (sources, source_slots) of every layer to (targets, target_slots);
        the sources are read in full before anything is written. A target block then holds
        its tokens up to the last slot written (int4 re-encodes its keys on a grid over them)."""
        self.format.move(self.planes, targets, target_slots, sources, source_slots)
        self.positions[targets, target_slots] = self.positions[sources, source_slots]

    def store(self, index: int, blocks: torch.Tensor, offsets: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor) -> None:
        """Write layer `index`'s keys and values ([tokens, heads, dim]) to their slots. The
        writes of a block are contiguous from its slot 0 (int4 keys rely on it: the slots before
        the first one written hold the block's tokens so far)."""
        self.format.store(self.planes, index, blocks, offsets, key, value)

    def load(self, index: int, table: torch.Tensor, count: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values ([tokens, heads, dim], compute dtype) of the first
        `count` slots of the blocks in `table`."""
        keys, values = self.format.load(self.planes, index, table, count)
        return keys.to(self.compute_dtype), values.to(self.compute_dtype)

    def allocate(self) -> int:
        """A block with reference count 1, for writing: a free one, else new storage while the
        capacity allows, else the least recently used cached prefix block."""
        if not self.free:
            room = self.capacity if self.max_blocks is None else self.max_blocks - self.capacity
            if room > 0:
                self._grow(max(1, min(self.capacity, room)))
            elif self.cached:
                block, _ = self.cached.popitem(last=False)
                self.forget(block)
                self.free.append(block)
            else:
                raise RequestError(
                    f"the KV cache of the {self.group.name} layers is full "
                    f"({self.capacity} blocks of {self.block_size} tokens in use)",
                    code="kv_cache_full")
        block = self.free.pop()
        self.refcount[block] = 1
        self._count(+1)
        return block

    def retain(self, block: int) -> None:
        if self.refcount[block] == 0:
            self.cached.pop(block, None)
            self._count(+1)
        self.refcount[block] += 1

    def release(self, block: int, cache: bool = True) -> None:
        """Drop one reference; a block nobody holds stays cached if it holds a registered
        prefix and `cache` is set, else it is freed."""
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._count(-1)
            if cache and block in self.hash_of:
                self.cached[block] = None
            else:
                self.forget(block)
                self.free.append(block)

    def forget(self, block: int) -> None:
        """Make `block` unfindable as a prefix (before it is rewritten or freed)."""
        digest = self.hash_of.pop(block, None)
        if digest is not None:
            del self.by_hash[digest]
        self.saved_stats.pop(block, None)

    def _count(self, delta: int) -> None:
        self.used += delta
        self.peak_used = max(self.peak_used, self.used)

    def register(self, block: int, digest: bytes) -> None:
        """Make a full, pristine block findable by the chained hash of its tokens."""
        if digest not in self.by_hash and block not in self.hash_of:
            self.by_hash[digest] = block
            self.hash_of[block] = digest

    def forget_cached(self) -> None:
        """Free every block only the prefix cache holds."""
        for block in self.cached:
            self.forget(block)
            self.free.append(block)
        self.cached.clear()

    def lookup(self, digest: bytes) -> int | None:
        return self.by_hash.get(digest)

    def copy(self, block: int) -> int:
        """A private copy of `block` (copy-on-write)."""
        new = self.allocate()
        for plane in self.planes.values():
            plane[:, new] = plane[:, block]
        self.positions[new] = self.positions[block]
        return new


def chain_hashes(tokens: list[int], block_size: int, count: int) -> list[bytes]:
    """Hashes of the first `count` full blocks, each covering every token before it."""
    digests, previous = [], b""
    for i in range(count):
        previous = _block_hash(previous, tokens[i * block_size:(i + 1) * block_size])
        digests.append(previous)
    return digests


def _block_hash(previous: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(previous + repr(tokens).encode(), digest_size=16).digest()


@dataclass
class Table:
    """One sequence's blocks in one group. `pristine[i]` is the logical block index that table
    entry i holds exactly (in order, never compacted), or None."""

    blocks: list[int] = field(default_factory=list)
    pristine: list[int | None] = field(default_factory=list)
    fill: int = 0  # tokens in the last block
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per slot, global groups only

    def tokens(self, block_size: int) -> int:
        return 0 if not self.blocks else (len(self.blocks) - 1) * block_size + self.fill


@dataclass
class Sequence:
    """A request's view of the cache: its tokens, and a block table per layer group."""

    tokens: list[int]
    tables: dict[str, Table]
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    prompt_length: int = 0  # set once the prompt is in: decoding starts after it
    step: int = 0  # forward passes so far (the one running included): steps count from 1
    evicted: bool = False
    # The next pass trims the sliding-window groups: it stores only the tokens a later query can
    # see, rewriting the blocks that die in it and that this sequence computed alone, so a
    # prompt chunk never holds a window plus a chunk. The engine sets it while the sequence is,
    # or is about to be, evicted: then no later prompt can match those blocks anyway.
    trim_window: bool = False
    hashes: list[bytes] = field(default_factory=list)  # chained hash of each full token block
    peak_bytes: int = 0  # most KV bytes this sequence's blocks held at once
    # the last queries of each global layer ([heads, window, dim]), for observation windows
    recent_queries: dict[int, torch.Tensor] = field(default_factory=dict)
    recent_positions: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long))
    query_scale: float = 1.0  # the attention scaling those queries were used with
    scored: int = 0  # tokens before this position have their reconstruction score ("recon")

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class WritePlan:
    """Where one forward pass writes its new tokens, and what each layer then reads.

    A group in `history` is trimmed inside the pass: its layers read the tokens held before the
    pass (block ids, count, positions) plus the pass's own keys straight from the projection, and
    store only the new tokens from `stored_from` on (those a later query can still see)."""

    slots: dict[str, tuple[torch.Tensor, torch.Tensor]]  # group -> (block ids, slot offsets)
    tables: dict[str, torch.Tensor]  # group -> block ids to read
    valid: dict[str, int]  # group -> tokens to read
    query_positions: torch.Tensor
    history: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=dict)
    stored_from: dict[str, int] = field(default_factory=dict)
    # per group, computed by its first layer in the pass: key positions, attention mask or spans
    key_positions: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    spans: dict[str, torch.Tensor] = field(default_factory=dict)  # keys each query sees


@dataclass(frozen=True)
class KVMemory:
    """Bytes of KV held by blocks in use (all layers), per layer, and the peak since creation;
    bytes of cached prefixes no sequence holds; the capacity that bounds both together (the
    storage allocated so far when the pools have no limit), and the storage allocated so far."""

    bytes: int
    peak_bytes: int
    per_layer: dict[int, int]
    peak_per_layer: dict[int, int]
    cached_prefix_bytes: int
    capacity_bytes: int
    allocated_bytes: int


@dataclass(frozen=True)
class BlockInfo:
    """One block of a sequence's global layers, as eviction policies see it."""

    block: int
    references: int
    first_position: int
    last_position: int
    written_at: int  # step (forward pass, from 1) that wrote its first token
    last_attended: int  # last step any token drew more than a uniform share (-1: never)
    mass: float  # accumulated attention, averaged over layers and heads
    entropy: float  # 1 - mean focus of the attention it received (0 = only focused queries)
    peak: float  # most focused attention one query paid any of its tokens
    landmark: bool


class PagedKVCache:
    """Block pools for one model, the sequences reading them, and the prefix cache. Keys and
    values are kept in `storage` (default: the compute `dtype`; int8 quantizes each token's key
    and value per head) and attended in `dtype`."""

    def __init__(self, config, dtype: torch.dtype = torch.float32,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_tokens: int | None = None,
                 storage: torch.dtype | None = None):
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.groups = layer_groups(config)
        for group in self.groups:
            if group.window is not None and group.window % block_size:
                raise ConfigError(f"block_size {block_size} does not divide the sliding window "
                                  f"of {group.window} tokens")
        kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // \
            config.num_attention_heads
        max_blocks = None if max_tokens is None else -(-max_tokens // block_size)
        self.pools = {g.name: BlockPool(g, block_size, kv_heads, head_dim, dtype, max_blocks,
                                        storage=storage)
                      for g in self.groups}
        self.group_of = {layer: g.name for g in self.groups for layer in g.layers}
        self.traits: TokenTraits | None = None  # the vocabulary's traits, for landmark policies

    # --- sequences ---------------------------------------------------------------------------

    def new_sequence(self, prompt: list[int], share_prefix: bool = True) -> Sequence:
        """A sequence for `prompt`, reusing the longest cached prefix (at least one token is left
        to compute). Only the returned sequence's `tokens[cached_tokens:]` need a forward pass."""
        sequence = Sequence(tokens=[], tables={g.name: Table() for g in self.groups})
        blocks = self._match(prompt) if share_prefix else 0
        if blocks:
            bs = self.block_size
            for group in self.groups:
                pool, table = self.pools[group.name], sequence.tables[group.name]
                first = self._first_live_block(group, blocks * bs)
                digests = chain_hashes(prompt, bs, blocks)
                for index in range(first, blocks):
                    block = pool.lookup(digests[index])
                    assert block is not None
                    pool.retain(block)
                    table.blocks.append(block)
                    table.pristine.append(index)
                table.fill = bs
                self._grow_stats(group, table)
                self._restore_stats(pool, table)
            sequence.tokens = list(prompt[:blocks * bs])
            sequence.hashes = chain_hashes(prompt, bs, blocks)
            sequence.cached_tokens = blocks * bs
        return sequence

    def live_prefix_tokens(self, prompt: list[int]) -> int:
        """Tokens of `prompt`'s reusable prefix whose global blocks a sequence holds now (a new
        sequence for `prompt` would share them instead of taking new blocks)."""
        pool = self.pools.get("global")
        count = self._match(prompt) if pool is not None else 0
        digests = chain_hashes(prompt, self.block_size, count)
        return sum(self.block_size for digest in digests
                   if pool.refcount[pool.lookup(digest)] > 0)

    def _first_live_block(self, group: LayerGroup, length: int) -> int:
        """The first logical block a query at position `length` or later can still see."""
        if group.window is None:
            return 0
        return max(0, (length - group.window + 1) // self.block_size)

    def _match(self, prompt: list[int]) -> int:
        """How many leading full blocks of `prompt` every group can serve from the cache."""
        bs = self.block_size
        digests = chain_hashes(prompt, bs, (len(prompt) - 1) // bs)
        best = 0
        for count in range(len(digests), 0, -1):
            if all(self.pools[g.name].lookup(digests[i]) is not None
                   for g in self.groups
                   for i in range(self._first_live_block(g, count * bs), count)):
                best = count
                break
        return best

    def fork(self, sequence: Sequence) -> Sequence:
        """A second sequence sharing every block of `sequence` (copy-on-write on the next write)."""
        tables = {}
        for name, table in sequence.tables.items():
            for block in table.blocks:
                self.pools[name].retain(block)
            tables[name] = Table(list(table.blocks), list(table.pristine), table.fill,
                                 {k: v.clone() for k, v in table.stats.items()})
        return Sequence(list(sequence.tokens), tables, sequence.cached_tokens,
                        sequence.prompt_length, sequence.step,
                        sequence.evicted, sequence.trim_window, list(sequence.hashes),
                        sequence.peak_bytes,
                        dict(sequence.recent_queries), sequence.recent_positions,
                        sequence.query_scale, sequence.scored)

    def _restore_stats(self, pool: BlockPool, table: Table) -> None:
        """Give reused prefix blocks the statistics they had gathered (steps count from 0)."""
        if not table.stats:
            return
        bs = self.block_size
        for i, block in enumerate(table.blocks):
            saved = pool.saved_stats.get(block)
            if saved is None:
                continue
            for name, values in saved.items():
                if name in STEP_STATS:
                    values = torch.where(values >= 0, 0.0, -1.0)
                table.stats[name][i * bs:(i + 1) * bs] = values

    def _save_stats(self, pool: BlockPool, table: Table) -> None:
        """Keep the statistics of a table's registered blocks with the blocks, for reuse."""
        bs = self.block_size
        for i, block in enumerate(table.blocks):
            if block in pool.hash_of and table.pristine[i] is not None:
                pool.saved_stats[block] = {
                    name: values[i * bs:(i + 1) * bs].clone()
                    for name, values in table.stats.items() if name != "last"}

    def release(self, sequence: Sequence) -> None:
        """Let go of every block of `sequence`; prefix blocks stay cached for later requests."""
        for name, table in sequence.tables.items():
            if table.stats:
                self._save_stats(self.pools[name], table)
            for block in table.blocks:
                self.pools[name].release(block)
            table.blocks.clear()
            table.pristine.clear()
            table.fill = 0

    def clear_prefix_cache(self) -> None:
        """Forget the prefixes no sequence holds (for measurements that must start cold)."""
        for pool in self.pools.values():
            pool.forget_cached()

    # --- a forward pass ----------------------------------------------------------------------

    def plan(self, sequence: Sequence, new_tokens: list[int]) -> WritePlan:
        """Reserve slots for `new_tokens` in every group; return where to write and what to read."""
        start = sequence.length
        positions = torch.arange(start, start + len(new_tokens))
        sequence.tokens.extend(new_tokens)
        sequence.step += 1
        bs = self.block_size
        while len(sequence.hashes) < sequence.length // bs:
            index = len(sequence.hashes)
            chunk = sequence.tokens[index * bs:(index + 1) * bs]
            sequence.hashes.append(_block_hash(sequence.hashes[-1] if index else b"", chunk))
        plan = WritePlan({}, {}, {}, positions)
        for group in self.groups:
            if group.window is not None and sequence.trim_window:
                self._plan_trimmed(sequence, group, plan)
                continue
            pool, table = self.pools[group.name], sequence.tables[group.name]
            block_ids, offsets = [], []
            for position in range(start, start + len(new_tokens)):
                new = None
                if not table.blocks or table.fill == self.block_size:
                    aligned = not sequence.evicted or group.window is not None
                    new = (pool.allocate(), position // self.block_size if aligned and
                           position % self.block_size == 0 else None)
                block, offset = self._append(sequence, pool, table, new)
                block_ids.append(block)
                offsets.append(offset)
            ids, offs = torch.tensor(block_ids), torch.tensor(offsets)
            pool.positions[ids, offs] = positions
            plan.slots[group.name] = (ids, offs)
            plan.tables[group.name] = torch.tensor(table.blocks)
            count = plan.valid[group.name] = table.tokens(self.block_size)
            self._grow_stats(group, table)
            if table.stats:
                table.stats["written_at"][count - len(new_tokens):count] = float(sequence.step)
        held = sum(len(sequence.tables[name].blocks) * pool.bytes_per_block
                   for name, pool in self.pools.items())
        sequence.peak_bytes = max(sequence.peak_bytes, held)
        return plan

    def _append(self, sequence: Sequence, pool: BlockPool, table: Table,
                new: tuple[int, int | None] | None) -> tuple[int, int]:
        """Take the next slot of `table`: the first of `new` (a block for writing, and the
        logical block it holds exactly or None) when given, else the last block's next one (a
        shared last block is copied first). A block that fills up pristine is registered as a
        prefix; after eviction none is: even a sliding-window block then depends on what was
        evicted, and must not pass for the same tokens computed over the whole context."""
        if new is not None:
            table.blocks.append(new[0])
            table.pristine.append(new[1])
            table.fill = 0
        elif pool.refcount[table.blocks[-1]] > 1:
            shared = table.blocks[-1]
            table.blocks[-1] = pool.copy(shared)
            pool.release(shared)
        slot = (table.blocks[-1], table.fill)
        table.fill += 1
        if table.fill == self.block_size and table.pristine[-1] is not None \
                and not sequence.evicted:
            pool.register(table.blocks[-1], sequence.hashes[table.pristine[-1]])
        return slot

    def probe_plan(self, sequence: Sequence, count: int) -> WritePlan:
        """A plan for `count` tokens placed after `sequence` that stores nothing: every layer
        attends over what the sequence holds plus the pass's own keys."""
        start = sequence.length
        plan = WritePlan({}, {}, {}, torch.arange(start, start + count))
        empty = torch.zeros(0, dtype=torch.long)
        for group in self.groups:
            pool, table = self.pools[group.name], sequence.tables[group.name]
            held = torch.tensor(table.blocks, dtype=torch.long)
            held_count = table.tokens(self.block_size)
            plan.history[group.name] = (
                held, held_count, pool.positions.index_select(0, held).flatten()[:held_count])
            plan.slots[group.name] = (empty, empty)
            plan.stored_from[group.name] = count
        return plan

    def _plan_trimmed(self, sequence: Sequence, group: LayerGroup, plan: WritePlan) -> None:
        """Plan a sliding-window group's pass so that it stores only the new tokens a later
        query can see. Its layers read the tokens held before the pass (recorded in
        `plan.history`) and the pass's own keys; blocks that die in this pass and that this
        sequence computed alone take the stored tokens (each layer reads its slice before
        writing it), and the other dying blocks are let go by `finish` as usual."""
        pool, table, bs = self.pools[group.name], sequence.tables[group.name], self.block_size
        start, end = int(plan.query_positions[0]), sequence.length
        held = torch.tensor(table.blocks, dtype=torch.long)
        count = table.tokens(bs)
        plan.history[group.name] = (
            held, count, pool.positions.index_select(0, held).flatten()[:count].clone())
        live = self._first_live_block(group, end)
        reused = sequence.cached_tokens // bs  # logical blocks served from the prefix cache
        spare, dying, kept = [], [], []
        for block, index in zip(table.blocks, table.pristine, strict=True):
            if index >= live:
                kept.append((block, index))
            elif pool.refcount[block] == 1 and (index >= reused or block not in pool.hash_of):
                spare.append((block, index))
            else:
                dying.append((block, index))
        table.blocks = [block for block, _ in kept]
        table.pristine = [index for _, index in kept]
        first = max(start, live * bs)
        block_ids, offsets = [], []
        for position in range(first, end):
            new = None
            if position % bs == 0:
                if spare:
                    new = (spare.pop(0)[0], position // bs)
                    pool.forget(new[0])  # rewritten in this pass
                else:
                    new = (pool.allocate(), position // bs)
            block, offset = self._append(sequence, pool, table, new)
            block_ids.append(block)
            offsets.append(offset)
        # dying blocks not rewritten are still read in this pass: `finish` lets them go
        leftover = sorted(dying + spare, key=lambda item: item[1])
        table.blocks = [block for block, _ in leftover] + table.blocks
        table.pristine = [index for _, index in leftover] + table.pristine
        ids, offs = torch.tensor(block_ids), torch.tensor(offsets)
        pool.positions[ids, offs] = plan.query_positions[first - start:]
        plan.slots[group.name] = (ids, offs)
        plan.stored_from[group.name] = first - start

    def truncate(self, sequence: Sequence, count: int) -> None:
        """Drop the last `count` tokens of `sequence`, written by its last pass (a rejected
        draft): their slots are freed or will be rewritten, a block they filled is no longer a
        prefix, and their statistics and recent queries are forgotten. Call it before `finish`."""
        if count <= 0:
            return
        bs = self.block_size
        length = sequence.length - count
        del sequence.tokens[length:]
        del sequence.hashes[length // bs:]
        for name, table in sequence.tables.items():
            pool, left = self.pools[name], count
            held = table.tokens(bs)
            while left:
                if table.fill > left:
                    table.fill -= left
                    pool.forget(table.blocks[-1])  # its slots from `fill` on will be rewritten
                    left = 0
                else:
                    left -= table.fill
                    table.pristine.pop()
                    pool.release(table.blocks.pop(), cache=False)
                    table.fill = bs if table.blocks else 0
            for stat, values in table.stats.items():
                values[held - count:held] = -1.0 if stat in STEP_STATS else 0.0
        for layer, queries in sequence.recent_queries.items():
            sequence.recent_queries[layer] = queries[:, :max(0, queries.shape[1] - count)]
        sequence.recent_positions = sequence.recent_positions[
            :max(0, sequence.recent_positions.numel() - count)]
        sequence.scored = min(sequence.scored, length)

    def finish(self, sequence: Sequence) -> None:
        """After a forward pass: drop sliding-window blocks no future query can see."""
        for group in self.groups:
            if group.window is None:
                continue
            pool, table = self.pools[group.name], sequence.tables[group.name]
            dead = self._first_live_block(group, sequence.length)
            reachable = None
            while len(table.blocks) > 1 and table.pristine[0] is not None \
                    and table.pristine[0] < dead:
                if reachable is None:
                    reachable = self._reachable(sequence)
                pool.release(table.blocks.pop(0), cache=table.pristine.pop(0) < reachable)

    def _reachable(self, sequence: Sequence) -> int:
        """How many leading logical blocks of `sequence` a later prompt could still match:
        all of them, unless eviction dropped global blocks that no cache entry holds."""
        if not sequence.evicted or "global" not in self.pools:
            return len(sequence.hashes) + 1
        pool = self.pools["global"]
        return next((i for i, digest in enumerate(sequence.hashes)
                     if pool.lookup(digest) is None), len(sequence.hashes))

    def _forget_unreachable(self, sequence: Sequence) -> None:
        """After eviction: free the cached sliding-window blocks of `sequence` that no prompt
        can match any more (the global blocks before them are gone)."""
        reachable = self._reachable(sequence)
        for group in self.groups:
            if group.window is None:
                continue
            pool = self.pools[group.name]
            for digest in sequence.hashes[reachable:]:
                block = pool.lookup(digest)
                if block is not None and block in pool.cached:
                    del pool.cached[block]
                    pool.forget(block)
                    pool.free.append(block)

    def update(self, plan: WritePlan, layer: int, key: torch.Tensor, value: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values ([1, heads, new, dim]) in their planned slots;
        return what the layer's queries attend over ([heads, tokens, dim]) and the positions
        those tokens hold. A group trimmed in this pass reads its history before storing (the
        pass may rewrite those slots) and attends over the new keys as computed."""
        name = self.group_of[layer]
        pool = self.pools[name]
        index = pool.layer_index[layer]
        blocks, offsets = plan.slots[name]
        history = plan.history.get(name)
        if history is not None:
            held, count, positions = history
            old_keys, old_values = pool.load(index, held, count)
        first = plan.stored_from.get(name, 0)
        if blocks.numel():
            pool.store(index, blocks, offsets, key[0, :, first:].transpose(0, 1),
                       value[0, :, first:].transpose(0, 1))
        if history is not None:
            dtype = old_keys.dtype
            return (torch.cat([old_keys.transpose(0, 1), key[0].to(dtype)], dim=1),
                    torch.cat([old_values.transpose(0, 1), value[0].to(dtype)], dim=1),
                    torch.cat([positions, plan.query_positions]))
        keys, values = pool.load(index, plan.tables[name], plan.valid[name])
        return keys.transpose(0, 1), values.transpose(0, 1), self.key_positions(plan, name)

    def key_positions(self, plan: WritePlan, name: str) -> torch.Tensor:
        """The positions group `name`'s layers read in `plan`, in slot order (once a pass)."""
        positions = plan.key_positions.get(name)
        if positions is None:
            positions = plan.key_positions[name] = self.pools[name].positions.index_select(
                0, plan.tables[name]).flatten()[:plan.valid[name]]
        return positions

    # --- eviction support --------------------------------------------------------------------

    def _grow_stats(self, group: LayerGroup, table: Table) -> None:
        if group.window is not None:
            return
        slots = len(table.blocks) * self.block_size
        for name in STATS:
            current = table.stats.get(name)
            have = 0 if current is None else current.numel()
            if have < slots:
                fill = -1.0 if name in STEP_STATS else 0.0
                extra = torch.full((slots - have,), fill)
                table.stats[name] = extra if current is None else torch.cat([current, extra])

    def keep_only(self, sequence: Sequence, group_name: str, keep: torch.Tensor) -> None:
        """Keep the slots where `keep` (bool, one per held token) is True. Fully kept blocks stay
        as they are (shared ones stay shared); the survivors of partly kept blocks are packed, in
        order, into those of the partly kept blocks this sequence alone holds (then into fresh
        blocks), after the dropped blocks are freed, so eviction never needs more blocks than
        the sequence held before it."""
        pool, table = self.pools[group_name], sequence.tables[group_name]
        bs = self.block_size
        count = table.tokens(bs)
        if keep.numel() != count:
            raise ValueError(f"keep mask has {keep.numel()} entries for {count} tokens")
        padded = torch.zeros(len(table.blocks) * bs, dtype=torch.bool)
        padded[:count] = keep
        per_block = padded.view(-1, bs)
        kept_blocks, kept_pristine, kept_slots, packed = [], [], [], []
        for i, block in enumerate(table.blocks):
            full_block = i < len(table.blocks) - 1 or table.fill == bs
            kept = int(per_block[i].sum())
            if full_block and kept == bs:
                kept_blocks.append(block)
                kept_pristine.append(table.pristine[i])
                kept_slots.append(torch.arange(i * bs, (i + 1) * bs))
            elif kept:
                slots = torch.nonzero(per_block[i]).flatten()
                packed.append((block, slots, i * bs + slots))
            else:
                pool.release(block, cache=False)
        stat_index = [*kept_slots]
        new_blocks, fill = [], bs
        if packed:
            sources = torch.cat([torch.full_like(slots, block) for block, slots, _ in packed])
            source_slots = torch.cat([slots for _, slots, _ in packed])
            stat_index.append(torch.cat([flat for _, _, flat in packed]))
            moved = source_slots.numel()
            needed = -(-moved // bs)
            own = [block for block, _, _ in packed if pool.refcount[block] == 1][:needed]
            for block, _, _ in packed:
                if block not in own:
                    pool.release(block, cache=False)
            for block in own:
                pool.forget(block)  # rewritten below: no longer the prefix it was
            new_blocks = own + [pool.allocate() for _ in range(needed - len(own))]
            targets = torch.tensor(new_blocks).repeat_interleave(bs)[:moved]
            pool.move(targets, torch.arange(moved) % bs, sources, source_slots)
            fill = moved - (needed - 1) * bs
        index = torch.cat(stat_index) if stat_index else torch.zeros(0, dtype=torch.long)
        kept_count = index.numel()
        table.blocks = kept_blocks + new_blocks
        table.pristine = kept_pristine + [None] * len(new_blocks)
        table.fill = fill
        slots_now = len(table.blocks) * bs
        for name, values in table.stats.items():
            fresh = torch.full((slots_now,), -1.0 if name in STEP_STATS else 0.0)
            fresh[:kept_count] = values[index]
            table.stats[name] = fresh
        sequence.evicted = True
        self._forget_unreachable(sequence)

    # --- accounting ----------------------------------------------------------------------------

    def memory(self, sequence: Sequence | None = None) -> KVMemory:
        """KV bytes in use: by one sequence's blocks, or by all sequences when None."""
        per_layer: dict[int, int] = {}
        peak_per_layer: dict[int, int] = {}
        total = peak = cached = capacity = allocated = 0
        for group in self.groups:
            pool = self.pools[group.name]
            blocks = pool.used if sequence is None else len(sequence.tables[group.name].blocks)
            for layer in group.layers:
                per_layer[layer] = blocks * pool.bytes_per_block_per_layer
                peak_per_layer[layer] = pool.peak_used * pool.bytes_per_block_per_layer
            total += blocks * pool.bytes_per_block
            peak += pool.peak_used * pool.bytes_per_block
            cached += len(pool.cached) * pool.bytes_per_block
            capacity += (pool.max_blocks or pool.capacity) * pool.bytes_per_block
            allocated += pool.capacity * pool.bytes_per_block
        return KVMemory(total, peak, dict(sorted(per_layer.items())),
                        dict(sorted(peak_per_layer.items())), cached, capacity, allocated)

    def blocks(self, sequence: Sequence, landmark: float = 0.3) -> list[BlockInfo]:
        """Metadata of each global block of `sequence`; `landmark` is the peak focused attention
        that flags a landmark."""
        table, pool, bs = sequence.tables["global"], self.pools["global"], self.block_size
        count = table.tokens(bs)
        stats = {k: v[:len(table.blocks) * bs].view(-1, bs) for k, v in table.stats.items()}
        out = []
        for i, block in enumerate(table.blocks):
            used = bs if i < len(table.blocks) - 1 else count - i * bs
            positions = pool.positions[block, :used]
            mass = float(stats["mass"][i, :used].sum())
            focus = float(stats["focus"][i, :used].sum())
            peak = float(stats["peak"][i, :used].max())
            out.append(BlockInfo(
                block, pool.refcount[block], int(positions.min()), int(positions.max()),
                int(stats["written_at"][i, :used].min()),
                int(stats["attended_at"][i, :used].max()), mass,
                1.0 - focus / mass if mass > 0 else 1.0, peak, peak >= landmark))
        return out
