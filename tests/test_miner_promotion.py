"""Promotion by evidence on fabricated paired results: a real gain, noise, a loss, few tasks."""

import random

import pytest

from pyagent.errors import ConfigError
from pyagent.miner.promotion import compare, decide


def _paired(n: int, p_before: float, p_after: float, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return ([int(rng.random() < p_before) for _ in range(n)],
            [int(rng.random() < p_after) for _ in range(n)])


def test_a_real_gain_is_promoted_noise_and_a_loss_are_not():
    before, gain = _paired(120, 0.2, 0.6, seed=1)
    _, same = _paired(120, 0.2, 0.2, seed=2)
    _, worse = _paired(120, 0.2, 0.05, seed=3)
    decisions = {d.candidate: d for d in decide(before, {"gain": gain, "noise": same,
                                                          "loss": worse})}
    assert decisions["gain"].promoted, decisions["gain"].reason
    assert decisions["gain"].comparison.low > 0
    assert not decisions["noise"].promoted
    assert not decisions["loss"].promoted
    assert decisions["loss"].comparison.high < 0
    assert "does not lie above zero" in decisions["loss"].reason


def test_noise_is_promoted_at_about_the_level_asked():
    """Candidates no better than the incumbent: the family-wise rate of false promotions stays
    near or below alpha over many fabricated validations."""
    promoted = 0
    for seed in range(200):
        before, after = _paired(40, 0.3, 0.3, seed=seed)
        promoted += decide(before, {"noise": after}, alpha=0.05, seed=seed)[0].promoted
    assert promoted <= 200 * 0.05 + 5  # binomial slack: mean 10, sd about 3


def test_few_tasks_need_the_exact_test_too():
    """Three wins and no losses among ten tasks: the bootstrap's lower bound is not below zero
    on its own, but an exact test cannot call three coin flips a gain."""
    before, after = [0] * 10, [1, 1, 1] + [0] * 7
    comparison = compare(before, after, confidence=0.95)
    assert (comparison.wins, comparison.losses) == (3, 0)
    assert comparison.p_value == pytest.approx(0.125)
    decision = decide(before, {"c": after})[0]
    assert not decision.promoted
    assert "wins against" in decision.reason or "interval" in decision.reason


def test_bonferroni_splits_alpha_over_candidates():
    before = [0] * 9 + [1] * 1
    after = [1] * 7 + [0] * 2 + [1]  # 7 wins, 0 losses: p = 1/128
    alone = decide(before, {"c": after})[0]
    crowded = decide(before, {f"c{i}": after for i in range(4)})
    assert alone.promoted
    assert alone.comparison.p_value == pytest.approx(1 / 128)
    assert crowded[0].comparison.confidence == pytest.approx(1 - 0.05 / 4)
    assert all(d.promoted for d in crowded)  # 1/128 < 0.0125
    many = decide(before, {f"c{i}": after for i in range(10)})
    assert not any(d.promoted for d in many)  # 1/128 > 0.005


def test_the_same_seed_gives_the_same_interval():
    before, after = _paired(30, 0.3, 0.5, seed=4)
    assert compare(before, after, seed=7) == compare(before, after, seed=7)


@pytest.mark.parametrize("before, after, message", [
    ([1, 0], [1], "differ in length"),
    ([], [], "no paired tasks"),
])
def test_bad_pairs_are_one_line(before, after, message):
    with pytest.raises(ConfigError, match=message):
        compare(before, after)


def test_bad_levels_are_one_line():
    with pytest.raises(ConfigError, match="alpha must lie between 0 and 1"):
        decide([0], {"c": [1]}, alpha=1.5)
    with pytest.raises(ConfigError, match="confidence must lie between 0 and 1"):
        compare([0], [1], confidence=0)
