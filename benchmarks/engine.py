"""Engine benchmark: PyAgent's embedded engine in each precision, with and without speculative
decoding, and llama.cpp on the same GGUF (plain, and with its prompt-lookup drafts) when installed.

    .venv/bin/python benchmarks/engine.py [--quick] [--repeats N] [--threads N]

The parent process builds prompts from Python's own documentation (`pydoc_data.topics`) and from
the repair suite's held-out programs, then runs each engine `repeats` times, alternating, each
time in a fresh worker process (`--worker NAME`) so that load time and peak RSS belong to one
engine and one load. A worker loads the model, runs every request once (the first one is a
warm-up) and prints one JSON object. Requests:
- `short`, `prefill-N`: time to first token;
- `decode`: greedy continuation of a ~560-token documentation prompt, 128 tokens;
- `rewrite`: an agent's file rewrite: a buggy program, then the whole file again with the fix
  (greedy, until the closing fence or 400 tokens), over 4 programs of the repair suite's test
  split. Its decode speed is every generated token after each request's first over their time.
`PyAgent int8 (no cache)` deletes the converted-weight cache before loading (load time and peak
RSS of a first load). The texts of `PyAgent int8` and `PyAgent auto` (int8 and prompt-lookup
drafts) are compared: greedy speculation must not change a token. Figures are the median, min
and max over the workers; every raw sample is kept in `benchmarks/results/engine.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import util
from itertools import islice
from pathlib import Path
from typing import Any

from pyagent.bench.provenance import command, cpuinfo, git_state, machine, version, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENGINES = {"embedded": "PyAgent float32", "embedded-int8": "PyAgent int8",
           "embedded-int8-cold": "PyAgent int8 (no cache)",
           "embedded-bf16": "PyAgent bf16-weights", "embedded-auto": "PyAgent auto",
           "llamacpp": "llama.cpp", "llamacpp-lookup": "llama.cpp + lookup"}
# precision and draft tokens per step of each PyAgent worker ("auto": the defaults)
EMBEDDED = {"embedded": ("float32", 0), "embedded-int8": ("int8", 0),
            "embedded-int8-cold": ("int8", 0), "embedded-bf16": ("bf16-weights", 0),
            "embedded-auto": ("auto", None)}
LOAD_ONLY = ("embedded-int8-cold",)  # workers that measure loading alone
LLAMACPP_CONTEXT = 4096
LOOKUP_TOKENS = 8  # llama.cpp's prompt-lookup draft, as many tokens as PyAgent drafts
REWRITES = 4  # programs in the rewrite workload
FENCE = "```"


@dataclass(frozen=True)
class Request:
    """One measured request: a prompt of about `tokens` tokens, then `max_tokens` generated."""

    name: str
    tokens: int
    max_tokens: int
    prompt: str = ""
    stop: str = ""  # a rewrite ends at its closing fence


@dataclass(frozen=True)
class Run:
    """What one request took, as the engine under test reports it."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    text: str = ""
    draft_tokens: int = 0
    accepted_tokens: int = 0


def requests(quick: bool) -> list[Request]:
    """The requests every worker runs, in order; the first warms the engine up."""
    prefill = (512,) if quick else (512, 2048)
    return [
        Request("warmup", 16, 2),
        Request("short", 16, 1),
        *(Request(f"prefill-{n}", n, 1) for n in prefill),
        Request("decode", 560, 16 if quick else 128),
    ]


