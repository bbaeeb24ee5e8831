import threading

import pytest
import torch
from transformers import DynamicCache

from pyagent.errors import RequestError
from pyagent.types import CompletionRequest, Message, SamplingParams


def ask(prompt: str, **sampling) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, sampling=SamplingParams(**sampling))


def test_greedy_decoding_is_deterministic(tiny_engine):
    first = tiny_engine.generate(ask("The quick brown", max_tokens=12))
    second = tiny_engine.generate(ask("The quick brown", max_tokens=12))
    assert first.text == second.text
    assert first.usage.prompt_tokens == len(tiny_engine.tokenizer("The quick brown")["input_ids"])


def test_stream_deltas_add_up_to_the_text(tiny_engine):
    events = list(tiny_engine.stream(ask("Agents call", max_tokens=20, ignore_eos=True)))
    final = events[-1].completion
    assert final is not None and all(e.completion is None for e in events[:-1])
    assert "".join(e.delta for e in events) == final.text
    assert final.finish_reason == "length"
    assert final.usage.completion_tokens == 20
    assert final.timings.total_s >= final.timings.time_to_first_token_s > 0


def test_stop_string_cuts_the_text_at_its_first_occurrence(tiny_engine):
    full = tiny_engine.generate(ask("def add", max_tokens=40, ignore_eos=True)).text
    stop = next(full[i:i + 3] for i in range(len(full) // 2, len(full) - 3)
                if "\ufffd" not in full[i:i + 3])
    cut = tiny_engine.generate(ask("def add", max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.find(stop)]
    streamed = "".join(e.delta for e in tiny_engine.stream(
        ask("def add", max_tokens=40, ignore_eos=True, stop=(stop,))))
    assert streamed == cut.text


def test_seed_makes_sampling_repeatable(tiny_engine):
    def sample(seed):
        return tiny_engine.generate(ask("The", max_tokens=30, temperature=1.0, seed=seed,
                                        ignore_eos=True)).text
    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_top_k_of_one_is_greedy(tiny_engine):
    greedy = tiny_engine.generate(ask("Paged", max_tokens=15, ignore_eos=True)).text
    top1 = tiny_engine.generate(ask("Paged", max_tokens=15, temperature=1.5, top_k=1, seed=1,
                                    ignore_eos=True)).text
    nucleus = tiny_engine.generate(ask("Paged", max_tokens=15, temperature=1.0, top_p=1e-6,
                                       seed=2, ignore_eos=True)).text
    assert greedy == top1 == nucleus


def test_a_prompt_longer_than_the_context_is_refused_up_front(tiny_engine):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    with pytest.raises(RequestError, match="context is 256 tokens") as info:
        tiny_engine.stream(ask(long_prompt, max_tokens=8))
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "prompt"


def test_concurrent_requests_never_interleave(tiny_engine):
    prompts = ["The quick", "def add", "Agents call", "Paged attention"]
    expected = {p: tiny_engine.generate(ask(p, max_tokens=24, ignore_eos=True)).text
                for p in prompts}
    results: dict[str, str] = {}

    def run(prompt):
        results[prompt] = "".join(
            e.delta for e in tiny_engine.stream(ask(prompt, max_tokens=24, ignore_eos=True)))

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected


def test_closing_a_stream_early_frees_the_engine(tiny_engine):
    events = tiny_engine.stream(ask("The quick", max_tokens=50, ignore_eos=True))
    next(events)
    events.close()
    done = threading.Event()
    threading.Thread(target=lambda: (tiny_engine.generate(ask("x", max_tokens=2)),
                                     done.set())).start()
    assert done.wait(timeout=30)


def test_chat_requests_use_the_gemma_turn_format(tiny_engine):
    request = CompletionRequest(messages=(Message("system", "Be brief."), Message("user", "Hi")),
                                sampling=SamplingParams(max_tokens=4))
    text = tiny_engine.tokenizer.decode(tiny_engine.encode(request))
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tiny_engine.generate(request).usage.prompt_tokens == len(tiny_engine.encode(request))


@pytest.mark.model
def test_matches_transformers_greedy_generate_past_the_sliding_window(engine):
    """A 700-token prompt crosses Gemma 3's 512-token sliding window: our loop must agree with
    transformers' own `generate` token for token."""
    from pydoc_data.topics import topics

    ids = engine.tokenizer(topics["assert"] + topics["for"])["input_ids"][:700]
    prompt = engine.tokenizer.decode(ids[1:])
    ours = engine.generate(ask(prompt, max_tokens=16, ignore_eos=True))
    prompt_ids = torch.tensor([engine.tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        reference = engine.model.generate(
            prompt_ids, max_new_tokens=16, do_sample=False,
            past_key_values=DynamicCache(config=engine.model.config))
    expected = engine.tokenizer.decode(reference[0, prompt_ids.shape[1]:],
                                       skip_special_tokens=True)
    assert ours.usage.prompt_tokens == prompt_ids.shape[1] > 512
    assert ours.text == expected


@pytest.mark.model
def test_the_embedded_model_knows_a_plain_fact(engine):
    completion = engine.generate(ask("The three primary colors are", max_tokens=12))
    assert "red" in completion.text
    assert completion.backend == "embedded" and completion.model == "gemma-3-270m"
    assert completion.timings.tokens_per_s > 0


def test_the_fast_argmax_is_torch_argmax():
    from pyagent.engine.sampling import first_max

    torch.manual_seed(0)
    for size in (262144, 1024, 1000, 512):
        for _ in range(20):
            logits = torch.randn(size)
            logits[torch.randint(0, size, (3,))] = 9.0  # ties: the first one wins
            assert first_max(logits) == int(torch.argmax(logits))
    logits = torch.randn(4096)
    logits[[700, 3000]] = float("nan")  # NaN counts as the largest, as in torch.argmax
    assert first_max(logits) == int(torch.argmax(logits)) == 700
    assert first_max(torch.randn(2048)[::2]) >= 0  # a strided view takes torch's path


def frequencies(sampler, logits: torch.Tensor, draws: int) -> torch.Tensor:
    counts = torch.zeros(logits.numel())
    for _ in range(draws):
        counts[sampler(logits)] += 1
    return counts / draws


def test_sampling_draws_from_the_softmax_without_sorting_the_vocabulary():
    from pyagent.engine.sampling import Sampler
    from pyagent.types import SamplingParams

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0, 0.0])
    seen = frequencies(Sampler(SamplingParams(temperature=0.8, seed=3)), logits, 20000)
    assert (seen - torch.softmax(logits / 0.8, -1)).abs().max() < 0.015
    again = Sampler(SamplingParams(temperature=0.8, seed=3))
    first = Sampler(SamplingParams(temperature=0.8, seed=3))
    assert [again(logits) for _ in range(50)] == [first(logits) for _ in range(50)]


def test_a_nucleus_found_among_the_likeliest_logits_is_the_one_a_full_sort_finds():
    from pyagent.engine.sampling import NUCLEUS_FIRST, Sampler
    from pyagent.types import SamplingParams

    torch.manual_seed(1)
    peaked = torch.randn(8000) * 2
    peaked[:5] += 12.0  # most of the mass on a few tokens, as a language model's
    flat = torch.randn(8000)  # the top 1,024 hold too little: the full sort decides
    for logits in (peaked, flat):
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=4)
        values, indices = Sampler(params)._nucleus_candidates(logits)
        ordered = torch.sort(logits, descending=True)
        assert torch.equal(indices, ordered.indices[:len(indices)])
        assert torch.equal(values, ordered.values[:len(values)])
        assert len(indices) == (NUCLEUS_FIRST if logits is peaked else 8000)
        nucleus = torch.cumsum(torch.softmax(ordered.values, -1), -1)
        keep = int(torch.searchsorted(nucleus, torch.tensor(0.9))) + 1
        seen = frequencies(Sampler(params), logits, 4000)
        assert seen[ordered.indices[keep:]].sum() == 0  # nothing outside the nucleus
        if logits is peaked:
            expected = torch.softmax(ordered.values[:keep], -1)
            assert (seen[ordered.indices[:keep]] - expected).abs().max() < 0.03
