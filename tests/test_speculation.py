"""Prompt-lookup speculative decoding: the drafter's proposals, and generation that is the same
with drafts as without them (greedy, seeded sampling, batches, stop rules, JSON grammars, KV
eviction), with the rejected drafts' KV dropped."""

import pytest
import torch

from pyagent.engine.eviction import Budget
from pyagent.engine.generate import Engine, KVSettings
from pyagent.engine.model import load
from pyagent.engine.registry import resolve_model
from pyagent.engine.scheduler import SchedulerSettings
from pyagent.engine.speculation import Drafter, SpeculationSettings
from pyagent.errors import ConfigError
from pyagent.types import CompletionRequest, SamplingParams
from test_scheduler import PROMPTS, concurrently, greedy

REPEATING = ["a b c d a b c d a b c", "def f(x):\n    return x\ndef g(x):\n    return x\ndef"]


def engines(tiny_model_dir, quantize=None, kv=None):
    """The same weights twice: without drafts and with them."""
    loaded = load(resolve_model(str(tiny_model_dir)), quantize=quantize)
    kv = kv or KVSettings(share_prefix=False)

    def make(drafts: int) -> Engine:
        return Engine(loaded, kv=kv, scheduling=SchedulerSettings(
            speculation=SpeculationSettings(draft_tokens=drafts)))
    return make(0), make(8)


def test_the_drafter_proposes_what_followed_the_longest_match():
    drafter = Drafter([1, 2, 3, 4, 5, 9, 2, 3], SpeculationSettings(draft_tokens=3))
    assert drafter.propose(8) == [4, 5, 9]  # "2 3" was followed by 4 5 9; at most 3 tokens
    assert drafter.propose(2) == [4, 5]
    drafter.extend([7])  # "3 7" never occurred
    assert drafter.propose(8) == []
    drafter.extend([1, 2, 3])  # "1 2 3": the longest match wins over the latest "2 3"
    assert drafter.propose(1) == [4]
    assert Drafter([5, 6], SpeculationSettings()).propose(4) == []
    assert Drafter([5, 6, 5, 6], SpeculationSettings(draft_tokens=0)).propose(4) == []


def test_the_settings_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match="draft_tokens must be an integer >= 0, got -1"):
        SpeculationSettings(draft_tokens=-1)
    with pytest.raises(ConfigError, match="1 <= ngram_min <= ngram_max, got 3 and 2"):
        SpeculationSettings(ngram_min=3, ngram_max=2)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_greedy_output_is_the_same_with_drafts(tiny_model_dir, quantize):
    plain, drafting = engines(tiny_model_dir, quantize)
    requests = [greedy(p, tokens=48) for p in [*REPEATING, *PROMPTS[:4]]]
    without = [plain.generate(r) for r in requests]
    with_drafts = [drafting.generate(r) for r in requests]
    assert [c.text for c in with_drafts] == [c.text for c in without]
    assert all(c.usage.completion_tokens == 48 for c in with_drafts)
    accepted = sum(c.timings.accepted_tokens for c in with_drafts)
    drafted = sum(c.timings.draft_tokens for c in with_drafts)
    assert 0 < accepted <= drafted and drafting.scheduler.steps < plain.scheduler.steps
    assert (drafting.scheduler.drafted, drafting.scheduler.accepted) == (drafted, accepted)
    assert drafting.cache.memory().bytes == 0  # every block let go, drafts included


def test_drafts_in_a_batch_give_each_request_its_own_output(tiny_model_dir):
    plain, drafting = engines(tiny_model_dir, "int8")
    requests = [greedy(p, tokens=32) for p in [*REPEATING, *PROMPTS[:5]]]
    requests.append(greedy(PROMPTS[6], tokens=32, temperature=0.9, seed=7))
    alone = [plain.generate(r).text for r in requests]
    batched = concurrently(drafting, requests)
    assert [c.text for c in batched] == alone
    assert sum(c.timings.accepted_tokens for c in batched) > 0


def test_seeded_sampling_draws_the_same_tokens_with_drafts(tiny_model_dir):
    plain, drafting = engines(tiny_model_dir, "int8")
    for prompt in REPEATING:
        request = greedy(prompt, tokens=40, temperature=0.7, top_k=20, seed=11)
        assert drafting.generate(request).text == plain.generate(request).text


