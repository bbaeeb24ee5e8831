"""Random sequences of cache operations (open, prefill, decode, evict, fork, close) under every
policy, budget kind, storage dtype and prefill-eviction mode keep the pools consistent, never
modify a block another live sequence reads, and give every block back at the end."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyagent.engine.eviction import POLICIES, Budget
from pyagent.engine.generate import Engine, KVSettings
from pyagent.errors import ConfigError, RequestError

PROMPTS = [[2, *torch.randint(6, 300, (400,), generator=torch.Generator().manual_seed(seed))
            .tolist()] for seed in range(3)]
OPERATIONS = st.lists(st.tuples(st.sampled_from(["open", "prefill", "decode", "evict", "fork",
                                                 "close"]), st.integers(0, 10**6)),
                      min_size=1, max_size=12)


def pool_errors(engine: Engine, live: bool) -> list[str]:
    """What is inconsistent in the engine's pools (with `live` False: blocks still held)."""
    errors = []
    for name, pool in engine.cache.pools.items():
        free = set(pool.free)
        checks = {
            "blocks still held": not live and pool.used != 0,
            "a negative reference count": any(r < 0 for r in pool.refcount),
            "a block listed twice as free": len(free) != len(pool.free),
            "a block both free and cached": bool(free & set(pool.cached)),
            "hash maps that disagree": any(pool.hash_of.get(b) != d
                                           for d, b in pool.by_hash.items()),
            "free + cached + used != capacity":
                len(pool.free) + len(pool.cached) + pool.used != pool.capacity,
            "a cached block someone holds or nobody can find": any(
                pool.refcount[b] or b not in pool.hash_of for b in pool.cached),
            "a free block that is held or findable": any(
                pool.refcount[b] or b in pool.hash_of for b in free),
            "storage beyond the capacity": pool.max_blocks is not None
                and pool.capacity > pool.max_blocks,
        }
        errors += [f"{name}: {what}" for what, bad in checks.items() if bad]
    return errors


def others(engine: Engine, sequences: list, me) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """The contents of every block another sequence holds, per group."""
    out = {}
    for name, pool in engine.cache.pools.items():
        blocks = {b for s in sequences if s is not me for b in s.tables[name].blocks}
        out[name] = {b: {**{k: p[:, b].clone() for k, p in pool.planes.items()},
                         "positions": pool.positions[b].clone()} for b in blocks}
    return out


def without(sequences: list, me) -> list:
    """`sequences` less `me`, by identity (two sequences may compare equal, and comparing their
    tensors is ambiguous)."""
    return [s for s in sequences if s is not me]


budgets = st.one_of(st.builds(lambda r: Budget(ratio=r), st.floats(0.05, 1.0)),
                    st.builds(lambda t: Budget(tokens=t), st.integers(96, 300)),
                    st.builds(lambda b: Budget(bytes=b), st.integers(20_000, 200_000)))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(policy=st.sampled_from(["full", *POLICIES]), budget=budgets,
       dtype=st.sampled_from(["auto", "bfloat16", "int8", "int4"]),
       mode=st.sampled_from(["chunk", "prompt"]), chunk=st.sampled_from([16, 48, 100]),
       capacity=st.sampled_from([None, 1024]), share=st.booleans(), operations=OPERATIONS)
def test_random_cache_operations_keep_every_invariant(agent_engine, policy, budget, dtype, mode,
                                                      chunk, capacity, share, operations):
    try:
        engine = Engine(agent_engine.loaded, kv=KVSettings(
            policy=policy, budget=None if policy == "full" else budget, dtype=dtype,
            prefill_eviction=mode, prefill_chunk=chunk, evict_every=8, max_tokens=capacity,
            share_prefix=share))
    except ConfigError:
        return  # a budget below the policy's pins: refused up front, as it should be
    sequences, prompts = [], {}
    for operation, r in operations:
        me = None
        try:
            if operation == "open":
                prompt = PROMPTS[r % 3][:20 + (r // 3) % 300] + ([7 + r % 50] if r % 2 else [])
                me = engine.open(prompt)
                sequences.append(me)
                prompts[id(me)] = prompt
                continue
            if not sequences:
                continue
            me = sequences[r % len(sequences)]
            before = others(engine, sequences, me)
            prompt = prompts[id(me)]
            if operation == "prefill" and me.length < len(prompt):
                engine.prefill(me, prompt)
            elif operation == "decode" and me.length >= len(prompt):
                for _ in range(1 + r % 10):
                    engine.decode(me, 6 + r % 200)
            elif operation == "evict":
                engine.enforce_budget(me)
            elif operation == "fork":
                fork = engine.cache.fork(me)
                sequences.append(fork)
                prompts[id(fork)] = prompt
            elif operation == "close":
                engine.close(me)
                sequences = without(sequences, me)
            after = others(engine, sequences, me)
            for name, blocks in after.items():
                for block in blocks.keys() & before[name].keys():
                    for plane, value in before[name][block].items():
                        assert torch.equal(blocks[block][plane], value), \
                            f"{operation} changed {plane} of {name} block {block}"
        except RequestError as exc:  # a budget or pool this request cannot fit: it alone ends
            assert exc.param == "kv_budget" or exc.code == "kv_cache_full", str(exc)
            if any(s is me for s in sequences):
                engine.close(me)
                sequences = without(sequences, me)
        assert not pool_errors(engine, live=True), pool_errors(engine, live=True)
    for sequence in sequences:
        engine.close(sequence)
    assert not pool_errors(engine, live=False), pool_errors(engine, live=False)