def with_prompts(plan: list[Request], tokenizer: Any) -> list[Request]:
    """Give each request its own consecutive slice of the corpus (no shared prefixes)."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[key] for key in sorted(topics)),
                    add_special_tokens=False)["input_ids"]
    out, start = [], 0
    for request in plan:
        end = start + request.tokens - 1  # the tokenizer adds a BOS token
        out.append(Request(request.name, request.tokens, request.max_tokens,
                           tokenizer.decode(ids[start:end])))
        start = end
    return out + rewrites(tokenizer, 1 if len(plan) < 5 else REWRITES)


def rewrites(tokenizer: Any, count: int) -> list[Request]:
    """The agent workload: a held-out buggy program, then the whole file again, fixed."""
    from pyagent.bench.suites.repair import RepairSuite

    items = RepairSuite().items("test", 1, seed=1)[::3][:count]
    out = []
    for i, item in enumerate(items):
        path, text = next((p, t) for p, t in sorted(item.files.items()) if p.startswith("src/"))
        prompt = (f"Task: {item.task}\n\n### {path} (before)\n{FENCE}python\n{text}{FENCE}\n\n"
                  f"### {path} (after: the whole file, fixed)\n{FENCE}python\n")
        tokens = len(tokenizer(prompt)["input_ids"])
        out.append(Request(f"rewrite-{i}", tokens, 400, prompt, FENCE))
    return out


# --- workers: one engine, one load, every request once --------------------------------------


def embedded_worker(name: str, threads: int
                    ) -> tuple[float, Callable[[Request], Run], dict[str, Any]]:
    """Load the embedded engine; return load time, a request runner and its settings."""
    import torch

    from pyagent.engine import avx512, converted
    from pyagent.engine.generate import Engine
    from pyagent.engine.model import prepare
    from pyagent.engine.quantize import layout
    from pyagent.engine.registry import EMBEDDED as MODEL
    from pyagent.engine.scheduler import SchedulerSettings
    from pyagent.engine.speculation import SpeculationSettings
    from pyagent.types import CompletionRequest, SamplingParams

    torch.set_num_threads(threads)
    dtype, drafts = EMBEDDED[name]
    if name in LOAD_ONLY:
        cached = converted.converted_path(prepare(MODEL), layout("int8"))
        cached.unlink(missing_ok=True)
    scheduling = SchedulerSettings() if drafts is None else SchedulerSettings(
        speculation=SpeculationSettings(draft_tokens=drafts))
    start = time.perf_counter()
    engine = Engine.load(dtype=dtype, scheduling=scheduling)
    load_s = time.perf_counter() - start

    def run(request: Request) -> Run:
        sampling = SamplingParams(max_tokens=request.max_tokens, ignore_eos=not request.stop,
                                  stop=(request.stop,) if request.stop else ())
        engine.cache.clear_prefix_cache()  # every request starts cold, as in llama.cpp
        done = engine.generate(CompletionRequest(prompt=request.prompt, sampling=sampling))
        t = done.timings
        return Run(done.usage.prompt_tokens, done.usage.completion_tokens,
                   t.time_to_first_token_s, t.total_s, done.text, t.draft_tokens,
                   t.accepted_tokens)

    scheduler = engine.scheduler
    settings = {"precision": engine.loaded.precision, "chosen": engine.loaded.chosen,
                "draft_tokens": scheduler.speculation.draft_tokens if scheduler.speculates
                else 0, "torch_threads": torch.get_num_threads(),
                "kernels": "AVX-512 (engine/avx512.py)" if avx512.kernels() else "PyTorch's"}
    return load_s, run, settings


def llamacpp_worker(name: str, threads: int
                    ) -> tuple[float, Callable[[Request], Run], dict[str, Any]]:
    """Load the embedded model's GGUF in llama.cpp; same contract as `embedded_worker`."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from pyagent.engine.model import packaged_gguf
    from pyagent.engine.registry import EMBEDDED

    gguf, _ = packaged_gguf(EMBEDDED)
    repack = "amx_int8" not in (cpuinfo("flags") or "").split()
    if not repack:
        disable_weight_repacking()
    lookup = name == "llamacpp-lookup"
    draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if lookup else None
    start = time.perf_counter()
    # llama-cpp-python verifies drafts from the logits of every position (logits_all)
    llm = Llama(model_path=str(gguf), n_ctx=LLAMACPP_CONTEXT, n_threads=threads,
                n_threads_batch=threads, verbose=False, draft_model=draft, logits_all=lookup)
    load_s = time.perf_counter() - start

    def run(request: Request) -> Run:
        tokens = llm.tokenize(request.prompt.encode(), add_bos=True)
        llm.reset()  # forget the previous request: no prefix reuse
        start = time.perf_counter()
        # Greedy; without an EOS check (like ignore_eos) unless the request stops at a fence.
        times, generated, text = [], [], ""
        for token in islice(llm.generate(tokens, temp=0.0), request.max_tokens):
            times.append(time.perf_counter())
            generated.append(token)
            if request.stop:
                text = llm.detokenize(generated).decode(errors="replace")
                if request.stop in text or token == llm.token_eos():
                    break
        if not request.stop:
            text = llm.detokenize(generated).decode(errors="replace")
        return Run(len(tokens), len(times), times[0] - start, times[-1] - start,
                   text.split(request.stop)[0] if request.stop else text)

    settings = {"gguf": str(gguf), "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch,
                "n_threads": threads, "weight_repacking": repack,
                "prompt_lookup_tokens": LOOKUP_TOKENS if lookup else 0}
    return load_s, run, settings


