"""KV eviction: budgets, the `EvictionPolicy` seam, PyAgent's policy and the published baselines.

A policy scores every token the global layers hold (higher is kept; +inf pins a token); the cache
keeps the best tokens, or whole blocks for block-level policies, within the budget, and packs the
survivors of partly kept blocks. Adding a method is one class and one registry line.

Baselines follow their papers, adapted in one way: a decision covers all global layers and all
heads at once (scores are averaged over them), so every global layer keeps the same tokens.
- StreamingLLM (Xiao et al., 2023): attention sinks (the first 4 tokens) and the recent window.
- H2O (Zhang et al., 2023): half the budget for recent tokens, half for the heavy hitters with
  the most accumulated attention.
- TOVA (Oren et al., 2024): the attention of the most recent query.
- SnapKV (Li et al., 2024): attention of an observation window of the last 64 queries to the
  earlier keys, smoothed by 1-D pooling (kernel 5); the window itself is kept.
- random, and the full cache (never evicts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

from pyagent.engine.kvcache import PagedKVCache, Sequence
from pyagent.engine.landmarks import line_salience
from pyagent.errors import ConfigError, RequestError

PINNED = math.inf


@dataclass(frozen=True)
class Budget:
    """How much KV a sequence may keep: a ratio of its global tokens, a token count, or bytes of
    total KV (all layers, sliding windows included)."""

    ratio: float | None = None
    tokens: int | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.ratio, self.tokens, self.bytes) if v is not None]
        if len(given) != 1:
            raise ConfigError("a KV budget needs exactly one of ratio, tokens and bytes")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ConfigError(f"a KV budget ratio must be in (0, 1], got {self.ratio}")
        for name in ("tokens", "bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"a KV budget in {name} must be an integer, got {value!r}")
        if self.tokens is not None and self.tokens <= 0:
            raise ConfigError(f"a KV budget in tokens must be positive, got {self.tokens}")
        if self.bytes is not None and self.bytes <= 0:
            raise ConfigError(f"a KV budget in bytes must be positive, got {self.bytes}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'0.4' (keep 40%), '2048' or '2048t' (tokens), '12MiB', '8MB', '500000B' (bytes)."""
        match = re.fullmatch(r"\s*([0-9.]+)\s*(t|tokens|b|kb|kib|mb|mib|gb|gib)?\s*",
                             text.lower())
        if not match:
            raise ConfigError(f"cannot read KV budget {text!r}: use a ratio like 0.5, "
                              "a token count like 2048, or bytes like 12MiB")
        number, unit = match.groups()
        try:
            value = float(number)
        except ValueError:
            raise ConfigError(f"cannot read KV budget {text!r}") from None
        if unit is None and "." in number:
            return cls(ratio=value)
        if unit is None and value == 1:
            raise ConfigError(f"KV budget {text!r} is ambiguous: write 1.0 to keep every token "
                              "or 1t for a single token")
        if unit in (None, "t", "tokens"):
            return cls(tokens=int(value))
        scale = {"b": 1, "kb": 1e3, "kib": 2**10, "mb": 1e6, "mib": 2**20, "gb": 1e9,
                 "gib": 2**30}[unit]
        return cls(bytes=int(value * scale))

    def global_tokens(self, cache: PagedKVCache, sequence: Sequence, coming: int = 0) -> int:
        """Global-layer tokens the sequence may keep now (or once `coming` more are in)."""
        if self.ratio is not None:  # of every token seen, so repeated passes do not compound
            return max(1, math.floor(self.ratio * (sequence.length + coming)))
        if self.tokens is not None:
            return self.tokens
        fixed = sum(len(sequence.tables[g.name].blocks) * cache.pools[g.name].bytes_per_block
                    for g in cache.groups if g.window is not None)
        if self.bytes <= fixed:
            raise RequestError(f"a KV budget of {self.bytes} bytes is below the "
                               f"{fixed} bytes the sliding-window layers hold", param="kv_budget")
        block = cache.pools["global"].bytes_per_block  # memory is held in whole blocks
        return (self.bytes - fixed) // block * cache.block_size

    def most_global_tokens(self, cache: PagedKVCache, length: int) -> int:
        """The most global-layer tokens a sequence of up to `length` tokens keeps after any
        eviction: what admission reserves for it."""
        if self.ratio is not None:
            return max(1, math.ceil(self.ratio * length))
        if self.tokens is not None:
            return self.tokens
        bs, per_token = cache.block_size, _global_bytes_per_token(cache)
        windowed = [g for g in cache.groups if g.window is not None]
        longest = max([g.window for g in windowed], default=0)
        fixed = sum((-(-g.window // bs)) * cache.pools[g.name].bytes_per_block for g in windowed)
        return max(min(longest, self.bytes // per_token), (self.bytes - fixed) // per_token)


def _global_bytes_per_token(cache: PagedKVCache) -> int:
    return cache.pools["global"].bytes_per_block // cache.block_size


@dataclass
class KVView:
    """What a policy may look at: per held global token, its position and attention statistics."""

    cache: PagedKVCache
    sequence: Sequence
    positions: torch.Tensor
    stats: dict[str, torch.Tensor]

    @property
    def length(self) -> int:
        return self.sequence.length

    def salience(self) -> torch.Tensor | None:
        """Per held token, its structural salience (engine/landmarks.py); None when the cache
        does not know the vocabulary."""
        traits = self.cache.traits
        if traits is None:
            return None
        return line_salience(self.sequence.tokens, traits)[self.positions]

    def window_attention(self, window: int) -> torch.Tensor:
        """Attention of the last `window` remembered queries to every held token, summed over
        those queries and averaged over heads and global layers (causal by position)."""
        seq, cache = self.sequence, self.cache
        table = seq.tables["global"]
        pool = cache.pools["global"]
        count = table.tokens(cache.block_size)
        ids = torch.tensor(table.blocks)
        votes = torch.zeros(count)
        query_pos = seq.recent_positions[-window:]
        mask = self.positions[None, :] <= query_pos[:, None]
        for layer, remembered in seq.recent_queries.items():
            queries = remembered[:, -window:]
            keys, _ = pool.load(pool.layer_index[layer], ids, count)
            heads, kv_heads = queries.shape[0], keys.shape[1]
            grouped = queries.reshape(kv_heads, heads // kv_heads, -1, queries.shape[-1])
            scores = torch.einsum("kgnd,lkd->kgnl", grouped, keys) * seq.query_scale
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1)
            votes += probs.sum(2).mean((0, 1))
        return votes / max(1, len(seq.recent_queries))


class EvictionPolicy(Protocol):
    """Scores held tokens; the cache keeps the highest (a score of +inf pins a token)."""

    name: str
    granularity: Literal["token", "block"]
    collects: bool  # needs attention statistics gathered while attending
    window: int  # recent queries it needs remembered (0: none)
    reconstructs: bool  # needs the "recon" statistic (`Engine.reconstruct`) before evicting

    def scores(self, view: KVView, keep: int) -> torch.Tensor: ...

    def least(self, block_size: int) -> int:
        """Tokens the policy always pins (sinks, recent windows), landmarks aside."""
        ...


class _Policy:
    granularity: ClassVar[Literal["token", "block"]] = "token"
    collects: ClassVar[bool] = False
    window: ClassVar[int] = 0
    reconstructs: ClassVar[bool] = False

    def least(self, block_size: int) -> int:
        return 0


class StreamingLLM(_Policy):
    name = "streaming_llm"

    def __init__(self, sinks: int = 4):
        self.sinks = sinks

    def scores(self, view: KVView, keep: int) -> torch.Tensor:
        scores = view.positions.float()
        scores[view.positions < self.sinks] = PINNED
        return scores

    def least(self, block_size: int) -> int:
        return self.sinks


class H2O(_Policy):
    name = "h2o"
    collects = True

    def __init__(self, recent_share: float = 0.5):
        self.recent_share = recent_share

    def scores(self, view: KVView, keep: int) -> torch.Tensor:
        scores = view.stats["mass"].clone()
        recent = int(keep * self.recent_share)
        if recent:
            scores[view.positions >= view.length - recent] = PINNED
        return scores


class TOVA(_Policy):
    name = "tova"
    collects = True

    def scores(self, view: KVView, keep: int) -> torch.Tensor:
        return view.stats["last"].clone()


class SnapKV(_Policy):
    name = "snapkv"
    window = 64

    def __init__(self, kernel: int = 5):
        self.kernel = kernel

    def scores(self, view: KVView, keep: int) -> torch.Tensor:
        votes = view.window_attention(self.window)
        pooled = F.avg_pool1d(votes[None, None], self.kernel, stride=1,
                              padding=self.kernel // 2)[0, 0]
        pooled[view.positions >= view.length - self.window] = PINNED
        return pooled

    def least(self, block_size: int) -> int:
        return self.window


class KVzip(_Policy):
    """Query-agnostic scoring by context reconstruction (KVzip, Kim et al. 2025): a token's
    score is the most attention any query paid it while the model repeated the context. The
    first `sinks` tokens and the last `recent` are kept."""

    name = "kvzip"
    reconstructs = True

    def __init__(self, sinks: int = 4, recent: int = 16):
        self.sinks = sinks
        self.recent = recent

    def scores(self, view: KVView, keep: int) -> torch.Tensor:
        scores = view.stats["recon"].clone()
        scores[view.positions < self.sinks] = PINNED
        scores[view.positions >= view.length - self.recent] = PINNED
        return scores

    def least(self, block_size: int) -> int:
        return self.sinks + self.recent


class RandomPolicy(_Policy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, view: KVView, keep: int) -> torch.Tensor:
        return torch.rand(view.positions.numel(), generator=self.generator)


class PyAgentPolicy(_Policy):
    """PyAgent's policy: block-level and entropy-aware, keeping landmarks.

    Pinned: the sink block, the recent window, structural landmarks (blocks on short lines dense
    in digits, the facts tools report, which a later question may ask for whatever the current
    query attends to; the densest first, at most `structure_share` of the budget), and attention
    landmarks, blocks on which a focused (low-entropy) query once put at least `landmark` of its
    attention (the most focused first, at most `landmark_share` of the budget). The others rank
    by the attention the recent queries pay them plus their entropy-weighted attention per query
    since they were written, with a bonus for blocks attended within the last `fresh` steps.
    """

    name = "pyagent"
    granularity = "block"
    collects = True
    window = 32

    def __init__(self, recent: int = 64, landmark: float = 0.3, landmark_share: float = 0.25,
                 fresh: int = 64, structure_share: float = 0.4):
        self.recent = recent
        self.landmark = landmark
        self.landmark_share = landmark_share
        self.fresh = fresh
        self.structure_share = structure_share

    def least(self, block_size: int) -> int:
        return 2 * block_size + self.recent  # the sink block, the blocks the recent tokens span

    def scores(self, view: KVView, keep: int) -> torch.Tensor:
        positions, stats = view.positions, view.stats
        relevance = view.window_attention(self.window)
        relevance = relevance / relevance.sum().clamp(min=1e-9)
        exposure = (view.length - positions).clamp(min=1).float()
        history = stats["focus"] / exposure
        history = history / history.sum().clamp(min=1e-9)
        fresh = stats["attended_at"] >= view.sequence.step - self.fresh
        scores = relevance + history + fresh.float() / positions.numel()
        bs = view.cache.block_size
        scores[positions < bs] = PINNED
        scores[positions >= view.length - self.recent] = PINNED
        salience = view.salience()
        if salience is not None:
            rank = per_block(salience, bs, torch.amax) + 1e-3 * per_block(
                scores.clamp(max=1.0), bs, torch.mean)
            self._pin_blocks(scores, rank, per_block(salience, bs, torch.amax) > 0,
                             int(keep * self.structure_share), keep, bs)
        peaks = per_block(stats["peak"], bs, torch.amax)
        self._pin_blocks(scores, peaks, peaks >= self.landmark, int(keep * self.landmark_share),
                         keep, bs)
        return scores

    @staticmethod
    def _pin_blocks(scores: torch.Tensor, rank: torch.Tensor, eligible: torch.Tensor,
                    share: int, keep: int, bs: int) -> None:
        """Pin the best-ranked eligible blocks, within `share` tokens and the budget's room."""
        pinned = per_block(torch.isinf(scores).float(), bs, torch.amax) > 0
        room = min(share, keep - int(pinned.sum()) * bs) // bs
        candidates = torch.nonzero(eligible & ~pinned).flatten()
        if room <= 0 or not candidates.numel():
            return
        for block in candidates[rank[candidates].argsort(descending=True)[:room]].tolist():
            scores[block * bs:(block + 1) * bs] = PINNED


def per_block(values: torch.Tensor, block_size: int, reduce) -> torch.Tensor:
    """`reduce` (torch.amax, torch.mean) over each block of `block_size` slots."""
    count = values.numel()
    padded = F.pad(values.float(), (0, -count % block_size)).view(-1, block_size)
    if reduce is torch.mean:  # the last block may be partly filled
        sizes = torch.full((padded.shape[0],), float(block_size))
        sizes[-1] = count - (padded.shape[0] - 1) * block_size
        return padded.sum(1) / sizes
    return reduce(padded, 1)


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "pyagent": PyAgentPolicy,
    "streaming_llm": StreamingLLM,
    "h2o": H2O,
    "tova": TOVA,
    "snapkv": SnapKV,
    "kvzip": KVzip,
    "random": RandomPolicy,
}


def make_policy(name: str) -> EvictionPolicy | None:
    """The policy called `name`; None for `full` (no eviction)."""
    if name == "full":
        return None
    try:
        return POLICIES[name]()
    except KeyError:
        known = ", ".join(["full", *POLICIES])
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of {known}") from None


def evict(cache: PagedKVCache, sequence: Sequence, policy: EvictionPolicy, keep: int) -> int:
    """Shrink the sequence's global layers to at most `keep` tokens; return how many were
    dropped. Raises when the policy pins more tokens than the budget allows."""
    table = sequence.tables["global"]
    bs = cache.block_size
    count = table.tokens(bs)
    if count <= keep:
        return 0
    positions = cache.pools["global"].positions.index_select(
        0, torch.tensor(table.blocks)).flatten()[:count]
    view = KVView(cache, sequence, positions, {k: v[:count] for k, v in table.stats.items()})
    scores = policy.scores(view, keep)
    if policy.granularity == "block":
        mask = _choose_blocks(scores, keep, bs)
    else:
        mask = _choose_tokens(scores, keep)
    cache.keep_only(sequence, "global", mask)
    return count - int(mask.sum())


def _check_pins(pinned: int, keep: int) -> None:
    if pinned > keep:
        raise RequestError(f"the KV budget of {keep} tokens is below the {pinned} tokens the "
                           "policy pins (sink, recent window, landmarks)", param="kv_budget")


def _choose_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    _check_pins(int(torch.isinf(scores).sum()), keep)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.topk(scores, keep).indices] = True
    return mask


def _choose_blocks(scores: torch.Tensor, keep: int, block_size: int) -> torch.Tensor:
    count = scores.numel()
    blocks = -(-count // block_size)
    padded = torch.full((blocks * block_size,), float("nan"))
    padded[:count] = scores
    per_block = padded.view(blocks, block_size)
    pinned = torch.isinf(per_block).any(1)
    sizes = (~torch.isnan(per_block)).sum(1)
    value = torch.where(pinned, torch.full((blocks,), PINNED), per_block.nanmean(1))
    _check_pins(int(sizes[pinned].sum()), keep)
    mask = torch.zeros(blocks, dtype=torch.bool)
    used = 0
    for block in value.argsort(descending=True).tolist():
        if used + int(sizes[block]) <= keep:
            mask[block] = True
            used += int(sizes[block])
    return mask.repeat_interleave(block_size)[:count]
