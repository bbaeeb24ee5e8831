"""Alert rules: durations, the expression language, rule files and the alert state machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DictSource
from pyagent.errors import ConfigError
from pyagent.observe.metrics.alerts import (
    FIRING,
    INACTIVE,
    PENDING,
    RESOLVED,
    AlertEngine,
    ParseError,
    Query,
    load_rules,
    parse_duration,
    parse_expr,
    render,
)
from pyagent.observe.metrics.source import MetricSource

EXAMPLE = (Path(__file__).resolve().parent.parent / "src" / "pyagent" / "observe" / "defaults"
           / "alerts.yaml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def rule_file(tmp_path: Path, expr: str = "value(x) > 10", extra: str = "",
              group: str = "") -> Path:
    return write(tmp_path, f"""\
groups:
  - name: g
{group}    rules:
      - alert: A
        expr: '{expr}'
        labels: {{severity: critical, team: ops}}
{extra}""")


def engine(tmp_path: Path, source: DictSource, **kwargs: float) -> AlertEngine:
    extra = "".join(f"        {key}: {value}\n" for key, value in kwargs.items()
                    if key in ("for", "keep_firing_for"))
    return AlertEngine(load_rules(rule_file(tmp_path, extra=extra)), source,
                       resolved_retention_s=kwargs.get("retention", 900.0))


def test_the_test_source_is_a_metric_source():
    assert isinstance(DictSource(), MetricSource)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("1d", 86400), ("2w", 1209600), ("250ms", 0.25),
    ("1h30m", 5400), ("0s", 0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "5 m", "m", "1.5h", "", "5y", "-5m"])
def test_bad_durations(text):
    with pytest.raises(ParseError, match="bad duration"):
        parse_duration(text)
    assert issubclass(ParseError, ConfigError)


@pytest.mark.parametrize(("text", "op", "threshold"), [
    ("value(x) > 1", ">", 1), ("value(x)>=1.5", ">=", 1.5), ("value(x) < -2", "<", -2),
    ("value(x) <= 1e-3", "<=", 0.001), ("value(x) == 0", "==", 0), ("value(x) != .5", "!=", 0.5)])
def test_comparisons(text, op, threshold):
    expr = parse_expr(text)
    assert (expr.op, expr.threshold, expr.text) == (op, threshold, text)
    assert expr.measure.numerator == Query("x", "value")
    assert expr.measure.denominator is None


def test_query_with_selector_window_and_ratio():
    expr = parse_expr("""rate( errors_total{agent="coder", tool='read_file',}[5m] )
                         / rate(requests_total{agent="coder"}[1h30m]) > 0.05""")
    assert expr.measure.numerator == Query("errors_total", "rate",
                                           {"agent": "coder", "tool": "read_file"}, 300)
    assert expr.measure.denominator == Query("requests_total", "rate", {"agent": "coder"}, 5400)


def test_quantiles_escapes_and_names():
    expr = parse_expr(r'p99.9(gen_ai.client:duration{path="a\"b\\c"}) > 2')
    assert expr.measure.numerator == Query("gen_ai.client:duration", "p99.9", {"path": 'a"b\\c'})
    assert parse_expr("p50(x{}) > 1").measure.numerator == Query("x", "p50")


@pytest.mark.parametrize(("text", "column", "message"), [
    ("avg(x) > 1", 1, "unknown stat 'avg'"),
    ("p100(x) > 1", 1, "unknown stat 'p100'"),
    ("rate x > 1", 6, "expected '(' after rate"),
    ("rate() > 1", 6, "expected a metric name"),
    ("rate(x > 1", 8, "expected ')'"),
    ("rate(x{a=1}) > 1", 10, "expected a quoted label value"),
    ("rate(x{a='1' b='2'}) > 1", 14, "expected ',' or '}'"),
    ("rate(x{a:'1'}) > 1", 9, "expected '=' after label a"),
    ("rate(x[5 minutes]) > 1", 8, "bad duration '5'"),
    ("rate(x[5m) > 1", 10, "expected ']'"),
    ("rate(x[0s]) > 1", 8, "a window must be longer than 0"),
    ("rate(x) / > 1", 11, "expected a stat"),
    ("rate(x) => 1", 9, "expected a comparison"),
    ("rate(x) >", 10, "expected a number after '>'"),
    ("rate(x) > 1 and rate(y) > 2", 13, "unexpected text"),
    ("", 1, "expected a stat"),
])
def test_bad_expressions_say_where(text, column, message):
    with pytest.raises(ParseError) as error:
        parse_expr(text)
    assert f"column {column} " in str(error.value)
    assert message in str(error.value)


def test_expression_runs_the_queries_it_names():
    source = DictSource(errors_total=3.0, requests_total=60.0)
    expr = parse_expr('rate(errors_total{agent="coder"}[5m]) / rate(requests_total[1h]) > 0.04')
    value = expr.measure.run(source)
    assert value == pytest.approx(0.05)
    assert expr.holds(value)
    assert source.calls == [("errors_total", "rate", {"agent": "coder"}, 300.0),
                            ("requests_total", "rate", None, 3600.0)]
    assert not expr.holds(0.04)


@pytest.mark.parametrize("values", [
    {"errors_total": 1.0, "requests_total": 0.0},
    {"errors_total": 1.0},
    {"requests_total": 5.0}])
def test_ratio_without_data_is_no_data(values):
    expr = parse_expr("rate(errors_total[5m]) / rate(requests_total[5m]) > 0")
    value = expr.measure.run(DictSource(**values))
    assert value is None
    assert not expr.holds(value)


def test_load_rules(tmp_path):
    path = rule_file(tmp_path, expr="p95(lat{agent=\"a\"}[1m]) >= 2", group="    interval_s: 15\n",
                     extra="        for: 5m\n        keep_firing_for: 1h\n"
                           "        annotations: {summary: 'p95 {{ $value }} on "
                           "{{ $labels.agent }}'}\n")
    (group,) = load_rules(path)
    (rule,) = group.rules
    assert (group.name, group.interval_s) == ("g", 15)
    assert (rule.name, rule.for_s, rule.keep_firing_for_s) == ("A", 300, 3600)
    assert rule.expr.measure.numerator == Query("lat", "p95", {"agent": "a"}, 60)
    assert rule.alert_labels() == {"alertname": "A", "agent": "a", "severity": "critical",
                                   "team": "ops"}
    assert rule.annotations == {"summary": "p95 {{ $value }} on {{ $labels.agent }}"}


def test_defaults(tmp_path):
    (group,) = load_rules(rule_file(tmp_path))
    assert group.interval_s is None
    assert (group.rules[0].for_s, group.rules[0].keep_firing_for_s) == (0, 0)


def test_example_rules_load_and_run():
    groups = load_rules(EXAMPLE)
    rules = [rule for group in groups for rule in group.rules]
    assert len(rules) >= 4
    assert {rule.labels["severity"] for rule in rules} >= {"critical", "warning"}
    assert any(rule.expr.measure.denominator for rule in rules)
    alerts = AlertEngine(groups, DictSource())
    assert alerts.evaluate(0.0) == []
    assert all(a["state"] == INACTIVE and a["no_data"] for a in alerts.state())


GOOD_RULE = """\
      - alert: A
        expr: value(x) > 1
        labels: {severity: warning}
