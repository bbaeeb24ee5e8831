"""The KV saving reaches the user: eviction bounds a request's peak (not only its bytes after
prefill), admission spends the saving on more requests, and the prefix cache lives within the
pool's capacity without keeping what eviction dropped or throwing away what is about to be
reused."""

import pytest
import torch

from pyagent.engine.eviction import Budget
from pyagent.engine.generate import Engine, KVSettings
from pyagent.engine.scheduler import SchedulerSettings
from pyagent.errors import ConfigError, RequestError
from pyagent.types import CompletionRequest, SamplingParams

CHUNK = 128


def ids(count: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [2, *torch.randint(6, 300, (count - 1,), generator=generator).tolist()]


def per_token_bytes(engine: Engine) -> int:
    return sum(p.bytes_per_block for p in engine.cache.pools.values()) // engine.kv.block_size


def full_bytes(agent_engine, prompt: list[int]) -> tuple[int, int]:
    """Bytes a full cache holds after `prompt`, and its peak while prefilling it."""
    engine = Engine(agent_engine.loaded, kv=KVSettings(share_prefix=False, prefill_chunk=CHUNK))
    sequence = engine.open(prompt)
    engine.prefill(sequence, prompt)
    held = engine.cache.memory(sequence).bytes
    engine.close(sequence)
    return held, sequence.peak_bytes


def test_eviction_bounds_the_peak_to_the_budget_plus_one_chunk(agent_engine):
    prompt = ids(2048)
    full, full_peak = full_bytes(agent_engine, prompt)
    budget = int(0.6 * full)  # -40% of total KV bytes
    for policy in ("pyagent", "tova", "snapkv", "h2o", "streaming_llm", "kvzip"):
        engine = Engine(agent_engine.loaded, kv=KVSettings(
            policy=policy, budget=Budget(bytes=budget), share_prefix=False, prefill_chunk=CHUNK))
        sequence = engine.open(prompt)
        engine.prefill(sequence, prompt)
        assert engine.cache.memory(sequence).bytes <= budget, policy
        pools = engine.cache.pools
        chunk = CHUNK * pools["global"].bytes_per_block // 16  # the chunk's global tokens
        assert sequence.peak_bytes <= budget + chunk + pools["sliding"].bytes_per_block, policy
        assert sequence.peak_bytes < full_peak, policy
        engine.close(sequence)


def test_sliding_layers_are_trimmed_inside_the_pass_without_changing_the_output(
        agent_engine, monkeypatch):
    prompt = ids(1000)
    runs = {}
    for trimmed in (False, True):
        engine = Engine(agent_engine.loaded, kv=KVSettings(share_prefix=False,
                                                           prefill_chunk=CHUNK))
        monkeypatch.setattr(engine, "_trims", lambda sequence, new, on=trimmed: on)
        sequence = engine.open(prompt)
        logits = [engine.prefill(sequence, prompt)]
        for token in ids(20, seed=3):  # decoding across block boundaries
            logits.append(engine.decode(sequence, token))
        runs[trimmed] = (torch.stack(logits), engine.cache.pools["sliding"].peak_used)
        engine.close(sequence)
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-5)
    window_blocks = agent_engine.model.config.sliding_window // 16
    assert runs[False][1] >= CHUNK // 16  # untrimmed: a window plus a chunk in flight
    assert runs[True][1] <= window_blocks + 1