def test_stop_rules_and_logprobs_hold_inside_a_draft(tiny_model_dir):
    plain, drafting = engines(tiny_model_dir, "int8")
    reference = plain.generate(greedy(REPEATING[0], tokens=40)).text
    stop = reference[len(reference) // 2:len(reference) // 2 + 3]
    for sampling in ({"stop": (stop,)}, {"max_tokens": 7}, {"logprobs": 2}):
        request = CompletionRequest(prompt=REPEATING[0], sampling=SamplingParams(
            **{"max_tokens": 40, "ignore_eos": True, "temperature": 0.0, **sampling}))
        expected, got = plain.generate(request), drafting.generate(request)
        assert got.text == expected.text and got.finish_reason == expected.finish_reason
        assert got.usage.completion_tokens == expected.usage.completion_tokens
        assert got.logprobs == expected.logprobs
    streamed = "".join(e.delta for e in drafting.stream(greedy(REPEATING[1], tokens=40)))
    assert streamed == plain.generate(greedy(REPEATING[1], tokens=40)).text


def test_a_json_grammar_constrains_every_drafted_row(tiny_model_dir):
    plain, drafting = engines(tiny_model_dir, "int8")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "tags": {"type": "array", "maxItems": 3,
                                                        "items": {"enum": ["a", "b"]}}},
              "required": ["name", "tags"], "additionalProperties": False}
    request = CompletionRequest(prompt='{"name": "ab", "tags": ["a"]}\n', sampling=SamplingParams(
        max_tokens=60, temperature=0.0, json_schema=schema))
    assert drafting.generate(request).text == plain.generate(request).text


def test_drafts_stop_at_evictions_and_policies_that_learn_from_queries_draft_nothing(
        tiny_model_dir):
    streaming = KVSettings(share_prefix=False, policy="streaming_llm",
                           budget=Budget.parse("32"), evict_every=8)
    plain, drafting = engines(tiny_model_dir, "int8", streaming)
    assert drafting.scheduler.speculates
    for prompt in REPEATING:
        request = greedy(prompt, tokens=60)
        assert drafting.generate(request).text == plain.generate(request).text
    assert drafting.scheduler.accepted > 0
    learning = KVSettings(share_prefix=False, policy="h2o", budget=Budget.parse("32"))
    _, h2o = engines(tiny_model_dir, "int8", learning)
    assert not h2o.scheduler.speculates


def test_a_truncated_draft_leaves_the_cache_as_if_never_written(tiny_model_dir):
    loaded = load(resolve_model(str(tiny_model_dir)), quantize="int8")  # rows on their own
    engine = Engine(loaded, kv=KVSettings(block_size=4))
    fresh = Engine(loaded, kv=KVSettings(block_size=4, share_prefix=False))
    ids = engine.tokenize("a b c d e f g h i j k l m n o p")
    with torch.inference_mode():
        drafted = engine.open(ids[:9])
        engine.forward(drafted, ids[:7])
        # ids[7:9] and a draft of five: the block after ids[8] fills with rejected tokens
        engine.forward_batch([(drafted, [*ids[7:9], 5, 6, 7, 8, 9])], finish=False)
        engine.cache.truncate(drafted, 5)
        engine.cache.finish(drafted)
        direct = fresh.open(ids[:9])
        fresh.forward(direct, ids[:9])
        assert drafted.tokens == direct.tokens and drafted.hashes == direct.hashes
        assert engine.cache.memory(drafted).bytes == fresh.cache.memory(direct).bytes
        got, expected = engine.forward(drafted, ids[9:12]), fresh.forward(direct, ids[9:12])
    assert torch.equal(got, expected)
    engine.close(drafted)
    # the prefix cache never serves the block that held rejected tokens
    again = engine.open([*ids[:9], 5, 6, 7, 8, 9, 1])
    assert again.cached_tokens == 8
    engine.close(again)


@pytest.mark.model
def test_the_embedded_model_rewrites_a_file_faster_and_word_for_word(engine):
    """An agent's file rewrite on the real model (int8): drafts from the file it quotes are
    mostly accepted, and the greedy text is the one decoding without drafts writes."""
    import inspect
    import json

    source = inspect.getsource(json.dumps)[:1200]
    prompt = (f"### encoder.py (before)\n```python\n{source}```\n\n"
              "### encoder.py (after renaming `skipkeys` to `skip_keys`)\n```python\n")
    loaded = load(resolve_model(None), dtype="int8")
    request = CompletionRequest(prompt=prompt, sampling=SamplingParams(
        max_tokens=160, temperature=0.0, stop=("```",)))
    plain = Engine(loaded, scheduling=SchedulerSettings(
        speculation=SpeculationSettings(draft_tokens=0))).generate(request)
    drafted = Engine(loaded).generate(request)
    assert drafted.text == plain.text and drafted.usage == plain.usage
    timings = drafted.timings
    assert timings.accepted_tokens > 0.5 * timings.draft_tokens > 20
