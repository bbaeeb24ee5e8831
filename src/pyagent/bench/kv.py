"""`pyagent bench kv`: every eviction method side by side on the embedded model, in one run.

For each sample the context is prefilled once (with attention statistics), then forked for every
method and budget: the fork is evicted and scored, so all methods see identical inputs (paired
samples). Budgets are the share of the context's global-layer tokens kept; each row also records
the KV bytes actually held, next to transformers' own hybrid cache for the same context.

Scores, per sample:
- continuation (natural text): mean NLL of the continuation and KL(full || method) per token;
- passkey, multi-key needles, variable tracking: exact match under greedy decoding (every answer
  token is the model's top choice) and the answer's log-probability;
- reasoning replay: a chain generated with the full cache is replayed with eviction every
  `interval` tokens; top-1 agreement and KL per step, then probes of facts stated at the start.
A sample's quality is in [0, 1] relative to the full cache (exp of minus the NLL increase; the
answer probability ratio, capped at 1; top-1 agreement); a method's averaged score is the mean
over tasks of the mean quality.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from pyagent.bench.kvtasks import WORDS, Sample, TaskBuilder
from pyagent.bench.stats import bootstrap_ci
from pyagent.engine.eviction import Budget, evict, make_policy
from pyagent.engine.generate import Engine, KVSettings
from pyagent.engine.kvcache import Sequence
from pyagent.engine.model import LoadedModel
from pyagent.errors import ConfigError
from pyagent.types import CompletionRequest, SamplingParams

PREFILL_CHUNK = 512
LOGIT_ROWS = 32  # positions per LM-head pass (each is 262,144 floats)


def log_probs(engine: Engine, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities after each hidden state ([n, hidden] -> [n, vocab]),
    `LOGIT_ROWS` positions per LM-head pass."""
    rows = [torch.log_softmax(engine.logits(hidden[i:i + LOGIT_ROWS]).float(), -1)
            for i in range(0, hidden.shape[0], LOGIT_ROWS)]
    return torch.cat(rows)


def answer_score(logp: torch.Tensor, answer: list[int]) -> tuple[bool, float]:
    """Teacher-forced scores of `answer` from its positions' log-probabilities: whether every
    token is the greedy choice, and the answer's log-probability."""
    target = torch.tensor(answer)
    return (bool((logp.argmax(-1) == target).all()),
            float(logp[torch.arange(len(target)), target].sum()))


@dataclass(frozen=True)
class Method:
    """An eviction policy under a protocol: query-agnostic (evict, then the question arrives) or
    query-aware (the question is in the cache when eviction runs)."""

    label: str
    policy: str
    query_aware: bool = False