"""


@pytest.mark.parametrize(("rules", "line", "message"), [
    ("      - alert: A\n\texpr: value(x) > 1\n", 5, "not valid YAML"),
    ("      - alert: A\n        expr: avg(x) > 1\n        labels: {severity: info}\n", 5,
     "expr: bad expression 'avg(x) > 1', column 1 (near 'avg(x) > 1'): unknown stat 'avg'"),
    ("      - alert: A\n        expr: value(x) >> 1\n        labels: {severity: info}\n", 5,
     "column 11"),
    ("      - alert: A\n        expr: value(x[5q]) > 1\n        labels: {severity: info}\n",
     5, "bad duration '5q'"),
    (GOOD_RULE + "        for: 5 minutes\n", 7, "for: bad duration '5 minutes'"),
    (GOOD_RULE + "        keep_firing_for: 300\n", 7,
     "keep_firing_for: expected a duration such as 5m as a string, got 300"),
    ("      - alert: A\n        expr: value(x) > 1\n        labels: {team: ops}\n", 6,
     "labels: Value error, severity must be one of critical, warning, info"),
    ("      - alert: A\n        expr: value(x) > 1\n        labels: {severity: page}\n", 6,
     "severity must be one of"),
    ("      - alert: A\n        expr: value(x) > 1\n", 4, "labels: Field required"),
    (GOOD_RULE + "        fro: 5m\n", 7, "fro: Extra inputs are not permitted"),
    (GOOD_RULE + GOOD_RULE, 7, "alert 'A' is defined twice in group 'g'"),
    (GOOD_RULE + "        annotations:\n          summary: '{{ $labels.agent }}'\n", 8,
     "annotations.summary: unknown placeholder {{ $labels.agent }}"),
    (GOOD_RULE + "        annotations: {summary: '{{ value }}'}\n", 7,
     "unknown placeholder {{ value }}"),
])
def test_bad_rule_files_name_file_and_line(tmp_path, rules, line, message):
    path = write(tmp_path, "groups:\n  - name: g\n    rules:\n" + rules)
    with pytest.raises(ConfigError) as error:
        load_rules(path)
    assert str(error.value).startswith(f"{path}:{line}: ")
    assert message in str(error.value)


def test_bad_group_files(tmp_path):
    twice = "groups:\n" + "  - name: g\n    rules:\n" + GOOD_RULE + "  - name: g\n    rules:\n"
    path = write(tmp_path, twice + GOOD_RULE)
    with pytest.raises(ConfigError, match=r"rules.yaml:7: group name 'g' is used twice"):
        load_rules(path)
    path = write(tmp_path, "groups:\n  - name: g\n    interval_s: 0\n    rules:\n" + GOOD_RULE)
    with pytest.raises(ConfigError, match=r"rules.yaml:3: groups.0.interval_s: Input should be"):
        load_rules(path)
    path = write(tmp_path, "groups: []\n")
    with pytest.raises(ConfigError, match=r"rules.yaml:1: groups: List should have at least 1"):
        load_rules(path)


def test_same_alert_name_in_two_groups_is_fine(tmp_path):
    text = "groups:\n  - name: g\n    rules:\n" + GOOD_RULE + "  - name: h\n    rules:\n"
    groups = load_rules(write(tmp_path, text + GOOD_RULE))
    assert [g.name for g in groups] == ["g", "h"]


def states(transitions):
    return [(t.at, t.previous, t.state) for t in transitions]


def test_for_and_keep_firing_for(tmp_path):
    source = DictSource(x=5.0)
    alerts = engine(tmp_path, source, **{"for": "60s", "keep_firing_for": "30s"}, retention=60)
    (alert,) = alerts.alerts()
    script = [(0, 5), (10, 20), (40, 20), (69, 20), (70, 20), (80, 5), (90, 20), (100, 5),
              (129, 5), (130, 5), (150, 5), (189, 5), (190, 5)]
    moved = []
    for now, value in script:
        source.values["x"] = value
        moved += alerts.evaluate(now)
        if now == 40:
            assert (alert.state, alert.active_since) == (PENDING, 10)
        if now == 80:
            assert (alert.state, alert.keep_firing_since) == (FIRING, 80)
        if now == 90:
            assert (alert.state, alert.keep_firing_since) == (FIRING, None)
        if now == 150:
            assert (alert.state, alert.resolved_at, alert.active_since) == (RESOLVED, 130, 10)
    assert states(moved) == [(10, INACTIVE, PENDING), (70, PENDING, FIRING),
                             (130, FIRING, RESOLVED), (190, RESOLVED, INACTIVE)]
    assert [t.value for t in moved] == [20, 20, 5, 5]
    assert [(h["at"], h["state"]) for h in alerts.history()] == [(t.at, t.state) for t in moved]
    assert (alert.active_since, alert.resolved_at) == (None, None)


def test_pending_must_hold_continuously(tmp_path):
    source = DictSource(x=20.0)
    alerts = engine(tmp_path, source, **{"for": "1m"})
    moved = alerts.evaluate(0)
    source.values["x"] = 5.0
    moved += alerts.evaluate(30)
    assert alerts.alerts()[0].active_since is None
    source.values["x"] = 20.0
    for now in (40, 90, 99, 100):
        moved += alerts.evaluate(now)
    assert states(moved) == [(0, INACTIVE, PENDING), (30, PENDING, INACTIVE),
                             (40, INACTIVE, PENDING), (100, PENDING, FIRING)]
    assert alerts.firing()[0].active_since == 40


def test_without_for_fires_at_once_and_resolves_at_once(tmp_path):
    source = DictSource(x=20.0)
    alerts = engine(tmp_path, source)
    assert states(alerts.evaluate(0)) == [(0, INACTIVE, FIRING)]
    source.values["x"] = 10.0  # `>` is strict
    assert states(alerts.evaluate(1)) == [(1, FIRING, RESOLVED)]
    source.values["x"] = 11.0
    assert states(alerts.evaluate(2)) == [(2, RESOLVED, FIRING)]
    assert alerts.firing()[0].active_since == 2


def test_resolved_goes_back_to_pending(tmp_path):
    source = DictSource(x=20.0)
    alerts = engine(tmp_path, source, **{"for": "10s"})
    for now, value in [(0, 20), (10, 20), (20, 0), (30, 20), (40, 20)]:
        source.values["x"] = value
        alerts.evaluate(now)
    assert [(h["at"], h["previous"], h["state"]) for h in alerts.history()] == [
        (0, INACTIVE, PENDING), (10, PENDING, FIRING), (20, FIRING, RESOLVED),
        (30, RESOLVED, PENDING), (40, PENDING, FIRING)]


def test_no_data_is_false_not_an_error(tmp_path):
    source = DictSource(x=20.0)
    alerts = engine(tmp_path, source, **{"for": "1m"})
    alerts.evaluate(0)
    source.values["x"] = None
    assert states(alerts.evaluate(10)) == [(10, PENDING, INACTIVE)]
    (state,) = alerts.state()
    assert (state["state"], state["value"], state["no_data"]) == (INACTIVE, None, True)
    assert state["active_since"] is None
    source.values["x"] = 20.0
    alerts.evaluate(20)
    alerts.evaluate(80)
    assert alerts.state()[0]["no_data"] is False
    source.values.pop("x")
    assert states(alerts.evaluate(90)) == [(90, FIRING, RESOLVED)]


def test_never_evaluated_alert_is_not_no_data(tmp_path):
    (state,) = engine(tmp_path, DictSource()).state()
    assert (state["state"], state["no_data"], state["last_evaluated"]) == (INACTIVE, False, None)


def test_annotations_are_rendered_with_value_and_labels(tmp_path):
    path = rule_file(tmp_path, expr='p95(lat{agent="coder"}[5m]) > 2', extra="""\
        annotations:
          summary: "{{ $labels.alertname }}: p95 of {{$labels.agent}} is {{ $value }} s"
          description: "{{ $labels.severity }} for {{ $labels.team }}"
