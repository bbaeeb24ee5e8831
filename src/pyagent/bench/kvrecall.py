"""`pyagent bench kv-recall`: held-out landmark recall and continuation quality under KV eviction.

What a user of eviction experiences, measured on the embedded base model through the engine's own
API (`Engine.open`, `prefill`, `forward`, `logits`, `close`, `cache.memory`), every method against
the full cache in one run:

- Samples: N tokens of filler from a seeded place of the corpus (`kvtasks.corpus_text`), with K
  facts planted at seeded depths inside lines that look like an agent's tool outputs (a config
  read, a JSON result, a log line, a grep hit, ...). Each fact has a completion-style question
  whose target is " <number>"; names come from a generated vocabulary, numbers have 3-6 digits.
- Splits: `dev` (the seeds and templates used while tuning policies) and `test` (a disjoint seed
  range and a disjoint set of templates), so test results are held out by construction. Only
  templates the full cache answers are kept (checked on dev seeds).
- Protocols, per fact, both scored teacher-forced (exact when every answer token is the greedy
  choice; the answer's log-probability):
  - query_aware: context and question are prefilled together (`Engine.prefill` over the prompt
    without its last token) on an engine that evicts once the whole prompt is in
    (`prefill_eviction="prompt"`, so eviction sees the question; its peak is the whole prompt),
    then the last prompt token is forwarded, so the answer's first token is predicted after
    eviction;
  - query_agnostic: the context alone is prefilled and compressed, evicting after every chunk
    as the engine does by default (an agent's history between turns; the peak stays within the
    budget plus a chunk), then the question is prefilled onto it.
  With the full cache nothing is evicted and both protocols are one computation.
- continuation: mean NLL of the 128 corpus tokens that follow the filler, on the context
  compressed before them (query-agnostic), as a difference to the full cache in nats.
- Budgets are savings of total KV bytes (all layers, the sliding-window layers included) against
  the full cache's bytes for the same context: saving 0.4 keeps at most 60% of them. (Elsewhere,
  as in `bench kv`, a ratio budget is a share of the global layers' tokens.) A budget the engine
  refuses (below what the sliding-window layers hold, or below what a policy pins) is recorded as
  infeasible.
- Methods: the full cache and every registered policy; `name@dtype` keeps keys and values in
  `dtype` (`full@int8`: int8 storage alone; `pyagent@int8`: both; likewise `@int4`), so
  quantization and eviction meet the same byte budget together.
- Peak: every row records the most KV bytes its sequence held at once, and whether that stayed
  within the budget (the full cache's bytes for the full cache) plus one prefill chunk's KV.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from pyagent.bench.kv import answer_score, log_probs
from pyagent.bench.kvtasks import TaskBuilder, plant
from pyagent.bench.provenance import markdown_lines
from pyagent.bench.stats import bootstrap_ci
from pyagent.engine.eviction import POLICIES, Budget
from pyagent.engine.generate import KV_DTYPES, Engine, KVSettings
from pyagent.engine.kvcache import Sequence
from pyagent.engine.model import LoadedModel
from pyagent.errors import ConfigError, RequestError

CONTINUATION = 128  # scored tokens of natural text after the context
SEEDS_PER_RUN = 1000  # a split's sample seeds: first_seed + run_seed * SEEDS_PER_RUN + index
RUN_SEEDS = 1000
PROTOCOLS = ("query_aware", "query_agnostic")
MIB = 2**20


@dataclass(frozen=True)
class Template:
    """A fact inside a tool-output-like line, and the question that asks for its number: the
    answer's lead-in ends where the number follows, after `gap`.

    Fields: {name} and {other} (made-up names), {NAME} (name in capitals), {number}."""

    name: str
    fact: str
    question: str
    gap: str = " "

    def render(self, name: str, other: str, number: str) -> tuple[str, str]:
        fields = {"name": name, "NAME": name.upper(), "other": other, "number": number}
        return self.fact.format(**fields), self.question.format(**fields)


DEV_TEMPLATES = (
    Template("service_port", "[tool read_config] port for service {name}: {number}",
             "what port does service {name} use? Answer: [tool read_config] port for service "
             "{name}:"),
    Template("user_json", '[tool lookup_user] {{"user": "{name}", "id": {number}}}',
             'what is the id of user {name}? Answer: [tool lookup_user] {{"user": "{name}", '
             '"id":'),
    Template("worker_log", "2026-11-03 14:22:07 INFO worker {name} processed {number} jobs",
             "how many jobs did worker {name} process? Answer: worker {name} processed"),
    Template("grep_line", "[tool grep -n] src/{name}/core.py line {number}: def {other}(self):",
             "on which line of src/{name}/core.py is {other} defined? Answer: [tool grep -n] "
             "src/{name}/core.py line"),
    Template("ini_value", "[tool cat settings.ini] {name}_timeout = {number}",
             "what is {name}_timeout set to? Answer: [tool cat settings.ini] {name}_timeout ="),
    Template("env_var", "[tool env] export {NAME}_PORT={number}",
             "what is the value of {NAME}_PORT? Answer: [tool env] {NAME}_PORT=", gap=""),
    Template("test_run", "[tool run_tests] suite {name} (exit code 0): tests passed {number}",
             "how many tests passed in suite {name}? Answer: [tool run_tests] suite {name} "
             "(exit code 0): tests passed"),
    Template("version", "[tool {name} --version] {name} version 1.4.{number}",
             "which version of {name} is installed? Answer: [tool {name} --version] {name} "
             "version 1.4.", gap=""),
)
TEST_TEMPLATES = (
    Template("http_latency", "[tool http_get] GET /api/{name} -> 200 OK in {number} ms",
             "how long did GET /api/{name} take? Answer: [tool http_get] GET /api/{name} -> "
             "200 OK in"),
    Template("pid", "[tool ps] {name} running as pid {number}",
             "what is the pid of {name}? Answer: [tool ps] {name} running as pid"),
    Template("issue", "[tool fetch_issue] {name} crashes on start: see issue #{number}",
             "which issue is about {name} crashing on start? Answer: [tool fetch_issue] {name} "
             "crashes on start: see issue #", gap=""),
    Template("balance", "[tool query_db] account {name}, balance {number}",
             "what is the balance of account {name}? Answer: [tool query_db] account {name}, "
             "balance"),
    Template("line_count", "[tool count_lines] src/{name}.py has {number} lines",
             "how many lines are in src/{name}.py? Answer: [tool count_lines] src/{name}.py has"),
    Template("memory", "[tool top] {name} RSS: {number} KiB",
             "how much memory does {name} use? Answer: [tool top] {name} RSS:"),
    Template("order_json", '[tool get_order] {{"order": "{name}", "total": {number}}}',
             'what is the total of order {name}? Answer: [tool get_order] {{"order": "{name}", '
             '"total":'),
    Template("deploy", "[tool run] $ ./deploy.sh {name}\nexit code 0; deployed revision {number}",
             "which revision did deploy.sh {name} deploy? Answer: [tool run] deploy.sh {name} "
             "deployed revision"),
)


@dataclass(frozen=True)
class Split:
    """A range of sample seeds and the templates its samples use."""

    name: str
    first_seed: int
    templates: tuple[Template, ...]

    def seeds(self, run_seed: int, count: int) -> list[int]:
        """The seeds of a run's `count` samples (per context length)."""
        if not 0 <= run_seed < RUN_SEEDS:
            raise ConfigError(f"the run seed must be in 0..{RUN_SEEDS - 1}, got {run_seed}")
        if not 0 < count <= SEEDS_PER_RUN:
            raise ConfigError(f"samples must be in 1..{SEEDS_PER_RUN}, got {count}")
        start = self.first_seed + run_seed * SEEDS_PER_RUN
        return list(range(start, start + count))