def disable_weight_repacking() -> None:
    """Load llama.cpp weights as stored, without the AMX/repacked buffers.

    On AMX CPUs llama.cpp crashes in `ggml_backend_amx_mul_mat` on this Q4_K_M model
    (ggml-org/llama.cpp#20824). llama-cpp-python 0.3.36 does not expose `use_extra_bufts`, so the
    default model parameters it starts from are patched instead.
    """
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def worker(name: str) -> None:
    """Run one engine on the plan read from stdin; print one JSON sample on stdout."""
    import psutil

    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that print must not corrupt the JSON on stdout
    plan = json.load(sys.stdin)
    if name.startswith("llamacpp"):
        load_s, run, settings = llamacpp_worker(name, plan["threads"])
    else:
        load_s, run, settings = embedded_worker(name, plan["threads"])
    rss_after_load = psutil.Process().memory_info().rss / 2**20
    requests = plan["requests"][:1] if name in LOAD_ONLY else plan["requests"]
    runs = {item["name"]: asdict(run(Request(**item))) for item in requests}
    sample = {
        "load_s": load_s,
        "rss_after_load_mib": rss_after_load,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "settings": settings,
        "runs": runs,
    }
    json.dump(sample, result)
    result.close()


def run_worker(name: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Run one worker process and return its sample; exit with its stderr if it fails."""
    proc = subprocess.run([sys.executable, __file__, "--worker", name], input=json.dumps(plan),
                          capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        sys.exit(f"{proc.stderr[-4000:]}\nengine benchmark: the {name} worker failed "
                 f"(exit code {proc.returncode})")
    return json.loads(proc.stdout)


# --- figures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One row of the table: a figure computed from each worker sample (None: not measured)."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    value: Callable[[dict[str, Any]], float | None]
    digits: int = 1


def measured(name: str, figure: Callable[[dict[str, Any]], float]
             ) -> Callable[[dict[str, Any]], float | None]:
    """`figure` of a sample whose worker ran request `name`, else None."""
    return lambda s: figure(s["runs"][name]) if name in s["runs"] else None


def decode_tok_s(run: dict[str, Any]) -> float:
    """Tokens after the first over the time after the first (as `Timings.tokens_per_s`)."""
    return (run["completion_tokens"] - 1) / (run["total_s"] - run["ttft_s"])


def rewrite_runs(sample: dict[str, Any]) -> list[dict[str, Any]]:
    return [run for name, run in sample["runs"].items() if name.startswith("rewrite-")]


def rewrite_tok_s(sample: dict[str, Any]) -> float | None:
    runs = rewrite_runs(sample)
    if not runs:
        return None
    return (sum(r["completion_tokens"] - 1 for r in runs)
            / sum(r["total_s"] - r["ttft_s"] for r in runs))


def acceptance(sample: dict[str, Any]) -> float | None:
    runs = rewrite_runs(sample)
    drafted = sum(r["draft_tokens"] for r in runs)
    return 100 * sum(r["accepted_tokens"] for r in runs) / drafted if drafted else None


def token_count(samples: list[dict[str, Any]], name: str, field: str = "prompt_tokens") -> str:
    counts = sorted({s["runs"][name][field] for s in samples if name in s["runs"]})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def metrics(samples: list[dict[str, Any]]) -> list[Metric]:
    """The table rows; labels carry the prompt token counts actually measured."""
    prefills = [name for name in samples[0]["runs"] if name.startswith("prefill-")]
    decode = (f"decode, {token_count(samples, 'decode', 'completion_tokens')} tokens after a "
              f"{token_count(samples, 'decode')}-token prompt")
    rewrites = [name for name in samples[0]["runs"] if name.startswith("rewrite-")]
    return [
        Metric("load_s", "load time", "s", False, lambda s: s["load_s"], 2),
        Metric("peak_rss_mib", "peak RSS", "MiB", False, lambda s: s["peak_rss_mib"], 0),
        Metric("ttft_short_ms", f"time to first token, {token_count(samples, 'short')}-token "
               "prompt", "ms", False, measured("short", lambda r: r["ttft_s"] * 1000)),
        *(Metric(f"{name.replace('-', '_')}_tok_s",
                 f"prefill, {token_count(samples, name)}-token prompt", "tok/s", True,
                 measured(name, lambda r: r["prompt_tokens"] / r["ttft_s"]))
          for name in prefills),
        Metric("decode_tok_s", decode, "tok/s", True, measured("decode", decode_tok_s)),
        Metric("rewrite_tok_s", f"agent file rewrite, {len(rewrites)} programs", "tok/s", True,
               rewrite_tok_s),
        Metric("acceptance_pct", "rewrite: draft tokens accepted", "%", True, acceptance, 0),
    ]


def summarize(values: list[float | None]) -> dict[str, Any] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present),
            "values": present}


def summaries(samples: dict[str, list[dict[str, Any]]],
              rows: list[Metric]) -> dict[str, dict[str, Any]]:
    """Per engine, per metric: median, min, max and every value (None: not measured)."""
    return {engine: {m.key: summarize([m.value(s) for s in runs]) for m in rows}
            for engine, runs in samples.items()}


def ratios(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per PyAgent variant, its median / plain llama.cpp's median, per metric."""
    if "llamacpp" not in stats:
        return {}
    base = stats["llamacpp"]
    return {engine: {key: value["median"] / base[key]["median"] if value and base[key] else None
                     for key, value in stats[engine].items()}
            for engine in stats if engine.startswith("embedded") and engine not in LOAD_ONLY}


def identical(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Greedy texts of int8 without drafts against auto (int8 with drafts), request by request."""
    pairs = [(a["runs"][name]["text"], b["runs"][name]["text"])
             for a, b in zip(samples.get("embedded-int8", []), samples.get("embedded-auto", []),
                             strict=False)
             for name in a["runs"] if name == "decode" or name.startswith("rewrite-")]
    return {"compared": len(pairs), "identical": sum(x == y for x, y in pairs)}


def cell(stat: dict[str, Any] | None, digits: int) -> str:
    if stat is None:
        return "-"
    if len(stat["values"]) == 1:
        return f"{stat['median']:.{digits}f}"
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def table_rows(rows: list[Metric], stats: dict[str, dict[str, Any]],
               ratio: dict[str, dict[str, float | None]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the terminal table and the Markdown file."""
    header = ["figure", "unit", "better", *(ENGINES[e] for e in stats)]
    header += [f"{ENGINES[e]} / llama.cpp" for e in ratio]
    cells = []
    for m in rows:
        line = [m.label, m.unit, "higher" if m.higher_is_better else "lower",
                *(cell(stats[e][m.key], m.digits) for e in stats)]
        line += ["-" if ratio[e][m.key] is None else f"{ratio[e][m.key]:.2f}x" for e in ratio]
        cells.append(line)
    return header, cells


def engine_notes(result: dict[str, Any]) -> list[str]:
    """How each engine ran, from the settings its workers reported."""
    auto = result["samples"]["embedded-auto"][0]["settings"]
    same = result["identical"]
    notes = [f"PyAgent: {auto['torch_threads']} torch threads; each request starts without "
             "cached prefixes",
             "PyAgent int8: int8 linear layers (rounding steps searched per row), LM head "
             "screened in int4 with its top 1,024 logits recomputed from float32 "
             f"(engine/quantize.py, engine/screened_head.py), on {auto.get('kernels')} "
             "kernels; float32, int8 and bf16-weights run without drafts",
             f"PyAgent auto: the defaults, here {auto['precision']} ({auto['chosen']}) with "
             f"prompt-lookup drafts of up to {auto['draft_tokens']} tokens; its greedy texts "
             f"equal int8's in {same['identical']} of {same['compared']} requests",
             "PyAgent int8 (no cache): the converted-weight cache deleted before loading "
             "(load and peak RSS only)"]
    if result["llamacpp_skipped"]:
        return [*notes, f"llama.cpp: {result['llamacpp_skipped']}"]
    llama = result["samples"]["llamacpp"][0]["settings"]
    repack = ("on" if llama["weight_repacking"] else "off (this CPU has AMX, where llama.cpp "
              "crashes with repacked weights: ggml-org/llama.cpp#20824)")
    return [*notes, f"llama.cpp: the same GGUF (Q4_K_M), n_ctx {llama['n_ctx']}, n_batch "
            f"{llama['n_batch']}, {llama['n_threads']} threads, weight repacking {repack}; "
            f"+ lookup: its prompt-lookup drafts (LlamaPromptLookupDecoding, "
            f"{LOOKUP_TOKENS} tokens); ratios are over plain llama.cpp"]


def markdown(result: dict[str, Any], header: list[str], cells: list[list[str]]) -> str:
    machine = result["machine"]
    lines = [
        "# Engine benchmark",
        "",
        f"- command: `{result['command']}`",
        f"- commit: `{result['git']['commit']}`" + (" (dirty tree)" if result["git"]["dirty"]
                                                    else ""),
        f"- date: {result['date']}",
        f"- machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
        f"{machine['memory_gib']:.0f} GiB; {result['threads']} threads per engine",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
        *(f"- {note}" for note in engine_notes(result)),
        f"- {result['repeats']} worker process(es) per engine; cells are median [min, max]",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(line) + " |" for line in cells),
    ]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one run per engine, no 2048-token prompt, 16 decode tokens "
                             "(writes engine-quick.*)")
    parser.add_argument("--repeats", type=positive, help="worker processes per engine (default 3)")
    parser.add_argument("--threads", type=positive, help="threads per engine (torch's default)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table
    from transformers import AutoTokenizer

    from pyagent.engine.model import prepare
    from pyagent.engine.registry import EMBEDDED

    console = Console()
    repeats = args.repeats or (1 if args.quick else 3)
    threads = args.threads or torch.get_num_threads()
    with console.status("preparing the embedded model cache"):
        tokenizer = AutoTokenizer.from_pretrained(str(prepare(EMBEDDED)))
    plan = {"threads": threads,
            "requests": [asdict(r) for r in with_prompts(requests(args.quick), tokenizer)]}
    engines = ["embedded", "embedded-int8", "embedded-int8-cold", "embedded-bf16",
               "embedded-auto"]
    skipped = None
    if util.find_spec("llama_cpp"):
        engines += ["llamacpp", "llamacpp-lookup"]
    else:
        skipped = "llama_cpp is not installed, figures skipped (pip install -e '.[llamacpp]')"
        console.print(f"[yellow]{skipped}[/]")

    samples: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    with Progress(console=console) as progress:
        task = progress.add_task("workers", total=repeats * len(engines))
        for i in range(repeats):
            for engine in engines:
                progress.update(task, description=f"{ENGINES[engine]} run {i + 1}/{repeats}")
                samples[engine].append(run_worker(engine, plan))
                progress.advance(task)

    rows = metrics(samples["embedded-auto"])
    stats = summaries(samples, rows)
    ratio = ratios(stats)
    result = {
        "benchmark": "engine",
        "command": command(ROOT),
        "git": git_state(ROOT),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": threads,
        "repeats": repeats,
        "versions": {"python": platform.python_version(), "pyagent": version("pyagent"),
                     "torch": version("torch"), "transformers": version("transformers"),
                     "llama_cpp": version("llama-cpp-python")},
        "model": EMBEDDED.name,
        "llamacpp_skipped": skipped,
        "requests": plan["requests"],
        "metrics": {m.key: {"label": m.label, "unit": m.unit,
                            "higher_is_better": m.higher_is_better} for m in rows},
        "summary": stats,
        "ratios_over_llamacpp": ratio,
        "identical": identical(samples),
        "samples": samples,
    }
    header, cells = table_rows(rows, stats, ratio)
    table = Table(*header, title=escape(f"Engine benchmark: median [min, max] of {repeats} run(s)"))
    for line in cells:
        table.add_row(*line)
    console.print(table)
    for note in engine_notes(result):
        console.print(escape(note))

    stem = "engine-quick" if args.quick else "engine"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    write_atomic(RESULTS / f"{stem}.md", markdown(result, header, cells))
    console.print(f"wrote {RESULTS.relative_to(ROOT)}/{stem}.json and {stem}.md")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("engine benchmark: interrupted; no result files were written")