def test_evicting_never_takes_more_blocks_than_the_sequence_held(agent_engine):
    engine = Engine(agent_engine.loaded, kv=KVSettings(share_prefix=False))
    prompt = ids(256)
    sequence = engine.open(prompt)
    engine.forward(sequence, prompt)
    pool = engine.cache.pools["global"]
    before = pool.used
    engine.cache.keep_only(sequence, "global", torch.arange(256) % 3 == 0)  # every block partly
    assert pool.peak_used == before and pool.used == -(-86 // 16)
    positions = pool.positions.index_select(
        0, torch.tensor(sequence.tables["global"].blocks)).flatten()[:86]
    assert positions.tolist() == list(range(0, 256, 3))


def test_admission_reserves_the_budget_not_the_whole_prompt(agent_engine):
    kv = KVSettings(share_prefix=False, prefill_chunk=CHUNK, evict_every=32)
    full = Engine(agent_engine.loaded, kv=kv)
    evicting = Engine(agent_engine.loaded, kv=KVSettings(
        share_prefix=False, prefill_chunk=CHUNK, evict_every=32, policy="pyagent",
        budget=Budget(ratio=0.25)))
    assert full.kv_reservation(4000, 96)["global"] == (-(-4096 // 16) + 2) * 16
    reserved = evicting.kv_reservation(4000, 96)["global"]
    assert reserved == (-(-(1024 + CHUNK) // 16) + 2) * 16
    assert evicting.kv_reservation(4000, 96)["sliding"] == full.kv_reservation(4000, 96)["sliding"]


def admitted_at_once(agent_engine, kv: KVSettings, prompt: list[int], count: int,
                     tails: bool = False) -> int:
    """How many of `count` requests for `prompt` (each with a tail of its own when `tails`)
    ran at once in an engine with `kv`."""
    engine = Engine(agent_engine.loaded, kv=kv, scheduling=SchedulerSettings(max_batch=count))
    requests = [CompletionRequest(prompt=tuple(prompt + (ids(40, seed=i)[1:] if tails else [])),
                                  sampling=SamplingParams(max_tokens=8, ignore_eos=True))
                for i in range(count)]
    results = engine.generate_many(requests)
    assert [r.usage.completion_tokens for r in results] == [8] * count
    assert engine.cache.pools["global"].used == 0
    return engine.scheduler.most_running


def test_a_budget_admits_more_requests_into_the_same_pool(agent_engine):
    prompt = ids(1024)
    pool_tokens = 2 * 1024 + 200  # a full cache fits two such requests
    common = {"share_prefix": False, "prefill_chunk": CHUNK, "max_tokens": pool_tokens}
    full = admitted_at_once(agent_engine, KVSettings(**common), prompt, 6)
    evicting = admitted_at_once(agent_engine, KVSettings(
        **common, policy="pyagent", budget=Budget(ratio=0.25)), prompt, 6)
    assert full == 2 and evicting >= 4


def test_a_shared_prompt_prefix_is_reserved_once(agent_engine):
    prompt = ids(1024)
    common = {"prefill_chunk": CHUNK, "max_tokens": 2 * 1024 + 400}
    alone = admitted_at_once(agent_engine, KVSettings(**common, share_prefix=False), prompt, 5,
                             tails=True)
    shared = admitted_at_once(agent_engine, KVSettings(**common), prompt, 5, tails=True)
    assert alone == 2 and shared >= 3


def test_evicted_blocks_leave_the_pool_and_cached_prefixes_keep_statistics(agent_engine):
    engine = Engine(agent_engine.loaded, kv=KVSettings(
        policy="pyagent", budget=Budget(ratio=0.5), prefill_chunk=CHUNK))
    prompt = ids(1024)
    sequence = engine.open(prompt)
    engine.prefill(sequence, prompt)
    held = engine.cache.memory(sequence).bytes
    engine.close(sequence)
    memory = engine.cache.memory()
    assert memory.bytes == 0 and memory.cached_prefix_bytes <= held
    # a turn that fitted its budget is cached whole; the next, longer turn reuses it, and the
    # reused tokens carry the statistics they gathered, for the eviction that is now due
    engine = Engine(agent_engine.loaded, kv=KVSettings(
        policy="pyagent", budget=Budget(tokens=512), prefill_chunk=CHUNK))
    first = ids(400)
    sequence = engine.open(first)
    engine.prefill(sequence, first)
    assert not sequence.evicted and not sequence.trim_window
    engine.close(sequence)
    again = engine.open(first + ids(300, seed=9)[1:])
    reused = again.cached_tokens
    assert reused == len(first)
    mass = again.tables["global"].stats["mass"][:reused]
    assert (mass > 0).all()
    engine.close(again)


def test_a_prompt_sent_again_after_a_long_generation_reuses_its_prefix(agent_engine):
    engine = Engine(agent_engine.loaded, kv=KVSettings(max_tokens=3000, prefill_chunk=CHUNK))
    long = engine.generate(CompletionRequest(prompt=tuple(ids(400, seed=1)),
                                             sampling=SamplingParams(max_tokens=768,
                                                                     ignore_eos=True)))
    assert long.usage.completion_tokens == 768
    prompt = tuple(ids(2001, seed=2))
    reused = [engine.generate(CompletionRequest(prompt=prompt, sampling=SamplingParams(
        max_tokens=1))).usage.cached_tokens for _ in range(3)]
    assert reused == [0, 2000, 2000]
    memory = engine.cache.memory()
    assert memory.allocated_bytes <= memory.capacity_bytes == 3008 * per_token_bytes(engine)


def test_int8_keys_and_values_stay_close_to_float32_in_a_quarter_of_the_bytes(agent_engine):
    prompt = ids(300)
    outputs, held = {}, {}
    for dtype in ("auto", "bfloat16", "int8"):
        engine = Engine(agent_engine.loaded, kv=KVSettings(share_prefix=False, dtype=dtype))
        sequence = engine.open(prompt)
        outputs[dtype] = engine.logits(engine.forward(sequence, prompt))
        held[dtype] = engine.cache.memory(sequence).bytes
        engine.close(sequence)
    assert held["bfloat16"] == held["auto"] // 2
    dim = agent_engine.model.config.head_dim
    groups = -(-dim // 64)  # int8 per element, a float32 scale per 64 channels of each head
    assert held["int8"] == held["auto"] * (dim + 4 * groups) // (4 * dim)
    for dtype in ("bfloat16", "int8"):
        assert torch.allclose(outputs[dtype], outputs["auto"], atol=0.05), dtype


def test_int8_storage_composes_with_eviction_and_prefix_sharing(agent_engine):
    engine = Engine(agent_engine.loaded, kv=KVSettings(
        dtype="int8", policy="pyagent", budget=Budget(tokens=256), prefill_chunk=CHUNK))
    prompt = tuple(ids(200))
    first = engine.generate(CompletionRequest(prompt=prompt, sampling=SamplingParams(
        max_tokens=4)))
    second = engine.generate(CompletionRequest(prompt=prompt + tuple(ids(500, seed=4)[1:]),
                                               sampling=SamplingParams(max_tokens=4)))
    assert first.usage.completion_tokens == second.usage.completion_tokens == 4
    assert second.usage.cached_tokens >= 192  # the first turn fitted: cached whole
    assert engine.cache.memory().bytes == 0


def test_an_unknown_kv_dtype_is_named():
    with pytest.raises(ConfigError, match="unknown KV dtype 'int3'.*int8"):
        KVSettings(dtype="int3")


def test_a_reused_prefix_longer_than_the_budget_is_evicted_when_the_sequence_opens(agent_engine):
    engine = Engine(agent_engine.loaded, kv=KVSettings(
        policy="pyagent", budget=Budget(tokens=256), prefill_chunk=CHUNK))
    prompt = ids(1024)
    writer = engine.cache.new_sequence(prompt)  # a full prefix, as a full-cache run leaves it
    engine.forward(writer, prompt)
    engine.close(writer)
    reader = engine.open(prompt + ids(40, seed=3)[1:])
    assert reader.cached_tokens == 1024
    assert reader.tables["global"].tokens(16) <= 256
    engine.prefill(reader, reader.tokens + ids(40, seed=3)[1:])
    engine.close(reader)


def test_a_failed_eviction_when_opening_releases_the_reused_prefix(agent_engine):
    engine = Engine(agent_engine.loaded, kv=KVSettings(
        policy="pyagent", budget=Budget(bytes=1), prefill_chunk=16))
    prompt = ids(40)
    writer = engine.cache.new_sequence(prompt)
    engine.forward(writer, prompt)
    engine.close(writer)
    with pytest.raises(RequestError, match="below the .* bytes the sliding-window layers hold"):
        engine.open(prompt)
    assert all(pool.used == 0 for pool in engine.cache.pools.values())


def test_one_request_over_its_budget_fails_alone_and_short_prompts_keep_their_pins(agent_engine):
    # one sliding-window block and one global block: a 10-token prompt fits, 300 tokens not
    engine = Engine(agent_engine.loaded, kv=KVSettings(
        policy="pyagent", budget=Budget(bytes=16385), share_prefix=False, prefill_chunk=CHUNK),
        scheduling=SchedulerSettings(max_batch=4))
    short = Engine(agent_engine.loaded, kv=KVSettings(
        policy="pyagent", budget=Budget(ratio=0.5), share_prefix=False, prefill_chunk=CHUNK))
    done = short.generate(CompletionRequest(prompt=tuple(ids(80)), sampling=SamplingParams(
        max_tokens=4)))
    assert done.usage.completion_tokens == 4
    requests = [CompletionRequest(prompt=tuple(ids(n, seed=n)), sampling=SamplingParams(
        max_tokens=4, ignore_eos=True)) for n in (10, 300)]
    tickets = [engine.submit(r) for r in requests]
    outcomes = []
    for ticket in tickets:
        try:
            *_, last = ticket
            outcomes.append(last.completion.usage.completion_tokens)
        except RequestError as exc:
            outcomes.append(exc.param)
    assert outcomes == [4, "kv_budget"]
    assert all(pool.used == 0 for pool in engine.cache.pools.values())


@pytest.mark.parametrize(("settings", "message"), [
    ({"prefill_chunk": "64"}, "prefill_chunk must be an integer"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"budget": Budget(ratio=0.5)}, "needs an eviction policy"),
])
def test_bad_kv_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        KVSettings(**settings)


def test_a_token_budget_below_the_policys_pins_is_refused_up_front(agent_engine):
    with pytest.raises(ConfigError, match="90 tokens is below the 96 tokens policy 'pyagent'"):
        Engine(agent_engine.loaded, kv=KVSettings(policy="pyagent", budget=Budget(tokens=90)))
    with pytest.raises(ConfigError, match="must be an integer"):
        Budget(tokens=2.5)


def test_prompt_mode_evicts_once_the_whole_prompt_is_in(agent_engine):
    prompt = ids(1024)
    held = {}
    for mode in ("chunk", "prompt"):
        engine = Engine(agent_engine.loaded, kv=KVSettings(
            policy="tova", budget=Budget(tokens=256), share_prefix=False, prefill_chunk=CHUNK,
            prefill_eviction=mode))
        sequence = engine.open(prompt)
        engine.prefill(sequence, prompt[:-1])  # as a caller that forwards the last token itself
        held[mode] = (sequence.tables["global"].tokens(16), sequence.peak_bytes)
        engine.close(sequence)
    assert held["chunk"][0] <= 256 and held["prompt"][0] <= 256
    assert held["prompt"][1] > 2 * held["chunk"][1]  # the whole prompt, then eviction


def test_reconstruction_scores_every_held_token_and_stores_nothing(agent_engine):
    engine = Engine(agent_engine.loaded, kv=KVSettings(
        policy="kvzip", budget=Budget(ratio=0.5), share_prefix=False, prefill_chunk=CHUNK))
    prompt = ids(300)
    sequence = engine.open(prompt)
    engine.forward(sequence, prompt)
    used = {name: pool.used for name, pool in engine.cache.pools.items()}
    engine.reconstruct(sequence)
    assert {name: pool.used for name, pool in engine.cache.pools.items()} == used
    assert sequence.length == 300 and sequence.scored == 300
    recon = sequence.tables["global"].stats["recon"][:300]
    assert (recon > 0).all() and (recon <= 1).all()
    before = recon.clone()
    engine.reconstruct(sequence)  # nothing new to score
    assert torch.equal(sequence.tables["global"].stats["recon"][:300], before)
    engine.close(sequence)
    # the policy scores lazily, once eviction is due, then each chunk's new tokens
    sequence = engine.open(prompt)
    engine.prefill(sequence, prompt)
    assert sequence.scored == 300 and sequence.evicted
    kept = engine.cache.memory(sequence).bytes
    assert kept <= engine.cache.memory().bytes
    engine.close(sequence)