SPLITS = {"dev": Split("dev", 0, DEV_TEMPLATES),
          "test": Split("test", RUN_SEEDS * SEEDS_PER_RUN, TEST_TEMPLATES)}


@dataclass(frozen=True)
class Fact:
    """One planted fact: its line spans context[start:end]; `target` is the number (after its
    template's gap)."""

    template: str
    number: str
    start: int
    end: int
    depth: float
    question: list[int]
    target: list[int]


@dataclass(frozen=True)
class RecallSample:
    """A context with planted facts, and the corpus text that follows its filler."""

    length: int
    seed: int
    context: list[int]
    facts: list[Fact]
    continuation: list[int]  # CONTINUATION + 1 tokens: the first is fed, the rest are scored


def made_up_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct pronounceable names (two or three consonant-vowel syllables)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")
                       for _ in range(rng.randint(2, 3)))
        if name not in names:
            names.append(name)
    return names


def build_sample(builder: TaskBuilder, split: Split, length: int, seed: int,
                 facts: int, decoys: int = 0) -> RecallSample:
    """A `length`-token context (BOS included) holding `facts` facts of the split's templates,
    and `decoys` more lines of the same shapes that no question asks for (an agent's history is
    full of ids and numbers nobody asks about again)."""
    rng = random.Random(f"kv-recall-{length}-{seed}")
    order = rng.sample(split.templates, len(split.templates))
    names = made_up_names(rng, 2 * (facts + decoys))
    lines, asked = [], []
    for i in range(facts + decoys):
        template = order[i % len(order)]
        digits = rng.randint(3, 6)
        number = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        fact, question = template.render(names[2 * i], names[2 * i + 1], number)
        lines.append(builder.ids(f"\n{fact}\n"))
        asked.append((template.name, number, builder.ids(f"\nQuestion: {question}"),
                      builder.ids(f"{template.gap}{number}")))
    filler = length - 1 - sum(map(len, lines))
    if filler < 1:
        raise ConfigError(f"{facts} facts do not fit in a {length}-token context")
    text = builder.haystack(rng, filler + CONTINUATION + 1)
    depths = [rng.random() for _ in lines]
    context, starts = plant(builder.bos, text[:filler], list(zip(depths, lines, strict=True)))
    planted = [Fact(name, number, start, start + len(line), depth, question, target)
               for (name, number, question, target), line, start, depth
               in zip(asked, lines, starts, depths, strict=True)][:facts]
    return RecallSample(length, seed, context, planted, text[filler:])


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: contexts per length, facts (asked) and decoys (never asked) per context,
    savings of total KV bytes."""

    lengths: tuple[int, ...]
    savings: tuple[float, ...]
    samples: int
    facts: int
    decoys: int = 8


QUICK = Plan(lengths=(1024,), savings=(0.2, 0.4), samples=1, facts=8, decoys=4)
FULL = Plan(lengths=(4096, 8192), savings=(0.4, 0.75), samples=4, facts=8, decoys=8)


def parse_lengths(text: str) -> tuple[int, ...]:
    """'4096,8192' -> (4096, 8192): context lengths in tokens."""
    try:
        lengths = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise ConfigError(f"--lengths must be token counts separated by commas: {text!r}") \
            from None
    if not all(n >= 256 for n in lengths):
        raise ConfigError(f"--lengths must each be at least 256 tokens: {text!r}")
    return lengths


def parse_savings(text: str) -> tuple[float, ...]:
    """'0.4,0.75' -> (0.4, 0.75); each a saving of total KV bytes in (0, 1)."""
    try:
        savings = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--savings must be numbers separated by commas: {text!r}") from None
    if not all(0 < s < 1 for s in savings):
        raise ConfigError(f"--savings must each be in (0, 1): {text!r}")
    return savings


def all_methods() -> tuple[str, ...]:
    """The full cache, then every registered eviction policy, then int8 storage alone and
    with PyAgent's policy (a method `name@dtype` keeps keys and values in `dtype`)."""
    return ("full", *POLICIES, "full@int8", "pyagent@int8")