METHODS = (
    Method("full", "full"),
    Method("pyagent", "pyagent"),
    Method("streaming_llm", "streaming_llm"),
    Method("h2o", "h2o"),
    Method("tova", "tova"),
    Method("snapkv", "snapkv"),
    Method("snapkv_query_aware", "snapkv", query_aware=True),
    Method("random", "random"),
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    lengths: tuple[int, ...]
    ratios: tuple[float, ...]
    continuation_samples: int
    continuation_tokens: int
    passkey_depths: tuple[float, ...]
    passkey_samples: int
    multikey_samples: int
    vartrack_hops: tuple[int, ...]
    replay_context: int
    replay_tokens: int
    replay_interval: int
    speed_tokens: int
    speed_context: int
    speed_repeats: int
    prefix_tokens: int


QUICK = Plan(lengths=(1024,), ratios=(0.5, 0.25), continuation_samples=1, continuation_tokens=32,
             passkey_depths=(0.5,), passkey_samples=1, multikey_samples=1, vartrack_hops=(2,),
             replay_context=512, replay_tokens=64, replay_interval=32, speed_tokens=32,
             speed_context=512, speed_repeats=1, prefix_tokens=1024)
FULL = Plan(lengths=(2048, 4096, 8192), ratios=(0.75, 0.5, 0.35, 0.25, 0.1),
            continuation_samples=6, continuation_tokens=128,
            passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_samples=1, multikey_samples=4,
            vartrack_hops=(1, 2, 3, 4), replay_context=2048, replay_tokens=512,
            replay_interval=64, speed_tokens=64, speed_context=2048, speed_repeats=3,
            prefix_tokens=1024)


@dataclass
class Row:
    """One (sample, method, budget) measurement."""

    task: str
    length: int
    sample: str
    method: str
    ratio: float
    kept_tokens: int
    kv_bytes: int
    quality: float
    nll: float | None = None
    kl: float | None = None
    exact: bool | None = None
    answer_logprob: float | None = None
    top1: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class KVBench:
    """Runs a `Plan` on one engine and collects rows."""

    def __init__(self, loaded: LoadedModel, plan: Plan, methods: tuple[Method, ...] = METHODS,
                 report: Callable[[str], None] = lambda _msg: None):
        if not methods or methods[0].policy != "full":
            raise ConfigError("the KV benchmark needs the full cache as its first method")
        # No prefix sharing across samples: a shared prefix would carry no attention statistics.
        self.engine = Engine(loaded, kv=KVSettings(share_prefix=False))
        self.plan = plan
        self.methods = methods
        self.report = report
        self.builder = TaskBuilder(loaded.tokenizer)
        self.window = max((m.window for m in map(make_policy, {x.policy for x in methods}) if m),
                          default=0)

    # --- primitives ---------------------------------------------------------------------------

    def _prefill(self, sequence: Sequence, tokens: list[int]) -> torch.Tensor:
        hidden = [self.engine.forward(sequence, tokens[i:i + PREFILL_CHUNK], collect=True,
                                      window=self.window)
                  for i in range(0, len(tokens), PREFILL_CHUNK)]
        return torch.cat(hidden)

    def _evict(self, sequence: Sequence, method: Method, keep: int, seed: int) -> None:
        policy = make_policy(method.policy)
        if policy is None:
            return
        if method.policy == "random":
            policy.generator.manual_seed(seed)
        evict(self.engine.cache, sequence, policy, keep)

    def _variants(self) -> list[tuple[Method, float]]:
        return [(m, 1.0) if m.policy == "full" else (m, r) for m in self.methods
                for r in (self.plan.ratios if m.policy != "full" else (1.0,))]

    # --- long-context samples -----------------------------------------------------------------

    def score(self, sample: Sample, name: str) -> list[Row]:
        """Every method and budget on one sample (the full cache first, as the reference)."""
        cache = self.engine.cache
        base = self.engine.open(sample.context)
        self._prefill(base, sample.context)
        reference: torch.Tensor | None = None
        rows = []
        for method, ratio in self._variants():
            sequence = cache.fork(base)
            keep = max(1, math.floor(ratio * len(sample.context)))
            feed = sample.query + sample.target[:-1]
            if method.query_aware:
                hidden_query = self._prefill(sequence, sample.query)
                self._evict(sequence, method, keep, seed=zlib.crc32(name.encode()))
                hidden = torch.cat([hidden_query[-1:],
                                    self._prefill(sequence, sample.target[:-1])])
            else:
                self._evict(sequence, method, keep, seed=zlib.crc32(name.encode()))
                hidden = self._prefill(sequence, feed)[len(sample.query) - 1:]
            kept = sequence.tables["global"].tokens(cache.block_size)
            kv_bytes = cache.memory(sequence).bytes
            cache.release(sequence)
            logp = log_probs(self.engine, hidden)
            target = torch.tensor(sample.target)
            picked = logp[torch.arange(len(target)), target]
            if reference is None:
                reference = logp
            kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
            ref_picked = reference[torch.arange(len(target)), target]
            row = Row(sample.task, sample.length, name, method.label, ratio, kept, kv_bytes,
                      quality=0.0, kl=kl, detail=sample.detail)
            if sample.task == "continuation":
                row.nll = float(-picked.mean())
                row.quality = math.exp(-max(0.0, row.nll + float(ref_picked.mean())))
            else:
                row.exact = bool((logp.argmax(-1) == target).all())
                row.answer_logprob = float(picked.sum())
                row.quality = math.exp(min(0.0, row.answer_logprob - float(ref_picked.sum())))
            rows.append(row)
        cache.release(base)
        return rows

    def samples(self) -> list[tuple[str, Sample]]:
        p, b = self.plan, self.builder
        out = []
        for length in p.lengths:
            out += [(f"cont-{length}-{i}", b.continuation(length, p.continuation_tokens, i))
                    for i in range(p.continuation_samples)]
            out += [(f"passkey-{length}-{d}-{i}", b.passkey(length, d, i))
                    for d in p.passkey_depths for i in range(p.passkey_samples)]
            out += [(f"multikey-{length}-{i}", b.multikey(length, 4, i))
                    for i in range(p.multikey_samples)]
            out += [(f"vartrack-{length}-{h}", b.variable_tracking(length, h, h))
                    for h in p.vartrack_hops]
        return out

    # --- reasoning replay ---------------------------------------------------------------------

    def replay(self, seed: int = 0) -> list[Row]:
        """Generate a chain with the full cache, replay it under each method with decode-time
        eviction, and probe facts stated at the very start."""
        p, b, engine, cache = self.plan, self.builder, self.engine, self.engine.cache
        rng = random.Random(f"replay-{seed}")
        word, number = rng.choice(WORDS), str(rng.randrange(10000, 100000))
        facts = b.ids(f"Project notes. The codename is {word}. The budget code is {number}.\n\n")
        start = rng.randrange(0, len(b.corpus) - p.replay_context)
        prompt = [b.bos, *facts, *b.corpus[start:start + p.replay_context - len(facts) - 1]]
        base = engine.open(prompt)
        last = self._prefill(base, prompt)[-1]
        generator = cache.fork(base)
        chain = []
        logits = engine.logits(last)
        for _ in range(p.replay_tokens):
            chain.append(int(logits.argmax()))
            logits = engine.logits(engine.forward(generator, [chain[-1]])[-1])
        cache.release(generator)
        probes = [("codename", b.ids("\nQuestion: what is the codename? Answer: The codename is"),
                   b.ids(f" {word}")),
                  ("budget", b.ids("\nQuestion: what is the budget code? Answer: The budget code "
                                   "is"), b.ids(f" {number}"))]
        variants = self._variants()
        sequences = [cache.fork(base) for _ in variants]
        for (method, ratio), sequence in zip(variants, sequences, strict=True):
            self._evict(sequence, method, max(1, math.floor(ratio * sequence.length)), seed)
        agree = [[] for _ in variants]
        kls = [[] for _ in variants]
        interval = p.replay_interval
        reference: torch.Tensor | None = None
        for begin in range(0, len(chain), interval):
            piece = chain[begin:begin + interval]
            targets = torch.tensor(chain[begin + 1:begin + interval + 1])
            for i, ((method, ratio), sequence) in enumerate(zip(variants, sequences,
                                                                strict=True)):
                logp = log_probs(self.engine, self._prefill(sequence, piece))[:len(targets)]
                if i == 0:
                    reference = logp
                assert reference is not None
                agree[i] += (logp.argmax(-1) == reference.argmax(-1)).tolist()
                kls[i] += (reference.exp() * (reference - logp)).sum(-1).tolist()
                self._evict(sequence, method, max(1, math.floor(ratio * sequence.length)), seed)
        rows = []
        for i, ((method, ratio), sequence) in enumerate(zip(variants, sequences, strict=True)):
            probe_detail = {}
            for label, question, answer in probes:
                fork = cache.fork(sequence)
                hidden = self._prefill(fork, question + answer[:-1])[len(question) - 1:]
                cache.release(fork)
                exact, logprob = answer_score(log_probs(self.engine, hidden), answer)
                probe_detail[label] = {"logprob": logprob, "exact": exact}
            top1 = statistics.fmean(agree[i])
            rows.append(Row("replay", len(prompt) + len(chain), f"replay-{seed}", method.label,
                            ratio, sequence.tables["global"].tokens(cache.block_size),
                            cache.memory(sequence).bytes, quality=top1,
                            kl=statistics.fmean(kls[i]), top1=top1,
                            detail={"probes": probe_detail, "peak_bytes": sequence.peak_bytes}))
            cache.release(sequence)
        cache.release(base)
        return rows

    # --- transformers' own cache, speed and prefix sharing ------------------------------------

    def hf_cache_bytes(self, length: int) -> int:
        """Bytes transformers' hybrid DynamicCache holds after a `length`-token prefill."""
        ids = self.builder.continuation(length, 1, 0).context
        cache = DynamicCache(config=self.engine.model.config)
        with torch.inference_mode():
            self.engine.model(input_ids=torch.tensor([ids]), past_key_values=cache,
                              use_cache=True, logits_to_keep=1)
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    def speed(self) -> dict[str, Any]:
        """Decode tokens/s after a long prompt: transformers' cache, the paged cache without
        eviction, and with PyAgent's policy evicting every 64 tokens at a 0.5 budget."""
        p, engine = self.plan, self.engine
        prompt = self.builder.continuation(p.speed_context, 1, 7).context
        text = engine.tokenizer.decode(prompt[1:])
        request = CompletionRequest(prompt=text, sampling=SamplingParams(
            max_tokens=p.speed_tokens, ignore_eos=True))
        engines = {
            "paged": Engine(engine.loaded, kv=KVSettings(share_prefix=False)),
            "paged+pyagent": Engine(engine.loaded, kv=KVSettings(
                share_prefix=False, policy="pyagent", budget=Budget(ratio=0.5))),
        }
        results: dict[str, list[float]] = {"transformers": [], **{k: [] for k in engines}}
        for _ in range(p.speed_repeats):
            results["transformers"].append(self._hf_decode_speed(prompt, p.speed_tokens))
            for label, variant in engines.items():
                results[label].append(variant.generate(request).timings.tokens_per_s)
        medians = {k: statistics.median(v) for k, v in results.items()}
        return {"context_tokens": len(prompt), "decode_tokens": p.speed_tokens,
                "tokens_per_s": results, "median_tokens_per_s": medians,
                "policy_over_paged": medians["paged+pyagent"] / medians["paged"],
                "policy_over_transformers": medians["paged+pyagent"] / medians["transformers"]}

    def _hf_decode_speed(self, prompt: list[int], tokens: int) -> float:
        model = self.engine.model
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            start = time.perf_counter()
            for _ in range(tokens - 1):
                out = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
                token = int(out.logits[0, -1].argmax())
        return (tokens - 1) / (time.perf_counter() - start)

    def prefix_sharing(self) -> dict[str, Any]:
        """A second agent request whose first `prefix_tokens` tokens another request already
        computed: tokens prefilled and time to first token, with and without sharing."""
        b, size = self.builder, self.plan.prefix_tokens
        shared_text = self.engine.tokenizer.decode(b.continuation(size, 1, 11).context[1:])
        first = shared_text + "\n\nAgent 1: list the functions defined above."
        second = shared_text + "\n\nAgent 2: summarize the text above in one sentence."
        out = {}
        for label, share in (("shared", True), ("unshared", False)):
            engine = Engine(self.engine.loaded, kv=KVSettings(share_prefix=share))
            sampling = SamplingParams(max_tokens=1)
            engine.generate(CompletionRequest(prompt=first, sampling=sampling))
            done = engine.generate(CompletionRequest(prompt=second, sampling=sampling))
            out[label] = {"prompt_tokens": done.usage.prompt_tokens,
                          "cached_tokens": done.usage.cached_tokens,
                          "prefilled_tokens": done.usage.prompt_tokens - done.usage.cached_tokens,
                          "ttft_s": done.timings.time_to_first_token_s}
        out["prefill_reduction"] = (out["unshared"]["prefilled_tokens"]
                                    / out["shared"]["prefilled_tokens"])
        out["ttft_speedup"] = out["unshared"]["ttft_s"] / out["shared"]["ttft_s"]
        return out

    # --- the whole run ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        rows: list[Row] = []
        samples = self.samples()
        for index, (name, sample) in enumerate(samples, 1):
            self.report(f"sample {index}/{len(samples)}: {name}")
            rows += self.score(sample, name)
        self.report("reasoning replay")
        rows += self.replay()
        self.report("transformers' cache sizes")
        hf_bytes = {length: self.hf_cache_bytes(length) for length in self.plan.lengths}
        self.report("decode speed")
        speed = self.speed()
        self.report("prefix sharing")
        prefix = self.prefix_sharing()
        return {"plan": asdict(self.plan), "methods": [asdict(m) for m in self.methods],
                "rows": [asdict(r) for r in rows], "hf_cache_bytes": hf_bytes,
                "summary": summarize(rows, hf_bytes), "speed": speed,
                "prefix_sharing": prefix}


def summarize(rows: list[Row], hf_bytes: dict[int, int]) -> list[dict[str, Any]]:
    """Per method and budget: the averaged score, per-task means with paired 95% intervals of the
    difference to the full cache, and KV bytes against transformers' cache."""
    full = {(r.task, r.sample): r for r in rows if r.method == "full"}
    groups: dict[tuple[str, float], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.ratio), []).append(row)
    out = []
    for (method, ratio), members in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        tasks: dict[str, dict[str, Any]] = {}
        for task in sorted({r.task for r in members}):
            mine = [r for r in members if r.task == task]
            refs = [full[(r.task, r.sample)] for r in mine]
            entry = {"n": len(mine), "quality": statistics.fmean(r.quality for r in mine)}
            if task == "continuation":
                entry["delta_nll"] = bootstrap_ci([r.nll - f.nll for r, f in
                                                   zip(mine, refs, strict=True)])
                entry["kl"] = statistics.fmean(r.kl for r in mine)
            elif task == "replay":
                entry["top1"] = statistics.fmean(r.top1 for r in mine)
                entry["kl"] = statistics.fmean(r.kl for r in mine)
            else:
                entry["exact"] = statistics.fmean(float(r.exact) for r in mine)
                entry["exact_full"] = statistics.fmean(float(f.exact) for f in refs)
                entry["delta_logprob"] = bootstrap_ci(
                    [r.answer_logprob - f.answer_logprob for r, f in zip(mine, refs, strict=True)])
            tasks[task] = entry
        by_length = {}
        for length in sorted({r.length for r in members if r.task != "replay"}):
            held = [r.kv_bytes for r in members if r.length == length and r.task != "replay"]
            mean = statistics.fmean(held)
            by_length[length] = {"kv_bytes": mean, "hf_bytes": hf_bytes.get(length),
                                 "saving": 1 - mean / hf_bytes[length] if length in hf_bytes
                                 else None}
        out.append({"method": method, "ratio": ratio, "score":
                    statistics.fmean(t["quality"] for t in tasks.values()),
                    "tasks": tasks, "memory": by_length})
    return out
