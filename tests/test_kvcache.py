"""The paged KV cache: equivalence with transformers, prefix sharing, copy-on-write, accounting."""

import pytest
import torch

from pyagent.engine.eviction import Budget, RandomPolicy, evict
from pyagent.engine.generate import Engine, KVSettings
from pyagent.engine.kvcache import PagedKVCache
from pyagent.errors import ConfigError, RequestError
from pyagent.types import CompletionRequest, SamplingParams


def tokens(count: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [2, *torch.randint(6, 300, (count - 1,), generator=generator).tolist()]


def reference_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """transformers' own forward over the whole sequence (SDPA, no cache)."""
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def paged_logits(engine: Engine, ids: list[int], chunk: int) -> torch.Tensor:
    sequence = engine.open(ids)
    hidden = [engine.forward(sequence, ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    engine.close(sequence)
    return engine.logits(torch.cat(hidden))


@pytest.fixture
def engine(tiny_engine):
    """A fresh engine (own cache) on the session's tiny model."""
    return Engine(tiny_engine.loaded, kv=KVSettings(share_prefix=False))


@pytest.mark.parametrize("chunk", [1, 7, 16, 200])
def test_paged_logits_match_transformers(engine, chunk):
    ids = tokens(120)
    assert torch.allclose(paged_logits(engine, ids, chunk), reference_logits(engine, ids),
                          atol=1e-4)


def test_sliding_layers_keep_only_their_window(engine):
    ids = tokens(200)
    sequence = engine.open(ids)
    for token in ids:
        engine.forward(sequence, [token])
    sliding, full = sequence.tables["sliding"], sequence.tables["global"]
    window_blocks = engine.cache.pools["sliding"].group.window // 16
    assert len(sliding.blocks) <= window_blocks + 1
    assert len(full.blocks) == 200 // 16 + 1
    memory = engine.cache.memory(sequence)
    per_block = {g: engine.cache.pools[g].bytes_per_block for g in ("sliding", "global")}
    assert memory.bytes == sum(len(sequence.tables[g].blocks) * per_block[g] for g in per_block)
    assert sum(memory.per_layer.values()) == memory.bytes
    assert sequence.peak_bytes >= memory.bytes


def test_a_known_prefix_is_not_prefilled_again(tiny_engine):
    shared = Engine(tiny_engine.loaded, kv=KVSettings(share_prefix=True))
    alone = Engine(tiny_engine.loaded, kv=KVSettings(share_prefix=False))
    text = "The quick brown fox jumps over the lazy dog. " * 6
    first = CompletionRequest(prompt=text + "Agents call tools",
                              sampling=SamplingParams(max_tokens=6, ignore_eos=True))
    second = CompletionRequest(prompt=text + "def add(a, b)",
                               sampling=SamplingParams(max_tokens=6, ignore_eos=True))
    shared.generate(first)
    reused = shared.generate(second)
    common = 0
    a, b = shared.encode(first), shared.encode(second)
    while a[common] == b[common]:
        common += 1
    assert reused.usage.cached_tokens == common // 16 * 16 > 0
    assert reused.text == alone.generate(second).text
    assert alone.generate(second).usage.cached_tokens == 0


def test_fork_copies_a_shared_block_before_writing(engine):
    ids = tokens(40)
    parent = engine.open(ids)
    engine.forward(parent, ids)
    pool = engine.cache.pools["global"]
    tail = parent.tables["global"].blocks[-1]
    before = pool.k[:, tail].clone()
    child = engine.cache.fork(parent)
    assert pool.refcount[tail] == 2
    engine.forward(child, [7])
    assert child.tables["global"].blocks[-1] != tail
    assert pool.refcount[tail] == 1
    assert torch.equal(pool.k[:, tail], before)
    # both views still equal sequences computed from scratch
    assert torch.allclose(engine.logits(engine.forward(child, [9]))[0],
                          reference_logits(engine, [*ids, 7, 9])[-1], atol=1e-4)
    assert torch.allclose(engine.logits(engine.forward(parent, [8]))[0],
                          reference_logits(engine, [*ids, 8])[-1], atol=1e-4)


def test_eviction_never_alters_blocks_another_sequence_reads(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(share_prefix=True))
    ids = tokens(97)
    reader = engine.open(ids)
    engine.forward(reader, ids)
    pool = engine.cache.pools["global"]
    snapshot = pool.k.clone(), pool.v.clone()
    other = engine.open(ids)  # shares 96 tokens with the reader
    assert other.cached_tokens == 96
    engine.forward(other, ids[96:])
    dropped = evict(engine.cache, other, RandomPolicy(seed=1), keep=40)
    assert dropped == 57
    assert other.tables["global"].tokens(16) == 40
    for block in reader.tables["global"].blocks:
        assert torch.equal(pool.k[:, block], snapshot[0][:, block])
        assert torch.equal(pool.v[:, block], snapshot[1][:, block])
    after = engine.logits(engine.forward(reader, [11]))[0]
    assert torch.allclose(after, reference_logits(engine, [*ids, 11])[-1], atol=1e-4)


def test_token_eviction_packs_survivors_and_frees_memory(engine):
    ids = tokens(64)
    sequence = engine.open(ids)
    engine.forward(sequence, ids)
    before = engine.cache.memory(sequence).bytes
    pool = engine.cache.pools["global"]
    positions = pool.positions.index_select(
        0, torch.tensor(sequence.tables["global"].blocks)).flatten()
    keep = torch.zeros(64, dtype=torch.bool)
    keep[torch.tensor([0, 1, 5, 17, 18, 40, 63])] = True
    engine.cache.keep_only(sequence, "global", keep)
    table = sequence.tables["global"]
    assert (len(table.blocks), table.fill) == (1, 7)
    held = pool.positions[table.blocks[0], :7]
    assert held.tolist() == positions[keep].tolist()
    assert engine.cache.memory(sequence).bytes == before - 3 * pool.bytes_per_block


def test_block_size_must_divide_the_window(tiny_engine):
    with pytest.raises(ConfigError, match="block_size 5 does not divide the sliding window"):
        PagedKVCache(tiny_engine.model.config, block_size=5)


def test_a_full_pool_is_a_clear_error(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(max_tokens=32, share_prefix=False))
    ids = engine.tokenize("The quick brown fox " * 10)
    sequence = engine.open(ids)
    with pytest.raises(RequestError, match="KV cache of the global layers is full"):
        engine.prefill(sequence, ids)
    engine.close(sequence)
    assert engine.cache.pools["global"].used == 0


def test_a_request_larger_than_the_kv_budget_is_refused_up_front(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(max_tokens=64, share_prefix=False))
    big = CompletionRequest(prompt="The quick brown fox " * 10,
                            sampling=SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match=r"may need 96 tokens of KV in the global layers "
                       r"\(51 prompt \+ 2 max_tokens.*KV budget there is 64 tokens") as caught:
        engine.generate(big)
    assert caught.value.code == "kv_budget_exceeded"
    small = engine.generate(CompletionRequest(prompt="fox", sampling=SamplingParams(max_tokens=3)))
    assert small.usage.completion_tokens == 3  # the engine goes on serving
    assert engine.cache.pools["global"].used == 0


@pytest.mark.model
def test_paged_cache_matches_transformers_on_the_real_model():
    """No eviction: logits equal transformers' to 1e-4 through chunked prefill past the
    512-token sliding window and through decoding."""
    from pydoc_data.topics import topics

    engine = Engine.load(dtype="float32", kv=KVSettings(prefill_chunk=300, share_prefix=False))
    ids = engine.tokenizer(topics["assert"] + topics["for"])["input_ids"][:700]
    sequence = engine.open(ids)
    assert len(ids) > 600
    hidden = [engine.forward(sequence, ids[i:min(i + 300, 600)]) for i in range(0, 600, 300)]
    hidden += [engine.forward(sequence, [t]) for t in ids[600:]]
    ours = engine.logits(torch.cat(hidden))
    assert (ours - reference_logits(engine, ids)).abs().max() < 1e-4
    assert Budget(ratio=0.5).global_tokens(engine.cache, sequence) == len(ids) // 2


def test_block_metadata_tracks_writing_attention_and_landmarks(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(policy="h2o", budget=Budget(tokens=1000),
                                                      share_prefix=False))
    ids = tokens(40)
    sequence = engine.open(ids)
    engine.forward(sequence, ids[:32])
    engine.forward(sequence, ids[32:])
    info = engine.cache.blocks(sequence)
    assert [(b.first_position, b.last_position) for b in info] == [(0, 15), (16, 31), (32, 39)]
    assert [b.written_at for b in info] == [1, 1, 2]
    assert all(b.last_attended in (1, 2) and b.mass > 0 and 0 <= b.entropy <= 1 for b in info)
    assert info[-1].last_attended == 2  # its own tokens attend to themselves
    assert info[0].references == 1
    assert [b.landmark for b in engine.cache.blocks(sequence, landmark=0.0)] == [True] * 3


def test_a_model_with_only_global_layers(tmp_path):
    from conftest import build_tiny_model
    from pyagent.engine.model import load
    from pyagent.engine.registry import resolve_model

    directory = build_tiny_model(tmp_path / "global-only", ("full_attention",) * 4)
    engine = Engine(load(resolve_model(str(directory))), kv=KVSettings(
        policy="pyagent", budget=Budget(tokens=96), share_prefix=False))
    assert [g.name for g in engine.cache.groups] == ["global"]
    ids = tokens(150)
    assert torch.allclose(paged_logits(engine, ids, 32), reference_logits(engine, ids), atol=1e-4)
    sequence = engine.open(ids)
    engine.prefill(sequence, ids)
    assert sequence.tables["global"].tokens(16) <= 96


def test_blocks_kept_by_eviction_are_never_handed_out_again(engine):
    ids = tokens(64)
    sequence = engine.open(ids)
    engine.forward(sequence, ids)
    pool = engine.cache.pools["global"]
    engine.cache.keep_only(sequence, "global", torch.arange(64) % 2 == 0)  # packs 2 new blocks
    engine.cache.keep_only(sequence, "global", torch.ones(32, dtype=torch.bool))  # keeps them
    kept = list(sequence.tables["global"].blocks)
    assert len(kept) == 2
    snapshot = pool.k[:, kept].clone()
    engine.forward(sequence, tokens(40, seed=5))
    assert set(kept).isdisjoint(pool.free)
    assert torch.equal(pool.k[:, kept], snapshot)
    assert len(set(sequence.tables["global"].blocks)) == len(sequence.tables["global"].blocks)


def test_clearing_the_prefix_cache_frees_its_blocks(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(share_prefix=True))
    ids = tokens(80)
    first = engine.open(ids)
    engine.prefill(first, ids)
    engine.close(first)
    second = engine.open(ids)
    assert second.cached_tokens == 64
    engine.close(second)
    engine.cache.clear_prefix_cache()
    assert all(not pool.cached and not pool.by_hash for pool in engine.cache.pools.values())
    assert engine.open(ids).cached_tokens == 0