def split_method(method: str) -> tuple[str, str]:
    """'pyagent@int8' -> ('pyagent', 'int8'); 'tova' -> ('tova', 'auto')."""
    policy, _, dtype = method.partition("@")
    return policy, dtype or "auto"


def parse_methods(text: str) -> tuple[str, ...]:
    """'tova,snapkv@int8' -> ('tova', 'snapkv@int8'), each a known policy and KV dtype."""
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in chosen if split_method(m)[0] not in ("full", *POLICIES)
               or split_method(m)[1] not in KV_DTYPES]
    if unknown or not chosen:
        raise ConfigError(f"unknown method {(unknown or [text])[0]!r}; choose from "
                          f"{', '.join(all_methods())}, or any of them @ a KV dtype "
                          f"({', '.join(KV_DTYPES)})")
    return chosen


@dataclass
class Row:
    """One measurement: a fact under a protocol, or the continuation, for one method and saving."""

    length: int
    seed: int
    method: str
    saving: float  # 0.0 for the full cache
    protocol: str  # query_aware, query_agnostic or continuation
    template: str  # the fact's template ("continuation" for the continuation)
    fact: int  # the fact's index in its sample (-1 for the continuation)
    depth: float | None
    status: str  # ok or infeasible
    full_bytes: int  # the full cache's KV for this context
    budget_bytes: int | None
    limit_bytes: int  # budget (full cache: its bytes) + one prefill chunk's KV
    kv_bytes: int | None = None  # held when scoring starts (after the last eviction)
    peak_bytes: int | None = None
    peak_bounded: bool | None = None
    exact: bool | None = None
    logprob: float | None = None
    nll: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Variant:
    """A method at a saving on one sample: makes its rows."""

    sample: RecallSample
    method: str
    saving: float
    full_bytes: int
    budget_bytes: int | None
    chunk_bytes: int

    def row(self, protocol: str, fact: Fact | None, status: str = "ok", **measured: Any) -> Row:
        row = Row(self.sample.length, self.sample.seed, self.method, self.saving, protocol,
                  fact.template if fact else "continuation", self.sample.facts.index(fact)
                  if fact else -1, fact.depth if fact else None, status, self.full_bytes,
                  self.budget_bytes, (self.budget_bytes or self.full_bytes) + self.chunk_bytes,
                  **measured)
        if row.peak_bytes is not None:
            row.peak_bounded = row.peak_bytes <= row.limit_bytes
        return row

    def infeasible(self, reason: str, protocols: tuple[str, ...] = PROTOCOLS) -> list[Row]:
        rows = [self.row(p, f, "infeasible", note=reason) for p in protocols
                for f in self.sample.facts]
        if "query_agnostic" in protocols:
            rows.append(self.row("continuation", None, "infeasible", note=reason))
        return rows


