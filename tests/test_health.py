"""Health score: objective scores, the weighted mean, statuses, alert caps and objective files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import DictSource
from pyagent.errors import ConfigError
from pyagent.observe.metrics.alerts import AlertEngine, Query, load_rules
from pyagent.observe.metrics.health import (
    FAIL,
    PASS,
    WARN,
    Objective,
    evaluate_health,
    load_objectives,
    status_of,
)


def objective(name: str = "o", query: object = "value(x)", target: float = 1.0,
              direction: str = "below", **extra: object) -> Objective:
    return Objective(name=name, query=query, target=target, direction=direction, **extra)


@pytest.mark.parametrize(("value", "score"), [
    (0.0, 1.0), (2.0, 1.0), (2.5, 0.75), (3.0, 0.5), (4.0, 0.0), (9.0, 0.0), (None, None)])
def test_below_scores_zero_at_twice_the_target(value, score):
    assert objective(target=2.0).score(value) == score


@pytest.mark.parametrize(("value", "score"), [
    (1.0, 1.0), (0.95, 1.0), (0.94, 0.8), (0.925, 0.5), (0.90, 0.0), (0.5, 0.0)])
def test_above_with_an_error_budget_tolerance(value, score):
    assert objective(target=0.95, direction="above", tolerance=0.05).score(value) == \
        pytest.approx(score)


def test_above_defaults_to_zero_at_zero_and_tolerance_applies_to_below():
    assert objective(target=10, direction="above").score(2.5) == pytest.approx(0.25)
    assert objective(target=-4, direction="above").score(-6) == pytest.approx(0.5)
    assert objective(target=2.0, tolerance=0.5).score(2.25) == pytest.approx(0.5)


def test_queries_as_mappings_or_expressions():
    mapping = objective(query={"metric": "lat", "stat": "p99.9", "labels": {"agent": "a"},
                               "window": "5m"})
    assert mapping.query.numerator == Query("lat", "p99.9", {"agent": "a"}, 300)
    assert mapping.query.denominator is None
    ratio = objective(query="rate(err[1m]) / rate(req[1m])")
    assert ratio.query.denominator == Query("req", "rate", {}, 60)
    assert objective(query=ratio.query).query is ratio.query


@pytest.mark.parametrize(("fields", "location", "message"), [
    ({"query": {"metric": "m", "stat": "avg"}}, ("query", "query-mapping", "stat"),
     "unknown stat 'avg'"),
    ({"query": {"metric": "m", "stat": "p95", "window": "5"}},
     ("query", "query-mapping", "window"), "bad duration '5'"),
    ({"query": "rate(x) > 1"}, ("query", "query-expression"), "column 9"),
    ({"direction": "under"}, ("direction",), "'below' or 'above'"),
    ({"weight": 0}, ("weight",), "greater than 0"),
    ({"target": 0}, (), "the target is 0: set a tolerance"),
])
def test_bad_objectives(fields, location, message):
    with pytest.raises(ValidationError) as error:
        objective(**fields)
    (first, *_) = error.value.errors()
    assert first["loc"] == location
    assert message in first["msg"]


def test_health_arithmetic_and_queries():
    objectives = [
        objective("latency", {"metric": "lat", "stat": "p95", "window": "5m"}, 2.0, weight=2),
        objective("errors", 'rate(err{agent="a"}[5m]) / rate(req{agent="a"}[5m])', 0.01),
        objective("success", "value(ok)", 0.95, "above", tolerance=0.05),
    ]
    source = DictSource(lat=3.0, err=0.5, req=100.0, ok=0.93)
    report = evaluate_health(objectives, source)
    assert source.calls == [("lat", "p95", None, 300.0), ("err", "rate", {"agent": "a"}, 300.0),
                            ("req", "rate", {"agent": "a"}, 300.0), ("ok", "value", None, None)]
    assert [c.score for c in report.checks] == pytest.approx([0.5, 1.0, 0.6])
    assert report.score == pytest.approx(100 * (2 * 0.5 + 1.0 + 0.6) / 4)
    assert report.status == FAIL  # 65
    assert [c.status for c in report.checks] == [WARN, PASS, WARN]


def test_weights_move_the_score():
    good, bad = objective("good", "value(a)"), objective("bad", "value(b)")
    source = DictSource(a=0.5, b=5.0)
    assert evaluate_health([good, bad], source).score == 50
    heavy = objective("good", "value(a)", weight=3)
    assert evaluate_health([heavy, bad], source).score == 75


def test_unknown_objectives_are_left_out_and_reported():
    objectives = [objective("known", "value(a)"), objective("unknown", "value(b)", weight=100)]
    report = evaluate_health(objectives, DictSource(a=1.5))
    assert report.score == 50
    assert report.unknown == ["unknown"]
    data = report.to_dict()
    assert data["checks"]["unknown"] == [{
        "status": WARN, "observedValue": None, "target": 1.0, "direction": "below",
        "weight": 100, "score": None, "output": "no data"}]
    assert data["output"] == "no data for unknown"


def test_no_data_at_all_is_a_warning():
    report = evaluate_health([objective()], DictSource())
    assert (report.score, report.status) == (None, WARN)


@pytest.mark.parametrize(("score", "status"), [
    (100, PASS), (90, PASS), (89.99, WARN), (70, WARN), (69.99, FAIL), (0, FAIL)])
def test_status_thresholds(score, status):
    assert status_of(score) == status


@pytest.mark.parametrize(("value", "status"), [(0.5, PASS), (1.05, PASS), (1.2, WARN),
                                               (1.35, FAIL)])
def test_status_of_a_report(value, status):
    assert evaluate_health([objective()], DictSource(x=value)).status == status


def test_ietf_shape():
    report = evaluate_health([objective("lat", target=2.0)], DictSource(x=2.5))
    data = json.loads(json.dumps(report.to_dict()))
    assert data == {"status": WARN, "score": 75.0, "checks": {"lat": [{
        "status": WARN, "observedValue": 2.5, "target": 2.0, "direction": "below", "weight": 1.0,
        "score": 0.75, "output": "2.5 is not below the target 2"}]}}
    healthy = evaluate_health([objective("lat", target=2.0)], DictSource(x=1.0)).to_dict()
    assert healthy == {"status": PASS, "score": 100.0, "checks": {"lat": [{
        "status": PASS, "observedValue": 1.0, "target": 2.0, "direction": "below",
        "weight": 1.0, "score": 1.0}]}}


RULES = """\
groups:
  - name: g
    rules:
      - {alert: Down, expr: value(down) > 0, labels: {severity: critical}}
      - {alert: Slow, expr: value(slow) > 0, labels: {severity: warning}}
      - {alert: Note, expr: value(note) > 0, labels: {severity: info}}
      - {alert: Soon, expr: value(soon) > 0, for: 1h, labels: {severity: critical}}