""")
    source = DictSource(lat=2.5)
    alerts = AlertEngine(load_rules(path), source)
    (transition,) = alerts.evaluate(100.0)
    assert source.calls == [("lat", "p95", {"agent": "coder"}, 300.0)]
    expected = {"summary": "A: p95 of coder is 2.5 s", "description": "critical for ops"}
    assert transition.annotations == expected
    source.values["lat"] = 3.25
    alerts.evaluate(101.0)
    (state,) = json.loads(json.dumps(alerts.state()))
    assert state["annotations"]["summary"] == "A: p95 of coder is 3.25 s"
    assert state == {
        "group": "g", "alert": "A", "state": FIRING, "expr": 'p95(lat{agent="coder"}[5m]) > 2',
        "value": 3.25, "no_data": False,
        "labels": {"alertname": "A", "agent": "coder", "severity": "critical", "team": "ops"},
        "annotations": {"summary": "A: p95 of coder is 3.25 s", "description": "critical for ops"},
        "active_since": 100.0, "keep_firing_since": None, "resolved_at": None,
        "last_evaluated": 101.0}


def test_render_without_data():
    assert render("v={{ $value }} a={{ $labels.a }}", None, {"a": "x"}) == "v=no data a=x"
    assert render("{{ $value }}", 1 / 3, {}) == "0.333333"


def test_group_interval(tmp_path):
    source = DictSource(x=20.0)
    alerts = AlertEngine(load_rules(rule_file(tmp_path, group="    interval_s: 60\n")), source)
    for now in (0, 30, 59.9, 60, 61, 120):
        alerts.evaluate(now)
    assert len(source.calls) == 3
    assert alerts.alerts()[0].last_evaluated == 120


def test_history_is_bounded(tmp_path):
    source = DictSource(x=20.0)
    alerts = AlertEngine(load_rules(rule_file(tmp_path)), source, history=3)
    for now in range(6):  # firing, resolved, firing, resolved, firing, resolved
        source.values["x"] = 20.0 if now % 2 == 0 else 0.0
        assert len(alerts.evaluate(now)) == 1
    assert [h["at"] for h in alerts.history()] == [3, 4, 5]
    assert json.loads(json.dumps(alerts.history()))[-1]["state"] == RESOLVED