Measure = Callable[[Sequence], dict[str, Any]]


class RecallBench:
    """Runs a `Plan` of one split on the embedded model and collects rows."""

    def __init__(self, loaded: LoadedModel, plan: Plan, methods: tuple[str, ...] | None = None,
                 split: str = "test", run_seed: int = 0,
                 report: Callable[[str], None] = lambda _msg: None):
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose dev or test")
        self.loaded = loaded
        self.plan = plan
        # the full cache is always measured first: it is every method's reference
        self.methods = ("full", *dict.fromkeys(m for m in methods or all_methods()
                                               if m != "full"))
        self.split = SPLITS[split]
        self.run_seed = run_seed
        self.report = report
        self.builder = TaskBuilder(loaded.tokenizer)
        self.chunk = KVSettings().prefill_chunk

    def _engine(self, length: int, method: str = "full", budget: Budget | None = None,
                prefill_eviction: str = "chunk") -> Engine:
        """An engine for `length`-token contexts (room for a prompt, a fork's question and a
        chunk in flight)."""
        policy, dtype = split_method(method)
        return Engine(self.loaded, kv=KVSettings(
            policy=policy, budget=budget if policy != "full" else None, share_prefix=False,
            max_tokens=2 * (length + self.chunk), dtype=dtype,
            prefill_eviction=prefill_eviction))

    def _chunk_bytes(self, engine: Engine) -> int:
        """KV of one prefill chunk in all layers."""
        cache = engine.cache
        return sum(p.bytes_per_block for p in cache.pools.values()) // cache.block_size \
            * self.chunk

    # --- measurements on one sequence ---------------------------------------------------------

    def _ask(self, engine: Engine, sample: RecallSample, fact: Fact) -> Measure:
        """Prefill the question after what the sequence holds (evicting as the engine does),
        then forward the prompt's last token: the answer is predicted after eviction."""
        def measure(sequence: Sequence) -> dict[str, Any]:
            prompt = sample.context + fact.question
            engine.prefill(sequence, prompt[:-1])
            held = engine.cache.memory(sequence).bytes
            logp = log_probs(engine, engine.forward(sequence, [prompt[-1], *fact.target[:-1]]))
            exact, logprob = answer_score(logp, fact.target)
            return {"kv_bytes": held, "exact": exact, "logprob": logprob}
        return measure

    def _continue(self, engine: Engine, sample: RecallSample) -> Measure:
        """The continuation's mean NLL, forwarded onto the compressed context."""
        def measure(sequence: Sequence) -> dict[str, Any]:
            held = engine.cache.memory(sequence).bytes
            logp = log_probs(engine, engine.forward(sequence, sample.continuation[:-1]))
            target = torch.tensor(sample.continuation[1:])
            return {"kv_bytes": held,
                    "nll": float(-logp[torch.arange(len(target)), target].mean())}
        return measure

    def _row(self, engine: Engine, sequence: Sequence, variant: Variant, protocol: str,
             fact: Fact | None, measure: Measure) -> Row:
        """Measure on `sequence`, then close it; a budget the engine refuses makes an infeasible
        row."""
        try:
            measured = measure(sequence)
        except RequestError as exc:
            if exc.param != "kv_budget":
                raise
            return variant.row(protocol, fact, "infeasible", note=str(exc))
        finally:
            engine.close(sequence)
        return variant.row(protocol, fact, peak_bytes=sequence.peak_bytes, **measured)

    # --- protocols ----------------------------------------------------------------------------

    def _on_context(self, engine: Engine, base: Sequence, variant: Variant) -> list[Row]:
        """Query-agnostic: every question and the continuation on forks of the prefilled
        (compressed) context."""
        sample, fork = variant.sample, engine.cache.fork
        rows = [self._row(engine, fork(base), variant, "query_agnostic", fact,
                          self._ask(engine, sample, fact)) for fact in sample.facts]
        rows.append(self._row(engine, fork(base), variant, "continuation", None,
                              self._continue(engine, sample)))
        return rows

    def _compressed(self, engine: Engine, aware: Engine, variant: Variant) -> list[Row]:
        """Both protocols for one method at one budget: query-aware on `aware`, which evicts
        once the whole prompt, question included, is in (its peak is the whole prompt);
        query-agnostic on `engine`, which evicts after every prefill chunk."""
        sample = variant.sample
        rows = [self._row(aware, aware.open(sample.context + fact.question), variant,
                          "query_aware", fact, self._ask(aware, sample, fact))
                for fact in sample.facts]
        base = engine.open(sample.context)
        try:
            engine.prefill(base, sample.context)
        except RequestError as exc:
            engine.close(base)
            if exc.param != "kv_budget":
                raise
            return rows + variant.infeasible(str(exc), ("query_agnostic",))
        rows += self._on_context(engine, base, variant)
        engine.close(base)
        return rows

    def _sample(self, sample: RecallSample, full: Engine,
                engines: dict[tuple[str, int, str], Engine]) -> list[Row]:
        """The full cache, then every method at every saving, on one sample."""
        base = full.open(sample.context)
        full.prefill(base, sample.context)
        full_bytes = full.cache.memory(base).bytes
        variant = Variant(sample, "full", 0.0, full_bytes, None, self._chunk_bytes(full))
        rows = self._on_context(full, base, variant)
        rows += [replace(r, protocol="query_aware") for r in rows
                 if r.protocol == "query_agnostic"]
        for saving in self.plan.savings:
            budget = Budget(bytes=int((1 - saving) * full_bytes))
            for method in self.methods[1:]:
                self.report(f"{sample.length} tokens, sample {sample.seed}: {method} at "
                            f"-{saving:.0%} KV")
                variant = replace(variant, method=method, saving=saving,
                                  budget_bytes=budget.bytes)
                for mode in ("chunk", "prompt"):
                    if (method, budget.bytes, mode) not in engines:
                        engines[method, budget.bytes, mode] = self._engine(
                            sample.length, method, budget, mode)
                engine = engines[method, budget.bytes, "chunk"]
                try:  # the engine's own arithmetic: no budget below the sliding layers' KV
                    budget.global_tokens(engine.cache, base)
                except RequestError as exc:
                    rows += variant.infeasible(str(exc))
                    continue
                rows += self._compressed(engine, engines[method, budget.bytes, "prompt"],
                                         variant)
        full.close(base)
        return rows

    def run(self) -> dict[str, Any]:
        """Every length, sample, method and saving; the result as plain data."""
        rows: list[Row] = []
        seeds = {}
        for length in self.plan.lengths:
            seeds[length] = self.split.seeds(self.run_seed, self.plan.samples)
            full, engines = self._engine(length), {}
            for seed in seeds[length]:
                self.report(f"{length} tokens, sample {seed}: full cache")
                sample = build_sample(self.builder, self.split, length, seed, self.plan.facts,
                                      self.plan.decoys)
                rows += self._sample(sample, full, engines)
        data = [asdict(r) for r in rows]
        result = {"plan": asdict(self.plan), "split": self.split.name, "run_seed": self.run_seed,
                  "seeds": seeds, "templates": [t.name for t in self.split.templates],
                  "methods": list(self.methods), "prefill_chunk": self.chunk, "rows": data,
                  "summary": summarize(data), "template_recall": template_recall(data)}
        result["goals"] = goals(result)
        return result