"""


@pytest.mark.parametrize(("firing", "x", "status", "capped_by"), [
    ({}, 1.0, PASS, ()),
    ({"down": 1}, 1.0, FAIL, ("Down",)),
    ({"slow": 1}, 1.0, WARN, ("Slow",)),
    ({"slow": 1, "down": 1}, 1.0, FAIL, ("Down", "Slow")),
    ({"note": 1}, 1.0, PASS, ()),
    ({"soon": 1}, 1.0, PASS, ()),  # pending, not firing
    ({"slow": 1}, 1.25, WARN, ()),  # already warn
    ({"slow": 1}, 5.0, FAIL, ()),  # a warning never raises a fail
])
def test_firing_alerts_cap_the_status(tmp_path, firing, x, status, capped_by):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES, encoding="utf-8")
    alerts = AlertEngine(load_rules(path), DictSource(**firing))
    alerts.evaluate(0.0)
    report = evaluate_health([objective()], DictSource(x=x), alerts.alerts())
    assert (report.status, report.capped_by) == (status, capped_by)
    assert report.score == pytest.approx(100 * objective().score(x))
    if capped_by:
        assert report.to_dict()["output"].startswith(f"firing alert {capped_by[0]}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "health.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """\
objectives:
  - name: latency
    query: {metric: lat, stat: p95, window: 5m}
    target: 2
    direction: below
    weight: 2
  - name: errors
    query: rate(err[5m]) / rate(req[5m])
    target: 0.01
    direction: below
"""


def test_load_objectives(tmp_path):
    latency, errors = load_objectives(write(tmp_path, GOOD))
    assert (latency.name, latency.weight, latency.target) == ("latency", 2, 2)
    assert latency.query.numerator == Query("lat", "p95", {}, 300)
    assert errors.query.denominator == Query("req", "rate", {}, 300)


@pytest.mark.parametrize(("old", "new", "line", "message"), [
    ("stat: p95,", "stat: avg,", 3, "objectives.0.query.stat: Value error, unknown stat 'avg'"),
    ("window: 5m", "window: 5 min", 3, "objectives.0.query.window: bad duration '5 min'"),
    ("rate(err[5m]) /", "rate(err[5m]) //", 8, "objectives.1.query: bad expression"),
    ("    target: 0.01\n", "", 7, "objectives.1.target: Field required"),
    ("direction: below\n    weight", "direction: down\n    weight", 5,
     "objectives.0.direction: Input should be 'below' or 'above'"),
    ("weight: 2", "weight: -1", 6, "objectives.0.weight: Input should be greater than 0"),
    ("target: 0.01", "target: 0", 7, "objectives.1: Value error, the target is 0"),
    ("name: errors", "name: latency", 7, "objective 'latency' is defined twice"),
    ("    target: 2\n", "\ttarget: 2\n", 4, "not valid YAML"),
])
def test_bad_objective_files_name_file_and_line(tmp_path, old, new, line, message):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as error:
        load_objectives(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert message in str(error.value)
