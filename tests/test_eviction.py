"""Budgets, the policies' choices, and the errors for bad eviction settings."""

import pytest
import torch

from pyagent.engine.eviction import POLICIES, Budget, evict, make_policy
from pyagent.engine.generate import Engine, KVSettings
from pyagent.engine.landmarks import TokenTraits, line_salience
from pyagent.errors import ConfigError, RequestError
from pyagent.types import CompletionRequest, SamplingParams


@pytest.mark.parametrize(("text", "expected"), [
    ("0.4", Budget(ratio=0.4)), ("1.0", Budget(ratio=1.0)), ("2048", Budget(tokens=2048)),
    ("512t", Budget(tokens=512)), ("12MiB", Budget(bytes=12 * 2**20)),
    ("8MB", Budget(bytes=8_000_000)), ("500000B", Budget(bytes=500_000)),
])
def test_budgets_parse(text, expected):
    assert Budget.parse(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("0.0", "ratio must be in"), ("1.5", "ratio must be in"), ("0", "must be positive"),
    ("lots", "cannot read KV budget"), ("-3", "cannot read KV budget"),
    ("1", "ambiguous: write 1.0"),
])
def test_bad_budgets_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        Budget.parse(text)


def test_unknown_policy_and_missing_budget_are_refused():
    with pytest.raises(ConfigError, match="unknown eviction policy 'lru'.*pyagent"):
        make_policy("lru")
    with pytest.raises(ConfigError, match="needs a KV budget"):
        KVSettings(policy="h2o")


def held(engine, sequence):
    table = sequence.tables["global"]
    return engine.cache.pools["global"].positions.index_select(
        0, torch.tensor(table.blocks)).flatten()[:table.tokens(16)]


def run(tiny_engine, policy: str, count: int = 160, keep: int = 80):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(policy=policy, budget=Budget(tokens=keep),
                                                      share_prefix=False))
    generator = torch.Generator().manual_seed(3)
    ids = [2, *torch.randint(6, 300, (count - 1,), generator=generator).tolist()]
    sequence = engine.open(ids)
    engine.forward(sequence, ids)
    dropped = engine.enforce_budget(sequence)
    return engine, sequence, dropped


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_meets_the_budget_and_keeps_working(tiny_engine, policy):
    engine, sequence, dropped = run(tiny_engine, policy, keep=96)
    kept = sequence.tables["global"].tokens(16)
    assert kept <= 96 and dropped == 160 - kept
    assert engine.cache.memory(sequence).bytes < engine.cache.memory().peak_bytes
    logits = engine.logits(engine.forward(sequence, [5]))
    assert torch.isfinite(logits).all()


def test_streaming_llm_keeps_sinks_and_the_recent_window(tiny_engine):
    engine, sequence, _ = run(tiny_engine, "streaming_llm")
    assert sorted(held(engine, sequence).tolist()) == [0, 1, 2, 3, *range(84, 160)]


def test_h2o_keeps_the_recent_half_of_its_budget(tiny_engine):
    engine, sequence, _ = run(tiny_engine, "h2o")
    assert set(range(120, 160)) <= set(held(engine, sequence).tolist())


def test_snapkv_keeps_its_observation_window(tiny_engine):
    engine, sequence, _ = run(tiny_engine, "snapkv", count=200, keep=100)
    assert set(range(136, 200)) <= set(held(engine, sequence).tolist())


def test_pyagent_keeps_whole_blocks_the_sink_and_the_recent_window(tiny_engine):
    engine, sequence, _ = run(tiny_engine, "pyagent", keep=96)
    positions = set(held(engine, sequence).tolist())
    assert set(range(16)) <= positions and set(range(96, 160)) <= positions
    assert len(positions) % 16 == 0  # block-level: only whole blocks go


def test_a_budget_below_the_pinned_tokens_is_refused(tiny_engine):
    with pytest.raises(ConfigError, match="40 tokens is below the 96 tokens policy 'pyagent'"):
        run(tiny_engine, "pyagent", keep=40)
    engine, sequence, _ = run(tiny_engine, "snapkv", keep=64)  # the observation window fits
    with pytest.raises(RequestError, match="below the .* tokens the policy pins"):
        evict(engine.cache, sequence, make_policy("snapkv"), 40)


def test_a_byte_budget_below_the_sliding_layers_is_refused(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(policy="tova", budget=Budget(bytes=100)))
    with pytest.raises(RequestError, match="below the .* bytes the sliding-window layers hold"):
        engine.generate(CompletionRequest(prompt="The quick brown fox " * 8,
                                          sampling=SamplingParams(max_tokens=2)))


def test_decoding_evicts_every_interval(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(
        policy="tova", budget=Budget(tokens=48), evict_every=8, share_prefix=False))
    request = CompletionRequest(prompt="The quick brown fox " * 6,
                                sampling=SamplingParams(max_tokens=40, ignore_eos=True))
    peaks = []
    original = engine.enforce_budget

    def spy(sequence):
        dropped = original(sequence)
        peaks.append(sequence.tables["global"].tokens(16))
        return dropped

    engine.enforce_budget = spy
    assert engine.generate(request).usage.completion_tokens == 40
    assert len(peaks) == 5  # after prefill, then after decoded tokens 8, 16, 24 and 32
    assert max(peaks) <= 48


def test_evict_is_a_no_op_under_budget(tiny_engine):
    engine, sequence, _ = run(tiny_engine, "tova", count=40, keep=80)
    assert evict(engine.cache, sequence, make_policy("tova"), keep=80) == 0


def test_line_salience_marks_short_lines_dense_in_digits(tiny_engine):
    traits = TokenTraits.of(tiny_engine.tokenizer, tiny_engine.model.config.vocab_size)
    text = "The quick brown fox jumps.\nport for service alpha: 48213\nThe lazy dog.\n"
    ids = tiny_engine.tokenize(text, add_special_tokens=False)
    salience = line_salience(ids, traits)
    line = [tiny_engine.tokenizer.decode(ids[:i]).count("\n") for i in range(len(ids))]
    assert all((value > 0) == (at == 1) for value, at in zip(salience.tolist(), line,
                                                                      strict=True))
    assert not line_salience(ids, traits, longest=3).any()


def test_pyagent_keeps_a_fact_line_no_query_has_looked_at_yet(tiny_engine):
    engine = Engine(tiny_engine.loaded, kv=KVSettings(policy="pyagent", budget=Budget(tokens=112),
                                                      share_prefix=False))
    filler = "The quick brown fox jumps over the lazy dog. " * 4
    text = filler + "\n[tool] port for service alpha: 48213\n" + filler * 2
    ids = engine.tokenize(text)
    digits = {i for i, token in enumerate(ids) if engine.tokenizer.decode([token]).strip()
              .isdigit()}
    sequence = engine.open(ids)
    engine.forward(sequence, ids)
    engine.enforce_budget(sequence)
    assert digits and digits <= set(held(engine, sequence).tolist())