# --- summaries and goals (plain data in, so a saved result renders the same) --------------------

def _pair_key(row: dict[str, Any]) -> tuple:
    return row["length"], row["seed"], row["protocol"], row["fact"]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length, saving, protocol and method: recall (or continuation NLL) with paired 95%
    intervals of the difference to the full cache, and KV bytes held, at peak and allowed."""
    full = {_pair_key(r): r for r in rows if r["method"] == "full"}
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["length"], row["saving"], row["protocol"], row["method"])].append(row)
    out = []
    for (length, saving, protocol, method), members in sorted(groups.items()):
        ok = [r for r in members if r["status"] == "ok"]
        refs = [full[_pair_key(r)] for r in ok]
        entry: dict[str, Any] = {
            "length": length, "saving": saving, "protocol": protocol, "method": method,
            "n": len(members), "feasible": len(ok),
            "full_bytes": max(r["full_bytes"] for r in members),
            "budget_bytes": max((r["budget_bytes"] or 0 for r in members), default=0) or None,
            "note": next((r["note"] for r in members if r["note"]), "")}
        if ok:
            entry["kv_bytes"] = max(r["kv_bytes"] for r in ok)
            entry["peak_bytes"] = max(r["peak_bytes"] for r in ok)
            entry["limit_bytes"] = max(r["limit_bytes"] for r in ok)
            entry["peak_bounded"] = all(r["peak_bounded"] for r in ok)
            if protocol == "continuation":
                entry["nll"] = statistics.fmean(r["nll"] for r in ok)
                entry["delta_nll"] = bootstrap_ci(
                    [r["nll"] - f["nll"] for r, f in zip(ok, refs, strict=True)])
            else:
                entry["recall"] = statistics.fmean(float(r["exact"]) for r in ok)
                entry["full_recall"] = statistics.fmean(float(f["exact"]) for f in refs)
                entry["delta_recall"] = bootstrap_ci(
                    [float(r["exact"]) - float(f["exact"]) for r, f in zip(ok, refs, strict=True)])
                entry["delta_logprob"] = bootstrap_ci(
                    [r["logprob"] - f["logprob"] for r, f in zip(ok, refs, strict=True)])
        out.append(entry)
    return out


def template_recall(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The full cache's recall per template: templates it cannot answer measure the model."""
    hits: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["method"] == "full" and row["protocol"] == "query_agnostic":
            hits[row["template"]].append(float(row["exact"]))
    return {name: {"n": len(v), "recall": statistics.fmean(v)} for name, v in sorted(hits.items())}


