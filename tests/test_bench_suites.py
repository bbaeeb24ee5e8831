"""The suite runner and its statistics: Wilson intervals, pass^k, baselines, episodes with
feedback, threads and asyncio, errors recorded (not raised), outputs in every format."""

from __future__ import annotations

import csv
import json
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from pyagent.bench.runner import RunSettings, SuiteRunner
from pyagent.bench.scores import (
    majority_answer,
    majority_baseline,
    pass_hat_k,
    random_baseline,
    summarize,
    wilson,
)
from pyagent.bench.suiterun import run_suites, write_outputs
from pyagent.bench.suites.base import FamilySuite, Grade, Problem, Turn, first_line, split_of
from pyagent.bench.suites.registry import Selection
from pyagent.errors import BackendError, ConfigError
from pyagent.types import Completion, CompletionRequest, Timings, Usage


class Parity:
    """Is a number odd or even? An episode of four turns whose labels swap after the second."""

    name = "parity"
    measures = "test family"
    instruction = "Answer odd or even."
    difficulties = (1, 2)
    max_tokens = 4

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        numbers = [rng.randrange(10_000) for _ in range(2 * difficulty)]
        swap = difficulty == 2
        turns = tuple(Turn(f"{n}?", ("even" if n % 2 == 0 else "odd") if not swap or i < 2
                           else ("odd" if n % 2 == 0 else "even"))
                      for i, n in enumerate(numbers))
        return Problem(turns, choices=("odd", "even"),
                       scored=(2, 3) if swap else None)

    def grade(self, problem: Problem, turn: int, answer: str) -> Grade:
        parsed = first_line(answer).lower()
        if parsed not in ("odd", "even"):
            return Grade.malformed("not odd or even", parsed)
        return Grade.exact(parsed == problem.turns[turn].answer, parsed,
                           problem.turns[turn].answer)


class Oracle:
    """Answers each question with the true parity; fails on questions listed in `broken`."""

    name = "oracle"

    def __init__(self, broken: frozenset[str] = frozenset()):
        self.broken = broken
        self.seen: list[CompletionRequest] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def complete(self, request: CompletionRequest) -> Completion:
        with self.lock:
            self.seen.append(request)
            self.threads.add(threading.current_thread().name)
        text = request.prompt if request.prompt is not None else request.messages[-1].content
        number = int(text.rsplit("Q: ", 1)[-1].split("?")[0].split()[-1])
        if str(number) in self.broken:
            raise BackendError("the server went away")
        answer = "even" if number % 2 == 0 else "odd"
        return Completion(answer, "stop", Usage(10, 1, 0), Timings(0.01, 0.02, 1, 0.0),
                          "oracle", "oracle")

    def stream(self, request: CompletionRequest):
        raise NotImplementedError


@pytest.fixture
def suite() -> FamilySuite:
    return FamilySuite("toy", "a test suite", [Parity()])


def test_wilson_matches_the_textbook_interval():
    share, low, high = wilson(8, 10)
    assert share == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 10)[1:] == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(0, 0)[0] != wilson(0, 0)[0]  # NaN: no items, no figure


def test_pass_hat_k_is_the_unbiased_all_k_pass_chance():
    assert pass_hat_k([[True, True, True, False]], 2) == pytest.approx(0.5)  # C(3,2)/C(4,2)
    assert pass_hat_k([[True] * 3, [False] * 3], 3) == pytest.approx(0.5)
    assert pass_hat_k([[True, False]], 1) == pytest.approx(0.5)


def test_summary_counts_items_not_attempts():
    records = [{"item_id": "a", "correct": True, "score": 1.0, "latency_s": 1.0},
               {"item_id": "a", "correct": False, "score": 0.0, "latency_s": 3.0},
               {"item_id": "b", "correct": True, "score": 1.0, "latency_s": 2.0},
               {"item_id": "b", "correct": True, "score": 1.0, "latency_s": 2.0}]
    summary = summarize(records)
    assert summary["items"] == 2 and summary["attempts"] == 4
    assert summary["accuracy"] == pytest.approx(0.75)
    assert summary["pass_hat_k"]["2"] == pytest.approx(0.5)
    assert summary["latency_p50_s"] == 2.0
    assert summary["cost_usd"] is None  # no attempt had a known price


def test_splits_follow_content_and_never_overlap(suite):
    keys = {split: {Problem(i.turns).key() for i in suite.items(split, 40)}
            for split in ("train", "validation", "test")}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]
    for item in suite.items("test", 10):
        assert split_of("parity\x1e" + Problem(item.turns).key()) == "test"
    assert suite.items("test", 5, seed=3) == suite.items("test", 5, seed=3)
    assert suite.items("test", 5, seed=3) != suite.items("test", 5, seed=4)


