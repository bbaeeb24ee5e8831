"""Reports: records as JSON, CSV and SQLite; HTML pages from every kind of result, offline."""

import csv
import json
import sqlite3
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pyagent.bench.memory import MemoryProfiler
from pyagent.bench.prices import PriceTable
from pyagent.bench.report.fmt import quantity, unit_of
from pyagent.bench.report.html import build_report
from pyagent.bench.report.records import flatten, write_records
from pyagent.bench.tokens import TokenTracker
from pyagent.errors import ConfigError
from pyagent.observe.metrics import MetricsRegistry
from pyagent.observe.metrics.alerts import AlertEngine, load_rules
from pyagent.observe.metrics.health import Objective, evaluate_health
from pyagent.types import Usage

ROOT = Path(__file__).parents[1]
RECORDS = [{"model": "gpt-4o", "cost": {"total": "0.02", "notes": ["a"]}, "calls": 2},
           {"model": "<script>x</script>", "cost": {"total": None}, "extra": 1.5}]


class Page(HTMLParser):
    """Collects headings, figures and every external reference of a page."""

    def __init__(self):
        super().__init__()
        self.headings, self.svgs, self.external, self.scripts = [], 0, [], 0
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self._in_h2 = tag == "h2"
        self.svgs += tag == "svg"
        self.scripts += tag == "script"
        for name, value in attrs:
            if name in ("src", "href", "xlink:href") and value and not value.startswith("#"):
                self.external.append(value)

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def test_records_flatten_and_round_trip_in_every_format(tmp_path):
    assert flatten(RECORDS[0]) == {"model": "gpt-4o", "cost.total": "0.02",
                                   "cost.notes": '["a"]', "calls": 2}
    rows = json.loads(write_records(RECORDS, tmp_path / "r.json").read_text())
    assert rows[1]["cost.total"] is None and rows[1]["extra"] == 1.5
    with (write_records(RECORDS, tmp_path / "r.csv")).open() as handle:
        read = list(csv.DictReader(handle))
    assert read[0]["cost.notes"] == '["a"]' and read[1]["extra"] == "1.5"
    db = write_records(RECORDS, tmp_path / "r.sqlite", table="calls")
    write_records([{"a": 1}], db, table="other")  # another table leaves this one alone
    with sqlite3.connect(db) as connection:
        assert connection.execute('SELECT model, "cost.total" FROM calls').fetchall() == [
            ("gpt-4o", "0.02"), ("<script>x</script>", None)]
        assert connection.execute("SELECT a FROM other").fetchall() == [(1,)]
    with pytest.raises(ConfigError, match=r"r\.xlsx: unknown record format '\.xlsx'"):
        write_records(RECORDS, tmp_path / "r.xlsx")
    with pytest.raises(ConfigError, match="not a valid table name"):
        write_records(RECORDS, db, table="drop table x")


def results(tmp_path: Path) -> list[Path]:
    """One file of every kind of result, made by the real producers."""
    tracker = TokenTracker(PriceTable(ROOT / "examples" / "prices.yaml"))
    tracker.record(Usage(10_000, 500, 8_000), model="gpt-4o", run_id="r", step="code",
                   agent="coder")
    tracker.record(Usage(900, 40, 0), model="gemma-3-270m", run_id="r", step="test",
                   agent="<tester>")
    registry = MetricsRegistry()
    latency = registry.histogram("pyagent_llm_latency_seconds", "LLM latency",
                                 labelnames=("agent",))
    calls = registry.counter("pyagent_llm_calls_total", "calls", labelnames=("status",))
    for i in range(200):
        latency.labels(agent="coder").observe(0.5 + i / 100)
        calls.labels(status="ok").inc()
    engine = AlertEngine(load_rules(ROOT / "src" / "pyagent" / "observe" / "defaults"
                                    / "alerts.yaml"), registry)
    engine.evaluate(now=1000.0)
    health = evaluate_health([Objective(name="latency", target=1.0, direction="below",
                                        query={"metric": "pyagent_llm_latency_seconds",
                                               "stat": "p95"})], registry)
    with MemoryProfiler(interval_s=0.05) as profiler:
        blocks = [bytearray(1 << 20) for _ in range(20)]
    del blocks
    files = {"tokens.json": tracker.to_dict(), "metrics.json": registry.snapshot(),
             "alerts.json": engine.state(), "health.json": health.to_dict(),
             "memory.json": profiler.report.to_dict()}
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(data, default=str))
    return [*paths, ROOT / "benchmarks" / "results" / "orchestration-overhead.json"]


def test_a_report_shows_every_kind_of_result_in_one_offline_page(tmp_path):
    out, *tables = build_report(results(tmp_path), tmp_path / "report.html",
                                tables=tmp_path / "tables")
    page = parse(out)
    assert page.headings == [
        "Summary", "Tokens and cost: tokens.json", "Distribution: pyagent_llm_latency_seconds",
        "Counters and gauges: metrics.json", "Alerts: alerts.json", "Health: health.json",
        "Memory: memory.json", "Benchmark: orchestration_overhead"]
    assert page.svgs == 6  # tokens and cost by agent and model, latency, memory
    assert page.external == [] and page.scripts == 0
    text = out.read_text()
    assert "&lt;tester&gt;" in text and "<tester>" not in text  # names are escaped
    assert "cost $0.02" in text and "10,900 prompt tokens (8,000 cached" in text
    assert "cached share" in text and "genai-prices" in text  # strategies and price sources
    assert tables[-1].name == "report.sqlite" and len(tables) > 8
    first = tables[0]
    assert first.name == "t01_tokens_and_cost_tokens_json_1.csv"
    with first.open() as handle:
        agents = [row["name"] for row in csv.DictReader(handle)]
    assert agents == ["coder", "<tester>"]
    with sqlite3.connect(tables[-1]) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert names == {path.stem for path in tables[:-1]}