def _check(target: str, entry: dict[str, Any] | None, field_name: str,
           judge: Callable[[dict[str, Any]], tuple[bool, str]]) -> dict[str, Any]:
    if entry is None:
        return {"target": target, "measured": "not measured in this run", "met": False}
    if field_name not in entry:
        return {"target": target, "measured": f"infeasible: {entry['note']}", "met": False}
    met, measured = judge(entry)
    return {"target": target, "measured": measured, "met": met}


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals for PyAgent's policy, per context length, with a verdict each."""
    entries = {(e["length"], e["saving"], e["protocol"], e["method"]): e
               for e in result["summary"]}
    return [check for length in result["plan"]["lengths"]
            for check in _length_goals(entries, length)]


def _length_goals(entries: dict[tuple, dict[str, Any]], length: int) -> list[dict[str, Any]]:
    def ours(saving: float, protocol: str) -> dict[str, Any] | None:
        return entries.get((length, saving, protocol, "pyagent"))

    rivals = [e for (n, s, p, m), e in entries.items() if n == length and s == 0.4
              and p == "query_aware" and m not in ("full", "pyagent") and "recall" in e]
    best = max(rivals, key=lambda e: e["recall"], default=None)

    def beats_best(e: dict[str, Any]) -> tuple[bool, str]:
        if best is None:
            return True, f"pyagent {e['recall']:.0%}; no feasible baseline"
        return (e["recall"] >= best["recall"],
                f"pyagent {e['recall']:.0%}; {best['method']} {best['recall']:.0%}")

    def share_of_full(share: float) -> Callable[[dict[str, Any]], tuple[bool, str]]:
        return lambda e: (e["recall"] >= share * e["full_recall"],
                          f"{e['recall']:.0%} vs {e['full_recall']:.0%}")

    def small_loss(e: dict[str, Any]) -> tuple[bool, str]:
        mean, low, high = e["delta_nll"]
        return mean <= 0.02, f"{mean:+.3f} nats [{low:+.3f}, {high:+.3f}]"

    prefix = f"{length} tokens, -40% KV"
    return [
        _check(f"{prefix}, query-aware: recall >= the best baseline's",
               ours(0.4, "query_aware"), "recall", beats_best),
        _check(f"{prefix}, query-aware: recall >= 95% of the full cache's",
               ours(0.4, "query_aware"), "recall", share_of_full(0.95)),
        _check(f"{prefix}, query-agnostic: recall >= 90% of the full cache's",
               ours(0.4, "query_agnostic"), "recall", share_of_full(0.90)),
        _check(f"{prefix}: continuation NLL loss <= 0.02 nats",
               ours(0.4, "continuation"), "delta_nll", small_loss),
        _check(f"{length} tokens, -75% KV: continuation NLL loss <= 0.02 nats",
               ours(0.75, "continuation"), "delta_nll", small_loss)]


