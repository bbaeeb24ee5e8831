"""Mann-Kendall / Sen's slope against hand-computed and brute-force answers, and `classify` on
synthetic series of each kind with 5% noise."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pyagent.observe.metrics.trend import MAX_POINTS, TrendError, classify, mann_kendall

SEEDS = range(5)


def brute_force_s(values: list[float]) -> int:
    return sum(int(np.sign(b - a)) for a, b in itertools.combinations(values, 2))


def test_mann_kendall_matches_the_textbook_example():
    trend = mann_kendall([1, 2, 3, 4, 5])
    assert trend.s == 10
    assert trend.var_s == pytest.approx(5 * 4 * 15 / 18)
    assert trend.z == pytest.approx(9 / math.sqrt(5 * 4 * 15 / 18))
    assert trend.p_value == pytest.approx(0.0275, abs=1e-4)
    assert trend.tau == pytest.approx(1.0)
    assert trend.direction == "increasing"
    assert (trend.slope, trend.intercept) == (pytest.approx(1.0), pytest.approx(1.0))


def test_mann_kendall_tie_correction_matches_brute_force():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 6, 40).tolist()  # many ties
    trend = mann_kendall(values)
    _, ties = np.unique(values, return_counts=True)
    n = len(values)
    expected_var = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in ties)) / 18
    assert trend.s == brute_force_s(values)
    assert trend.var_s == pytest.approx(expected_var)


def test_sens_slope_is_per_unit_of_times_with_a_covering_interval():
    rng = np.random.default_rng(0)
    times = np.arange(100) * 0.5
    values = 3.0 - 2.0 * times + rng.normal(0, 1, 100)
    trend = mann_kendall(values, times)
    assert trend.direction == "decreasing"
    assert trend.slope_low <= -2.0 <= trend.slope_high
    assert trend.slope == pytest.approx(-2.0, abs=0.05)
    assert mann_kendall(values).slope == pytest.approx(trend.slope * 0.5)  # per sample index


def test_unordered_times_are_sorted_first():
    assert mann_kendall([3, 1, 2, 4, 5], times=[2, 0, 1, 3, 4]).s == 10


def test_short_and_constant_series_have_no_trend():
    short = mann_kendall([1, 2, 3])
    assert short.direction == "none" and short.p_value == 1.0 and "too few" in short.note
    flat = mann_kendall([7.0] * 20)
    assert flat.direction == "none" and flat.slope == 0.0 and flat.note == "constant series"
    assert classify([7.0] * 20).kind == "stable"
    assert classify([1, 5, 9]).kind == "stable"


def test_noise_has_no_trend():
    values = np.random.default_rng(1).normal(0, 1, 200)
    trend = mann_kendall(values)
    assert trend.direction == "none" and trend.p_value > 0.05
    assert trend.slope_low < 0 < trend.slope_high


def test_long_series_are_thinned():
    trend = mann_kendall(np.arange(10 * MAX_POINTS, dtype=float))
    assert trend.n == MAX_POINTS and trend.slope == pytest.approx(1.0)


@pytest.mark.parametrize("values, times, message", [
    ([1, 2, 3], [0, 1], "must match"),
    ([1, 2, 3], [0, 1, 1], "distinct"),
    ([1, float("nan"), 3], None, "finite"),
])
def test_bad_series_are_rejected(values, times, message):
    with pytest.raises(TrendError, match=message):
        mann_kendall(values, times)


def series(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A clean series of `kind` plus Gaussian noise of 5% of its range."""
    t = np.arange(160)
    base = {
        "linear": 50 + 2.0 * t,
        "exponential": 100 + 10 * np.exp(t / 40),
        "seasonal": 50 + 10 * np.sin(2 * np.pi * t / 24),
        "step": np.where(t < 70, 100.0, 130.0),
        "sawtooth": 100 + (t % 20) * 1.0,
    }[kind]
    return base + rng.normal(0, 0.05 * np.ptp(base), t.size)