def test_baselines_grade_every_choice_and_the_majority_answer(suite):
    item = suite.items("test", 1, difficulties=[1])[0]
    assert random_baseline(item, suite.grade) == pytest.approx((0.25, 0.5))  # both turns; each
    answer = majority_answer(suite.items("train", 50, difficulties=[1]))
    assert answer in ("odd", "even")
    right = [t.answer == answer for t in item.turns]
    assert majority_baseline(item, answer, suite.grade) == (float(all(right)),
                                                            sum(right) / len(right))


@pytest.mark.parametrize("executor", ["threads", "asyncio"])
def test_episodes_feed_back_and_score_only_the_scored_turns(suite, executor):
    items = suite.items("test", 6)
    backend = Oracle()
    settings = RunSettings(style="completion", concurrency=3, executor=executor)
    records = SuiteRunner(backend, {"toy": suite}, settings).run(items)
    assert [r["item_id"] for r in records] == [i.id for i in items]
    by_level = {d: [r for r in records if r["difficulty"] == d] for d in (1, 2)}
    assert all(r["correct"] for r in by_level[1])  # the oracle knows parity
    assert not any(r["correct"] for r in by_level[2])  # ... but not that the labels swapped
    later = [r for r in backend.seen if r.prompt and r.prompt.count("Q: ") == 2 + 4]
    assert later and all("Wrong. The answer was" in r.prompt for r in later)
    assert all(r["calls"] == 2 * r["difficulty"] and r["error"] is None for r in records)


def test_a_failing_call_is_an_errored_wrong_attempt_not_a_crash(suite):
    items = suite.items("test", 3, difficulties=[1])
    broken = items[1].turns[1].question.rstrip("?")
    records = SuiteRunner(Oracle(frozenset({broken})), {"toy": suite},
                          RunSettings(style="chat", concurrency=2)).run(items)
    assert [r["error"] is not None for r in records] == [False, True, False]
    assert records[1]["correct"] is False and records[1]["score"] == 0.0


def test_settings_refuse_what_would_measure_nothing():
    with pytest.raises(ConfigError, match="needs --temperature"):
        RunSettings(repeat=3)
    with pytest.raises(ConfigError, match="executor"):
        RunSettings(executor="processes")


def test_a_run_writes_json_sqlite_csv_and_html(suite, tmp_path: Path):
    result = run_suites(Oracle(), [Selection(suite)], RunSettings(concurrency=2), limit=4)
    result["meta"] = {"command": "test", "git": {}, "date": "now", "machine": {}}
    assert result["overall"]["items"] == 8 and result["overall"]["accuracy"] == 0.5
    by_level = {r["difficulty"]: r for r in result["difficulties"]}
    assert by_level[1]["random"] == pytest.approx(0.25)
    assert by_level[1]["random_score"] == pytest.approx(0.5)
    written = {p.name for p in write_outputs(result, tmp_path)}
    assert {"suites.json", "suites.sqlite", "suites.html", "suites-attempts.csv"} <= written
    with (tmp_path / "suites-attempts.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 8
    with sqlite3.connect(tmp_path / "suites.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM difficulties").fetchone() == (2,)
    html = (tmp_path / "suites.html").read_text()
    assert "accuracy by family and difficulty" in html and "<script" not in html
    assert json.loads((tmp_path / "suites.json").read_text())["overall"]["items"] == 8


def test_asking_for_more_items_than_a_family_has_is_a_clear_error(suite):
    class Coin(Parity):
        def generate(self, rng: random.Random, difficulty: int) -> Problem:
            side = rng.choice(("heads", "tails", "edge", "up", "down"))
            return Problem((Turn(f"{side}?", "odd"),))

    small = FamilySuite("coins", "five problems in all", [Coin()])
    with pytest.raises(ConfigError, match="fewer than 50 distinct test items"):
        small.items("test", 50, difficulties=[1])


def test_wilson_intervals_hold_their_share_and_plot_at_the_edges():
    from pyagent.bench.report.figures import intervals

    for n in range(1, 120):
        for k in range(n + 1):
            share, low, high = wilson(k, n)
            assert low <= share <= high
    assert intervals(["none", "all"], [0.0, 1.0], [1e-18, 0.9], [0.3, 1 - 1e-16], {}, "t", "x")