def test_bad_result_files_are_named(tmp_path):
    (tmp_path / "odd.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="odd.json: not a result this report knows"):
        build_report([tmp_path / "odd.json"], tmp_path / "r.html")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        build_report([tmp_path / "broken.json"], tmp_path / "r.html")
    with pytest.raises(ConfigError, match=r"absent\.json: cannot read it"):
        build_report([tmp_path / "absent.json"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_the_cli_profiles_a_command_and_reports_it(tmp_path):
    profile = tmp_path / "memory.json"
    run = subprocess.run(
        [sys.executable, "-m", "pyagent", "bench", "memory", "--interval", "0.05", "--out",
         str(profile), "--", sys.executable, "-c",
         "import time; x = [bytearray(1 << 20) for _ in range(64)]; time.sleep(0.5)"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(profile.read_text())["peak_rss"] > 64 * 1024 * 1024
    report = subprocess.run(
        [sys.executable, "-m", "pyagent", "bench", "report", str(profile), "--out",
         str(tmp_path / "r.html")], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert parse(tmp_path / "r.html").headings == ["Summary", "Memory: memory.json"]
    failing = subprocess.run([sys.executable, "-m", "pyagent", "bench", "memory", "--",
                              sys.executable, "-c", "raise SystemExit(3)"],
                             capture_output=True, text=True, timeout=120)
    assert failing.returncode == 3 and "exit code 3" in failing.stdout


def memory_profile() -> dict:
    with MemoryProfiler(interval_s=0.02) as profiler:
        blocks = [bytearray(1 << 20) for _ in range(8)]
    del blocks
    return json.loads(json.dumps(profiler.report.to_dict()))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("peak_rss"), "not a valid memory profile: field peak_rss: Field required"),
    (lambda d: d.update(samples="many"), "field samples: Input should be a valid list"),
    (lambda d: d["samples"][0].update(rss="big"), "field samples.0.rss: Input should be a valid"),
    (lambda d: d.update(pattern={"kind": "stable"}), "field pattern.reason: Field required"),
])
def test_a_near_miss_memory_profile_names_the_file_and_field(tmp_path, edit, message):
    data = memory_profile()
    edit(data)
    path = tmp_path / "mem.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"^mem.json: .*{message}"):
        build_report([path], tmp_path / "r.html")
    run = subprocess.run([sys.executable, "-m", "pyagent", "bench", "report", str(path), "--out",
                          str(tmp_path / "r.html")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "mem.json" in run.stderr


@pytest.mark.parametrize(("data", "message"), [
    ({"benchmark": "engine", "meta": {}, "summary": {"embedded": {"decode_tok_s": {}}}},
     r"engine.json: field summary.embedded.decode_tok_s.median: missing"),
    ({"benchmark": "batching", "meta": {}, "results": {"int8": {"aggregate_tok_s": "fast"}}},
     r"engine.json: field results.int8.aggregate_tok_s: expected a number, got 'fast'"),
    ({"totals": {"calls": 1}, "by": {}, "records": []},
     r"engine.json: not a valid token accounting: field totals.prompt_tokens: Field required"),
])
def test_a_near_miss_benchmark_or_token_result_names_the_file_and_field(tmp_path, data, message):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        build_report([path], tmp_path / "r.html")


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("prefix_sharing.shared.prompt_tokens", 1036, "1,036"),
    ("summary.cached_share", 0.4242, "42.4%"),
    ("kv_saving", 0.3077, "30.8%"),
    ("summary.embedded.load_s.median", 4.0844, "4.08 s"),
    ("ratios_over_llamacpp.embedded.load_s", 9.1558, "9.16\u00d7"),
    ("peak_rss", 113_246_208, "108 MiB"),
    ("money.gpt.baseline_cost", "0.00569085", "$0.005691"),
    ("p_value", 8.7e-10, "8.7e-10"),
])
def test_figures_get_their_unit_from_their_name(key, value, shown):
    assert quantity(value, unit_of(key)) == (shown, True)


def test_every_committed_result_renders_without_raw_json(tmp_path):
    paths = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    out = build_report(paths, tmp_path / "r.html")[0]
    page = parse(out)
    assert page.headings[0] == "Summary" and len(page.headings) == len(paths) + 1
    text = out.read_text()
    assert '<td>{"' not in text and '<td class="num">[' not in text
    assert "Benchmark: engine" in text and "Benchmark: kv" in text


def test_the_batching_summary_judges_throughput_at_8_concurrent_against_4x():
    from pyagent.bench.report.headlines import batching

    data = {"results": {
        "int8": {"aggregate_tok_s": 290.0, "ttft_p95_ratio": 1.5, "throughput_ratio": 2.4},
        "int8, no drafts": {"aggregate_tok_s": 230.0, "ttft_p95_ratio": 0.7,
                            "throughput_ratio": 4.02},
        "float32": {"aggregate_tok_s": 46.7, "ttft_p95_ratio": 2.4}}}  # an older result
    checks = {c.target: (c.measured, c.met) for c in batching(data).checks}
    assert checks["int8: 8 concurrent >= 4x single stream"] == ("2.40x", False)
    assert checks["int8, no drafts: 8 concurrent >= 4x single stream"] == ("4.02x", True)
    assert "float32: 8 concurrent >= 4x single stream" not in checks
    assert checks["float32: p95 TTFT under load < 2x unloaded"] == ("2.40x", False)