# --- rendering ----------------------------------------------------------------------------------

COLUMNS = ("method", "query-aware recall", "Δ vs full [95% CI]", "query-agnostic recall",
           "Δ vs full [95% CI]", "ΔNLL nats [95% CI]", "held MiB", "peak MiB",
           "peak <= budget + chunk", "query-aware peak MiB")


def _recall(entry: dict[str, Any] | None) -> tuple[str, str]:
    if entry is None:
        return "", ""
    if "recall" not in entry:
        return "infeasible", ""
    hits = round(entry["recall"] * entry["feasible"])
    shown = f"{entry['recall']:.0%} ({hits}/{entry['feasible']})"
    if entry["method"] == "full":
        return shown, "reference"
    mean, low, high = entry["delta_recall"]
    return shown, f"{mean:+.0%} [{low:+.0%}, {high:+.0%}]"


def _delta_nll(entry: dict[str, Any] | None) -> str:
    if entry is None or "delta_nll" not in entry:
        return "" if entry is None else "infeasible"
    if entry["method"] == "full":
        return f"reference ({entry['nll']:.3f})"
    mean, low, high = entry["delta_nll"]
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def table(result: dict[str, Any], length: int, saving: float) -> list[list[str]]:
    """Rows of the table for one length and saving (the full cache first), cells as text."""
    entries = {(e["protocol"], e["method"]): e for e in result["summary"]
               if e["length"] == length and e["saving"] == (0.0 if e["method"] == "full"
                                                            else saving)}
    out = []
    for method in result["methods"]:
        mine = [entries.get((p, method)) for p in (*PROTOCOLS, "continuation")]
        # held and peak under compression before the question (eviction after every chunk);
        # query-aware compression holds the whole prompt until the question is in
        feasible = [e for e in mine[1:] if e is not None and "peak_bytes" in e]
        held = max((e["kv_bytes"] for e in feasible), default=None)
        peak = max((e["peak_bytes"] for e in feasible), default=None)
        bounded = "" if not feasible else "yes" if all(e["peak_bounded"] for e in feasible) \
            else "NO"
        aware = mine[0]["peak_bytes"] if mine[0] and "peak_bytes" in mine[0] else None
        out.append([method, *_recall(mine[0]), *_recall(mine[1]), _delta_nll(mine[2]),
                    "" if held is None else f"{held / MIB:.1f}",
                    "" if peak is None else f"{peak / MIB:.1f}", bounded,
                    "" if aware is None else f"{aware / MIB:.1f}"])
    return out