@pytest.mark.parametrize("kind", ["linear", "exponential", "seasonal", "step", "sawtooth"])
def test_classify_names_each_shape(kind):
    for seed in SEEDS:
        pattern = classify(series(kind, np.random.default_rng(seed)))
        assert pattern.kind == kind, (seed, pattern.reason)


def test_pure_noise_is_stable():
    for seed in SEEDS:
        values = np.random.default_rng(seed).normal(100, 5, 200)
        assert classify(values).kind == "stable"
        assert classify(values, period=24).kind == "stable"


def test_classify_reports_its_evidence():
    rng = np.random.default_rng(7)
    step = classify(series("step", rng))
    assert abs(step.step_index - 70) <= 1 and step.step_size == pytest.approx(30, abs=2)
    seasonal = classify(series("seasonal", rng))
    assert seasonal.seasonal_period in (23, 24, 25) and seasonal.seasonal_strength > 0.8
    saw = classify(series("sawtooth", rng))
    assert len(saw.drops) == 7 and all(d.size < -15 for d in saw.drops)
    assert [d.index for d in saw.drops] == [20 * k for k in range(1, 8)]
    exponential = classify(series("exponential", rng))
    assert exponential.r2_exponential > exponential.r2_linear
    linear = classify(series("linear", rng), times=np.arange(160) * 2.0)
    assert linear.trend.slope_low <= 1.0 <= linear.trend.slope_high  # per unit of times
    assert linear.r2_linear > 0.95


def test_a_given_period_is_used_and_checked():
    values = series("seasonal", np.random.default_rng(0))
    assert classify(values, period=24).seasonal_period == 24
    with pytest.raises(TrendError, match="period must be at least 2 samples, got 1"):
        classify(values, period=1)


def test_resolution_makes_page_jitter_stable():
    rng = np.random.default_rng(0)
    rss = 100_000_000 + 4096 * rng.integers(0, 3, 100)
    assert classify(rss, resolution=65536).kind == "stable"


MIB = 1 << 20


def sampled_sawtooth(rng: np.random.Generator, trend: float = 0.0) -> np.ndarray:
    """RSS of a process that allocates 20 MiB blocks with pauses between them and frees them
    all every few blocks, sampled a few times per block: a sawtooth whose climbs are steps."""
    rss, level = [], 100 * MIB
    for _ in range(8):
        for _ in range(rng.integers(3, 7)):
            level += 20 * MIB
            rss += [level] * int(rng.integers(1, 4))
        level = 100 * MIB + trend * len(rss)
        rss.append(level)
    return np.asarray(rss) + rng.integers(0, 16, len(rss)) * 4096


def test_a_sawtooth_that_climbs_in_steps_is_a_sawtooth():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        pattern = classify(sampled_sawtooth(rng), resolution=65536)
        assert pattern.kind == "sawtooth", (seed, pattern.reason)
        assert len(pattern.drops) == 8
        leaky = classify(sampled_sawtooth(rng, trend=MIB), resolution=65536)
        assert leaky.kind == "sawtooth", (seed, leaky.reason)


@pytest.mark.parametrize("shape", ["square", "spikes"])
def test_jumps_up_and_back_are_no_sawtooth(shape):
    t = np.arange(160)
    base = {"square": np.where((t // 20) % 2 == 1, 130.0, 100.0),
            "spikes": np.where(np.isin(t, [40, 90, 130]), 160.0, 100.0)}[shape]
    for seed in SEEDS:
        values = base + np.random.default_rng(seed).normal(0, 0.5, t.size)
        assert classify(values).kind != "sawtooth"


def test_stable_linear_and_step_series_of_rss_keep_their_names():
    rng = np.random.default_rng(3)
    jitter = rng.integers(0, 16, 120) * 4096
    flat = 200 * MIB + jitter
    assert classify(flat, resolution=65536).kind == "stable"
    assert classify(flat + np.arange(120) * MIB, resolution=65536).kind == "linear"
    step = flat + np.where(np.arange(120) < 50, 0, 64 * MIB)
    assert classify(step, resolution=65536).kind == "step"