def sections(result: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """(heading, table rows) per length and saving."""
    out = []
    for length in result["plan"]["lengths"]:
        full = next(e for e in result["summary"] if e["length"] == length)["full_bytes"]
        for saving in result["plan"]["savings"]:
            budget = (1 - saving) * full
            out.append((f"{length} tokens, -{saving:.0%} total KV (budget {budget / MIB:.1f} "
                        f"MiB of the full cache's {full / MIB:.1f} MiB)",
                        table(result, length, saving)))
    return out


def markdown(result: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    split = SPLITS[result["split"]]
    seeds = [s for per_length in result["seeds"].values() for s in per_length]
    lines = ["# KV eviction: held-out landmark recall and quality", "",
             f"- split: {result['split']} (seeds {min(seeds)}..{max(seeds)}, run seed "
             f"{result['run_seed']}; templates {', '.join(t.name for t in split.templates)})",
             f"- facts per context: {result['plan']['facts']}; contexts per length: "
             f"{result['plan']['samples']}",
             "- budgets: savings of total KV bytes (all layers) against the full cache; peak "
             f"bound: budget + one {result['prefill_chunk']}-token prefill chunk's KV",
             *markdown_lines(result.get("meta")),
             "", "## Goals (PyAgent's policy)", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['target']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |"
              for g in result["goals"]]
    for heading, rows in sections(result):
        lines += ["", f"## {heading}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Full cache recall per template", "", "| template | facts | recall |",
              "|---|---|---|"]
    lines += [f"| {name} | {v['n']} | {v['recall']:.0%} |"
              for name, v in result["template_recall"].items()]
    return "\n".join(lines) + "\n"
